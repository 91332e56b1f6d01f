"""A first day on Colab (issue #22): presets keep the machine's speed settings, a changed photo
folder or a CPU runtime stops with one line, pip's noise is read, photos come in by upload or zip."""

from __future__ import annotations

import io
import shutil
import types
import zipfile
from pathlib import Path

import pytest
from conftest import SAMPLE_SUBJECT, tiny_config

from dreambooth_lab import colab
from dreambooth_lab import notebook as nb


@pytest.fixture
def on_a_t4(monkeypatch):
    """torch.cuda as a 15 GB T4 without bf16 reports it (nothing runs on it: configuring only)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - imported before CUDA is faked
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=15 * 2**30))
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)


def _form(tmp_path, **changes):
    return dict(nb.FORM_DEFAULTS, OUTPUT_DIR=str(tmp_path), DATASET_DIR=str(SAMPLE_SUBJECT), **changes)


# ---- 1. presets describe the experiment; the machine's settings come from the form and runtime ----------

@pytest.mark.parametrize("preset", ["configs/study/exp2.yaml", "configs/study/small_dog_scale060.yaml"])
def test_a_study_preset_keeps_the_form_s_speed_settings(on_a_t4, tmp_path, preset):
    """The issue's table: exp2 came out fp32, plain AdamW, a checkpoint every 500 steps."""
    cfg, sources = nb.configure(_form(tmp_path), preset)
    assert (cfg.train.mixed_precision, cfg.optim.optimizer, cfg.train.checkpoint_every) == ("fp16", "adamw8bit", 400)
    assert sources["train.mixed_precision"] == sources["optim.optimizer"] == sources["train.checkpoint_every"] == "form"
    assert cfg.model.variant == "fp16" and sources["model.variant"] == "this machine"  # SD1.5 publishes fp16 files
    assert sources["train.steps"] == "preset" and sources["data.token"] == "preset"  # the experiment is the preset's
    first = nb.summary(cfg, sources).splitlines()[:2]
    assert first[0].startswith("train.mixed_precision") and "'fp16'" in first[0]
    assert first[1].startswith("optim.optimizer") and "'adamw8bit'" in first[1]


@pytest.mark.parametrize(("value", "expected"), [("off", False), (False, False), ("on", True), (True, True)])
def test_a_machine_field_the_user_set_wins_even_at_the_package_default(on_a_t4, tmp_path, value, expected):
    """colab_t4 sets gradient checkpointing; GRADIENT_CHECKPOINTING='off' in the form still wins."""
    cfg, sources = nb.configure(_form(tmp_path, GRADIENT_CHECKPOINTING=value), "configs/colab_t4.yaml")
    assert cfg.train.gradient_checkpointing is expected and sources["train.gradient_checkpointing"] == "form"


def test_auto_checkpointing_asks_the_memory_model(on_a_t4, tmp_path):
    sd15, src15 = nb.configure(_form(tmp_path), "configs/colab_t4.yaml")
    sdxl, srcxl = nb.configure(_form(tmp_path), "configs/colab_t4_sdxl.yaml")
    assert not sd15.train.gradient_checkpointing and sdxl.train.gradient_checkpointing
    assert srcxl["train.gradient_checkpointing"].startswith("auto (") and "predicted" in srcxl["train.gradient_checkpointing"]


def test_a_bad_checkpointing_value_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="GRADIENT_CHECKPOINTING='maybe'"):
        nb.configure(_form(tmp_path, GRADIENT_CHECKPOINTING="maybe"))


