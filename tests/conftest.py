"""Shared fixtures: one tiny pipeline per session, in a private cache; run folders in tmp."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keep the suite hermetic: the tiny model and class images go to a fresh cache, never ~/.cache.
# The process that makes it (pytest itself; xdist's workers and the notebooks' kernels inherit the
# variable) removes it when the session ends: ~70 MB per run would pile up in the temp folder.
_OWN_CACHE = None
if "DREAMBOOTH_LAB_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["DREAMBOOTH_LAB_CACHE"] = tempfile.mkdtemp(prefix="dreambooth-lab-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest workers (pytest-xdist) on CI's two cores: one torch thread each, as
# two threads per worker on two cores run several times slower (measured). Set before torch loads;
# notebook kernels and subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from dreambooth_lab.config import Config  # noqa: E402


def pytest_unconfigure(config):
    """The cache this process made goes with the session (not a worker's: the controller's, last)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SUBJECT = REPO / "datasets" / "sample_subject"


def tiny_config(tmp_path: Path, **overrides) -> Config:
    """A few-step config on the tiny model and the sample subject."""
    from dreambooth_lab.config import with_overrides

    cfg = Config()
    cfg.model.name = "tiny"
    cfg.data.instance_dir = str(SAMPLE_SUBJECT)
    cfg.train.output_dir = str(tmp_path / "runs")
    cfg.train.steps = 6
    cfg.train.checkpoint_every = 1000
    cfg.optim.lr_unet = 1e-3
    cfg.optim.lr_text_encoder = 1e-3
    cfg.prior.num_class_images = 4
    cfg.prior.steps = 4
    cfg.prior.cache_dir = str(tmp_path / "class_cache")
    cfg.sample.steps = 4
    cfg.sample.seeds = [0, 1]
    cfg.sample.test_prompts = ["A {token} {class} in the forest"]
    return with_overrides(cfg, overrides) if overrides else cfg


@pytest.fixture(scope="session")
def tiny_pipe():
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.models import load_pipeline

    return load_pipeline(ModelConfig(name="tiny"), device="cpu")


@pytest.fixture(autouse=True)
def _tiny_pipe_left_without_a_lora(request):
    """The session's tiny pipeline is shared: a LoRA a test loads into it is dropped after that
    test, so the next test in the same worker starts from the base model whatever order runs."""
    yield
    if "tiny_pipe" in request.fixturenames:
        from dreambooth_lab.inference import _drop_adapter

        _drop_adapter(request.getfixturevalue("tiny_pipe"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short run with UNet and text-encoder LoRA, shared by the sampling tests."""
    from dreambooth_lab.train import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, **{"train.steps": 12, "train.train_text_encoder": True, "optim.lr_unet": 3e-3,
                              "optim.lr_text_encoder": 3e-3})
    return train(cfg, resume=None, progress=False)


def poison_loss_after(monkeypatch, good_calls: int) -> dict:
    """Make the objective's loss NaN after `good_calls` calls; returns the call counter (reset it
    with counter["n"] = 0 to poison a second run at the same point)."""
    from dreambooth_lab import trainer

    real = trainer.dreambooth_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, inst, prior = real(*args, **kwargs)
        return (loss * float("nan"), inst, prior) if calls["n"] > good_calls else (loss, inst, prior)

    monkeypatch.setattr(trainer, "dreambooth_loss", poisoned)
    return calls
