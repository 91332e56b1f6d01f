"""LoRA adapters on the UNet and text encoder(s) (peft), and the run's diffusers-format LoRA file
with its metadata (`write_lora`, `run_metadata`).

SDXL has two text encoders: with text-encoder training both get adapters (the same targets and
rank) and the file holds `text_encoder.*` and `text_encoder_2.*` keys, as
StableDiffusionXLPipeline.save_lora_weights writes them."""

from __future__ import annotations

from pathlib import Path

import torch

from . import files, identifier
from .config import Config, TrainConfig, experiment_axes
from .config import LoraConfig as LoraSection  # the config's lora section, not peft's LoraConfig
from .lora_check import PREFIX


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


def _state(module) -> dict:
    """The adapters' weights with diffusers key names (what load_lora_weights reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def write_lora(path: str | Path, cfg: Config, acc, objective, dataset_digest: str, *,
               step: int | None = None) -> Path:
    """Write the run's LoRA as it is now to `path` (the run's pytorch_lora_weights.safetensors, or a
    step's) atomically, in the diffusers LoRA format, with the run's metadata (`run_metadata`, the photos'
    digest, and with `step` dreambooth_lab.step) added to the safetensors header; a learned
    identifier is written beside it first (identifier.save: learned_embeds.safetensors, with `step`
    the LoRA's own, identifier.own_embedding).
    objective: the trainer's DreamBoothObjective (its UNet, text encoders, identifier and family),
    unwrapped from `acc`. With SDXL's second text encoder it is an SDXL file: that encoder's adapters
    go under text_encoder_2.* when the text encoders were trained."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = acc.unwrap_model(objective.unet)
    text_encoder = acc.unwrap_model(objective.text_encoder)
    xl = len(objective.text_encoders) > 1
    with_text_encoder = cfg.train.train_text_encoder
    # The adapters' LoraConfig (rank, alpha, targets) goes into the file: without it a loader
    # assumes alpha = rank and a LoRA trained with another alpha comes back at the wrong scale.
    layers = dict(unet_lora_layers=_state(unet), text_encoder_lora_layers=_state(text_encoder) if with_text_encoder
                  else None, unet_lora_adapter_metadata=adapter_metadata(unet),
                  text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if with_text_encoder else None)
    if xl:
        text_encoder_2 = acc.unwrap_model(objective.text_encoders[1])
        layers.update(text_encoder_2_lora_layers=_state(text_encoder_2) if with_text_encoder else None,
                      text_encoder_2_lora_adapter_metadata=adapter_metadata(text_encoder_2) if with_text_encoder
                      else None)
    metadata = {**run_metadata(cfg, objective.family), PREFIX + "dataset_digest": dataset_digest}
    if step is not None:
        metadata[PREFIX + "step"] = str(step)
    path = Path(path)
    if objective.identifier is not None:
        metadata.update({PREFIX + "identifier": cfg.prompt_token,
                         PREFIX + "identifier_vectors": str(cfg.identifier.num_vectors)})
        embedding = path.parent / identifier.EMBEDDING_FILE if step is None else identifier.own_embedding(path)
        identifier.save(embedding, objective.identifier, {PREFIX + "placeholder": cfg.prompt_token,
                                                          PREFIX + "init": cfg.identifier.init,
                                                          PREFIX + "base_model": cfg.model.name})

    def write(tmp: Path) -> None:
        (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
            tmp.parent, weight_name=tmp.name, safe_serialization=True, **layers)
        # Rewrite with a sorted header (and our metadata): the same LoRA gives the same bytes.
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(tmp), framework="pt") as f:
            merged = {**(f.metadata() or {}), **metadata}
        tmp.write_bytes(files.safetensors_bytes(load_file(str(tmp)), merged))

    return files.atomic_write(path, write)


def run_metadata(cfg: Config, family: str | None = None) -> dict[str, str]:
    """String metadata for a LoRA file of this run (safetensors headers hold strings only);
    `family` (sd1 / sd2 / sdxl) is recorded when given."""
    cfg = cfg.resolved()
    values = {
        "base_model": cfg.model.name, **({"family": family} if family else {}),
        "token": cfg.data.token, "class": cfg.data.class_name,
        "instance_prompt": cfg.fill(cfg.data.instance_prompt), "rank": cfg.lora.rank, "alpha": cfg.lora_alpha,
        "steps": cfg.train.steps, "resolution": cfg.resolution, "train_text_encoder": cfg.train.train_text_encoder,
        "config_hash": cfg.hash(), "recommended_scale_unet": cfg.sample.lora_scale_unet,
        "recommended_scale_text_encoder": cfg.sample.lora_scale_text_encoder,
        "recommended_guidance": cfg.sample.guidance, "unet_targets": ",".join(cfg.lora.unet_targets),
        **experiment_axes(cfg),
    }
    return {PREFIX + k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


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
