import json
import os

import pytest

from dreambooth_lab import notebook as nb
from dreambooth_lab.report import load_run_config, open_run
from dreambooth_lab.widgets import GenerationPanel

FORM = dict(BASE_MODEL="stable-diffusion-v1-5/stable-diffusion-v1-5", DATASET_DIR="datasets/sample_subject",
            OUTPUT_DIR="runs", RARE_TOKEN="oue", CLASS="dog", TRAIN_TEXT_ENCODER=True, STEPS=450, BATCH_SIZE=1,
            LR_UNET=3e-4, LR_TEXT_ENCODER=1e-4, SEED=42, PRIOR_PRESERVATION=True, NUM_CLASS_IMAGES=100,
            PRIOR_LOSS_WEIGHT=1.0, RANK=8, MIXED_PRECISION="no", USE_8BIT_ADAM=True, GRADIENT_CHECKPOINTING=False,
            LORA_SCALE_UNET=0.6, LORA_SCALE_TEXT_ENCODER=0.64, GUIDANCE=6.4, GEN_SEED=8)


def test_form_fills_the_config(monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    cfg = nb.build_config(dict(FORM))
    assert (cfg.data.token, cfg.train.steps, cfg.lora.rank, cfg.lora.alpha) == ("oue", 450, 8, 8.0)
    assert cfg.optim.optimizer == "adamw8bit" and cfg.train.train_text_encoder
    assert cfg.sample.seeds == [8, 9, 10, 11] and cfg.sample.lora_scale_text_encoder == 0.64
    assert os.path.isabs(cfg.data.instance_dir) and cfg.data.instance_dir.endswith("datasets/sample_subject")


def test_form_missing_a_field_is_named():
    form = dict(FORM)
    del form["RANK"]
    with pytest.raises(KeyError, match="RANK"):
        nb.form_overrides(form)


def test_preset_replaces_the_form_but_not_the_paths(monkeypatch, tmp_path):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    cfg = nb.build_config(dict(FORM, OUTPUT_DIR=str(tmp_path)), preset="configs/tiny.yaml")
    assert cfg.model.name == "tiny" and cfg.data.token == "sks" and cfg.train.steps == 40
    assert cfg.train.output_dir == str(tmp_path)


def test_smoke_switch_selects_the_tiny_model(monkeypatch, tmp_path):
    monkeypatch.setenv(nb.SMOKE_ENV, "1")
    monkeypatch.setenv(nb.OUTPUT_ENV, str(tmp_path))
    cfg = nb.build_config(dict(FORM, MIXED_PRECISION="fp16"))
    assert cfg.is_tiny and cfg.train.steps < 50 and cfg.train.output_dir == str(tmp_path)
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.token == "oue"  # what the study varies is kept


def test_hub_token_is_kept_in_memory_only(monkeypatch, tmp_path, capsys):
    secret = "hf_test_SECRET_do_not_leak_123"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("getpass.getpass", lambda prompt="": secret)
    assert nb.hub_login() is True
    assert os.environ["HF_TOKEN"] == secret
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


def test_panel_generate_writes_images_and_sidecars_with_its_values(trained_run):
    pipe = open_run(trained_run.run_dir, device="cpu")
    panel = GenerationPanel(pipe, load_run_config(trained_run.run_dir), trained_run.run_dir)
    panel.prompt.value = "A sks dog on the moon"
    panel.negative.value = "blurry"
    panel.scale_unet.value, panel.scale_te.value = 0.85, 0.15
    panel.guidance.value, panel.steps.value = 3.5, 3
    panel.seed.value, panel.count.value = 123, 2
    panel.button.click()  # the button's own callback, headless
    pngs = sorted(panel.folder.glob("click001-*.png"))
    assert len(pngs) == 2
    sides = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert [s["seed"] for s in sides] == [123, 124]
    for s in sides:
        assert (s["prompt"], s["negative_prompt"], s["steps"]) == ("A sks dog on the moon", "blurry", 3)
        assert (s["lora_scale_unet"], s["lora_scale_text_encoder"], s["guidance"]) == (0.85, 0.15, 3.5)
    panel.random_seed.value, panel.count.value = True, 1
    paths = panel.generate()
    side = json.loads(paths[0].with_suffix(".json").read_text())
    assert side["seed"] == panel.seed.value and side["seed"] != 123
    assert panel.pipe is pipe  # no reload per click
    assert "saved 1 image" in panel.status.value
