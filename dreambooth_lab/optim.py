"""The optimizer of a run: AdamW (or 8-bit AdamW) with one group per trained component, the
identifier-only steps, and a resume's change of hyperparameters over the checkpoint's."""

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


def use_config_hyperparameters(optimizer, lr_scheduler, fresh: list[dict]) -> None:
    """After a checkpoint is loaded into a run resumed with a changed config: its optimizer groups take
    the config's hyperparameters (`fresh`: the groups as the config built them, before the load, which
    replaced them with the checkpoint's) and the schedule the config's base learning rates, at the
    step the checkpoint reached. The moments (Adam's state) stay the checkpoint's."""
    for group, new in zip(optimizer.param_groups, fresh):
        group.update(new)
    lr_scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)  # diffusers' schedules are all LambdaLR
    if lambdas is not None:
        lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs
