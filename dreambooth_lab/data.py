"""Instance and class images: discovery, validation, EXIF, crops, flips and the data order.

Photos are read once (EXIF orientation applied, transparency composited on white, converted to
RGB) and resized so the shorter side equals the resolution; each training step then crops and
flips them. The order of examples is a pure function of (seed, step), so a resumed run sees
exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where it is used, so that the CLI checks a folder in a blink
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Image formats people have but this loader does not read: named in the error with the fix.
UNSUPPORTED = {".heic": "HEIC (iPhone)", ".heif": "HEIF", ".avif": "AVIF", ".tif": "TIFF", ".tiff": "TIFF",
               ".bmp": "BMP", ".gif": "GIF", ".dng": "DNG (raw)", ".cr2": "CR2 (raw)", ".nef": "NEF (raw)",
               ".arw": "ARW (raw)", ".raw": "raw"}
MIN_SIDE_FRACTION = 4  # refuse photos whose shorter side is below resolution / 4 (upscaled 4x+ = mush)
MIN_PHOTOS = 3  # fewer trains, but the LoRA tends to copy the photos (pose, background) instead of the subject
MAX_PHOTOS = 30  # more trains too, but each photo is seen rarely at DreamBooth's step counts (and curation pays)
# Near-duplicates: a 16x16 difference hash (256 bits: is each pixel brighter than its right-hand
# neighbour, grey) differing in at most this fraction of bits, AND 16x16 colour thumbnails within
# NEAR_DUPLICATE_COLOUR on average (0-255). A re-save, a resize, a few pixels of shift or +15%
# brightness stay well inside; distinct photos of one subject differ in 17-46% of the bits.
NEAR_DUPLICATE_BITS = 0.10
NEAR_DUPLICATE_COLOUR = 24.0
# One shared background: the outer ring of every photo (3 px of a 32x32 thumbnail, colour) within
# SHARED_BACKGROUND of the photos' median ring on average (0-255). Varied backgrounds differ by 25-90.
SHARED_BACKGROUND = 10.0


class DatasetError(ValueError):
    """A photo folder cannot be used; the message names every file at fault."""


class DatasetWarning(UserWarning):
    """Usable, but worth knowing: upscaled photos, duplicates, too few or many photos, one background."""


def find_images(folder: str | Path) -> list[Path]:
    """Image files directly in folder (jpg/jpeg/png/webp, any case), sorted by name."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise DatasetError(f"{folder} is a file, not a folder: point data.instance_dir (or DATASET_DIR, --data) at the "
                           f"folder that holds the photos, e.g. {folder.resolve().parent}")
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
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def photo_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a photo as it stands upright (EXIF orientation applied), from its header
    alone: the size before any resizing or JPEG draft decoding (SDXL's original-size condition)."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


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


def check_count(folder: str | Path, paths: list[Path]) -> None:
    """Warn when there are fewer than MIN_PHOTOS or more than MAX_PHOTOS photos of the subject."""
    if len(paths) < MIN_PHOTOS:
        warnings.warn(f"only {len(paths)} photo(s) in {folder}: DreamBooth wants {MIN_PHOTOS}–{MAX_PHOTOS} photos of "
                      "the subject (different poses and backgrounds); with fewer the LoRA tends to copy them",
                      DatasetWarning, stacklevel=3)
    elif len(paths) > MAX_PHOTOS:
        warnings.warn(f"{len(paths)} photos in {folder}: DreamBooth is meant for {MIN_PHOTOS}–{MAX_PHOTOS} photos of "
                      "the subject; with more, each photo is seen only a few times in the usual 400–1500 steps. "
                      f"Keep the best {MAX_PHOTOS} (sharp, varied poses and backgrounds) or raise train.steps",
                      DatasetWarning, stacklevel=3)


def _fingerprint(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(256-bit difference hash, 16x16 RGB thumbnail) of a photo (pure)."""
    grey = np.asarray(im.convert("L").resize((17, 16), Image.Resampling.BILINEAR), dtype=np.int16)
    thumb = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    return (grey[:, 1:] > grey[:, :-1]).ravel(), thumb


def near_duplicates(names: list[str], images: list[Image.Image]) -> list[tuple[str, str, float]]:
    """Pairs of photos that are the same shot (identical, re-saved, resized, nudged, re-exposed):
    (name, name, fraction of hash bits that differ), in file order (pure)."""
    out = []
    for (a, (hash_a, thumb_a)), (b, (hash_b, thumb_b)) in combinations(zip(names, map(_fingerprint, images)), 2):
        bits = float(np.mean(hash_a != hash_b))
        if bits <= NEAR_DUPLICATE_BITS and float(np.abs(thumb_a - thumb_b).mean()) <= NEAR_DUPLICATE_COLOUR:
            out.append((a, b, bits))
    return out


def check_duplicates(paths: list[Path], images: list[Image.Image]) -> None:
    """Warn about photos that are the same picture or the same shot (see near_duplicates)."""
    found = near_duplicates([p.name for p in paths], images)
    found.sort(key=lambda pair: pair[2] > 0)  # identical pictures first, each group in file order
    pairs = [f"{a} {'≈' if bits else '='} {b}" for a, b, bits in found]
    if pairs:
        warnings.warn("duplicate or near-duplicate photos (the same shot weighs double in training and the LoRA "
                      "learns that pose; remove one of each): " + ", ".join(pairs), DatasetWarning, stacklevel=3)


def median_rows(x: np.ndarray) -> np.ndarray:
    """np.median(x, axis=0), the same values, without np.median's first-call import of numpy.ma
    (60 ms of every run's start-up on a CPU) (pure)."""
    s = np.sort(x, axis=0)
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def shared_background(images: list[Image.Image]) -> float | None:
    """How far the photos' borders are from their median border (0-255, the largest photo's mean
    difference); None for fewer than MIN_PHOTOS photos (pure). Small = one background for all."""
    if len(images) < MIN_PHOTOS:
        return None
    ring = np.ones((32, 32), dtype=bool)  # the outer 3 px of a 32x32 thumbnail
    ring[3:-3, 3:-3] = False
    rings = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR),
                                 dtype=np.float32)[ring] for im in images])
    return float(np.abs(rings - median_rows(rings)).mean(axis=(1, 2)).max())


