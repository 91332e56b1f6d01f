"""Instance and class images: discovery, validation, EXIF, crops, flips and the data order.

Photos are read once (EXIF orientation applied, transparency composited on white, converted to
RGB) and resized so the shorter side equals the resolution; each training step then crops and
flips them. The order of examples is a pure function of (seed, step), so a resumed run sees
exactly the data an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DatasetError(ValueError):
    """A photo folder cannot be used; the message names every file at fault."""


def find_images(folder: str | Path) -> list[Path]:
    """Image files directly in folder (jpg/jpeg/png/webp, any case), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist: check data.instance_dir (or DATASET_DIR)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        others = ", ".join(p.name for p in files[:5]) or "nothing"
        raise DatasetError(
            f"no images in {folder} (found {others}): put 3–30 photos of the subject there "
            f"as {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}"
        )
    return images


def open_image(path: str | Path) -> Image.Image:
    """Open a photo upright and in RGB; transparent pixels become white."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB")


def load_images(paths: list[Path]) -> list[Image.Image]:
    """Open every file; if any cannot be read, raise one error that lists them all."""
    images, bad = [], []
    for p in paths:
        try:
            images.append(open_image(p))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            bad.append(f"{p}: {exc.__class__.__name__}: {exc}")
    if bad:
        raise DatasetError(
            f"{len(bad)} file(s) could not be read as images — re-export or remove them:\n  " + "\n  ".join(bad)
        )
    return images


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.Resampling.BICUBIC)


def crop_box(size: tuple[int, int], resolution: int, center: bool, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """Crop box of resolution x resolution: centred, or at a random offset drawn from gen."""
    w, h = size
    if center or gen is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=gen))
    return left, top, left + resolution, top + resolution


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 image to CHW float in [-1, 1], the range the VAE expects."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class ImageSet:
    """Images resized once; crops and flips happen per example."""

    paths: list[Path]
    images: list[Image.Image]
    resolution: int

    @classmethod
    def from_paths(cls, paths: list[Path], resolution: int) -> "ImageSet":
        images = [resize_shorter_side(im, resolution) for im in load_images(paths)]
        return cls(list(paths), images, resolution)

    @classmethod
    def from_folder(cls, folder: str | Path, resolution: int) -> "ImageSet":
        return cls.from_paths(find_images(folder), resolution)

    def __len__(self) -> int:
        return len(self.images)

    def example(self, index: int, *, center_crop: bool, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
        img = self.images[index]
        img = img.crop(crop_box(img.size, self.resolution, center_crop, gen))
        if flip:
            img = ImageOps.mirror(img)
        return to_tensor(img)

    def batch(self, indices: list[int], *, center_crop: bool, random_flip: bool, gen: torch.Generator) -> torch.Tensor:
        rows = []
        for i in indices:
            flip = random_flip and bool(torch.rand((), generator=gen) < 0.5)
            rows.append(self.example(i, center_crop=center_crop, flip=flip, gen=gen))
        return torch.stack(rows)


def indices_for_step(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Which examples step `step` sees: shuffled epochs laid end to end, a pure function.

    Every epoch is a fresh permutation (seeded by seed and epoch number), so each photo is seen
    equally often and a resumed run picks up at exactly the same place.
    """
    out = []
    for j in range(batch_size):
        pos = step * batch_size + j
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63))
        out.append(int(perm[offset]))
    return out
