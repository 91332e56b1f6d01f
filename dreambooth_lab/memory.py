"""A memory model for training: what lives on the accelerator, and how much.

    peak ≈ base weights on the device (UNet; VAE and text encoder(s) unless cached and offloaded)
         + LoRA parameters, their gradients and the optimizer state (fp32 master weights)
         + activations saved for backward
         + with gradient checkpointing: the largest checkpointed segment, recomputed in backward

Parameter counts come from the model's own configs; the families differ only in what those configs
hold (SD1.x/SD2.x: one CLIP text encoder; SDXL: two, CLIP ViT-L and OpenCLIP bigG, and a UNet with
pooled-text and time-id embeddings). Published hub models whose architecture the package builds
offline (SD1.5, SDXL base) are read from those configs, so the estimate needs no download.
Activations are counted, not guessed: the UNet (and trained text encoders) run once on PyTorch's
"meta" device — shapes only, no memory, no arithmetic — while a saved-tensors hook adds up every
storage autograd keeps for backward (each once: views of one tensor share it). Mixed precision
halves what is saved in fp16/bf16; gradient checkpointing is run as configured, and each
checkpointed segment is also counted on its own, since backward rebuilds one segment at a time.

Before training there is a set-up phase (`MemoryEstimate.setup`): every component on the device
while class images are generated and the caches are filled, plus the transient tensors of one VAE
decode or encode at the training size (tracked live on the meta device; the UNet's own no-grad
generation transients are small beside them and not counted). SDXL's VAE overflows in fp16 (its
config says force_upcast), so with fp16 it is counted in fp32, as the trainer runs it: it encodes
the photos once, the latents are cached and the VAE leaves the GPU. Allocator caching and CUDA
workspace are not modelled; `benchmarks/` compares against measurements.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import builtin
from .config import Config, ModelConfig
from .lora import enable_checkpointing
from .models import pretrained_path, resolve

GiB = 2**30

# Hub models with the architecture of an offline shape the package writes configs for: the memory
# model reads the shape's configs (the registry's Builtin.configs()), so no download is needed to estimate them.
SAME_ARCHITECTURE = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-random",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15-random",
    "runwayml/stable-diffusion-v1-5": "sd15-random",
}


@dataclass
class MemoryEstimate:
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    recompute: int = 0  # gradient checkpointing: the largest segment's activations, rebuilt in backward
    # the set-up phase (class images, caches), not part of `total`: every component's weights on the
    # device, and the transient tensors of one VAE decode or encode
    setup_weights: int = 0
    setup_transient: int = 0

    @property
    def total(self) -> int:
        """The training steps' peak."""
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations + self.recompute

    @property
    def setup(self) -> int:
        """The set-up phase's peak."""
        return self.setup_weights + self.setup_transient

    @property
    def peak(self) -> int:
        """The whole run's peak: training steps or set-up, whichever is larger."""
        return max(self.total, self.setup)

    def as_gib(self) -> dict[str, float]:
        return {**{k: round(v / GiB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GiB, 3),
                "setup": round(self.setup / GiB, 3), "peak": round(self.peak / GiB, 3)}


@dataclass
class MetaModels:
    """A pipeline's trainable parts on the meta device, LoRA added as configured."""

    family: str  # sd1 | sd2 | sdxl
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list  # [text_encoder] or, for SDXL, [text_encoder, text_encoder_2]

    @property
    def text_encoder(self):
        return self.text_encoders[0]


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def config_source(name: str) -> str:
    """The folder whose configs describe `name`'s architecture: the offline shape's configs for the
    published models it mirrors (SAME_ARCHITECTURE) and for the random shapes, else the model's own."""
    name = SAME_ARCHITECTURE.get(name, name)
    entry = builtin.get(name)
    return str(entry.configs()) if entry is not None else pretrained_path(name)


_META_CACHE: dict[tuple, MetaModels] = {}


def _meta_models(cfg: Config) -> MetaModels:
    """The config's models on the meta device with its adapters, kept for the next estimate of the
    same model and adapters (they are only read, or changed and restored, by the counts)."""
    lc = cfg.lora
    key = (config_source(cfg.model.name), lc.rank, cfg.lora_alpha, lc.dropout, lc.use_dora, lc.conv,
           tuple(lc.unet_targets), tuple(lc.text_encoder_targets), cfg.train.train_text_encoder)
    if key not in _META_CACHE:
        if len(_META_CACHE) >= 4:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        _META_CACHE[key] = _build_meta_models(cfg, key[0])
    return _META_CACHE[key]


def _build_meta_models(cfg: Config, path: str) -> MetaModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = resolve(ModelConfig(name=path)).family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(path, subfolder="text_encoder"))]
        if family == "sdxl":
            second = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder_2")
            encoders.append(CLIPTextModelWithProjection(second))
    # outside the meta context: peft makes the (small) adapters on the CPU and moves them to the base
    # layers' device, which is quicker than making and initialising them on the meta device
    _add_adapters(cfg, unet, encoders)
    return MetaModels(family, unet, vae, encoders)


