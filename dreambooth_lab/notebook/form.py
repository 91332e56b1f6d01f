"""The form and presets -> the run's config: the one way a notebook builds a config (`configure`).

A notebook's parameters cells are the form: `configure(globals(), PRESET)` reads the fields it
knows (FORM_FIELDS), puts them over an optional YAML preset, adds this machine's folders and the
smoke settings, adapts precision, fp16 weights and checkpointing to this runtime, and says where
every value came from ('form', 'preset', 'default', 'smoke' or 'this machine'). Without a preset
the form is the config and must define every field; with one, a field the form leaves out or at
its default is the preset's (see `merge_form`). Only config fields are read: nothing else in the
notebook (a hub token, say) reaches the config or its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..config import DEFAULT_MODEL, TINY_MODEL, Config, load, read_yaml, with_overrides
from .runtime import (DRIVE_DATASETS, bf16_supported, find_repo_root, from_root, output_folder,
                      output_source, smoke, this_gpu)

# Form field -> config field. RANK also sets alpha (scaling 1); USE_8BIT_ADAM picks the optimizer.
FORM_FIELDS = {
    "BASE_MODEL": "model.name",
    "DATASET_DIR": "data.instance_dir",
    "OUTPUT_DIR": "train.output_dir",
    "RARE_TOKEN": "data.token",
    "CLASS": "data.class_name",
    "CAPTIONS": "data.captions",
    "TRAIN_TEXT_ENCODER": "train.train_text_encoder",
    "STEPS": "train.steps",
    "BATCH_SIZE": "train.batch_size",
    "LR_UNET": "optim.lr_unet",
    "LR_TEXT_ENCODER": "optim.lr_text_encoder",
    "SEED": "train.seed",
    "PRIOR_PRESERVATION": "prior.enabled",
    "NUM_CLASS_IMAGES": "prior.num_class_images",
    "PRIOR_LOSS_WEIGHT": "prior.loss_weight",
    "PRESERVE_PROMPTS": "prior.preserve_prompts",
    "RANK": "lora.rank",
    "RESOLUTION": "data.resolution",
    "MIXED_PRECISION": "train.mixed_precision",
    "USE_8BIT_ADAM": "optim.optimizer",
    "GRADIENT_CHECKPOINTING": "train.gradient_checkpointing",
    "CHECKPOINT_EVERY": "train.checkpoint_every",
    "SAVE_LORA_EVERY": "train.save_lora_every",
    "STEP_IMAGES": "train.step_images",
    "LORA_SCALE_UNET": "sample.lora_scale_unet",
    "LORA_SCALE_TEXT_ENCODER": "sample.lora_scale_text_encoder",
    "GUIDANCE": "sample.guidance",
    "SAMPLE_STEPS": "sample.steps",
    "NEGATIVE_PROMPT": "sample.negative_prompt",
    "GEN_SEED": "sample.seeds",
}

# The values main.ipynb's form ships with: a first real run on Colab's T4. tests check that the
# notebook's parameters cell says the same. With a PRESET, a field still at this value is "not set
# by you" and the preset's value (or the package default) is used; a field you changed wins.
FORM_DEFAULTS: dict[str, Any] = {
    "BASE_MODEL": DEFAULT_MODEL,
    "DATASET_DIR": str(DRIVE_DATASETS / "my_dog"),
    "OUTPUT_DIR": "",
    "RARE_TOKEN": "sks",
    "CLASS": "dog",
    "CAPTIONS": "none",
    "TRAIN_TEXT_ENCODER": True,
    "STEPS": 800,
    "BATCH_SIZE": 1,
    "LR_UNET": 3e-4,
    "LR_TEXT_ENCODER": 1e-4,
    "SEED": 42,
    "PRIOR_PRESERVATION": True,
    "NUM_CLASS_IMAGES": 100,
    "PRIOR_LOSS_WEIGHT": 1.0,
    # other prompts the base model should keep drawing, separated by ";" (e.g. "a photo of a cat"):
    # the class prior guards the trained class only
    "PRESERVE_PROMPTS": "",
    "RANK": 4,
    "RESOLUTION": 512,
    "MIXED_PRECISION": "fp16",
    "USE_8BIT_ADAM": True,
    # "auto": on when the memory model predicts the run does not fit this GPU without it (a T4 when
    # there is none here); "on" / "off" are the user's and always win
    "GRADIENT_CHECKPOINTING": "auto",
    # No T4 step time has been measured for this project yet (benchmarks/gpu_check.py has not run on
    # one); 400 steps is a disconnect's worst loss, whatever the speed turns out to be.
    "CHECKPOINT_EVERY": 400,
    # a usable LoRA file every 200 steps, with pictures of "A {token} {class}" at each: the step
    # before the subject overfits can be seen, picked and exported
    "SAVE_LORA_EVERY": 200,
    "STEP_IMAGES": True,
    "LORA_SCALE_UNET": 0.4,
    "LORA_SCALE_TEXT_ENCODER": 0.4,
    "GUIDANCE": 6.4,
    "SAMPLE_STEPS": 30,
    "NEGATIVE_PROMPT": "",
    "GEN_SEED": 0,
}
ALWAYS_FORM = ("DATASET_DIR", "OUTPUT_DIR")  # where things are on this machine: never from a preset
# How this runtime trains, not what the experiment is: always the form's (a preset describes the
# experiment: token, steps, lr, photos, seeds), adapted to the machine (no fp16 without CUDA).
MACHINE_FIELDS = ("MIXED_PRECISION", "USE_8BIT_ADAM", "GRADIENT_CHECKPOINTING", "CHECKPOINT_EVERY", "SAVE_LORA_EVERY",
                  "STEP_IMAGES")
# The form's switches for this one call of the train cell (not config fields, never from a preset).
FORM_SWITCHES: dict[str, Any] = {"NEW_RUN": False, "TAKE_OVER_LOCK": False, "ALLOW_CPU": False}
# The machine settings the summary prints first.
MACHINE_KEYS = ("train.mixed_precision", "optim.optimizer", "train.gradient_checkpointing", "train.checkpoint_every")
GRADIENT_CHECKPOINTING_CHOICES = ("auto", "on", "off")
# BASE_MODEL's dropdown (any other hub id or folder can be typed in): SD1.5 and SDXL base. The family
# comes from the model itself (models.resolve); the form has no per-family code.
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
BASE_MODELS = (DEFAULT_MODEL, SDXL_BASE)
# The memory model's measured / predicted on the CPU runs (BENCHMARKS.md): up to ~1.3-1.4 beyond
# the weights. A prediction times this margin over the GPU's memory does not fit.
MEMORY_MARGIN = 1.3


def fits(peak_gib: float, gpu_gib: float) -> bool:
    """Whether a predicted peak fits a GPU of `gpu_gib`, with the margin the memory model needs (pure)."""
    return peak_gib * MEMORY_MARGIN <= gpu_gib


# ---- form fields -> dotted overrides (pure) -------------------------------------------------------

def field_overrides(name: str, value: Any) -> dict[str, Any]:
    """One form field as dotted config overrides (pure)."""
    path = FORM_FIELDS[name]
    if name == "USE_8BIT_ADAM":
        return {path: "adamw8bit" if value else "adamw"}
    if name == "GEN_SEED":
        return {path: [int(value) + i for i in range(4)]}  # the seed grid: 4 consecutive seeds
    if name == "RANK":
        return {path: int(value), "lora.alpha": float(value)}
    if name == "GRADIENT_CHECKPOINTING":
        if value in (True, "on"):
            return {path: True}
        if value in (False, "off"):
            return {path: False}
        if value == "auto":
            return {}  # decided by `_auto_checkpointing` once the config is known
        raise ValueError(f"GRADIENT_CHECKPOINTING={value!r}: choose one of {', '.join(GRADIENT_CHECKPOINTING_CHOICES)}")
    if name == "PRESERVE_PROMPTS":
        return {path: prompt_list(value)}
    if name == "RESOLUTION":
        return {path: int(value) if value else None}  # 0 / None = the model's own size
    if name in ("LR_UNET", "LR_TEXT_ENCODER", "PRIOR_LOSS_WEIGHT", "LORA_SCALE_UNET", "LORA_SCALE_TEXT_ENCODER",
                "GUIDANCE"):
        return {path: float(value)}
    return {path: value}


def prompt_list(value: Any) -> list[str]:
    """PRESERVE_PROMPTS as a list: "a photo of a cat; a photo of a toy" (or a list), each prompt
    stripped, empty ones dropped (pure)."""
    parts = value.split(";") if isinstance(value, str) else (value or [])
    stripped = (str(p).strip() for p in parts)
    return [p for p in stripped if p]


def _check_fields(form: Mapping[str, Any]) -> None:
    """Every form field is defined: without a preset the form is the whole config."""
    missing = [k for k in FORM_FIELDS if k not in form]
    if missing:
        raise KeyError(f"the hyperparameter cell does not define {', '.join(missing)}")


def form_overrides(form: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the hyperparameter cell's values into dotted config overrides (pure)."""
    _check_fields(form)
    out: dict[str, Any] = {}
    for name in FORM_FIELDS:
        out.update(field_overrides(name, form[name]))
    return out


