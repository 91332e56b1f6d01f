"""Generation: samplers, seeds, LoRA scales per component, and images saved with sidecars.

Every image gets its own ``torch.Generator`` seeded with its seed (on the CPU, so a seed means
the same starting noise on any device), which makes an image independent of which batch it
was generated in. Every PNG is written beside a JSON sidecar holding everything needed to make
it again: ``regenerate(sidecar)``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import files, identifier, lora_check
from .config import TINY_MODEL, ModelConfig
from .lora_check import LoraFileError  # noqa: F401 (raised by the checks; sample.LoraFileError is its public name)
from .runs import CONFIG, LORA_FILE, read_summary  # LORA_FILE re-exported (sample.LORA_FILE): the run-folder layout lives in runs.py

ADAPTER = "dreambooth"


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name, built from the pipeline's scheduler config."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler)

    table = {
        "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "ddim": (DDIMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
        "ddpm": (DDPMScheduler, {}),
    }
    if name not in table:
        raise ValueError(f"sampler {name!r} is unknown: use one of {', '.join(table)}")
    cls, extra = table[name]
    return cls.from_config(config, **extra)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image; seeds up to 2**63 - 1."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@dataclass
class ImageSpec:
    """Everything that decides one picture; written as its sidecar."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    guidance: float = 6.4
    steps: int = 30
    sampler: str = "dpmsolver++"
    width: int = 512
    height: int = 512
    lora_scale_unet: float = 0.0
    lora_scale_text_encoder: float = 0.0
    model: str = TINY_MODEL
    lora: str | None = None  # path of the LoRA file, None for the base model
    run: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # SDXL's second text encoder; None = lora_scale_text_encoder (both encoders at one scale)
    lora_scale_text_encoder_2: float | None = None


# ---- LoRA on a pipeline ----------------------------------------------------------------------

def run_spec(cfg, settings, lora: str | Path, run_dir: str | Path, prompt: str, seed: int,
             **extra: Any) -> ImageSpec:
    """The one place a run's picture is described: `settings` (a SampleConfig: the run's own or a
    preset's) drawn at the run's resolution with its model and `lora`, for one prompt and seed (pure)."""
    s = settings
    return ImageSpec(prompt=prompt, seed=int(seed), negative_prompt=s.negative_prompt, guidance=s.guidance,
                     steps=s.steps, sampler=s.sampler, width=cfg.resolution, height=cfg.resolution,
                     lora_scale_unet=s.lora_scale_unet, lora_scale_text_encoder=s.lora_scale_text_encoder,
                     lora_scale_text_encoder_2=s.lora_scale_text_encoder_2, model=cfg.model.name,
                     lora=str(Path(lora).resolve()), run=str(Path(run_dir).resolve()), **extra)


def find_lora_file(path: str | Path) -> Path:
    """The LoRA file of a run folder, or the file itself, checked before anything is loaded.

    It must exist, end in .safetensors (pickle files can run code), be a complete safetensors
    file (an interrupted copy cuts the data short) and hold LoRA tensors (diffusers or kohya
    keys). Raises FileNotFoundError or LoraFileError with a one-line message.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / LORA_FILE).is_file():
            what = unfinished_reason(path) if (path / CONFIG).is_file() else "not a run folder"
            raise LoraFileError(f"{path} holds no {LORA_FILE} ({what}): pass a finished run folder or a LoRA "
                                ".safetensors file")
        path = path / LORA_FILE
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist: pass a run folder or its {LORA_FILE}")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are loaded (a {path.suffix or 'suffix-less'} "
                            "file may be a pickle, which can run code): use the run's .safetensors file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraFileError(f"{path} is damaged or not a safetensors file ({reason}; {path.stat().st_size} bytes): "
                            "an interrupted copy or download cuts it short — copy it again") from exc
    if not any("lora" in k.lower() for k in keys):
        example = f" such as {keys[0]!r}" if keys else ""
        raise LoraFileError(f"{path} holds no LoRA tensors ({len(keys)} tensors{example}): it is not a LoRA file")
    return path


def unfinished_reason(run: Path) -> str:
    """Why a run folder has no LoRA yet and how to get one, in the CLI's words."""
    summary = read_summary(run) or {}
    if summary.get("status") == "failed":
        return (f"the run failed at step {summary.get('failed_at_step', '?')}: go on from its last checkpoint with "
                f"`train --resume {run} --allow-change` and the fix its error named, or train it again")
    return f"the run has not finished: finish it with `train --resume {run}`"


