"""Sweeps on a real local Ray (#24): `ray.init(num_cpus=2)`, CPU workers, the tiny model. The same
registry rows and LoRA bytes as the sequential sweep, class images made once, a killed worker
retried and resumed, Ctrl-C cancels and the same call resumes, storage a worker cannot see stops
the sweep at once."""

from __future__ import annotations

import _thread
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dreambooth_lab import experiments as E
from dreambooth_lab import launch_ray
from dreambooth_lab.config import with_overrides
from dreambooth_lab.registry import FAILURES
from test_sweep_concurrency import write_spec

ray = pytest.importorskip("ray", reason="the Ray launcher's tests need ray (requirements-dev.txt installs it)")

# the interrupted runs: the first checkpoint at step EVERY, long enough after it (a tiny step is a few
# ms) for the kill or Ctrl-C to land mid-run
STEPS, EVERY = 150, 10
VOLATILE = {"run_dir", "lora", "seconds", "class_images_generated"}  # where and how long, not what was trained


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def one_run_spec(tmp_path: Path, steps: int, checkpoint_every: int) -> E.Sweep:
    import yaml

    path = write_spec(tmp_path, steps=steps, name="one")
    spec = yaml.safe_load(path.read_text())
    spec["grid"] = {"data.token": ["sks"]}
    spec["base"]["train"]["checkpoint_every"] = checkpoint_every
    path.write_text(yaml.safe_dump(spec))
    return E.load_sweep(path)


