"""Runs that are what they say: identity (config + photos), explicit resume checks, locks,
damaged checkpoints, fp16 scaler resume, NaN and Ctrl-C endings, the caller's global state."""

import json
import random
import shutil
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from conftest import SAMPLE_SUBJECT, poison_loss_after, tiny_config
from dreambooth_lab import checkpoint, run_lock, runs, trainer
from dreambooth_lab.models import resolve
from dreambooth_lab import train as train_mod
from dreambooth_lab.lora_check import PREFIX, read_metadata
from dreambooth_lab.faults import NonFiniteLoss, TrainingInterrupted
from dreambooth_lab.runs import read_metrics
from dreambooth_lab.train import train


def _photos(tmp_path):
    d = tmp_path / "photos"
    shutil.copytree(SAMPLE_SUBJECT, d)
    return d


def _unfinish(run):
    """Make a finished run look like one killed after its last checkpoint."""
    (run / "summary.json").unlink()
    (run / runs.LORA_FILE).unlink()


# ---- identity --------------------------------------------------------------------------------------

def test_dataset_digest_follows_names_and_bytes_and_says_what_changed(tmp_path):
    d = _photos(tmp_path)
    m = runs.dataset_manifest(d)
    assert runs.dataset_digest(m) == runs.dataset_digest(runs.dataset_manifest(d))
    (d / "extra.jpg").write_bytes((d / "subject_00.jpg").read_bytes())
    (d / "subject_01.jpg").write_bytes((d / "subject_02.jpg").read_bytes())
    (d / "subject_03.jpg").unlink()
    m2 = runs.dataset_manifest(d)
    assert runs.dataset_digest(m2) != runs.dataset_digest(m)
    assert runs.describe_change(m, m2) == ("1 added (extra.jpg), 1 removed (subject_03.jpg), "
                                           "1 changed (subject_01.jpg)")


def test_changed_photos_are_never_handed_back_as_the_old_run(tmp_path):
    photos = _photos(tmp_path)
    cfg = tiny_config(tmp_path, **{"data.instance_dir": str(photos), "train.steps": 4, "train.checkpoint_every": 2})
    first = train(cfg, resume=None, progress=False)
    digest = runs.dataset_digest(runs.dataset_manifest(photos))
    assert json.loads((first.run_dir / "summary.json").read_text())["dataset_digest"] == digest
    assert read_metadata(first.lora_path)[PREFIX + "dataset_digest"] == digest
    assert train(cfg, reuse_finished=True, progress=False).run_dir == first.run_dir

    (photos / "new.jpg").write_bytes((photos / "subject_00.jpg").read_bytes())
    with pytest.raises(runs.RunMismatch, match=r"1 added \(new\.jpg\).*new run"):
        train(cfg, reuse_finished=True, progress=False)

    (photos / "new.jpg").unlink()  # back to the old photos, and the run killed after its checkpoint
    _unfinish(first.run_dir)
    (photos / "subject_02.jpg").write_bytes((photos / "subject_04.jpg").read_bytes())
    with pytest.raises(runs.RunMismatch, match=r"1 changed \(subject_02\.jpg\).*resume=None"):
        train(cfg, resume="auto", progress=False)


def test_one_scan_of_the_runs_folder_answers_which_folder_a_train_call_uses(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    resolved = cfg.resolved().validate()
    ident = runs.Identity.of(resolved)
    assert runs.decide(resolved, ident).kind == "new"
    first = train(cfg, resume=None, progress=False)
    scans = []
    scan = runs._scan
    monkeypatch.setattr(runs, "_scan", lambda c, want: scans.append(c) or scan(c, want))
    reuse = runs.decide(resolved, ident, reuse_finished=True)
    assert (reuse.kind, reuse.path) == ("reuse", first.run_dir) and len(scans) == 1
    scans.clear()
    assert train(cfg, reuse_finished=True, progress=False).run_dir == first.run_dir and len(scans) == 1
    _unfinish(first.run_dir)
    assert runs.decide(resolved, ident, resume=None).kind == "new"  # no scan: always a new folder
    resume = runs.decide(resolved, ident, reuse_finished=True)
    assert (resume.kind, resume.path, resume.override) == ("resume", first.run_dir, None)
    scans.clear()
    done = train(cfg, reuse_finished=True, progress=False)
    assert done.run_dir == first.run_dir and done.resumed_from == 2 and len(scans) == 1


def test_resume_of_a_path_checks_config_and_photos_unless_told_otherwise(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    run = train(cfg, resume=None, progress=False).run_dir
    _unfinish(run)
    other = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2, "optim.lr_unet": 5e-4})
    with pytest.raises(runs.RunMismatch, match="config differs.*allow_change"):
        train(other, resume=run, progress=False)
    assert not (run / "summary.json").exists()
    done = train(other, resume=run, allow_change=True, progress=False)
    assert done.resumed_from == 2
    summary = json.loads((run / "summary.json").read_text())
    assert "config differs" in summary["resume_override"]["differences"][0]
    assert list(run.glob("config-resumed-*.yaml")) and (run / "config.yaml").is_file()


