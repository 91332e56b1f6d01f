"""Similarity between images. For now a plain image-space measure; DINO/CLIP come later.

Pixel similarity: both images resized to 32x32, flattened, mean-centred and compared by cosine.
Crude, but it catches the failure DreamBooth users fear most: a generation that copies a
training photo scores near 1.0 against it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def pixel_features(images: Sequence[Image.Image], size: int = 32) -> np.ndarray:
    """One unit-length row per image (pure)."""
    rows = []
    for im in images:
        a = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
        a = a - a.mean()
        norm = np.linalg.norm(a)
        rows.append(a / norm if norm > 0 else a)
    return np.stack(rows)


def nearest(generated: Sequence[Image.Image], training: Sequence[Image.Image]) -> list[tuple[int, float]]:
    """For each generated image: (index of the most similar training image, cosine similarity)."""
    sims = pixel_features(generated) @ pixel_features(training).T
    return [(int(row.argmax()), float(row.max())) for row in sims]
