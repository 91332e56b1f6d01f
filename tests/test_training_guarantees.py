"""What training promises beyond a lower loss, each checked on the live objects of a tiny run.

The frozen base stays bit-for-bit unchanged; the LoRA master weights are fp32 under mixed
precision; each component trains at its own learning rate; gradient accumulation equals the
larger batch; v-prediction models train and sample; and two fresh processes write the same bytes.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, tiny_config
import dreambooth_lab.train as train_mod
import dreambooth_lab.trainer as trainer_mod
from dreambooth_lab.runs import read_metrics
from dreambooth_lab.train import train


def _spy_optimizer(monkeypatch) -> dict:
    """Capture what train() builds its optimizer from, and the optimizer itself."""
    seen: dict = {}
    real = trainer_mod.make_optimizer

    def spy(cfg, unet, text_encoder, *args, **kwargs):
        opt = real(cfg, unet, text_encoder, *args, **kwargs)
        seen.update(optimizer=opt, unet=unet, text_encoder=text_encoder,
                    start=[[p.detach().clone() for p in g["params"]] for g in opt.param_groups])
        return opt

    monkeypatch.setattr(trainer_mod, "make_optimizer", spy)
    return seen


def _base_state(module) -> dict[str, torch.Tensor]:
    """The base weights of a module, under their original names (peft's LoRA layers left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}


# ---- what is trained, and how ------------------------------------------------------------------

def test_base_weights_stay_frozen(tmp_path, monkeypatch):
    seen = {}
    real = train_mod.load_pipeline

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        if "pipe" not in seen:  # the pipeline train() trains on (on CPU class images use it too)
            seen["pipe"] = pipe
            seen["before"] = {name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
                              for name in ("unet", "text_encoder", "vae")}
        return pipe

    monkeypatch.setattr(train_mod, "load_pipeline", spy)
    cfg = tiny_config(tmp_path, **{"train.steps": 3, "train.train_text_encoder": True, "optim.lr_unet": 1e-2,
                                   "optim.lr_text_encoder": 1e-2, "train.eval_loss": "on"})
    result = train(cfg, resume=None, progress=False)
    assert result.eval_loss_after != result.eval_loss_before  # the LoRA did train
    for name, before in seen["before"].items():
        module = getattr(seen["pipe"], name)
        after = _base_state(module)
        assert after.keys() == before.keys(), name
        changed = [k for k in before if before[k].dtype != after[k].dtype
                   or before[k].cpu().numpy().tobytes() != after[k].cpu().numpy().tobytes()]
        assert not changed, (name, changed[:3])
        if name != "vae":  # the VAE runs under no_grad; only the adapted models could leak a gradient
            assert not [n for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n], name


def test_no_text_encoder_keys_when_the_text_encoder_is_not_trained(tmp_path):
    result = train(tiny_config(tmp_path, **{"train.steps": 2, "train.train_text_encoder": False}),
                   resume=None, progress=False)
    keys = load_file(str(result.lora_path)).keys()
    assert keys and all(k.startswith("unet.") for k in keys), [k for k in keys if not k.startswith("unet.")][:3]
    with safe_open(str(result.lora_path), framework="pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter and not [k for k in adapter if k.startswith("text_encoder")]


def test_each_component_gets_its_own_learning_rate(tmp_path, monkeypatch):
    seen = _spy_optimizer(monkeypatch)
    moved = []

    def on_step(record):
        if record["step"] == 1:  # Adam's first step moves every weight with a gradient by about lr
            groups = seen["optimizer"].param_groups
            moved.append([g["lr"] for g in groups])
            moved.append([max((p.detach() - p0).abs().max().item() for p, p0 in zip(g["params"], start))
                          for g, start in zip(groups, seen["start"])])

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.train_text_encoder": True, "optim.lr_unet": 1e-3,
                                   "optim.lr_text_encoder": 2e-4, "optim.weight_decay": 0.0})
    train(cfg, resume=None, progress=False, on_step=on_step)
    lrs, steps = moved
    assert [g.get("name") for g in seen["optimizer"].param_groups] == ["unet", "text_encoder"]
    assert lrs == [1e-3, 2e-4]
    assert steps == pytest.approx([1e-3, 2e-4], rel=1e-3)
    groups = seen["optimizer"].param_groups
    unet_ids = {id(p) for n, p in seen["unet"].named_parameters() if p.requires_grad}
    te_ids = {id(p) for n, p in seen["text_encoder"].named_parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} == unet_ids and {id(p) for p in groups[1]["params"]} == te_ids
    rows = read_metrics(next((tmp_path / "runs").iterdir()))
    assert [(r["lr"], r["lr_text_encoder"]) for r in rows] == [(1e-3, 2e-4)] * 2


