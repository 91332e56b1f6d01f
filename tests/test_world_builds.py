"""benchmarks/world_builds.py: the held-out comparison of two world builds, as tables."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.world_builds import READINGS, main, tables  # noqa: E402


def _row(label, scale, subject, bind, cat):
    row = {key: 0.0 for _, key in READINGS}
    row.update({"label": label, "scale": scale, "subject": subject, "subject:a {token} {class}": bind,
                **{f"class:{c}": 1.0 for c in ("dog", "toy", "backpack", "vase")}, "class:cat": cat})
    return row


def test_tables_give_each_builds_spread_and_the_other_classes_against_their_base_rate():
    rows = [_row("v4", 1.0, "dog", 0.5, 0.25), _row("v4", 1.0, "dog", 1.0, 0.5),
            _row("v6", 0.7, "dog", 0.75, 1.0), _row("v6", 0.7, "dog", 0.25, 0.5), _row("v6", 0.7, "backpack", 1.0, 1.0)]
    base = {"v4": {"class:cat": 0.5, **{f"class:{c}": 1.0 for c in ("dog", "toy", "backpack", "vase")}},
            "v6": {"class:cat": 1.0, **{f"class:{c}": 1.0 for c in ("dog", "toy", "backpack", "vase")}}}
    md = tables(rows, base)
    head = next(line for line in md.splitlines() if line.startswith("| reading"))
    assert head == "| reading | v4 at 1.0 | v6 at 0.7 |"
    bind = next(line for line in md.splitlines() if line.startswith("| a {tok} {class} |"))
    assert "0.75 ± 0.35 (0.50–1.00)" in bind and "0.50 ± 0.35 (0.25–0.75)" in bind
    cat = next(line for line in md.splitlines() if line.startswith('| "a cat" after / before'))
    assert cat == '| "a cat" after / before the run | 0.75 (min 0.50) | 0.75 (min 0.50) |'
    assert "**backpack** (1 runs per column" in md and "t-shirt" in md.split("**backpack**")[0]
    assert "| reading | v6 at 0.7 |\n" in md.split("**backpack**")[1]  # only the build that has backpack runs
    assert "t-shirt" not in md.split("**backpack**")[1].split("Base rates")[0]  # a backpack wears none


def test_the_committed_results_print_again(capsys):
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    main(["--table", str(root / "world_builds.jsonl")])
    out = capsys.readouterr().out
    assert "v6 at 0.7" in out and "v4 at 1.0" in out and "(9 runs per column" in out


def test_the_scale_check_pairs_each_runs_readings_by_scale():
    """benchmarks/world_scale_check.py: one row per reading, mean ± sd over the runs at each scale."""
    from benchmarks.world_scale_check import table

    rows = [{"subject": "dog", "scale": s, "readings": {"subject:a {token} {class}": v, "drift": 0.0, "other": 9}}
            for s, v in ((0.5, 1.0), (0.7, 0.5), (0.5, 0.5), (0.7, 0.0))]
    text = table(rows)
    assert "**dog** (2 runs)" in text and "| reading | scale 0.5 | scale 0.7 |" in text
    assert "| subject:a {token} {class} | 0.75 ± 0.35 | 0.25 ± 0.35 |" in text and "other" not in text
