"""How training stops early: the exceptions train() raises and, for each way a run can end before
its last step (a non-finite loss, a full disk, Ctrl-C), what the run folder is left with and the one
line that says what to do next."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import checkpoint, files, runs
from .config import Config, _get
from .runs import TrainingStopped

__all__ = ["TrainingStopped", "NonFiniteLoss", "TrainingInterrupted", "stopped", "stop_failed", "blown_groups",
           "large_learning_rate", "stop_disk_full", "discard_untrained", "trained_anything"]


class NonFiniteLoss(TrainingStopped, FloatingPointError):
    """The loss became NaN or inf; the run folder is marked failed. The message speaks the Python API;
    `cli_message` says the same in the command line's words (what cli.py prints)."""

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message or message


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a notebook's stop button) during training; the message says how to resume."""


def stopped(exc: FloatingPointError | KeyboardInterrupt, cfg: Config, run_dir: Path, start: int, step: int,
            named: dict[str, torch.Tensor], identifier: torch.Tensor | None, *,
            main: bool) -> NonFiniteLoss | TrainingInterrupted:
    """What train() raises when its loop stops on `exc`, in a run that began this call at `start` and
    completed `step` steps: a non-finite loss marks the run failed (stop_failed, told which of the
    trained weights `named` and `identifier` went non-finite); Ctrl-C says where it stopped and how
    to resume."""
    if isinstance(exc, FloatingPointError):
        return stop_failed(cfg, run_dir, step + 1, blown_groups(named, identifier), exc, main=main)
    where = "before the first step" if step == start == 0 else f"at step {step}"
    ckpts = checkpoint.list_checkpoints(run_dir)
    note = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written"
    return TrainingInterrupted(f"interrupted {where} of {cfg.train.steps} ({run_dir}); run the same command to "
                               f"resume ({note})")


# ---- a non-finite loss ----------------------------------------------------------------------------

def stop_failed(cfg: Config, run_dir: Path, step: int, blown: set[str], exc: FloatingPointError, *,
                main: bool) -> NonFiniteLoss:
    """Mark the run failed at `step` in summary.json and say, in one line, what to try: the learning
    rate that is large (of the `blown` groups, those whose weights went non-finite, else the one
    furthest above its default) or fp16, and how to go on from the last good checkpoint with the
    change (train(..., resume=<run>, allow_change=True); on the CLI --resume RUN --allow-change), or
    that nothing is kept."""
    if cfg.train.mixed_precision == "fp16":
        change = "train.mixed_precision=bf16"
        hint = "fp16 overflow is the usual cause: use train.mixed_precision=bf16 or no"
    else:
        field, value = large_learning_rate(cfg, blown)
        change = f"{field}={value / 2:g}"
        hint = f"lower {field} (now {value:g}; e.g. halve it)"
    if main:
        runs.write_summary(run_dir, "failed", error=str(exc), failed_at_step=step, config_hash=cfg.hash(),
                           steps=cfg.train.steps)
    ckpts = checkpoint.list_checkpoints(run_dir)
    head = f"loss became non-finite at step {step} in {run_dir}: {hint}; also try full precision " \
           "(train.mixed_precision=no)"
    if ckpts:
        api = (f"{head}; the last good checkpoint is {ckpts[-1]}: to go on from it with the change, "
               f"train(cfg, resume={str(run_dir)!r}, allow_change=True)")
        cli = (f"{head}; the last good checkpoint is {ckpts[-1]}: to go on from it with the change, run the same "
               f"command with --set {change} --resume {run_dir} --allow-change")
    else:
        api = cli = f"{head}; no checkpoint was written, so no step is kept: train again with the change (a new run)"
    return NonFiniteLoss(api, cli)


LR_FIELDS = {"unet": "optim.lr_unet", "text_encoder": "optim.lr_text_encoder",
             "text_encoder_2": "optim.lr_text_encoder_2", "identifier": "identifier.lr"}


def blown_groups(named: dict[str, torch.Tensor], identifier: torch.Tensor | None) -> set[str]:
    """The optimizer groups (unet, text_encoder, text_encoder_2, identifier) with a non-finite weight,
    from the trainable parameters by name and the learned identifier (None without one)."""
    out = set()
    if identifier is not None and not bool(torch.isfinite(identifier).all()):
        out.add("identifier")
    for name, p in named.items():
        if p is not identifier and name.split(".", 1)[0] not in out and not bool(torch.isfinite(p).all()):
            out.add(name.split(".", 1)[0])
    return out


