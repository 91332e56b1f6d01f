"""Tests for datasets/make_sample_subject.py and the committed datasets/sample_subject/ images."""
from __future__ import annotations

import importlib.util
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
SCRIPT = DATASETS / "make_sample_subject.py"
COMMITTED = DATASETS / "sample_subject"
DEFAULT_NAMES = [f"subject_{i:02d}.jpg" for i in range(6)]


@pytest.fixture(scope="module")
def mss():
    spec = importlib.util.spec_from_file_location("make_sample_subject", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _upright(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return _pixels(ImageOps.exif_transpose(im))


def _is_sky(rgb) -> bool:
    r, g, b = rgb
    return b > r + 60 and b > g + 40


def _is_grass(rgb) -> bool:
    r, g, b = rgb
    return g > r + 30 and g > b + 30


def test_make_images_is_deterministic(mss):
    a, b = mss.make_images(6, 96, 5), mss.make_images(6, 96, 5)
    for x, y in zip(a, b):
        assert np.array_equal(_pixels(x), _pixels(y))
        assert x.info.get("exif") == y.info.get("exif")
    # Per-image RNG streams: a shorter run is a prefix of a longer one.
    for x, y in zip(mss.make_images(3, 96, 5), a):
        assert np.array_equal(_pixels(x), _pixels(y))
    # A different seed gives different pictures.
    assert not np.array_equal(_pixels(mss.make_images(1, 96, 6)[0]), _pixels(a[0]))


def test_main_writes_identical_bytes_twice(mss, tmp_path):
    for d in ("a", "b"):
        assert mss.main(["--out", str(tmp_path / d), "--n", "3", "--size", "128", "--seed", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"subject_{i:02d}.jpg" for i in range(3)]  # no temp files left behind
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_committed_files_match_script_defaults(mss, tmp_path):
    assert sorted(p.name for p in COMMITTED.iterdir()) == DEFAULT_NAMES
    mss.main(["--out", str(tmp_path)])
    for name in DEFAULT_NAMES:
        committed, fresh = COMMITTED / name, tmp_path / name
        with Image.open(committed) as c, Image.open(fresh) as f:
            # JPEG bytes depend on the libjpeg build, so compare decoded pixels with a tolerance.
            diff = np.abs(_pixels(c).astype(int) - _pixels(f).astype(int)).mean()
            assert diff < 2.0, f"{name}: pixels differ (mean {diff:.2f}); rerun the script"
        assert committed.stat().st_size < 40_000


@pytest.mark.parametrize("n,size", [(6, 256), (2, 64), (8, 160)])
def test_count_and_size(mss, n, size):
    images = mss.make_images(n, size, 0)
    assert len(images) == n
    for img in images:
        assert img.mode == "RGB" and img.size == (size, size)


def test_images_are_not_all_alike():
    upright = [_upright(COMMITTED / name) for name in DEFAULT_NAMES]
    for (i, a), (j, b) in combinations(enumerate(upright), 2):
        assert np.abs(a - b).mean() > 15, f"subject_{i:02d} and subject_{j:02d} look too alike"


def test_exif_orientation_case(mss):
    path = COMMITTED / f"subject_{mss.EXIF_INDEX:02d}.jpg"
    with Image.open(path) as im:
        assert im.getexif().get(mss.ORIENTATION_TAG) == 6
        stored = _pixels(im)
    # Stored pixels are rotated 90 deg CCW: sky on the left edge, grass on the right edge.
    assert _is_sky(stored[:, :8].mean(axis=(0, 1)))
    assert _is_grass(stored[:, -8:].mean(axis=(0, 1)))
    # After applying EXIF the picture is upright: sky along the top, grass along the bottom.
    upright = _upright(path)
    assert upright.shape[:2] == stored.shape[1::-1]
    assert _is_sky(upright[:8].mean(axis=(0, 1)))
    assert _is_grass(upright[-8:].mean(axis=(0, 1)))
    # exif_transpose drops the tag, so loading twice cannot rotate twice.
    with Image.open(path) as im:
        assert ImageOps.exif_transpose(im).getexif().get(mss.ORIENTATION_TAG) in (None, 1)
    # Exactly one image carries an orientation tag; the in-memory image carries it too.
    for i, name in enumerate(DEFAULT_NAMES):
        with Image.open(COMMITTED / name) as im:
            assert (im.getexif().get(mss.ORIENTATION_TAG) == 6) == (i == mss.EXIF_INDEX)
    img = mss.make_images(mss.EXIF_INDEX + 1, 64, 0)[mss.EXIF_INDEX]
    assert ImageOps.exif_transpose(img).size == (64, 64)
    assert img.getexif().get(mss.ORIENTATION_TAG) == 6