def when_checkpointed(sweep: E.Sweep, then) -> threading.Thread:
    """Call then(run folder) as soon as the sweep's run has written its first checkpoint."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            for ckpt in sweep.folder.glob("*/checkpoints/step-*"):
                then(ckpt.parent.parent)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_four_run_sweep_on_two_workers_matches_the_sequential_sweep(tmp_path, local_ray):
    sequential = E.load_sweep(write_spec(tmp_path / "seq"))
    on_ray = E.load_sweep(write_spec(tmp_path / "ray"))
    expected = {r["id"]: r for r in E.run_sweep(sequential, progress=False)}
    seen = []
    rows = E.run_sweep(on_ray, launcher="ray", progress=False, poll=0.2, on_run=lambda rid, s: seen.append((rid, s)))
    assert sorted(seen) == sorted((r.id, "finished") for r in on_ray.runs)
    got = {r["id"]: r for r in rows}
    assert got.keys() == expected.keys() and len(rows) == 4
    for rid, row in got.items():
        assert {k: v for k, v in row.items() if k not in VOLATILE} == \
            {k: v for k, v in expected[rid].items() if k not in VOLATILE}
        assert Path(row["lora"]).read_bytes() == Path(expected[rid]["lora"]).read_bytes()  # the same LoRA bytes
    assert E.load_registry(on_ray.folder) == rows
    # two runs started at once need the same class images: made once, under the cache's lock
    assert sum(r["class_images_generated"] for r in rows) == 2
    assert not list(on_ray.folder.glob(".storage-probe-*"))  # the driver's probes are removed
    # a second sweep skips every run, without a task
    seen.clear()
    E.run_sweep(on_ray, launcher="ray", progress=False, poll=0.2, on_run=lambda rid, s: seen.append(s))
    assert seen == ["skipped"] * 4


def test_a_worker_killed_mid_run_is_retried_and_resumes(tmp_path, local_ray):
    from dreambooth_lab.train import train

    sweep = one_run_spec(tmp_path, steps=STEPS, checkpoint_every=EVERY)
    killed = {}

    def kill(run_dir: Path) -> None:  # the worker process that trains it, as the OOM killer would
        holder = json.loads((run_dir / "train.lock").read_text())
        os.kill(holder["pid"], signal.SIGKILL)
        killed.update(holder)

    watcher = when_checkpointed(sweep, kill)
    (row,) = E.run_sweep(sweep, launcher="ray", progress=False, poll=0.2, max_retries=1)
    watcher.join(timeout=5)
    assert killed and row["status"] == "finished"
    run_dir = Path(row["run_dir"])
    assert [p for p in sweep.folder.iterdir() if (p / "config.yaml").is_file()] == [run_dir]  # resumed in place
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is not None and EVERY <= summary["resumed_from"] < STEPS
    cfg = with_overrides(sweep.runs[0].config, {"train.output_dir": str(tmp_path / "reference")})
    reference = train(cfg, resume=None, progress=False)  # uninterrupted: the very same LoRA
    assert Path(row["lora"]).read_bytes() == reference.lora_path.read_bytes()


def test_ctrl_c_cancels_the_tasks_and_the_same_call_resumes(tmp_path, local_ray):
    # Ctrl-C as a terminal delivers it: Python's own SIGINT handler (a library used by an earlier test
    # in this worker may have left its own, which interrupt_main would call instead)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_then_resume(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_then_resume(tmp_path):
    sweep = one_run_spec(tmp_path, steps=STEPS, checkpoint_every=EVERY)
    watcher = when_checkpointed(sweep, lambda run_dir: _thread.interrupt_main())
    with pytest.raises(launch_ray.SweepInterrupted) as err:
        E.run_sweep(sweep, launcher="ray", progress=False, poll=0.2)
    watcher.join(timeout=5)
    assert "0 of 1 runs finished" in str(err.value) and "run the same command to resume" in str(err.value)
    (row,) = E.run_sweep(sweep, launcher="ray", progress=False, poll=0.2)
    summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
    assert row["status"] == "finished" and summary["resumed_from"] >= EVERY


def test_a_worker_that_cannot_see_the_sweep_folder_stops_the_sweep_at_once(tmp_path, local_ray, monkeypatch):
    sweep = E.load_sweep(write_spec(tmp_path))
    # what a node without the shared folder sees: no probe there
    monkeypatch.setattr(launch_ray, "write_probes", lambda s: {str(s.folder / ".storage-probe-x"): "x\n"})
    t0 = time.time()
    with pytest.raises(launch_ray.StorageNotShared, match=r"the Ray worker on .+ cannot see .+two-by-two .*every Ray "
                       r"node mounts at the same path"):
        E.run_sweep(sweep, launcher="ray", progress=False, storage_wait=0.2)
    assert time.time() - t0 < 60
    assert not [p for p in sweep.folder.iterdir() if (p / "config.yaml").is_file()]  # no run started


def test_resources_the_cluster_cannot_give_are_one_line(tmp_path, local_ray, capsys):
    from dreambooth_lab.cli import main

    spec = str(write_spec(tmp_path))
    assert main(["sweep", spec, "--launcher", "ray", "--gpus-per-run", "1"]) == 1
    assert "error: --gpus-per-run 1: the Ray cluster has 0 GPU(s): pass --gpus-per-run 0" in capsys.readouterr().err
    assert main(["sweep", spec, "--launcher", "ray", "--cpus-per-run", "3"]) == 1
    assert "--cpus-per-run 3: give a number from 1 to the 2 CPU(s)" in capsys.readouterr().err


def test_the_driver_prints_a_bar_over_runs_and_a_line_per_run_started_finished_or_failed(tmp_path, local_ray,
                                                                                         capsys):
    import yaml

    path = write_spec(tmp_path, name="one-fails")
    spec = yaml.safe_load(path.read_text())
    (tmp_path / "empty").mkdir()
    spec["grid"] = {"data.instance_dir": [spec["base"]["data"]["instance_dir"], str(tmp_path / "empty")]}
    path.write_text(yaml.safe_dump(spec))
    sweep = E.load_sweep(path)
    good, bad = sweep.runs
    rows = E.run_sweep(sweep, launcher="ray", progress=True, poll=0.2)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert any(line.startswith(f"started {good.id}: process ") for line in lines), out
    assert any(line.startswith(f"finished {good.id} in ") for line in lines), out
    assert any(line.startswith(f"failed {bad.id} ") and "DatasetError: no images in" in line
               for line in lines), out
    assert "runs: 100%" in err and "2/2" in err  # the bar over runs (tqdm, on stderr)
    assert {r["id"]: r["status"] for r in rows} == {good.id: "finished", bad.id: "failed"}
    assert bad.id in json.loads((sweep.folder / FAILURES).read_text())  # recorded, as the sequential sweep does


def test_a_worker_that_cannot_see_the_photos_stops_the_sweep_at_once(tmp_path):
    """The photo folders are checked too (read only: nothing is written into them); the check itself,
    as a worker on a node without the shared folder runs it."""
    sweep = E.load_sweep(write_spec(tmp_path))
    probes = launch_ray.write_probes(sweep)
    photos = [p for p, token in probes.items() if token is None]
    assert photos == [str(Path(sweep.runs[0].config.data.instance_dir).resolve())]
    assert launch_ray.check_storage(probes, wait=0)  # this machine sees them all
    moved = {**probes, str(tmp_path / "not-mounted-here"): None}
    with pytest.raises(launch_ray.StorageNotShared, match=r"cannot see the photos folder .+not-mounted-here: every "
                       r"Ray node reads the photos"):
        launch_ray.check_storage(moved, wait=0.2)
    launch_ray.remove_probes(probes)
    assert not list(sweep.folder.glob(".storage-probe-*")) and Path(photos[0]).is_dir()  # the photos untouched
