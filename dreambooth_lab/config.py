"""One dataclass tree for every knob: notebooks, YAML files and the CLI all fill it.

Validation lives here once. Every error names the field by its dotted path (``optim.lr_unet``)
and says what to do, and a key that does not exist suggests the closest real one, so a typo in
a YAML file fails loudly instead of silently doing nothing.

Defaults follow the reference study (rare token ``sks``, class ``dog``, batch 1, seed 42,
lr 3e-4 / 1e-4, LoRA scales 0.4 / 0.4, guidance 6.4).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TINY_MODEL = "tiny"
# The other offline test models: SDXL-shaped (two text encoders, text_time embeddings) and SD2-style
# v-prediction, built like "tiny" (models.py); "sdxl-random" is SDXL's real architecture with random
# weights (benchmarks), as "sd15-random" is SD1.5's.
TINY_SDXL = "tiny-sdxl"
TINY_SD2V = "tiny-sd2v"
TINY_MODELS = (TINY_MODEL, TINY_SDXL, TINY_SD2V)
SDXL_SHAPED = "sdxl-random"
TOYWORLD = "toyworld"  # the learned offline base model of the toy world (dreambooth_lab/world)
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SAMPLERS = ("dpmsolver++", "ddim", "euler", "euler_a", "pndm", "ddpm")
TEST_PROMPTS = (
    "A {token} {class} in red t-shirts",
    "A {token} {class} in the style of van gogh",
    "A {token} {class} in the forest",
    "A {token} {class} driving car",
)


DTYPES = ("auto", "float32", "float16", "bfloat16")
# diffusers.optimization.SchedulerType (a test keeps the two equal), known here without importing diffusers.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "piecewise_constant")
NUM_TRAIN_TIMESTEPS = 1000  # the noise scheduler's num_train_timesteps in every SD1/SD2/SDXL model
# The adaptable (Linear / Conv2d / Embedding) modules of the UNets and CLIP text encoders of SD1.x, SD2 and
# SDXL, by the last part of their name (a test reads them off the models): a target is written as that
# part or a longer dotted tail ("attn1.to_q", "ff.net.2"), and peft matches it the same way.
UNET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "proj", "net.2", "conv1", "conv2",
                "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2")
TEXT_ENCODER_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "token_embedding",
                        "position_embedding", "text_projection")
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
PRIOR_TARGETS = ("class_images", "base_model")
CAPTION_MODES = ("none", "sidecar")
EVAL_LOSS_MODES = ("auto", "on", "off")  # train.eval_loss

# Config.hash() identifies what a run trained: two configs with equal hashes train the same LoRA.
# Each field says itself whether it belongs there. A field marked NO_HASH changes no weight: where
# files go and what they are called, how often checkpoints and logs are written, and speed or
# memory switches whose result is the same LoRA (the cached/uncached equality test covers the
# caches). Changing one of them never makes a finished run stale.
NO_HASH = {"hash": False}


def _out(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field left out of Config.hash()."""
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata=NO_HASH, **kw)


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""


@dataclass
class ModelConfig:
    # "tiny" builds the offline SD-shaped test model; anything else goes to from_pretrained
    # unchanged (a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 or a local folder).
    name: str = DEFAULT_MODEL
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to download the half-size weights
    # How `sample` etc. load the model (training uses train.mixed_precision): no weight changes.
    dtype: str = _out("auto")  # auto = float16 on CUDA, float32 on CPU; or float32/float16/bfloat16
    safety_checker: bool = False  # research use: the checker blacks out false positives


@dataclass
class DataConfig:
    instance_dir: str = "datasets/sample_subject"
    token: str = "sks"
    class_name: str = "dog"
    instance_prompt: str = "a photo of {token} {class}"
    class_prompt: str = "a photo of {class}"
    resolution: int | None = None  # None = 512 for real models, 64 for the tiny one
    center_crop: bool = True  # False = random crop
    random_flip: bool = False
    # Aspect-ratio bucketing (buckets.py): non-square photos keep their shape; a batch comes from one
    # bucket of about resolution² pixels. Off = every photo is cropped square.
    buckets: bool = False
    # Per-photo captions: none = every photo trains on instance_prompt (the paper's); sidecar = the
    # text file beside each photo (same stem, .txt) is its caption, with {token} and {class}
    # placeholders, e.g. "a photo of {token} {class} on the beach" (kohya's layout). A missing or
    # empty caption file is an error that names it. The captions are part of the run's identity.
    captions: str = field(default="none", metadata={"hash": True, "omit_if": "none"})