# ---- locks ---------------------------------------------------------------------------------------

def test_a_live_lock_refuses_a_second_trainer_and_a_dead_one_is_taken_over(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    run = train(cfg, resume=None, progress=False).run_dir
    assert not (run / run_lock.LOCK).exists(), "the lock is released when training ends"
    _unfinish(run)
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / run_lock.LOCK).write_text(json.dumps({"pid": alive.pid, "host": host, "started": "x"}))
        with pytest.raises(run_lock.RunLocked, match=f"process {alive.pid} on {host}"):
            train(cfg, resume="auto", progress=False)
    finally:
        alive.kill()
        alive.wait()
    with pytest.warns(run_lock.RunWarning, match=f"taking over .*process {alive.pid}"):
        done = train(cfg, resume="auto", progress=False)
    assert done.run_dir == run and done.resumed_from == 2 and not (run / run_lock.LOCK).exists()


def test_a_lock_from_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    (tmp_path / run_lock.LOCK).write_text(json.dumps({"pid": 1, "host": "another-colab-vm"}))
    with pytest.raises(run_lock.RunLocked, match="another-colab-vm"):
        run_lock.RunLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 120
    import os

    os.utime(tmp_path / run_lock.LOCK, (old, old))
    with pytest.warns(run_lock.RunWarning, match="another-colab-vm"):
        lock = run_lock.RunLock(tmp_path, heartbeat=0.05, stale_after=60).acquire()
    time.sleep(0.2)
    assert time.time() - (tmp_path / run_lock.LOCK).stat().st_mtime < 5, "the heartbeat refreshes the lock"
    lock.release()
    assert not (tmp_path / run_lock.LOCK).exists()


# ---- checkpoints ---------------------------------------------------------------------------------------

def test_a_damaged_checkpoint_is_named_and_the_older_one_used(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 2, "train.checkpoints_to_keep": 3,
                                   "train.train_text_encoder": True})
    first = train(cfg, resume=None, progress=False)
    reference = first.lora_path.read_bytes()
    run = first.run_dir
    _unfinish(run)
    damaged = run / "checkpoints" / "step-000004" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"optimizer\.safetensors.*truncated"):
        checkpoint.verify(damaged.parent)
    with pytest.warns(run_lock.RunWarning, match=r"step-000004 \(.*optimizer\.safetensors.*resuming from step-000002"):
        again = train(cfg, resume="auto", progress=False)
    assert again.resumed_from == 2
    assert again.lora_path.read_bytes() == reference


def test_checkpoint_files_carry_a_manifest_that_catches_a_flipped_byte(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 3, "train.checkpoint_every": 2})
    run = train(cfg, resume=None, progress=False).run_dir
    ck = checkpoint.list_checkpoints(run)[-1]
    checkpoint.verify(ck)
    f = ck / "lora_params.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF
    f.write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="lora_params.safetensors.*sha256"):
        checkpoint.verify(ck)
    assert checkpoint.latest_good(run).path is None


PLANTED = {2, 5}  # steps whose gradient is made inf: fp16 overflow, forced


def _forced_overflow(monkeypatch):
    """A CPU GradScaler (accelerate makes one only on GPUs) and inf gradients on PLANTED steps."""
    state = {"step": None}
    from dreambooth_lab import lora

    real_make, real_loss, real_add = train_mod.make_accelerator, trainer.DreamBoothObjective.loss, lora.add_adapters

    def make(train, family):
        acc = real_make(train, family)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
        acc.native_amp = True
        return acc

    def loss(self, step, micro):
        state["step"] = step
        return real_loss(self, step, micro)

    def add(*args, **kwargs):
        params = real_add(*args, **kwargs)
        params[0].register_hook(lambda g: g * float("inf") if state["step"] in PLANTED else g)
        return params

    monkeypatch.setattr(train_mod, "make_accelerator", make)
    monkeypatch.setattr(trainer.DreamBoothObjective, "loss", loss)
    monkeypatch.setattr(lora, "add_adapters", add)


