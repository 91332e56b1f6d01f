"""The sections of the config (data, prior, lora, loss, identifier, optim, train, sample, eval):
one dataclass each, with its defaults, the values it accepts, and its own checks.

Each section's ``errors()`` lists what is wrong with it, naming every field by its dotted path
(``optim.lr_unet``) and saying what to use; a NaN or inf is named once as such. config.py puts the
sections together into ``Config`` (with the model section beside the model names) and adds the
checks that span sections.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

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
PRESERVE_ON = ("photos", "class_images")  # prior.preserve_on
CAPTION_MODES = ("none", "sidecar")
EVAL_LOSS_MODES = ("auto", "on", "off")  # train.eval_loss

# Config.hash() identifies what a run trained: two configs with equal hashes train the same LoRA.
# Each field says itself whether it belongs there. A field marked NO_HASH changes no weight: where
# files go and what they are called, how often checkpoints and logs are written, and speed or
# memory switches whose result is the same LoRA (the cached/uncached equality test covers the
# caches). Changing one of them never makes a finished run stale.
NO_HASH = {"hash": False}


def unhashed(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field left out of Config.hash()."""
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata=NO_HASH, **kw)


# ---- checks -----------------------------------------------------------------------------------

def problems(section: Any, prefix: str, checks: Iterable[tuple[bool, str]]) -> list[str]:
    """A section's errors: each NaN or inf number named once ("prior.guidance=nan: use a finite
    number"), then the message of every failed check that is not about one of those fields (NaN
    passes no comparison and would fail the field's own check too, or slip through one written as
    `not x < 0`, e.g. into a cache key) (pure)."""
    unusable = {f"{prefix}.{f.name}": value for f in dataclasses.fields(section)
                if isinstance(value := getattr(section, f.name), float) and not math.isfinite(value)}
    return [f"{name}={value}: use a finite number" for name, value in unusable.items()] + [
        msg for ok, msg in checks if not ok and msg.split("=", 1)[0] not in unusable]


def module_tail_known(target: object, known: tuple[str, ...]) -> bool:
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


def _guidance(name: str, value: float) -> tuple[bool, str]:
    return 0 <= value <= 50, f"{name}={value}: use a guidance scale in [0, 50] (1 = no guidance; 6–8 is usual)"


def _seed(name: str, value: int) -> tuple[bool, str]:
    return 0 <= value < 2**63, f"{name}={value}: seeds must be in [0, 2**63)"


def _sampler(name: str, value: str) -> tuple[bool, str]:
    return value in SAMPLERS, f"{name}={value!r}: use one of {', '.join(SAMPLERS)}"


def dtype_check(name: str, value: str) -> tuple[bool, str]:
    return value in DTYPES, f"{name}={value!r}: use auto, float32, float16 or bfloat16"


# ---- the sections -----------------------------------------------------------------------------

@dataclass
class DataConfig:
    instance_dir: str = "datasets/sample_subject"
    token: str = "sks"
    class_name: str = "dog"
    instance_prompt: str = "a photo of {token} {class}"
    class_prompt: str = "a photo of {class}"
    resolution: int | None = None  # None = the model's own (config.default_resolution: 512 for SD1.x, 1024 for SDXL)
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

    def errors(self) -> list[str]:
        tok = self.token
        return problems(self, "data", [
            (bool(self.instance_dir), "data.instance_dir is empty: point it at a folder of photos"),
            (bool(tok.strip()) and not any(c.isspace() for c in tok),
             f"data.token={tok!r}: the rare token must be one word without spaces, e.g. 'sks'"),
            (not any(sp in tok for sp in CLIP_SPECIAL_TOKENS),
             f"data.token={tok!r} holds the tokenizer's own marker "
             f"{next((sp for sp in CLIP_SPECIAL_TOKENS if sp in tok), '')}: pick another token, e.g. 'sks'"),
            (bool(self.class_name.strip()), "data.class_name is empty: name the subject's class, e.g. 'dog'"),
            ("{token}" in self.instance_prompt,
             f"data.instance_prompt={self.instance_prompt!r} lacks '{{token}}': the rare token must appear in it"),
            (self.captions in CAPTION_MODES,
             f"data.captions={self.captions!r}: use none (every photo trains on data.instance_prompt) or sidecar "
             "(a .txt caption beside each photo)"),
            (self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             f"data.resolution={self.resolution}: use a positive multiple of 8 (512 for SD1.x), or null for auto"),
        ])


