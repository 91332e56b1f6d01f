"""Replicated runs, summaries with 95% intervals, verdicts on comparisons and the axis plot (#23).

The numbers are worked by hand in the comments: t(0.975, 2) = 4.3027, t(0.975, 4) = 2.7764,
t(0.975, 1) = 12.7062 (tables; the df = 1 and df = 2 quantiles also have closed forms).
"""

import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import SAMPLE_SUBJECT
from dreambooth_lab import config as C
from dreambooth_lab import experiments as E
from dreambooth_lab import stats as S
from dreambooth_lab.sweep_spec import replicate_seed


# ---- t quantiles without SciPy -------------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281),
                                          (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert S.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert S.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.995])
def test_t_quantile_closed_forms(p):
    assert S.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert S.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_for_welch_degrees_of_freedom_lies_between_its_neighbours():
    assert S.t_quantile(0.975, 4) < S.t_quantile(0.975, 3.5) < S.t_quantile(0.975, 3)
    assert S.t_quantile(0.5, 7) == 0.0 and S.t_cdf(0.0, 3) == 0.5
    assert S.t_cdf(2.7764, 4) == pytest.approx(0.975, abs=1e-5)
    with pytest.raises(ValueError, match="p=1"):
        S.t_quantile(1, 3)


def test_incomplete_beta_known_values():
    assert S.betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert S.betainc(3, 1, 0.5) == pytest.approx(0.125)  # x**a
    assert S.betainc(2.5, 2.5, 0.5) == pytest.approx(0.5)  # symmetric


# ---- replicates in a sweep spec ---------------------------------------------------------------------

