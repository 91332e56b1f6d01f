"""The run lock: which process trains a run folder, and which one claims a sweep's configuration.

While a process trains a run it holds ``train.lock`` (pid, host, start time), created whole and
exclusively and refreshed by a heartbeat; a second process is refused (``RunLocked``, which carries
what a notebook needs to offer ``take_over_lock``), and a lock left by a dead process, by a machine
whose heartbeat has stopped, or damaged and old, is taken over with a message. A sweep claims a
configuration the same way (``claim_run``: a lock under ``<sweep>/.claims/``) before its folder exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import files
from .config import Config

LOCK = "train.lock"  # in a run folder


class RunWarning(UserWarning):
    """Worth knowing about a run folder: a stale lock taken over, damaged checkpoints skipped."""


# ---- the lock -----------------------------------------------------------------------------------

HEARTBEAT = 30.0  # seconds between two refreshes of a held train.lock
STALE_BEATS = 3  # a lock silent for this many heartbeats (another machine's, or damaged) is abandoned
_PID_MAX = 2**31 - 1  # os.kill takes a C int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def parse_lock(raw: bytes) -> tuple[dict | None, str | None]:
    """(holder, None) for the bytes of a valid lock file, (None, what is wrong with it) otherwise (pure).

    A valid lock is a JSON object with a process id (a whole number from 1 to 2**31-1) and a host."""
    if not raw.strip():
        return None, "it is empty"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "it is not JSON"
    if not isinstance(data, dict):
        return None, f"it holds a JSON {type(data).__name__} instead of an object"
    pid, host = data.get("pid"), data.get("host")
    if pid is None:
        return None, "it has no pid"
    if isinstance(pid, bool) or not isinstance(pid, int):
        return None, f"its pid {json.dumps(pid)[:40]} is not a whole number"
    if not 1 <= pid <= _PID_MAX:
        return None, f"its pid {str(pid)[:40]} is not a process id"
    if not isinstance(host, str) or not host:
        return None, "it has no host"
    return data, None


def describe_duration(seconds: float) -> str:
    """'45 s', '2 min 5 s', '3 h 4 min' (pure)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


@dataclass(frozen=True)
class LockState:
    """What a lock file held when it was read: its holder (None when it is not a valid lock, with the
    problem in words), the seconds since it was written or last refreshed, and a key that names these
    very bytes in this very file (two processes that read the same stale lock agree on it)."""
    holder: dict | None
    problem: str | None
    age: float
    key: str


class RunLocked(RuntimeError):
    """Another live process is training this run folder (or its lock cannot be judged safely).

    Carries what a notebook needs to offer a take-over: `run_dir`, `lock_file`, `holder` (the lock's
    contents, None for a damaged lock), `silent_for` (seconds since its last heartbeat) and
    `can_take_over` (False when the holder is a live process on this very machine)."""

    def __init__(self, message: str, run_dir: Path | None = None, lock_file: Path | None = None,
                 holder: dict | None = None, silent_for: float | None = None, can_take_over: bool = False):
        super().__init__(message)
        self.run_dir, self.lock_file, self.holder = run_dir, lock_file, holder
        self.silent_for, self.can_take_over = silent_for, can_take_over


