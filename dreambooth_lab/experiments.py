"""Sweeps and the run registry.

A sweep spec (YAML) names a base config and the runs to make from it:

    name: study-tokens
    output_dir: runs                 # runs go to runs/study-tokens/<run id>-<timestamp>/
    base: base.yaml                  # a config file (relative to the spec) or an inline mapping
    runs: [exp1.yaml, exp2.yaml]     # explicit runs: config files, or {name: ..., set: {key: value}}
    grid:                            # and/or a grid: every combination of these values
      data.token: [sks, oue]
      train.train_text_encoder: [false, true]
    replicates: 3                    # optional: each run trained 3 times (default 1)

Relative paths (data.instance_dir and output_dir, wherever they are written: the spec, a run's
config file, a `set`, a grid or `--set`) are taken from the project root — the checkout the
package lives in (the folder holding configs/), else the nearest folder above the current one
that holds dreambooth_lab/, else the current folder — which is also where the notebooks take
them from. So `datasets/study_dog` means the same folder from the CLI, from any working folder,
and from every notebook.

Runs execute one after another and share the class-image cache. A run whose exact training
config already finished is skipped; an interrupted one resumes from its checkpoint, so a Colab
disconnect costs at most the run in flight. The registry is derived from the run folders
themselves (config.yaml, summary.json, metrics.json), so it can never disagree with them.

Replicates (`replicates: N`, or `sweep --replicates N`): with N > 1 every run is trained N times,
as runs `<id>-r0 … <id>-r{N-1}` that differ only in train.seed: replicate 0 keeps the run's own
seed, replicate k > 0 takes `replicate_seed(seed, k)` (a hash of both, below 2**31). The sweep
folder's replicates.json records each replicate's group (the run id), index and seeds, and the
registry gains the columns group, replicate, training_seed and group_seed. `seed` in the
registry is always the training seed; the sampling seeds are `generation_seeds`. N = 1 changes
nothing: the same run ids, seeds and registry columns as without the key. Summaries with
intervals and verdicts across replicates: `summarise` and `compare` (the method: stats.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import files
from .config import (Config, ConfigError, Typed, experiment_axes, from_dict, load, name_problem, plain, read_yaml,
                     with_overrides)

REGISTRY = "registry"
FAILURES = "failures.json"
REPLICATES = "replicates.json"


@dataclass
class SweepRun:
    id: str
    config: Config
    group: str | None = None  # replicates: the run id without -rK, the replicate K and the seed they derive from
    replicate: int | None = None
    group_seed: int | None = None


@dataclass
class Sweep:
    name: str
    folder: Path
    runs: list[SweepRun]
    replicates: int = 1


def replicate_seed(seed: int, k: int) -> int:
    """Training seed of replicate k of a run whose seed is `seed`: the seed itself for k = 0, else
    a hash of both below 2**31 (any library takes it; unrelated to seed + 1, which training uses
    for the class images' noise) (pure)."""
    if k == 0:
        return int(seed)
    return int(hashlib.sha256(f"{int(seed)}/replicate/{k}".encode()).hexdigest()[:8], 16) % 2**31


def replicate_id(rid: str, k: int) -> str:
    """'exp2' -> 'exp2-r0' (pure)."""
    return f"{rid}-r{k}"


def _replicates(value: Any, where: str) -> int:
    """A replicate count as written (spec or --replicates): a whole number >= 1."""
    value = value.value if isinstance(value, Typed) else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: replicates={value!r}: give a whole number >= 1 (how many times each run is "
                          "trained, with different training seeds)")
    return value


def expand_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order the keys are written (pure)."""
    if not grid:
        return [{}]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_id(values: dict[str, Any]) -> str:
    """A readable folder-safe id such as 'token=sks_train_text_encoder=true' (pure)."""
    parts = []
    for key, value in values.items():
        short = key.rsplit(".", 1)[-1]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{short}={text}")
    raw = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=_.-" else "-" for c in raw)


def project_root(start: str | Path | None = None) -> Path:
    """Where relative paths of sweeps (and the notebooks' forms) are taken from (see the module doc)."""
    import os

    here = Path(__file__).resolve().parents[1]
    if (here / "configs").is_dir():
        return here
    path = Path(start or os.getcwd()).resolve()
    for p in (path, *path.parents):
        if (p / "dreambooth_lab").is_dir():
            return p
    return path


def _from_root(path: str | Path, root: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else root / p)


def flat_keys(data: Any, prefix: str = "") -> set[str]:
    """Dotted names of the leaves of a nested mapping (pure)."""
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    out: set[str] = set()
    for key, value in data.items():
        out |= flat_keys(value, f"{prefix}{key}.")
    return out


def file_keys(path: str | Path) -> set[str]:
    """The dotted fields a config YAML sets, itself or through `extends`."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        return set()
    keys = flat_keys({k: v for k, v in data.items() if k != "extends"})
    if "extends" in data:
        keys |= file_keys(path.parent / str(data["extends"]))
    return keys


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None,
               machine: dict[str, Any] | None = None, replicates: int | None = None) -> Sweep:
    """Read a sweep spec; `overrides` (dotted keys) go on top of every run (e.g. the smoke switch).
    `machine` (dotted keys: this runtime's precision, optimizer, checkpoint interval) fills the
    fields a run's spec and config files leave unset: a value written in a file always wins.
    `replicates` (None: the spec's `replicates`, else 1) trains every run that many times."""
    path = Path(path)
    spec = read_yaml(path, keep_text=True)  # config values (base, set, grid) as written: `token: no` is "no"
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping with name, base, runs and/or grid")
    unknown = set(spec) - {"name", "output_dir", "base", "runs", "grid", "replicates"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; use name, output_dir, base, runs, grid, "
                          "replicates")
    n_rep = _replicates(replicates, "--replicates") if replicates is not None else \
        _replicates(spec["replicates"], str(path)) if spec.get("replicates") is not None else 1
    name = str(_text(spec.get("name")) or path.stem)
    if problem := name_problem(name):
        raise ConfigError(f"{path}: name={name!r} {problem}: the sweep's folder is <output_dir>/<name>, so use a "
                          "plain name such as 'study-tokens'")
    here = path.parent
    base_spec = spec.get("base")
    if isinstance(base_spec, str):
        base, base_keys = load(here / base_spec), file_keys(here / base_spec)
    elif isinstance(base_spec, dict):
        base, base_keys = from_dict(base_spec), flat_keys(base_spec)
    elif base_spec is None:
        base, base_keys = Config(), set()
    else:
        raise ConfigError(f"{path}: base must be a config file name or a mapping")

    explicit: list[tuple[str, Config, set[str]]] = []
    for i, item in enumerate(spec.get("runs") or []):
        if isinstance(item, str):
            explicit.append((Path(item).stem, load(here / item), file_keys(here / item)))
        elif isinstance(item, dict) and "name" in item:
            cfg, keys = (load(here / item["config"]), file_keys(here / item["config"])) if "config" in item \
                else (base, base_keys)
            explicit.append((str(_text(item["name"])), with_overrides(cfg, item.get("set") or {}),
                             keys | set(item.get("set") or {})))
        else:
            raise ConfigError(f"{path}: runs[{i}] must be a config file or a mapping with 'name' (and 'config'/'set')")
    grid = expand_grid(spec.get("grid") or {})
    runs: list[tuple[str, Config, set[str]]] = []
    if explicit:
        for rid, cfg, keys in explicit:  # a grid, when given too, varies every explicit run
            runs += [(rid if not values else f"{rid}_{run_id(plain(values))}", with_overrides(cfg, values), keys | set(values))
                     for values in grid]
    elif spec.get("grid"):
        runs = [(run_id(plain(values)), with_overrides(base, values), base_keys | set(values)) for values in grid]
    else:
        raise ConfigError(f"{path}: the sweep has no runs: add 'runs' and/or 'grid'")
    ids = [rid for rid, _, _ in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: run ids repeat ({ids}); give explicit runs distinct names")

    root = project_root()
    folder = Path(_from_root(_text(spec.get("output_dir")) or base.train.output_dir, root)) / name
    if overrides and overrides.get("train.output_dir"):
        folder = Path(_from_root(str(_text(overrides["train.output_dir"])), root)) / name
    out = []
    for rid, cfg, keys in runs:
        cfg = with_overrides(cfg, {k: v for k, v in (machine or {}).items() if k not in keys})
        cfg = with_overrides(cfg, {k: v for k, v in (overrides or {}).items() if k != "train.output_dir"})
        cfg = with_overrides(cfg, {"train.output_dir": str(folder),
                                   "data.instance_dir": _from_root(cfg.data.instance_dir, root)})
        if n_rep == 1:
            out.append(SweepRun(rid, with_overrides(cfg, {"train.name": rid}).validate()))
            continue
        seed = cfg.train.seed
        for k in range(n_rep):
            rep_id = replicate_id(rid, k)
            rep_cfg = with_overrides(cfg, {"train.name": rep_id, "train.seed": replicate_seed(seed, k)})
            out.append(SweepRun(rep_id, rep_cfg.validate(), group=rid, replicate=k, group_seed=seed))
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: run ids repeat once replicated ({ids}); give explicit runs distinct names")
    return Sweep(name, folder, out, n_rep)


def _text(value: Any) -> Any:
    """A name or folder of the spec as written (`name: 2024` is "2024", `name: null` nothing)."""
    return (value.text if value.value is not None else None) if isinstance(value, Typed) else value


def select_runs(sweep: Sweep, only: str | list[str] | None) -> Sweep:
    """The sweep cut to the named runs ('exp2,exp8' or a list), in the spec's order (pure). A
    replicated run's name picks all its replicates; 'exp2-r1' picks one."""
    if not only:
        return sweep
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only) if w.strip()]
    known = list(dict.fromkeys([r.group for r in sweep.runs if r.group] + [r.id for r in sweep.runs]))
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: no such run in sweep '{sweep.name}'; its runs are "
                          f"{', '.join(known)}")
    return Sweep(sweep.name, sweep.folder, [r for r in sweep.runs if r.id in wanted or r.group in wanted],
                 sweep.replicates)


def run_status(run: SweepRun, failures: dict | None = None) -> str:
    """'finished', 'interrupted at step N (resumes)', 'failed last time: ...', 'dataset missing' or 'to run'."""
    from .checkpoint import list_checkpoints
    from .runs import find_finished, find_resumable

    if (done := find_finished(run.config)) is not None:
        return f"finished ({done.name})"
    from .data import DatasetError, find_images

    try:
        find_images(run.config.data.instance_dir)
    except DatasetError:
        return "dataset missing" if not Path(run.config.data.instance_dir).is_dir() else "no photos in dataset"
    if (open_run := find_resumable(run.config)) is not None:
        return f"interrupted at step {list_checkpoints(open_run)[-1].name.split('-')[-1].lstrip('0') or 0} (resumes)"
    if failures and run.id in failures:
        return f"failed last time: {failures[run.id].get('error', '?')}"
    return "to run"


def sweep_plan(sweep: Sweep) -> list[dict]:
    """Per run what it will train and where it stands (reads folders, trains nothing)."""
    from .data import DatasetError, find_images

    failures = _read_failures(sweep.folder)
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


LAUNCHERS = ("local", "ray")


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

    The run is claimed (runs.claim_run: a lock under <sweep>/.claims/) before its folder is looked
    for, so two sweeps or two Ray tasks never train one configuration twice; under the claim a run
    that finished meanwhile is skipped and an interrupted one resumes from its newest checkpoint.
    A failure comes back as an Outcome (the sweep goes on); Ctrl-C propagates."""
    import socket

    from .runs import RunLocked, claim_run, find_finished
    from .train import train

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
            from .runs import describe_holder

            self.waiting[run.id] = (run, _read_failures(self.sweep.folder).get(run.id))
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
            failures = _read_failures(folder)
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
        from .runs import claim_holder, find_finished

        free = []
        for rid, (run, failure_before) in list(self.waiting.items()):
            if claim_holder(run.config) is not None:
                continue
            del self.waiting[rid]
            if (done := find_finished(run.config)) is not None:
                self.say(f"    {rid}: finished by the other process ({done})")
                self.finish(rid, "skipped")
            elif (failure := _read_failures(self.sweep.folder).get(rid)) and failure != failure_before:
                self.say(f"    {rid}: failed in the other process: {failure.get('error')}")
                self.finish(rid, "failed")
            else:
                free.append(run)
        return free


def registry_lock(folder: str | Path):
    """The sweep folder's file lock (.registry.lock): failures.json and the registry are read and
    rewritten under it, so two sweep processes never interleave their writes."""
    from filelock import FileLock

    folder = Path(folder)
    with files.disk_full_as(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".registry.lock"))


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
        from .launch_ray import run_sweep_ray

        return run_sweep_ray(sweep, progress=progress, on_run=on_run, poll=poll, **ray_options)
    if ray_options:
        raise ConfigError(f"{', '.join(sorted(ray_options))}: options of the Ray launcher; add launcher='ray' "
                          "(--launcher ray)")
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


def _read_failures(folder: Path) -> dict:
    path = folder / FAILURES
    return json.loads(path.read_text()) if path.is_file() else {}


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


def read_replicates(folder: str | Path) -> dict:
    path = Path(folder) / REPLICATES
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- the registry ------------------------------------------------------------------------------

REPLICATE_COLUMNS = ["group", "replicate", "training_seed", "group_seed"]  # after "id", in replicated sweeps
COLUMNS = ["id", "status", "config_hash", "token", "class", "train_text_encoder", "lr_unet", "lr_text_encoder",
           "steps", "rank", "batch_size", "seed", "resolution", "prior", "class_images", "class_images_generated",
           "lora_scale_unet", "lora_scale_text_encoder", "guidance", "generation_seeds", "dataset", "photos",
           "dataset_digest", "model", "family", "seconds", "final_loss", "final_instance_loss", "final_prior_loss",
           "eval_instance_loss_before", "eval_instance_loss_after", "run_dir", "lora"]


def _absolute(path: str) -> str:
    """A path as an absolute one (a relative one against the current folder)."""
    return str(Path(path).expanduser().resolve())


def _model_path(name: str) -> str:
    """A local model folder as an absolute path; a hub id or a built-in name as it is."""
    return _absolute(name) if Path(name).expanduser().exists() else name


def run_row(run_dir: Path) -> dict:
    """One registry row from a run folder (its config, identity, summary, last metrics and any metrics.json).

    Paths are absolute, so a row still finds its files when read from another folder; generation
    seeds are written as one string ("5 6") so that the CSV cell is one value.
    """
    from .runs import LORA_FILE, read_identity
    from .train import METRICS, SUMMARY, read_metrics

    run_dir = Path(run_dir).resolve()
    cfg = load(run_dir / "config.yaml")
    summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    last = (read_metrics(run_dir) or [{}])[-1] if (run_dir / METRICS).is_file() else {}
    identity = read_identity(run_dir)
    digest = summary.get("dataset_digest") or (identity.dataset_digest if identity else None)
    photos = summary.get("photos") or (len(identity.dataset) if identity else None)
    lora = run_dir / LORA_FILE
    row = {
        "id": cfg.run_name, "status": summary.get("status", "interrupted"), "config_hash": cfg.hash(),
        "token": cfg.data.token, "class": cfg.data.class_name, "train_text_encoder": cfg.train.train_text_encoder,
        "lr_unet": cfg.optim.lr_unet, "lr_text_encoder": cfg.optim.lr_text_encoder, "steps": cfg.train.steps,
        "rank": cfg.lora.rank, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
        "resolution": cfg.resolution, "prior": cfg.prior.enabled,
        "class_images": cfg.prior.num_class_images if cfg.prior.enabled else 0,
        "class_images_generated": summary.get("class_images_generated"),
        "lora_scale_unet": cfg.sample.lora_scale_unet, "lora_scale_text_encoder": cfg.sample.lora_scale_text_encoder,
        "guidance": cfg.sample.guidance, "generation_seeds": " ".join(str(x) for x in cfg.sample.seeds),
        "dataset": _absolute(cfg.data.instance_dir), "photos": photos, "dataset_digest": digest,
        "model": _model_path(cfg.model.name), "family": summary.get("family"), "seconds": summary.get("seconds"), "final_loss": last.get("loss"),
        "final_instance_loss": last.get("instance_loss"), "final_prior_loss": last.get("prior_loss"),
        "eval_instance_loss_before": summary.get("eval_instance_loss_before"),
        "eval_instance_loss_after": summary.get("eval_instance_loss_after"),
        "run_dir": str(run_dir), "lora": str(lora) if summary and lora.is_file() else None,
        **experiment_axes(cfg),
    }
    metrics_file = run_dir / "metrics.json"  # written by `evaluate`
    if metrics_file.is_file():
        from .metrics import random_metric_models

        evaluation = json.loads(metrics_file.read_text())
        for key, value in evaluation.get("summary", {}).items():
            row[f"metric_{key}"] = value
        settings = evaluation.get("settings", {})
        if settings.get("dino_model") or settings.get("clip_model"):
            row["metric_models"] = f"{settings.get('dino_model')}, {settings.get('clip_model')}" + (
                " (random weights): NOT MEANINGFUL" if random_metric_models(settings) else "")
    return row


def scan_runs(root: str | Path) -> list[dict]:
    """Registry rows for every run folder under root (any depth), in the order they started."""
    root = Path(root)
    rows = []
    for cfg_file in sorted(root.rglob("config.yaml"), key=lambda p: (p.stat().st_mtime, str(p))):
        run_dir = cfg_file.parent
        if run_dir.name.startswith(".") or "checkpoints" in run_dir.parts:
            continue
        try:
            rows.append(run_row(run_dir))
        except (ConfigError, OSError, json.JSONDecodeError):
            continue
    for rid, failure in _read_failures(root).items():
        rows.append({"id": rid, "status": "failed", "config_hash": failure.get("config_hash"),
                     "error": failure.get("error"), "seconds": failure.get("seconds"), "_folder": str(root.resolve())})
    rows = one_row_per_run(rows)
    replicates = read_replicates(root)
    for row in rows:
        if row["id"] in replicates:
            rep = replicates[row["id"]]
            row.update({k: rep.get(k) for k in REPLICATE_COLUMNS})
            if "seed" in row:  # the folder's own config says which seed trained it
                row["training_seed"] = row["seed"]
    return rows


RANK = {"finished": 0, "interrupted": 1}  # which row of one run the registry keeps; any other status after these


def one_row_per_run(rows: list[dict]) -> list[dict]:
    """One row per run: of rows with the same folder, id and config hash (twin folders of one
    configuration, or a failure recorded beside the folder that later finished) the finished one,
    else the open one, else the newest; in the order of the rows kept (pure but for `_folder`)."""
    def key(row: dict) -> tuple:
        folder = row.pop("_folder", None)
        if row.get("run_dir"):
            folder = str(Path(row["run_dir"]).parent)
        return folder, row.get("id"), row.get("config_hash")

    best: dict[tuple, tuple[int, int]] = {}
    keys = [key(r) for r in rows]
    for i, (k, row) in enumerate(zip(keys, rows)):
        rank = (RANK.get(row.get("status"), 2), -i)  # the better status, then the later row
        if k not in best or rank < best[k]:
            best[k] = rank
    keep = {-rank[1] for rank in best.values()}
    return [r for i, r in enumerate(rows) if i in keep]


def write_registry(root: str | Path) -> list[dict]:
    """Write <root>/registry.jsonl and registry.csv from the run folders; return the rows. The folders
    are read and both files replaced under the folder's file lock, so that of two sweep processes
    the later write is always the fresher one."""
    root = Path(root)
    with registry_lock(root):
        return _write_registry(root)


def _write_registry(root: Path) -> list[dict]:
    rows = scan_runs(root)
    files.write_text(root / f"{REGISTRY}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    head = COLUMNS[:1] + REPLICATE_COLUMNS + COLUMNS[1:] if any("group" in r for r in rows) else COLUMNS
    columns = head + sorted({k for r in rows for k in r} - set(head))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(root / f"{REGISTRY}.csv", buf.getvalue())
    return rows


def load_registry(path: str | Path) -> list[dict]:
    """The registry as a list of dicts (a sweep folder, its registry.jsonl or its registry.csv)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / f"{REGISTRY}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no registry there: give a sweep folder, its registry.jsonl or registry.csv "
                                "(`python -m dreambooth_lab sweep SPEC` writes them)")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(text: str) -> Any:
    """A registry.csv cell back as the value registry.jsonl holds ('' None, 'True', '0.5', '7')."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def summarise(rows: list[dict], by: str | list[str] = "group", metrics: list[str] | None = None) -> list[dict]:
    """Per group and metric: n, mean, sd and the 95% t-interval across replicates (stats.summarise)."""
    from . import stats

    return stats.summarise(rows, by=by, metrics=metrics)


def compare(rows: list[dict], a: str, b: str, metric: str, by: str | list[str] = "group") -> dict:
    """Whether groups a and b differ on metric: a − b, its Welch 95% interval and a sentence
    (stats.compare)."""
    from . import stats

    return stats.compare(rows, a, b, metric, by=by)


def format_registry(rows: list[dict], columns: tuple[str, ...] = ("id", "status", "token", "train_text_encoder",
                                                                   "steps", "final_loss", "seconds")) -> str:
    """A plain-text table of chosen columns (pure)."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    widths = [max([len(c)] + [len(cell(r.get(c))) for r in rows]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def metrics_note(rows: list[dict], random_models: set[str] | None = None) -> str:
    """A line to print under a metrics table when any of its scores came from the tiny metric
    models with random weights (which say nothing about a run), else '' (pure)."""
    if not (random_models or any(str(r.get("metric_models", "")).endswith("NOT MEANINGFUL") for r in rows)):
        return ""
    which = ", ".join(sorted(random_models or ())) or "eval.dino_model / eval.clip_model = tiny"
    return (f"note: scores marked NOT MEANINGFUL come from tiny metric models with random weights ({which}): they "
            "show that the pipeline runs, not how good a run is. For real numbers use the defaults "
            "(facebook/dino-vits16, openai/clip-vit-base-patch32).")


# settings named under an axis plot: the value when every run shares it, else listed as varying
AXIS_PARAMS = ("model", "token", "class", "train_text_encoder", "steps", "lr_unet", "lr_text_encoder", "rank",
               "batch_size", "resolution", "prior", "lora_scale_unet", "lora_scale_text_encoder", "guidance",
               "generation_seeds")


def axis_sheet(registry: str | Path, axis: str, metric: str, out: str | Path | None = None) -> Path:
    """A metric against one registry column (`sheet axis`): each run a dot, per axis value the mean
    with its 95% t-interval across runs. Written to <sweep folder>/axis_<axis>_<metric>.png (or
    `out`) with a .json of the numbers beside; settings that also vary are named under it."""
    from . import stats
    from .viz import metric_vs_axis

    registry = Path(registry).expanduser()
    rows = [r for r in load_registry(registry) if r.get("status", "finished") == "finished"]
    column = stats.metric_column(rows, metric)
    if not any(axis in r for r in rows):
        there = sorted({k for r in rows for k in r if not k.startswith("metric_")})
        raise ValueError(f"--axis {axis}: not a column of {registry}; columns there: {', '.join(there)}")
    summary = stats.summarise(rows, by=axis, metrics=[column])
    if not summary:
        raise ValueError(f"--metric {metric}: no finished run in {registry} has a value for it")
    used = [r for r in rows if stats.number(r.get(column)) is not None]
    fixed = {c: used[0].get(c) for c in AXIS_PARAMS if c != axis and len({str(r.get(c)) for r in used}) == 1
             and used[0].get(c) is not None}
    varying = [c for c in AXIS_PARAMS if c != axis and len({str(r.get(c)) for r in used}) > 1]
    groups = sorted({str(stats.group_of(r)) for r in used})
    params = {"registry": str(registry), "axis": axis, "metric": column, "runs": len(used), "settings": len(groups),
              "interval": "95% t across runs (a run is the unit)", **fixed}
    if varying:
        params["also varies (pooled per point)"] = " ".join(varying)
    name = column[len("metric_"):] if column.startswith("metric_") else column
    folder = registry if registry.is_dir() else registry.parent
    path = Path(out) if out else folder / f"axis_{axis}_{name}.png"
    files.write_json(path.with_suffix(".json"), {"axis": axis, "metric": column, "params": params, "points": [
        {k: s[k] for k in ("group", "n", "mean", "sd", "low", "high", "values")} for s in summary]})
    return metric_vs_axis([(s["group"], s["values"], s) for s in summary], path, axis=axis, metric=name,
                          title=f"{name} against {axis} ({len(used)} runs)", params=params)
