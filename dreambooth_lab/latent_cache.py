"""The latent cache (train.cache_latents): the VAE's latent distribution (mean, std) of every centre
crop a step can draw, encoded once; each step samples ``mean + std * noise`` as
DiagonalGaussianDistribution.sample would (random crops cannot be cached: with data.center_crop
false the VAE runs every step). Where the VAE and text encoder stay put anyway (a CPU, or
train.offload_frozen: false; `encode_lazily`) it and the frozen text encoder's states fill as the
steps need them, the same tensors either way; on a GPU with offloading all before the first step,
so that both can leave the GPU (what the memory model counts on).
"""

from __future__ import annotations

import torch


def encode_lazily(offload_frozen: bool, device: torch.device) -> bool:
    """Are the caches (latents, the frozen text encoder's states) filled as the steps need them,
    rather than all before the first step? Where nothing leaves the accelerator afterwards (a CPU,
    or train.offload_frozen: false): yes. On a GPU with offloading: no, the VAE and text encoder
    leave it before the first step, as the memory model counts."""
    return device.type == "cpu" or not offload_frozen


def latent_keys(sets: dict, bucket_of: list | None, flips: tuple[bool, ...]) -> list[tuple]:
    """(kind, flip, index, bucket) of every centre crop a step can draw from `sets` (kind -> image
    set or None): each photo (in its own bucket with data.buckets, `bucket_of`; each class image in
    every bucket a photo uses), in each of `flips` (pure)."""
    if bucket_of is None:
        return [(kind, flip, i, None) for kind, images in sets.items() if images is not None
                for flip in flips for i in range(len(images))]
    wanted = [("instance", i, b) for i, b in enumerate(bucket_of)]
    if sets["class"] is not None:
        wanted += [("class", i, b) for b in sorted(set(bucket_of)) for i in range(len(sets["class"]))]
    return [(kind, flip, i, bucket) for kind, i, bucket in wanted for flip in flips]


class LatentCache:
    """The VAE's latent distribution (mean, std) of each centre-cropped photo, keyed (kind, flip,
    index, bucket), computed by `encode(key)` the first time it is asked for (or all at once,
    `fill()`). The same tensors whenever they are encoded: one photo per VAE pass, without autocast
    or gradients. `cache[kind, flip]` gives one kind's (means, stds) stacked, as the eager cache did."""

    def __init__(self, keys: list[tuple], encode):
        self.keys, self._encode, self.entries = keys, encode, {}

    def get(self, kind: str, flip: bool, index: int, bucket=None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kind, flip, index, bucket)
        if key not in self.entries:
            self.entries[key] = self._encode(key)
        return self.entries[key]

    def fill(self) -> "LatentCache":
        for key in self.keys:
            self.get(*key)
        return self

    @property
    def complete(self) -> bool:
        return len(self.entries) == len(self.keys)

    def __getitem__(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if len(key) == 4:
            return self.get(*key)
        kind, flip = key
        pairs = [self.get(*k) for k in self.keys if k[0] == kind and k[1] == flip]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
