"""Resolve and load the base model: a hub id, a local folder or a built-in model's name.

`resolve` tells the model's family (sd1 / sd2 / sdxl, read from its configs: model_index.json, the
scheduler's and the text encoder's) once, into a `BaseModel` that later steps are handed (data.resolution
defaults to config.default_resolution); `check_supported` is the one place that refuses what the model
cannot take; `load_pipeline` loads the family's pipeline through from_pretrained. Built-in models (tiny,
toyworld, ...) are the registry's (builtin/): their folders are built or found there.
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import builtin, identifier
from .config import Config, ConfigError, ModelConfig

FAMILIES = ("sd1", "sd2", "sdxl")


def pretrained_path(name: str) -> str:
    """What from_pretrained receives: a built-in model's folder (built on first use), or the user's
    string unchanged."""
    entry = builtin.get(name)
    if entry is not None:
        return str(entry.folder())
    local = Path(name).expanduser()
    if (name.startswith((".", "/", "~")) or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model.name={name!r} looks like a local folder but {local / 'model_index.json'} does not exist: "
            "point it at a diffusers pipeline folder (saved with save_pretrained) or use a hub id"
        )
    return str(local) if local.exists() else name


# ---- model families ------------------------------------------------------------------------------

def _read_config(source: str, file: str, revision: str | None = None) -> dict | None:
    """A JSON config of a pipeline folder or hub repo (model_index.json, unet/config.json, ...);
    None when it has none."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / file
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): the model folder is damaged") from None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, file, revision=revision)).read_text())
    except EntryNotFoundError:
        return None


def family_from_configs(index: dict | None, scheduler: dict | None, text_encoder: dict | None) -> str:
    """sdxl / sd2 / sd1 from a pipeline's model_index.json, scheduler and text-encoder configs (pure).

    An XL pipeline class or a second text encoder is SDXL; v-prediction or an OpenCLIP-style
    first text encoder (gelu, or SD2's 1024 width) is SD2; anything else SD1.
    """
    index = index or {}
    te2 = index.get("text_encoder_2")
    if "XL" in str(index.get("_class_name", "")) or (te2 is not None and te2 != [None, None]):
        return "sdxl"
    if (scheduler or {}).get("prediction_type") == "v_prediction":
        return "sd2"
    te = text_encoder or {}
    if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024:
        return "sd2"
    return "sd1"


@dataclass(frozen=True)
class BaseModel:
    """The base model, resolved once: what every later step asks instead of looking again."""

    name: str  # as configured: hub id, local folder or built-in name
    revision: str | None
    family: str  # "sd1" | "sd2" | "sdxl"


def resolve(model: ModelConfig) -> BaseModel:
    """The model's family: a built-in model's from the registry (nothing is built), anyone else's
    read from its configs (remembered per name and revision)."""
    entry = builtin.get(model.name)
    family = entry.family if entry is not None else _family_of(model.name, model.revision)
    return BaseModel(model.name, model.revision, family)


def check_supported(base: BaseModel, cfg: Config) -> None:
    """Refuse what the base model cannot take (ConfigError), before any run folder exists: what its
    family cannot do, then a learned identifier whose tokens (<sks>, <sks>_1, ...) its tokenizer
    already has (only the tokenizer is loaded: a second, before the model)."""
    if not cfg.identifier.learned:
        return
    if base.family == "sdxl":
        raise ConfigError("identifier.learned is not supported for SDXL models yet (its tokens would need both "
                          "text encoders): use a rare token (identifier.learned: false)")
    tokenizer = load_tokenizer(base.name)
    clash = identifier.taken(tokenizer, cfg.prompt_token, cfg.identifier.num_vectors)
    if clash:
        raise ConfigError(f"data.token={cfg.data.token!r}: the learned identifier's token(s) {', '.join(clash)} "
                          f"are already in {base.name}'s tokenizer, so they cannot be learned: pick another data.token")


@lru_cache(maxsize=None)
def _family_of(name: str, revision: str | None) -> str:
    """The family of a hub id or local folder, read from its configs (remembered)."""
    path = pretrained_path(name)
    index = _read_config(path, "model_index.json", revision)
    if index is None:
        raise FileNotFoundError(f"{name}: no model_index.json, so the model family cannot be told: point "
                                "model.name at a diffusers pipeline folder or hub id")
    return family_from_configs(index, _read_config(path, "scheduler/scheduler_config.json", revision),
                               _read_config(path, "text_encoder/config.json", revision))


# ---- loading ----------------------------------------------------------------------------------

def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def pipeline_class(family: str):
    """The diffusers pipeline class of a family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is unknown: one of {', '.join(FAMILIES)}")
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


@contextmanager
def collector_spared(import_libraries):
    """Run `import_libraries()` with Python's cyclic garbage collector off, then the body with every
    object that exists at that point (the modules just imported, and whatever the caller holds) set
    aside from collection (gc.freeze), and afterwards everything as it was (gc.unfreeze).

    Importing diffusers, transformers and peft makes about a million long-lived objects, and the
    collector, run every 700 allocations, walked all of them again and again while they were made
    and while the model loaded: 15% of the time to the first training step on sd15-random
    (benchmarks/startup.md), freeing nothing. Objects made inside the body are collected as
    usual; set-aside garbage (none from imports) is collected after it. Nothing changes where the
    collector is already off or something is already frozen (it is the caller's then)."""
    own = gc.isenabled() and gc.get_freeze_count() == 0
    if own:
        gc.disable()
    try:
        import_libraries()
        if own:
            gc.freeze()
            gc.enable()
        yield
    finally:
        if own:
            gc.unfreeze()
            gc.enable()


def load_pipeline(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  base: BaseModel | None = None):
    """Load the family's pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) with
    from_pretrained: hub id, local folder or a built-in model's name. `base`: the model already
    resolved (else it is resolved here). Its libraries are imported first, with the garbage
    collector spared their objects while the weights load (`collector_spared`)."""
    family = (base or resolve(cfg)).family
    with collector_spared(lambda: pipeline_class(family)):
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or resolve_dtype(cfg.dtype, device)
        kwargs = dict(dtype=dtype, use_safetensors=True)  # never unpickle downloaded weights
        kwargs.update({k: v for k, v in (("revision", cfg.revision), ("variant", cfg.variant)) if v})
        if family == "sdxl":
            kwargs["add_watermarker"] = False  # an invisible watermark changes pixels: a seed means one image
        elif not cfg.safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = pipeline_class(family).from_pretrained(pretrained_path(cfg.name), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


def pipeline_in(cfg: ModelConfig, pipe, loaded_in: torch.dtype, dtype: torch.dtype, device,
                base: BaseModel | None = None):
    """A pipeline of the model in `dtype`: `pipe` (loaded from it in `loaded_in`) when that is `dtype`,
    else the model loaded again in `dtype`, with a sliced VAE (class images made in fp16 beside an
    fp32 training pipeline, say)."""
    if dtype == loaded_in:
        return pipe
    other = load_pipeline(cfg, device=device, dtype=dtype, base=base)
    other.vae.enable_slicing()
    return other


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """Only the model's tokenizer (cheap: for token checks before loading anything big)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(pretrained_path(name), subfolder="tokenizer")


def load_text_encoder(name: str):
    """Only the model's text encoder (for embedding-space questions such as token neighbours)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(pretrained_path(name), subfolder="text_encoder", use_safetensors=True)
