"""Seed grids of the toy world: one labelled row of pictures per prompt."""

from __future__ import annotations

import textwrap
from pathlib import Path


def seed_grid(rows: dict, path: str | Path, cell: int = 64, per_row: int = 8, label_width: int = 330) -> Path:
    """rows = {label: [PIL images]}; writes a PNG with the label left of each row; returns its path."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (label_width + cell * per_row, cell * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(img)
    for i, (label, ims) in enumerate(rows.items()):
        lines = textwrap.wrap(str(label), 52)[: max(1, cell // 12)]  # the whole label, wrapped
        top = i * cell + (cell - 12 * len(lines)) // 2
        for k, line in enumerate(lines):
            draw.text((4, top + 12 * k), line, fill=(0, 0, 0))
        for j, im in enumerate(list(ims)[:per_row]):
            img.paste(im.convert("RGB").resize((cell, cell)), (label_width + j * cell, i * cell))
    img.save(path, optimize=True)
    return path
