"""Replicated world studies (#23 items 5, 6): replicates of a setting, the interval table, the
verdict lines a notebook prints and a benchmark writes, and which single-run differences hold.

Hand-computed values: t(0.975, 2) = 4.3027, t(0.975, 4) = 2.7764.
"""

import hashlib
import sys
from pathlib import Path

import pytest

from dreambooth_lab import config as C
from dreambooth_lab.sweep_spec import replicate_seed
from dreambooth_lab.world import replicates as R
from dreambooth_lab.world.study import world_recipe_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows_of(groups: dict[str, list[float]], metric: str = "subject", **extra) -> list[dict]:
    return [{"id": f"{g}-r{k}", "group": g, "replicate": k, "status": "finished", metric: v, **extra}
            for g, values in groups.items() for k, v in enumerate(values)]


# ---- replicates of one setting ---------------------------------------------------------------------

def test_replicates_get_distinct_seeds_and_otherwise_identical_configs(tmp_path):
    cfg = world_recipe_config("dog", 5, output_dir=tmp_path)
    assert R.replicate_configs(cfg, 1) == [cfg]  # one run: the setting itself, name and seed unchanged
    reps = R.replicate_configs(cfg, 3)
    assert [r.train.name for r in reps] == [f"{cfg.train.name}-r{k}" for k in range(3)]
    seeds = [r.train.seed for r in reps]
    assert seeds[0] == cfg.train.seed == 42 and len(set(seeds)) == 3
    assert seeds[1] == int(hashlib.sha256(b"42/replicate/1").hexdigest()[:8], 16) % 2**31  # as a sweep's
    assert seeds == [replicate_seed(42, k) for k in range(3)]
    for r in reps:
        back = C.with_overrides(r, {"train.seed": cfg.train.seed, "train.name": cfg.train.name})
        assert back == cfg and back.hash() == cfg.hash()  # nothing else differs
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="replicates=.*whole number >= 1"):
            R.replicate_configs(cfg, bad)


def test_run_replicates_makes_one_row_per_run_with_group_and_seed(tmp_path):
    settings = {"a": world_recipe_config("dog", 5, output_dir=tmp_path),
                "b": world_recipe_config("dog", 5, "http", output_dir=tmp_path)}
    seen, lines = [], []

    def measure(cfg):
        seen.append((cfg.data.token, cfg.train.seed, cfg.train.name))
        return {"subject": 0.5, "seconds": 1.0}

    rows = R.run_replicates(settings, 2, measure, columns={"a": {"token": "sks"}}, log=lines.append)
    assert [(r["id"], r["group"], r["replicate"], r["training_seed"]) for r in rows] == [
        ("a-r0", "a", 0, 42), ("a-r1", "a", 1, replicate_seed(42, 1)),
        ("b-r0", "b", 0, 42), ("b-r1", "b", 1, replicate_seed(42, 1))]
    assert [s[:2] for s in seen] == [("sks", 42), ("sks", replicate_seed(42, 1)),
                                     ("http", 42), ("http", replicate_seed(42, 1))]
    assert rows[0]["token"] == "sks" and "token" not in rows[2] and all(r["status"] == "finished" for r in rows)
    assert lines[1] == f"  a-r1 (training seed {replicate_seed(42, 1)}): 1 s, subject 0.50"
    single = R.run_replicates({"a": settings["a"]}, 1, measure, log=None)
    assert single[0]["id"] == "a" and seen[-1][2] == settings["a"].train.name  # N = 1: the run as it is


def test_judged_reads_the_study_summary():
    numbers = {"subject_rate": 0.75, "drift_subject_rate_in_class_prompt": 0.0, "class_diversity": 0.17,
               "subject_diversity": 0.05,
               "test_prompts_asked": {"a <sks> dog in red t-shirts": 1.0, "a <sks> dog in the style of van gogh": 0.5,
                                      "a <sks> dog in the forest": 1.0, "a <sks> dog driving car": 0.5},
               "test_prompts_subject_and_asked": {"a <sks> dog in red t-shirts": 0.0,
                                                  "a <sks> dog in the style of van gogh": 0.25,
                                                  "a <sks> dog in the forest": 1.0, "a <sks> dog driving car": 0.0}}
    row = R.judged(numbers)
    assert row == {"subject": 0.75, "prompt": 0.75, "subject_and_prompt": 0.3125, "drift": 0.0,
                   "class_diversity": 0.17, "subject_diversity": 0.05, "t-shirt": 0.0, "van gogh": 0.25,
                   "forest": 1.0, "driving": 0.0}


# ---- the table and the verdicts ----------------------------------------------------------------------

