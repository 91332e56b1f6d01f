"""LoRA files that load everywhere: metadata in every file, kohya/A1111 export, fused pipelines.

The diffusers file (`pytorch_lora_weights.safetensors`) is what `pipe.load_lora_weights` reads.
The kohya layout (`lora_unet_…`, `lora_te_…`, `.lora_down` / `.lora_up` / `.alpha`) is what
AUTOMATIC1111, ComfyUI and kohya's sd-scripts read; for SDXL the two text encoders are
`lora_te1_…` (CLIP ViT-L) and `lora_te2_…` (OpenCLIP bigG), as SDXL LoRAs name them. Both carry the
run's metadata in the safetensors header under `dreambooth_lab.*` keys: base model, model family
(sd1 / sd2 / sdxl), rare token, class, rank, alpha, steps, resolution, training-config hash, and
the LoRA scales the run recommends.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import files
from .config import Config, validate_sample
from .lora import run_metadata
from .lora_check import PREFIX, read_metadata
from .models import resolve


# kohya's ss_base_model_version per family (what A1111 / ComfyUI and LoRA browsers show)
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


# ---- kohya / A1111 layout ---------------------------------------------------------------------------

class ExportRefused(ValueError):
    """This run's adapter cannot be carried by the asked format; the message says what to use."""


_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(?:lora_(A|B)|lora(?:_linear_layer)?\.(down|up))"
                  r"\.weight$")


def to_kohya(state: dict[str, torch.Tensor], alpha: float, family: str = "sd1") -> dict[str, torch.Tensor]:
    """diffusers LoRA keys -> kohya/A1111 keys, with one alpha tensor per adapted module (pure).

    family "sdxl" names the text encoders lora_te1_ / lora_te2_ (SD1/SD2: lora_te_).

    Accepts the peft style (`.lora_A.weight`) and diffusers' own (`.lora.down.weight`,
    `.lora_linear_layer.down.weight`). Text-encoder modules are named as in CLIP's original
    `text_model.encoder...` layout, which is what AUTOMATIC1111 and ComfyUI look up:

    'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight'
      -> 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight'
    'text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight'
      -> 'lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight'
    SDXL: 'text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight'
      -> 'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight'
    """
    xl = family == "sdxl"
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if not m:
            raise ValueError(f"unexpected LoRA key {key!r}: not a diffusers-format UNet/text-encoder LoRA")
        part, module, ab, downup = m.groups()
        if part == "text_encoder_2" and not xl:
            raise ValueError(f"LoRA key {key!r} is for SDXL's second text encoder, but the family is {family}: "
                             "pass family='sdxl'")
        if part != "unet" and not module.startswith("text_model."):
            module = "text_model." + module
        name = prefixes[part] + module.replace(".", "_")
        down = ab == "A" or downup == "down"
        out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def export_kohya(run_dir: str | Path, out: str | Path | None = None, step: int | None = None) -> Path:
    """Write the run's LoRA in the kohya layout with metadata; returns the file.

    `run_dir` is a run folder or a LoRA file inside one (the final file, or a step's in loras/);
    `step` picks a LoRA the run saved at that step (train.save_lora_every). The default target is
    RUN/export/<download_name>; an existing file is never overwritten."""
    run_dir, cfg, lora, step = _kohya_source(run_dir, step)
    target = Path(out) if out else run_dir / "export" / download_name(run_dir, step)
    if target.exists():
        raise FileExistsError(f"{target} exists already: exports are never overwritten; pass another --out")
    return _write_kohya(cfg, lora, target, step)


def download_name(run_dir: str | Path, step: int | None = None) -> str:
    """The kohya file's name: the run folder's name (<train.name>-<timestamp>, which no other run
    has) and, for a step's LoRA, the step: sks-dog-20250101-120000_step-000400_kohya.safetensors (pure)."""
    from .steps import step_name

    return f"{Path(run_dir).name}{'' if step is None else '_' + step_name(step)}_kohya.safetensors"


