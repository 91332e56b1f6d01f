"""A sweep on Ray: each run is a Ray task that trains in its own worker process.

    python -m dreambooth_lab sweep SPEC --launcher ray [--address auto|ray://host:port]
                                        [--gpus-per-run 1] [--cpus-per-run N] [--max-retries 2]
    experiments.run_sweep(sweep, launcher="ray", address=None, gpus_per_run=None, cpus_per_run=1)

Ray is an optional extra (`pip install 'dreambooth_lab[cluster]'`), imported only here. Without an
address a local Ray starts on this machine with all its CPUs and GPUs; `auto` joins the cluster
that `ray start` made on this machine; `ray://host:port` a remote one.

A task does what the sequential sweep does for a run (sweep_run.attempt_run: claim it, skip it if
finished, else train with resume="auto"), so the semantics are the same; the driver records every
outcome (failures.json, the registry) as the sequential sweep does. What Ray adds:

- each task reserves `gpus_per_run` GPUs (default: 1 when the cluster has GPUs, else 0) and
  `cpus_per_run` CPUs (its torch threads on a CPU); runs wait for free ones;
- a worker that dies (killed, out of memory, its node lost) is retried `max_retries` times; the
  retry takes over the dead process's claim and train.lock and resumes from the newest checkpoint;
- shared storage is checked, not assumed: the driver writes a probe file into the sweep folder and
  into every class-image cache folder; a probe task on every node, and every run task before it
  trains, reads them and looks for the runs' photo folders, and a worker that cannot stops the
  sweep at once, saying so;
- Ctrl-C cancels the tasks (their workers stop; checkpoints stay) and says how to resume.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from . import files
from .registry import write_registry
from .sweep_run import Outcome, SweepBook, attempt_run
from .sweep_spec import Sweep, SweepRun

PROBE = ".storage-probe-"  # + a token per sweep invocation: <sweep folder>/.storage-probe-<token>
STORAGE_WAIT = 10.0  # seconds a worker waits for a probe to appear (a network file system's caches)


class LauncherError(RuntimeError):
    """The Ray launcher cannot start as asked; the message says what to do."""


class StorageNotShared(LauncherError):
    """A Ray worker cannot see a folder the sweep writes to (runs, class images, the registry)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a Ray sweep: the tasks were cancelled; the message says how to resume."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise LauncherError("--launcher ray needs the ray package: pip install 'dreambooth_lab[cluster]' (or pip "
                            "install ray), or leave out --launcher ray to train the runs one after another") from None
    return ray


def storage_folders(sweep: Sweep) -> list[Path]:
    """The folders every worker must see: the sweep folder (runs, claims, registry) and the
    class-image cache folder of every run with prior preservation (pure but for two checks)."""
    from .prior import cache_root_for

    out = [sweep.folder]
    for run in sweep.runs:
        if run.config.prior.enabled:
            out.append(cache_root_for(run.config))
    return list(dict.fromkeys(Path(p).expanduser().resolve() for p in out))


class RaySweepBook(SweepBook):
    """The sweep's records as the Ray driver keeps them: runs end out of order, so a failed run's
    line names the run, its time and its host."""

    def failure_line(self, run: SweepRun, out: Outcome) -> str:
        return (f"failed {run.id}" + (f" after {out.seconds:.1f} s" if out.seconds else "")
                + (f" on {out.host}" if out.host else "") + f": {out.error}")


def photo_folders(sweep: Sweep) -> list[Path]:
    """The runs' photo folders (data.instance_dir) that the driver sees: every worker reads them."""
    out = [Path(run.config.data.instance_dir).expanduser().resolve() for run in sweep.runs]
    return [p for p in dict.fromkeys(out) if p.is_dir()]


def write_probes(sweep: Sweep) -> dict[str, str | None]:
    """A probe file with a fresh token in each storage folder; returns path -> token, and each photo
    folder -> None (read only: a worker checks that it is there, nothing is written into it)."""
    token = uuid.uuid4().hex
    probes: dict[str, str | None] = {}
    for folder in storage_folders(sweep):
        path = folder / f"{PROBE}{token}"
        files.write_text(path, f"{token}\n")
        probes[str(path)] = f"{token}\n"
    for folder in photo_folders(sweep):
        probes[str(folder)] = None
    return probes


def _sees(path: str, token: str | None) -> bool:
    try:
        return Path(path).is_dir() if token is None else Path(path).read_text() == token
    except OSError:
        return False


