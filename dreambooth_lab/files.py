"""Atomic writes and never-overwriting folders: a kill never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside path, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_image(path: str | Path, image) -> Path:
    """Save a PIL image; the format comes from the real suffix, not the temp name."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG")
    return atomic_write(path, lambda t: image.save(t, format=fmt))


def save_figure(path: str | Path, fig) -> Path:
    return atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=fig.dpi, bbox_inches="tight"))


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def new_dir(parent: str | Path, name: str) -> Path:
    """Create parent/name-<timestamp> (with -2, -3... on a clash); never reuse a folder."""
    parent = Path(parent).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: choose another train.output_dir (OUTPUT_DIR)")
    base = f"{name}-{timestamp()}"
    for i in range(1, 1000):
        path = parent / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new folder for {base} in {parent}")
