"""LoRA adapters on the UNet and text encoder (peft), and the diffusers-format LoRA file."""

from __future__ import annotations

from pathlib import Path

import torch

from . import files
from .config import Config
from .sample import LORA_FILE


def add_adapters(cfg: Config, unet, text_encoder) -> list[torch.nn.Parameter]:
    """Freeze the base weights, add LoRA, return the trainable parameters (kept in fp32)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    common = dict(r=cfg.lora.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora.dropout,
                  init_lora_weights="gaussian", use_dora=cfg.lora.use_dora)
    unet.add_adapter(LoraConfig(target_modules=unet_targets(cfg), **common))
    if cfg.train.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(target_modules=list(cfg.lora.text_encoder_targets), **common))
    params = trainable(unet) + (trainable(text_encoder) if cfg.train.train_text_encoder else [])
    for p in params:  # mixed precision keeps the base in fp16 but the LoRA master weights in fp32
        p.data = p.data.float()
    return params


CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")  # the ResNet convolutions (LoCon)


def unet_targets(cfg: Config) -> list[str]:
    """The UNet modules that get adapters: the attention projections, and with lora.conv the
    ResNet convolutions (pure)."""
    extra = [t for t in CONV_TARGETS if cfg.lora.conv and t not in cfg.lora.unet_targets]
    return list(cfg.lora.unet_targets) + extra


def trainable(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_state_dicts(unet, text_encoder, with_text_encoder: bool) -> tuple[dict, dict | None]:
    """The adapters' weights with diffusers key names (what load_lora_weights reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) if with_text_encoder else None
    return unet_sd, te_sd


def save_lora(folder: str | Path, unet, text_encoder, with_text_encoder: bool,
              metadata: dict[str, str] | None = None) -> Path:
    """Write <folder>/pytorch_lora_weights.safetensors atomically (diffusers LoRA format), with
    `metadata` (strings) added to the safetensors header."""
    from diffusers import StableDiffusionPipeline

    unet_sd, te_sd = lora_state_dicts(unet, text_encoder, with_text_encoder)
    unet_sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet_sd.items()}
    if te_sd is not None:
        te_sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in te_sd.items()}
    target = Path(folder) / LORA_FILE

    def write(tmp: Path) -> None:
        # The adapters' LoraConfig (rank, alpha, targets) goes into the file: without it a loader
        # assumes alpha = rank and a LoRA trained with another alpha comes back at the wrong scale.
        StableDiffusionPipeline.save_lora_weights(
            tmp.parent, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
            weight_name=tmp.name, safe_serialization=True,
            unet_lora_adapter_metadata=adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if with_text_encoder else None,
        )
        # Rewrite with a sorted header (and our metadata): the same LoRA gives the same bytes.
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(tmp), framework="pt") as f:
            merged = {**(f.metadata() or {}), **(metadata or {})}
        tmp.write_bytes(files.safetensors_bytes(load_file(str(tmp)), merged))

    return files.atomic_write(target, write)


def adapter_metadata(model) -> dict:
    """The adapter's LoraConfig as a dict whose JSON is the same in every process.

    peft keeps `target_modules` as a set, and a set of strings iterates in an order that changes
    with PYTHONHASHSEED; diffusers writes it as a list in that order, so two runs of the same
    config would write different bytes. Every set becomes a sorted list.
    """
    meta = sorted_sets(model.peft_config["default"].to_dict())
    # peft records where the base model was loaded from: a path in the user's cache, which would
    # make files differ across machines and put a home folder into LoRAs people share.
    if meta.get("base_model_name_or_path"):
        meta["base_model_name_or_path"] = None
    return meta


def sorted_sets(value):
    """value with every set (at any depth) replaced by a sorted list (pure)."""
    if isinstance(value, (set, frozenset)):
        return sorted((sorted_sets(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k: sorted_sets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(sorted_sets(v) for v in value)
    return value


def enable_checkpointing(text_encoder) -> None:
    """Gradient (activation) checkpointing on a transformers text encoder, old or new name."""
    fn = getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable
    fn()