def test_the_interval_table_agrees_with_hand_computed_values():
    rows = rows_of({"sks-unet": [0.5, 0.7, 0.9], "http-unet": [0.25]})
    for r, d in zip(rows, (0.1, 0.2, 0.3, 0.4)):
        r["class_diversity"] = d
    table = R.summary_table(rows, ("subject", "class_diversity"), order=["http-unet", "sks-unet", "hta-unet"])
    lines = table.splitlines()
    assert lines[0] == "| setting | n | subject | class_diversity |"
    # mean 0.7, sd 0.2, half-width 4.3027 * 0.2 / sqrt(3) = 0.4968; diversity 0.2 ± 4.3027 * 0.1 / sqrt(3)
    assert lines[3] == "| sks-unet | 3 | 0.70 [0.20, 1.20] | 0.200 [-0.048, 0.448] |"
    assert lines[2] == "| http-unet | 1 | 0.25 (n = 1) | 0.400 (n = 1) |"
    assert lines[4] == "| hta-unet | 0 | – | – |"
    assert R.cell({"mean": 0.5, "low": 0.5, "high": 0.5}) == "0.50 [0.50, 0.50]"


def test_a_setting_compared_with_itself_shows_no_difference():
    rows = rows_of({"sks-unet": [0.42, 1.0, 0.61]})
    (line,) = R.findings(rows, [("sks-unet", "sks-unet")], ["subject"])
    assert line.startswith("sks-unet vs sks-unet (n = 3 each, 95% intervals): no difference shown (a − b): subject +0.00 [")
    assert line.endswith("].") and "better than" not in line


def test_a_known_large_difference_is_called_different_with_the_world_s_verb():
    # the world's recipe binds; the study's settings do not (BENCHMARKS.md: 0.75 against 0.00)
    rows = rows_of({"recipe": [0.75, 0.81, 0.69], "study": [0.0, 0.06, 0.0]})
    v = R.verdicts(rows, [("study", "recipe")], ["subject"])[0]
    assert v["verdict"] == "different" and v["high"] < 0
    # means 0.75 and 0.02; d = -0.73; se = sqrt(0.0036/3 + 0.0012/3) = 0.04; df = 0.0016^2 / (0.0012^2/2 + 0.0004^2/2)
    assert v["difference"] == pytest.approx(-0.73) and v["df"] == pytest.approx(3.2)
    assert v["sentence"].startswith("recipe binds the subject better than study by 0.73 [")
    (line,) = R.findings(rows, [("recipe", "study")], ["subject"])
    assert line.startswith("recipe vs study (n = 3 each, 95% intervals): recipe binds the subject better than study by 0.73 [")


def test_findings_give_one_clause_per_metric_and_report_prints_both():
    rows = rows_of({"none": [0.75, 0.88, 0.81], "class_images": [0.0, 0.0, 0.06]}, metric="drift")
    for r, s in zip(rows, (0.6, 0.7, 0.65, 0.6, 0.75, 0.7)):
        r["subject"] = s
    (line,) = R.findings(rows, [("none", "class_images")], ["subject", "drift"])
    said = line.split(": ", 1)[1].split("; ")  # the differences claimed first, then what shows none
    assert line.startswith("none vs class_images (n = 3 each, 95% intervals): ")
    assert said[0].startswith("none leaks the subject into the plain class prompt more than class_images by 0.79 [")
    assert said[1].startswith("no difference shown (a − b): subject -0.03 [") and len(said) == 2
    text = R.report(rows, [("none", "class_images")], metrics=("subject", "drift"))
    assert text.splitlines()[0] == "| setting | n | subject | drift |"
    assert "mean [95% t-interval] over 3 runs per setting" in text and f"- {line}" in text


def test_token_pairs_are_the_study_s_comparisons():
    assert R.token_pairs(["sks", "http"], [False, True]) == [
        ("sks-te", "sks-unet"), ("http-te", "http-unet"), ("sks-unet", "http-unet"), ("sks-te", "http-te")]
    assert R.token_pairs(["sks"], [False, True]) == [("sks-te", "sks-unet")]
    assert R.token_pairs(["sks", "hta"], [False]) == [("sks-unet", "hta-unet")]


def test_single_run_differences_hold_only_when_the_replicates_confirm_them():
    single = {"a": {"subject": 0.75}, "b": {"subject": 0.06}, "c": {"subject": 0.62}}
    rows = rows_of({"a": [0.75, 0.8, 0.7], "b": [0.1, 0.0, 0.05], "c": [0.9, 0.1, 0.5]})
    s = R.single_run_survival(single, rows, [("a", "b"), ("a", "c"), ("c", "b")], ["subject"], threshold=0.25)
    # a − c = 0.13 < 0.25: no single-run finding; a − b holds; c − b = 0.56 single, not shown replicated
    assert [(f["a"], f["b"], f["holds"]) for f in s["findings"]] == [("a", "b", True), ("c", "b", False)]
    assert (s["held"], s["of"]) == (1, 2) and s["findings"][0]["single"] == pytest.approx(0.69)
    flipped = R.single_run_survival({"a": {"subject": 0.0}, "b": {"subject": 0.5}}, rows, [("a", "b")], ["subject"])
    assert flipped["findings"][0]["holds"] is False  # different, but the other way round