def check_background(folder: str | Path, images: list[Image.Image]) -> None:
    """Warn when every photo has the same background (the subject cannot be told from it)."""
    spread = shared_background(images)
    if spread is not None and spread <= SHARED_BACKGROUND:
        warnings.warn(f"all {len(images)} photos in {folder} have the same background (their borders differ by "
                      f"{spread:.1f}/255 at most): the LoRA cannot tell the subject from the background and will "
                      "paint it into every picture. Add photos in other places (or crop tighter around the subject)",
                      DatasetWarning, stacklevel=3)


def caption_path(photo: str | Path) -> Path:
    """Where a photo's sidecar caption (data.captions: sidecar) lives: dog_01.jpg -> dog_01.txt."""
    return Path(photo).with_suffix(".txt")


def read_captions(paths: list[Path], token: str | None = None) -> list[str]:
    """Each photo's sidecar caption as written (placeholders {token} and {class} unfilled), on one
    line. Missing, empty or unreadable caption files, and captions that never name the subject
    ({token} or the token itself), are reported together in one error that names every file."""
    captions, bad = [], []
    for p in paths:
        f = caption_path(p)
        try:
            text = " ".join(f.read_text(encoding="utf-8").split())
        except FileNotFoundError:
            bad.append(f"{f}: missing (the caption of {p.name})")
            continue
        except (OSError, UnicodeDecodeError) as exc:
            bad.append(f"{f}: cannot be read as UTF-8 text ({exc.__class__.__name__})")
            continue
        if not text:
            bad.append(f"{f}: empty")
        elif token and "{token}" not in text and not re.search(rf"(?<!\S){re.escape(token)}(?!\S)", text):
            bad.append(f"{f}: {text!r} never names the subject: write {{token}} where it is named")
        captions.append(text)
    if bad:
        raise DatasetError(
            f"{len(bad)} caption file(s) are not usable with data.captions: sidecar — write one caption per photo "
            "in <photo name>.txt, e.g. 'a photo of {token} {class} on the beach' (or set data.captions: none to "
            "train every photo on data.instance_prompt):\n  " + "\n  ".join(bad))
    return captions


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
        import torch

        left = int(torch.randint(0, w - resolution + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=gen))
    return left, top, left + resolution, top + resolution


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 image to CHW float in [-1, 1], the range the VAE expects."""
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class ImageSet:
    """Images resized once; crops and flips happen per example."""

    paths: list[Path]
    images: list[Image.Image]
    resolution: int
    original_sizes: list[tuple[int, int]] | None = None  # (width, height) of each file, upright
    captions: list[str] | None = None  # data.captions: sidecar -- each photo's caption template

    @classmethod
    def from_paths(cls, paths: list[Path], resolution: int, check: bool = False) -> "ImageSet":
        originals = load_images(paths, target=resolution)
        if check:
            check_sizes(paths, originals, resolution)
            check_duplicates(paths, originals)
            check_background(Path(paths[0]).parent if paths else "", originals)
        return cls(list(paths), [resize_shorter_side(im, resolution) for im in originals], resolution,
                   [photo_size(p) for p in paths])

    def original_size(self, index: int) -> tuple[int, int]:
        """(width, height) of photo `index` before it was resized."""
        return self.original_sizes[index] if self.original_sizes else self.images[index].size

    @classmethod
    def from_folder(cls, folder: str | Path, resolution: int, check: bool = True, captions: str = "none",
                    token: str | None = None) -> "ImageSet":
        """The subject's photos, with count, size, duplicate and background checks (class images skip them);
        with captions="sidecar", each photo's caption from <stem>.txt (read_captions)."""
        paths = find_images(folder)
        texts = read_captions(paths, token) if captions == "sidecar" else None  # fails before the photos load
        if check:
            check_count(folder, paths)
        return replace(cls.from_paths(paths, resolution, check=check), captions=texts)

    def label(self, index: int) -> str:
        """How sheets name photo `index`: its file name, and its caption when it has one."""
        name = self.paths[index].name
        return f"{name}\n{self.captions[index]}" if self.captions else name

    @property
    def labels(self) -> list[str]:
        """Every photo's label, in order (what the dataset sheet's cache key holds)."""
        return [self.label(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.images)

    def example(self, index: int, *, center_crop: bool, flip: bool, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.crop(index, crop_box(self.images[index].size, self.resolution, center_crop, gen), flip)

    def crop(self, index: int, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        img = self.images[index].crop(box)
        return to_tensor(ImageOps.mirror(img) if flip else img)


def indices_for_step(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Which examples step `step` sees (pure): epochs laid end to end, each a fresh permutation seeded
    by (seed, epoch number), so each photo is seen equally often (resume: see the module's docstring)."""
    import torch

    out = []
    for j in range(batch_size):
        epoch, offset = divmod(step * batch_size + j, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63))
        out.append(int(perm[offset]))
    return out
