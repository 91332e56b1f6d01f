"""Adapter axes: LoRA dropout, DoRA, LoCon (conv layers), and what the kohya export can carry
(issue: beyond the recipe, item 4)."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth_lab import export, inference, sample
from dreambooth_lab.config import ModelConfig
from dreambooth_lab.lora import add_adapters, unet_targets
from dreambooth_lab.models import load_pipeline
from dreambooth_lab.train import train


def _spec(**kw):
    return sample.ImageSpec(**{**dict(prompt="A sks dog", seed=5, steps=4, width=64, height=64, model="tiny",
                                      lora_scale_unet=1.0, lora_scale_text_encoder=1.0), **kw})


def _image(pipe, **kw):
    return np.asarray(sample.generate(pipe, [_spec(**kw)], progress=False)[0]).astype(int)


def test_lora_dropout_acts_in_training_mode_only(tmp_path, tiny_pipe):
    unet, te = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.text_encoder)
    add_adapters(tiny_config(tmp_path, **{"lora.dropout": 0.5}).lora, unet, te, train_text_encoder=False)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    x, t, states = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    unet.train()
    torch.manual_seed(0)
    a = unet(x, t, states).sample
    torch.manual_seed(1)
    b = unet(x, t, states).sample
    unet.eval()
    assert not torch.allclose(a, b), "dropout masks differ between seeds"
    assert torch.equal(unet(x, t, states).sample, unet(x, t, states).sample)


def test_conv_targets_are_added_only_with_lora_conv(tmp_path):
    assert unet_targets(tiny_config(tmp_path).lora) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert unet_targets(tiny_config(tmp_path, **{"lora.conv": True}).lora)[-3:] == ["conv1", "conv2", "conv_shortcut"]


def test_locon_trains_conv_adapters_and_round_trips_through_the_kohya_loader(tmp_path):
    run = train(tiny_config(tmp_path, **{"lora.conv": True, "train.steps": 4, "optim.lr_unet": 3e-3}),
                resume=None, progress=False)
    state = load_file(str(run.lora_path))
    conv = [k for k in state if ".resnets." in k and ".conv1." in k]
    assert conv and all(state[k].ndim == 4 for k in conv)
    kohya = export.export_kohya(run.run_dir)
    assert any("_resnets_0_conv1.lora_down" in k for k in load_file(str(kohya)))
    a = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(a, run.lora_path)
    b = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    b.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name=sample.ADAPTER)
    img_a, img_b = _image(a), _image(b)
    assert np.abs(img_a - img_b).max() <= 1
    assert np.abs(img_a - _image(a, lora_scale_unet=0.0)).max() > 1


def test_dora_saves_and_reloads_its_magnitudes_and_the_kohya_export_refuses_it(tmp_path):
    run = train(tiny_config(tmp_path, **{"lora.use_dora": True, "train.steps": 4, "optim.lr_unet": 3e-3}),
                resume=None, progress=False)
    state = load_file(str(run.lora_path))
    magnitudes = {k: v for k, v in state.items() if "magnitude" in k}
    assert magnitudes, "the DoRA magnitude vectors are in the file"
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(pipe, run.lora_path)
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_magnitude_vector" in n}
    assert len(loaded) == len(magnitudes)
    for key, value in magnitudes.items():
        module = key.removeprefix("unet.").split(".lora_magnitude_vector")[0]
        match = [p for n, p in loaded.items() if n.startswith(module + ".")]
        assert match and torch.equal(match[0].detach().reshape(-1), value.reshape(-1)), key
    again = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(again, run.lora_path)
    assert np.array_equal(_image(pipe), _image(again))
    with pytest.raises(export.ExportRefused, match="DoRA"):
        export.export_kohya(run.run_dir)


def test_kohya_export_writes_the_learned_identifier_beside_it(tmp_path):
    run = train(tiny_config(tmp_path, **{"identifier.learned": True, "train.steps": 3, "prior.enabled": False}),
                resume=None, progress=False)
    kohya = export.export_kohya(run.run_dir)
    emb = export.embedding_export_path(kohya)
    assert emb.is_file() and emb.read_bytes() == (run.run_dir / "learned_embeds.safetensors").read_bytes()
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    pipe.load_textual_inversion(str(emb), token="<sks>")  # diffusers reads the A1111 layout
    assert "<sks>" in pipe.tokenizer.get_vocab()
