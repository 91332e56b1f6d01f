"""Sweeps, from the outside: plan one (`sweep_plan`), run it here or on Ray (`run_sweep`), read its registry.

The one import for the CLI, the notebooks and the README's examples. The work is done below:
sweep_spec.py reads a sweep spec into runs (its format is described there), sweep_run.py trains
them in this process (launch_ray.py as Ray tasks), and registry.py derives the registry of a sweep
folder from the run folders themselves (config.yaml, summary.json, metrics.json), so it can never
disagree with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import ConfigError
from .launch_ray import run_sweep_ray
from .registry import (REGISTRY, axis_sheet, compare, format_registry, load_registry,  # noqa: F401 (re-exported)
                       metrics_note, read_failures, scan_runs, summarise, write_registry)
from .runs import find_finished, find_resumable
from .sweep_run import run_here
from .sweep_spec import Sweep, SweepRun, file_keys, load_sweep, project_root, select_runs  # noqa: F401 (re-exported)

LAUNCHERS = ("local", "ray")


def run_status(run: SweepRun, failures: dict | None = None) -> str:
    """'finished', 'interrupted at step N (resumes)', 'failed last time: ...', 'dataset missing' or 'to run'."""
    from .checkpoint import list_checkpoints  # torch

    if (done := find_finished(run.config)) is not None:
        return f"finished ({done.name})"
    from .data import DatasetError, find_images

    try:
        find_images(run.config.data.instance_dir)
    except DatasetError:
        return "dataset missing" if not Path(run.config.data.instance_dir).is_dir() else "no photos in dataset"
    if (resumable := find_resumable(run.config)) is not None:
        return f"interrupted at step {list_checkpoints(resumable)[-1].name.split('-')[-1].lstrip('0') or 0} (resumes)"
    if failures and run.id in failures:
        return f"failed last time: {failures[run.id].get('error', '?')}"
    return "to run"


def sweep_plan(sweep: Sweep) -> list[dict]:
    """Per run what it will train and where it stands (reads folders, trains nothing)."""
    from .data import DatasetError, find_images

    failures = read_failures(sweep.folder)
    rows = []
    for run in sweep.runs:
        c = run.config
        folder = Path(c.data.instance_dir)
        try:
            photos: int | None = len(find_images(folder))
        except DatasetError:
            photos = None
        rows.append({"id": run.id, "token": c.data.token, "text_encoder": c.train.train_text_encoder,
                     "steps": c.train.steps, "lr_unet": c.optim.lr_unet,
                     "lr_text_encoder": c.optim.lr_text_encoder if c.train.train_text_encoder else None,
                     "dataset": str(folder), "dataset_exists": folder.is_dir(), "photos": photos,
                     "status": run_status(run, failures),
                     **({"training_seed": c.train.seed} if run.group is not None else {})})
    return rows


def format_plan(sweep: Sweep, rows: list[dict]) -> str:
    """The dry-run table: one line per run, then where the runs go (pure)."""
    def photos(r):
        if not r["dataset_exists"]:
            return "MISSING"
        return f"{r['photos']} photos" if r["photos"] is not None else "no photos"

    def lr(r):
        return f"{r['lr_unet']:g}" + (f"/{r['lr_text_encoder']:g}" if r["lr_text_encoder"] is not None else "")

    head = ["run", "token", "text encoder", "steps", "lr unet/te", "dataset", "photos", "status"]
    table = [[r["id"], r["token"], "trained" if r["text_encoder"] else "frozen", str(r["steps"]), lr(r),
              r["dataset"], photos(r), r["status"]] for r in rows]
    if any("training_seed" in r for r in rows):  # replicates: which training seed each one gets
        head.insert(4, "training seed")
        for t, r in zip(table, rows):
            t.insert(4, str(r.get("training_seed", "")))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
    todo = sum(not r["status"].startswith("finished") for r in rows)
    lines.append(f"{len(rows)} run(s), {todo} to train; runs go to {sweep.folder}")
    missing = sorted({r["dataset"] for r in rows if not r["dataset_exists"]})
    for m in missing:
        lines.append(f"! dataset folder {m} does not exist: put the photos there, or pass "
                     "--set data.instance_dir=FOLDER (relative paths are from the project root)")
    return "\n".join(lines)


def run_sweep(sweep: Sweep, *, progress: bool = True, on_run: Callable[[str, str], None] | None = None,
              launcher: str = "local", poll: float = 2.0, **ray_options) -> list[dict]:
    """Train every run that has not finished; returns the registry rows of the sweep's folder.

    on_run(run_id, status) is called after each run with 'skipped', 'finished' or 'failed'.
    A failing run is recorded (failures.json) and the sweep goes on with the next. A run that
    another process is training (two sweeps of one spec at once) is not trained here: the sweep
    goes on with the others, then waits for it (polling every `poll` seconds), and trains it itself
    only if that process died before finishing it (resuming from its checkpoint).

    launcher="ray" trains each run as a Ray task (launch_ray.run_sweep_ray, which takes
    `ray_options`: address, gpus_per_run, cpus_per_run, max_retries); "local" trains them here, one
    after another.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if launcher == "ray":
        return run_sweep_ray(sweep, progress=progress, on_run=on_run, poll=poll, **ray_options)
    if ray_options:
        raise ConfigError(f"{', '.join(sorted(ray_options))}: options of the Ray launcher; add launcher='ray' "
                          "(--launcher ray)")
    return run_here(sweep, progress=progress, on_run=on_run, poll=poll)
