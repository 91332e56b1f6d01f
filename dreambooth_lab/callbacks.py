"""What the training loop reports to, one small object each: the metrics file, TensorBoard and
validation images, the progress bar, the caller's on_step, and the multi-process rank report.

A callback may define ``on_micro(step, micro, rows)`` (after each micro-batch), ``on_step(record)``
(after each optimizer step, with the logged record) and ``close()`` (when the loop ends, also on an
error). The loop calls whichever exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from . import files, tracking
from .runs import METRICS

RANK_REPORT_ENV = "DREAMBOOTH_LAB_RANK_REPORT"


class MetricsFile:
    """Appends one JSON line per step to <run>/metrics.jsonl (flushed: a kill loses one line at most)."""

    def __init__(self, run_dir: Path, history: list[dict]):
        # Drop lines written after the checkpoint we resume from, then append.
        self.run_dir = run_dir
        files.write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in history))
        self.f = open(run_dir / METRICS, "a")

    def on_step(self, record: dict) -> None:
        with files.disk_full_as(self.run_dir):  # a full disk is one line, not a traceback
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as exc:  # the last line could not be flushed: the run's own fault report says more
            if not files.is_disk_full(exc):
                raise


class Tracker:
    """TensorBoard scalars each step and validation images every train.validation_every steps."""

    def __init__(self, acc, cfg, objective, run_dir: Path):
        self.acc, self.cfg, self.objective, self.run_dir = acc, cfg, objective, run_dir
        self.scalars = tracking.start(acc, cfg, run_dir)

    def on_step(self, record: dict) -> None:
        if self.scalars:
            tracking.log_scalars(self.acc, record)
        every = self.cfg.train.validation_every
        if every and record["step"] % every == 0:
            tracking.log_validation(self.acc, self.cfg, self.objective, record["step"], self.run_dir)


class Progress:
    """A tqdm.auto bar over the steps, showing the loss."""

    def __init__(self, start: int, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="training")

    def on_step(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def close(self) -> None:
        self.bar.close()


class OnStep:
    """The caller's function, called with each step's record (a notebook's live loss plot)."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def on_step(self, record: dict) -> None:
        self.fn(record)


class RankReport:
    """With DREAMBOOTH_LAB_RANK_REPORT=<folder>, each process records which rows it saw and, at the
    end, a digest of its LoRA weights (how the multi-process test checks sharding and sync)."""

    def __init__(self, acc, named: dict):
        self.acc, self.named, self.rows = acc, named, []

    @staticmethod
    def wanted() -> bool:
        return bool(os.environ.get(RANK_REPORT_ENV))

    def on_micro(self, step: int, micro: int, rows: list) -> None:
        self.rows.append([step, micro, [[r.kind, r.index, r.flip] for r in rows]])

    def write(self) -> None:
        digest = hashlib.sha256()
        for name in sorted(self.named):
            digest.update(self.named[name].detach().cpu().float().numpy().tobytes())
        files.write_json(Path(os.environ[RANK_REPORT_ENV]) / f"rank{self.acc.process_index}.json", {
            "rank": self.acc.process_index, "world": self.acc.num_processes, "rows": self.rows,
            "lora_sha256": digest.hexdigest(),
            "lora": {k: v.detach().cpu().float().flatten()[:8].tolist() for k, v in sorted(self.named.items())[:4]}})
