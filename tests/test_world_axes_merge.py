"""benchmarks/world_axes.py --merge: halves run side by side (one per photo count) join into one table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.world_axes import markdown, merge  # noqa: E402


def _half(photos: str, subject: float, seconds: float = 60.0) -> dict:
    row = {"seconds": seconds, "subject": subject, "prompt": 0.5, "subject_and_prompt": 0.25, "drift": 0.0,
           "class_diversity": 0.2}
    return {"machine": "cpu", "seeds": 8, "steps": 1600, "total_seconds": 100.0,
            "axes": {"prior": {"class images": {photos: row}, "none": {photos: dict(row, subject=subject / 2)}}}}


def test_merge_joins_rows_per_photo_count_and_the_table_shows_both():
    got = merge([_half("5", 0.4), _half("18", 0.8)])
    assert got["axes"]["prior"]["class images"]["5"]["subject"] == 0.4
    assert got["axes"]["prior"]["none"]["18"]["subject"] == 0.4
    assert got["total_seconds"] == 200.0 and got["runs_in_parallel"] == 2
    md = markdown(got)
    assert "| class images | 5 | 0.40 |" in md and "| class images | 18 | 0.80 |" in md
    assert "2 processes side by side" in md


def test_merge_refuses_results_of_different_settings():
    other = dict(_half("18", 0.8), steps=800)
    with pytest.raises(SystemExit, match="seeds or steps"):
        merge([_half("5", 0.4), other])
