import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO, SAMPLE_SUBJECT
from dreambooth_lab import config as C
from dreambooth_lab import experiments as E
from dreambooth_lab.sweep_spec import expand_grid, run_id

STUDY = REPO / "configs" / "study"
SWEEP_SPECS = {"tokens.yaml"}
STUDY_TABLE = [("sks", False, 6958252186108282), ("sks", True, 342405815741279), ("http", False, 342405815741279),
               ("http", True, 8), ("hta", False, 44220), ("hta", True, 24277), ("oue", False, 14), ("oue", True, 0)]


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.name not in SWEEP_SPECS),
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_presets_load_and_validate(path):
    C.load(path).validate()


def test_exp2_resolves_to_exactly_the_study_values():
    cfg = C.load(STUDY / "exp2.yaml").resolved()
    assert cfg.data.token == "sks" and cfg.train.train_text_encoder is True
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seed) == (1300, 1, 42)
    assert (cfg.optim.lr_unet, cfg.optim.lr_text_encoder) == (3e-4, 1e-4)
    assert (cfg.sample.lora_scale_unet, cfg.sample.lora_scale_text_encoder, cfg.sample.guidance) == (0.4, 0.4, 6.4)
    assert cfg.sample.prompt == "A {token} dog" and cfg.fill(cfg.sample.prompt) == "A sks dog"
    assert cfg.sample.seeds == [342405815741279]
    assert cfg.data.class_name == "dog" and cfg.resolution == 512


@pytest.mark.parametrize("i", range(8))
def test_every_study_experiment_matches_the_table(i):
    cfg = C.load(STUDY / f"exp{i + 1}.yaml")
    assert (cfg.data.token, cfg.train.train_text_encoder, cfg.sample.seeds[0]) == STUDY_TABLE[i]
    assert cfg.train.steps == 1300 and cfg.sample.guidance == 6.4


@pytest.mark.parametrize("name,scale", [("small_dog_scale060.yaml", 0.6), ("small_dog_scale064.yaml", 0.64)])
def test_small_dog_presets(name, scale):
    cfg = C.load(STUDY / name)
    assert (cfg.train.steps, cfg.train.seed, cfg.sample.guidance) == (450, 42, 6.4)
    assert (cfg.sample.lora_scale_unet, cfg.sample.lora_scale_text_encoder) == (scale, scale)
    assert cfg.sample.seeds == [6275943528424243, 5214883712862421, 8077461472812382]
    assert cfg.fill(cfg.sample.prompt).startswith("A sks dog is sitting at the wheel of the car, her paws")
    assert cfg.sample.prompt.endswith("the whole dog is visible in the frame.")


def test_study_sweep_expands_to_the_eight_experiments():
    sweep = E.load_sweep(STUDY / "tokens.yaml")
    assert [r.id for r in sweep.runs] == [f"exp{i}" for i in range(1, 9)]
    assert [(r.config.data.token, r.config.train.train_text_encoder) for r in sweep.runs] == \
        [(t, te) for t, te, _ in STUDY_TABLE]
    assert len({r.config.hash() for r in sweep.runs}) == 8


def test_extends_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(C.ConfigError, match="loops"):
        C.load(tmp_path / "a.yaml")


def test_expand_grid_and_ids():
    combos = expand_grid({"data.token": ["sks", "oue"], "train.train_text_encoder": [False, True]})
    assert combos == [{"data.token": "sks", "train.train_text_encoder": False},
                      {"data.token": "sks", "train.train_text_encoder": True},
                      {"data.token": "oue", "train.train_text_encoder": False},
                      {"data.token": "oue", "train.train_text_encoder": True}]
    assert run_id(combos[1]) == "token=sks_train_text_encoder=true"
    with pytest.raises(C.ConfigError, match="grid.lr"):
        expand_grid({"lr": []})


