"""benchmarks/world.py's held-out table: a composition cell shows which half it loses, and a prompt
the world cannot draw for the class (a backpack in a t-shirt, driving) reads n/a instead of 0.00."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.world import target_cell  # noqa: E402


def sp(mean, sd=0.1, lo=0.0, hi=1.0):
    return {"n": 3, "mean": mean, "sd": sd, "min": lo, "max": hi}


def test_a_test_prompt_cell_shows_its_two_halves_and_the_target_mark():
    key, half = "test:a {token} {class} in the forest", "a {token} {class} in the forest"
    sm = {key: sp(0.54), f"test_subject:{half}": sp(0.55), f"test_asked:{half}": sp(0.99)}
    assert target_cell(key, "dog", sm, 0.6) == "0.54 ± 0.10 [0.00–1.00] ✗ (subject 0.55, asked 0.99)"
    assert target_cell(key, "dog", {key: sp(0.7)}, 0.6) == "0.70 ± 0.10 [0.00–1.00] ✓"  # older results: no halves
    assert target_cell(key, "dog", {}, 0.6) == "–"


def test_a_backpack_in_a_t_shirt_or_driving_is_not_applicable_but_a_dog_is_measured():
    for prompt, words in (("a {token} {class} in red t-shirts", "in a t-shirt"), ("a {token} {class} driving car", "driving")):
        sm = {f"test:{prompt}": sp(0.0)}
        assert target_cell(f"test:{prompt}", "backpack", sm, 0.6) == f"n/a (the world draws no backpack {words})"
        assert target_cell(f"test:{prompt}", "dog", sm, 0.6).endswith("✗")
    forest = "test:a {token} {class} in the forest"
    assert target_cell(forest, "backpack", {forest: sp(0.2)}, 0.6).endswith("✗")  # a backpack can be in a forest


def test_merging_a_robustness_half_rewrites_the_markdown_of_the_other(tmp_path):
    """The documented two-core run: `--merge-robustness` copies the held-out section of one world.json
    into another and writes world.md from the two (into --out only: BENCHMARKS.md is left alone)."""
    import json

    from benchmarks.world import main

    committed = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "world.json").read_text())
    half = {**committed, "robustness": {**committed["robustness"], "seconds": 4321.0}}
    (tmp_path / "world.json").write_text(json.dumps({k: v for k, v in committed.items() if k != "robustness"}))
    (tmp_path / "rob.json").write_text(json.dumps(half))
    main(["--merge-robustness", str(tmp_path / "rob.json"), "--out", str(tmp_path)])
    merged = json.loads((tmp_path / "world.json").read_text())
    assert merged["robustness"]["seconds"] == 4321.0 and merged["base"] == committed["base"]
    assert "**Held out: conditions the recipe was never calibrated on** (72 min)" in (tmp_path / "world.md").read_text()