def large_learning_rate(cfg: Config, blown: set[str] = frozenset()) -> tuple[str, float]:
    """(field, value) of the learning rate to lower after a non-finite loss: among the groups that
    train (those whose weights went non-finite when any did), the one furthest above its default (pure)."""
    defaults = Config()
    trained = {"unet"}
    if cfg.train.train_text_encoder:
        trained |= {"text_encoder"} | ({"text_encoder_2"} if cfg.optim.lr_text_encoder_2 is not None else set())
    if cfg.identifier.learned:
        trained.add("identifier")
    pool = (trained & blown) or trained
    ratios = {}
    for group in pool:
        field = LR_FIELDS[group]
        value = _get(cfg, field)
        default = _get(defaults, field) or defaults.optim.lr_text_encoder
        ratios[field] = (value / default, value)
    field = max(sorted(ratios), key=lambda f: ratios[f][0])
    return field, ratios[field][1]


# ---- a full disk ---------------------------------------------------------------------------------

OUTPUT_HINT = "free space there or point train.output_dir to another disk"


def trained_anything(opened: runs.Opened, step: int | None) -> bool:
    """Is there anything in the run folder a full disk must not lose: steps done in this call (`step`:
    the steps completed, None before set-up finished), a checkpoint, or a run that existed before?"""
    return (not opened.new) or (step is not None and step > 0) or bool(checkpoint.list_checkpoints(opened.path))


def output_hint(exc: files.DiskFull, run_dir: Path) -> str:
    """What to do about a full disk, by where it was writing: the run folder (train.output_dir) or
    elsewhere (the class-image cache says prior.cache_dir itself)."""
    inside = Path(exc.folder).resolve().is_relative_to(Path(run_dir).resolve())
    return OUTPUT_HINT if inside else exc.hint


def stop_disk_full(cfg: Config, run_dir: Path, step: int | None, exc: OSError, *, main: bool) -> files.DiskFull:
    """A full disk after training began (at `step`, None before set-up finished): mark the run failed
    at its step, resumable from its newest checkpoint by the same command (summary.json says so;
    runs.is_open), and say it in one line."""
    full = exc if isinstance(exc, files.DiskFull) else files.as_disk_full(exc, run_dir)
    ckpts = checkpoint.list_checkpoints(run_dir)
    resume = (f"run the same command to resume from step {checkpoint.step_of(ckpts[-1])}" if ckpts
              else "no checkpoint was written, so the same command starts again from step 0")
    marked = "" if not main else "; " + mark_failed_on_full_disk(cfg, run_dir, step, ckpts, full)
    at = f" at step {step}" if step is not None else ""
    return full.again(hint=f"{output_hint(full, run_dir)}, then {resume}; training stopped{at}{marked}")


def mark_failed_on_full_disk(cfg: Config, run_dir: Path, step: int | None, ckpts: list[Path],
                             full: files.DiskFull) -> str:
    """Write summary.json (status failed, resumable when a checkpoint is there); the words that say
    whether it could be written."""
    try:
        runs.write_summary(run_dir, "failed", reason="disk_full", error=str(full.again(hint="free space")),
                           failed_at_step=step, resumable=bool(ckpts), config_hash=cfg.hash(), steps=cfg.train.steps)
    except OSError as err:
        if not files.is_disk_full(err):
            raise
        return f"summary.json could not be written either, so {run_dir.name} is not marked failed"
    return f"{run_dir} is marked failed in summary.json"


def discard_untrained(opened: runs.Opened, exc: OSError, *, main: bool) -> files.DiskFull:
    """A full disk before the first step of a new run: the run folder goes (nothing was trained;
    left behind it would be an orphan), and the line says what to do."""
    full = exc if isinstance(exc, files.DiskFull) else files.as_disk_full(exc, opened.path)
    if main:
        shutil.rmtree(opened.path, ignore_errors=True)
    return full.again(hint=f"{output_hint(full, opened.path)}, then run the same command; nothing was "
                           f"trained, so the new run folder {opened.path.name} was removed")
