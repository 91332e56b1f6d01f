"""A memory model for training: what lives on the accelerator, and how much.

    peak ≈ base weights on the device (UNet; VAE and text encoder unless cached and offloaded)
         + LoRA parameters, their gradients and the optimizer state (fp32 master weights)
         + activations saved for backward

Parameter counts come from the model's own configs. Activations are counted, not guessed: the
UNet (and a trained text encoder) run once on PyTorch's "meta" device — shapes only, no memory,
no arithmetic — while a saved-tensors hook adds up every tensor autograd keeps for backward.
Mixed precision halves what is saved in fp16/bf16; gradient checkpointing is run as configured.
Allocator caching and CUDA workspace are not modelled; `benchmarks/` compares against measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .lora import enable_checkpointing

GiB = 2**30


@dataclass
class MemoryEstimate:
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> dict[str, float]:
        return {**{k: round(v / GiB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GiB, 3)}


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_models(cfg: Config):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .lora import add_adapters
    from .models import pretrained_path

    path = pretrained_path(cfg.model.name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(path, subfolder="text_encoder"))
        add_adapters(cfg, unet, text_encoder)
    return unet, vae, text_encoder


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


def saved_activation_bytes(cfg: Config, unet, text_encoder) -> int:
    """Bytes autograd saves for backward in one forward of the training batch (meta device)."""
    rows = cfg.train.batch_size * (2 if cfg.prior.enabled and cfg.prior.loss_weight > 0 else 1)
    side = cfg.resolution // 8
    seen: dict[int, int] = {}
    params = {id(p) for m in (unet, text_encoder) for p in m.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and not isinstance(base, torch.nn.Parameter):  # weights are counted already
            seen[id(t)] = t.numel() * t.element_size()
        return t

    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        enable_checkpointing(text_encoder)
    unet.train()
    text_encoder.train()
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _forward(cfg, unet, text_encoder, rows, side)
    finally:
        F.scaled_dot_product_attention = real_sdpa
    total = sum(seen.values())
    return total // 2 if cfg.train.mixed_precision in ("fp16", "bf16") else total


def _forward(cfg: Config, unet, text_encoder, rows: int, side: int) -> None:
    """One training forward on meta tensors: text encoder (when trained), then the UNet."""
    ids = torch.zeros(rows, 77, dtype=torch.long, device="meta")
    if cfg.train.train_text_encoder:
        states = text_encoder(ids)[0]
    else:
        states = torch.zeros(rows, 77, text_encoder.config.hidden_size, device="meta")
    latents = torch.zeros(rows, unet.config.in_channels, side, side, device="meta")
    unet(latents, torch.zeros(rows, dtype=torch.long, device="meta"), states)


def estimate(cfg: Config, device_type: str = "cuda") -> MemoryEstimate:
    """Predicted training memory on the accelerator for a config (see the module doc)."""
    cfg = cfg.resolved()
    unet, vae, text_encoder = _meta_models(cfg)
    weight_bytes = 2 if cfg.train.mixed_precision in ("fp16", "bf16") else 4
    lora = sum(p.numel() for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad)
    base_unet = count_params(unet) - sum(p.numel() for p in unet.parameters() if p.requires_grad)
    base_te = count_params(text_encoder) - sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)
    offload = cfg.train.offload_frozen and device_type == "cuda"
    vae_on = not (offload and cfg.train.cache_latents and cfg.data.center_crop)
    te_on = cfg.train.train_text_encoder or not (offload and cfg.train.cache_text_embeddings)
    weights = (base_unet + (count_params(vae) if vae_on else 0) + (base_te if te_on else 0)) * weight_bytes
    optimizer_bytes = 2 if cfg.optim.optimizer == "adamw8bit" else 8
    return MemoryEstimate(weights=weights, lora=lora * 4, gradients=lora * 4, optimizer=lora * optimizer_bytes,
                          activations=saved_activation_bytes(cfg, unet, text_encoder))
