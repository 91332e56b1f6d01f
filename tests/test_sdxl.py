"""SDXL end to end on the tiny SDXL-shaped pipeline: its conditioning, training with both text
encoders and prior preservation, sampling with per-component scales, resume, kohya export."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth_lab import checkpoint, export, inference, sample
from dreambooth_lab.models import resolve
from dreambooth_lab.conditioning import time_ids
from dreambooth_lab.config import ModelConfig
from dreambooth_lab.models import load_pipeline
from dreambooth_lab.runs import read_metrics
from dreambooth_lab.train import train

XL = "tiny-sdxl"
# Text encoders trained (both get LoRA), prior preservation with class images from the SDXL pipeline.
TRAINED = {"model.name": XL, "train.steps": 6, "train.train_text_encoder": True, "optim.lr_unet": 3e-3,
           "optim.lr_text_encoder": 3e-3, "optim.lr_text_encoder_2": 1e-3}


def _over(tmp_path_factory, **kw):
    """Overrides with one class-image cache for the whole module (it is keyed, so runs share it)."""
    return {**TRAINED, "prior.cache_dir": str(tmp_path_factory.getbasetemp() / "sdxl_class_cache"), **kw}


@pytest.fixture(scope="module")
def xl_pipe():
    return load_pipeline(ModelConfig(name=XL), device="cpu")


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("xl"), **_over(tmp_path_factory)), resume=None, progress=False)


def _spec(**kw):
    return sample.ImageSpec(**{**dict(prompt="A sks dog", seed=11, steps=4, width=64, height=64, model=XL,
                                      lora_scale_unet=1.0, lora_scale_text_encoder=1.0), **kw})


def _pixels(pipe, spec):
    return np.asarray(sample.generate(pipe, [spec], progress=False)[0]).astype(int)


# ---- conditioning -----------------------------------------------------------------------------

def test_training_conditions_like_the_sdxl_pipeline(tmp_path, xl_pipe):
    """Both encoders' penultimate states concatenated, the second one's pooled projection, and the
    time ids: what StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids give."""
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.trainer import DreamBoothObjective

    cfg = tiny_config(tmp_path, **{"model.name": XL, "prior.enabled": False, "train.offload_frozen": False}).resolved()
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    obj = DreamBoothObjective(cfg, xl_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    assert obj.family == "sdxl" and len(obj.text_encoders) == 2
    with torch.no_grad():
        states, _, pooled, _ = xl_pipe.encode_prompt(cfg.fill(cfg.data.instance_prompt), device="cpu",
                                                     num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert obj.text_cache.states.shape == (2, 77, 64) and obj.text_cache.pooled.shape == (2, 32)
    assert torch.allclose(obj.text_cache.states[0], states[0], atol=1e-6)
    assert torch.allclose(obj.text_cache.pooled[0], pooled[0], atol=1e-6)
    # A photo generated at the training size, centre-cropped: the pipeline's own time ids.
    row = obj.eval_rows[0]
    photos.original_sizes[0] = (64, 64)
    expected = xl_pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32,
                                         xl_pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(obj.time_ids([row]), expected)


def test_fp16_training_encodes_with_the_vae_in_fp32(tmp_path):
    """SDXL's VAE overflows in fp16 (force_upcast): with fp16 mixed precision it encodes in fp32 and
    the latents go to the UNet in its own dtype."""
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.trainer import DreamBoothObjective

    pipe = load_pipeline(ModelConfig(name=XL), device="cpu", dtype=torch.float16)
    cfg = tiny_config(tmp_path, **{"model.name": XL, "prior.enabled": False, "train.mixed_precision": "fp16",
                                   "train.offload_frozen": False}).resolved()
    obj = DreamBoothObjective(cfg, pipe, ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution), None,
                              Accelerator(), base=resolve(cfg.model))
    assert obj.vae.dtype == torch.float32 and obj.latent_cache["instance", False][0].dtype == torch.float32
    rows, positions, n, gen = obj.plan(0, 0)
    assert obj.latents(rows, positions, n, gen).dtype == torch.float16 == obj.unet.dtype


def test_time_ids_record_size_and_crop():
    # a 300x200 photo (width x height) resized to 96x64, cropped at left 20: [h, w, top, left, h, w]
    assert time_ids((300, 200), (20, 0, 84, 64), 96, flip=False) == [200, 300, 0, 20, 64, 64]
    # flipped: the crop is described in the mirrored picture
    assert time_ids((300, 200), (20, 0, 84, 64), 96, flip=True) == [200, 300, 0, 12, 64, 64]


def test_random_crops_reach_the_time_ids(tmp_path, xl_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.trainer import DreamBoothObjective

    cfg = tiny_config(tmp_path, **{"model.name": XL, "prior.enabled": False, "data.center_crop": False,
                                   "data.resolution": 48}).resolved()
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    photos.images = [im.resize((80, 48)) for im in photos.images]  # room to crop sideways
    obj = DreamBoothObjective(cfg, xl_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    lefts = set()
    for step in range(8):
        rows = obj.plan(step, 0)[0]
        ids = obj.time_ids(rows)
        assert ids[0, 3].item() == rows[0].box[0] and ids[0, 4:].tolist() == [48, 48]
        lefts.add(rows[0].box[0])
    assert len(lefts) > 1  # the crops moved, and the time ids with them


# ---- train, sample, export ----------------------------------------------------------------------

def test_sdxl_run_records_its_family_and_trains_both_text_encoders(xl_run):
    keys = load_file(str(xl_run.lora_path)).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert export.read_metadata(xl_run.lora_path)["dreambooth_lab.family"] == "sdxl"
    summary = json.loads((xl_run.run_dir / "summary.json").read_text())
    assert summary["family"] == "sdxl" and summary["class_images_generated"] == 4
    rows = read_metrics(xl_run.run_dir)
    assert all(r["prior_loss"] is not None for r in rows)
    assert rows[0]["lr_text_encoder"] == 3e-3 and rows[0]["lr_text_encoder_2"] == 1e-3  # its own lr
    from dreambooth_lab.registry import run_row

    assert run_row(xl_run.run_dir)["family"] == "sdxl"


def test_learned_identifier_is_refused_for_sdxl_before_a_run_folder(tmp_path):
    from dreambooth_lab.config import ConfigError

    with pytest.raises(ConfigError, match="identifier.learned.*SDXL"):
        train(tiny_config(tmp_path, **{"model.name": XL, "identifier.learned": True}), resume=None, progress=False)
    assert not (tmp_path / "runs").exists()


def test_text_encoder_2_lora_only_when_the_text_encoder_trains(tmp_path, tmp_path_factory):
    over = _over(tmp_path_factory, **{"train.steps": 2, "train.train_text_encoder": False, "prior.enabled": False})
    cached = train(tiny_config(tmp_path / "a", **over), resume=None, progress=False)
    assert {k.split(".")[0] for k in load_file(str(cached.lora_path)).keys()} == {"unet"}
    assert "lr_text_encoder_2" not in read_metrics(cached.run_dir)[0]
    # Both encoders' outputs (states and pooled) cached: the same losses as encoding every step.
    plain = train(tiny_config(tmp_path / "b", **over, **{"train.cache_text_embeddings": False,
                                                         "train.cache_latents": False}), resume=None, progress=False)
    a, b = read_metrics(cached.run_dir), read_metrics(plain.run_dir)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4, abs=1e-6)


def test_scale_zero_everywhere_reproduces_the_base_pixels(xl_run, xl_pipe):
    lora = load_pipeline(ModelConfig(name=XL), device="cpu")
    inference.load_lora(lora, xl_run.lora_path)
    assert inference.has_text_encoder_lora(lora, "text_encoder_2")
    base = _pixels(xl_pipe, _spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0))
    zero = _pixels(lora, _spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0, lora_scale_text_encoder_2=0.0))
    assert np.array_equal(base, zero)
    # each component's scale acts on its own: text encoder 2 alone changes the picture
    te2 = _pixels(lora, _spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0, lora_scale_text_encoder_2=1.0))
    assert not np.array_equal(base, te2)


def test_kohya_export_round_trips_through_diffusers_kohya_loader(xl_run, tmp_path):
    kohya = export.export_kohya(xl_run.run_dir, out=tmp_path / "xl_kohya.safetensors")
    keys = list(load_file(str(kohya)).keys())
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    meta = export.read_metadata(kohya)
    assert meta["dreambooth_lab.family"] == "sdxl" and meta["ss_base_model_version"] == "sdxl_base_v1-0"

    a = load_pipeline(ModelConfig(name=XL), device="cpu")
    inference.load_lora(a, xl_run.lora_path)
    b = load_pipeline(ModelConfig(name=XL), device="cpu")
    b.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name=sample.ADAPTER)  # kohya loader
    assert inference.has_text_encoder_lora(b) and inference.has_text_encoder_lora(b, "text_encoder_2")
    spec = _spec(lora_scale_text_encoder_2=0.5)
    img_a, img_b = _pixels(a, spec), _pixels(b, spec)
    base = _pixels(a, _spec(lora_scale_unet=0.0, lora_scale_text_encoder=0.0))
    assert np.abs(img_a - img_b).max() <= 1
    assert np.abs(img_a - base).max() > 1  # the LoRA does something, so the match means something


def test_sample_run_takes_the_family_from_the_run(xl_run):
    from dreambooth_lab.report import load_run_pipeline, sample_run

    pipe = load_run_pipeline(xl_run.run_dir, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    out = sample_run(xl_run.run_dir, pipe=pipe, seeds=[0], test_prompts=[], lora_scale_text_encoder_2=0.2,
                     progress=False)
    side = json.loads(out.images[0].with_suffix(".json").read_text())
    assert side["model"] == XL and side["lora_scale_text_encoder_2"] == 0.2
    again = inference.regenerate(out.images[0], pipe=pipe)  # the sidecar alone makes the picture again
    assert np.abs(np.asarray(again).astype(int) - _png(out.images[0])).max() <= 1


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


# ---- resume ---------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def test_sdxl_resume_from_checkpoint_gives_the_uninterrupted_lora(xl_run, tmp_path, tmp_path_factory):
    cfg = tiny_config(tmp_path, **_over(tmp_path_factory, **{"train.checkpoint_every": 3}))  # = xl_run's training

    def stop_at_5(record):
        if record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, resume="auto", progress=False, on_step=stop_at_5)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and [p.name for p in checkpoint.list_checkpoints(runs[0])] == ["step-000003"]
    saved = load_file(str(runs[0] / "checkpoints" / "step-000003" / "lora_params.safetensors"))
    assert any(k.startswith("text_encoder_2.") for k in saved)  # the second encoder's LoRA is checkpointed
    resumed = train(cfg, resume="auto", progress=False)
    assert resumed.run_dir == runs[0] and resumed.resumed_from == 3
    assert resumed.lora_path.read_bytes() == xl_run.lora_path.read_bytes()
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == list(range(1, 7))