@dataclass
class PriorConfig:
    enabled: bool = True
    num_class_images: int = 100
    loss_weight: float = 1.0
    # None = <train.output_dir>/class_images when Google Drive is mounted or OUTPUT_DIR is set (a Colab
    # reconnect wipes ~/.cache), else <user cache>/dreambooth_lab/class_images. See prior.cache_root_for.
    cache_dir: str | None = _out(None)
    sampler: str = "dpmsolver++"
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = _out(4)  # images per generation call: speed only, each image has its own seed
    # Precision the class images are generated in; part of their cache key. auto = float16 on CUDA,
    # float32 on CPU (resolved by prior.generation_dtype before keying).
    dtype: str = "auto"
    # What the prior term pulls toward: "class_images" (the paper: images the base model made for
    # the class prompt, trained on alongside) or "base_model" (the frozen base model's own
    # prediction for the class prompt on the same noisy latents: no class images to generate).
    target: str = "class_images"
    # Other prompts to keep as the base model draws them, e.g. ["a photo of a cat", "a photo of a
    # backpack"]: each step adds rows with one of them (in turn) on the step's noisy instance latents,
    # pulled toward the frozen base model's prediction (no images to generate). The class prior
    # guards the trained class only; on a small model a LoRA that learns the subject also turns
    # neighbouring classes into it. Empty = the paper's objective.
    preserve_prompts: list[str] = field(default_factory=list, metadata={"hash": True, "omit_if": []})


@dataclass
class IdentifierConfig:
    """How the subject is named in prompts: a borrowed rare token (the paper's) or a learned one.

    learned: new token(s) <token> with trained input embeddings (pivotal tuning, identifier.py),
    saved beside the LoRA as an A1111/ComfyUI/diffusers textual-inversion file."""

    learned: bool = False
    num_vectors: int = 1  # tokens <sks>, <sks>_1, ... that the placeholder expands to
    init: str = "class"  # class (the class word's embedding) | token (the rare token's) | random
    lr: float = 1e-3
    embedding_only_steps: int = 0  # train only the embedding for the first N steps, then the LoRA too


@dataclass
class LossConfig:
    """The per-row loss and the noise: axes beyond the paper's recipe (see losses.py)."""

    kind: str = "mse"  # mse (the paper's) | l1 | huber (pseudo-Huber with huber_c)
    huber_c: float = 0.1
    min_snr_gamma: float | None = None  # e.g. 5.0: min-SNR-γ weighting; None = plain mean
    noise_offset: float = 0.0  # e.g. 0.05: per-channel constant added to the noise
    timestep_min: int = 0  # timesteps are drawn from [timestep_min, timestep_max)
    timestep_max: int | None = None  # None = the scheduler's num_train_timesteps (1000)


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float | None = None  # None = rank (scaling 1.0)
    dropout: float = 0.0
    use_dora: bool = False  # DoRA (peft): weight-decomposed LoRA; the kohya export refuses it
    conv: bool = False  # LoCon: also adapt the UNet's ResNet convolutions (conv1, conv2, conv_shortcut)
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    lr_unet: float = 3e-4
    lr_text_encoder: float = 1e-4
    # SDXL's second text encoder (OpenCLIP bigG); None = lr_text_encoder. Left out of the hash while
    # None, so configs written before it existed keep their hash.
    lr_text_encoder_2: float | None = field(default=None, metadata={"hash": True, "omit_if": None})
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 0


