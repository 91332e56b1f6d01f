"""Every notebook in the repo runs top to bottom on the tiny model, and is committed clean.

Smoke mode (DREAMBOOTH_LAB_SMOKE=1) shrinks steps and sizes and never substitutes photos: the
notebooks that train get a temporary copy of the sample subject through their DATASET_DIR
parameter (injected after the `parameters` cell, as papermill does), and each one is also run
with the folder missing, where it must stop at its dataset cell with one message and train nothing.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, SAMPLE_SUBJECT

NOTEBOOKS = sorted(p for p in REPO.rglob("*.ipynb")
                   if not any(part.startswith(".") for part in p.relative_to(REPO).parts))
MAIN = REPO / "main.ipynb"
SWEEP_NB = REPO / "notebooks" / "02_token_sweep.ipynb"
SMALL_NB = REPO / "notebooks" / "03_small_dataset.ipynb"
EVAL_NB = REPO / "notebooks" / "04_evaluate.ipynb"
WITH_PHOTOS = (MAIN, SWEEP_NB, SMALL_NB, EVAL_NB)  # they read DATASET_DIR and are tested below
SETUP_MARK = "nb.setup("


def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMBOOTH_LAB_SMOKE", "1")
    monkeypatch.setenv("DREAMBOOTH_LAB_OUTPUT", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _inject(nb, **params):
    """A cell after the last `parameters` cell that sets `params` (papermill's injected-parameters)."""
    i = max(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    body = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(body, metadata={"tags": ["injected-parameters"]}))
    return nb


def _execute(path, may_stop=False, **params):
    """Run the notebook; with may_stop, an error stops it (as in Jupyter) and the outputs so far are kept."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = _inject(nbformat.read(path, as_version=4), **params) if params else nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError:
        if not may_stop:
            raise
    return nb


def _errors(nb):
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _photos(tmp_path) -> Path:
    """A temporary copy of the sample subject: the notebook's photos for this test."""
    return Path(shutil.copytree(SAMPLE_SUBJECT, tmp_path / "photos"))


def _two_run_spec(tmp_path) -> Path:
    """The study's sweep cut to exp1 and exp2 (same files, absolute paths), to keep the suite short."""
    study = REPO / "configs" / "study"
    spec = tmp_path / "tokens.yaml"
    spec.write_text(f"name: study-tokens\nruns: [{study / 'exp1.yaml'}, {study / 'exp2.yaml'}]\n")
    return spec


def test_there_is_a_main_notebook():
    assert MAIN in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS,
                         ids=lambda p: str(p.relative_to(REPO)))
def test_one_short_setup_cell_calls_the_shared_setup(path):
    nb = nbformat.read(path, as_version=4)
    setup = [c for c in nb.cells if c.cell_type == "code" and SETUP_MARK in c.source]
    assert len(setup) == 1, f"{path.name}: one set-up cell calling nb.setup()"
    assert len(setup[0].source.splitlines()) <= 15
    assert "pip" not in setup[0].source  # installing is the set-up function's job (with its marker)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_cells_stay_thin(path):
    """The notebooks call the package: no code cell over 25 lines."""
    nb = nbformat.read(path, as_version=4)
    long = {i: len(c.source.splitlines()) for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and len(c.source.splitlines()) > 25}
    assert not long, f"{path.name}: code cells {long} (cell: lines) are over 25 lines; move the logic into the package"