@dataclass
class PriorConfig:
    enabled: bool = True
    num_class_images: int = 100
    loss_weight: float = 1.0
    # None = <train.output_dir>/class_images when Google Drive is mounted or OUTPUT_DIR is set (a Colab
    # reconnect wipes ~/.cache), else <user cache>/dreambooth_lab/class_images. See prior.cache_root_for.
    cache_dir: str | None = unhashed(None)
    sampler: str = "dpmsolver++"
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = unhashed(4)  # images per generation call: speed only, each image has its own seed
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
    # Whose noisy latents the kept prompts train on: "photos" (the step's instance rows) or
    # "class_images" (the step's class rows: the subject's own latents then learn only the subject;
    # needs target class_images). Measured in BENCHMARKS ("keeping the other classes").
    preserve_on: str = field(default="photos", metadata={"hash": True, "omit_if": "photos"})

    @property
    def term(self) -> str | None:
        """What the loss's prior term pulls toward (`target`: class_images or base_model), or None when
        the loss has none: prior off, or a zero loss_weight, which trains as if it were off."""
        return self.target if self.enabled and self.loss_weight > 0 else None

    def errors(self) -> list[str]:
        return problems(self, "prior", [
            dtype_check("prior.dtype", self.dtype),
            (all(isinstance(p, str) and p.strip() for p in self.preserve_prompts),
             f"prior.preserve_prompts={self.preserve_prompts!r}: give a list of non-empty prompts, e.g. "
             "['a photo of a cat', 'a photo of a backpack']"),
            (self.target in PRIOR_TARGETS, f"prior.target={self.target!r}: use class_images (the paper's) or base_model"),
            (self.preserve_on in PRESERVE_ON,
             f"prior.preserve_on={self.preserve_on!r}: use photos (the subject's latents) or class_images"),
            (self.preserve_on != "class_images" or not self.preserve_prompts or self.term == "class_images",
             f"prior.preserve_on=class_images trains the kept prompts on the class images' latents, but this run has "
             f"none (prior.enabled={self.enabled}, prior.target={self.target}, prior.loss_weight={self.loss_weight}): "
             "use prior.preserve_on: photos, or the class-image prior"),
            (not self.enabled or self.target != "class_images" or self.num_class_images > 0,
             f"prior.num_class_images={self.num_class_images}: prior preservation needs class images (e.g. 100–200), "
             "or set prior.enabled: false"),
            (not self.enabled or self.loss_weight >= 0,
             f"prior.loss_weight={self.loss_weight}: use a value >= 0 (1.0 in the paper)"),
            (self.steps > 0, f"prior.steps={self.steps}: use a positive number of sampler steps (25)"),
            _guidance("prior.guidance", self.guidance),
            _seed("prior.seed", self.seed),
            (self.batch_size > 0, f"prior.batch_size={self.batch_size}: use a positive batch size"),
            _sampler("prior.sampler", self.sampler),
        ])


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

    def errors(self) -> list[str]:
        """The checks of this section alone; embedding_only_steps is checked against train.steps by Config."""
        return problems(self, "identifier", [
            (self.num_vectors >= 1, f"identifier.num_vectors={self.num_vectors}: use 1 or more (1–4)"),
            (self.init in ("class", "token", "random"), f"identifier.init={self.init!r}: use class, token or random"),
            (self.lr > 0, f"identifier.lr={self.lr}: use a positive learning rate (1e-3)"),
        ])


