"""dataset.png, the photos of a run as training sees them: drawn by viz.dataset_sheet, or copied
from a cache of sheets already drawn for the same photos and parameters."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from . import files
from .cache import cache_root
from .config import DataConfig
from .data import ImageSet

DATASET_SHEET_VERSION = 1  # part of the sheet cache's key: bump when viz.dataset_sheet draws differently


def sheet_cache_dir() -> Path:
    return cache_root() / "dataset_sheets"


def write_dataset_sheet(data: DataConfig, resolution: int, instance: ImageSet, dataset_digest: str,
                        path: Path) -> Path:
    """dataset.png: the photos as training sees them (viz.dataset_sheet). Runs on the same photos with
    the same labels, title and parameters (a sweep, a world study, a notebook run again) get a copy of
    the first one's sheet from `<cache>/dataset_sheets/` (keyed by all of these and matplotlib's
    version) instead of importing matplotlib and drawing it again: half a second of every start-up.
    Filling that cache is best effort; the run folder's copy is written like any other file."""
    title = f"{len(instance)} photos in {data.instance_dir}"
    params = {"resolution": resolution, "token": data.token, "class": data.class_name}
    try:
        mpl = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        mpl = None
    key = hashlib.sha256(json.dumps({
        "version": DATASET_SHEET_VERSION, "matplotlib": mpl, "dataset": dataset_digest, "title": title,
        "params": params, "resolution": instance.resolution,
        "labels": instance.labels,
    }, sort_keys=True).encode()).hexdigest()[:24]
    cached = sheet_cache_dir() / f"{key}.png"
    try:
        data_bytes = cached.read_bytes()
    except OSError:
        data_bytes = None
    if data_bytes:
        return files.atomic_write(path, lambda tmp: tmp.write_bytes(data_bytes))
    from .viz import dataset_sheet  # matplotlib: only when a sheet is drawn

    dataset_sheet(instance, path, title=title, params=params)
    try:
        drawn = path.read_bytes()
        files.atomic_write(cached, lambda tmp: tmp.write_bytes(drawn))
    except OSError:  # a full or read-only cache: the next run draws its own
        pass
    return path