def test_main_form_defaults_are_the_package_s():
    from dreambooth_lab import notebook

    nb = nbformat.read(MAIN, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    values = {}
    for cell in cells:  # the experiment, this runtime, sampling: each cell short
        assert len(cell.source.splitlines()) <= 25
        for node in ast.parse(cell.source).body:
            values[node.targets[0].id] = ast.literal_eval(node.value)
    preset = values.pop("PRESET")
    assert preset == "" and values.pop("FORM_WINS") == ""
    switches = {k: values.pop(k) for k in notebook.FORM_SWITCHES}
    assert switches == notebook.FORM_SWITCHES
    assert values == notebook.FORM_DEFAULTS
    assert set(values) == set(notebook.FORM_FIELDS)
    cell = "\n".join(c.source for c in cells)
    # the dropdown offers every preset, the study's included, and no bf16 (a T4 has none)
    lines = {line.split("=")[0].strip(): line for line in cell.splitlines()}
    offered = ast.literal_eval(lines["PRESET"].split("#@param", 1)[1].strip())
    assert offered == [""] + notebook.preset_choices()
    study = {"configs/study/exp1.yaml", "configs/study/exp8.yaml", "configs/study/small_dog_scale060.yaml"}
    assert study <= set(offered)
    assert "bf16" not in lines["MIXED_PRECISION"]


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p not in WITH_PHOTOS],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_notebook_runs_on_the_tiny_model(path, tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    nb = _execute(path)
    assert not _errors(nb)
    if path.name in ("05_toy_world.ipynb", "06_beyond_the_recipe.ipynb"):  # replicated studies (#23): verdicts
        out = nbformat.writes(nb)
        assert "mean [95% t-interval] over 2 runs per setting" in out and "(n = 2 each, 95% intervals): " in out
    # the hub token, if any, never reaches the notebook's output
    secret = os.environ.get("HF_TOKEN")
    if secret:
        assert secret not in nbformat.writes(nb)


def test_main_trains_on_the_photos_it_is_given(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    photos = _photos(tmp_path)
    nb = _execute(MAIN, DATASET_DIR=str(photos), CLASS="toy")
    assert not _errors(nb)
    runs = list((tmp_path / "runs").glob("*/pytorch_lora_weights.safetensors"))
    assert runs, "main.ipynb trained nothing"
    out = nbformat.writes(nb)
    assert str(photos) in out
    for written in ("run folder:", "loss.png", "seed_grid.png", "prompt_suite.png", "written: ", "steps_x_seeds.png",
                    "kohya LoRA for A1111 / ComfyUI:"):
        assert written in out, f"main.ipynb does not say where {written!r} went"
    secret = os.environ.get("HF_TOKEN")
    if secret:
        assert secret not in out


def test_token_sweep_trains_every_run_and_prints_where(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    nb = _execute(SWEEP_NB, DATASET_DIR=str(_photos(tmp_path)), SWEEP_SPEC=str(_two_run_spec(tmp_path)))
    assert not _errors(nb)
    folder = tmp_path / "runs" / "study-tokens"
    assert len(list(folder.glob("*/pytorch_lora_weights.safetensors"))) == 2
    out = nbformat.writes(nb)
    for written in ("registry.csv", "instance_loss.png", "runs_x_prompts.png"):
        assert written in out


def test_small_dataset_trains_and_sweeps_scales(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    nb = _execute(SMALL_NB, DATASET_DIR=str(_photos(tmp_path)), UNET_SCALES=[0.0, 1.0], GUIDANCES=[3.0, 7.5],
                  TEXT_ENCODER_SCALES=[0.0, 1.0])
    assert not _errors(nb)
    assert list((tmp_path / "runs").glob("*/pytorch_lora_weights.safetensors"))
    out = nbformat.writes(nb)
    assert "run folder:" in out and "seed_grid.png" in out and out.count("written: ") >= 4


def test_evaluate_evaluates_finished_runs_only_and_names_the_missing(tmp_path, monkeypatch):
    """04 never trains: exp1 is trained here beforehand, exp2 is not, and stays untrained."""
    _env(monkeypatch, tmp_path)
    from dreambooth_lab import notebook
    from dreambooth_lab.train import train

    photos, spec = _photos(tmp_path), _two_run_spec(tmp_path)
    sweep = notebook.load_study(spec, str(photos))  # the same call the notebook makes
    train(sweep.runs[0].config, progress=False)
    nb = _execute(EVAL_NB, DATASET_DIR=str(photos), SWEEP_SPEC=str(spec))
    assert not _errors(nb)
    out = nbformat.writes(nb)
    assert "missing (not evaluated): exp2" in out
    assert "metrics.json" in out and "memorisation.png" in out and "metrics.png" in out
    # the interval table, the verdict (or why none: exp2 never trained) and the axis plot (#23)
    assert "group" in out and "no verdict on exp2 vs exp1: exp2: no finished run" in out
    assert "axis_token_dino.png" in out
    folder = tmp_path / "runs" / "study-tokens"
    assert len([p for p in folder.iterdir() if p.is_dir() and p.name.startswith("exp")]) == 1  # exp2 not trained
    assert list(folder.glob("exp1-*/metrics.json"))


@pytest.mark.parametrize(("path", "state"), [(p, "missing") for p in WITH_PHOTOS] + [(SWEEP_NB, "empty")],
                         ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else v)
def test_missing_photos_stop_at_the_dataset_cell(path, state, tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    photos = tmp_path / "no_photos_here"
    if state == "empty":
        photos.mkdir()
        (photos / "notes.txt").write_text("not a photo")
    nb = _execute(path, may_stop=True, DATASET_DIR=str(photos))
    errors = _errors(nb)
    assert len(errors) == 1, [o.get("evalue") for _, o in errors]
    index, error = errors[0]
    assert error.ename == "PhotosMissing"
    message = "\n".join(error.traceback)
    assert str(photos) in message and "DATASET_DIR" in message
    assert ("does not exist" if state == "missing" else "holds no photos") in message
    assert "check_photos(" in nb.cells[index].source  # it stopped at the dataset cell, not later
    assert not any(c.get("outputs") for c in nb.cells[index + 1:] if c.cell_type == "code")
    out = tmp_path / "runs"
    assert not out.exists() or not list(out.rglob("config.yaml")), "a run folder was made"