def test_a_sweep_takes_the_runtime_s_settings_where_its_files_are_silent(tmp_path, monkeypatch):
    """Notebook 02's eight runs: fp16 and 8-bit AdamW on a GPU; a value a run file sets is kept."""
    from dreambooth_lab.experiments import load_sweep

    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    (tmp_path / "base.yaml").write_text("model: {name: tiny}\ndata: {instance_dir: %s}\n" % SAMPLE_SUBJECT)
    (tmp_path / "a.yaml").write_text("extends: base.yaml\ndata: {token: sks}\n")
    (tmp_path / "b.yaml").write_text("extends: base.yaml\ndata: {token: oue}\noptim: {optimizer: adamw}\n")
    (tmp_path / "spec.yaml").write_text(f"name: s\noutput_dir: {tmp_path / 'runs'}\nruns: [a.yaml, b.yaml]\n"
                                        "grid: {train.checkpoint_every: [77]}\n")
    sweep = load_sweep(tmp_path / "spec.yaml", machine=nb.runtime_settings(cuda=True))
    a, b = (r.config for r in sweep.runs)
    assert (a.train.mixed_precision, a.optim.optimizer) == ("fp16", "adamw8bit")
    assert (b.train.mixed_precision, b.optim.optimizer) == ("fp16", "adamw")  # b.yaml's own choice
    assert a.train.checkpoint_every == b.train.checkpoint_every == 77  # the grid's value wins too
    assert nb.runtime_settings(cuda=False)["train.mixed_precision"] == "no"


def test_notebook_02_shows_precision_and_optimizer_per_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    sweep = nb.load_study("configs/study/tokens.yaml", str(SAMPLE_SUBJECT), str(tmp_path))
    nb.sweep_status(sweep)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("exp")]
    assert len(lines) == 8 and all("precision=" in line and "optimizer=" in line for line in lines)


# ---- 2. a changed photo folder; 6. a CPU runtime ----------------------------------------------------

def test_changed_photos_stop_with_one_line_and_new_run_starts_over(tmp_path, monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE_SUBJECT, photos)
    cfg = tiny_config(tmp_path, **{"data.instance_dir": str(photos), "train.steps": 2, "prior.enabled": False})
    first = nb.train_run(cfg)
    sorted(photos.glob("*.jpg"))[0].unlink()  # the user removes a bad photo and runs the cell again
    with pytest.raises(nb.NotebookStop) as stop:
        nb.train_run(cfg)
    text = "\n".join(stop.value._render_traceback_())
    assert "NEW_RUN" in text and "train(cfg)" not in text and "--new-run" not in text
    second = nb.train_run(cfg, new_run=True)
    assert second.run_dir != first.run_dir and first.run_dir.is_dir()  # the old run is kept


