"""The memory model: parameter counts from the configs, activations counted on the meta device."""

import pytest
import torch

from conftest import tiny_config
from dreambooth_lab import memory


def test_lora_count_matches_the_real_adapters(tmp_path, tiny_pipe):
    from dreambooth_lab.lora import add_adapters, trainable
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.config import ModelConfig

    cfg = tiny_config(tmp_path, **{"train.train_text_encoder": True, "lora.rank": 8})
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    real = sum(p.numel() for p in add_adapters(cfg.resolved(), pipe.unet, pipe.text_encoder))
    est = memory.estimate(cfg, "cpu")
    assert est.lora == real * 4 and est.gradients == real * 4 and est.optimizer == real * 8


def test_meta_count_equals_a_real_forward(tmp_path):
    """Counting saved tensors on the meta device comes close to what a real CPU forward saves
    (kernels differ: CPU attention saves other intermediates than the meta kernels)."""
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.lora import add_adapters

    cfg = tiny_config(tmp_path).resolved()
    unet_m, _, te_m = memory._meta_models(cfg)
    predicted = memory.saved_activation_bytes(cfg, unet_m, te_m)
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    add_adapters(cfg, pipe.unet, pipe.text_encoder)
    seen = {}
    params = {id(p) for p in pipe.unet.parameters()}

    def pack(t):
        if id(t) not in params and not isinstance(t, torch.nn.Parameter):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    pipe.unet.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pipe.unet(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, 77, 32))
    assert 0.75 < predicted / sum(seen.values()) < 1.35


def test_options_move_the_estimate_the_right_way(tmp_path):
    base = tiny_config(tmp_path)
    e = memory.estimate(base)
    assert memory.estimate(tiny_config(tmp_path, **{"data.resolution": 128})).activations > 3 * e.activations
    assert memory.estimate(tiny_config(tmp_path, **{"optim.optimizer": "adamw8bit"})).optimizer == e.optimizer // 4
    assert memory.estimate(tiny_config(tmp_path, **{"train.gradient_checkpointing": True})).activations < e.activations
    assert memory.estimate(tiny_config(tmp_path, **{"train.mixed_precision": "fp16"})).weights < e.weights
    no_prior = memory.estimate(tiny_config(tmp_path, **{"prior.enabled": False}))
    assert no_prior.activations == pytest.approx(e.activations / 2, rel=0.05)
    # cached + offloaded: VAE and frozen text encoder are off the GPU; not on a CPU
    assert memory.estimate(base, "cuda").weights < memory.estimate(base, "cpu").weights