def _add_adapters(cfg: Config, unet, encoders: list) -> None:
    """LoRA as training adds it (lora.add_adapters): the UNet's, and the text encoders' (SDXL's
    second too) when they are trained."""
    from .lora import add_adapters

    second = {"text_encoder_2": encoders[1]} if len(encoders) > 1 else {}
    add_adapters(cfg.lora, unet, encoders[0], **second, train_text_encoder=cfg.train.train_text_encoder)


class _FlashAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device with what a fused kernel
    (flash / memory-efficient, what SDPA runs on GPUs and on CPUs) keeps for backward: q, k, v,
    the output and one log-sum-exp per query — not the L x L attention matrix that the meta
    device's unfused fallback would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(*q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the meta forward is never differentiated
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashAttention.apply(q, k, v)


def _saved_counter(params: set[int], seen: dict[int, int]):
    """A saved-tensors pack hook that adds up the storages autograd keeps: tensors that share one
    (views: q/k/v heads of one projection, a layer's input kept by the base layer and its LoRA) count
    once, and a view keeps its whole storage. `params`: the weights' storages, counted already."""

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    return pack


def _param_storages(*modules) -> set[int]:
    return {p.untyped_storage()._cdata for m in modules for p in m.parameters()}


def _segment_counter(params: set[int], segments: list[int], outer):
    """A gradient-checkpointing function for the meta count, in one pass: the segment runs under its
    own saved-tensors hook, so what it saves is counted as the segment's (what backward rebuilds for
    it) and not in the total; its tensor inputs go to the outer hook, as a real checkpoint keeps
    exactly those for backward."""

    def checkpointed(module, *args):
        seen: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(_saved_counter(params, seen), lambda t: t):
            out = module(*args)
        segments.append(sum(seen.values()))
        for a in args:
            if isinstance(a, torch.Tensor):
                outer(a)
        return out

    return checkpointed


def training_rows(cfg: Config) -> int:
    """Rows in one UNet forward: the batch, doubled by prior preservation's class rows."""
    return cfg.train.batch_size * (2 if cfg.prior.term is not None else 1)


