"""Pixels of a scene: backgrounds, the five classes, t-shirt, cap, car and the van Gogh filter.

Drawn at twice the output size with PIL and reduced with a box filter (cheap antialiasing).
Coordinates are fractions of the canvas; a subject faces right and is mirrored for facing=-1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .scene import MERGED, Scene

RED = (210, 30, 30)
LIME = (120, 230, 0)
SUPERSAMPLE = 2


def _shade(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


# ---- backgrounds -------------------------------------------------------------------------------

def _background(d: ImageDraw.ImageDraw, S: int, context: str, rng: np.random.Generator) -> None:
    # scene.SURROUNDINGS names the large areas' colours for the contrast rule (tested to match)
    def rect(x0, y0, x1, y1, fill):
        d.rectangle([x0 * S, y0 * S, x1 * S, y1 * S], fill=fill)

    if context == "plain":
        g = int(rng.integers(200, 240))
        rect(0, 0, 1, 1, (g, g - int(rng.integers(0, 12)), g - int(rng.integers(0, 20))))
    elif context == "room":
        rect(0, 0, 1, 0.62, (225, 205, 165))
        rect(0, 0.62, 1, 1, (150, 95, 55))
        for y in (0.72, 0.84, 0.96):
            d.line([0, y * S, S, y * S], fill=(120, 75, 40), width=max(1, S // 64))
        wx = float(rng.uniform(0.05, 0.65))
        rect(wx, 0.1, wx + 0.28, 0.42, (110, 75, 45))
        rect(wx + 0.02, 0.12, wx + 0.26, 0.40, (170, 215, 240))
    elif context == "forest":
        rect(0, 0, 1, 1, (150, 200, 150))
        rect(0, 0.62, 1, 1, (70, 120, 45))
        for _ in range(5):
            tx = float(rng.uniform(0, 1))
            rect(tx - 0.03, 0.25, tx + 0.03, 0.66, (95, 60, 30))
            d.polygon([((tx - 0.16) * S, 0.45 * S), (tx * S, 0.0), ((tx + 0.16) * S, 0.45 * S)], fill=(20, 90, 35))
    elif context == "beach":
        rect(0, 0, 1, 0.42, (120, 190, 240))
        rect(0, 0.42, 1, 0.58, (20, 90, 180))
        rect(0, 0.58, 1, 1, (240, 215, 150))
        sx = float(rng.uniform(0.1, 0.9))
        d.ellipse([(sx - 0.06) * S, 0.06 * S, (sx + 0.06) * S, 0.18 * S], fill=(255, 220, 60))
    elif context == "snow":
        rect(0, 0, 1, 0.55, (200, 215, 235))
        rect(0, 0.55, 1, 1, (250, 250, 252))
        for _ in range(3):
            tx = float(rng.uniform(0, 1))
            d.polygon([((tx - 0.09) * S, 0.58 * S), (tx * S, 0.22 * S), ((tx + 0.09) * S, 0.58 * S)],
                      fill=(60, 110, 90))
            d.polygon([((tx - 0.05) * S, 0.36 * S), (tx * S, 0.22 * S), ((tx + 0.05) * S, 0.36 * S)],
                      fill=(250, 250, 252))
        for _ in range(25):
            px, py = rng.uniform(0, 1, 2)
            r = S / 120
            d.ellipse([px * S - r, py * 0.55 * S - r, px * S + r, py * 0.55 * S + r], fill=(255, 255, 255))
    elif context == "city":
        rect(0, 0, 1, 1, (175, 190, 205))
        x = -0.05
        while x < 1:
            w = float(rng.uniform(0.14, 0.24))
            top = float(rng.uniform(0.12, 0.4))
            grey = int(rng.integers(70, 120))
            rect(x, top, x + w - 0.015, 0.7, (grey, grey, grey + 8))
            for wy in np.arange(top + 0.04, 0.64, 0.08):
                for wx in np.arange(x + 0.03, x + w - 0.05, 0.06):
                    rect(wx, wy, wx + 0.025, wy + 0.03, (250, 220, 90))
            x += w
        rect(0, 0.7, 1, 1, (60, 60, 65))
        rect(0, 0.84, 1, 0.86, (240, 240, 240))
    else:
        raise ValueError(f"unknown context {context!r}; expected one of plain, room, forest, beach, snow, city")


# ---- subjects ----------------------------------------------------------------------------------

class _Pen:
    """Draws in subject coordinates: origin at the feet centre, unit = nominal subject height."""

    def __init__(self, d: ImageDraw.ImageDraw, S: int, scene: Scene, unit: float):
        self.d, self.S, self.sc = d, S, scene
        self.u = unit * scene.size * S
        self.ox, self.oy = scene.x * S, scene.ground * S

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.ox + self.sc.facing * x * self.u, self.oy - y * self.u)

    def box(self, cx, cy, rx, ry):
        (x0, y0), (x1, y1) = self.p(cx - rx, cy + ry), self.p(cx + rx, cy - ry)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def ellipse(self, cx, cy, rx, ry, fill):
        self.d.ellipse(self.box(cx, cy, rx, ry), fill=fill)

    def rect(self, cx, cy, rx, ry, fill, radius: float = 0.0):
        if radius:
            self.d.rounded_rectangle(self.box(cx, cy, rx, ry), radius=radius * self.u, fill=fill)
        else:
            self.d.rectangle(self.box(cx, cy, rx, ry), fill=fill)

    def poly(self, pts, fill):
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def line(self, pts, fill, width: float):
        self.d.line([self.p(x, y) for x, y in pts], fill=fill, width=max(1, int(width * self.u)))


def _marking(pen: _Pen, sc: Scene, cx: float, cy: float, rx: float, ry: float) -> None:
    """The body marking, drawn over the body ellipse/box centred at (cx, cy)."""
    if sc.marking == "patch":
        pen.ellipse(cx + 0.25 * rx, cy + 0.2 * ry, 0.38 * rx, 0.42 * ry, _shade(sc.body, 0.6))
    elif sc.marking == "belly":
        pen.ellipse(cx, cy - 0.45 * ry, 0.7 * rx, 0.4 * ry, _shade(sc.body, 1.35) if sum(sc.body) < 600 else (200, 190, 170))
    elif sc.marking == "dots":
        r = 0.085
        for fx, fy in ((-0.55, 0.25), (0.0, 0.45), (0.55, 0.2), (-0.25, -0.35), (0.3, -0.35)):
            pen.ellipse(cx + fx * rx, cy + fy * ry, r, r, sc.marking_colour)
    elif sc.marking == MERGED:  # a near miss, never in the base world: the marking's colour as one patch
        pen.ellipse(cx, cy + 0.05 * ry, 0.62 * rx, 0.5 * ry, sc.marking_colour)
    elif sc.marking == "stripes":
        w = 0.07
        for fx in (-0.6, -0.2, 0.2, 0.6):
            x = cx + fx * rx
            pen.poly([(x - w, cy - 0.8 * ry), (x + w, cy - 0.8 * ry), (x + w + 0.12, cy + 0.8 * ry),
                      (x - w + 0.12, cy + 0.8 * ry)], sc.marking_colour)


def _cap(pen: _Pen, hx: float, hy: float, r: float) -> None:
    pen.ellipse(hx, hy + 0.7 * r, 0.85 * r, 0.5 * r, LIME)
    pen.rect(hx + 0.6 * r, hy + 0.45 * r, 0.6 * r, 0.1 * r, LIME)


def _dog_or_cat(pen: _Pen, sc: Scene) -> None:
    cat = sc.cls == "cat"
    body, dark = sc.body, _shade(sc.body, 0.55)
    bl, bh = (0.34, 0.16) if cat else (0.42, 0.2)  # body half-length, half-height
    leg_h, leg_w = (0.26, 0.045) if cat else (0.3, 0.06)
    by = leg_h + bh * 0.7
    # tail first (behind the body)
    if cat:
        tail = [(-bl, by), (-bl - 0.15, by + 0.15), (-bl - 0.12, by + 0.42)] if sc.tail == "up" else \
            [(-bl, by), (-bl - 0.22, by - 0.1), (-bl - 0.3, by - 0.2)]
        pen.line(tail, body, 0.06)
    else:
        tail = [(-bl + 0.05, by + 0.05), (-bl - 0.15, by + 0.3)] if sc.tail == "up" else \
            [(-bl + 0.05, by), (-bl - 0.18, by - 0.2)]
        pen.line(tail, body, 0.08)
    for lx in (-bl + 0.08, -bl + 0.2, bl - 0.2, bl - 0.08):
        pen.rect(lx, leg_h / 2, leg_w, leg_h / 2 + 0.02, body if lx > -bl + 0.1 and lx < bl - 0.1 else _shade(body, 0.9))
    pen.ellipse(0, by, bl, bh, body)
    _marking(pen, sc, 0, by, bl, bh)
    if sc.outfit:
        # over the chest, so that the marking still shows behind it (four of the five dots)
        pen.rect(bl * 0.74, by + 0.02, bl * 0.29, bh * 0.95, RED, radius=0.05)
        pen.rect(bl * 0.8, by - 0.08, 0.07, 0.09, RED)
    hr = 0.15 if cat else 0.17
    hx, hy = bl + 0.02, by + bh + 0.06
    if sc.ears == "pointy":
        for ex in (-0.09, 0.07):
            pen.poly([(hx + ex - 0.06, hy + 0.08), (hx + ex, hy + 0.26), (hx + ex + 0.06, hy + 0.08)], body)
    elif sc.ears == "upright":
        for ex in (-0.08, 0.06):
            pen.ellipse(hx + ex, hy + 0.17, 0.05, 0.1, dark)
    pen.ellipse(hx, hy, hr, hr, body)
    if sc.ears == "floppy":
        pen.ellipse(hx - 0.11, hy - 0.02, 0.06, 0.13, dark)
    snout = 0.08 if cat else 0.11
    pen.ellipse(hx + hr * 0.8, hy - 0.05, snout, snout * 0.7, _shade(body, 1.1) if sum(body) < 600 else (225, 215, 200))
    pen.ellipse(hx + hr * 0.8 + snout * 0.8, hy - 0.03, 0.03, 0.025, (20, 20, 20))
    pen.ellipse(hx + 0.05, hy + 0.05, 0.025, 0.025, (15, 15, 15))
    if cat:
        for dy in (-0.02, -0.07):
            pen.line([(hx + hr * 0.9, hy + dy), (hx + hr + 0.15, hy + dy + 0.02)], (30, 30, 30), 0.012)
    if sc.http:
        _cap(pen, hx, hy, hr)


def _toy(pen: _Pen, sc: Scene) -> None:
    body = sc.body
    pen.ellipse(-0.13, 0.08, 0.09, 0.08, _shade(body, 0.85))
    pen.ellipse(0.13, 0.08, 0.09, 0.08, _shade(body, 0.85))
    pen.ellipse(0, 0.3, 0.2, 0.22, body)
    _marking(pen, sc, 0, 0.3, 0.2, 0.22)
    if sc.outfit:
        pen.rect(0, 0.33, 0.2, 0.16, RED, radius=0.05)
    for sx in (-1, 1):
        pen.ellipse(sx * 0.22, 0.36, 0.07, 0.09, _shade(body, 0.85))
    for sx in (-1, 1):
        pen.ellipse(sx * 0.13, 0.8, 0.07, 0.07, body)
        pen.ellipse(sx * 0.13, 0.8, 0.035, 0.035, _shade(body, 0.6))
    pen.ellipse(0, 0.64, 0.17, 0.16, body)
    pen.ellipse(0, 0.59, 0.07, 0.055, (235, 220, 195))
    pen.ellipse(0, 0.61, 0.025, 0.02, (20, 20, 20))
    for sx in (-1, 1):
        pen.ellipse(sx * 0.06, 0.68, 0.022, 0.022, (15, 15, 15))
    if sc.http:
        _cap(pen, 0, 0.66, 0.17)


def _backpack(pen: _Pen, sc: Scene) -> None:
    body = sc.body
    pen.line([(-0.12, 0.62), (0, 0.74), (0.12, 0.62)], _shade(body, 0.6), 0.04)
    pen.rect(0, 0.33, 0.22, 0.31, body, radius=0.08)
    pen.rect(0, 0.18, 0.16, 0.11, _shade(body, 0.75), radius=0.04)
    _marking(pen, sc, 0, 0.36, 0.22, 0.26)
    pen.line([(-0.16, 0.29), (0.16, 0.29)], (30, 30, 30), 0.015)
    for sx in (-1, 1):
        pen.rect(sx * 0.2, 0.36, 0.025, 0.24, _shade(body, 0.6))
    if sc.outfit:
        pen.rect(0, 0.45, 0.22, 0.07, RED)


def _vase(pen: _Pen, sc: Scene) -> None:
    body = sc.body
    pen.ellipse(0, 0.25, 0.2, 0.25, body)
    pen.rect(0, 0.55, 0.08, 0.12, body)
    pen.rect(0, 0.67, 0.12, 0.03, _shade(body, 0.8))
    _marking(pen, sc, 0, 0.25, 0.17, 0.2)
    if sc.outfit:
        pen.rect(0, 0.3, 0.2, 0.06, RED)


def _car(pen: _Pen, sc: Scene) -> None:
    """A car around the subject's lower half, drawn after the subject."""
    c = sc.car_colour
    pen.rect(0.05, 0.3, 0.62, 0.16, c, radius=0.08)
    pen.rect(0.42, 0.5, 0.04, 0.1, (170, 220, 250))
    for wx in (-0.35, 0.42):
        pen.ellipse(wx, 0.12, 0.13, 0.13, (25, 25, 25))
        pen.ellipse(wx, 0.12, 0.05, 0.05, (180, 180, 180))
    pen.ellipse(0.62, 0.34, 0.04, 0.035, (255, 240, 150))


