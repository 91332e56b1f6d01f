"""Dataset checks people expect: the same shot twice, too few or too many photos, one background."""

import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import SAMPLE_SUBJECT
from dreambooth_lab import data


def _messages(fn, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn(*args)
    return [str(w.message) for w in rec if issubclass(w.category, data.DatasetWarning)]


@pytest.fixture(scope="module")
def sample():
    paths = data.find_images(SAMPLE_SUBJECT)
    return paths, data.load_images(paths)


def test_distinct_photos_are_neither_duplicates_nor_one_background(sample):
    paths, images = sample
    assert data.near_duplicates([p.name for p in paths], images) == []
    assert data.shared_background(images) > data.SHARED_BACKGROUND
    assert _messages(data.ImageSet.from_folder, SAMPLE_SUBJECT, 64) == []


def test_the_same_shot_is_a_near_duplicate(sample, tmp_path):
    _, images = sample
    im = images[2]
    w, h = im.size
    shots = {"a.png": im, "nudged.png": im.crop((4, 4, w, h)).resize((w, h)),  # a burst: moved a few pixels
             "brighter.png": Image.eval(im, lambda v: min(255, int(v * 1.15))), "other.png": images[3],
             "mirrored.png": ImageOps.mirror(im)}
    pairs = data.near_duplicates(list(shots), list(shots.values()))
    assert {(a, b) for a, b, _ in pairs} == {("a.png", "nudged.png"), ("a.png", "brighter.png"),
                                             ("nudged.png", "brighter.png")}
    assert all(0 < bits <= data.NEAR_DUPLICATE_BITS for _, _, bits in pairs)
    for name, img in shots.items():
        img.save(tmp_path / name)
    (msg,) = [m for m in _messages(data.ImageSet.from_folder, tmp_path, 64) if "duplicate" in m]
    assert "a.png ≈ brighter.png" in msg and "a.png ≈ nudged.png" in msg and "other.png" not in msg


def test_flat_photos_of_different_colours_are_not_duplicates():
    flat = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    assert data.near_duplicates(["r", "g", "b"], flat) == []


def _noise(tmp_path, n, size=48):
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / f"p{i:02d}.png")


@pytest.mark.parametrize("n,warned", [(30, False), (31, True)])
def test_more_than_thirty_photos_warn(tmp_path, n, warned):
    _noise(tmp_path, n)
    msgs = [m for m in _messages(data.ImageSet.from_folder, tmp_path, 32) if "photos in" in m]
    assert bool(msgs) == warned
    if warned:
        assert msgs[0].startswith(f"{n} photos in {tmp_path}") and "3–30" in msgs[0]


def test_one_background_for_every_photo_is_warned(tmp_path):
    rng = np.random.default_rng(0)
    backdrop = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    for i, (x, y) in enumerate([(20, 30), (60, 40), (40, 70), (70, 20)]):  # the subject moves, the wall stays
        shot = backdrop.copy()
        shot.paste((200, 20, 20), (x, y, x + 40, y + 40))
        shot.save(tmp_path / f"s{i}.png")
    (msg,) = [m for m in _messages(data.ImageSet.from_folder, tmp_path, 64) if "background" in m]
    assert msg.startswith(f"all 4 photos in {tmp_path} have the same background")
    images = data.load_images(data.find_images(tmp_path))
    assert data.shared_background(images) <= data.SHARED_BACKGROUND
    assert data.shared_background(images[:2]) is None  # too few photos to say


@pytest.mark.parametrize("n", [3, 4, 7, 30])
def test_median_rows_is_numpys_median_bit_for_bit(n):
    rng = np.random.default_rng(n)
    x = (rng.random((n, 492, 3)) * 255).astype(np.float32)
    x[1] = x[0]  # ties
    assert np.array_equal(data.median_rows(x), np.median(x, axis=0))
    assert data.median_rows(x).dtype == np.median(x, axis=0).dtype


def test_photo_checks_do_not_import_numpy_ma():
    """np.median imports numpy.ma on its first call: 60 ms of every start-up, which the checks avoid."""
    import subprocess
    import sys

    code = ("import sys, warnings; warnings.simplefilter('ignore'); from dreambooth_lab.data import ImageSet; "
            f"ImageSet.from_folder({str(SAMPLE_SUBJECT)!r}, 64); print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
