"""Where the toy world's committed base model lives, and what names it in cache keys."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

WEIGHTS = Path(__file__).parent.parent / "world" / "weights"  # shipped in the package, beside world/
TOYWORLD_DIR = WEIGHTS / "toyworld"
ENV = "DREAMBOOTH_LAB_TOYWORLD"  # a pipeline folder to use instead (e.g. a build snapshot)


def toyworld_dir() -> Path:
    """The toyworld pipeline folder: $DREAMBOOTH_LAB_TOYWORLD, else the one shipped in the package."""
    env = os.environ.get(ENV)
    folder = Path(env).expanduser() if env else TOYWORLD_DIR
    if not (folder / "model_index.json").is_file():
        where = f"${ENV}={env}" if env else str(folder)
        raise FileNotFoundError(
            f"model 'toyworld': {where} has no model_index.json. Build it with "
            "`python -m dreambooth_lab.world.build` then export it with "
            f"`python -m dreambooth_lab.world.build --export {TOYWORLD_DIR}` (or set {ENV} to a build snapshot)")
    return folder


@lru_cache(maxsize=8)
def _digest(unet_file: str, mtime: float) -> str:
    return hashlib.sha256(Path(unet_file).read_bytes()).hexdigest()[:12]


def toyworld_key() -> str:
    """'toyworld-<digest of the UNet weights>': class-image caches never mix two builds."""
    f = toyworld_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    return f"toyworld-{_digest(str(f), f.stat().st_mtime)}"