def load_lora(pipe, lora_path: str | Path) -> None:
    """Load a LoRA file (diffusers or kohya layout, safetensors only) into pipe as the 'dreambooth'
    adapter; `lora_path` is the file or a run folder.

    The file is checked whole first (floating-point finite weights, whole layers that fit this base
    model's modules, the learned identifier's file when it was trained with one) and the adapters
    attached are counted against it afterwards (lora_check): a file that loads nothing, or part of
    itself, raises LoraFileError in one line and leaves no adapter behind."""
    path = find_lora_file(lora_path)
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    model = f"the base model {name}" if name else "this base model"
    layers = lora_check.read_checked(path)
    embedding = lora_check.checked_embedding(path, width=pipe.text_encoder.get_input_embeddings().weight.shape[1])
    components = {k: getattr(pipe, k, None) for k in ("unet", "text_encoder", "text_encoder_2")}
    lora_check.check_fits(path, layers, {k: v for k, v in components.items() if v is not None}, model)
    if ADAPTER in (pipe.get_list_adapters().get("unet") or []):
        pipe.delete_adapters(ADAPTER)
    try:
        with _quiet_missing_text_encoder_keys():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=ADAPTER)
        lora_check.check_attached(path, layers, pipe, ADAPTER, model)
    except (LoraFileError, ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        _drop_adapter(pipe)
        if isinstance(exc, LoraFileError):  # the checks' own message
            raise
        raise LoraFileError(f"{path} does not fit this base model ({_reason(exc)}): load it on the model it was "
                            "trained on") from exc
    if embedding is not None:
        identifier.load_into(pipe, embedding[0], embedding[1])


def _drop_adapter(pipe) -> None:
    """Remove a half-loaded adapter so the pipeline draws nothing under the LoRA's name."""
    with suppress(ValueError, RuntimeError, KeyError, AttributeError):
        if ADAPTER in {a for names in pipe.get_list_adapters().values() for a in names}:
            pipe.delete_adapters(ADAPTER)


def _reason(exc: BaseException) -> str:
    """The informative part of a library error: its first line, and the next one when the first only
    introduces it ('Error(s) in loading state_dict for X:') (pure)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


@contextmanager
def _quiet_missing_text_encoder_keys():
    """A LoRA trained with the text encoder frozen has no text-encoder keys, and diffusers says so
    on every load ("No LoRA keys associated to CLIPTextModel ..."): expected here, so dropped.
    Every other message of the load still shows."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")

    handlers = logging.getLogger("diffusers").handlers
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def apply_vae_options(pipe, slicing: bool, tiling: bool) -> None:
    """VAE slicing (decode one image of a batch at a time) and tiling (decode in tiles)."""
    (pipe.vae.enable_slicing if slicing else pipe.vae.disable_slicing)()
    (pipe.vae.enable_tiling if tiling else pipe.vae.disable_tiling)()


def set_lora_scales(pipe, unet: float, text_encoder: float, text_encoder_2: float | None = None) -> None:
    """Scale the UNet and text-encoder LoRA separately (0 = base model, 1 = as trained);
    text_encoder_2 is SDXL's second text encoder (None = the text_encoder scale)."""
    loaded = pipe.get_list_adapters()
    if ADAPTER not in (loaded.get("unet") or []):
        raise RuntimeError("no LoRA is loaded: call load_lora(pipe, run_dir) first")
    scales = {"unet": unet, "text_encoder": text_encoder,
              "text_encoder_2": text_encoder if text_encoder_2 is None else text_encoder_2}
    weights = {k: float(v) for k, v in scales.items() if ADAPTER in (loaded.get(k) or [])}
    pipe.set_adapters([ADAPTER], adapter_weights=[weights])


def has_text_encoder_lora(pipe, component: str = "text_encoder") -> bool:
    """Is the LoRA loaded on the text encoder (component="text_encoder_2": SDXL's second)?"""
    return ADAPTER in (pipe.get_list_adapters().get(component) or [])


# ---- generation ------------------------------------------------------------------------------

def generate(pipe, specs: Sequence[ImageSpec], batch_size: int = 4, progress: bool = True) -> list:
    """Generate one PIL image per spec, batching specs that share every setting but the seed."""
    out: list = [None] * len(specs)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        key = (s.negative_prompt, s.guidance, s.steps, s.sampler, s.width, s.height,
               s.lora_scale_unet, s.lora_scale_text_encoder, s.lora_scale_text_encoder_2)
        groups.setdefault(key, []).append(i)
    with tqdm(total=len(specs), desc="generating", unit="img", disable=not progress) as bar:
        for idx in groups.values():
            s = specs[idx[0]]  # the group's settings
            pipe.scheduler = make_scheduler(s.sampler, pipe.scheduler.config)
            if ADAPTER in (pipe.get_list_adapters().get("unet") or []):  # a base pipeline has no scales
                set_lora_scales(pipe, s.lora_scale_unet, s.lora_scale_text_encoder, s.lora_scale_text_encoder_2)
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                result = pipe(prompt=[specs[i].prompt for i in chunk],
                              negative_prompt=[s.negative_prompt] * len(chunk) if s.negative_prompt else None,
                              generator=generators([specs[i].seed for i in chunk]), num_inference_steps=s.steps,
                              guidance_scale=s.guidance, width=s.width, height=s.height)
                for i, image in zip(chunk, result.images):
                    out[i] = image
                bar.update(len(chunk))
    return out


def save_with_sidecars(images: Sequence, specs: Sequence[ImageSpec], folder: str | Path, stem: str) -> list[Path]:
    """Write <stem>-<k>-seed<seed>.png and a .json sidecar beside each; returns the PNG paths."""
    folder = Path(folder)
    paths = []
    for k, (image, spec) in enumerate(zip(images, specs)):
        png = folder / f"{stem}-{k:02d}-seed{spec.seed}.png"
        if png.exists():
            raise FileExistsError(f"{png} exists already: images are never overwritten")
        files.save_image(png, image)
        files.write_json(png.with_suffix(".json"), asdict(spec))
        paths.append(png)
    return paths


def read_sidecar(path: str | Path) -> ImageSpec:
    """The spec written beside an image (path: the PNG or its .json sidecar)."""
    return ImageSpec(**json.loads(Path(path).with_suffix(".json").read_text()))


def pipeline_for(spec: ImageSpec, device=None):
    """Load the base model of a spec and, when it names one, its LoRA."""
    from .models import load_pipeline

    pipe = load_pipeline(ModelConfig(name=spec.model), device=device)
    if spec.lora:
        load_lora(pipe, spec.lora)
    return pipe


def regenerate(sidecar: str | Path, pipe=None, device=None):
    """Make the image described by a sidecar again (same sidecar => same image)."""
    spec = read_sidecar(sidecar)
    pipe = pipe or pipeline_for(spec, device=device)
    return generate(pipe, [spec], batch_size=1, progress=False)[0]