@dataclass
class TrainConfig:
    steps: int = 1300
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    train_text_encoder: bool = False
    # Kept in the hash: recomputation should give the same gradients, but no test shows it bit for bit.
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 42
    output_dir: str = _out("runs")
    name: str | None = _out(None)  # None = "<token>-<class>"; a folder name, no path separators
    checkpoint_every: int = _out(500)  # a resumed run equals an uninterrupted one, so no weight changes
    checkpoints_to_keep: int = _out(2)
    # Steps to choose from (steps.py): every N steps a usable LoRA file loras/step-NNNNNN.safetensors (and one at
    # the last step); with step_images, sample.prompt x sample.seeds drawn as `sample` draws them at those
    # steps (steps/step-NNNNNN/, sheet steps/steps_x_seeds.png). 0 = off. No weight changes.
    save_lora_every: int = _out(0)
    step_images: bool = _out(True)
    # Speed: caches that change nothing but time, and GPU options.
    cache_latents: bool = _out(True)  # VAE-encode every photo once (centre crops; random crops cannot be cached)
    cache_text_embeddings: bool = _out(True)  # encode the two prompts once while the text encoder is frozen
    offload_frozen: bool = _out(True)  # move the VAE / frozen text encoder off the GPU once cached
    allow_tf32: bool = _out(True)  # TF32 matmuls on Ampere+ (A100); no effect on a T4 or CPU
    channels_last: bool = _out(False)  # UNet memory format; sometimes faster with fp16 on GPU
    compile: bool = _out(False)  # torch.compile the UNet (minutes of warm-up; pays off on long runs)
    # The instance loss on fixed noise before the first step and after the last (summary.json's
    # eval_instance_loss_before/after): one UNet pass per photo at 5 timesteps, each time. on | off |
    # auto = on when the two cost at most 5% of the training's UNet work (a 1300-step run: yes; a
    # 2-step run, where they would be most of the wall time: no, and the fields are null). No weight changes.
    eval_loss: str = _out("auto")
    # Logging: TensorBoard scalars and validation images (needs `pip install tensorboard`).
    log_with: str = _out("none")  # none | tensorboard
    validation_every: int = _out(0)  # steps between validation images (0 = none)
    validation_prompt: str = _out("A {token} {class}")
    validation_images: int = _out(2)


@dataclass
class SampleConfig:
    prompt: str = "A {token} {class}"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    test_prompts: list[str] = field(default_factory=lambda: list(TEST_PROMPTS))
    negative_prompt: str = ""
    guidance: float = 6.4
    steps: int = 30
    sampler: str = "dpmsolver++"
    lora_scale_unet: float = 0.4
    lora_scale_text_encoder: float = 0.4
    lora_scale_text_encoder_2: float | None = None  # SDXL's second text encoder; None = lora_scale_text_encoder
    batch_size: int = 4
    vae_slicing: bool = True  # decode a batch one image at a time: less memory, same pixels
    vae_tiling: bool = False  # decode in tiles: for images much larger than the training size


@dataclass
class EvalConfig:
    """How `evaluate` measures a run (DreamBooth paper protocol; see ../shared/EVALUATION.md)."""

    prompt_set: str = "study"  # study (the four test prompts) | dreambench (25 per class kind)
    class_kind: str = "auto"  # auto | live | object: which DreamBench list
    images_per_prompt: int = 4
    seed: int = 0  # image i of a prompt uses seed + i
    dino_model: str = "facebook/dino-vits16"  # or "tiny" (offline test model)
    clip_model: str = "openai/clip-vit-base-patch32"  # or "tiny"
    score_scale: float = 1.0  # 1 = cosine in [-1, 1]; 100 = the ×100 some papers report
    strip_token: bool = True  # CLIP-T prompt without the rare token: "a dog in the jungle"
    memorisation_threshold: float = 0.9  # DINO cosine to the nearest training photo
    drift_images: int = 8  # class-prompt images, base vs fine-tuned, same seeds
    batch_size: int = 16


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
    sample: SampleConfig = _out(default_factory=SampleConfig)
    eval: EvalConfig = _out(default_factory=EvalConfig)

    # ---- derived values -------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.model.name in TINY_MODELS

    @property
    def resolution(self) -> int:
        if self.data.resolution is not None:
            return self.data.resolution
        return default_resolution(self.model.name)

    @property
    def run_name(self) -> str:
        return self.train.name or f"{self.data.token}-{self.data.class_name}"

    @property
    def lora_alpha(self) -> float:
        return float(self.lora.alpha if self.lora.alpha is not None else self.lora.rank)

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
        """Hash of what decides the training; two runs with equal hashes train the same LoRA.

        Which fields count is declared on the fields (NO_HASH): the sample and eval sections,
        paths and names, logging and checkpoint cadence, and speed switches are left out.
        """
        blob = json.dumps(_hashed(self.resolved()), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> "Config":
        errors = validation_errors(self)
        if len(errors) == 1:  # one line, as the CLI prints it
            raise ConfigError(errors[0])
        if errors:
            raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))
        return self


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
        **({"preserve_prompts": len(cfg.prior.preserve_prompts)} if cfg.prior.preserve_prompts else {}),
        **({"captions": cfg.data.captions} if cfg.data.captions != "none" else {}),
    }


