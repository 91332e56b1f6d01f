"""Training from a notebook: the train cell and the export cell, with refusals as one message.

`train_run` trains (or resumes, or reuses the finished run) with a live loss plot and prints where
everything went; a changed run, a lock held elsewhere or a hub model on a CPU runtime stops the
notebook with one message naming the form field to change (NEW_RUN, TAKE_OVER_LOCK, ALLOW_CPU).
`export_lora` writes the chosen LoRA as a kohya file and offers it for download on Colab.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from .display import LiveLoss
from .photos import drive_location
from .runtime import NotebookStop, in_colab, smoke

def train_run(cfg: Config, every: int = 25, *, new_run: bool = False, allow_cpu: bool = False,
              take_over_lock: bool = False):
    """Train (or resume, or reuse the finished run) with a live loss plot; prints where it all went.

    new_run=True (the form's NEW_RUN) starts a new run folder instead of resuming or reusing one
    (after the photos or settings changed; the old run is kept). take_over_lock=True
    (TAKE_OVER_LOCK) takes over the lock of a runtime that is gone (never a live process's here).
    A hub model on a runtime without a GPU stops here, before anything loads, unless allow_cpu
    (ALLOW_CPU). Every refusal is one message that names the form field to change, never a traceback.
    """
    import torch

    from ..colab import cpu_runtime_problem
    from ..run_lock import RunLocked
    from ..run_lock import take_over_lock as take_over
    from ..runs import LOSS_PLOT, METRICS, SUMMARY, RunMismatch
    from ..train import train

    problem = None if allow_cpu else cpu_runtime_problem(cfg.model.name, torch.cuda.is_available(), in_colab())
    if problem:
        raise NotebookStop(problem)
    live = LiveLoss(every=4 if smoke() else every)
    for attempt in range(2):
        try:
            result = train(cfg, on_step=live, reuse_finished=not new_run, resume=None if new_run else "auto")
            break
        except RunMismatch as exc:
            raise NotebookStop(mismatch_message(exc)) from None
        except RunLocked as exc:
            if not (take_over_lock and exc.can_take_over and attempt == 0):
                raise NotebookStop(locked_message(exc, take_over_lock)) from None
            take_over(exc.run_dir, holder=exc.holder)  # the user ticked TAKE_OVER_LOCK: this very lock, once
    print(f"run folder: {result.run_dir}")
    print(f"LoRA:       {result.lora_path}")
    print(f"loss curve: {result.run_dir / LOSS_PLOT}")
    print(f"metrics:    {result.run_dir / METRICS}, {result.run_dir / SUMMARY}")
    return result


def locked_message(exc: Exception, ticked: bool) -> str:
    """RunLocked in the notebook's words: who holds the run and whether ticking TAKE_OVER_LOCK helps (pure)."""
    text = str(exc)
    if not getattr(exc, "can_take_over", False):
        return text + "\nThis lock belongs to a process that is still running on this machine: let it finish, or stop it."
    if ticked:
        return text + "\nThe lock changed while it was being taken over: run this cell again."
    return (text + "\nIf that runtime is gone (a disconnect), tick TAKE_OVER_LOCK in the form (section 2), run the "
            "form and this cell again: the run resumes from its last checkpoint. Untick it afterwards.")


def mismatch_message(exc: Exception) -> str:
    """RunMismatch in the notebook's words: what differs, and the form field that starts a new run (pure)."""
    text = str(exc)
    for cut in (". To train on", ". Resume it with", ": start a new run"):
        text = text.split(cut, 1)[0]
    return (f"{text.rstrip('.')}.\nTo train on the current photos and settings, tick NEW_RUN in the form "
            "(section 2) and run the form and this cell again: a new run folder is made and the old run is kept. "
            "Untick it afterwards, so that a reconnect resumes instead of starting over.")


def export_lora(run_dir: str | Path, step: int | None = None, download: bool = True) -> Path:
    """The run's LoRA (the final one, or a saved step's) as a kohya file for A1111/ComfyUI, named
    after the run folder (and the step), so files of different runs never share a name; offered
    for download on Colab, and its place on Drive printed."""
    from ..export import kohya_for_download

    try:
        path = kohya_for_download(run_dir, step=step or None)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise NotebookStop(str(exc)) from None
    where = drive_location(path)
    print(f"kohya LoRA for A1111 / ComfyUI: {path}" + (f" (Google Drive: {where})" if where else ""))
    if download and in_colab():
        from google.colab import files as colab_files  # type: ignore

        colab_files.download(str(path))
    return path
