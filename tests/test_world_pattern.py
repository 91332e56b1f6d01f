"""benchmarks/world_pattern.py: the drawings it compares and its measure of what a VAE keeps."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.world_pattern import drawings, kept  # noqa: E402


def _yellow(img) -> np.ndarray:
    a = np.asarray(img, dtype=int)
    return (a[..., 0] > 200) & (a[..., 1] > 180) & (a[..., 2] < 90)


def test_each_scene_is_drawn_with_its_pattern_the_other_and_merged_and_nothing_else_changes():
    d = drawings("dog", 4, seed=3)
    assert sorted(d) == ["merged", "other", "own"] and all(len(v) == 4 for v in d.values())
    for own, other, merged in zip(d["own"], d["other"], d["merged"]):
        a, b, m = (np.asarray(x, dtype=int) for x in (own, other, merged))
        body = np.all(np.abs(a - (130, 40, 200)) < 40, -1) | _yellow(own)  # the violet body and its dots
        for changed in (np.abs(a - b).sum(-1) > 0, np.abs(a - m).sum(-1) > 0):
            assert changed.any() and changed.sum() < 0.6 * body.sum()  # only the marking differs
        # merged: about as much of the marking's colour, in one patch instead of five dots
        assert 0.5 < _yellow(merged).sum() / _yellow(own).sum() < 3


def test_kept_is_one_when_the_round_trip_changes_nothing_and_falls_when_it_blurs_the_difference():
    d = drawings("dog", 3, seed=4)
    assert kept(d["own"], d["other"], d["own"], d["other"]) == 1.0
    blur = [[im.filter(ImageFilter.GaussianBlur(3)) for im in d[k]] for k in ("own", "other")]
    assert kept(d["own"], d["other"], *blur) < 0.6
    same = [Image.new("RGB", (64, 64))] * 3
    assert kept(d["own"], d["other"], same, same) == 0.0