def looks_like_sdxl(name: str) -> bool:
    """Does a model name say SDXL (sdxl-random, stabilityai/stable-diffusion-xl-base-1.0, a folder
    whose model_index.json names an XL pipeline)? Only for the default resolution (pure but for
    reading a local model_index.json); models.detect_family is what training goes by."""
    if name == SDXL_SHAPED or name == TINY_SDXL:
        return True
    index = Path(name).expanduser() / "model_index.json"
    if index.is_file():
        try:
            return "XL" in str(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError):
            return False
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
    """data.resolution when it is null: 64 for the offline test models; a local folder's native
    size (e.g. a copy of toyworld, 64); 1024 for SDXL; else 512."""
    if name in TINY_MODELS or name == TOYWORLD:
        return 64
    return native_resolution(name) or (1024 if looks_like_sdxl(name) else 512)


def fill_prompt(template: str, token: str, class_name: str) -> str:
    # str.format would choke on a literal brace in a user's prompt; replace the two fields only.
    return template.replace("{token}", token).replace("{class}", class_name)


# ---- validation -----------------------------------------------------------------------------

def validation_errors(cfg: Config) -> list[str]:
    e: list[str] = []
    # NaN or inf in any number: one message for the field (NaN passes no comparison and would fail
    # the field's own check too, or slip through one written as `not x < 0`, e.g. into a cache key).
    unusable = {name: value for name, value in _numbers(cfg) if not math.isfinite(value)}
    e += [f"{name}={value}: use a finite number" for name, value in unusable.items()]

    def need(ok: bool, msg: str) -> None:
        if not ok and msg.split("=", 1)[0] not in unusable:
            e.append(msg)

    need(bool(cfg.model.name.strip()), "model.name is empty: use 'tiny' or a hub id / local folder")
    for name in ("model.dtype", "prior.dtype"):
        value = _get(cfg, name)
        need(value in DTYPES, f"{name}={value!r}: use auto, float32, float16 or bfloat16")
    need(bool(cfg.data.instance_dir), "data.instance_dir is empty: point it at a folder of photos")
    tok = cfg.data.token
    need(bool(tok.strip()) and not any(c.isspace() for c in tok),
         f"data.token={tok!r}: the rare token must be one word without spaces, e.g. 'sks'")
    need(not any(sp in tok for sp in CLIP_SPECIAL_TOKENS),
         f"data.token={tok!r} holds the tokenizer's own marker {next((sp for sp in CLIP_SPECIAL_TOKENS if sp in tok), '')}: "
         "pick another token, e.g. 'sks'")
    need(bool(cfg.data.class_name.strip()), "data.class_name is empty: name the subject's class, e.g. 'dog'")
    need("{token}" in cfg.data.instance_prompt,
         f"data.instance_prompt={cfg.data.instance_prompt!r} lacks '{{token}}': the rare token must appear in it")
    need(cfg.data.captions in CAPTION_MODES,
         f"data.captions={cfg.data.captions!r}: use none (every photo trains on data.instance_prompt) or sidecar "
         "(a .txt caption beside each photo)")
    need(cfg.data.resolution is None or (cfg.data.resolution >= 8 and cfg.data.resolution % 8 == 0),
         f"data.resolution={cfg.data.resolution}: use a positive multiple of 8 (512 for SD1.x), or null for auto")
    need(all(isinstance(p, str) and p.strip() for p in cfg.prior.preserve_prompts),
         f"prior.preserve_prompts={cfg.prior.preserve_prompts!r}: give a list of non-empty prompts, e.g. "
         "['a photo of a cat', 'a photo of a backpack']")
    need(cfg.prior.target in PRIOR_TARGETS,
         f"prior.target={cfg.prior.target!r}: use class_images (the paper's) or base_model")
    ic = cfg.identifier
    need(ic.num_vectors >= 1, f"identifier.num_vectors={ic.num_vectors}: use 1 or more (1–4)")
    need(ic.init in ("class", "token", "random"), f"identifier.init={ic.init!r}: use class, token or random")
    need(ic.lr > 0, f"identifier.lr={ic.lr}: use a positive learning rate (1e-3)")
    need(0 <= ic.embedding_only_steps < max(cfg.train.steps, 1) or not ic.learned,
         f"identifier.embedding_only_steps={ic.embedding_only_steps}: use 0 or fewer than train.steps")
    lc = cfg.loss
    need(lc.kind in ("mse", "l1", "huber"), f"loss.kind={lc.kind!r}: use mse, l1 or huber")
    need(lc.huber_c > 0, f"loss.huber_c={lc.huber_c}: use a positive value (0.1)")
    need(lc.min_snr_gamma is None or lc.min_snr_gamma > 0,
         f"loss.min_snr_gamma={lc.min_snr_gamma}: use a positive gamma (5.0) or null for no weighting")
    need(0 <= lc.noise_offset <= 1, f"loss.noise_offset={lc.noise_offset}: use a value in [0, 1] (0.05 is usual)")
    need(0 <= lc.timestep_min < NUM_TRAIN_TIMESTEPS,
         f"loss.timestep_min={lc.timestep_min}: use 0 or more, below the scheduler's {NUM_TRAIN_TIMESTEPS} timesteps")
    need(lc.timestep_max is None or lc.timestep_min < lc.timestep_max <= NUM_TRAIN_TIMESTEPS,
         f"loss.timestep_max={lc.timestep_max}: use a value above loss.timestep_min={lc.timestep_min} and at most "
         f"{NUM_TRAIN_TIMESTEPS} (the scheduler's timesteps), or null")
    if cfg.prior.enabled and cfg.prior.target == "class_images":
        need(cfg.prior.num_class_images > 0,
             f"prior.num_class_images={cfg.prior.num_class_images}: prior preservation needs class "
             "images (e.g. 100–200), or set prior.enabled: false")
    if cfg.prior.enabled:
        need(cfg.prior.loss_weight >= 0, f"prior.loss_weight={cfg.prior.loss_weight}: use a value >= 0 (1.0 in the paper)")
    need(cfg.prior.steps > 0, f"prior.steps={cfg.prior.steps}: use a positive number of sampler steps (25)")
    for name in ("prior.guidance", "sample.guidance"):
        value = _get(cfg, name)
        need(0 <= value <= 50, f"{name}={value}: use a guidance scale in [0, 50] (1 = no guidance; 6–8 is usual)")
    for name in ("prior.seed", "eval.seed"):
        value = _get(cfg, name)
        need(0 <= value < 2**63, f"{name}={value}: seeds must be in [0, 2**63)")
    need(cfg.prior.batch_size > 0, f"prior.batch_size={cfg.prior.batch_size}: use a positive batch size")
    for name in ("prior.sampler", "sample.sampler"):
        value = _get(cfg, name)
        need(value in SAMPLERS, f"{name}={value!r}: use one of {', '.join(SAMPLERS)}")
    need(cfg.lora.rank > 0, f"lora.rank={cfg.lora.rank}: use a positive rank (4–64)")
    need(cfg.lora.alpha is None or cfg.lora.alpha > 0, f"lora.alpha={cfg.lora.alpha}: use a positive alpha or null (= rank)")
    need(0 <= cfg.lora.dropout < 1, f"lora.dropout={cfg.lora.dropout}: use a value in [0, 1)")
    need(bool(cfg.lora.unet_targets), "lora.unet_targets is empty: name the UNet modules to adapt (to_q, to_k, ...)")
    for name, known in (("lora.unet_targets", UNET_MODULES), ("lora.text_encoder_targets", TEXT_ENCODER_MODULES)):
        unknown = [t for t in _get(cfg, name) if not _module_tail_known(t, known)]
        need(not unknown, f"{name}={unknown}: no such module in the model; use some of {', '.join(known)} (the "
             "last part of a module's name)")
    oc = cfg.optim
    need(oc.lr_scheduler in LR_SCHEDULERS, f"optim.lr_scheduler={oc.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
    for name in ("optim.adam_beta1", "optim.adam_beta2"):
        value = _get(cfg, name)
        need(0 <= value < 1, f"{name}={value}: use a value in [0, 1) (0.9 and 0.999 are usual)")
    need(oc.weight_decay >= 0, f"optim.weight_decay={oc.weight_decay}: use 0 or more (1e-2)")
    need(oc.adam_epsilon > 0, f"optim.adam_epsilon={oc.adam_epsilon}: use a small positive value (1e-8)")
    need(cfg.optim.optimizer in ("adamw", "adamw8bit"), f"optim.optimizer={cfg.optim.optimizer!r}: use adamw or adamw8bit")
    need(cfg.optim.lr_unet > 0, f"optim.lr_unet={cfg.optim.lr_unet}: use a positive learning rate (3e-4 for LoRA)")
    need(cfg.optim.lr_text_encoder > 0,
         f"optim.lr_text_encoder={cfg.optim.lr_text_encoder}: use a positive learning rate (1e-4)")
    need(cfg.optim.lr_text_encoder_2 is None or cfg.optim.lr_text_encoder_2 > 0,
         f"optim.lr_text_encoder_2={cfg.optim.lr_text_encoder_2}: use a positive learning rate, or null (= "
         "optim.lr_text_encoder)")
    need(cfg.optim.max_grad_norm > 0, f"optim.max_grad_norm={cfg.optim.max_grad_norm}: use a positive norm (1.0)")
    need(cfg.optim.lr_warmup_steps >= 0, f"optim.lr_warmup_steps={cfg.optim.lr_warmup_steps}: use 0 or more")
    need(cfg.train.steps > 0, f"train.steps={cfg.train.steps}: use a positive number of steps")
    need(cfg.train.batch_size > 0, f"train.batch_size={cfg.train.batch_size}: use a positive batch size (1)")
    need(cfg.train.gradient_accumulation_steps > 0,
         f"train.gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}: use 1 or more")
    need(cfg.train.mixed_precision in ("no", "fp16", "bf16"),
         f"train.mixed_precision={cfg.train.mixed_precision!r}: use no, fp16 or bf16")
    problem, derived = name_problem(cfg.run_name), f"{cfg.data.token}-{cfg.data.class_name}"
    if problem and cfg.train.name and cfg.train.name != derived:
        e.append(f"train.name={cfg.train.name!r} {problem}: the run folder is <train.output_dir>/<train.name>-<time>, "
                 "so use a plain name such as 'dog-v2'")
    elif problem:  # the name comes from the token and the class (resolved() writes it into train.name)
        e.append(f"the run name {cfg.run_name!r} (from data.token and data.class_name) {problem}: "
                 "set train.name to a plain folder name such as 'dog-v2'")
    need(cfg.train.checkpoint_every > 0, f"train.checkpoint_every={cfg.train.checkpoint_every}: use a positive step count")
    need(cfg.train.checkpoints_to_keep > 0, f"train.checkpoints_to_keep={cfg.train.checkpoints_to_keep}: keep at least 1")
    need(cfg.train.save_lora_every >= 0, f"train.save_lora_every={cfg.train.save_lora_every}: use 0 (off) or a step "
         "count, e.g. 200 (a LoRA file and pictures every 200 steps)")
    need(cfg.train.eval_loss in EVAL_LOSS_MODES, f"train.eval_loss={cfg.train.eval_loss!r}: use auto, on or off")
    need(cfg.train.log_with in ("none", "tensorboard"), f"train.log_with={cfg.train.log_with!r}: use none or tensorboard")
    need(cfg.train.validation_every >= 0, f"train.validation_every={cfg.train.validation_every}: use 0 (off) or a step count")
    need(cfg.sample.steps > 0, f"sample.steps={cfg.sample.steps}: use a positive number of steps")
    need(bool(cfg.sample.seeds), "sample.seeds is empty: give at least one seed")
    for i, s in enumerate(cfg.sample.seeds):
        need(0 <= int(s) < 2**63, f"sample.seeds[{i}]={s}: seeds must be in [0, 2**63)")
    need(cfg.sample.batch_size > 0, f"sample.batch_size={cfg.sample.batch_size}: use a positive batch size")
    for name in ("sample.lora_scale_unet", "sample.lora_scale_text_encoder"):
        value = _get(cfg, name)
        need(0 <= value <= 2, f"{name}={value}: use a scale in [0, 2] (0 = base model, 1 = as trained)")
    te2 = cfg.sample.lora_scale_text_encoder_2
    need(te2 is None or 0 <= te2 <= 2, f"sample.lora_scale_text_encoder_2={te2}: use a scale in [0, 2], or null "
         "(= sample.lora_scale_text_encoder)")
    ev = cfg.eval
    need(ev.prompt_set in ("study", "dreambench"), f"eval.prompt_set={ev.prompt_set!r}: use study or dreambench")
    need(ev.class_kind in ("auto", "live", "object"), f"eval.class_kind={ev.class_kind!r}: use auto, live or object")
    need(ev.images_per_prompt > 0, f"eval.images_per_prompt={ev.images_per_prompt}: use 1 or more (the paper: 4)")
    need(ev.score_scale > 0, f"eval.score_scale={ev.score_scale}: use 1 (cosine) or 100")
    need(-1 <= ev.memorisation_threshold <= 1,
         f"eval.memorisation_threshold={ev.memorisation_threshold}: a cosine similarity in [-1, 1] (e.g. 0.9)")
    need(ev.drift_images >= 0, f"eval.drift_images={ev.drift_images}: use 0 (off) or more")
    need(ev.batch_size > 0, f"eval.batch_size={ev.batch_size}: use a positive batch size")
    return e


def validate_sample(sample: SampleConfig) -> SampleConfig:
    """The sample section alone through the same checks (the `sample` command's options, a
    notebook's form); a ConfigError names each bad field."""
    errors = [e for e in validation_errors(Config(sample=sample)) if e.startswith("sample.")]
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("Invalid sample settings:\n  - " + "\n  - ".join(errors))
    return sample


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of every float field of a config tree (pure)."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            out.append((f"{prefix}{f.name}", value))
    return out


def _module_tail_known(target: object, known: tuple[str, ...]) -> bool:
    """Is `target` ("to_q", "attn1.to_q", "to_out.0") a name peft can find among the known modules? (pure)"""
    if not isinstance(target, str) or not target:
        return False
    parts = target.split(".")
    tail = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    return tail in known


def name_problem(name: str) -> str | None:
    """Why a run name cannot be a folder name inside train.output_dir (None if it can)."""
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if ".." in name:
        return "contains '..'"
    if "\0" in name:
        return "contains a NUL byte"
    if name.strip() in ("", "."):
        return "is not a folder name"
    return None


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---- dict / YAML ----------------------------------------------------------------------------

def from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Build a Config from nested dicts, checking every key and type; unknown keys are errors."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    _fill(cfg, data or {}, prefix="")
    return cfg


def _fill(obj: Any, data: Any, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" — did you mean '{prefix}{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are due. A
    `Typed` scalar (an unquoted `no`, `0x10`, `null` …) gives a string field its text as written
    and any other field what YAML reads it as."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, Typed) and value.value is None):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if isinstance(value, Typed):
        value = value.text if hint is str else value.value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {plain(value)!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads "3e-4" (no dot) as a string; accept it as the number it is
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    value = plain(value)
    raise ConfigError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Typed:
    """An unquoted YAML scalar that YAML 1.1 reads as something other than a string (`no` ->
    False, `0x10` -> 16, `null` -> None, `1.5`), with the text as written. `_coerce` decides by
    the field's type: a string field gets `text` (data.token: no is the token "no",
    train.mixed_precision: no is accelerate's "no"), every other field gets `value`."""

    text: str
    value: Any


class _TextKeepingLoader(yaml.SafeLoader):
    """yaml.SafeLoader that returns such scalars as `Typed` (mapping keys stay plain values)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        value = super().construct_object(node, deep=deep)
        if isinstance(node, yaml.ScalarNode) and node.style is None and not isinstance(value, str):
            return Typed(node.value, value)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        return {plain(k): v for k, v in super().construct_mapping(node, deep=deep).items()}


def plain(data: Any) -> Any:
    """`data` with every `Typed` replaced by what YAML reads it as: yaml.safe_load's result (pure)."""
    if isinstance(data, Typed):
        return data.value
    if isinstance(data, dict):
        return {plain(k): plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data


def parse_yaml(text: str, keep_text: bool = False) -> Any:
    """yaml.safe_load, or with keep_text=True the same with `Typed` scalars (for config values:
    from_dict / with_overrides resolve them by the field's type)."""
    return yaml.load(text, Loader=_TextKeepingLoader if keep_text else yaml.SafeLoader)


def read_yaml(path: str | Path, keep_text: bool = False) -> Any:
    """A YAML file's contents; keep_text=True keeps unquoted scalars' text (see `Typed`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return parse_yaml(path.read_text(), keep_text=keep_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def field_type(dotted: str) -> Any:
    """The type hint of a config field by its dotted name; None when there is no such leaf field."""
    obj: Any = Config()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return None if dataclasses.is_dataclass(getattr(obj, part)) else typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
    return None


def coerce_field(dotted: str, value: Any) -> Any:
    """`value` read as the config field `dotted` reads it (as from_dict would); a ConfigError names
    the field when it does not fit (pure)."""
    hint = field_type(dotted)
    if hint is None:
        raise ConfigError(f"unknown config field '{dotted}'")
    return _coerce(value, hint, dotted)


def _takes_text(hint: Any) -> bool:
    return hint is str or typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)


def parse_override(key: str, text: str) -> Any:
    """The value of `--set key=text`, read by the field's type (pure).

    A string field takes the text as typed (`data.token=no`, `data.instance_prompt={token} {class}
    in a garden`, `data.token=@sks`), unquoted when it is written in quotes; `null` or nothing is
    None where the field allows it. Every other field reads the text as YAML (`train.steps=800`,
    `lora.unet_targets=[to_q, to_v]`); text that is not valid YAML is a ConfigError naming the key.
    A key that is no field is left for with_overrides to name."""
    hint, stripped = field_type(key), text.strip()
    try:
        value = parse_yaml(text, keep_text=True)
    except yaml.constructor.ConstructorError as exc:  # a tag such as !!python/object/apply: never built
        raise ConfigError(f"--set {key}={text}: YAML tags such as {_tag(exc)} are not accepted: give a plain "
                          "value") from None
    except yaml.YAMLError as exc:
        if hint is None or _takes_text(hint):
            return stripped
        raise ConfigError(f"--set {key}={text}: not a valid value ({_yaml_problem(exc)}): give "
                          f"{_type_name(hint)}, e.g. {key}={_example(_get(Config(), key))}") from None
    if hint is None:
        return plain(value)
    if _takes_text(hint):
        if hint is not str and (value is None or isinstance(value, Typed) and value.value is None):
            return None
        quoted = stripped[:1] in ("'", '"') and isinstance(value, str)
        return value if quoted else stripped
    return _coerce(value, hint, key)


def _example(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    return json.dumps(default) if isinstance(default, list) else str(default)


def _tag(exc: Exception) -> str:
    import re

    m = re.search(r"tag '([^']*)'", str(exc))
    tag = m.group(1).replace("tag:yaml.org,2002:", "!!") if m else "!!…"
    return f"'{tag.split(':')[0] if tag.startswith('!!python') else tag}'"


def _yaml_problem(exc: Exception) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return " ".join(str(problem).split())


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(hint, str(hint))


def load(path: str | Path, _seen: tuple = ()) -> Config:
    """Read a YAML config. A top-level `extends: other.yaml` (relative to this file) is read
    first and this file's values go on top, so presets can share a base."""
    path = Path(path)
    data = read_yaml(path, keep_text=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = None
    if "extends" in data:
        data = dict(data)
        parent = (path.parent / str(plain(data.pop("extends")))).resolve()
        if parent in _seen:
            raise ConfigError(f"{path}: 'extends' loops back to {parent}")
        base = load(parent, _seen + (path.resolve(),))
    try:
        return from_dict(data, base=base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted overrides such as {"train.steps": 10}; same checks as YAML keys."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(nested, base=cfg)