def test_a_hub_model_on_a_cpu_runtime_stops_before_loading(tmp_path, monkeypatch):
    import sys

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    cfg = tiny_config(tmp_path, **{"model.name": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    with pytest.raises(nb.NotebookStop, match="Change runtime type.*ALLOW_CPU"):
        nb.train_run(cfg)
    assert not (tmp_path / "runs").exists()  # stopped before any folder or download
    assert colab.cpu_runtime_problem("toyworld", cuda=False, colab=True) is None
    assert colab.cpu_runtime_problem("tiny", cuda=False, colab=True) is None
    assert colab.cpu_runtime_problem("some/model", cuda=True, colab=True) is None


# ---- 7. set-up: pip's noise, the model on Drive, fp16 files, Colab's widgets ------------------------

PIP_OUTPUT = """\
ERROR: pip's dependency resolver does not currently take into account all the packages that are installed.
torchvision 0.20.1+cu121 requires torch==2.5.1, but you have torch 2.6.0 which is incompatible.
gcsfs 2024.10.0 requires fsspec==2024.10.0, but you have fsspec 2025.3.0 which is incompatible.
peft 0.21.2 requires accelerate>=1.16, but you have accelerate 1.15.0 which is incompatible.
"""


def test_pip_conflicts_of_colab_s_own_packages_are_called_expected():
    ours = colab.requirement_names((Path(nb.find_repo_root()) / "requirements.txt").read_text())
    assert {"diffusers", "peft", "ipywidgets"} <= ours
    expected, mine = colab.pip_conflicts(PIP_OUTPUT, ours)
    assert [line.split()[0] for line in expected] == ["torchvision", "gcsfs"]
    assert [line.split()[0] for line in mine] == ["peft"]
    report = colab.pip_report(PIP_OUTPUT, ours)
    assert "expected" in report[0] and "gcsfs, torchvision" in report[0] and "peft 0.21.2" in report[1]
    assert colab.pip_report("Successfully installed x", ours) == []


def test_the_install_prints_which_pip_warnings_are_expected(tmp_path, capsys):
    (tmp_path / "requirements.txt").write_text("peft==0.21.2\n")

    def run(cmd, check=False, **kw):
        return types.SimpleNamespace(stdout="", stderr=PIP_OUTPUT)

    assert nb.ensure_installed(tmp_path, run=run) is True
    out = capsys.readouterr().out
    assert "are expected" in out and "torchvision" in out and "peft 0.21.2 requires" in out


def test_the_model_cache_goes_to_drive_before_the_hub_is_imported(tmp_path):
    environ = {}
    line = colab.drive_model_cache(tmp_path / "hf-cache", environ)
    assert environ[colab.HF_CACHE_ENV] == str(tmp_path / "hf-cache") and (tmp_path / "hf-cache").is_dir()
    assert line.startswith("model cache:")


@pytest.mark.parametrize(("name", "variant", "cuda", "mp", "expected"), [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, True, "fp16", "fp16"),
    ("stabilityai/stable-diffusion-xl-base-1.0", None, True, "fp16", "fp16"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, False, "fp16", None),  # CPU: full weights
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, True, "no", None),  # fp32 training
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "main", True, "fp16", "main"),  # the user's own
    ("tiny", None, True, "fp16", None),
])
def test_the_fp16_variant_is_loaded_on_a_gpu_in_fp16(name, variant, cuda, mp, expected):
    assert colab.fp16_variant(name, variant, cuda, mp) == expected


def test_the_widget_requirement_keeps_colab_s_own_ipywidgets():
    """Colab ships ipywidgets 7.7.1 with its widget manager; a requirement it satisfies is not reinstalled."""
    from packaging.requirements import Requirement

    req = next(Requirement(line.split("#")[0].strip()) for line in (Path(nb.find_repo_root()) / "requirements.txt").read_text().splitlines()
               if line.startswith("ipywidgets"))
    assert req.specifier.contains("7.7.1") and req.specifier.contains("8.1.5")


# ---- 8. photos in -------------------------------------------------------------------------------------

def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_zip_of_photos_is_unpacked_flat_and_checked(tmp_path):
    photo = sorted(SAMPLE_SUBJECT.glob("*.jpg"))[0].read_bytes()
    archive = tmp_path / "my_dog.zip"
    archive.write_bytes(_zip({"my_dog/a.png": photo, "my_dog/a.txt": b"a photo of {token} {class}",
                              "__MACOSX/my_dog/._a.png": b"junk", "my_dog/notes.pdf": b"%PDF",
                              "../../escape.png": photo}))
    dest = tmp_path / "dataset"
    added = nb.add_photos(dest, zip_path=str(archive))
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.txt", "escape.png"]  # nothing left dest
    assert [p.name for p in added] == ["a.png", "escape.png"]
    assert nb.add_photos(dest, zip_path=str(archive)) == []  # the same files again: nothing to add
    archive.write_bytes(_zip({"a.png": b"other bytes"}))
    with pytest.raises(nb.NotebookStop, match="a.png"):
        nb.add_photos(dest, zip_path=str(archive))  # never overwrites a different photo
    assert (dest / "a.png").read_bytes() == photo
    with pytest.raises(nb.NotebookStop, match="does not exist"):
        nb.add_photos(dest, zip_path=str(tmp_path / "missing.zip"))
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(nb.NotebookStop, match="bad.zip"):
        nb.add_photos(dest, zip_path=str(tmp_path / "bad.zip"))


