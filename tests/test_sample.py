import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dreambooth_lab import inference, sample
from dreambooth_lab.config import ModelConfig
from dreambooth_lab.models import load_pipeline
from dreambooth_lab.report import compare_run, load_run_pipeline, sample_run


def _spec(**kw):
    base = dict(prompt="A sks dog", seed=3, steps=4, width=64, height=64, model="tiny")
    base.update(kw)
    return sample.ImageSpec(**base)


def _pixels(image):
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def base_pipe():
    return load_pipeline(ModelConfig(name="tiny"), device="cpu")


@pytest.fixture(scope="module")
def lora_pipe(trained_run):
    return load_run_pipeline(trained_run.run_dir, device="cpu")


def test_scale_zero_reproduces_the_base_model_exactly(base_pipe, lora_pipe):
    base = sample.generate(base_pipe, [_spec()], progress=False)[0]
    zero = sample.generate(lora_pipe, [_spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0)], progress=False)[0]
    assert np.array_equal(_pixels(base), _pixels(zero))
    unet = sample.generate(lora_pipe, [_spec(lora_scale_unet=1.0, lora_scale_text_encoder=0.0)], progress=False)[0]
    assert not np.array_equal(_pixels(base), _pixels(unet))


def test_text_encoder_scale_changes_the_prompt_embeddings(lora_pipe):
    def embed(scale):
        sample.set_lora_scales(lora_pipe, 0.0, scale)
        return lora_pipe.encode_prompt("a photo of sks dog", "cpu", 1, False)[0]

    assert torch.equal(embed(0.0), embed(0.0))
    assert not torch.allclose(embed(0.0), embed(1.0))


def test_reloaded_lora_gives_identical_pixels(lora_pipe, trained_run):
    spec = _spec(lora_scale_unet=0.8, lora_scale_text_encoder=0.8)
    first = sample.generate(lora_pipe, [spec], progress=False)[0]
    fresh = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(fresh, trained_run.lora_path)
    again = sample.generate(fresh, [spec], progress=False)[0]
    assert np.array_equal(_pixels(first), _pixels(again))


def test_an_image_does_not_depend_on_its_batch(base_pipe):
    seeds = [6958252186108282, 342405815741279, 2**63 - 1, 0]  # seeds this large must work
    batch = sample.generate(base_pipe, [_spec(seed=s) for s in seeds], batch_size=4, progress=False)
    alone = sample.generate(base_pipe, [_spec(seed=seeds[2])], batch_size=1, progress=False)[0]
    assert np.abs(_pixels(batch[2]) - _pixels(alone)).max() <= 1
    assert not np.array_equal(_pixels(batch[0]), _pixels(batch[1]))


def test_sidecar_regenerates_the_same_image(lora_pipe, trained_run, tmp_path):
    spec = _spec(lora_scale_unet=0.6, lora_scale_text_encoder=0.3, lora=str(trained_run.lora_path),
                 negative_prompt="blurry", guidance=5.0, sampler="euler_a")
    image = sample.generate(lora_pipe, [spec], progress=False)[0]
    png = sample.save_with_sidecars([image], [spec], tmp_path, "x")[0]
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["seed"] == 3 and side["lora_scale_text_encoder"] == 0.3 and side["sampler"] == "euler_a"
    again = inference.regenerate(png, device="cpu")  # loads base model + LoRA from the sidecar alone
    assert np.abs(_pixels(again) - _pixels(image)).max() <= 1
    with pytest.raises(FileExistsError):
        sample.save_with_sidecars([image], [spec], tmp_path, "x")


def test_pickle_lora_is_refused(base_pipe, tmp_path):
    bad = tmp_path / "lora.bin"
    bad.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="safetensors"):
        inference.load_lora(base_pipe, bad)


def test_every_sampler_runs(base_pipe):
    for name in ("dpmsolver++", "ddim", "euler", "euler_a", "pndm", "ddpm"):
        assert sample.generate(base_pipe, [_spec(sampler=name, steps=3)], progress=False)[0].size == (64, 64)


def test_sample_and_compare_a_run(trained_run, lora_pipe):
    out = sample_run(trained_run.run_dir, pipe=lora_pipe, progress=False)
    assert len(out.images) == 4  # (base prompt + 1 test prompt) x 2 seeds
    assert out.seed_grid.is_file() and out.prompt_suite.is_file()
    for png in out.images:
        assert json.loads(png.with_suffix(".json").read_text())["run"] == str(trained_run.run_dir.resolve())
    sheet = compare_run(trained_run.run_dir)
    assert sheet.is_file() and sheet.parent == out.folder


def test_a_lora_with_alpha_not_rank_reloads_at_its_trained_scale(tmp_path):
    """What the trainer's in-memory UNet predicts, the reloaded file predicts too."""
    from conftest import tiny_config
    from dreambooth_lab.train import train

    run = train(tiny_config(tmp_path, **{"train.steps": 4, "lora.alpha": 16.0, "optim.lr_unet": 1e-2}),
                resume=None, progress=False)
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    inference.load_lora(pipe, run.lora_path)
    sample.set_lora_scales(pipe, 1.0, 1.0)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling[sample.ADAPTER] == pytest.approx(16.0 / 4)


def test_a_unet_only_lora_loads_without_diffusers_missing_key_noise(tmp_path, capfd):
    """A LoRA trained with the text encoder frozen has no text-encoder keys; loading it must not
    print diffusers' "No LoRA keys associated to CLIPTextModel" line (expected, not a problem)."""
    import logging

    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.train import train

    res = train(tiny_config(tmp_path, **{"train.steps": 2, "prior.enabled": False}), progress=False)
    pipe = load_pipeline(ModelConfig(name="tiny", dtype="float32"), device="cpu")
    capfd.readouterr()
    load_lora(pipe, res.run_dir)
    err = capfd.readouterr().err
    assert "No LoRA keys associated" not in err
    assert "dreambooth" in pipe.get_list_adapters()["unet"]
    handlers = logging.getLogger("diffusers").handlers
    assert handlers and not any(h.filters for h in handlers)  # the filter is gone after the load