def saved_activations(cfg: Config, models: MetaModels) -> tuple[int, int]:
    """(bytes autograd saves for backward in one forward of the training batch, the largest
    checkpointed segment's bytes (0 without checkpointing)), counted on the meta device."""
    rows, side = training_rows(cfg), cfg.resolution // 8
    seen: dict[int, int] = {}
    segments: list[int] = [0]
    params = _param_storages(models.unet, *models.text_encoders)
    pack = _saved_counter(params, seen)
    if cfg.train.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing(_segment_counter(params, segments, pack))
        for te in models.text_encoders:
            enable_checkpointing(te)
    models.unet.train()
    for te in models.text_encoders:
        te.train()
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _forward(cfg, models, rows, side)
    finally:
        F.scaled_dot_product_attention = real_sdpa
        if cfg.train.gradient_checkpointing:  # the models are kept for the next estimate: as they were
            models.unet.disable_gradient_checkpointing()
            for te in models.text_encoders:
                (getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable)()
    half = cfg.train.mixed_precision in ("fp16", "bf16")
    total, largest = sum(seen.values()), max(segments)
    return (total // 2, largest // 2) if half else (total, largest)


def saved_activation_bytes(cfg: Config, models: MetaModels) -> int:
    """Bytes autograd saves for backward in one forward of the training batch (meta device)."""
    return saved_activations(cfg, models)[0]


def _forward(cfg: Config, models: MetaModels, rows: int, side: int) -> None:
    """One training forward on meta tensors: text encoder(s) when trained, then the UNet. SDXL's
    UNet also takes the pooled text embedding and six time ids per row."""
    unet, encoders = models.unet, models.text_encoders
    ids = torch.zeros(rows, 77, dtype=torch.long, device="meta")
    added = None
    if models.family == "sdxl":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        if cfg.train.train_text_encoder:
            first = encoders[0](ids, output_hidden_states=True)
            second = encoders[1](ids, output_hidden_states=True)
            states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            pooled = second.text_embeds
        else:
            states = torch.zeros(rows, 77, unet.config.cross_attention_dim, device="meta")
            pooled = torch.zeros(rows, pooled_dim, device="meta")
        added = {"text_embeds": pooled, "time_ids": torch.zeros(rows, 6, device="meta")}
    elif cfg.train.train_text_encoder:
        states = encoders[0](ids)[0]
    else:
        states = torch.zeros(rows, 77, encoders[0].config.hidden_size, device="meta")
    latents = torch.zeros(rows, unet.config.in_channels, side, side, device="meta")
    unet(latents, torch.zeros(rows, dtype=torch.long, device="meta"), states, added_cond_kwargs=added)


class _LivePeak(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak of tensor storage bytes alive at once while it is active (meta device: sizes only).
    Each new storage an op returns is counted until the last tensor on it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive on it]

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in inputs:
                continue
            key = t.untyped_storage()._cdata
            if key not in self._storages:
                self._storages[key] = [t.untyped_storage().nbytes(), 0]
                self.live += self._storages[key][0]
                self.peak = max(self.peak, self.live)
            self._storages[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def vae_dtype(cfg: Config, models: MetaModels) -> torch.dtype:
    """What the VAE runs in: the training precision, but fp32 for a VAE whose config says it
    overflows in fp16 (SDXL's force_upcast) — it encodes the photos once, in fp32."""
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision)
    if half is None or (models.family == "sdxl" and getattr(models.vae.config, "force_upcast", False)):
        return torch.float32
    return half


def vae_peak(cfg: Config, models: MetaModels, decode: bool = False) -> int:
    """Transient bytes of encoding one photo (or decoding one latent, as class-image generation
    and sampling do with VAE slicing) at the training size, no grad, tracked live."""
    vae = torch.nn.Module.to(models.vae, vae_dtype(cfg, models))  # nn.Module's: no float32-modules warning
    side = cfg.resolution
    mode = _LivePeak()
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.no_grad(), mode:
            if decode:
                latents = torch.zeros(1, vae.config.latent_channels, side // 8, side // 8, device="meta",
                                      dtype=vae.dtype)
                vae.decode(latents)
            else:
                pixels = torch.zeros(1, vae.config.in_channels, side, side, device="meta", dtype=vae.dtype)
                vae.encode(pixels).latent_dist.mean
    finally:
        F.scaled_dot_product_attention = real_sdpa
    return mode.peak


def estimate(cfg: Config, device_type: str = "cuda") -> MemoryEstimate:
    """Predicted training memory on the accelerator for a config (see the module doc)."""
    cfg = cfg.resolved()
    models = _meta_models(cfg)
    unet, vae, encoders = models.unet, models.vae, models.text_encoders
    weight_bytes = 2 if cfg.train.mixed_precision in ("fp16", "bf16") else 4
    lora = sum(p.numel() for m in (unet, *encoders) for p in m.parameters() if p.requires_grad)
    base_unet = count_params(unet) - sum(p.numel() for p in unet.parameters() if p.requires_grad)
    base_te = sum(count_params(te) - sum(p.numel() for p in te.parameters() if p.requires_grad) for te in encoders)
    offload = cfg.train.offload_frozen and device_type == "cuda"
    vae_on = not (offload and cfg.train.cache_latents and cfg.data.center_crop)
    te_on = cfg.train.train_text_encoder or not (offload and cfg.train.cache_text_embeddings)
    vae_bytes = count_params(vae) * torch.finfo(vae_dtype(cfg, models)).bits // 8
    weights = (base_unet + (base_te if te_on else 0)) * weight_bytes + (vae_bytes if vae_on else 0)
    # set-up: everything is on the device while class images are made (one VAE decode at a time, when
    # there are class images) and the caches are filled (one VAE encode at a time); no LoRA yet
    setup_weights = (base_unet + base_te) * weight_bytes + vae_bytes
    class_images = cfg.prior.term == "class_images"
    setup_transient = max(vae_peak(cfg, models), vae_peak(cfg, models, decode=True) if class_images else 0)
    optimizer_bytes = 2 if cfg.optim.optimizer == "adamw8bit" else 8
    activations, recompute = saved_activations(cfg, models)
    return MemoryEstimate(weights=weights, lora=lora * 4, gradients=lora * 4, optimizer=lora * optimizer_bytes,
                          activations=activations, recompute=recompute, setup_weights=setup_weights,
                          setup_transient=setup_transient)
