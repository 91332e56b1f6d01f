"""What the UNet is conditioned on, per model family: the one place where SD1/SD2 and SDXL differ.

- SD1.x / SD2.x: the text encoder's last hidden states (``encoder_hidden_states``).
- SDXL: both text encoders' penultimate hidden states concatenated along the feature axis, plus
  the second encoder's pooled projection (``text_embeds``) and six time ids per row (``time_ids``):
  original size (height, width), crop top-left (top, left) and target size (height, width) — as
  ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` compute them.

Everything else in training (data order, noise, loss, caches, checkpoints) is family-blind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cond:
    """Prompt conditioning of a batch of rows: hidden states, and SDXL's pooled embedding."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.states.shape

    def __getitem__(self, index) -> "Cond":
        return Cond(self.states[index], None if self.pooled is None else self.pooled[index])

    @property
    def device(self) -> torch.device:
        return self.states.device

    def cat(self, other: "Cond") -> "Cond":
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return Cond(torch.cat([self.states, other.states]), pooled)


def encode(family: str, text_encoders: list, ids: list[torch.Tensor]) -> Cond:
    """Encode token ids (one tensor per text encoder) the way the family's pipeline does."""
    if family != "sdxl":
        return Cond(text_encoders[0](ids[0])[0])
    hidden, pooled = [], None
    for encoder, x in zip(text_encoders, ids):
        out = encoder(x, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds: the final encoder's pooled output
            pooled = out[0]
        hidden.append(out.hidden_states[-2])  # SDXL always reads the penultimate layer
    if pooled is None:
        raise ValueError("SDXL conditioning needs a text encoder with a projection (CLIPTextModelWithProjection) "
                         "as text_encoder_2: the model folder's text_encoder_2 is not one")
    return Cond(torch.cat(hidden, dim=-1), pooled)


def time_ids(original: tuple[int, int], box: tuple[int, int, int, int], image_width: int, flip: bool) -> list[int]:
    """SDXL's six micro-conditions of one training crop (pure).

    original: (width, height) of the photo file; box: (left, top, right, bottom) of the crop in
    the resized image of width `image_width`; a flipped crop is described in the mirrored image,
    as when the photo is flipped before cropping (diffusers' SDXL training scripts).
    Returns [original h, original w, crop top, crop left, target h, target w].
    """
    left, top, right, bottom = box
    crop_w, crop_h = right - left, bottom - top
    if flip:
        left = image_width - right
    return [original[1], original[0], top, left, crop_h, crop_w]


def added_cond_kwargs(cond: Cond, ids: torch.Tensor | None) -> dict | None:
    """The UNet's added_cond_kwargs (SDXL), or None (SD1/SD2)."""
    if cond.pooled is None:
        return None
    # float32: sizes above 2048 are not all exact in fp16 (the UNet casts its sinusoidal embedding itself)
    return {"text_embeds": cond.pooled, "time_ids": ids.to(cond.pooled.device, torch.float32)}