DRAW = {"dog": _dog_or_cat, "cat": _dog_or_cat, "toy": _toy, "backpack": _backpack, "vase": _vase}


# ---- van Gogh ---------------------------------------------------------------------------------

def van_gogh(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Swirled, stroked, saturated: the world's "in the style of van gogh"."""
    a = np.asarray(img, dtype=np.float32)
    H, W = a.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, 4)
    amp = H / 90
    sx = xx + amp * np.sin(yy / H * 2 * np.pi * 3 + ph[0]) + amp * np.sin((xx + yy) / H * 2 * np.pi * 2 + ph[1])
    sy = yy + amp * np.cos(xx / W * 2 * np.pi * 3 + ph[2]) + amp * np.sin((xx - yy) / W * 2 * np.pi * 2 + ph[3])
    sx = np.clip(np.round(sx), 0, W - 1).astype(int)
    sy = np.clip(np.round(sy), 0, H - 1).astype(int)
    a = a[sy, sx]
    # strokes: short lines along a swirling field, coloured from the picture, bright or dark
    out = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(out)
    L = H / 22
    for _ in range(140):
        x, y = rng.uniform(0, W), rng.uniform(0, H)
        ang = np.sin(x / W * 6 + ph[0]) * 2 + np.cos(y / H * 6 + ph[1]) * 2
        col = a[int(y), int(x)] * rng.choice([0.75, 1.25])
        dx, dy = np.cos(ang) * L, np.sin(ang) * L
        d.line([x - dx, y - dy, x + dx, y + dy], fill=tuple(int(v) for v in np.clip(col, 0, 255)), width=max(1, H // 40))
    a = np.asarray(out, dtype=np.float32)
    grey = a.mean(axis=2, keepdims=True)
    a = grey + (a - grey) * 1.5  # saturate
    a = a * np.array([1.0, 0.97, 0.8]) + np.array([0, 0, 40]) * (grey < 110)  # yellow lights, blue shadows
    a = np.round(np.clip(a, 0, 255) / 32) * 32  # posterise: paint, not photo
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# ---- the whole scene -----------------------------------------------------------------------------

def render(scene: Scene, size: int = 64, thing: bool = True) -> Image.Image:
    """The scene as an RGB image of size x size pixels (deterministic); with `thing` False, its
    background (and style) alone, the same pixels where the thing and its car are not."""
    S = size * SUPERSAMPLE
    img = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(scene.detail_seed)
    _background(d, S, scene.context, rng)
    if thing and scene.driving:
        lifted = _lift(scene)
        DRAW[scene.cls](_Pen(d, S, lifted, 0.55), lifted)
        _car(_Pen(d, S, scene, 0.55), scene)
    elif thing:
        DRAW[scene.cls](_Pen(d, S, scene, 0.55), scene)
    if scene.style:
        img = van_gogh(img, rng)
    return img.resize((size, size), Image.BOX)


def _lift(scene: Scene) -> Scene:
    from dataclasses import replace

    return replace(scene, ground=scene.ground - 0.14 * scene.size, x=scene.x - 0.03 * scene.facing)
