import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth_lab import checkpoint, prior
from dreambooth_lab.models import resolve
from dreambooth_lab.runs import read_metrics
from dreambooth_lab.train import train
from dreambooth_lab.trainer import dreambooth_loss, step_seed, training_target


# ---- pure helpers ----------------------------------------------------------------------------

def test_loss_splits_instance_and_prior_rows():
    pred = torch.zeros(4, 1)
    target = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    loss, inst, prior_loss = dreambooth_loss(pred, target, n_instance=2, prior_weight=0.5)
    assert inst.item() == 1.0 and prior_loss.item() == 4.0 and loss.item() == 3.0
    loss, inst, prior_loss = dreambooth_loss(pred[:2], target[:2], n_instance=2, prior_weight=0.5)
    assert prior_loss is None and loss.item() == 1.0


def test_target_follows_the_scheduler_prediction_type():
    from diffusers import DDPMScheduler

    lat, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(training_target(eps, lat, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.allclose(training_target(v, lat, noise, t), v.get_velocity(lat, noise, t))
    with pytest.raises(ValueError, match="sample"):
        s = DDPMScheduler(prediction_type="sample")
        training_target(s, lat, noise, t)


def test_step_seeds_differ_per_step_and_micro_step():
    seeds = {step_seed(42, s, m) for s in range(50) for m in range(3)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)


# ---- training on the tiny model --------------------------------------------------------------

def test_training_with_prior_lowers_the_instance_loss(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 30, "optim.lr_unet": 3e-3, "train.eval_loss": "on"})
    result = train(cfg, resume=None, progress=False)
    assert result.eval_loss_after < result.eval_loss_before
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(r["prior_loss"] is not None and r["instance_loss"] > 0 for r in rows)
    assert {"loss", "instance_loss", "prior_loss", "lr", "seconds"} <= set(rows[0])
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "pytorch_lora_weights.safetensors", "loss.png", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["class_images_generated"] == 4


def test_prior_weight_zero_runs_without_class_images(tmp_path):
    cfg = tiny_config(tmp_path, **{"prior.loss_weight": 0.0, "train.steps": 3})
    result = train(cfg, resume=None, progress=False)
    assert result.class_images_generated == 0
    assert not (tmp_path / "class_cache").exists()
    assert all(r["prior_loss"] is None for r in read_metrics(result.run_dir))


def test_same_config_and_seed_write_identical_lora_bytes(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.train_text_encoder": True})
    a = train(cfg, resume=None, progress=False)
    b = train(cfg, resume=None, progress=False)
    assert a.run_dir != b.run_dir  # a run never overwrites another
    assert a.lora_path.read_bytes() == b.lora_path.read_bytes()
    c = train(tiny_config(tmp_path, **{"train.steps": 4, "train.train_text_encoder": True, "train.seed": 7}),
              resume=None, progress=False)
    assert c.lora_path.read_bytes() != a.lora_path.read_bytes()


def test_lora_file_loads_in_diffusers_with_both_components(tmp_path, tiny_pipe):
    result = train(tiny_config(tmp_path, **{"train.steps": 2, "train.train_text_encoder": True}),
                   resume=None, progress=False)
    keys = load_file(str(result.lora_path)).keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    tiny_pipe.load_lora_weights(str(result.run_dir), weight_name=result.lora_path.name, adapter_name="check")
    try:
        assert "check" in tiny_pipe.get_list_adapters()["text_encoder"]
    finally:
        tiny_pipe.delete_adapters("check")


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_from_checkpoint_gives_the_uninterrupted_lora(tmp_path, optimizer):
    over = {"train.steps": 8, "train.checkpoint_every": 3, "train.train_text_encoder": True,
            "optim.optimizer": optimizer, "lora.rank": 16}  # rank 16: tensors big enough for 8-bit state
    full = train(tiny_config(tmp_path / "a", **over), resume=None, progress=False)

    cfg = tiny_config(tmp_path / "b", **over)

    def stop_at_7(record):
        if record["step"] == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, resume="auto", progress=False, on_step=stop_at_7)
    runs = list((tmp_path / "b" / "runs").iterdir())
    assert len(runs) == 1 and [p.name for p in checkpoint.list_checkpoints(runs[0])] == ["step-000003", "step-000006"]
    resumed = train(cfg, resume="auto", progress=False)
    assert resumed.run_dir == runs[0] and resumed.resumed_from == 6
    assert resumed.lora_path.read_bytes() == full.lora_path.read_bytes()
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == list(range(1, 9))  # no duplicated lines


def test_gradient_accumulation_and_8bit_adam_run(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.gradient_accumulation_steps": 2,
                                   "optim.optimizer": "adamw8bit", "train.gradient_checkpointing": True,
                                   "data.random_flip": True, "data.center_crop": False})
    result = train(cfg, resume=None, progress=False)
    assert len(read_metrics(result.run_dir)) == 2 and result.lora_path.is_file()