def write_spec(tmp_path: Path, **extra) -> Path:
    spec = {"name": "reps", "output_dir": str(tmp_path / "runs"),
            "base": {"model": {"name": "tiny"}, "data": {"instance_dir": str(SAMPLE_SUBJECT)},
                     "train": {"steps": 2, "checkpoint_every": 1000, "seed": 7}, "prior": {"enabled": False},
                     "sample": {"steps": 2, "seeds": [5, 6]}},
            "grid": {"data.token": ["sks", "oue"]}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_replicates_get_distinct_seeds_and_otherwise_identical_configs(tmp_path):
    plain = E.load_sweep(write_spec(tmp_path))
    assert [r.id for r in plain.runs] == ["token=sks", "token=oue"]  # N = 1: ids and seeds as before
    assert [r.config.train.seed for r in plain.runs] == [7, 7] and all(r.group is None for r in plain.runs)
    assert [r.id for r in E.load_sweep(write_spec(tmp_path, replicates=1)).runs] == ["token=sks", "token=oue"]

    sweep = E.load_sweep(write_spec(tmp_path, replicates=3))
    assert [r.id for r in sweep.runs] == ["token=sks-r0", "token=sks-r1", "token=sks-r2",
                                          "token=oue-r0", "token=oue-r1", "token=oue-r2"]
    assert [r.group for r in sweep.runs] == ["token=sks"] * 3 + ["token=oue"] * 3
    seeds = [r.config.train.seed for r in sweep.runs[:3]]
    assert seeds[0] == 7 and len(set(seeds)) == 3  # replicate 0 keeps the run's seed
    assert seeds[1] == int(hashlib.sha256(b"7/replicate/1").hexdigest()[:8], 16) % 2**31
    assert [r.config.train.seed for r in sweep.runs[3:]] == seeds  # derived from the run's seed, not its place
    for r in sweep.runs[1:3]:
        a, b = sweep.runs[0].config, r.config
        assert a.hash() != b.hash()
        b2 = C.with_overrides(b, {"train.seed": a.train.seed, "train.name": a.train.name})
        assert b2.hash() == a.hash() and b2 == a  # nothing else differs
    assert E.load_sweep(write_spec(tmp_path, replicates=3), replicates=2).replicates == 2  # --replicates wins
    assert [r.id for r in E.select_runs(sweep, "token=oue").runs] == ["token=oue-r0", "token=oue-r1", "token=oue-r2"]
    assert [r.id for r in E.select_runs(sweep, "token=sks-r1").runs] == ["token=sks-r1"]


@pytest.mark.parametrize("value", [0, -1, "three", True])
def test_a_bad_replicate_count_is_one_line_naming_the_key(tmp_path, value):
    with pytest.raises(C.ConfigError, match=r"replicates=.*whole number >= 1") as err:
        E.load_sweep(write_spec(tmp_path, replicates=value))
    assert "\n" not in str(err.value) and "sweep.yaml" in str(err.value)
    with pytest.raises(C.ConfigError, match=r"^--replicates: replicates=0"):
        E.load_sweep(write_spec(tmp_path), replicates=0)


# ---- summarise and compare on synthetic rows -----------------------------------------------------

def rows_of(groups: dict[str, list[float]], metric: str = "metric_judge_subject_fidelity", **extra) -> list[dict]:
    return [{"id": f"{g}-r{k}", "group": g, "status": "finished", metric: v, **extra}
            for g, values in groups.items() for k, v in enumerate(values)]


def test_summarise_agrees_with_hand_computed_values():
    rows = rows_of({"exp2": [0.5, 0.7, 0.9], "exp3": [0.8]})
    rows.append({"id": "exp2-r3", "group": "exp2", "status": "failed", "error": "x"})  # left out
    rows.append({"id": "exp2-r4", "group": "exp2", "status": "finished"})  # not evaluated: left out
    rows.append({"id": "solo", "status": "finished", "metric_judge_subject_fidelity": 0.4})  # no group: its id
    out = E.summarise(rows, metrics=["judge_subject_fidelity"])
    assert [(s["group"], s["n"]) for s in out] == [("exp2", 3), ("exp3", 1), ("solo", 1)]
    s = out[0]
    # mean 0.7, sd sqrt((0.04 + 0 + 0.04) / 2) = 0.2, half-width 4.3027 * 0.2 / sqrt(3) = 0.49683
    assert (s["mean"], s["sd"]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert (s["low"], s["high"]) == (pytest.approx(0.20317, abs=1e-5), pytest.approx(1.19683, abs=1e-5))
    assert out[1]["mean"] == 0.8 and out[1]["sd"] is None and out[1]["low"] is None  # n = 1: no interval
    table = S.format_summary(out).splitlines()
    assert table[0].split() == ["group", "metric", "n", "mean", "sd", "95%", "interval"]
    assert table[1].split()[-2:] == ["[0.203,", "1.197]"] and table[2].endswith("none (n = 1)")


def test_summarise_by_a_column_and_every_metric():
    rows = rows_of({"a": [1.0, 3.0]}, lr_unet=1e-4) + rows_of({"b": [2.0, 2.0]}, lr_unet=5e-5)
    for r, loss in zip(rows, [0.1, 0.3, 0.2, 0.4]):
        r["metric_dino"] = loss
    out = E.summarise(rows, by="lr_unet")  # numbers sort as numbers: 5e-05 before 0.0001
    assert [(s["group"], s["metric"]) for s in out] == [("5e-05", "metric_dino"),
                                                        ("5e-05", "metric_judge_subject_fidelity"),
                                                        ("0.0001", "metric_dino"),
                                                        ("0.0001", "metric_judge_subject_fidelity")]
    # 1 and 3: mean 2, sd sqrt(2), half-width 12.7062 * sqrt(2) / sqrt(2) = 12.7062
    assert (out[3]["low"], out[3]["high"]) == (pytest.approx(2 - 12.7062, abs=1e-4), pytest.approx(2 + 12.7062, abs=1e-4))
    assert (out[1]["sd"], out[1]["low"], out[1]["high"]) == (0.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="metric 'clip_t' is in no registry row; metrics there: dino, judge_subj"):
        E.summarise(rows, metrics=["clip_t"])


def test_compare_agrees_with_hand_computed_welch_interval():
    rows = rows_of({"exp3": [0.8, 0.9, 1.0], "exp2": [0.5, 0.6, 0.7]})
    r = E.compare(rows, "exp3", "exp2", "judge_subject_fidelity")
    # d = 0.3; se = sqrt(0.01/3 + 0.01/3) = 0.081650; df = 4; half-width 2.7764 * 0.081650 = 0.22670
    assert r["difference"] == pytest.approx(0.3) and r["df"] == pytest.approx(4.0)
    assert (r["low"], r["high"]) == (pytest.approx(0.07330, abs=1e-5), pytest.approx(0.52670, abs=1e-5))
    assert r["verdict"] == "different"
    assert r["sentence"] == "exp3 binds the subject better than exp2 by 0.30 [0.07, 0.53] (95% interval, n = 3 each)"
    back = E.compare(rows, "exp2", "exp3", "judge_subject_fidelity")  # the winner is named first either way
    assert back["difference"] == pytest.approx(-0.3) and back["low"] == pytest.approx(-0.52670, abs=1e-5)
    assert back["sentence"] == r["sentence"]


def test_welch_degrees_of_freedom_with_unequal_spreads():
    w = S.welch([0.0, 2.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    # var 4 (n 3) and 2.5 (n 5): se^2 = 4/3 + 0.5 = 1.83333; df = 1.83333^2 / ((4/3)^2/2 + 0.5^2/4) = 3.53285
    assert w["se"] == pytest.approx(math.sqrt(11 / 6)) and w["df"] == pytest.approx(3.53285, abs=1e-5)
    assert w["high"] - w["difference"] == pytest.approx(S.t_quantile(0.975, w["df"]) * math.sqrt(11 / 6))


def test_a_setting_compared_with_itself_shows_no_difference():
    rows = rows_of({"exp2": [0.42, 1.0, 0.61]})
    r = E.compare(rows, "exp2", "exp2", "judge_subject_fidelity")
    assert r["verdict"] == "no difference shown" and r["difference"] == 0.0 and r["low"] == -r["high"] < 0
    assert r["sentence"].startswith("no difference shown on judge_subject_fidelity: exp2 − exp2 = 0.00 [")
    assert r["sentence"].endswith("n = 3 each)")
    noisy = E.compare(rows_of({"a": [0.42, 1.0, 0.6], "b": [0.5, 0.9, 0.55]}), "a", "b", "judge_subject_fidelity")
    assert noisy["verdict"] == "no difference shown"


def test_a_known_large_difference_is_called_different():
    # the world's recipe binds nearly always; the study's settings rarely (per-run rates)
    rows = rows_of({"recipe": [0.95, 1.0, 0.9, 0.97], "study": [0.3, 0.42, 0.25]})
    r = E.compare(rows, "study", "recipe", "judge_subject_fidelity")
    assert r["verdict"] == "different" and r["high"] < 0
    # means 3.82 / 4 = 0.955 and 0.97 / 3 = 0.3233: 0.6317
    assert r["sentence"].startswith("recipe binds the subject better than study by 0.63 [")
    assert r["sentence"].endswith("(95% interval, n = 3 and 4)")


def test_single_runs_get_no_interval_and_say_so():
    r = E.compare(rows_of({"exp3": [0.9], "exp2": [0.5, 0.6]}), "exp3", "exp2", "judge_subject_fidelity")
    assert r["verdict"] == "no interval" and r["low"] is None and r["difference"] == pytest.approx(0.35)
    assert r["sentence"].startswith("no interval: exp3 has n = 1, so exp3 − exp2 = +0.35")
    assert "replicates" in r["sentence"]


def test_unknown_groups_and_metrics_are_one_line():
    rows = rows_of({"exp3": [0.9, 0.8], "exp2": [0.5, 0.6]}, metric="m")
    with pytest.raises(ValueError, match=r"^--b exp9: no finished run of that group has m; groups with it: exp2, exp3$"):
        E.compare(rows, "exp3", "exp9", "m")
    with pytest.raises(ValueError, match="no run has been evaluated yet"):
        E.compare([{"id": "x", "status": "finished"}], "x", "x", "dino")


# ---- the registry files, the CLI and the pictures -----------------------------------------------

def synthetic_registry(tmp_path: Path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    rows = (rows_of({"lr=5e-05": [0.4, 0.5, 0.6]}, lr_unet=5e-5, model="toyworld", steps=300)
            + rows_of({"lr=0.0001": [0.7, 0.8, 0.9]}, lr_unet=1e-4, model="toyworld", steps=300)
            + rows_of({"lr=0.0005": [0.3]}, lr_unet=5e-4, model="toyworld", steps=300))
    (folder / "registry.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return folder


def test_the_csv_registry_reads_back_as_the_jsonl_one(tmp_path):
    (tmp_path / "registry.csv").write_text("id,group,status,lr_unet,steps,prior,lora,metric_dino\n"
                                           "a-r0,a,finished,0.0001,300,False,,0.5\n")
    assert E.load_registry(tmp_path / "registry.csv") == [
        {"id": "a-r0", "group": "a", "status": "finished", "lr_unet": 1e-4, "steps": 300, "prior": False,
         "lora": None, "metric_dino": 0.5}]
    with pytest.raises(FileNotFoundError, match="no registry there: give a sweep folder"):
        E.load_registry(tmp_path / "nowhere")


def test_compare_runs_cli(tmp_path, capsys):
    from dreambooth_lab.cli import main

    folder = synthetic_registry(tmp_path)
    assert main(["compare-runs", str(folder), "--metric", "judge_subject_fidelity", "--a", "lr=0.0001",
                 "--b", "lr=5e-05"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # 0.8 - 0.5 = 0.3 with the same spreads as the hand-computed case above
    assert out[-1] == "lr=0.0001 binds the subject better than lr=5e-05 by 0.30 [0.07, 0.53] (95% interval, n = 3 each)"
    assert [line.split()[0] for line in out[1:3]] == ["lr=0.0001", "lr=5e-05"]  # a, then b
    assert main(["compare-runs", str(folder / "registry.jsonl"), "--metric", "judge_subject_fidelity",
                 "--by", "lr_unet", "--a", "1e-4", "--b", "5e-4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("no interval: 5e-4 has n = 1") and [o.split()[0] for o in out[1:3]] == ["0.0001", "0.0005"]
    assert main(["compare-runs", str(folder), "--metric", "judge_subject_fidelity"]) == 0  # the table only
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert main(["compare-runs", str(folder), "--metric", "judge_subject_fidelity", "--a", "x", "--b", "lr=5e-05"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --a x: no finished run of that group") and "\n" not in err
    assert main(["compare-runs", str(tmp_path / "none"), "--metric", "m", "--a", "x", "--b", "y"]) == 2


def test_axis_plot_from_a_small_registry(tmp_path, capsys):
    from dreambooth_lab.cli import main

    folder = synthetic_registry(tmp_path)
    assert main(["sheet", "axis", str(folder), "--axis", "lr_unet", "--metric", "judge_subject_fidelity"]) == 0
    png = folder / "axis_lr_unet_judge_subject_fidelity.png"
    assert capsys.readouterr().out.strip() == f"sheet: {png}"
    assert Image.open(png).size[0] > 300
    layout = json.loads(png.with_suffix(".json").read_text())
    points = layout["points"]
    assert [(p["group"], p["n"]) for p in points] == [("5e-05", 3), ("0.0001", 3), ("0.0005", 1)]
    assert points[1]["mean"] == pytest.approx(0.8) and points[1]["high"] == pytest.approx(0.8 + 0.24841, abs=1e-5)
    assert points[2]["low"] is None and points[1]["values"] == [0.7, 0.8, 0.9]
    assert layout["params"]["model"] == "toyworld" and layout["params"]["steps"] == 300
    assert layout["params"]["runs"] == 7 and "lr_unet" not in layout["params"]
    assert main(["sheet", "axis", str(folder), "--axis", "nope", "--metric", "judge_subject_fidelity"]) == 2
    assert capsys.readouterr().err.startswith("error: --axis nope: not a column of")
    out = E.axis_sheet(folder / "registry.jsonl", "lr_unet", "judge_subject_fidelity", tmp_path / "x.png")
    assert out == tmp_path / "x.png" and out.is_file()


# ---- a tiny sweep with replicates -------------------------------------------------------------------

def test_tiny_sweep_with_two_replicates_registers_group_and_seed_and_skips_on_rerun(tmp_path, capsys):
    from dreambooth_lab.cli import main
    from dreambooth_lab.compare import group_label, row_label

    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    del spec["grid"]
    spec["runs"] = [{"name": "a", "set": {}}]
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--replicates", "2", "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].split()[4:7] == ["steps", "training", "seed"] and plan[1].split()[:1] == ["a-r0"]
    assert plan[1].split()[4] == "7" and plan[2].split()[4] == str(replicate_seed(7, 1))

    seen = []
    sweep = E.load_sweep(path, replicates=2)
    rows = E.run_sweep(sweep, progress=False, on_run=lambda rid, status: seen.append((rid, status)))
    assert seen == [("a-r0", "finished"), ("a-r1", "finished")]
    assert [(r["id"], r["group"], r["replicate"], r["training_seed"], r["seed"], r["group_seed"]) for r in rows] == [
        ("a-r0", "a", 0, 7, 7, 7), ("a-r1", "a", 1, replicate_seed(7, 1), replicate_seed(7, 1), 7)]
    assert rows[0]["generation_seeds"] == rows[1]["generation_seeds"] == "5 6"  # sampling seeds: their own column
    header = (sweep.folder / "registry.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["id", "group", "replicate", "training_seed", "group_seed", "status"]
    assert json.loads((sweep.folder / "replicates.json").read_text())["a-r1"]["group"] == "a"

    seen.clear()
    assert main(["sweep", str(path), "--replicates", "2"]) == 0  # from the CLI: nothing trains again
    E.run_sweep(E.load_sweep(path, replicates=2), progress=False, on_run=lambda rid, s: seen.append(s))
    assert seen == ["skipped", "skipped"] and len(list(sweep.folder.glob("a-r*"))) == 2

    # evaluated replicates: the runs x prompts row label carries the group's mean ± half-width
    for row, value in zip(rows, (0.5, 0.7)):
        (Path(row["run_dir"]) / "metrics.json").write_text(json.dumps({"summary": {"judge_subject_fidelity": value}}))
    E.write_registry(sweep.folder)
    # mean 0.6, sd 0.141421, half-width 12.7062 * 0.141421 / sqrt(2) = 1.27062
    assert group_label(Path(rows[0]["run_dir"])) == "\ngroup of 2: judge: subject 0.60 ± 1.27"
    from dreambooth_lab.compare import base_spec
    cfg = C.load(Path(rows[1]["run_dir"]) / "config.yaml")
    assert row_label(Path(rows[1]["run_dir"]), cfg, base_spec(cfg, Path(rows[1]["run_dir"]))).endswith(
        "judge: subject 0.70\ngroup of 2: judge: subject 0.60 ± 1.27")


# ---- the notebooks' interval table and verdict (04_evaluate.ipynb) --------------------------------

def test_notebook_intervals_print_the_table_and_a_verdict_or_why_none(capsys):
    from dreambooth_lab import notebook as nb

    rows = rows_of({"exp3": [0.8, 0.9, 1.0], "exp2": [0.5, 0.6, 0.7]}, metric="metric_dino")
    text = nb.intervals(rows, ["dino"], "exp3", "exp2")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["group", "metric", "n"] and [x.split()[0] for x in lines[1:3]] == ["exp2", "exp3"]
    # the hand-computed case above: 0.3 [0.0733, 0.5267]
    assert lines[-1] == "exp3 is higher on dino than exp2 by 0.30 [0.07, 0.53] (95% interval, n = 3 each)"
    assert capsys.readouterr().out.strip() == text
    assert nb.intervals(rows, ["dino"], "exp2", "exp2").splitlines()[-1].startswith("no difference shown on dino")
    assert nb.intervals(rows, ["dino"], "exp3", "exp9").splitlines()[-1] == (
        "no verdict on exp3 vs exp9: exp9: no finished run of that group has dino; groups with it: exp2, exp3")
    assert nb.intervals(rows, ["dino"]).splitlines()[-1].startswith("no verdict: name two groups")
