"""LoRA adapters on the UNet and text encoder(s) (peft), and the diffusers-format LoRA file.

SDXL has two text encoders: with text-encoder training both get adapters (the same targets and
rank) and the file holds `text_encoder.*` and `text_encoder_2.*` keys, as
StableDiffusionXLPipeline.save_lora_weights writes them."""

from __future__ import annotations

from pathlib import Path

import torch

from . import files
from .config import LoraConfig as LoraSection, TrainConfig  # LoraSection: the config's lora section, not peft's LoraConfig
from .sample import LORA_FILE


def add_adapters(lora: LoraSection, unet, text_encoder, text_encoder_2=None, *,
                 train_text_encoder: bool) -> list[torch.nn.Parameter]:
    """Freeze the base weights, add LoRA as the lora section says (to the text encoder(s) too when
    train_text_encoder), return the trainable parameters (kept in fp32).

    text_encoder_2: SDXL's second text encoder, adapted like the first when the text encoder trains."""
    from peft import LoraConfig

    encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    unet.requires_grad_(False)
    for te in encoders:
        te.requires_grad_(False)
    common = dict(r=lora.rank, lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout,
                  init_lora_weights="gaussian", use_dora=lora.use_dora)
    unet.add_adapter(LoraConfig(target_modules=unet_targets(lora), **common))
    params = trainable(unet)
    if train_text_encoder:
        for te in encoders:
            te.add_adapter(LoraConfig(target_modules=list(lora.text_encoder_targets), **common))
            params += trainable(te)
    for p in params:  # mixed precision keeps the base in fp16 but the LoRA master weights in fp32
        p.data = p.data.float()
    return params


def adapt(lora: LoraSection, train: TrainConfig, unet, text_encoders: list,
          identifier: torch.nn.Parameter | None = None) -> list[torch.nn.Parameter]:
    """Everything that makes the models trainable as the lora and train sections say: LoRA on the
    UNet and, when they train, the text encoder(s) (`add_adapters`), a learned identifier's
    embedding, and gradient checkpointing. Returns the parameters that learn (the identifier last)."""
    second = {"text_encoder_2": text_encoders[1]} if len(text_encoders) > 1 else {}
    params = add_adapters(lora, unet, text_encoders[0], **second, train_text_encoder=train.train_text_encoder)
    if identifier is not None:  # add_adapters froze the text encoder: the identifier learns
        identifier.requires_grad_(True)
        params.append(identifier)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train.train_text_encoder:
            for te in text_encoders:
                enable_checkpointing(te)
    return params


CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")  # the ResNet convolutions (LoCon)


def unet_targets(lora: LoraSection) -> list[str]:
    """The UNet modules that get adapters: the attention projections, and with lora.conv the
    ResNet convolutions (pure)."""
    extra = [t for t in CONV_TARGETS if lora.conv and t not in lora.unet_targets]
    return list(lora.unet_targets) + extra


def trainable(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_state_dicts(unet, text_encoder, with_text_encoder: bool) -> tuple[dict, dict | None]:
    """The adapters' weights with diffusers key names (what load_lora_weights reads)."""
    return _state(unet), _state(text_encoder) if with_text_encoder else None


def _state(module) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def save_lora(folder: str | Path, unet, text_encoder, with_text_encoder: bool,
              metadata: dict[str, str] | None = None, text_encoder_2=None, name: str = LORA_FILE) -> Path:
    """Write <folder>/pytorch_lora_weights.safetensors (or `name`) atomically (diffusers LoRA format),
    with `metadata` (strings) added to the safetensors header. text_encoder_2 (SDXL) makes it an SDXL
    file: its adapters go under text_encoder_2.* when the text encoders were trained."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet_sd = _state(unet)
    te_sd = _state(text_encoder) if with_text_encoder else None
    xl = text_encoder_2 is not None
    extra = {}
    if xl:
        extra = dict(text_encoder_2_lora_layers=_state(text_encoder_2) if with_text_encoder else None,
                     text_encoder_2_lora_adapter_metadata=adapter_metadata(text_encoder_2) if with_text_encoder
                     else None)
    target = Path(folder) / name

    def write(tmp: Path) -> None:
        # The adapters' LoraConfig (rank, alpha, targets) goes into the file: without it a loader
        # assumes alpha = rank and a LoRA trained with another alpha comes back at the wrong scale.
        (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
            tmp.parent, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
            weight_name=tmp.name, safe_serialization=True,
            unet_lora_adapter_metadata=adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if with_text_encoder else None,
            **extra,
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