class RunLock:
    """``train.lock`` in a run folder while this process trains it (a context manager).

    The file holds pid, host, start time and a token of its own; a daemon thread touches it every
    `heartbeat` seconds. It is created whole and exclusively (written to a temporary, then hard-linked
    to its name, which fails when the name exists; O_EXCL where links are not supported), so of
    several processes started together exactly one gets it.

    A lock is stale when its process is gone (same host), or its heartbeat has been silent for more
    than `stale_after` (default: STALE_BEATS heartbeats) on another host (a Colab VM that
    disconnected), or it is not a valid lock at all and is that old. A stale lock is taken over with
    a RunWarning; `take_over=True` takes over any lock but a live process's on this machine. Taking
    over cannot race: a process must first create ``train.lock.takeover-<key>`` exclusively for the
    very lock it judged stale, then moves that lock aside and checks it moved the one it judged.
    Anything else raises RunLocked, in one line that names the lock file.
    """

    def __init__(self, run: Path, heartbeat: float = HEARTBEAT, stale_after: float | None = None,
                 take_over: bool = False, clock=time.time, name: str = LOCK):
        self.run = Path(run)
        self.path = self.run / name  # a sweep's claim on a run is the same kind of lock under another name
        self.heartbeat = heartbeat
        self.stale_after = STALE_BEATS * heartbeat if stale_after is None else stale_after
        self.take_over, self.clock = take_over, clock
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    # reading and judging

    def _read(self) -> LockState | None:
        """The lock as it is now; None when there is none."""
        try:
            with open(self.path, "rb") as f:
                st, raw = os.fstat(f.fileno()), f.read(1 << 16)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunLocked(f"{self.path} cannot be read ({exc.strerror or exc}): if no other process is training "
                            f"{self.run}, delete {self.path} and run again", self.run, self.path) from None
        holder, problem = parse_lock(raw)
        key = hashlib.sha256(raw + f"\0{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:16]
        return LockState(holder, problem, self.clock() - st.st_mtime, key)

    def _holder(self) -> dict | None:
        try:
            state = self._read()
        except RunLocked:
            return None
        return state.holder if state else None

    def _stale_reason(self, state: LockState) -> str | None:
        """Why this lock may be taken over, in words; None when it is held."""
        h, silent = state.holder, describe_duration(state.age)
        if h is None:
            if state.age > self.stale_after or self.take_over:
                return f"it is not a valid lock ({state.problem}) and was last written {silent} ago"
            return None
        who = f"process {h['pid']} on {h['host']}"
        if h["host"] == self.me["host"]:
            if h["pid"] == self.me["pid"]:
                return f"it was left by this very process ({who})"
            return None if _pid_alive(h["pid"]) else f"it was left by {who}, which is no longer running"
        if state.age > self.stale_after:
            return (f"it was left by {who}, whose heartbeat (every {describe_duration(self.heartbeat)}) has been "
                    f"silent for {silent}: that machine is gone")
        if self.take_over:
            return f"it was held by {who} (last heartbeat {silent} ago), taken over as asked"
        return None

    def _refusal(self, state: LockState) -> RunLocked:
        h, run = state.holder, self.run
        if h is None:
            return RunLocked(f"{self.path} is not a valid lock ({state.problem}; last written "
                             f"{describe_duration(state.age)} ago): if no other process is training {run}, delete "
                             f"{self.path} and run again (it is taken over by itself once it is "
                             f"{describe_duration(self.stale_after)} old)", run, self.path, None, state.age, True)
        where = f"process {h['pid']} on {h['host']} (since {h.get('started', '?')}"
        if h["host"] == self.me["host"]:
            return RunLocked(f"{run} is being trained by {where}, this machine): wait for it to finish, stop that "
                             "process, or start a new run (resume=None / --new-run)", run, self.path, h, state.age,
                             False)
        wait = describe_duration(self.stale_after - state.age + 1)
        return RunLocked(f"{run} is being trained by {where}; last heartbeat {describe_duration(state.age)} ago): "
                         f"wait for it to finish or start a new run (resume=None / --new-run); if {h['host']} is "
                         f"gone, its lock is taken over by itself in {wait}", run, self.path, h, state.age, True)

    # creating and taking over

    def _body(self) -> bytes:
        return json.dumps({**self.me, "started": files.timestamp(), "token": self.token}, sort_keys=True).encode()

    def _create(self) -> bool:
        """Create the lock whole and exclusively; False when a lock is there already."""
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        try:
            tmp.write_bytes(self._body())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (EPERM, ENOTSUP... on some network and FUSE file systems)
                pass
        finally:
            tmp.unlink(missing_ok=True)
        # O_EXCL, then the body: a reader that meets the file before its body sees a young invalid lock,
        # which it waits for and never takes over.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _move_aside(self, state: LockState) -> bool:
        """Remove the very lock `state` was read from, racing nobody; False when another process is
        taking it over or it is no longer there (the caller reads the lock again)."""
        marker = self.path.with_name(f"{self.path.name}.takeover-{state.key}")
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            try:  # a take-over that died half-way (between these two steps) leaves its marker behind
                if self.clock() - marker.stat().st_mtime > 10:
                    marker.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        aside = self.path.with_name(f".{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                st, raw = os.fstat(f.fileno()), f.read(1 << 16)
            if hashlib.sha256(raw + f"\0{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:16] != state.key:
                try:  # released and made anew between our read and the rename: put it back
                    os.link(aside, self.path)
                except OSError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        settle = time.monotonic() + 2.0  # time for a lock created with O_EXCL to get its body
        for _ in range(200):
            if self._create():
                break
            state = self._read()
            if state is None:
                continue
            reason = self._stale_reason(state)
            if reason is None:
                if state.holder is None and state.age < 2.0 and time.monotonic() < settle:
                    time.sleep(0.02)  # most likely being written by the process that just created it
                    continue
                raise self._refusal(state)
            if self._move_aside(state):
                warnings.warn(f"taking over {self.path}: {reason}", RunWarning, stacklevel=3)
            else:
                time.sleep(0.005)
        else:
            raise RunLocked(f"{self.path} kept changing while other processes took it: wait for them to finish "
                            "and run again", self.run, self.path)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _is_mine(self) -> bool:
        h = self._holder()
        return bool(h) and h.get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self._is_mine():  # taken over by hand: leave the new holder's heartbeat alone
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._thread is not None and self._is_mine():
            self.path.unlink(missing_ok=True)
            for marker in self.path.parent.glob(f"{self.path.name}.takeover-*"):  # of locks taken over before
                marker.unlink(missing_ok=True)
        self._thread = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def take_over_lock(run_dir: str | Path, holder: dict | None = None) -> dict | None:
    """Remove the lock of `run_dir` on the user's say-so (a notebook's "take over" button after
    RunLocked), so the next train() of this run takes it. Returns what the lock held (None when there
    was none, {} for a damaged one), with a RunWarning.

    `holder`: the RunLocked's `holder`; when given, only that very lock is removed (RunLocked if
    another has taken its place). A live process on this machine is never taken over (RunLocked)."""
    lock = RunLock(Path(run_dir).expanduser(), take_over=True)
    for _ in range(200):
        state = lock._read()
        if state is None:
            return None
        if holder is not None and (state.holder is None or any(
                state.holder.get(k) != holder.get(k) for k in ("pid", "host", "started", "token"))):
            raise RunLocked(f"{lock.path} has changed since it was reported: {lock._refusal(state)}", lock.run,
                            lock.path, state.holder, state.age, False)
        reason = lock._stale_reason(state)
        if reason is None:
            raise lock._refusal(state)
        if lock._move_aside(state):
            warnings.warn(f"took over {lock.path}: {reason}", RunWarning, stacklevel=2)
            return state.holder or {}
        time.sleep(0.005)
    raise RunLocked(f"{lock.path} kept changing while other processes took it: wait for them to finish "
                    "and run again", lock.run, lock.path)


# ---- claims: which process trains a configuration -----------------------------------------------

CLAIMS = ".claims"  # under train.output_dir (a sweep's folder)


def claim_path(cfg: Config) -> Path:
    """<train.output_dir>/.claims/<run name>-<config hash>.claim: the lock a sweep takes on a run before
    it looks for the run's folder, so that two sweeps (or two Ray tasks) never make two folders for one
    configuration (train.lock cannot: it is taken once the folder exists)."""
    return Path(cfg.train.output_dir).expanduser() / CLAIMS / f"{cfg.run_name}-{cfg.hash()}.claim"


def claim_run(cfg: Config, heartbeat: float = HEARTBEAT) -> RunLock:
    """Claim cfg's run for this process and return the held lock (call .release()). RunLocked, with
    its `holder`, when a live process holds it; a claim left by a dead process, or by a machine whose
    heartbeat stopped, is taken over with a RunWarning, as train.lock is."""
    path = claim_path(cfg)
    with files.disk_full_as(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return RunLock(path.parent, heartbeat=heartbeat, name=path.name).acquire()


def claim_holder(cfg: Config) -> dict | None:
    """Who holds cfg's claim now, as its lock says (pid, host, started; {} while it is being written);
    None when nobody does: no claim, or one that claim_run would take over (side-effect free)."""
    path = claim_path(cfg)
    lock = RunLock(path.parent, name=path.name)
    try:
        state = lock._read()
    except RunLocked:
        return {}
    if state is None:
        return None
    return None if lock._stale_reason(state) is not None else (state.holder or {})


def describe_holder(holder: dict | None) -> str:
    """'process 123 on gpu-2 (since 20261204-221500)' (pure)."""
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started', '?')})"
