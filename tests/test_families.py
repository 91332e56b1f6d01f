"""Model families (SD1.x, SD2.x v-prediction, SDXL): told from the model folder, carried by the run."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth_lab import config as C
from dreambooth_lab import export, models
from dreambooth_lab.builtin import shaped, tiny


def family(name: str) -> str:
    return models.resolve(C.ModelConfig(name=name)).family


@pytest.mark.parametrize("name,want", [("tiny", "sd1"), ("tiny-sd2v", "sd2"), ("tiny-sdxl", "sdxl"), ("toyworld", "sd1")])
def test_family_is_detected_from_the_model_folder(name, want):
    folder = models.pretrained_path(name)
    assert family(folder) == want  # from model_index.json and the configs alone
    assert family(name) == want  # the built-in registry's word agrees


def test_a_loaded_pipeline_is_its_familys(tiny_pipe):
    from dreambooth_lab.models import load_pipeline

    assert type(tiny_pipe) is models.pipeline_class("sd1")
    xl = load_pipeline(C.ModelConfig(name="tiny-sdxl"), device="cpu")
    assert type(xl).__name__ == "StableDiffusionXLPipeline" and type(xl) is models.pipeline_class("sdxl")


def test_family_rules_on_published_configs():
    sd15 = ({"_class_name": "StableDiffusionPipeline"}, {"prediction_type": "epsilon"},
            {"hidden_act": "quick_gelu", "hidden_size": 768})
    sd2_base = ({"_class_name": "StableDiffusionPipeline"}, {"prediction_type": "epsilon"},
                {"hidden_act": "gelu", "hidden_size": 1024})  # SD2 at 512: epsilon, but OpenCLIP-H
    sd21 = ({"_class_name": "StableDiffusionPipeline"}, {"prediction_type": "v_prediction"}, sd2_base[2])
    xl = ({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
          {"prediction_type": "epsilon"}, {"hidden_act": "quick_gelu", "hidden_size": 768})
    renamed_xl = ({"_class_name": "MyPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
                  None, None)
    got = [models.family_from_configs(*c) for c in (sd15, sd2_base, sd21, xl, renamed_xl)]
    assert got == ["sd1", "sd2", "sd2", "sdxl", "sdxl"]


def test_sdxl_random_has_sdxls_architecture_without_building_weights():
    import torch
    from diffusers import UNet2DConditionModel

    folder = shaped.configs_dir("sdxl-random")
    assert family(str(folder)) == "sdxl" and family("sdxl-random") == "sdxl"
    assert not list(folder.rglob("*.safetensors"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 2567  # SDXL base's 2.6B UNet
    te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert te2["hidden_size"] == 1280 and te2["projection_dim"] == 1280


def test_missing_model_index_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        family(str(tmp_path / "empty"))


def test_default_resolution_follows_the_family_by_name():
    assert [C.default_resolution(n) for n in ("tiny", "tiny-sdxl", "tiny-sd2v")] == [64, 64, 64]
    assert C.default_resolution("sdxl-random") == 1024
    assert C.default_resolution("stabilityai/stable-diffusion-xl-base-1.0") == 1024
    assert C.default_resolution("stable-diffusion-v1-5/stable-diffusion-v1-5") == 512


def test_a_local_folder_trains_at_its_native_size(tmp_path):
    """A copied model folder (a toyworld snapshot, an SD2-768 download) defaults to what its own
    pipeline generates: UNet sample_size x the VAE's downscale — not a blanket 512."""
    import json
    import shutil

    copy = Path(shutil.copytree(tiny.tiny_model_dir(), tmp_path / "my-tiny-copy"))
    assert C.default_resolution(str(copy)) == 64
    cfg = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 96}))
    vae = json.loads((copy / "vae" / "config.json").read_text())
    (copy / "vae" / "config.json").write_text(json.dumps({**vae, "block_out_channels": [8, 8, 8, 8]}))
    assert C.default_resolution(str(copy)) == 768
    (copy / "unet" / "config.json").unlink()
    assert C.default_resolution(str(copy)) == 512  # configs that do not say: the SD1/SD2 default


def test_second_text_encoder_lr_leaves_old_hashes_alone():
    cfg = C.Config()
    assert "lr_text_encoder_2" not in C._hashed(cfg.resolved())["optim"]  # configs from before it hash as before
    assert C.with_overrides(cfg, {"optim.lr_text_encoder_2": 5e-5}).hash() != cfg.hash()
    with pytest.raises(C.ConfigError, match="optim.lr_text_encoder_2"):
        C.with_overrides(cfg, {"optim.lr_text_encoder_2": 0.0}).validate()
    with pytest.raises(C.ConfigError, match="sample.lora_scale_text_encoder_2"):
        C.with_overrides(cfg, {"sample.lora_scale_text_encoder_2": 3.0}).validate()


def test_v_prediction_sd2_model_trains_and_samples(tmp_path):
    from dreambooth_lab import sample
    from dreambooth_lab.report import load_run_pipeline
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"model.name": "tiny-sd2v", "train.steps": 15, "optim.lr_unet": 3e-3,
                                   "prior.enabled": False, "train.train_text_encoder": True, "train.eval_loss": "on"})
    run = train(cfg, resume=None, progress=False)
    assert run.eval_loss_after < run.eval_loss_before  # it learns the velocity target
    assert json.loads((run.run_dir / "summary.json").read_text())["family"] == "sd2"
    assert export.read_metadata(run.lora_path)["dreambooth_lab.family"] == "sd2"
    keys = load_file(str(run.lora_path)).keys()
    assert not any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    kohya = export.export_kohya(run.run_dir)
    assert export.read_metadata(kohya)["ss_base_model_version"] == "sd_v2"
    assert any(k.startswith("lora_te_") for k in load_file(str(kohya)))

    pipe = load_run_pipeline(run.run_dir, device="cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    spec = sample.ImageSpec(prompt="A sks dog", seed=2, steps=4, width=64, height=64, model="tiny-sd2v",
                            lora_scale_unet=1.0, lora_scale_text_encoder=1.0)
    tuned, base = sample.generate(pipe, [spec, sample.ImageSpec(**{**spec.__dict__, "lora_scale_unet": 0.0,
                                                                  "lora_scale_text_encoder": 0.0})], progress=False)
    assert tuned.size == (64, 64) and not np.array_equal(np.asarray(tuned), np.asarray(base))