# ---- benchmarks/world.py: the replicated token study in world.json and BENCHMARKS.md ----------------

def _token_study(n=3) -> dict:
    values = {"sks-unet": [0.75, 0.81, 0.69], "sks-te": [0.5, 0.7, 0.6],
              "http-unet": [0.06, 0.0, 0.12], "http-te": [0.44, 0.2, 0.7]}
    rows = []
    for group, vals in values.items():
        token, enc = group.split("-")
        for k, v in enumerate(vals[:n]):
            rows.append({"id": f"{group}-r{k}", "group": group, "replicate": k, "training_seed": replicate_seed(42, k),
                         "status": "finished", "token": token, "text_encoder": enc == "te",
                         "encoder": R.ENCODER[enc == "te"], "subject": v, "forest": 1.0 if token == "sks" else 0.0,
                         "t-shirt": 0.0, "van gogh": 0.0, "driving": 0.0, "drift": 0.0, "class_diversity": 0.17,
                         "seconds": 20.0 + k})
    return {"subject": "dog", "photos": 5, "tokens": ["sks", "http"], "text_encoder": [False, True],
            "replicates": n, "seeds": 16, "steps": 400, "training_seeds": [replicate_seed(42, k) for k in range(n)],
            "runs": len(rows), "seconds": 600.0, "load_average": {"start": [3.0, 2, 1], "end": [4.5, 3, 2]},
            "rows": rows}


def _single(subject, forest):
    return {"scales": {"1.0": {"subject_rate": subject, "drift_subject_rate_in_class_prompt": 0.0,
                               "class_diversity": 0.17, "subject_diversity": 0.1,
                               "test_prompts_asked": {"a x dog in the forest": 1.0},
                               "test_prompts_subject_and_asked": {"a x dog in the forest": forest}}},
            "seconds": 20.0}


def test_token_study_markdown_has_intervals_and_generated_verdicts():
    from benchmarks.world import set_token_study, token_study_markdown

    result = {"runs": {"dog5-recipe": _single(0.75, 1.0), "token-sks-unet": _single(0.75, 1.0),
                       "token-sks-te": _single(0.5, 1.0), "token-http-unet": _single(0.06, 0.0),
                       "token-http-te": _single(0.44, 0.0)}}
    ts = _token_study()
    set_token_study(result, ts)
    assert list(result["runs"]) == ["dog5-recipe"] and result["token_study_seconds"] == 600.0
    assert result["token_study"]["single_run"]["http-unet"]["subject"] == 0.06
    text = "\n".join(token_study_markdown(result["token_study"], "cpu"))
    assert "12 runs in 10.0 min on cpu, a shared CPU (load average 3.0 at the start, 4.5 at the end)" in text
    assert "| setting | n | subject | t-shirt | van gogh | forest | driving | drift | class div. | s |" in text
    assert "| sks-unet | 3 | 0.75 [0.60, 0.90] |" in text  # sd 0.06: 4.3027 * 0.06 / sqrt(3) = 0.149
    lines = [x for x in text.splitlines() if x.startswith("- ")]
    assert len(lines) == 5  # te vs unet per token, sks vs http per encoder, pooled
    assert lines[0].startswith("- sks-te vs sks-unet (n = 3 each, 95% intervals): ")
    assert lines[2].startswith("- sks-unet vs http-unet (n = 3 each, 95% intervals): sks-unet binds the subject "
                               "better than http-unet by 0.69 [")
    assert "sks-unet draws the subject in the forest more often than http-unet by 1.00 [1.00, 1.00]" in lines[2]
    assert lines[4].startswith("- pooled over the 2 tokens, text encoder trained vs text encoder frozen (n = 6 each, ")
    for line in lines:  # every clause is a verdict: a difference with its interval, or "no difference shown"
        for clause in line.split("95% intervals): ", 1)[1].split("; "):
            assert clause.startswith("no difference shown (a − b): ") or " better than " in clause or \
                " more often than " in clause, clause
    assert "differences of ≥ 0.25 that one run per setting showed" in text
    # single runs: sks-te vs sks-unet −0.25, sks vs http unet +0.69 and forest +1.00 (x2), http te vs unet +0.38
    assert "hold with 3 replicates" in text


def test_set_token_study_keeps_earlier_single_runs_on_a_rerun():
    from benchmarks.world import set_token_study

    result = {"runs": {"token-sks-unet": _single(0.75, 1.0)}}
    set_token_study(result, _token_study())
    set_token_study(result, _token_study(2))
    assert result["token_study"]["replicates"] == 2 and "sks-unet" in result["token_study"]["single_run"]


def test_token_study_only_without_a_world_json_is_one_line(tmp_path):
    from benchmarks.world import main

    with pytest.raises(SystemExit, match="--token-study-only: no .*world.json to add the token study to"):
        main(["--token-study-only", "--out", str(tmp_path)])
