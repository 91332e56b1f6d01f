"""Running a sweep in this process: each run claimed, skipped when finished, resumed or trained.

Runs execute one after another and share the class-image cache. A run whose exact training
config already finished is skipped; an interrupted one resumes from its checkpoint, so a Colab
disconnect costs at most the run in flight. A run another process is training (two sweeps of one
spec at once) is left to it and waited for at the end. `SweepBook` is the driver's record of the
outcomes (failures.json, replicates.json, the registry), whichever launcher trained the runs:
launch_ray.py drives the same `attempt_run` and `SweepBook` from Ray tasks.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable

from . import files
from .registry import FAILURES, REPLICATES, read_failures, read_replicates, registry_lock, write_registry
from .run_lock import RunLocked, claim_holder, claim_run, describe_holder
from .runs import find_finished
from .sweep_spec import Sweep, SweepRun


@dataclass
class Outcome:
    """What one attempt at a run of a sweep came to, in whichever process made it (picklable: a Ray
    task returns it to the driver). status: 'skipped' (finished already), 'finished', 'failed', or
    'claimed' (a live process holds the run's claim: `holder` says which)."""
    id: str
    status: str
    run_dir: str | None = None
    error: str | None = None
    seconds: float = 0.0
    holder: dict | None = None
    config_hash: str | None = None
    host: str | None = None
    disk_full: BaseException | None = None  # raised again by the driver: every later run would fail the same way


def attempt_run(run: SweepRun, *, progress: bool = True, on_start: Callable[[], None] | None = None) -> Outcome:
    """Train one run of a sweep unless it has finished or another process has claimed it.

    The run is claimed (run_lock.claim_run: a lock under <sweep>/.claims/) before its folder is looked
    for, so two sweeps or two Ray tasks never train one configuration twice; under the claim a run
    that finished meanwhile is skipped and an interrupted one resumes from its newest checkpoint.
    A failure comes back as an Outcome (the sweep goes on); Ctrl-C propagates."""
    from .train import train  # torch: imported when a run is trained

    host, chash = socket.gethostname(), run.config.hash()
    if (done := find_finished(run.config)) is not None:
        return Outcome(run.id, "skipped", str(done), config_hash=chash, host=host)
    try:
        claim = claim_run(run.config)
    except RunLocked as exc:
        return Outcome(run.id, "claimed", holder=exc.holder, error=str(exc), config_hash=chash, host=host)
    t0 = time.time()
    try:
        if (done := find_finished(run.config)) is not None:  # finished by another process just before our claim
            return Outcome(run.id, "skipped", str(done), config_hash=chash, host=host)
        if on_start:
            on_start()
        result = train(run.config, resume="auto", progress=progress)
        return Outcome(run.id, "finished", str(result.run_dir), seconds=round(time.time() - t0, 2), config_hash=chash,
                       host=host)
    except Exception as exc:  # noqa: BLE001 - recorded by the caller, which goes on with the next run
        return Outcome(run.id, "failed", error=f"{type(exc).__name__}: {exc}", seconds=round(time.time() - t0, 2),
                       config_hash=chash, host=host, disk_full=exc if files.is_disk_full(exc) else None)
    finally:
        claim.release()


class SweepBook:
    """The driver's side of a sweep, whichever launcher trains the runs: records each Outcome in
    failures.json (read, changed and written under the sweep's file lock, so concurrent sweeps lose
    no entry), rewrites the registry, prints one line per run and calls on_run(run_id, status)."""

    def __init__(self, sweep: Sweep, progress: bool = True, on_run: Callable[[str, str], None] | None = None):
        self.sweep, self.progress, self.on_run = sweep, progress, on_run
        self.waiting: dict[str, tuple[SweepRun, dict | None]] = {}  # claimed elsewhere: the run, its failure then
        self.statuses: dict[str, str] = {}
        with files.disk_full_as(sweep.folder):
            sweep.folder.mkdir(parents=True, exist_ok=True)
        record_replicates(sweep)

    def say(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def record(self, run: SweepRun, out: Outcome) -> None:
        if out.status == "claimed":
            self.waiting[run.id] = (run, read_failures(self.sweep.folder).get(run.id))
            self.say(f"    {run.id}: being trained by {describe_holder(out.holder)}: not trained here; the sweep waits "
                     "for it at the end")
            return
        if out.status == "failed":
            entry = {"error": out.error, "seconds": out.seconds, "config_hash": out.config_hash}
            self.say(self.failure_line(run, out))
        else:
            entry = None
        if out.disk_full is not None:  # every later run would fail the same way: stop here, in one line
            try:
                self._set_failure(run.id, entry)
                write_registry(self.sweep.folder)
            except OSError as err:
                if not files.is_disk_full(err):
                    raise
            raise out.disk_full
        self._set_failure(run.id, entry)
        self.finish(run.id, out.status)

    def failure_line(self, run: SweepRun, out: Outcome) -> str:
        """The line printed for a failed run (the sequential sweep's follows its "[i/n] <id>" line)."""
        return f"    failed: {out.error}"

    def finish(self, rid: str, status: str) -> None:
        self.statuses[rid] = status
        write_registry(self.sweep.folder)
        if self.on_run:
            self.on_run(rid, status)

    def _set_failure(self, rid: str, entry: dict | None) -> None:
        folder = self.sweep.folder
        with registry_lock(folder):
            failures = read_failures(folder)
            if entry is None and rid not in failures:
                return
            if entry is None:
                failures.pop(rid)
            else:
                failures[rid] = entry
            files.write_json(folder / FAILURES, failures)

    def settle_waiting(self) -> list[SweepRun]:
        """The runs claimed elsewhere whose claim has gone: those that finished or failed there are
        recorded as such; the others (their process died) are returned, to be trained here."""
        free = []
        for rid, (run, failure_before) in list(self.waiting.items()):
            if claim_holder(run.config) is not None:
                continue
            del self.waiting[rid]
            if (done := find_finished(run.config)) is not None:
                self.say(f"    {rid}: finished by the other process ({done})")
                self.finish(rid, "skipped")
            elif (failure := read_failures(self.sweep.folder).get(rid)) and failure != failure_before:
                self.say(f"    {rid}: failed in the other process: {failure.get('error')}")
                self.finish(rid, "failed")
            else:
                free.append(run)
        return free


def record_replicates(sweep: Sweep) -> None:
    """Add the sweep's replicates to <folder>/replicates.json (run id -> group, replicate, seeds;
    sorted); a sweep without replicates writes nothing."""
    mine = {r.id: {"group": r.group, "replicate": r.replicate, "training_seed": r.config.train.seed,
                   "group_seed": r.group_seed} for r in sweep.runs if r.group is not None}
    if not mine:
        return
    known = read_replicates(sweep.folder)
    if {**known, **mine} != known:
        files.write_json(sweep.folder / REPLICATES, dict(sorted({**known, **mine}.items())))


def run_here(sweep: Sweep, *, progress: bool = True, on_run: Callable[[str, str], None] | None = None,
             poll: float = 2.0) -> list[dict]:
    """Train every run of the sweep that has not finished, here, one after another; returns the
    registry rows of the sweep's folder.

    on_run(run_id, status) is called after each run with 'skipped', 'finished' or 'failed'.
    A failing run is recorded (failures.json) and the sweep goes on with the next. A run that
    another process is training is not trained here: the sweep goes on with the others, then waits
    for it (polling every `poll` seconds), and trains it itself only if that process died before
    finishing it (resuming from its checkpoint)."""
    book = SweepBook(sweep, progress, on_run)
    n = len(sweep.runs)
    for i, run in enumerate(sweep.runs, 1):
        book.record(run, attempt_run(run, progress=progress, on_start=lambda i=i, run=run: book.say(f"[{i}/{n}] {run.id}")))
    if book.waiting:
        book.say(f"waiting for {len(book.waiting)} run(s) that other processes are training: "
                 f"{', '.join(book.waiting)}")
    while book.waiting:
        time.sleep(poll)
        for run in book.settle_waiting():
            book.record(run, attempt_run(run, progress=progress, on_start=lambda run=run: book.say(
                f"[{run.id}] the process that claimed it stopped: training it here")))
    return write_registry(sweep.folder)