def check_storage(probes: dict[str, str | None], wait: float = STORAGE_WAIT) -> str:
    """In a worker: every probe readable with its token and every photo folder there (waiting up to
    `wait` seconds for a network file system to show them), else StorageNotShared naming this host
    and the folder. Returns the host."""
    host = socket.gethostname()
    deadline = time.monotonic() + wait
    for path, token in probes.items():
        while not _sees(path, token):
            if time.monotonic() > deadline:
                if token is None:
                    raise StorageNotShared(
                        f"the Ray worker on {host} cannot see the photos folder {path}: every Ray node reads the "
                        "photos, so put them on storage that every node mounts at the same path (NFS, a cluster file "
                        "system) and point data.instance_dir there (--set data.instance_dir=...), then run the same "
                        "command")
                raise StorageNotShared(
                    f"the Ray worker on {host} cannot see {Path(path).parent} (the driver wrote {Path(path).name} "
                    "there): the runs, the class-image cache and the registry must be on storage that every Ray node "
                    "mounts at the same path (NFS, a cluster file system): point train.output_dir (--set "
                    "train.output_dir=...) and prior.cache_dir there, then run the same command")
            time.sleep(0.2)
    return host


def remove_probes(probes: dict[str, str | None]) -> None:
    for path, token in probes.items():
        if token is not None:
            Path(path).unlink(missing_ok=True)


def _probe_task(probes: dict[str, str | None], wait: float) -> str:
    return check_storage(probes, wait)


def _train_task(run: SweepRun, probes: dict[str, str | None], threads: int | None, wait: float) -> Outcome:
    """One run, in a Ray worker: storage checked first, then sweep_run.attempt_run."""
    check_storage(probes, wait)
    if threads:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
    return attempt_run(run, progress=False)


def check_nodes(ray, probes: dict[str, str | None], wait: float = STORAGE_WAIT) -> list[str]:
    """Run the storage check once on every live node of the cluster, before any run starts."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_probe_task)
    refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(probes, wait) for n in ray.nodes() if n.get("Alive")]
    return [_get(ray, ref) for ref in refs]


def _get(ray, ref):
    """ray.get, with our own errors (raised in a worker) raised again as themselves."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LauncherError):
            raise type(cause)(str(cause)) from None
        raise


def resources(ray, gpus_per_run: float | None, cpus_per_run: float) -> tuple[float, float]:
    """(gpus, cpus) each run reserves, checked against the cluster: a run that can never be placed
    is an error now, not a sweep that waits forever."""
    have = ray.cluster_resources()
    gpus, cpus = float(have.get("GPU", 0)), float(have.get("CPU", 0))
    if gpus_per_run is None:
        gpus_per_run = 1.0 if gpus else 0.0
    if gpus_per_run < 0 or gpus_per_run > 1:
        raise LauncherError(f"--gpus-per-run {gpus_per_run:g}: a run trains in one process on one GPU; give 1 (or a "
                            "fraction such as 0.5 to share a GPU between runs, or 0 for CPU). One run on several GPUs: "
                            "accelerate launch --multi_gpu (README: More GPUs, more machines)")
    if gpus_per_run > gpus:
        raise LauncherError(f"--gpus-per-run {gpus_per_run:g}: the Ray cluster has {gpus:g} GPU(s): pass "
                            "--gpus-per-run 0 to train on CPUs, or add GPU nodes")
    if cpus_per_run <= 0 or cpus_per_run > cpus:
        raise LauncherError(f"--cpus-per-run {cpus_per_run:g}: give a number from 1 to the {cpus:g} CPU(s) of the Ray "
                            "cluster")
    return gpus_per_run, cpus_per_run


