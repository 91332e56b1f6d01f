"""The optimizer of a run: AdamW (or 8-bit AdamW) with one group per trained component, and the
identifier-only steps (a resume's change of hyperparameters over the checkpoint's is checkpoint.load's)."""

from __future__ import annotations

import torch

from .config import OptimConfig


def make_optimizer(optim: OptimConfig, unet, text_encoder, identifier=None, *, train_text_encoder: bool,
                   identifier_lr: float = 0.0):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) with one learning rate per component (named
    groups: unet, text_encoder, text_encoder_2 (SDXL) when `train_text_encoder`, identifier (at
    `identifier_lr`, without weight decay)). text_encoder: the text encoder, or the list of them
    (SDXL: two)."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": optim.lr_unet, "name": "unet"}]
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    lr_2 = optim.lr_text_encoder if optim.lr_text_encoder_2 is None else optim.lr_text_encoder_2
    for name, lr, te in zip(("text_encoder", "text_encoder_2"), (optim.lr_text_encoder, lr_2), encoders):
        if train_text_encoder:
            groups.append({"params": [p for p in te.parameters() if p.requires_grad and p is not identifier],
                           "lr": lr, "name": name})
    if identifier is not None:
        groups.append({"params": [identifier], "lr": identifier_lr, "weight_decay": 0.0, "name": "identifier"})
    kw = dict(betas=(optim.adam_beta1, optim.adam_beta2), weight_decay=optim.weight_decay, eps=optim.adam_epsilon)
    if optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def hold_lora(params: list, identifier) -> None:
    """Drop the LoRA's gradients so this step updates only the learned identifier (AdamW skips
    parameters without a gradient, their moments included)."""
    for p in params:
        if p is not identifier:
            p.grad = None