def write_spec(tmp_path: Path, steps: int = 3) -> Path:
    spec = {
        "name": "two-by-two", "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": "tiny"}, "data": {"instance_dir": str(SAMPLE_SUBJECT)},
                 "train": {"steps": steps, "checkpoint_every": 1000},
                 "prior": {"num_class_images": 2, "steps": 2, "cache_dir": str(tmp_path / "cache")},
                 "sample": {"steps": 2, "seeds": [5, 6], "test_prompts": ["A {token} {class} in the forest"]}},
        "grid": {"data.token": ["sks", "oue"], "train.train_text_encoder": [False, True]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_by_two_sweep_runs_once_and_registers_four_runs(tmp_path, capsys):
    from dreambooth_lab.cli import main
    from dreambooth_lab.runs import dataset_digest, dataset_manifest

    sweep = E.load_sweep(write_spec(tmp_path))
    first = sweep.runs[1].id
    assert main(["sweep", str(write_spec(tmp_path)), "--only", first]) == 0  # one run from the CLI
    assert [p.parent.name.rsplit("-", 2)[0] for p in sweep.folder.glob("*/summary.json")] == [first]
    seen = []
    rows = E.run_sweep(sweep, progress=False, on_run=lambda rid, status: seen.append(status))
    assert seen == ["finished", "skipped", "finished", "finished"] and len(rows) == 4
    assert {r["status"] for r in rows} == {"finished"}
    assert {(r["token"], r["train_text_encoder"]) for r in rows} == {("sks", False), ("sks", True),
                                                                     ("oue", False), ("oue", True)}
    loaded = E.load_registry(sweep.folder)
    assert [r["id"] for r in loaded] == [first] + [r.id for r in sweep.runs if r.id != first]  # in start order
    assert all(Path(r["lora"]).is_file() and r["final_loss"] > 0 for r in loaded)
    csv_lines = (sweep.folder / "registry.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("id,status,config_hash")
    # the class images were made once and shared by the four runs
    assert len(list((tmp_path / "cache").glob("*/class_*.png"))) == 2
    # the registry says how each run was trained and pictured, with absolute paths
    digest = dataset_digest(dataset_manifest(SAMPLE_SUBJECT))
    for r in loaded:
        assert (r["resolution"], r["class_images"], r["photos"], r["dataset_digest"]) == (64, 2, 6, digest)
        assert (r["lora_scale_unet"], r["lora_scale_text_encoder"], r["guidance"]) == (0.4, 0.4, 6.4)
        assert r["generation_seeds"] == "5 6" and r["class_images_generated"] in (0, 2)
        for key in ("run_dir", "lora", "dataset"):
            assert Path(r[key]).is_absolute() and Path(r[key]).exists()
        assert (Path(r["run_dir"]) / "dataset.png").is_file()  # each run folder: its photos as trained
    assert not (tmp_path / "runs" / "dataset.png").exists()
    header = csv_lines[0].split(",")
    for column in ("resolution", "class_images", "lora_scale_unet", "lora_scale_text_encoder", "guidance",
                   "generation_seeds", "dataset_digest"):
        assert column in header
    capsys.readouterr()
    assert main(["sweep", str(write_spec(tmp_path)), "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert sum("finished (" in line for line in plan) == 4 and "0 to train" in plan[-1]

    before = sorted(p.name for p in sweep.folder.iterdir())
    seen.clear()
    E.run_sweep(E.load_sweep(write_spec(tmp_path)), progress=False, on_run=lambda rid, status: seen.append(status))
    assert seen == ["skipped"] * 4
    assert sorted(p.name for p in sweep.folder.iterdir()) == before  # no new run folders


def test_killed_sweep_finishes_the_rest_on_rerun(tmp_path):
    spec = write_spec(tmp_path, steps=60)
    folder = tmp_path / "runs" / "two-by-two"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth_lab", "sweep", str(spec)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(folder.glob("*/summary.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # as a Colab disconnect would
    finally:
        proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/summary.json")}
    assert 1 <= len(done_before) < 4
    seen = {}
    rows = E.run_sweep(E.load_sweep(spec), progress=False, on_run=lambda rid, status: seen.update({rid: status}))
    assert sum(s == "skipped" for s in seen.values()) == len(done_before)
    assert sum(s == "finished" for s in seen.values()) == 4 - len(done_before)
    assert [r["status"] for r in rows].count("finished") == 4
    for name, mtime in done_before.items():  # finished runs were not trained again
        assert (folder / name / "summary.json").stat().st_mtime_ns == mtime


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["grid"] = {"data.instance_dir": [str(tmp_path / "missing"), str(SAMPLE_SUBJECT)]}
    path.write_text(yaml.safe_dump(spec))
    seen = []
    rows = E.run_sweep(E.load_sweep(path), progress=False, on_run=lambda rid, status: seen.append(status))
    assert seen == ["failed", "finished"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "missing" in failed[0]["error"]


def test_sheets_have_the_expected_grid(tmp_path):
    from dreambooth_lab.compare import parameter_grid, runs_by_prompts

    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    del spec["grid"]
    spec["runs"] = [{"name": "a", "set": {"data.token": "sks", "sample.seeds": [5, 6]}},
                    {"name": "b", "set": {"data.token": "oue", "sample.seeds": [7]}},
                    {"name": "c", "set": {"data.token": "hta", "train.train_text_encoder": True, "sample.seeds": [8, 9]}}]
    path.write_text(yaml.safe_dump(spec))
    sweep = E.load_sweep(path)
    E.run_sweep(sweep, progress=False)
    runs = [r["run_dir"] for r in E.load_registry(sweep.folder)]
    # run b has been evaluated (with the tiny metric models): its row label carries the numbers
    (Path(runs[1]) / "metrics.json").write_text(json.dumps({
        "summary": {"dino": 0.61, "clip_i": 0.72, "clip_t": 0.27},
        "settings": {"dino_model": "tiny", "clip_model": "tiny"}}))
    sheet = runs_by_prompts(runs, tmp_path / "sheets", progress=False)
    layout = json.loads(sheet.with_suffix(".json").read_text())
    assert (layout["rows"], layout["cols"]) == (3, 3)  # 3 runs x (2 seeds + 1 test prompt)
    for row in layout["cells"]:
        seeds = [json.loads((sheet.parent / name).with_suffix(".json").read_text())["seed"] for name in row]
        assert seeds == [5, 6, 5]  # the same seeds in every row: the first run's
    # headers are prompts as generated (the class filled in, the token differing by row), not templates
    assert layout["col_labels"] == ["A [token] dog\nseed 5", "A [token] dog\nseed 6",
                                    "A [token] dog in the forest\nseed 5"]
    assert "[token]/[class] = the row's own" in layout["title"]
    labels = layout["row_labels"]
    assert labels[0].startswith("a\nsks, TE off, 3 steps") and labels[2].startswith("c\nhta, TE on")
    assert "DINO 0.61 CLIP-I 0.72 CLIP-T 0.27" in labels[1] and "not meaningful" in labels[1]
    assert "DINO" not in labels[0]

    own = runs_by_prompts(runs, tmp_path / "sheets", seeds="own", progress=False)
    layout = json.loads(own.with_suffix(".json").read_text())
    assert (layout["rows"], layout["cols"]) == (3, 3)  # the widest row: 2 own seeds + 1 test prompt
    got = [[json.loads((own.parent / n).with_suffix(".json").read_text())["seed"] if n else None for n in row]
           for row in layout["cells"]]
    assert got == [[5, 6, 5], [7, None, 7], [8, 9, 8]]  # each run with its own seeds
    assert layout["col_labels"][0] == "A [token] dog\nseed #1 (the run's own)"
    assert layout["row_labels"][1].split("\n")[3] == "seeds 7"
    single = runs_by_prompts(runs[:1], tmp_path / "sheets", progress=False)
    assert json.loads(single.with_suffix(".json").read_text())["col_labels"][0] == "A sks dog\nseed 5"
    with pytest.raises(ValueError, match="at least one run"):
        runs_by_prompts([], tmp_path / "sheets", progress=False)

    grid = parameter_grid(runs[1], rows=("lora_scale_unet", [0.2, 0.6, 1.0]),
                          cols=("lora_scale_text_encoder", [0.0, 0.5]), progress=False)
    layout = json.loads(grid.with_suffix(".json").read_text())
    assert (layout["rows"], layout["cols"]) == (3, 2)
    cell = json.loads((grid.parent / layout["cells"][2][1]).with_suffix(".json").read_text())
    assert (cell["lora_scale_unet"], cell["lora_scale_text_encoder"]) == (1.0, 0.5)
    w, h = Image.open(grid).size
    assert h > w  # three rows of two
    with pytest.raises(ValueError, match="cannot vary"):
        parameter_grid(runs[1], rows=("prompt", ["x"]), progress=False)


# ---- the sweep command: --only, --dry-run, relative paths --------------------------------------

def test_only_picks_runs_in_spec_order_and_names_unknown_ones(tmp_path, capsys):
    from dreambooth_lab.cli import main

    sweep = E.load_sweep(STUDY / "tokens.yaml")
    assert [r.id for r in E.select_runs(sweep, "exp8, exp2").runs] == ["exp2", "exp8"]
    assert E.select_runs(sweep, None) is sweep
    with pytest.raises(C.ConfigError, match=r"--only exp9: no such run .* exp1, exp2"):
        E.select_runs(sweep, ["exp2", "exp9"])
    assert main(["sweep", str(STUDY / "tokens.yaml"), "--only", "exp9", "--dry-run"]) == 2
    assert "no such run" in capsys.readouterr().err


def test_dry_run_shows_what_each_run_trains_and_whether_its_photos_are_there(tmp_path, capsys):
    from dreambooth_lab.cli import main

    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["grid"]["data.instance_dir"] = [str(SAMPLE_SUBJECT), str(tmp_path / "nowhere")]
    path.write_text(yaml.safe_dump(spec))
    sweep = E.load_sweep(path)
    want = {("oue", True, str(SAMPLE_SUBJECT)), ("sks", False, str(tmp_path / "nowhere"))}
    ids = [r.id for r in sweep.runs
           if (r.config.data.token, r.config.train.train_text_encoder, r.config.data.instance_dir) in want]
    assert main(["sweep", str(path), "--dry-run", "--only", ",".join(reversed(ids)), "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "token", "text", "encoder", "steps", "lr", "unet/te", "dataset", "photos",
                                "status"]
    present, missing = lines[1], lines[2]  # in the spec's order
    assert present.startswith(ids[0]) and missing.startswith(ids[1])
    assert " oue " in present and " trained " in present and " 7 " in present and " 0.0003/0.0001 " in present
    assert "6 photos" in present and present.endswith("to run")
    assert " sks " in missing and " frozen " in missing and " 0.0003 " in missing
    assert str(tmp_path / "nowhere") in missing and "MISSING" in missing and missing.endswith("dataset missing")
    assert "2 run(s), 2 to train" in out and f"runs go to {tmp_path / 'runs' / 'two-by-two'}" in out
    assert f"! dataset folder {tmp_path / 'nowhere'} does not exist" in out
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_relative_paths_mean_the_same_folder_from_the_cli_and_the_notebooks(tmp_path, monkeypatch):
    from dreambooth_lab import notebook

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "rel", "output_dir": "runs-rel",
                                    "base": {"model": {"name": "tiny"}, "data": {"instance_dir": "datasets/sample_subject"}},
                                    "runs": [{"name": "a"}, {"name": "b", "set": {"data.instance_dir": "datasets/x"}}]}))
    for cwd in (tmp_path, REPO / "configs"):  # the working folder does not matter
        monkeypatch.chdir(cwd)
        sweep = E.load_sweep(spec)
        assert sweep.runs[0].config.data.instance_dir == str(SAMPLE_SUBJECT)
        assert sweep.runs[1].config.data.instance_dir == str(REPO / "datasets" / "x")
        assert sweep.folder == REPO / "runs-rel" / "rel"
        # the notebooks' DATASET_DIR / OUTPUT_DIR take a relative path from the same place
        assert notebook.machine_overrides("datasets/sample_subject")["data.instance_dir"] == str(SAMPLE_SUBJECT)
        assert E.project_root() == notebook.find_repo_root() == REPO
    over = E.load_sweep(spec, {"data.instance_dir": "datasets/y", "train.output_dir": "elsewhere"})
    assert {r.config.data.instance_dir for r in over.runs} == {str(REPO / "datasets" / "y")}
    assert over.folder == REPO / "elsewhere" / "rel"


def test_run_status_names_interrupted_failed_and_photo_less_runs(tmp_path):
    from dreambooth_lab import files
    from dreambooth_lab.runs import Identity

    path = write_spec(tmp_path)
    sweep = E.load_sweep(path)
    run = sweep.runs[0]
    assert E.run_status(run) == "to run"
    assert E.run_status(run, {run.id: {"error": "ValueError: bad"}}) == "failed last time: ValueError: bad"
    folder = Path(run.config.train.output_dir) / f"{run.config.run_name}-20260101-000000"  # a disconnected run
    (folder / "checkpoints" / "step-000040").mkdir(parents=True)
    (folder / "checkpoints" / "step-000040" / "state.json").write_text("{}")
    files.write_json(folder / "identity.json", Identity.of(run.config).to_json())
    (folder / "config.yaml").write_text(C.to_yaml(run.config))
    assert E.run_status(run) == "interrupted at step 40 (resumes)"
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = E.SweepRun("bare", C.with_overrides(run.config, {"data.instance_dir": str(empty)}))
    assert E.run_status(bare) == "no photos in dataset"
    (plan,) = E.sweep_plan(E.Sweep("s", tmp_path, [bare]))
    assert plan["dataset_exists"] and plan["photos"] is None
    assert "no photos" in E.format_plan(E.Sweep("s", tmp_path, [bare]), [plan])
