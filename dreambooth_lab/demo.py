"""The demo: train, sample a seed grid and the test prompts, compare.

By default on the toy world (its learned offline base model and 5-photo dog: the subject shows in
the sheets, in about 35 s on 2 CPU cores); `tiny` runs the same code on the sample subject with
random weights (noise, in about a minute); with a real model id on a GPU box it is a short but real
DreamBooth run on the sample subject (fp16, 400 steps, 50 class images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .builtin import TINY_MODEL, TOYWORLD, is_toy_world
from .config import Config, with_overrides
from .report import compare_run, sample_run
from .runs import RunResult
from .train import train

SAMPLE_SUBJECT = Path(__file__).resolve().parents[1] / "datasets" / "sample_subject"


def demo_config(model: str = TOYWORLD, output_dir: str = "runs", dataset: str | Path | None = None,
                steps: int | None = None) -> Config:
    if is_toy_world(model):
        return world_demo_config(output_dir, dataset, steps)
    cfg = Config()
    cfg.model.name = model
    cfg.data.instance_dir = str(dataset or SAMPLE_SUBJECT)
    cfg.data.class_name = "toy"  # the sample subject is a toy robot
    cfg.train.output_dir = output_dir
    cfg.train.name = "demo"
    if model == TINY_MODEL:
        # Small numbers, same code path: a few dozen steps, a handful of class images.
        cfg.train.steps = steps or 40
        cfg.train.checkpoint_every = 20
        cfg.optim.lr_unet = 1e-3
        cfg.prior.num_class_images = 8
        cfg.prior.steps = 10
        cfg.sample.steps = 10
    else:
        import torch

        cfg.train.steps = steps or 400
        cfg.train.checkpoint_every = 200
        cfg.prior.num_class_images = 50
        if torch.cuda.is_available():
            cfg.train.mixed_precision = "fp16"
    return cfg.validate()


def world_demo_config(output_dir: str = "runs", dataset: str | Path | None = None, steps: int | None = None) -> Config:
    """The toy world's 5-photo dog (violet with yellow dots: a combination its base model never saw), trained
    with the world's recipe (study.WORLD_RECIPE); the sheets show it in red t-shirts, in van Gogh's
    style, in the forest and driving a car, next to its training photos."""
    from .world.study import world_recipe_config

    cfg = world_recipe_config("dog", 5, output_dir=output_dir, **({"steps": steps} if steps else {}))
    if dataset:
        cfg.data.instance_dir = str(dataset)
    cfg.train.name = "demo"
    cfg.train.checkpoint_every = 400  # a stopped demo resumes
    return cfg.validate()


@dataclass
class DemoResult:
    run: RunResult
    seed_grid: Path
    prompt_suite: Path
    compare: Path


def run_demo(model: str = TOYWORLD, output_dir: str = "runs", steps: int | None = None,
             progress: bool = True, overrides: dict | None = None) -> DemoResult:
    """`overrides` (config keys) shrink sizes for tests; the demo itself passes none."""
    cfg = demo_config(model, output_dir, steps=steps)
    if overrides:
        cfg = with_overrides(cfg, overrides).validate()
    result = train(cfg, resume=None, progress=progress)
    samples = sample_run(result.run_dir, progress=progress)
    sheet = compare_run(result.run_dir, samples.folder)
    return DemoResult(result, samples.seed_grid, samples.prompt_suite, sheet)
