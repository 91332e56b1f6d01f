"""Concurrent sweeps without Ray (#24): a run is claimed before it trains, so two sweep processes on
one spec train each run once; class images needed by several runs at once are generated once;
the registry has one row per run, whoever writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SAMPLE_SUBJECT, tiny_config
from dreambooth_lab import experiments as E
from dreambooth_lab import run_lock, runs
from dreambooth_lab.registry import FAILURES
from dreambooth_lab.sweep_run import SweepBook, attempt_run


def write_spec(tmp_path: Path, steps: int = 3, name: str = "two-by-two") -> Path:
    spec = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": "tiny"}, "data": {"instance_dir": str(SAMPLE_SUBJECT)},
                 "train": {"steps": steps, "checkpoint_every": 1000},
                 "prior": {"num_class_images": 2, "steps": 2, "cache_dir": str(tmp_path / "cache")},
                 "sample": {"steps": 2, "seeds": [5, 6], "test_prompts": ["A {token} {class} in the forest"]}},
        "grid": {"data.token": ["sks", "oue"], "train.train_text_encoder": [False, True]},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_sweep_processes_at_once_train_each_run_once(tmp_path):
    spec = write_spec(tmp_path, steps=20)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "dreambooth_lab", "sweep", str(spec)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folder = tmp_path / "runs" / "two-by-two"
    sweep = E.load_sweep(spec)
    made = sorted(p.name for p in folder.iterdir() if (p / "config.yaml").is_file())
    assert len(made) == 4 and not any(name.endswith("-2") for name in made)  # no twin folders
    assert all(runs.is_finished(folder / name) for name in made)
    # each run was started by exactly one of the two processes ("[i/4] <id>" is printed when a run starts)
    starts = [line.split("] ", 1)[1] for out in outs for line in out.splitlines() if line.startswith("[")
              and "/4] " in line]
    assert sorted(starts) == sorted(r.id for r in sweep.runs), outs
    for out in outs:  # both end with the whole registry: one finished row per run
        table = [line.split() for line in out.splitlines() if line.startswith("token=")]
        assert [t[1] for t in table] == ["finished"] * 4, out
    rows = E.load_registry(folder)
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in sweep.runs)
    assert {r["status"] for r in rows} == {"finished"}
    assert not list((folder / run_lock.CLAIMS).iterdir())  # every claim released
    # the class images were made once, by one of the runs
    assert sum(r["class_images_generated"] for r in rows) == 2


def test_a_run_claimed_by_a_live_process_is_not_trained_and_is_waited_for(tmp_path, capsys):
    sweep = E.load_sweep(write_spec(tmp_path))
    first, second = sweep.runs[0], sweep.runs[1]
    # another sweep, on another machine, is training `first`: its live claim (a fresh heartbeat)
    holder = {"pid": os.getpid() + 1, "host": "elsewhere"}
    path = run_lock.claim_path(first.config)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**holder, "started": "20261204-000000", "token": "t"}))
    seen = []

    def other_process_finishes():  # it trains the run and lets go of its claim
        deadline = time.time() + 120
        while len(seen) < 3 and time.time() < deadline:
            time.sleep(0.05)
        from dreambooth_lab.train import train

        train(first.config, resume="auto", progress=False)
        path.unlink()

    worker = threading.Thread(target=other_process_finishes)
    worker.start()
    try:
        rows = E.run_sweep(sweep, progress=True, poll=0.1, on_run=lambda rid, status: seen.append((rid, status)))
    finally:
        worker.join()
    out = capsys.readouterr().out
    assert f"{first.id}: being trained by process {holder['pid']} on elsewhere" in out
    assert f"{first.id}: finished by the other process" in out
    assert f"[1/4] {first.id}" not in out and f"[2/4] {second.id}" in out  # not trained here
    assert seen[:3] == [(r.id, "finished") for r in sweep.runs[1:]] and seen[3] == (first.id, "skipped")
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in sweep.runs) and len(rows) == 4


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path):
    from test_run_lock import _dead_pid

    sweep = E.load_sweep(write_spec(tmp_path))
    run = sweep.runs[0]
    path = run_lock.claim_path(run.config)
    path.parent.mkdir(parents=True)
    import socket

    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x", "token": "t"}))
    assert run_lock.claim_holder(run.config) is None  # nobody holds it: a new claim takes it over
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attempt_run(run, progress=False)
    assert out.status == "finished" and any("no longer running" in str(w.message) for w in caught)
    assert not path.exists()


def test_class_images_needed_by_two_runs_at_once_are_generated_once(tmp_path, tiny_pipe):
    from dreambooth_lab.prior import ensure_class_images

    cfg = tiny_config(tmp_path, **{"prior.num_class_images": 3, "prior.steps": 2})
    calls, results = [], []
    go = threading.Barrier(2)

    def factory():
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other run to ask meanwhile
        return tiny_pipe

    def one_run():
        go.wait()
        results.append(ensure_class_images(cfg, factory, progress=False, dtype="float32"))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # one pipeline, one generation
    assert sorted(r.generated for r in results) == [0, 3]
    assert [p.name for p in results[0].paths] == [p.name for p in results[1].paths] == \
        ["class_00000.png", "class_00001.png", "class_00002.png"]


def test_registry_keeps_one_row_per_run_whoever_wrote_it(tmp_path):
    from dreambooth_lab.train import train

    sweep = E.load_sweep(write_spec(tmp_path))
    run = sweep.runs[0]
    first = train(run.config, resume=None, progress=False).run_dir
    twin = train(run.config, resume=None, progress=False).run_dir  # e.g. left by an older, unclaimed sweep
    SweepBook(sweep, progress=False)._set_failure(run.id, {"error": "RuntimeError: x", "seconds": 1,
                                                             "config_hash": run.config.hash()})
    rows = E.write_registry(sweep.folder)
    assert [(r["id"], r["status"], r["run_dir"]) for r in rows] == [(run.id, "finished", str(twin))]
    # a different configuration under the same id (the spec was changed) is another run: its own row
    from dreambooth_lab.config import with_overrides

    changed = with_overrides(run.config, {"train.steps": 2})
    train(changed, resume=None, progress=False)
    rows = E.write_registry(sweep.folder)
    assert sorted((r["id"], r["steps"]) for r in rows) == [(run.id, 2), (run.id, 3)]
    assert first.is_dir()  # nothing is deleted: the registry only chooses


def test_failures_written_by_two_sweeps_at_once_are_all_kept(tmp_path):
    sweep = E.load_sweep(write_spec(tmp_path))
    books = [SweepBook(sweep, progress=False) for _ in range(2)]
    go = threading.Barrier(8)

    def fail(i):
        go.wait()
        books[i % 2]._set_failure(f"run{i}", {"error": f"E{i}", "seconds": 0, "config_hash": "h"})

    threads = [threading.Thread(target=fail, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads((sweep.folder / FAILURES).read_text())) == sorted(f"run{i}" for i in range(8))


def test_ray_options_without_the_ray_launcher_are_one_line(tmp_path, capsys):
    from dreambooth_lab.cli import main

    assert main(["sweep", str(write_spec(tmp_path)), "--gpus-per-run", "1"]) == 2
    assert "--gpus-per-run: options of the Ray launcher; add --launcher ray" in capsys.readouterr().err
    with pytest.raises(E.ConfigError, match="launcher='slurm'"):
        E.run_sweep(E.load_sweep(write_spec(tmp_path)), launcher="slurm")


def test_a_sequential_sweep_does_not_import_ray(tmp_path):
    """Ray is an optional extra: importing the package and running a sweep without --launcher ray
    never imports it (a Colab user without ray, or with a broken one, is not affected)."""
    path = write_spec(tmp_path, steps=1)
    spec = yaml.safe_load(path.read_text())
    spec["grid"] = {"data.token": ["sks"]}
    spec["base"]["prior"]["enabled"] = False
    path.write_text(yaml.safe_dump(spec))
    code = ("import sys\n"
            "import dreambooth_lab, dreambooth_lab.experiments, dreambooth_lab.cli\n"
            "assert 'ray' not in sys.modules, 'imported by the package'\n"
            f"assert dreambooth_lab.cli.main(['sweep', {str(path)!r}]) == 0\n"
            "print('ray imported:', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ray imported: []" in proc.stdout, proc.stdout
