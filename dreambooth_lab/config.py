"""The config: one dataclass tree for every knob, which notebooks, YAML files and the CLI all fill.

``Config`` puts the sections together (their dataclasses and checks are in config_sections.py; the
model section stays here beside the model names), derives what the sections imply (resolution, run
name, prompt token), says which fields identify a run (``Config.hash``) and validates: each
section checks itself and ``validation_errors`` adds what spans sections. Every error names the
field by its dotted path (``optim.lr_unet``) and says what to do. Reading YAML and ``--set``
overrides is config_io.py's job; ``load``, ``from_dict`` and ``with_overrides`` here bind it to Config.

Defaults follow the reference study (rare token ``sks``, class ``dog``, batch 1, seed 42,
lr 3e-4 / 1e-4, LoRA scales 0.4 / 0.4, guidance 6.4).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config_io
from .config_io import ConfigError, Typed, plain, read_yaml  # noqa: F401 (re-exported)
from .config_sections import (DTYPES, LR_SCHEDULERS, TEST_PROMPTS, TEXT_ENCODER_MODULES,  # noqa: F401 (re-exported)
                              UNET_MODULES, DataConfig, EvalConfig, IdentifierConfig, LoraConfig, LossConfig,
                              OptimConfig, PriorConfig, SampleConfig, TrainConfig, dtype_check, name_problem,
                              problems, unhashed)

from . import builtin
from .builtin import TINY_MODEL, TINY_MODELS, TOYWORLD  # noqa: F401 (re-exported; builtin/ says what each is)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # a built-in offline model (builtin/: tiny, toyworld, ...), a hub id or a local folder
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to download the half-size weights
    # How `sample` etc. load the model (training uses train.mixed_precision): no weight changes.
    dtype: str = unhashed("auto")  # auto = float16 on CUDA, float32 on CPU; or float32/float16/bfloat16
    safety_checker: bool = False  # research use: the checker blacks out false positives

    def errors(self) -> list[str]:
        return problems(self, "model", [
            (bool(self.name.strip()), "model.name is empty: use 'tiny' or a hub id / local folder"),
            dtype_check("model.dtype", self.dtype),
        ])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    identifier: IdentifierConfig = field(default_factory=IdentifierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Pictures made from a run and how they are scored do not change what the run trained.
    sample: SampleConfig = unhashed(default_factory=SampleConfig)
    eval: EvalConfig = unhashed(default_factory=EvalConfig)

    # ---- derived values -------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.model.name in TINY_MODELS

    @property
    def resolution(self) -> int:
        return self.data.resolution if self.data.resolution is not None else default_resolution(self.model.name)

    @property
    def run_name(self) -> str:
        return self.train.name or f"{self.data.token}-{self.data.class_name}"

    @property
    def lora_alpha(self) -> float:
        return self.lora.effective_alpha

    @property
    def prompt_token(self) -> str:
        """What stands for the subject in prompts: the rare token, or <token> when it is learned."""
        if self.identifier.learned:
            t = self.data.token
            return t if t.startswith("<") and t.endswith(">") else f"<{t}>"
        return self.data.token

    def fill(self, template: str) -> str:
        """Put the subject's token and the class into a prompt template."""
        return fill_prompt(template, self.prompt_token, self.data.class_name)

    # ---- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> "Config":
        """A copy with every 'auto' value made explicit: what a run directory records."""
        cfg = copy.deepcopy(self)
        cfg.data.resolution = self.resolution
        cfg.train.name = self.run_name
        if cfg.lora.alpha is None and cfg.lora.rank > 0:  # a bad rank is reported as such, not as alpha
            cfg.lora.alpha = float(cfg.lora.rank)
        return cfg

    def hash(self) -> str:
        """Hash of what decides the training: equal hashes train the same LoRA (which fields count: NO_HASH)."""
        blob = json.dumps(_hashed(self.resolved()), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> "Config":
        """The config itself when valid, else a ConfigError listing every problem (validation_errors)."""
        _refuse(validation_errors(self), "Invalid config")
        return self


def _refuse(errors: list[str], what: str) -> None:
    """A ConfigError for the problems found, if any: one line for one (as the CLI prints it), else a list."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{what}:\n  - " + "\n  - ".join(errors))


def _hashed(obj: Any) -> dict[str, Any]:
    """The fields of a dataclass tree that are in the hash, as plain JSON values."""
    return {f.name: _hashed(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else copy.deepcopy(v)
            for f in dataclasses.fields(obj) if f.metadata.get("hash", True)
            and not ("omit_if" in f.metadata and getattr(obj, f.name) == f.metadata["omit_if"])}


def hash_fields(cfg: "Config | None" = None) -> tuple[list[str], list[str]]:
    """Dotted names of the leaf fields (in the hash, left out); a section left out counts whole."""
    def walk(obj: Any, prefix: str, hashed: bool, ins: list[str], outs: list[str]) -> None:
        for f in dataclasses.fields(obj):
            value, here = getattr(obj, f.name), hashed and f.metadata.get("hash", True)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.", here, ins, outs)
            else:
                (ins if here else outs).append(f"{prefix}{f.name}")

    ins: list[str] = []
    outs: list[str] = []
    walk(cfg or Config(), "", True, ins, outs)
    return ins, outs


def experiment_axes(cfg: Config) -> dict[str, Any]:
    """The beyond-the-recipe settings of a run, flat: what the registry and LoRA metadata record
    so that runs can be compared along each axis (pure)."""
    lc, ic = cfg.loss, cfg.identifier
    return {
        "identifier": (f"learned x{ic.num_vectors} from {ic.init}" if ic.learned else "rare token"),
        "prior_target": cfg.prior.target if cfg.prior.enabled else "none",
        "loss_kind": lc.kind, "min_snr_gamma": lc.min_snr_gamma, "noise_offset": lc.noise_offset,
        "timesteps": f"{lc.timestep_min}-{lc.timestep_max or 'max'}",
        "lora_dropout": cfg.lora.dropout, "dora": cfg.lora.use_dora, "locon": cfg.lora.conv,
        "buckets": cfg.data.buckets,
        **({"preserve_prompts": len(cfg.prior.preserve_prompts), "preserve_on": cfg.prior.preserve_on}
           if cfg.prior.preserve_prompts else {}),
        **({"captions": cfg.data.captions} if cfg.data.captions != "none" else {}),
    }


def run_params(cfg: Config) -> dict:
    """The parameters people compare runs by; written beside every picture of a run."""
    return {
        "model": cfg.model.name, "token": cfg.data.token, "class": cfg.data.class_name,
        "steps": cfg.train.steps, "batch": cfg.train.batch_size, "lr_unet": cfg.optim.lr_unet,
        "train_text_encoder": cfg.train.train_text_encoder, "lr_te": cfg.optim.lr_text_encoder,
        "rank": cfg.lora.rank, "alpha": cfg.lora_alpha, "prior": cfg.prior.enabled,
        **({"lr_te2": cfg.optim.lr_text_encoder_2} if cfg.optim.lr_text_encoder_2 is not None else {}),
        "prior_weight": cfg.prior.loss_weight, "class_images": cfg.prior.num_class_images,
        "seed": cfg.train.seed, "resolution": cfg.resolution,
    }


def names_sdxl(name: str) -> bool:
    """Does a hub id say SDXL (stabilityai/stable-diffusion-xl-base-1.0, ...-xl)? Only a guess at the
    default resolution of a model nothing has been fetched of; its family is models.resolve's alone,
    from its configs, and a local folder's resolution is its own (native_resolution)."""
    low = name.lower()
    return "sdxl" in low or "stable-diffusion-xl" in low or low.endswith("-xl")


def native_resolution(folder: str | Path) -> int | None:
    """What a local diffusers folder generates by default, as its pipeline computes it: the UNet's
    sample_size times the VAE's downscale (2 ** (levels - 1)); None when the configs do not say."""
    folder = Path(folder).expanduser()
    try:
        size = json.loads((folder / "unet" / "config.json").read_text()).get("sample_size")
        levels = len(json.loads((folder / "vae" / "config.json").read_text()).get("block_out_channels", ()))
    except (OSError, ValueError):
        return None
    if not isinstance(size, int) or levels < 1:
        return None
    return size * 2 ** (levels - 1)


def default_resolution(name: str) -> int:
    """data.resolution when it is null: a built-in model's own (64 for the offline test models, 1024
    for sdxl-random); a local folder's native size (e.g. a copy of toyworld, 64); 1024 for SDXL; else 512."""
    entry = builtin.get(name)
    if entry is not None:
        return entry.resolution
    return native_resolution(name) or (1024 if names_sdxl(name) else 512)


def fill_prompt(template: str, token: str, class_name: str) -> str:
    # str.format would choke on a literal brace in a user's prompt; replace the two fields only.
    return template.replace("{token}", token).replace("{class}", class_name)


# ---- validation: each section checks itself; here what spans sections -------------------------

def validation_errors(cfg: Config) -> list[str]:
    """Every problem of the config, one message each naming the field and the fix: each section's
    own (ModelConfig.errors, DataConfig.errors, …, in the order of the sections), then the checks
    that span sections (pure)."""
    e = [msg for f in dataclasses.fields(cfg) for msg in getattr(cfg, f.name).errors()]
    ic = cfg.identifier
    if ic.learned and not 0 <= ic.embedding_only_steps < max(cfg.train.steps, 1):
        e.append(f"identifier.embedding_only_steps={ic.embedding_only_steps}: use 0 or fewer than train.steps")
    problem, derived = name_problem(cfg.run_name), f"{cfg.data.token}-{cfg.data.class_name}"
    if problem and cfg.train.name and cfg.train.name != derived:
        e.append(f"train.name={cfg.train.name!r} {problem}: the run folder is <train.output_dir>/<train.name>-<time>, "
                 "so use a plain name such as 'dog-v2'")
    elif problem:  # the name comes from the token and the class (resolved() writes it into train.name)
        e.append(f"the run name {cfg.run_name!r} (from data.token and data.class_name) {problem}: "
                 "set train.name to a plain folder name such as 'dog-v2'")
    return e


def validate_sample(sample: SampleConfig) -> SampleConfig:
    """The sample section alone through its checks (the `sample` command's options, a notebook's
    form); a ConfigError names each bad field."""
    _refuse(sample.errors(), "Invalid sample settings")
    return sample


_get = config_io.get  # the value of a dotted field: _get(cfg, "optim.lr_unet")


# ---- dict / YAML: config_io's readers bound to Config -------------------------------------------

def from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Build a Config from nested dicts, checking every key and type; unknown keys are errors."""
    return config_io.from_dict(data, base if base is not None else Config())


def load(path: str | Path) -> Config:
    """Read a YAML config. A top-level `extends: other.yaml` (relative to this file) is read
    first and this file's values go on top, so presets can share a base."""
    return config_io.load(path, from_dict)


def to_yaml(cfg: Config) -> str:
    return config_io.dump_yaml(cfg.to_dict())


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted overrides such as {"train.steps": 10}; same checks as YAML keys."""
    return from_dict(config_io.nest(overrides), base=cfg)


def coerce_field(dotted: str, value: Any) -> Any:
    """`value` as from_dict reads it into the field `dotted`; a ConfigError names the field if it does not fit."""
    return config_io.coerce_field(Config(), dotted, value)


def parse_override(key: str, text: str) -> Any:
    """The value of `--set key=text`, read by the field's type (config_io.parse_override says how)."""
    return config_io.parse_override(Config(), key, text)
