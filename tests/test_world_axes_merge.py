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
    with pytest.raises(SystemExit, match="seeds, steps or replicates"):
        merge([_half("5", 0.4), other])
    with pytest.raises(SystemExit, match="seeds, steps or replicates"):
        merge([dict(_half("5", 0.4), replicates=3), dict(_half("18", 0.8), replicates=2)])


def test_merge_refuses_halves_read_at_different_lora_scales():
    with pytest.raises(SystemExit, match="read at LoRA scales 0.7 and 1.0"):
        merge([dict(_half("5", 0.4), scale=0.7), dict(_half("18", 0.8), scale=1.0)])
    assert merge([dict(_half("5", 0.4), scale=0.7), dict(_half("18", 0.8), scale=0.7)])["scale"] == 0.7


def _replicated(photos: str, recipe: list[float], none: list[float]) -> dict:
    """A world_axes result with 3 runs per row (prior axis: the recipe and no prior)."""
    def row(subjects, drift):
        runs = [{"replicate": k, "training_seed": 42 + k, "seconds": 20.0, "subject": v, "prompt": 0.5,
                 "subject_and_prompt": 0.25, "drift": drift[k], "class_diversity": 0.2, "final_loss": 0.1}
                for k, v in enumerate(subjects)]
        return {**{c: sum(r[c] for r in runs) / 3 for c in runs[0] if c not in ("replicate", "training_seed")},
                "n": 3, "runs": runs}

    return {"machine": "cpu", "seeds": 8, "steps": 400, "total_seconds": 300.0, "replicates": 3,
            "training_seeds": [42, 43, 44], "load_average": {"start": [2.0, 1, 1], "end": [3.0, 2, 1]},
            "axes": {"prior": {"class images (the paper's)": {photos: row(recipe, [0.0, 0.0, 0.0])},
                               "none": {photos: row(none, [0.75, 0.88, 0.81])}}}}


def test_replicated_rows_show_intervals_and_the_findings_claim_only_what_the_interval_shows():
    md = markdown(merge([_replicated("5", [0.5, 0.7, 0.9], [0.6, 0.7, 0.8]),
                         _replicated("18", [0.9, 1.0, 0.95], [0.1, 0.2, 0.15])]))
    # mean 0.7, sd 0.2, t(0.975, 2) = 4.3027: 0.7 ± 0.4968
    assert "| class images (the paper's) | 5 | 0.70 [0.20, 1.20] | 0.50 [0.50, 0.50] |" in md
    assert "each row 3 training runs (training seeds 42, 43, 44)" in md
    assert "load average 2.0 at the start, 3.0 at the end" in md and "2 processes side by side, 5.0 min wall" in md
    lines = [x for x in md.splitlines() if x.startswith("- ")]
    assert len(lines) == 2
    # 5 photos: the same subject rate within noise; no prior leaks the subject into "a dog"
    assert lines[0].startswith("- 5 photos: none vs class images (the paper's) (n = 3 each, 95% intervals): none "
                               "leaks the subject into the plain class prompt more than class images (the paper's) by 0.81 [")
    assert "no difference shown (a − b): subject +0.00 [" in lines[0]
    # 18 photos: a large subject difference is claimed, with the world's verb
    assert "class images (the paper's) binds the subject better than none by 0.80 [" in lines[1]
