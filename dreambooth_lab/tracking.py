"""TensorBoard logging through accelerate's trackers: scalars every step, validation images
every `train.validation_every` steps. Optional: without the tensorboard package a run warns
once and trains on."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import Config, TrainConfig


def tracker_backend(train: TrainConfig) -> str | None:
    """'tensorboard' when train.log_with asks for it and it is installed, else None (with a warning
    when asked for)."""
    if train.log_with != "tensorboard":
        return None
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        warnings.warn("train.log_with=tensorboard but the tensorboard package is not installed "
                      "(pip install tensorboard): training goes on without TensorBoard logs", stacklevel=3)
        return None
    return "tensorboard"


def project_config(train: TrainConfig):
    """Accelerate wants a logging folder when the Accelerator is made; the run folder is known
    only later, so this names the output folder and `start` points it at the run."""
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=train.output_dir, logging_dir=train.output_dir)


def start(acc, cfg: Config, run_dir: Path | None) -> bool:
    """Open the TensorBoard writer in <run>/tensorboard; returns whether logging is on."""
    if run_dir is None or not acc.log_with:
        return False
    acc.project_configuration.logging_dir = str(run_dir)
    flat = {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for section, values in cfg.to_dict().items() for k, v in values.items()}
    acc.init_trackers("tensorboard", config=flat)
    return True


def log_scalars(acc, record: dict) -> None:
    acc.log({k: v for k, v in record.items() if k not in ("step",) and isinstance(v, (int, float))},
            step=record["step"])


@torch.no_grad()
def log_validation(acc, cfg: Config, trainer, step: int, run_dir: Path) -> list:
    """Generate validation images with the LoRA as it is now; log them and save a grid PNG."""
    from .steps import inference_pipeline
    from .viz import image_grid

    prompt = cfg.fill(cfg.train.validation_prompt)
    seeds = [cfg.sample.seeds[i % len(cfg.sample.seeds)] + i // len(cfg.sample.seeds)
             for i in range(cfg.train.validation_images)]
    with inference_pipeline(acc, trainer, cfg.sample.sampler) as pipe, acc.autocast():
        images = pipe([prompt] * len(seeds), num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                      height=cfg.resolution, width=cfg.resolution).images
    image_grid(images, [f"seed {s}" for s in seeds], run_dir / "validation" / f"step-{step:06d}.png",
               title=f'step {step}: "{prompt}"', params={"guidance": cfg.sample.guidance, "steps": cfg.sample.steps})
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                      dataformats="NHWC")
    return images
