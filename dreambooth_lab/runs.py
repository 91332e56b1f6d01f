"""A run folder: its layout, its identity, its lock, and which folder a train() call uses.

A run is what it says it is: its identity is the config hash (what decides the weights, see
``Config.hash``) *and* a digest of the photos (file names and bytes, in sorted order). Both are
written into ``identity.json`` when the folder is made and into ``summary.json`` and the LoRA's
metadata when it finishes. A finished run is reused, and an unfinished one resumed, only when both
match; otherwise the caller hears what changed and how to start fresh.

While a process trains a run it holds ``train.lock`` (pid, host, start time), refreshed by a
heartbeat; a second process is refused, and a lock left by a dead process is taken over with a
message.

Layout of a run folder::

    config.yaml  identity.json  train.lock  metrics.jsonl  checkpoints/step-NNNNNN/
    dataset.png  pytorch_lora_weights.safetensors  summary.json  loss.png  samples/ ...
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import files
from .config import Config, ConfigError, load, to_yaml

CONFIG = "config.yaml"
IDENTITY = "identity.json"
LOCK = "train.lock"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


class RunMismatch(ValueError):
    """An existing run was made with another config or other photos than the one asked for."""


class RunLocked(RuntimeError):
    """Another live process is training this run folder."""


class RunWarning(UserWarning):
    """Worth knowing about a run folder: a stale lock taken over, damaged checkpoints skipped."""


# ---- identity ---------------------------------------------------------------------------------

def dataset_manifest(folder: str | Path, captions: str = "none") -> dict[str, str]:
    """File name -> sha256 of every photo the loader would read from folder, sorted (side-effect free);
    with captions="sidecar" also of each photo's caption file (a changed caption is a changed dataset)."""
    from .data import caption_path, find_images

    out = {}
    for path in find_images(folder):
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        if captions == "sidecar" and (cap := caption_path(path)).is_file():
            out[cap.name] = hashlib.sha256(cap.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def dataset_digest(manifest: dict[str, str]) -> str:
    """One digest of the photos: names and bytes in sorted order (pure)."""
    h = hashlib.sha256()
    for name, sha in sorted(manifest.items()):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()[:16]


def describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    """'2 added (a.jpg, b.jpg), 1 changed (c.jpg)': how two photo sets differ (pure)."""
    def names(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", … {len(keys) - 4} more" if len(keys) > 4 else "")

    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    parts = [f"{len(v)} {word} ({names(v)})" for word, v in (("added", added), ("removed", removed),
                                                               ("changed", changed)) if v]
    return ", ".join(parts) or "no difference"


@dataclass(frozen=True)
class Identity:
    config_hash: str
    dataset: dict[str, str]  # photo name -> sha256

    @property
    def dataset_digest(self) -> str:
        return dataset_digest(self.dataset)

    @classmethod
    def of(cls, cfg: Config) -> "Identity":
        return cls(cfg.hash(), dataset_manifest(cfg.data.instance_dir, cfg.data.captions))

    def to_json(self) -> dict:
        return {"config_hash": self.config_hash, "dataset_digest": self.dataset_digest, "dataset": self.dataset}

    def differences(self, other: "Identity") -> list[str]:
        """What differs from `other` (the run's recorded identity), in words."""
        out = []
        if other.config_hash != self.config_hash:
            out.append(f"the config differs (hash {other.config_hash} in the run, {self.config_hash} now)")
        if other.dataset_digest != self.dataset_digest:
            out.append(f"the photos differ: {describe_change(other.dataset, self.dataset)} since the run started")
        return out


def read_identity(run: Path) -> Identity | None:
    """A run's recorded identity; None for a folder without one (made by an older version)."""
    try:
        data = json.loads((Path(run) / IDENTITY).read_text())
        return Identity(data["config_hash"], dict(data["dataset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- state of a run folder ----------------------------------------------------------------------

def read_summary(run: Path) -> dict | None:
    try:
        return json.loads((Path(run) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def is_finished(run: Path) -> bool:
    s = read_summary(run)
    return bool(s) and s.get("status", "finished") == "finished" and (Path(run) / LORA_FILE).is_file()


def is_open(run: Path) -> bool:
    """Neither finished nor marked failed: a run that can be resumed."""
    return not (Path(run) / SUMMARY).exists()


def runs_of(cfg: Config) -> list[Path]:
    """Run folders of this exact training config (same hash), newest first."""
    out = Path(cfg.train.output_dir).expanduser()
    if not out.is_dir():
        return []
    want, found = cfg.hash(), []
    for run in sorted(out.glob(f"{cfg.run_name}-*"), reverse=True):
        ident = read_identity(run)
        try:
            same = ident.config_hash == want if ident else (
                (run / CONFIG).is_file() and load(run / CONFIG).hash() == want)
        except (ConfigError, OSError):  # a folder from another version or a hand-edited config
            continue
        if same:
            found.append(run)
    return found


def find_finished(cfg: Config, ident: Identity | None = None) -> Path | None:
    """The newest finished run of this config trained on these very photos (None when the photo
    folder is missing: nothing can have been trained on it)."""
    from .data import DatasetError

    if ident is None:
        try:
            ident = Identity.of(cfg)
        except DatasetError:
            return None
    for run in runs_of(cfg):
        recorded = read_identity(run)
        if is_finished(run) and recorded is not None and not ident.differences(recorded):
            return run
    return None


def find_resumable(cfg: Config) -> Path | None:
    """The newest unfinished run of this config that has a checkpoint, whatever its photos."""
    from .checkpoint import list_checkpoints

    for run in runs_of(cfg):
        if is_open(run) and read_identity(run) is not None and list_checkpoints(run):
            return run
    return None


def check_reusable(cfg: Config, ident: Identity) -> Path | None:
    """A finished run to reuse, None to train; RunMismatch when the only finished runs of this
    config were trained on other photos (reusing one would hand back the wrong LoRA)."""
    done = find_finished(cfg, ident)
    if done is not None:
        return done
    for run in runs_of(cfg):
        recorded = read_identity(run)
        if is_finished(run) and recorded is not None:
            raise RunMismatch(f"{run} has this config but {'; '.join(ident.differences(recorded))}. "
                              f"To train on the current photos start a new run: train(cfg) without "
                              f"reuse_finished, or `train --new-run` from the command line")
    return None


# ---- which folder a train() call uses ---------------------------------------------------------------

@dataclass
class Opened:
    path: Path
    new: bool
    override: dict | None = None  # what differed when an explicit resume was forced


def open_run(cfg: Config, ident: Identity, resume, allow_change: bool = False) -> Opened:
    """Create a new run folder or pick the one to resume, refusing a mismatched one.

    resume="auto": the newest unfinished run of this config, if its photos are the same (else
    RunMismatch). resume=<path>: that run; a different config or different photos are refused
    unless allow_change=True, which is recorded. resume=None: always a new folder.
    """
    if resume not in (None, "auto"):
        run = Path(resume).expanduser()
        if not (run / CONFIG).is_file():
            raise FileNotFoundError(f"{run} is not a run folder (it has no {CONFIG}): pass the folder that "
                                    f"train() printed, or resume='auto'")
        if not is_open(run):
            raise RunMismatch(f"{run} has already ended ({(read_summary(run) or {}).get('status', 'finished')}); "
                              "it cannot be resumed: start a new run")
        recorded = read_identity(run)
        diffs = ident.differences(recorded) if recorded else ["the run has no identity.json (an older version)"]
        if diffs and not allow_change:
            raise RunMismatch(f"cannot resume {run}: {'; '.join(diffs)}. Resume it with the config and photos it "
                              "was started with, start a new run (resume=None / --new-run), or pass "
                              "allow_change=True (--allow-change) to continue it anyway (recorded in summary.json)")
        override = {"differences": diffs, "config_hash": ident.config_hash,
                    "dataset_digest": ident.dataset_digest} if diffs else None
        if diffs:
            files.write_text(run / f"config-resumed-{files.timestamp()}.yaml", to_yaml(cfg))
        return Opened(run, False, override)
    if resume == "auto" and (run := find_resumable(cfg)) is not None:
        diffs = ident.differences(read_identity(run))
        if diffs:
            raise RunMismatch(f"the unfinished run {run} has this config but {'; '.join(diffs)}. To train on the "
                              "current photos start a new run: train(cfg, resume=None), or `train --new-run`")
        return Opened(run, False)
    run = files.new_dir(cfg.train.output_dir, cfg.run_name)
    files.write_text(run / CONFIG, to_yaml(cfg))
    files.write_json(run / IDENTITY, ident.to_json())
    return Opened(run, True)


# ---- the lock -----------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``train.lock`` in a run folder while this process trains it (a context manager).

    The file holds pid, host and start time; a daemon thread touches it every `heartbeat`
    seconds. A lock is stale when its process is gone (same host) or its heartbeat is older than
    `stale_after` (another host: a Colab VM that disconnected); a stale lock is taken over with a
    RunWarning, a live one raises RunLocked.
    """

    def __init__(self, run: Path, heartbeat: float = 30.0, stale_after: float = 300.0):
        self.path = Path(run) / LOCK
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a write that was interrupted
            return True
        if holder.get("host") == self.me["host"]:
            return holder.get("pid") == self.me["pid"] or not _pid_alive(int(holder.get("pid", -1)))
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        return age > self.stale_after

    def acquire(self) -> "RunLock":
        body = json.dumps({**self.me, "started": files.timestamp()}, sort_keys=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = self._holder()
            if not self._is_stale(holder):
                raise RunLocked(f"{self.path.parent} is being trained by process {holder['pid']} on "
                                f"{holder['host']} (since {holder.get('started', '?')}): wait for it to finish, "
                                "or start a new run (resume=None / --new-run)") from None
            who = f"process {holder['pid']} on {holder['host']}" if holder else "an unreadable lock"
            warnings.warn(f"taking over {self.path} left by {who}, which is no longer running", RunWarning,
                          stacklevel=3)
            files.write_text(self.path, body)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(body)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- reading a run back ------------------------------------------------------------------------

def read_metrics(run_dir: Path, up_to_step: int | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            break
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]
