"""The user cache folder, and folders built in it once, atomically (models, class images, subjects)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .files import follow_umask


def cache_root() -> Path:
    """User cache folder (``DREAMBOOTH_LAB_CACHE`` or ``~/.cache/dreambooth_lab``)."""
    env = os.environ.get("DREAMBOOTH_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreambooth_lab"


def build_once(folder: Path, build, marker: str = "config.json") -> Path:
    """Run build(tmp) in a temporary folder beside `folder`, then rename it into place; a folder
    that already holds `marker` is reused (another process may have finished first)."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        build(tmp / "out")
        follow_umask(tmp / "out")
        try:
            os.replace(tmp / "out", folder)
        except OSError:
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
