"""Aspect-ratio bucketing: train on non-square photos without cropping them square.

With ``data.buckets: true`` each photo goes to the bucket (width, height) whose aspect ratio is
closest to its own, among sizes of about resolution² pixels whose sides are multiples of
``step`` (64 px for SD, so latents stay divisible by the UNet's downsampling). A photo is resized
to cover its bucket and cropped to it (centred, or at random with ``data.center_crop: false``).
A step's batch always comes from one bucket; class images are cropped to that step's bucket so
instance and prior rows still go through the UNet in one forward pass.

The data order stays a pure function of (seed, step): each epoch shuffles every bucket's members,
cuts them into batches (the last one topped up from the same bucket) and shuffles the batches.
"""

from __future__ import annotations

import math

import torch

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, step: int, max_ratio: float = 2.5) -> list[Size]:
    """Sizes with w·h ≤ resolution², sides multiples of step, aspect ratio ≤ max_ratio (pure)."""
    area = resolution * resolution
    out = set()
    for w in range(step, 4 * resolution + 1, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
    out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to size's (log scale); the larger area on a tie (pure)."""
    w, h = size
    return min(buckets, key=lambda b: (round(abs(math.log(w / h) - math.log(b[0] / b[1])), 9), -b[0] * b[1]))


def bucket_step(resolution: int) -> int:
    """Side granularity: 64 px at SD sizes, smaller for the tiny test models (pure)."""
    return 64 if resolution >= 256 else max(8, resolution // 4)


def epoch_batches(bucket_of: list[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of photo indices, each from a single bucket (pure)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    batches = []
    for bucket in sorted(set(bucket_of)):
        members = [i for i, b in enumerate(bucket_of) if b == bucket]
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            chunk += [order[k % len(order)] for k in range(batch_size - len(chunk))]  # top up, same bucket
            batches.append(chunk)
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def indices_for_step(bucket_of: list[Size], batch_size: int, seed: int, step: int) -> list[int]:
    """The photos of step `step`: one bucket's batch (pure; every epoch has the same length)."""
    per_epoch = len(epoch_batches(bucket_of, batch_size, seed, 0))
    epoch, j = divmod(step, per_epoch)
    return epoch_batches(bucket_of, batch_size, seed, epoch)[j]


def cover_and_crop_box(size: Size, bucket: Size, center: bool, gen: torch.Generator | None) -> tuple[Size, tuple]:
    """(resized size that covers the bucket, crop box in it) for an image of `size` (pure but for gen)."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if center or gen is None:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=gen))
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=gen))
    return (rw, rh), (left, top, left + bw, top + bh)