def kohya_for_download(run_dir: str | Path, step: int | None = None, out_dir: str | Path | None = None) -> Path:
    """The kohya/A1111/ComfyUI file of a run's final LoRA (step=None) or of a saved step, named so
    that files of different runs and steps never share a name (`download_name`), in
    `out_dir` (default RUN/export/). Calling it again returns the same file: an existing file with
    the same bytes is kept; one with other bytes is refused, never overwritten."""
    run_dir, cfg, lora, step = _kohya_source(run_dir, step)
    target = Path(out_dir or run_dir / "export") / download_name(run_dir, step)
    return _write_kohya(cfg, lora, target, step, same_ok=True)


def _kohya_source(run_dir: str | Path, step: int | None) -> tuple[Path, Config, Path, int | None]:
    """(run folder, resolved config, LoRA file, step) of a run folder, its LoRA file or a step's file."""
    from .report import load_run_config
    from .inference import find_lora_file
    from .steps import lora_file, run_of, step_of

    run_dir = Path(run_dir)
    if run_dir.is_file():  # a LoRA file: check it first, the config is beside it (or above loras/)
        lora = find_lora_file(run_dir)
        owner = run_of(lora)
        if owner is not None:
            if step is not None and step != step_of(lora):
                raise ValueError(f"{lora} is the LoRA of step {step_of(lora)}, not of step {step}: pass the run folder "
                                 "with step, or the step's file alone")
            step = step_of(lora)
        return (owner or lora.parent), load_run_config(owner or lora.parent).resolved(), lora, step
    cfg = load_run_config(run_dir).resolved()
    return run_dir, cfg, lora_file(run_dir, step), step


def _write_kohya(cfg: Config, lora: Path, target: Path, step: int | None, same_ok: bool = False) -> Path:
    if cfg.lora.use_dora:
        raise ExportRefused(f"{lora} is a DoRA adapter (lora.use_dora): the kohya/A1111 layout written here has no "
                            "place for its magnitude vectors, and dropping them would change the images. Use the "
                            "diffusers-format file itself (pipe.load_lora_weights), or train without lora.use_dora")
    from .lora_check import base_components, check_fits, checked_embedding, read_checked

    # The file is checked whole before anything is written: finite float weights, whole layers that
    # fit the base model's modules (built from its configs, no weights), its learned identifier.
    layers = read_checked(lora)
    checked_embedding(lora)
    family = lora_family(lora, cfg)
    check_fits(lora, layers, base_components(cfg.model.name, cfg.model.revision, family),
               f"the base model {cfg.model.name}")
    state = load_file(str(lora))
    meta = {**run_metadata(cfg, family), PREFIX + "format": "kohya", "ss_network_dim": str(cfg.lora.rank),
            "ss_network_alpha": str(cfg.lora_alpha), "ss_base_model_version": BASE_MODEL_VERSION[family],
            "ss_output_name": f"{cfg.data.token}_{cfg.data.class_name}"}
    if step is not None:
        meta[PREFIX + "step"] = str(step)
    if family == "sd2":
        meta["ss_v2"] = "True"
    data = files.safetensors_bytes(to_kohya(state, cfg.lora_alpha, family), meta)
    _write_once(target, data, same_ok)
    export_embedding(lora, target, same_ok)
    return target


def _write_once(target: Path, data: bytes, same_ok: bool) -> None:
    if target.exists():
        if same_ok and target.is_file() and target.read_bytes() == data:
            return
        raise FileExistsError(f"{target} exists already" + (" with other contents" if same_ok else "") +
                              ": exports are never overwritten; move it away or pass another --out")
    files.write_bytes(target, data)


def lora_family(lora: Path, cfg: Config) -> str:
    """The family a LoRA file says it was trained on (its metadata), else the run's base model's."""
    family = read_metadata(lora).get(PREFIX + "family")
    if family:
        if family not in BASE_MODEL_VERSION:
            raise ValueError(f"{lora}: metadata {PREFIX}family={family!r} is not a known family "
                             f"({', '.join(BASE_MODEL_VERSION)})")
        return family
    return resolve(cfg.model).family


def embedding_export_path(kohya_file: Path) -> Path:
    return kohya_file.with_name(kohya_file.stem.removesuffix("_kohya") + "_embedding.safetensors")