def test_fp16_resume_restores_the_scaler_and_the_schedule_waits_on_skipped_steps(tmp_path, monkeypatch):
    _forced_overflow(monkeypatch)
    over = {"train.steps": 10, "train.checkpoint_every": 4, "train.mixed_precision": "fp16",
            "optim.lr_scheduler": "linear", "optim.lr_warmup_steps": 2}
    reference = train(tiny_config(tmp_path / "ref", **over), resume=None, progress=False)
    lrs = [r["lr"] for r in reference.history]
    scales = [r["loss_scale"] for r in reference.history]
    for s in PLANTED:  # records are 1-based: step s is record s
        assert lrs[s] == lrs[s - 1] and scales[s] == scales[s - 1] / 2, (s, lrs, scales)
    assert len(set(lrs)) > 5, "the schedule is not constant"

    cfg = tiny_config(tmp_path / "cut", **over)

    def stop(record):
        if record["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="interrupted at step 7 of 10.*run the same command to resume"):
        train(cfg, resume=None, progress=False, on_step=stop)
    run = next((tmp_path / "cut" / "runs").iterdir())
    assert json.loads((run / "checkpoints" / "step-000004" / "scaler.json").read_text())["scale"] == 2.0 ** 9
    resumed = train(cfg, resume="auto", progress=False)
    assert resumed.resumed_from == 4
    assert resumed.lora_path.read_bytes() == reference.lora_path.read_bytes()
    assert [(r["lr"], r["loss_scale"]) for r in read_metrics(run)] == list(zip(lrs, scales))


# ---- endings ------------------------------------------------------------------------------------

def test_nan_loss_ends_with_one_line_and_marks_the_run_failed(tmp_path, monkeypatch, capsys):
    from dreambooth_lab import cli, config

    calls = poison_loss_after(monkeypatch, 4)
    cfg = tiny_config(tmp_path, **{"train.steps": 10, "train.checkpoint_every": 2})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(config.to_yaml(cfg))
    assert cli.main(["train", "--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    run = next((tmp_path / "runs").iterdir())
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    err = errors[0]
    assert "step 5" in err and "lr_unet" in err and str(run / "checkpoints" / "step-000004") in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_at_step"] == 5
    assert not (run / runs.LORA_FILE).exists()
    with pytest.raises(NonFiniteLoss):  # the same config again starts a new run (the failed one is not resumed)
        calls["n"] = 0
        train(cfg, resume="auto", progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_ctrl_c_in_the_cli_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from dreambooth_lab import cli

    def interrupted(cfg, **kw):
        raise TrainingInterrupted("interrupted at step 3 of 6 (runs/x); run the same command to resume")

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert cli.main(["train", "--data", str(SAMPLE_SUBJECT), "--model", "tiny"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step 3" in err and "run the same command to resume" in err


def test_unwritable_output_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(train_mod, "load_pipeline", never)
    cfg = tiny_config(tmp_path, **{"train.output_dir": str(blocker / "runs")})
    with pytest.raises(PermissionError, match="a-file"):
        train(cfg, resume=None, progress=False)


# ---- the caller's state ------------------------------------------------------------------------

def _draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_training_leaves_the_callers_rng_and_tf32_flags_alone(tmp_path):
    def seed():
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)

    seed()
    expected = _draws()
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    seen = []
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        seed()
        train(tiny_config(tmp_path, **{"train.allow_tf32": True}), resume=None, progress=False,
              on_step=lambda r: seen.append(torch.backends.cuda.matmul.allow_tf32))
        assert _draws() == expected
        assert seen and all(seen), "TF32 is on while training, as asked"
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---- prompts ------------------------------------------------------------------------------------

def test_a_prompt_over_77_tokens_is_warned_with_the_dropped_words(tiny_pipe):
    from dreambooth_lab.prompts import truncation_warning

    assert truncation_warning(tiny_pipe.tokenizer, "a photo of sks dog") is None
    long = "a photo of sks dog " + " ".join(["sitting"] * 75) + " beside a purple lighthouse"
    msg = truncation_warning(tiny_pipe.tokenizer, long)
    assert msg and "purple lighthouse" in msg and "75" in msg


def test_the_objective_warns_about_a_truncated_instance_prompt(tmp_path, tiny_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet

    cfg = tiny_config(tmp_path, **{"data.instance_prompt": "a photo of {token} {class} " + "very " * 80 + "fluffy"})
    photos = ImageSet.from_folder(SAMPLE_SUBJECT, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.DreamBoothObjective(cfg.resolved(), tiny_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    assert any("fluffy" in str(w.message) for w in caught)