def run_sweep_ray(sweep: Sweep, *, address: str | None = None, gpus_per_run: float | None = None,
                  cpus_per_run: float = 1, max_retries: int = 2, progress: bool = True,
                  on_run: Callable[[str, str], None] | None = None, poll: float = 2.0,
                  ray_init: dict | None = None, storage_wait: float = STORAGE_WAIT) -> list[dict]:
    """Train the sweep's unfinished runs as Ray tasks; returns the registry rows (as run_sweep).

    A Ray already initialised in this process is used as it is; else ray.init(address, **ray_init)
    (address None: a local Ray on this machine), shut down again at the end."""
    ray = import_ray()
    if max_retries < 0:
        raise LauncherError(f"--max-retries {max_retries}: give 0 or more (how often a run whose worker died is "
                            "started again)")
    book = RaySweepBook(sweep, progress, on_run)
    started_here = not ray.is_initialized()
    if started_here:
        t0 = time.time()
        ray.init(address=address, log_to_driver=False, **(ray_init or {}))
        book.say(f"Ray: {'started a local Ray' if not address else 'joined ' + address} in {time.time() - t0:.1f} s")
    probes: dict[str, str | None] = {}
    try:
        gpus, cpus = resources(ray, gpus_per_run, cpus_per_run)
        probes = write_probes(sweep)
        hosts = check_nodes(ray, probes, storage_wait)
        book.say(f"Ray: {len(hosts)} node(s) ({', '.join(sorted(set(hosts)))}) see {sweep.folder}; each run reserves "
                 f"{gpus:g} GPU and {cpus:g} CPU")
        return _drive(ray, sweep, book, probes, gpus, cpus, max_retries, poll, storage_wait)
    finally:
        remove_probes(probes)
        if started_here:
            ray.shutdown()


def _drive(ray, sweep: Sweep, book: SweepBook, probes: dict[str, str | None], gpus: float, cpus: float,
           max_retries: int, poll: float, wait: float) -> list[dict]:
    from tqdm.auto import tqdm

    from .run_lock import claim_holder, describe_holder
    from .runs import find_finished

    task = ray.remote(_train_task).options(num_gpus=gpus, num_cpus=cpus, max_retries=max_retries,
                                           retry_exceptions=False)
    threads = max(1, int(cpus))
    pending: dict = {}  # ObjectRef -> SweepRun
    started: set[str] = set()
    bar = tqdm(total=len(sweep.runs), desc="runs", unit="run", disable=not book.progress)
    say = (lambda text: bar.write(text)) if book.progress else (lambda text: None)
    book.say = say  # the book's lines (failed, waiting) above the bar too

    def submit(run: SweepRun) -> None:
        pending[task.remote(run, probes, threads, wait)] = run

    def record(run: SweepRun, out: Outcome) -> None:
        book.record(run, out)
        if out.status == "claimed":
            return
        if out.status == "finished":
            say(f"finished {run.id} in {out.seconds:.1f} s on {out.host} ({out.run_dir})")
        elif out.status == "skipped":
            say(f"skipped {run.id}: finished already ({out.run_dir})")

    try:
        for run in sweep.runs:
            if (done := find_finished(run.config)) is not None:
                record(run, Outcome(run.id, "skipped", str(done)))
            else:
                submit(run)
        bar.update(len(book.statuses) - bar.n)
        while pending or book.waiting:
            done = ray.wait(list(pending), num_returns=1, timeout=poll)[0] if pending else []
            if not pending:
                time.sleep(poll)
            for ref in done:
                run = pending.pop(ref)
                try:
                    out = _get(ray, ref)
                except ray.exceptions.RayTaskError as exc:  # raised outside attempt_run (e.g. importing torch)
                    out = Outcome(run.id, "failed", error=f"{type(exc.cause).__name__}: {exc.cause}"
                                  if getattr(exc, "cause", None) else f"{type(exc).__name__}: {exc}")
                except ray.exceptions.RayError as exc:  # the worker died more often than max_retries allows
                    out = Outcome(run.id, "failed", error=(
                        f"the Ray worker training it died {max_retries + 1} time(s) ({type(exc).__name__}: killed, out "
                        "of memory, or its node lost); its checkpoints are kept: run the same command to resume"))
                started.discard(run.id)
                record(run, out)
            for run in pending.values():  # a claim taken by our task: it has started
                if run.id not in started and (holder := claim_holder(run.config)):
                    started.add(run.id)
                    say(f"started {run.id}: {describe_holder(holder)}")
            for run in book.settle_waiting():
                say(f"{run.id}: the process that claimed it stopped: training it here")
                submit(run)
            bar.update(len(book.statuses) - bar.n)  # runs with their outcome, here or in another process
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        done = sum(s in ("finished", "skipped") for s in book.statuses.values())
        raise SweepInterrupted(
            f"sweep interrupted: {done} of {len(sweep.runs)} runs finished; the {len(pending)} in flight were "
            f"stopped (their checkpoints are kept): run the same command to resume, each interrupted run goes on "
            f"from its newest checkpoint") from None
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return write_registry(sweep.folder)