def merge_form(form: Mapping[str, Any], preset: bool, defaults: dict[str, Any] = FORM_DEFAULTS
               ) -> tuple[dict[str, Any], list[str]]:
    """The form's overrides, and the names of the fields they came from (pure).

    Without a preset every field applies (and must be there). With one, the machine's fields
    (MACHINE_FIELDS: precision, optimizer, checkpointing, checkpoint interval) and the folders always
    apply, whatever their value; an experiment field applies when it differs from its default in the
    form (you changed it) or is named in the form's FORM_WINS ("STEPS, LR_UNET": set back to the
    form's default on purpose); the others — and any field the form does not define (a notebook
    whose form is its folders only) — are left to the preset, or to the package default when the
    preset does not set them.
    """
    if not preset:
        _check_fields(form)
    wins = form_wins(form.get("FORM_WINS", ""))
    used = [name for name in FORM_FIELDS if name in form and (
            not preset or name in ALWAYS_FORM or name in MACHINE_FIELDS or name not in defaults
            or name in wins or form[name] != defaults[name])]
    out: dict[str, Any] = {}
    for name in used:
        if name in ALWAYS_FORM and not form[name]:
            continue  # empty = the preset's / the default folder
        out.update(field_overrides(name, form[name]))
    return out, used


def form_wins(text: str | None) -> set[str]:
    """The form fields named in FORM_WINS ("STEPS, LR_UNET"): with a preset they apply even at the
    form's default value, so a preset's 1300 steps can be set back to the form's 800 (pure)."""
    names = [n.strip().upper() for n in str(text or "").replace(";", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in FORM_FIELDS]
    if unknown:
        raise ValueError(f"FORM_WINS names {', '.join(unknown)}, which the form does not have; use the "
                         f"form's field names, e.g. STEPS, LR_UNET, RARE_TOKEN")
    return set(names)


def preset_keys(path: str | Path) -> set[str]:
    """The dotted fields a preset YAML sets, itself or through `extends`."""
    from ..experiments import file_keys

    return file_keys(path)


def preset_path(preset: str | Path) -> Path:
    return Path(preset) if Path(preset).is_absolute() else find_repo_root() / preset


def preset_choices(root: str | Path | None = None) -> list[str]:
    """Every config preset in configs/ (relative paths), for the form's dropdown: the Colab and
    tiny presets, then the study's (exp1..exp8, small_dog_*); sweep specs and bases are left out."""
    root = Path(root) if root else find_repo_root()
    out = []
    for path in sorted((root / "configs").rglob("*.yaml")):
        data = read_yaml(path) or {}
        if not isinstance(data, dict) or "runs" in data or "grid" in data or path.name == "base.yaml":
            continue
        out.append(str(path.relative_to(root)))
    return sorted(out, key=lambda p: (p.count("/"), p))


# ---- this machine: folders, smoke, precision, fp16 weights, checkpointing ---------------------------

def smoke_overrides(output_dir: str | None = None) -> dict[str, Any]:
    """Seconds-long settings on the tiny model: the test suite's switch, same code path, same photos."""
    out = {
        "model.name": TINY_MODEL, "data.resolution": None, "train.steps": 12, "train.checkpoint_every": 6,
        "train.save_lora_every": 6,
        "train.mixed_precision": "no", "prior.num_class_images": 4, "prior.steps": 4, "sample.steps": 4,
        "sample.seeds": [0, 1], "sample.test_prompts": ["A {token} {class} in the forest"],
        "optim.lr_unet": 1e-3,
    }
    if output_dir:
        out["train.output_dir"] = output_dir
    return out


def machine_settings(dataset_dir: str = "", output_dir: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """Where photos and results live on this machine (absolute), plus the smoke settings when on,
    and where each came from ('smoke', 'form' or 'this machine'). The photo folder is never
    replaced: a missing one is reported by `check_photos`."""
    out: dict[str, Any] = smoke_overrides() if smoke() else {}
    sources = {k: "smoke" for k in out}
    out["train.output_dir"], sources["train.output_dir"] = output_folder(output_dir), output_source(output_dir)
    if dataset_dir:
        out["data.instance_dir"], sources["data.instance_dir"] = from_root(dataset_dir), "form"
    return out, sources


def machine_overrides(dataset_dir: str = "", output_dir: str = "") -> dict[str, Any]:
    """`machine_settings` without the sources (what a sweep takes)."""
    return machine_settings(dataset_dir, output_dir)[0]


def _machine_precision(cfg: Config, sources: dict[str, str]) -> Config:
    """fp16 needs CUDA (CPU autocast is bf16 only); bf16 needs a GPU that has it (a T4 has not)."""
    import torch

    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        print("note: no CUDA here, so MIXED_PRECISION='fp16' is off for this run")
        cfg.train.mixed_precision, sources["train.mixed_precision"] = "no", "this machine"
    elif mp == "bf16" and torch.cuda.is_available() and not bf16_supported():
        print(f"warning: {torch.cuda.get_device_name(0)} has no bf16; using MIXED_PRECISION='fp16' instead")
        cfg.train.mixed_precision, sources["train.mixed_precision"] = "fp16", "this machine"
    return cfg


def _machine_variant(cfg: Config, sources: dict[str, str]) -> Config:
    """On a GPU training in fp16, the repository's fp16 weights when it has them (SD1.5 and SDXL do):
    half the download, and the frozen weights are used in fp16 anyway."""
    import torch

    from ..colab import fp16_variant

    variant = fp16_variant(cfg.model.name, cfg.model.variant, torch.cuda.is_available(), cfg.train.mixed_precision)
    if variant != cfg.model.variant:
        cfg.model.variant, sources["model.variant"] = variant, "this machine"
    return cfg


def _auto_checkpointing(cfg: Config, sources: dict[str, str], gpu_gib: float | None = None) -> Config:
    """GRADIENT_CHECKPOINTING='auto': on when the memory model predicts that the run, without it,
    does not fit this GPU (a 15 GB T4 when there is none here) with the usual margin; off otherwise,
    and off (the package default) when the model's configs cannot be read here."""
    try:
        from ..memory import estimate

        cfg.train.gradient_checkpointing = False
        peak = estimate(cfg, "cuda").as_gib()["peak"]
    except Exception:  # noqa: BLE001 - no estimate: the package default, said in the sources
        cfg.train.gradient_checkpointing, sources["train.gradient_checkpointing"] = False, "auto (no estimate)"
        return cfg
    if gpu_gib is None:
        gpu_gib = this_gpu()[0]
    cfg.train.gradient_checkpointing = not fits(peak, gpu_gib)
    sources["train.gradient_checkpointing"] = f"auto ({peak:.1f} GiB predicted without it, {gpu_gib:.0f} GiB here)"
    return cfg


# ---- the one way: form (+ preset) -> config -----------------------------------------------------------

def configure(form: Mapping[str, Any], preset: str | Path = "") -> tuple[Config, dict[str, str]]:
    """The run's config from the form (a notebook's parameters: `globals()`) and an optional YAML
    preset (relative = from the repository root), with where each value came from: 'form',
    'preset', 'default' (the package's), 'smoke' or 'this machine'.

    Without a preset the form is the config. With one, the preset is the base and the fields you
    changed in the form go on top (see `merge_form`); a form of the folders only (DATASET_DIR,
    OUTPUT_DIR) takes the preset as it is. Relative paths are taken from the repository root;
    without CUDA, fp16 is turned off, and bf16 on a GPU without it becomes fp16, with a note;
    GRADIENT_CHECKPOINTING='auto' asks the memory model.
    """
    if preset:
        path = preset_path(preset)
        base, keys = load(path), preset_keys(path)
    else:
        base, keys = Config(), set()
    dataset_dir, output_dir = form.get("DATASET_DIR", ""), form.get("OUTPUT_DIR", "")
    over, _ = merge_form(form, bool(preset))
    over = {k: v for k, v in over.items() if k not in ("data.instance_dir", "train.output_dir")}
    if not preset and not dataset_dir:
        over["data.instance_dir"] = ""  # no silent fallback: validation names DATASET_DIR's field
    machine, machine_sources = machine_settings(dataset_dir, output_dir)
    cfg = with_overrides(with_overrides(base, over), machine)
    sources = {k: "preset" for k in keys}
    sources.update({k: "form" for k in over})
    sources.update(machine_sources)
    cfg.data.instance_dir = from_root(cfg.data.instance_dir) if cfg.data.instance_dir else ""
    cfg = _machine_precision(cfg, sources)
    cfg = _machine_variant(cfg, sources)
    if form.get("GRADIENT_CHECKPOINTING") == "auto":
        cfg = _auto_checkpointing(cfg, sources)
    return cfg.validate(), sources
