"""Export (kohya, fused), metadata in every LoRA file, multi-process training, TensorBoard."""

import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config
from dreambooth_lab import export, files, inference, sample
from dreambooth_lab.config import ModelConfig, to_yaml
from dreambooth_lab.models import load_pipeline
from dreambooth_lab.runs import read_metrics
from dreambooth_lab.train import train


def _spec(**kw):
    return sample.ImageSpec(**{**dict(prompt="A sks dog", seed=11, steps=4, width=64, height=64, model="tiny",
                                      lora_scale_unet=1.0, lora_scale_text_encoder=1.0), **kw})


def test_kohya_keys_and_alpha_are_pure_renames():
    state = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight": torch.ones(4, 8),
             "text_encoder.encoder.layers.1.self_attn.q_proj.lora_linear_layer.up.weight": torch.ones(8, 4)}
    out = export.to_kohya(state, alpha=2.0)
    assert set(out) == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
                        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha",
                        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight",
                        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha"}
    assert out["lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha"].item() == 2.0
    peft_style = export.to_kohya({"text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight":
                                  torch.ones(4, 8)}, 4.0)
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in peft_style
    with pytest.raises(ValueError, match="unexpected LoRA key"):
        export.to_kohya({"vae.x.lora_A.weight": torch.ones(1)}, 1.0)


def test_every_lora_file_carries_its_metadata(trained_run, capsys):
    meta = export.read_metadata(trained_run.lora_path)
    assert meta["dreambooth_lab.token"] == "sks" and meta["dreambooth_lab.class"] == "dog"
    assert meta["dreambooth_lab.base_model"] == "tiny" and meta["dreambooth_lab.rank"] == "4"
    assert meta["dreambooth_lab.recommended_scale_unet"] == "0.4" and len(meta["dreambooth_lab.config_hash"]) == 16
    from dreambooth_lab.cli import main

    assert main(["info", str(trained_run.lora_path)]) == 0
    out = capsys.readouterr().out
    assert "token: sks" in out and "text encoder" in out


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_kohya_export_loads_in_diffusers_and_gives_the_same_images(tmp_path, alpha):
    over = {"train.steps": 6, "train.train_text_encoder": True, "optim.lr_unet": 3e-3, "optim.lr_text_encoder": 3e-3}
    if alpha:
        over["lora.alpha"] = alpha  # alpha != rank: the exported alpha must carry the scaling
    run = train(tiny_config(tmp_path, **over), resume=None, progress=False)
    kohya = export.export_kohya(run.run_dir)
    keys = load_file(str(kohya)).keys()
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert export.read_metadata(kohya)["dreambooth_lab.format"] == "kohya"

    a = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(a, run.lora_path)
    b = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    b.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name=sample.ADAPTER)  # kohya loader
    assert inference.has_text_encoder_lora(b)
    spec = _spec()
    img_a = np.asarray(sample.generate(a, [spec], progress=False)[0]).astype(int)
    img_b = np.asarray(sample.generate(b, [spec], progress=False)[0]).astype(int)
    base = np.asarray(sample.generate(a, [_spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0)],
                                      progress=False)[0]).astype(int)
    assert np.abs(img_a - img_b).max() <= 1
    assert np.abs(img_a - base).max() > 1  # the LoRA does something, so the match means something
    with pytest.raises(FileExistsError):
        export.export_kohya(run.run_dir)


def test_fused_export_matches_the_lora_at_that_scale(trained_run, tmp_path):
    out = export.export_fused(trained_run.run_dir, 0.7, 0.3, out=tmp_path / "fused")
    fused = load_pipeline(ModelConfig(name=str(out)), device="cpu")
    assert not fused.get_list_adapters()
    lora = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(lora, trained_run.lora_path)
    spec = _spec(lora_scale_unet=0.7, lora_scale_text_encoder=0.3)
    a = np.asarray(sample.generate(lora, [spec], progress=False)[0]).astype(int)
    b = np.asarray(sample.generate(fused, [_spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0)],
                                   progress=False)[0]).astype(int)
    assert np.abs(a - b).max() <= 2
    assert json.loads((out / "dreambooth_lab.json").read_text())["dreambooth_lab.fused_scale_unet"] == 0.7
    # readable by another user like any ordinary write (safetensors alone leaves weight files 0600)
    want = 0o666 & ~files.current_umask()
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in modes and set(modes.values()) == {want}, modes


def test_two_processes_shard_data_sync_gradients_and_match_one_process(tmp_path):
    over = {"train.steps": 4, "train.train_text_encoder": True, "data.random_flip": True}
    cfg2 = tiny_config(tmp_path / "ddp", **over)
    (tmp_path / "ddp.yaml").write_text(to_yaml(cfg2))
    reports = tmp_path / "ranks"
    env = dict(os.environ, PYTHONPATH=str(REPO), DREAMBOOTH_LAB_RANK_REPORT=str(reports), OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1")  # two CPU processes over gloo, as GPUs would be over NCCL
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dreambooth_lab", "train",
           "--config", str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((reports / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["rows"] != r1["rows"]                          # each rank saw its own share of the batch
    assert r0["lora_sha256"] == r1["lora_sha256"]            # gradients were synchronised
    runs = list((tmp_path / "ddp" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "pytorch_lora_weights.safetensors").is_file()  # one writer

    # One process with the same global batch (2 x 1) trains the same LoRA, to float tolerance.
    single = train(tiny_config(tmp_path / "one", **over, **{"train.batch_size": 2}), resume=None, progress=False)
    a, b = load_file(str(runs[0] / "pytorch_lora_weights.safetensors")), load_file(str(single.lora_path))
    assert a.keys() == b.keys()
    # Float tolerance for Adam: it scales every update to about lr (1e-3 here), so rounding
    # differences between one batch of 2 and two batches of 1 reach the weights as ~lr x 1e-2.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    la = [r["loss"] for r in read_metrics(runs[0])]
    lb = [r["loss"] for r in read_metrics(single.run_dir)]
    assert la == pytest.approx(lb, rel=1e-4)


def test_tensorboard_scalars_and_validation_images(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.log_with": "tensorboard", "train.validation_every": 2})
    run = train(cfg, resume=None, progress=False)
    events = list((run.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert "validation" in acc.Tags()["images"] and len(acc.Images("validation")) == 2
    assert sorted(p.name for p in (run.run_dir / "validation").glob("*.png")) == ["step-000002.png", "step-000004.png"]


def test_without_tensorboard_training_warns_and_goes_on(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        run = train(tiny_config(tmp_path, **{"train.steps": 2, "train.log_with": "tensorboard"}), resume=None,
                    progress=False)
    assert run.lora_path.is_file() and not (run.run_dir / "tensorboard").exists()
