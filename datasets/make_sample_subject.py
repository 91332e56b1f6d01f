"""Draw a small synthetic DreamBooth "subject" dataset, deterministically.

Subject: a toy "mug robot" (red/yellow striped mug body, red handle, cartoon eyes, blue antenna
ball, blue star on a white badge) on varied backgrounds -- floor + wall, grass + sky, table,
checkerboard, gradient, beach -- at varied positions/scales, tilted in some: like a few photos of
one object. Usage: python datasets/make_sample_subject.py [--out DIR] [--n 6] [--size 256] [--seed 0]
writes DIR/subject_00.jpg ... (JPEG q90), byte-for-byte deterministic for the same arguments and
Pillow/libjpeg build; randomness comes only from numpy.random.default_rng([seed, index]).

EXIF case: image EXIF_INDEX (grass + sky) is stored with its pixels rotated 90 deg CCW (sky on the
LEFT) and tagged EXIF Orientation = 6 ("rotate 90 CW to display"), so a viewer or
PIL.ImageOps.exif_transpose shows it upright (sky on top): a real EXIF case for the package's
loader. make_images returns it in stored form, with the EXIF bytes in img.info["exif"].
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

EXIF_INDEX = 1  # which image is stored rotated + tagged with EXIF orientation 6
ORIENTATION_TAG = 0x0112
RED, YELLOW, BLUE, INK = (215, 30, 40), (250, 205, 35), (30, 75, 215), (35, 25, 30)


def _star(cx, cy, r_out, r_in):
    """Vertices of a five-pointed star, first point straight up."""
    return [(cx + (r_out if k % 2 == 0 else r_in) * math.sin(k * math.pi / 5),
             cy - (r_out if k % 2 == 0 else r_in) * math.cos(k * math.pi / 5)) for k in range(10)]


def draw_subject(ss: int = 4) -> Image.Image:
    """The subject on a transparent 100x120-unit canvas, `ss` pixels per unit.

    Callers draw it larger than needed and downscale: that is the anti-aliasing."""
    W, H, u = 100 * ss, 120 * ss, ss
    img = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    # Handle first, so the body covers its inner end.
    d.ellipse([62 * u, 45 * u, 96 * u, 92 * u], outline=INK, width=11 * u)
    d.ellipse([63 * u, 46 * u, 95 * u, 91 * u], outline=RED, width=7 * u)
    # Antenna with a blue ball: a second, small recognisable cue.
    d.line([45 * u, 30 * u, 45 * u, 12 * u], fill=INK, width=3 * u)
    d.ellipse([38 * u, 3 * u, 52 * u, 17 * u], fill=BLUE, outline=INK, width=u)
    # Feet.
    for x in (22, 56):
        d.rounded_rectangle([x * u, 104 * u, (x + 12) * u, 116 * u], 3 * u, fill=INK)
    # Body: stripes clipped to a rounded-rectangle mask, then an ink outline.
    box = [14 * u, 28 * u, 76 * u, 108 * u]
    stripes = Image.new("RGBA", (W, H))
    sd = ImageDraw.Draw(stripes)
    for k, y in enumerate(range(28, 108, 10)):
        sd.rectangle([0, y * u, W, (y + 10) * u], fill=RED if k % 2 == 0 else YELLOW)
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).rounded_rectangle(box, 9 * u, fill=255)
    img.paste(stripes, (0, 0), mask)
    d.rounded_rectangle(box, 9 * u, outline=INK, width=2 * u)
    # Eyes.
    for x in (34, 56):
        d.ellipse([(x - 7) * u, 36 * u, (x + 7) * u, 50 * u], fill="white", outline=INK, width=u)
        d.ellipse([(x - 3) * u, 41 * u, (x + 3) * u, 47 * u], fill=INK)
    # The emblem: blue star on a white badge -- the most distinctive feature.
    d.ellipse([26 * u, 58 * u, 64 * u, 96 * u], fill="white", outline=INK, width=u)
    d.polygon(_star(45 * u, 78 * u, 17 * u, 7 * u), fill=BLUE, outline=INK)
    return img


def _lerp(c0, c1, t):
    t = np.clip(t, 0.0, 1.0)
    return (1 - t) * np.array(c0, float) + t * np.array(c1, float)


def _scene(s, hy, top, top2, ground, ground2):
    """s x s float RGB: gradient top->top2 above row hy, ground->ground2 from hy down."""
    y = np.arange(s, dtype=float)[:, None, None]
    a = np.where(y < hy, _lerp(top, top2, y / hy), _lerp(ground, ground2, (y - hy) / (s - hy)))
    return np.broadcast_to(a, (s, s, 3)).copy()


def draw_background(kind: int, size: int, rng) -> tuple[Image.Image, float]:
    """One of six simple scenes; returns (image, y of the "ground" line as a fraction)."""
    s, horizon = size, float(rng.uniform(0.5, 0.65))
    hy = int(horizon * s)

    def j(color, amt=25):  # randomly jittered colour, so repeated scene kinds still differ
        return tuple(int(c) for c in np.clip(np.array(color) + rng.integers(-amt, amt + 1, 3), 0, 255))

    if kind == 0:  # floor + wall, with a white skirting board
        a = _scene(s, hy, j((225, 215, 195)), j((190, 180, 160)), j((140, 100, 70)), (90, 60, 40))
        a[hy - s // 40:hy] = 245
    elif kind == 1:  # grass + sky (the EXIF one: tests check sky stays blue, grass green)
        a = _scene(s, hy, j((70, 130, 225), 15), (170, 210, 245), j((90, 170, 60), 15), (40, 110, 30))
    elif kind == 2:  # wooden table top in front of a plain wall, with wavy grain
        a = _scene(s, hy, j((200, 215, 225)), (160, 175, 190), j((170, 115, 60)), (120, 75, 35))
        a[hy:] += 12 * np.sin(np.linspace(0, rng.uniform(20, 40), s))[hy:, None, None]
    elif kind == 3:  # checkerboard in two random pastel colours
        cell = max(4, s // int(rng.integers(5, 10)))
        yy, xx = np.mgrid[0:s, 0:s] // cell
        a = np.where(((yy + xx) % 2 == 0)[..., None], j((235, 235, 235), 20), j((150, 190, 170), 60)).astype(float)
    elif kind == 4:  # diagonal two-colour gradient (studio backdrop)
        t = (np.add.outer(np.arange(s), np.arange(s)) / (2 * s - 2))[..., None]
        a = _lerp(j((240, 180, 200), 40), j((120, 90, 170), 40), t)
    else:  # beach: sky, a band of sea, sand
        a = _scene(s, hy, j((120, 180, 235), 15), (200, 230, 250), j((235, 215, 160)), (210, 185, 130))
        a[hy - s // 10:hy] = j((30, 110, 160), 15)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    if kind in (1, 5):  # a sun in the sky for the outdoor scenes
        r, cx = s * 0.06, s * rng.uniform(0.1, 0.9)
        ImageDraw.Draw(img).ellipse([cx - r, s * 0.08, cx + r, s * 0.08 + 2 * r], fill=(255, 240, 150))
    return img, horizon


def make_image(index: int, size: int = 256, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng([seed, index])  # per-image stream: image i independent of n
    bg, horizon = draw_background(index % 6, size, rng)
    h = int(size * rng.uniform(0.45, 0.75))  # varied scale
    subj = draw_subject(ss=max(2, math.ceil(2 * h / 120)))  # >= 2x oversampled for any --size
    subj = subj.resize((max(1, h * subj.width // subj.height), h), Image.LANCZOS)
    if index % 3 == 2:  # slight tilt in some pictures
        subj = subj.rotate(float(rng.uniform(8, 15) * rng.choice([-1, 1])), Image.BICUBIC, expand=True)
    # Varied position, but the subject stays inside a 5% margin (tests rely on clean edges).
    m = int(0.05 * size)
    x = int(rng.integers(m, max(m + 1, size - m - subj.width)))
    y = int(np.clip(horizon * size + rng.uniform(0.0, 0.25) * size - subj.height, m, size - m - subj.height))
    shadow = Image.new("L", bg.size, 0)  # soft contact shadow so it "stands" on the ground
    ImageDraw.Draw(shadow).ellipse([x + subj.width * 0.1, y + subj.height * 0.93,
                                    x + subj.width * 0.8, y + subj.height * 0.99], fill=90)
    bg.paste((20, 20, 20), (0, 0), shadow)
    bg.paste(subj, (x, y), subj)
    if index == EXIF_INDEX:
        # Store rotated 90 deg CCW and tag Orientation=6 (display = rotate 90 CW) => upright.
        bg = bg.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = 6
        bg.info["exif"] = exif.tobytes()
    return bg


def make_images(n: int = 6, size: int = 256, seed: int = 0) -> list[Image.Image]:
    return [make_image(i, size, seed) for i in range(n)]


def save_jpeg_atomic(img: Image.Image, path: Path) -> None:
    """Write to a temp file in the same folder, then os.replace: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, "JPEG", quality=90, exif=img.info.get("exif", b""))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; dataset files should be world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "sample_subject"),
                   help="output folder (default: sample_subject/ next to this script)")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(make_images(args.n, args.size, args.seed)):
        save_jpeg_atomic(img, out / f"subject_{i:02d}.jpg")
    print(f"wrote {args.n} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