@dataclass
class LossConfig:
    """The per-row loss and the noise: axes beyond the paper's recipe (see losses.py)."""

    kind: str = "mse"  # mse (the paper's) | l1 | huber (pseudo-Huber with huber_c)
    huber_c: float = 0.1
    min_snr_gamma: float | None = None  # e.g. 5.0: min-SNR-γ weighting; None = plain mean
    noise_offset: float = 0.0  # e.g. 0.05: per-channel constant added to the noise
    timestep_min: int = 0  # timesteps are drawn from [timestep_min, timestep_max)
    timestep_max: int | None = None  # None = the scheduler's num_train_timesteps (1000)

    def errors(self) -> list[str]:
        t_min, t_max, n = self.timestep_min, self.timestep_max, NUM_TRAIN_TIMESTEPS
        return problems(self, "loss", [
            (self.kind in ("mse", "l1", "huber"), f"loss.kind={self.kind!r}: use mse, l1 or huber"),
            (self.huber_c > 0, f"loss.huber_c={self.huber_c}: use a positive value (0.1)"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0,
             f"loss.min_snr_gamma={self.min_snr_gamma}: use a positive gamma (5.0) or null for no weighting"),
            (0 <= self.noise_offset <= 1, f"loss.noise_offset={self.noise_offset}: use a value in [0, 1] (0.05 is usual)"),
            (0 <= t_min < n, f"loss.timestep_min={t_min}: use 0 or more, below the scheduler's {n} timesteps"),
            (t_max is None or t_min < t_max <= n,
             f"loss.timestep_max={t_max}: use a value above loss.timestep_min={t_min} and at most {n} (the "
             "scheduler's timesteps), or null"),
        ])


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float | None = None  # None = rank (scaling 1.0)
    dropout: float = 0.0
    use_dora: bool = False  # DoRA (peft): weight-decomposed LoRA; the kohya export refuses it
    conv: bool = False  # LoCon: also adapt the UNet's ResNet convolutions (conv1, conv2, conv_shortcut)
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    @property
    def effective_alpha(self) -> float:
        """The alpha the adapters get: lora.alpha, or the rank when it is null (scaling 1.0)."""
        return float(self.alpha if self.alpha is not None else self.rank)

    def errors(self) -> list[str]:
        checks = [
            (self.rank > 0, f"lora.rank={self.rank}: use a positive rank (4–64)"),
            (self.alpha is None or self.alpha > 0, f"lora.alpha={self.alpha}: use a positive alpha or null (= rank)"),
            (0 <= self.dropout < 1, f"lora.dropout={self.dropout}: use a value in [0, 1)"),
            (bool(self.unet_targets), "lora.unet_targets is empty: name the UNet modules to adapt (to_q, to_k, ...)"),
        ]
        for name, targets, known in (("lora.unet_targets", self.unet_targets, UNET_MODULES),
                                     ("lora.text_encoder_targets", self.text_encoder_targets, TEXT_ENCODER_MODULES)):
            unknown = [t for t in targets if not module_tail_known(t, known)]
            checks.append((not unknown, f"{name}={unknown}: no such module in the model; use some of "
                           f"{', '.join(known)} (the last part of a module's name)"))
        return problems(self, "lora", checks)


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

    def errors(self) -> list[str]:
        betas = [(0 <= value < 1, f"{name}={value}: use a value in [0, 1) (0.9 and 0.999 are usual)")
                 for name, value in (("optim.adam_beta1", self.adam_beta1), ("optim.adam_beta2", self.adam_beta2))]
        te2 = self.lr_text_encoder_2
        return problems(self, "optim", [
            (self.lr_scheduler in LR_SCHEDULERS,
             f"optim.lr_scheduler={self.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}"),
            *betas,
            (self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}: use 0 or more (1e-2)"),
            (self.adam_epsilon > 0, f"optim.adam_epsilon={self.adam_epsilon}: use a small positive value (1e-8)"),
            (self.optimizer in ("adamw", "adamw8bit"), f"optim.optimizer={self.optimizer!r}: use adamw or adamw8bit"),
            (self.lr_unet > 0, f"optim.lr_unet={self.lr_unet}: use a positive learning rate (3e-4 for LoRA)"),
            (self.lr_text_encoder > 0, f"optim.lr_text_encoder={self.lr_text_encoder}: use a positive learning rate (1e-4)"),
            (te2 is None or te2 > 0, f"optim.lr_text_encoder_2={te2}: use a positive learning rate, or null (= "
             "optim.lr_text_encoder)"),
            (self.max_grad_norm > 0, f"optim.max_grad_norm={self.max_grad_norm}: use a positive norm (1.0)"),
            (self.lr_warmup_steps >= 0, f"optim.lr_warmup_steps={self.lr_warmup_steps}: use 0 or more"),
        ])


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
    output_dir: str = unhashed("runs")
    name: str | None = unhashed(None)  # None = "<token>-<class>"; a folder name, no path separators
    checkpoint_every: int = unhashed(500)  # a resumed run equals an uninterrupted one, so no weight changes
    checkpoints_to_keep: int = unhashed(2)
    # Steps to choose from (steps.py): every N steps a usable LoRA file loras/step-NNNNNN.safetensors (and one at
    # the last step); with step_images, sample.prompt x sample.seeds drawn as `sample` draws them at those
    # steps (steps/step-NNNNNN/, sheet steps/steps_x_seeds.png). 0 = off. No weight changes.
    save_lora_every: int = unhashed(0)
    step_images: bool = unhashed(True)
    # Speed: caches that change nothing but time, and GPU options.
    cache_latents: bool = unhashed(True)  # VAE-encode every photo once (centre crops; random crops cannot be cached)
    cache_text_embeddings: bool = unhashed(True)  # encode the two prompts once while the text encoder is frozen
    offload_frozen: bool = unhashed(True)  # move the VAE / frozen text encoder off the GPU once cached
    allow_tf32: bool = unhashed(True)  # TF32 matmuls on Ampere+ (A100); no effect on a T4 or CPU
    channels_last: bool = unhashed(False)  # UNet memory format; sometimes faster with fp16 on GPU
    compile: bool = unhashed(False)  # torch.compile the UNet (minutes of warm-up; pays off on long runs)
    # The instance loss on fixed noise before the first step and after the last (summary.json's
    # eval_instance_loss_before/after): one UNet pass per photo at 5 timesteps, each time. on | off |
    # auto = on when the two cost at most 5% of the training's UNet work (a 1300-step run: yes; a
    # 2-step run, where they would be most of the wall time: no, and the fields are null). No weight changes.
    eval_loss: str = unhashed("auto")
    # Logging: TensorBoard scalars and validation images (needs `pip install tensorboard`).
    log_with: str = unhashed("none")  # none | tensorboard
    validation_every: int = unhashed(0)  # steps between validation images (0 = none)
    validation_prompt: str = unhashed("A {token} {class}")
    validation_images: int = unhashed(2)

    def errors(self) -> list[str]:
        """The checks of this section alone; the run name (train.name or data.token-data.class_name) is
        checked by Config."""
        return problems(self, "train", [
            (self.steps > 0, f"train.steps={self.steps}: use a positive number of steps"),
            (self.batch_size > 0, f"train.batch_size={self.batch_size}: use a positive batch size (1)"),
            (self.gradient_accumulation_steps > 0,
             f"train.gradient_accumulation_steps={self.gradient_accumulation_steps}: use 1 or more"),
            (self.mixed_precision in ("no", "fp16", "bf16"),
             f"train.mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16"),
            (self.checkpoint_every > 0, f"train.checkpoint_every={self.checkpoint_every}: use a positive step count"),
            (self.checkpoints_to_keep > 0, f"train.checkpoints_to_keep={self.checkpoints_to_keep}: keep at least 1"),
            (self.save_lora_every >= 0, f"train.save_lora_every={self.save_lora_every}: use 0 (off) or a step "
             "count, e.g. 200 (a LoRA file and pictures every 200 steps)"),
            (self.eval_loss in EVAL_LOSS_MODES, f"train.eval_loss={self.eval_loss!r}: use auto, on or off"),
            (self.log_with in ("none", "tensorboard"), f"train.log_with={self.log_with!r}: use none or tensorboard"),
            (self.validation_every >= 0, f"train.validation_every={self.validation_every}: use 0 (off) or a step count"),
        ])


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

    def errors(self) -> list[str]:
        scales = [(0 <= value <= 2, f"{name}={value}: use a scale in [0, 2] (0 = base model, 1 = as trained)")
                  for name, value in (("sample.lora_scale_unet", self.lora_scale_unet),
                                      ("sample.lora_scale_text_encoder", self.lora_scale_text_encoder))]
        te2 = self.lora_scale_text_encoder_2
        return problems(self, "sample", [
            _guidance("sample.guidance", self.guidance),
            _sampler("sample.sampler", self.sampler),
            (self.steps > 0, f"sample.steps={self.steps}: use a positive number of steps"),
            (bool(self.seeds), "sample.seeds is empty: give at least one seed"),
            *[(0 <= int(s) < 2**63, f"sample.seeds[{i}]={s}: seeds must be in [0, 2**63)") for i, s in enumerate(self.seeds)],
            (self.batch_size > 0, f"sample.batch_size={self.batch_size}: use a positive batch size"),
            *scales,
            (te2 is None or 0 <= te2 <= 2, f"sample.lora_scale_text_encoder_2={te2}: use a scale in [0, 2], or null "
             "(= sample.lora_scale_text_encoder)"),
        ])


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

    def errors(self) -> list[str]:
        return problems(self, "eval", [
            _seed("eval.seed", self.seed),
            (self.prompt_set in ("study", "dreambench"), f"eval.prompt_set={self.prompt_set!r}: use study or dreambench"),
            (self.class_kind in ("auto", "live", "object"),
             f"eval.class_kind={self.class_kind!r}: use auto, live or object"),
            (self.images_per_prompt > 0, f"eval.images_per_prompt={self.images_per_prompt}: use 1 or more (the paper: 4)"),
            (self.score_scale > 0, f"eval.score_scale={self.score_scale}: use 1 (cosine) or 100"),
            (-1 <= self.memorisation_threshold <= 1,
             f"eval.memorisation_threshold={self.memorisation_threshold}: a cosine similarity in [-1, 1] (e.g. 0.9)"),
            (self.drift_images >= 0, f"eval.drift_images={self.drift_images}: use 0 (off) or more"),
            (self.batch_size > 0, f"eval.batch_size={self.batch_size}: use a positive batch size"),
        ])
