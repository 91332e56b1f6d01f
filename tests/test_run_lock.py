"""The run lock (`run_lock.RunLock`): exclusive under a race, one line for a damaged lock file, a lock of a
machine that is gone taken over at once, and an explicit take-over for the notebook."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import time
import warnings
from pathlib import Path

import pytest

from dreambooth_lab import run_lock

WORKERS = 4


def _no_hard_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")


def _contender(barrier, trials, results, links):
    """One process of the race: for each trial folder, wait for the others, try to take the lock,
    report, and hold it until every contender has reported (so a late one cannot take a released lock)."""
    warnings.simplefilter("ignore")
    if not links:  # a file system without hard links (some FUSE mounts): the O_EXCL path
        run_lock.os.link = _no_hard_links
    for trial in trials:
        barrier.wait()
        lock = None
        try:
            lock = run_lock.RunLock(Path(trial), heartbeat=3600, stale_after=600).acquire()
            results.put((trial, "acquired"))
        except run_lock.RunLocked:
            results.put((trial, "refused"))
        except Exception as exc:  # anything else is a failure of the test too
            results.put((trial, f"{type(exc).__name__}: {exc}"))
        barrier.wait()
        if lock is not None:
            lock.release()


def _dead_pid() -> int:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=int)
    proc.start()
    proc.join()
    return proc.pid


def _plant(folder: Path, kind: str, dead_pid: int) -> None:
    old = time.time() - 3600
    lock = folder / run_lock.LOCK
    if kind == "none":
        return
    if kind == "dead process":
        lock.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "x"}))
    elif kind == "gone machine":
        lock.write_text(json.dumps({"pid": 4242, "host": "a-colab-vm-that-is-gone", "started": "x"}))
    elif kind == "damaged":
        lock.write_text('{"pid": 12')
    os.utime(lock, (old, old))


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_exactly_one_of_several_processes_released_together_gets_the_lock(tmp_path, links):
    kinds = ["none", "dead process", "gone machine", "damaged"]
    trials = [tmp_path / f"t{i:02d}" for i in range(40)]  # 10 of each kind
    dead = _dead_pid()
    for i, trial in enumerate(trials):
        trial.mkdir()
        _plant(trial, kinds[i % len(kinds)], dead)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(barrier, [str(t) for t in trials], results, links)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        got: dict[str, list[str]] = {}
        for _ in range(len(trials) * WORKERS):
            trial, outcome = results.get(timeout=60)
            got.setdefault(trial, []).append(outcome)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    bad = {Path(t).name + f" ({kinds[int(Path(t).name[1:]) % len(kinds)]})": o for t, o in got.items()
           if sorted(o) != ["acquired"] + ["refused"] * (WORKERS - 1)}
    assert not bad, f"not exactly one holder: {bad}"
    assert all(not (t / run_lock.LOCK).exists() for t in trials), "the holder released its lock"
    assert not list(tmp_path.glob("t*/.train.lock.*")), "no temporaries left behind"


# ---- pure helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, problem", [
    (b"", "it is empty"),
    (b"garbage{", "it is not JSON"),
    (b"\xff\xfe", "it is not JSON"),
    (b"[1, 2]", "it holds a JSON list instead of an object"),
    (b'"a string"', "it holds a JSON str instead of an object"),
    (b'{"host": "vm"}', "it has no pid"),
    (b'{"pid": "abc", "host": "vm"}', 'its pid "abc" is not a whole number'),
    (b'{"pid": true, "host": "vm"}', "its pid true is not a whole number"),
    (b'{"pid": 1.5, "host": "vm"}', "its pid 1.5 is not a whole number"),
    (b'{"pid": 12345678901234567890, "host": "vm"}', "its pid 12345678901234567890 is not a process id"),
    (b'{"pid": 0, "host": "vm"}', "its pid 0 is not a process id"),
    (b'{"pid": -1, "host": "vm"}', "its pid -1 is not a process id"),
    (b'{"pid": 12}', "it has no host"),
    (b'{"pid": 12, "host": ""}', "it has no host"),
])
def test_parse_lock_says_what_is_wrong(raw, problem):
    assert run_lock.parse_lock(raw) == (None, problem)


def test_parse_lock_accepts_a_lock_of_an_older_version():
    holder = {"pid": 12, "host": "vm", "started": "x"}
    assert run_lock.parse_lock(json.dumps(holder).encode()) == (holder, None)


@pytest.mark.parametrize("seconds, words", [(0, "0 s"), (44.6, "45 s"), (60, "1 min"), (125, "2 min 5 s"),
                                            (3 * 3600 + 4 * 60 + 9, "3 h 4 min"), (-3, "0 s")])
def test_describe_duration(seconds, words):
    assert run_lock.describe_duration(seconds) == words


# ---- damaged lock files: one line naming the file, taken over once they are old -------------------

DAMAGED = {
    "no pid": '{"host": "vm"}',
    "a list": "[1, 2]",
    "a JSON string": '"train.lock"',
    "20-digit pid": '{"pid": 12345678901234567890, "host": "vm"}',
    "pid abc": '{"pid": "abc", "host": "vm"}',
    "pid 0": '{"pid": 0, "host": "vm"}',
    "empty": "",
    "not JSON": "garbage{",
}


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.parametrize("body", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_lock_is_one_line_naming_the_file_and_taken_over_once_old(tmp_path, body):
    lock_file = tmp_path / run_lock.LOCK
    lock_file.write_text(body)
    _age(lock_file, 30)  # younger than three heartbeats: perhaps another process writing it
    with pytest.raises(run_lock.RunLocked) as info:
        run_lock.RunLock(tmp_path).acquire()
    message = str(info.value)
    assert "\n" not in message and str(lock_file) in message and "is not a valid lock" in message
    assert "delete" in message and "taken over by itself once it is 1 min 30 s old" in message
    assert info.value.run_dir == tmp_path and info.value.lock_file == lock_file and info.value.holder is None
    assert info.value.can_take_over and lock_file.read_text() == body, "a refused lock is left as it was"

    _age(lock_file, 120)  # older than three heartbeats: abandoned
    with pytest.warns(run_lock.RunWarning, match=f"taking over {lock_file}: it is not a valid lock .*2 min ago"):
        lock = run_lock.RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "lock, markers and temporaries all gone"


def test_an_unreadable_lock_is_one_line_naming_the_file(tmp_path):
    (tmp_path / run_lock.LOCK).mkdir()  # not a file at all
    with pytest.raises(run_lock.RunLocked, match=f"^{tmp_path / run_lock.LOCK} cannot be read .*delete"):
        run_lock.RunLock(tmp_path).acquire()


# ---- a lock of a machine that is gone (a Colab reconnect) ---------------------------------------

FOREIGN = {"pid": 4242, "host": "old-colab-vm", "started": "20250101-120000", "token": "abc"}


def test_a_foreign_lock_whose_heartbeat_stopped_is_taken_over_at_once(tmp_path):
    assert run_lock.HEARTBEAT == 30 and run_lock.RunLock(tmp_path).stale_after == 90
    lock_file = tmp_path / run_lock.LOCK
    lock_file.write_text(json.dumps(FOREIGN))
    _age(lock_file, 95)  # three heartbeats and a bit: the VM is gone (the old default waited 5 min)
    with pytest.warns(run_lock.RunWarning, match="taking over .*process 4242 on old-colab-vm, whose heartbeat "
                                             r"\(every 30 s\) has been silent for 1 min 35 s"):
        with run_lock.RunLock(tmp_path):
            assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
    assert not lock_file.exists()


def test_a_foreign_lock_with_a_live_heartbeat_is_refused_with_what_a_notebook_needs(tmp_path):
    lock_file = tmp_path / run_lock.LOCK
    lock_file.write_text(json.dumps(FOREIGN))
    now = time.time()
    os.utime(lock_file, (now, now))
    with pytest.raises(run_lock.RunLocked) as info:  # the clock is injected: 40 s after the last heartbeat
        run_lock.RunLock(tmp_path, clock=lambda: now + 40).acquire()
    exc, message = info.value, str(info.value)
    assert "\n" not in message and "process 4242 on old-colab-vm" in message and "40 s ago" in message
    assert "wait for it to finish" in message and "taken over by itself in 51 s" in message
    assert exc.run_dir == tmp_path and exc.holder == FOREIGN and exc.can_take_over and exc.silent_for == 40
    with pytest.warns(run_lock.RunWarning, match="taking over"):  # the same lock, 100 s later: taken over
        run_lock.RunLock(tmp_path, clock=lambda: now + 100).acquire().release()


def test_take_over_lock_removes_exactly_the_lock_that_was_reported(tmp_path):
    lock_file = tmp_path / run_lock.LOCK
    lock_file.write_text(json.dumps(FOREIGN))
    with pytest.raises(run_lock.RunLocked) as info:
        run_lock.RunLock(tmp_path).acquire()
    other = {**FOREIGN, "token": "another"}
    with pytest.raises(run_lock.RunLocked, match="has changed since it was reported"):
        run_lock.take_over_lock(tmp_path, holder=other)
    assert lock_file.exists()
    with pytest.warns(run_lock.RunWarning, match=f"took over {lock_file}: it was held by process 4242 on old-colab-vm"):
        assert run_lock.take_over_lock(info.value.run_dir, holder=info.value.holder) == FOREIGN
    assert not lock_file.exists() and run_lock.take_over_lock(tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next acquire has nothing to take over
        run_lock.RunLock(tmp_path).acquire().release()


def test_take_over_never_takes_a_live_process_on_this_machine(tmp_path):
    import subprocess
    import sys

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / run_lock.LOCK).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with pytest.raises(run_lock.RunLocked) as info:
            run_lock.RunLock(tmp_path, take_over=True).acquire()
        assert not info.value.can_take_over and "stop that process" in str(info.value)
        with pytest.raises(run_lock.RunLocked, match=f"process {alive.pid} on .*this machine"):
            run_lock.take_over_lock(tmp_path)
    finally:
        alive.kill()
        alive.wait()


def test_run_lock_take_over_true_takes_a_live_foreign_lock(tmp_path):
    (tmp_path / run_lock.LOCK).write_text(json.dumps(FOREIGN))
    with pytest.warns(run_lock.RunWarning, match="taken over as asked"):
        lock = run_lock.RunLock(tmp_path, take_over=True).acquire()
    lock.release()
    assert not (tmp_path / run_lock.LOCK).exists()


def test_a_lock_taken_over_by_hand_is_left_to_its_new_holder(tmp_path):
    first = run_lock.RunLock(tmp_path, heartbeat=0.02).acquire()
    second = run_lock.RunLock(tmp_path, take_over=True)
    second.me = {"pid": 4242, "host": "new-colab-vm"}  # as if on another machine
    with pytest.warns(run_lock.RunWarning, match="taken over as asked"):
        second.acquire()
    time.sleep(0.1)
    first.release()  # the old holder neither refreshes nor removes the new holder's lock
    assert json.loads((tmp_path / run_lock.LOCK).read_text())["host"] == "new-colab-vm"
    second.release()
    assert not (tmp_path / run_lock.LOCK).exists()


def test_a_lock_still_being_written_is_waited_for_not_taken_over(tmp_path):
    """Where hard links are not supported the lock is created empty (O_EXCL) and then written: a
    reader that meets it empty waits for its body rather than calling it damaged."""
    import threading

    lock_file = tmp_path / run_lock.LOCK
    lock_file.write_text("")
    writer = threading.Timer(0.2, lambda: lock_file.write_text(json.dumps(FOREIGN)))
    writer.start()
    try:
        with pytest.raises(run_lock.RunLocked, match="is being trained by process 4242 on old-colab-vm"):
            run_lock.RunLock(tmp_path).acquire()
    finally:
        writer.join()
