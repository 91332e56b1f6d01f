"""The DreamBooth loss and its options, as small pure functions.

- the loss: the UNet's target (the noise, or the velocity for v-prediction) and a batch of
  [instance rows; prior rows] split into instance loss + prior.loss_weight * prior loss;
- min-SNR-γ weighting (Hang et al., 2023): each row's loss is weighted by min(SNR(t), γ) / SNR(t)
  for ε-prediction and min(SNR(t), γ) / (SNR(t) + 1) for v-prediction, where
  SNR(t) = ᾱ_t / (1 − ᾱ_t). Low-noise timesteps, which dominate the plain MSE, count less.
- the per-element loss: MSE (the paper's), L1, or pseudo-Huber 2c(√(x² + c²) − c), which is
  quadratic near 0 and linear for large errors (less pull from outlier rows).
- noise offset: ε + offset · n with n ~ N(0, 1) per (row, channel), constant over the image;
  lets a model learn overall brightness shifts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("mse", "l1", "huber")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-row loss weights of min-SNR-γ for the model's prediction type."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"min-SNR weighting: prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


def per_row_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_c: float = 0.1) -> torch.Tensor:
    """The loss of each row (mean over channels and pixels)."""
    diff = pred.float() - target.float()
    if kind == "mse":
        err = diff ** 2
    elif kind == "l1":
        err = diff.abs()
    elif kind == "huber":
        err = 2 * huber_c * (torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c)
    else:
        raise ValueError(f"loss.kind={kind!r}: use one of {', '.join(LOSS_KINDS)}")
    return err.mean(dim=tuple(range(1, err.ndim)))


def offset_noise(noise: torch.Tensor, offset: float, gen: torch.Generator, positions: list[int], n: int) -> torch.Tensor:
    """ε + offset · N(0, 1) per (row, channel); drawn for the global batch of n rows, this
    process's rows taken by position (so several processes see what one would)."""
    shift = torch.randn((n, noise.shape[1], 1, 1), generator=gen)[positions]
    return noise + offset * shift.to(noise.device, noise.dtype)


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction), as the noise
    scheduler's config says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float,
                    weights: torch.Tensor | None = None, kind: str = "mse", huber_c: float = 0.1):
    """Split a batch of [instance rows; prior rows] and return (loss, instance loss, prior loss).

    With the defaults this is the paper's: MSE(instance) + prior_weight * MSE(prior). `weights`
    (one per row, e.g. min-SNR-γ) and `kind` (mse | l1 | huber) are the loss axes above.
    """
    has_prior = pred.shape[0] != n_instance
    if weights is None and kind == "mse":
        pred, target = pred.float(), target.float()
        inst = F.mse_loss(pred[:n_instance], target[:n_instance])
        prior = F.mse_loss(pred[n_instance:], target[n_instance:]) if has_prior else None
    else:
        rows = per_row_loss(pred, target, kind, huber_c)
        if weights is not None:
            rows = rows * weights.to(rows.device, rows.dtype)
        inst = rows[:n_instance].mean()
        prior = rows[n_instance:].mean() if has_prior else None
    return (inst, inst, None) if prior is None else (inst + prior_weight * prior, inst, prior)