def test_upload_uses_colab_s_file_picker(tmp_path, monkeypatch):
    import sys

    photo = sorted(SAMPLE_SUBJECT.glob("*.jpg"))[0].read_bytes()
    fake = types.ModuleType("google.colab")
    fake.files = types.SimpleNamespace(upload=lambda: {"b.png": photo, "more.zip": _zip({"c.png": photo})})
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", fake)
    added = nb.add_photos(tmp_path / "d", upload=True)
    assert sorted(p.name for p in added) == ["b.png", "c.png"]


def test_upload_off_colab_says_what_to_do(tmp_path):
    with pytest.raises(nb.NotebookStop, match="copy the photos"):
        nb.add_photos(tmp_path / "d", upload=True)


# ---- 3. a reconnect meets the lock of its own gone runtime --------------------------------------------

def test_a_lock_left_by_a_live_looking_runtime_is_taken_over_when_ticked(tmp_path, monkeypatch):
    """The old VM's heartbeat is recent (the reconnect came quickly): one line that names
    TAKE_OVER_LOCK; ticked, the run resumes from its checkpoint."""
    import json
    import time

    from dreambooth_lab import run_lock
    from dreambooth_lab.faults import TrainingInterrupted
    from dreambooth_lab.train import train

    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2, "prior.enabled": False})

    def cut(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(cfg, resume=None, progress=False, on_step=cut)
    run = next((tmp_path / "runs").iterdir())
    lock = {"pid": 4242, "host": "a-colab-vm-that-is-gone", "started": "x", "token": "t"}
    (run / run_lock.LOCK).write_text(json.dumps(lock))
    now = time.time()
    import os

    os.utime(run / run_lock.LOCK, (now, now))  # its heartbeat was seconds ago
    with pytest.raises(nb.NotebookStop, match="TAKE_OVER_LOCK"):
        nb.train_run(cfg)
    result = nb.train_run(cfg, take_over_lock=True)
    assert result.run_dir == run and result.resumed_from == 2


# ---- 9. the toy-world notebooks on Colab ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["05_toy_world.ipynb", "06_beyond_the_recipe.ipynb"])
def test_world_notebooks_write_to_drive_and_mount_it(name):
    import nbformat

    cells = nbformat.read(Path(nb.find_repo_root()) / "notebooks" / name, as_version=4).cells
    source = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert 'MOUNT_DRIVE = True' in source and 'OUTPUT_DIR = ""' in source
    assert "nb.output_folder(OUTPUT_DIR)" in source and '"runs"' not in source


def test_output_folder_is_drive_when_mounted(tmp_path, monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    monkeypatch.setattr(nb.runtime, "DRIVE", tmp_path)
    monkeypatch.setattr(nb.runtime, "DRIVE_RUNS", tmp_path / "dreambooth_lab" / "runs")
    assert nb.output_folder("") == str(tmp_path / "dreambooth_lab" / "runs")
    assert nb.output_folder(str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_world_runs_checkpoint_often_enough_to_resume():
    from dreambooth_lab.world import study

    cfg = study.world_recipe_config("dog", 5)
    assert cfg.train.checkpoint_every < cfg.train.steps  # a disconnect resumes instead of starting over


# ---- 4. the step to keep, exported under the run's own name -------------------------------------------

def test_the_export_cell_names_the_file_after_the_run_and_offers_it(trained_run, tmp_path, monkeypatch):
    import sys

    offered = []
    fake = types.ModuleType("google.colab")
    fake.files = types.SimpleNamespace(download=offered.append)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", fake)
    path = nb.export_lora(trained_run.run_dir, step=0)  # the form's 0 = the final LoRA
    assert path.name == f"{trained_run.run_dir.name}_kohya.safetensors" and offered == [str(path)]
    assert nb.export_lora(trained_run.run_dir) == path  # run again: the same file, not a copy
    with pytest.raises(nb.NotebookStop, match="step"):
        nb.export_lora(trained_run.run_dir, step=3)  # no LoRA was saved at step 3
