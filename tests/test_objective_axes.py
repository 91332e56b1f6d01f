"""The objective's axes beyond the paper: min-SNR-γ, loss kinds, noise offset, timestep range and
the base-model prior target (issue: beyond the recipe)."""

import math

import pytest
import torch

from conftest import SAMPLE_SUBJECT, tiny_config
from dreambooth_lab import losses
from dreambooth_lab.models import resolve
from dreambooth_lab.trainer import dreambooth_loss


def test_min_snr_weights_follow_the_formula_for_both_prediction_types():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 200, 500, 999])
    a = sched.alphas_cumprod[t].double()
    s = losses.snr(sched.alphas_cumprod, t)
    assert torch.allclose(s.double(), a / (1 - a), rtol=1e-5)
    for gamma in (1.0, 5.0):
        eps = losses.min_snr_weights(s, gamma, "epsilon")
        v = losses.min_snr_weights(s, gamma, "v_prediction")
        for i in range(len(t)):
            snr_i = float(s[i])
            assert math.isclose(float(eps[i]), min(snr_i, gamma) / snr_i, rel_tol=1e-5)
            assert math.isclose(float(v[i]), min(snr_i, gamma) / (snr_i + 1), rel_tol=1e-5)
    assert float(eps[0]) < 0.01 and float(eps[-1]) == pytest.approx(1.0), "low noise counts less, high noise fully"
    with pytest.raises(ValueError, match="sample"):
        losses.min_snr_weights(s, 5.0, "sample")


def test_loss_kinds_against_their_formulas():
    pred = torch.tensor([[0.0, 1.0], [2.0, -3.0]]).reshape(2, 2, 1, 1)
    target = torch.zeros_like(pred)
    assert losses.per_row_loss(pred, target, "mse").tolist() == [0.5, 6.5]
    assert losses.per_row_loss(pred, target, "l1").tolist() == [0.5, 2.5]
    c = 0.5
    huber = losses.per_row_loss(pred, target, "huber", c)
    want = [sum(2 * c * (math.sqrt(x * x + c * c) - c) for x in row) / 2 for row in ([0, 1], [2, -3])]
    assert huber.tolist() == pytest.approx(want)
    with pytest.raises(ValueError, match="loss.kind"):
        losses.per_row_loss(pred, target, "l3")


def test_weighted_loss_with_unit_weights_is_the_papers_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    plain = dreambooth_loss(pred, target, 2, 0.7)
    weighted = dreambooth_loss(pred, target, 2, 0.7, weights=torch.ones(4))
    for a, b in zip(plain, weighted):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    double = dreambooth_loss(pred, target, 2, 0.7, weights=torch.tensor([2.0, 2.0, 1.0, 1.0]))
    assert float(double[1]) == pytest.approx(2 * float(plain[1]), rel=1e-6)
    assert float(double[2]) == pytest.approx(float(plain[2]), rel=1e-6)


def test_noise_offset_is_constant_per_row_and_channel():
    noise = torch.zeros(2, 4, 8, 8)
    out = losses.offset_noise(noise, 0.1, torch.Generator().manual_seed(0), [0, 1], 2)
    assert torch.all(out.std(dim=(2, 3)) == 0) and out.abs().max() > 0
    again = losses.offset_noise(noise, 0.1, torch.Generator().manual_seed(0), [1], 2)
    assert torch.equal(again[0], out[1]), "a process's rows are drawn from the global batch"


def test_timestep_range_is_respected(tmp_path, tiny_pipe, monkeypatch):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.trainer import DreamBoothObjective

    cfg = tiny_config(tmp_path, **{"loss.timestep_min": 200, "loss.timestep_max": 300, "prior.enabled": False})
    obj = DreamBoothObjective(cfg.resolved(), tiny_pipe, ImageSet.from_folder(SAMPLE_SUBJECT, 64), None, Accelerator(),
                              base=resolve(cfg.model))
    seen = []
    real = obj.noise_scheduler.add_noise
    monkeypatch.setattr(obj.noise_scheduler, "add_noise", lambda x, n, t: (seen.append(t), real(x, n, t))[1])
    for step in range(20):
        obj.loss(step, 0)
    ts = torch.cat(seen)
    assert 200 <= int(ts.min()) and int(ts.max()) < 300 and len(set(ts.tolist())) > 5


def test_base_model_prior_target_is_the_frozen_unet_with_adapters_off(tmp_path, tiny_pipe):
    """The prior rows' target equals the base UNet's prediction for the class prompt, and the run
    needs no class images."""
    import copy

    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.lora import add_adapters
    from dreambooth_lab.trainer import DreamBoothObjective

    pipe = copy.deepcopy(tiny_pipe)
    base_unet = copy.deepcopy(tiny_pipe.unet)
    cfg = tiny_config(tmp_path, **{"prior.target": "base_model"}).resolved()
    obj = DreamBoothObjective(cfg, pipe, ImageSet.from_folder(SAMPLE_SUBJECT, 64), None, Accelerator(),
                              base=resolve(cfg.model))
    add_adapters(cfg.lora, obj.unet, obj.text_encoder, train_text_encoder=cfg.train.train_text_encoder)
    with torch.no_grad():  # make the LoRA matter: B is zero at init
        for name, p in obj.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(3)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    got = obj.base_prediction(noisy, t)
    states = obj.class_states(2).states  # a Cond: hidden states (and, for SDXL, the pooled embedding)
    with torch.no_grad():
        want = base_unet(noisy, t, states).sample
        lora_pred = obj.unet(noisy, t, states).sample
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(lora_pred, want, atol=1e-3), "adapters are back on afterwards"


def test_base_model_prior_trains_without_class_images(tmp_path):
    from dreambooth_lab.train import train

    r = train(tiny_config(tmp_path, **{"prior.target": "base_model", "train.steps": 3}), resume=None, progress=False)
    assert r.class_images_generated == 0 and all(row["prior_loss"] is not None for row in r.history)
    assert not (tmp_path / "class_cache").exists()


def test_axes_are_recorded_in_the_lora_metadata_and_the_registry(tmp_path):
    from dreambooth_lab.config import to_yaml
    from dreambooth_lab.registry import run_row
    from dreambooth_lab.lora import run_metadata
    from dreambooth_lab.lora_check import PREFIX

    cfg = tiny_config(tmp_path, **{"loss.min_snr_gamma": 5.0, "prior.target": "base_model", "lora.use_dora": True,
                                   "identifier.learned": True, "data.buckets": True})
    meta = run_metadata(cfg)
    assert meta[PREFIX + "min_snr_gamma"] == "5.0" and meta[PREFIX + "prior_target"] == "base_model"
    assert meta[PREFIX + "identifier"] == "learned x1 from class" and meta[PREFIX + "dora"] == "true"
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg.resolved()))
    row = run_row(run)
    assert row["min_snr_gamma"] == 5.0 and row["buckets"] is True and row["prior_target"] == "base_model"
