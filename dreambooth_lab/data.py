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
# Image formats people have but this loader does not read: named in the error with the fix.
UNSUPPORTED = {".heic": "HEIC (iPhone)", ".heif": "HEIF", ".avif": "AVIF", ".tif": "TIFF", ".tiff": "TIFF",
               ".bmp": "BMP", ".gif": "GIF", ".dng": "DNG (raw)", ".cr2": "CR2 (raw)", ".nef": "NEF (raw)",
               ".arw": "ARW (raw)", ".raw": "raw"}
MIN_SIDE_FRACTION = 4  # refuse photos whose shorter side is below resolution / 4 (upscaled 4x+ = mush)


class DatasetError(ValueError):
    """A photo folder cannot be used; the message names every file at fault."""


class DatasetWarning(UserWarning):
    """Usable, but worth knowing: upscaled photos, duplicates."""


def find_images(folder: str | Path) -> list[Path]:
    """Image files directly in folder (jpg/jpeg/png/webp, any case), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist: check data.instance_dir (or DATASET_DIR)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    unsupported = [p for p in files if p.suffix.lower() in UNSUPPORTED]
    if unsupported:
        names = "\n  ".join(f"{p}: {UNSUPPORTED[p.suffix.lower()]} is not supported" for p in unsupported)
        raise DatasetError(f"{len(unsupported)} photo(s) in a format this loader does not read — convert them to "
                           f"JPEG or PNG (e.g. export as JPEG from Photos), or move them out:\n  {names}")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        others = ", ".join(p.name for p in files[:5]) or "nothing"
        raise DatasetError(
            f"no images in {folder} (found {others}): put 3–30 photos of the subject there "
            f"as {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}"
        )
    return images


def open_image(path: str | Path, target: int | None = None) -> Image.Image:
    """Open a photo upright and in RGB; transparent pixels become white, 16-bit becomes 8-bit.

    With `target`, a large JPEG is decoded at reduced size (libjpeg's DCT scaling) to a shorter
    side of at least `target`, so an 8000 px photo never exists in memory at full size.
    """
    with Image.open(path) as im:
        if target and im.format == "JPEG":
            im.draft("RGB", (target, target))  # picks a scale that keeps both sides >= target
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.uint32)
        im = Image.fromarray((arr >> 8 if arr.max() > 255 else arr).clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB")


def load_images(paths: list[Path], target: int | None = None) -> list[Image.Image]:
    """Open every file; if any cannot be read, raise one error that lists them all."""
    images, bad = [], []
    for p in paths:
        try:
            images.append(open_image(p, target))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bad.append(f"{p}: {exc.__class__.__name__}: {exc}")
    if bad:
        raise DatasetError(
            f"{len(bad)} file(s) could not be read as images — re-export or remove them:\n  " + "\n  ".join(bad)
        )
    return images


def check_sizes(paths: list[Path], images: list[Image.Image], resolution: int) -> None:
    """Refuse photos far below the resolution; warn about those that will be upscaled."""
    import warnings

    floor = max(8, resolution // MIN_SIDE_FRACTION)
    tiny = [f"{p}: {im.size[0]}x{im.size[1]}" for p, im in zip(paths, images) if min(im.size) < floor]
    if tiny:
        raise DatasetError(f"{len(tiny)} photo(s) are smaller than {floor} px on the shorter side, far below the "
                           f"training resolution {resolution}: use larger originals or remove them:\n  "
                           + "\n  ".join(tiny))
    small = [f"{p.name} ({min(im.size)} px)" for p, im in zip(paths, images) if min(im.size) < resolution]
    if small:
        warnings.warn(f"{len(small)} photo(s) are smaller than the resolution {resolution} and will be upscaled "
                      f"(softer results): {', '.join(small)}", DatasetWarning, stacklevel=3)


def check_duplicates(paths: list[Path], images: list[Image.Image]) -> list[tuple[str, str]]:
    """Warn about photos that are the same picture (same pixels at 16x16, grey); returns the pairs."""
    import warnings

    seen: dict[bytes, Path] = {}
    pairs = []
    for p, im in zip(paths, images):
        key = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR)).tobytes()
        if key in seen:
            pairs.append((seen[key].name, p.name))
        else:
            seen[key] = p
    if pairs:
        warnings.warn("duplicate photos (they weigh double in training; remove one of each): "
                      + ", ".join(f"{a} = {b}" for a, b in pairs), DatasetWarning, stacklevel=3)
    return pairs


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
    def from_paths(cls, paths: list[Path], resolution: int, check: bool = False) -> "ImageSet":
        originals = load_images(paths, target=resolution)
        if check:
            check_sizes(paths, originals, resolution)
            check_duplicates(paths, originals)
        return cls(list(paths), [resize_shorter_side(im, resolution) for im in originals], resolution)

    @classmethod
    def from_folder(cls, folder: str | Path, resolution: int, check: bool = True) -> "ImageSet":
        """The subject's photos, with size and duplicate checks (class images skip them)."""
        return cls.from_paths(find_images(folder), resolution, check=check)

    def __len__(self) -> int:
        return len(self.images)

    def example(self, index: int, *, center_crop: bool, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
        box = crop_box(self.images[index].size, self.resolution, center_crop, gen)
        return self.crop(index, box, flip)

    def crop(self, index: int, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        img = self.images[index].crop(box)
        return to_tensor(ImageOps.mirror(img) if flip else img)


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