def test_bf16_mixed_precision_trains_the_lora_in_fp32(tmp_path, monkeypatch):
    """The live trainable weights (not the file, which is always written in fp32) stay fp32."""
    seen = _spy_optimizer(monkeypatch)
    dtypes = []

    def on_step(record):
        dtypes.append({p.dtype for g in seen["optimizer"].param_groups for p in g["params"]})

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.mixed_precision": "bf16", "train.train_text_encoder": True})
    result = train(cfg, resume=None, progress=False, on_step=on_step)
    assert dtypes == [{torch.float32}, {torch.float32}]
    assert len(seen["optimizer"].param_groups) == 2
    for module in (seen["unet"], seen["text_encoder"]):  # the frozen base really is bf16
        assert {p.dtype for n, p in module.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert all(torch.isfinite(t).all() for t in load_file(str(result.lora_path)).values())


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    over = {"train.steps": 4, "train.train_text_encoder": True, "data.random_flip": True}
    big = train(tiny_config(tmp_path / "b2", **over, **{"train.batch_size": 2}), resume=None, progress=False)
    acc = train(tiny_config(tmp_path / "g2", **over, **{"train.gradient_accumulation_steps": 2}),
                resume=None, progress=False)
    a, b = load_file(str(big.lora_path)), load_file(str(acc.lora_path))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst  # rounding only; one different draw moves weights by ~lr (1e-3)
    assert [r["loss"] for r in read_metrics(acc.run_dir)] == pytest.approx(
        [r["loss"] for r in read_metrics(big.run_dir)], rel=1e-5)


def test_v_prediction_model_trains_and_samples(tmp_path, monkeypatch):
    from dreambooth_lab import inference, sample, trainer
    from dreambooth_lab.builtin.tiny import tiny_model_dir
    from dreambooth_lab.report import load_run_pipeline, sample_run

    model = Path(shutil.copytree(tiny_model_dir(), tmp_path / "tiny-v"))
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    kinds = []
    real = trainer.training_target

    def spy(scheduler, latents, noise, timesteps):
        kinds.append(scheduler.config.prediction_type)
        out = real(scheduler, latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            assert torch.allclose(out, scheduler.get_velocity(latents, noise, timesteps))
        return out

    monkeypatch.setattr(trainer, "training_target", spy)
    cfg = tiny_config(tmp_path, **{"model.name": str(model), "data.resolution": 64, "train.steps": 3,
                                   "prior.enabled": False})
    run = train(cfg, resume=None, progress=False)
    assert kinds and set(kinds) == {"v_prediction"}
    assert np.isfinite([r["loss"] for r in read_metrics(run.run_dir)]).all()

    pipe = load_run_pipeline(run.run_dir, device="cpu")
    out = sample_run(run.run_dir, pipe=pipe, seeds=[0], test_prompts=[], steps=3, progress=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = np.asarray(sample.generate(pipe, [sample.read_sidecar(out.images[0])], progress=False)[0]).astype(int)
    assert image.std() > 0
    again = np.asarray(inference.regenerate(out.images[0], device="cpu")).astype(int)  # from the sidecar alone
    assert np.abs(again - image).max() <= 1


# ---- the same bytes from any process ---------------------------------------------------------------

_TRAIN_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from dreambooth_lab.train import train
    cfg = tiny_config(Path(sys.argv[1]), **{over!r})
    print(train(cfg, resume=None, progress=False).run_dir)
""")


def test_two_fresh_processes_write_identical_lora_and_checkpoint_bytes(tmp_path):
    """Set iteration order changes with PYTHONHASHSEED: any set that reaches a file shows here."""
    over = {"train.steps": 3, "train.checkpoint_every": 2, "train.train_text_encoder": True,
            "prior.num_class_images": 2, "prior.steps": 2}
    code = _TRAIN_IN_A_FRESH_PROCESS.format(tests=str(REPO / "tests"), over=over)
    digests = []
    for name, hashseed in (("a", "1"), ("b", "2")):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=hashseed)
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = Path(proc.stdout.strip().splitlines()[-1])
        wanted = [run / "pytorch_lora_weights.safetensors"] + sorted((run / "checkpoints").rglob("*"))
        digests.append({str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in wanted if p.is_file()})
    a, b = digests
    assert any(k.startswith("checkpoints/") for k in a) and "pytorch_lora_weights.safetensors" in a
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_lora_metadata_names_no_local_path(trained_run):
    """LoRA files are shared: the base model's local cache folder must not be written into them."""
    import os

    from dreambooth_lab.export import read_metadata

    meta = read_metadata(trained_run.lora_path)
    cache = os.environ["DREAMBOOTH_LAB_CACHE"]
    assert meta and not any(cache in v or str(Path.home()) in v for v in meta.values())