def export_embedding(lora: Path, kohya_file: Path, same_ok: bool = False) -> Path | None:
    """A learned identifier goes beside the kohya LoRA as an A1111/ComfyUI embedding file
    ({"emb_params": [n, dim]}; prompts then name the file, e.g. <sks-dog_embedding>). `lora` is the
    LoRA file it belongs to (identifier.embedding_beside finds its embedding)."""
    from .lora_check import checked_embedding

    found = checked_embedding(lora)  # missing or damaged when the LoRA was trained with one: LoraFileError
    if found is None:
        return None
    source = found[0]
    target = embedding_export_path(kohya_file)
    _write_once(target, source.read_bytes(), same_ok)
    return target


def export_fused(run_dir: str | Path, scale_unet: float | None = None, scale_text_encoder: float | None = None,
                 out: str | Path | None = None, device=None) -> Path:
    """Fuse the LoRA into the base weights at the given scales and save a full pipeline folder."""
    import tempfile

    from .report import load_run_config, load_run_pipeline
    from .inference import find_lora_file

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    su = cfg.sample.lora_scale_unet if scale_unet is None else scale_unet
    ste = cfg.sample.lora_scale_text_encoder if scale_text_encoder is None else scale_text_encoder
    validate_sample(replace(cfg.sample, lora_scale_unet=su, lora_scale_text_encoder=ste))  # same rules as sampling
    target = Path(out) if out else run_dir / "export" / f"fused-unet{su:g}-te{ste:g}"
    if target.exists():
        raise FileExistsError(f"{target} exists already: exports are never overwritten")
    pipe = load_run_pipeline(run_dir, device=device or "cpu")
    adapters = pipe.get_list_adapters()
    ste2 = cfg.sample.lora_scale_text_encoder_2
    ste2 = ste if ste2 is None or scale_text_encoder is not None else ste2
    pipe.fuse_lora(components=["unet"], lora_scale=su)
    if "text_encoder" in pipe.get_list_adapters():
        pipe.fuse_lora(components=["text_encoder"], lora_scale=ste)
    if "text_encoder_2" in pipe.get_list_adapters():
        pipe.fuse_lora(components=["text_encoder_2"], lora_scale=ste2)
    pipe.unload_lora_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    with files.disk_full_as(target.parent, hint="free space there or pass another --out"):
        tmp = Path(tempfile.mkdtemp(prefix=".fused-", dir=target.parent))
        try:
            pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
            (tmp / "pipe" / "dreambooth_lab.json").write_text(json.dumps(
                {**run_metadata(cfg, lora_family(find_lora_file(run_dir), cfg)), PREFIX + "fused_scale_unet": su,
                 PREFIX + "fused_scale_text_encoder": ste,
                 **({PREFIX + "fused_scale_text_encoder_2": ste2} if "text_encoder_2" in adapters else {})},
                indent=2, sort_keys=True))
            files.follow_umask(tmp / "pipe")
            (tmp / "pipe").rename(target)
        finally:  # a full disk (or anything else) leaves no half-written pipeline behind
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def format_info(path: str | Path) -> str:
    """The metadata of a LoRA file (or a run folder's) and a summary of what it holds."""
    from .inference import find_lora_file

    path = find_lora_file(path)  # one-line errors for a missing, pickled, truncated or foreign file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata() or {}), list(f.keys())
    unet = sum(1 for k in tensors if k.startswith(("unet.", "lora_unet_")))
    te = sum(1 for k in tensors if k.startswith(("text_encoder.", "lora_te_", "lora_te1_")))
    te2 = sum(1 for k in tensors if k.startswith(("text_encoder_2.", "lora_te2_")))
    second = f", {te2} text encoder 2" if te2 else ""
    lines = [f"{path}", f"  tensors: {len(tensors)} ({unet} UNet, {te} text encoder{second})"]
    lines += [f"  {k.removeprefix(PREFIX)}: {v}" for k, v in sorted(meta.items()) if k != "lora_adapter_metadata"]
    return "\n".join(lines)
