"""The process a run trains in: its Accelerator, the GPU speed options, and the caller's global
state (RNGs, TF32 flags) put back when train() returns."""

from __future__ import annotations

import importlib
import random
import threading
from contextlib import contextmanager

import numpy as np
import torch

from . import tracking
from .config import TrainConfig


def make_accelerator(train: TrainConfig, family: str):
    """One Accelerator per run, as the train section says (precision, accumulation, logging), for a
    base model of `family`. Accelerate keeps one process-wide state; a notebook that trains twice
    with another precision would be refused, so the previous run's is dropped (the process group
    stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state()
    handlers = []
    # SDXL conditions on the first text encoder's penultimate layer: its last layer's LoRA gets
    # no gradient, which DistributedDataParallel must be told (no effect on one process). SDXL with
    # a learned identifier never gets here: models.check_supported refuses it.
    if train.train_text_encoder and family == "sdxl":
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=train.mixed_precision,
                       gradient_accumulation_steps=train.gradient_accumulation_steps,
                       log_with=tracking.tracker_backend(train), project_config=tracking.project_config(train),
                       kwargs_handlers=handlers)


def configure_speed(train: TrainConfig, unet) -> None:
    """GPU options decided once: TF32 (process-wide flags; train() restores the caller's, and they
    do nothing on a CPU or a T4), channels-last, torch.compile (SDPA attention is diffusers'
    default on torch 2)."""
    torch.backends.cuda.matmul.allow_tf32 = train.allow_tf32
    torch.backends.cudnn.allow_tf32 = train.allow_tf32
    if train.channels_last:
        unet.to(memory_format=torch.channels_last)
    if train.compile:
        unet.forward = torch.compile(unet.forward)


@contextmanager
def preserved_global_state():
    """Training seeds torch (every micro-step), numpy and random, and sets TF32: put them back."""
    py, npy = random.getstate(), np.random.get_state()
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def prefetch_import(module: str) -> threading.Thread:
    """Import `module` in a background thread, so that the code that needs it after the steps finds it
    loaded. The loss plot's matplotlib costs ~0.37 s to import, half the time after the last step on
    sd15-random (benchmarks/startup.md); during the steps a CPU core or the GPU's idle host has room
    for it. A failure here is dropped: the real import, where the module is used, raises it then.
    Python's import lock makes a caller that gets there first wait for this one's import to end."""
    def run() -> None:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - raised again by the real import
            pass

    thread = threading.Thread(target=run, name=f"prefetch {module}", daemon=True)
    thread.start()
    return thread