def test_bad_photo_folder_fails_before_loading_the_model(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"nope")
    cfg = tiny_config(tmp_path, **{"data.instance_dir": str(tmp_path / "photos")})
    with pytest.raises(ValueError, match="broken.jpg"):
        train(cfg, resume=None, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make", [torch.optim.AdamW, "bnb"])
def test_optimizer_state_round_trips_through_safetensors_and_json(make):
    import bitsandbytes as bnb

    make = bnb.optim.AdamW8bit if make == "bnb" else make
    big, small = torch.nn.Parameter(torch.randn(96, 96)), torch.nn.Parameter(torch.randn(3))
    opt = make([big, small], lr=1e-3)
    (big.sum() + small.sum()).backward()
    opt.step()
    state = opt.state_dict()
    tensors, meta = checkpoint.flatten_optimizer_state(state)
    back = checkpoint.unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    assert same(state["state"], back["state"])
    assert json.loads(json.dumps(meta["param_groups"])) == json.loads(json.dumps(state["param_groups"]))


# ---- class-image cache -----------------------------------------------------------------------

def test_class_image_cache_is_reused_and_topped_up(tmp_path, tiny_pipe):
    calls = []

    def factory():
        calls.append(1)
        return tiny_pipe

    cfg = tiny_config(tmp_path, **{"prior.num_class_images": 3})
    first = prior.ensure_class_images(cfg, factory, progress=False)
    assert first.generated == 3 and len(first.paths) == 3
    again = prior.ensure_class_images(cfg, factory, progress=False)
    assert again.generated == 0 and again.paths == first.paths and len(calls) == 1
    before = [p.read_bytes() for p in first.paths]
    more = prior.ensure_class_images(tiny_config(tmp_path, **{"prior.num_class_images": 5}), factory, progress=False)
    assert more.generated == 2 and [p.read_bytes() for p in more.paths[:3]] == before
    # A different class prompt is a different key, hence a different folder.
    other = prior.cache_folder(tiny_config(tmp_path, **{"data.class_name": "cat"}))[0]
    assert other != first.folder
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["key"]["prompt"] == "a photo of dog" and len(manifest["images"]) == 5


# ---- caches and profiling ----------------------------------------------------------------------

@pytest.mark.parametrize("flip,train_te", [(False, False), (True, False), (True, True)])
def test_cached_and_uncached_paths_give_the_same_losses(tmp_path, flip, train_te):
    over = {"train.steps": 5, "data.random_flip": flip, "train.train_text_encoder": train_te, "train.eval_loss": "on"}
    cached = train(tiny_config(tmp_path / "a", **over), resume=None, progress=False)
    plain = train(tiny_config(tmp_path / "b", **over, **{"train.cache_latents": False,
                                                         "train.cache_text_embeddings": False}),
                  resume=None, progress=False)
    a, b = read_metrics(cached.run_dir), read_metrics(plain.run_dir)
    for key in ("loss", "instance_loss", "prior_loss"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert cached.eval_loss_before == pytest.approx(plain.eval_loss_before, rel=1e-5)
    assert cached.eval_loss_after == pytest.approx(plain.eval_loss_after, rel=1e-4)


def test_latent_cache_holds_both_flips_and_the_distribution(tmp_path, tiny_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.trainer import DreamBoothObjective

    cfg = tiny_config(tmp_path, **{"data.random_flip": True, "train.offload_frozen": False})
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    t = DreamBoothObjective(cfg.resolved(), tiny_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    mean, std = t.latent_cache["instance", False]
    fmean, _ = t.latent_cache["instance", True]
    assert mean.shape[0] == len(photos) and (std > 0).all()
    assert not torch.allclose(mean, fmean)  # the flipped photo is its own entry
    dist = tiny_pipe.vae.encode(photos.example(2, center_crop=True, flip=True)[None]).latent_dist
    assert torch.allclose(fmean[2], dist.mean[0], atol=1e-5) and torch.allclose(t.latent_cache["instance", True][1][2], dist.std[0], atol=1e-5)
    assert t.text_cache is not None and t.text_cache.shape[0] == 2


def test_profile_writes_a_phase_breakdown(tmp_path):
    result = train(tiny_config(tmp_path, **{"train.steps": 3, "train.cache_latents": False,
                                            "train.cache_text_embeddings": False}),
                   resume=None, progress=False, profile=True)
    report = json.loads((result.run_dir / "profile.json").read_text())
    assert set(report["phases"]) == {"data", "vae", "text_encoder", "unet_forward", "backward", "optimizer"}
    assert report["steps"] == 3 and abs(sum(p["share"] for p in report["phases"].values()) - 1) < 1e-3
