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
    combos = E.expand_grid({"data.token": ["sks", "oue"], "train.train_text_encoder": [False, True]})
    assert combos == [{"data.token": "sks", "train.train_text_encoder": False},
                      {"data.token": "sks", "train.train_text_encoder": True},
                      {"data.token": "oue", "train.train_text_encoder": False},
                      {"data.token": "oue", "train.train_text_encoder": True}]
    assert E.run_id(combos[1]) == "token=sks_train_text_encoder=true"
    with pytest.raises(C.ConfigError, match="grid.lr"):
        E.expand_grid({"lr": []})


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


def test_two_by_two_sweep_runs_once_and_registers_four_runs(tmp_path):
    sweep = E.load_sweep(write_spec(tmp_path))
    seen = []
    rows = E.run_sweep(sweep, progress=False, on_run=lambda rid, status: seen.append(status))
    assert seen == ["finished"] * 4 and len(rows) == 4
    assert {r["status"] for r in rows} == {"finished"}
    assert {(r["token"], r["train_text_encoder"]) for r in rows} == {("sks", False), ("sks", True),
                                                                     ("oue", False), ("oue", True)}
    loaded = E.load_registry(sweep.folder)
    assert [r["id"] for r in loaded] == [r.id for r in sweep.runs]
    assert all(Path(r["lora"]).is_file() and r["final_loss"] > 0 for r in loaded)
    csv_lines = (sweep.folder / "registry.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("id,status,config_hash")
    # the class images were made once and shared by the four runs
    assert len(list((tmp_path / "cache").glob("*/class_*.png"))) == 2

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

    sweep = E.load_sweep(write_spec(tmp_path))
    E.run_sweep(sweep, progress=False)
    runs = [r["run_dir"] for r in E.load_registry(sweep.folder)][:3]
    sheet = runs_by_prompts(runs, tmp_path / "sheets", progress=False)
    layout = json.loads(sheet.with_suffix(".json").read_text())
    assert (layout["rows"], layout["cols"]) == (3, 3)  # 3 runs x (2 seeds + 1 test prompt)
    for row in layout["cells"]:
        seeds = [json.loads((sheet.parent / name).with_suffix(".json").read_text())["seed"] for name in row]
        assert seeds == [5, 6, 5]  # the same seeds in every row
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
