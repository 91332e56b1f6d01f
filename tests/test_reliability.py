"""The bad-input matrix of RELIABILITY.md, interruption by SIGKILL, numerical faults, secrets."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SAMPLE_SUBJECT, poison_loss_after, tiny_config
from dreambooth_lab import config as C
from dreambooth_lab import data
from dreambooth_lab.runs import read_metrics
from dreambooth_lab.train import train


def _photo(path, size=(96, 80), color=(180, 40, 40), mode="RGB", fmt=None, **save):
    im = Image.new(mode, size, color if mode != "L" else 128)
    im.save(path, format=fmt, **save)
    return path


def _folder(tmp_path, n=3):
    d = tmp_path / "photos"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


# ---- photos ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,content", [
    ("zero.jpg", b""),                                  # zero-byte file
    ("note.jpg", b"this is a text file, not a photo"),  # a text file named .jpg
])
def test_unreadable_file_is_named(tmp_path, name, content):
    d = _folder(tmp_path)
    (d / name).write_bytes(content)
    with pytest.raises(data.DatasetError, match=name.replace(".", r"\.")):
        data.ImageSet.from_folder(d, 64)


def test_truncated_jpeg_is_named(tmp_path):
    d = _folder(tmp_path)
    _photo(d / "full.jpg", size=(300, 300))
    blob = (d / "full.jpg").read_bytes()
    (d / "full.jpg").unlink()
    (d / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DatasetError, match=r"cut\.jpg"):
        data.ImageSet.from_folder(d, 64)


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "scan.tiff", "anim.gif"])
def test_unsupported_format_is_named_with_the_fix(tmp_path, name):
    d = _folder(tmp_path)
    (d / name).write_bytes(b"\x00" * 10)
    with pytest.raises(data.DatasetError, match="convert them to JPEG or PNG") as exc:
        data.find_images(d)
    assert name in str(exc.value)


def test_empty_folder_and_only_non_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="no images"):
        data.find_images(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    with pytest.raises(data.DatasetError, match="readme.txt"):
        data.find_images(tmp_path / "docs")


def test_small_photos_are_upscaled_with_a_warning_and_tiny_ones_refused(tmp_path):
    d = _folder(tmp_path)  # 96 px photos
    with pytest.warns(data.DatasetWarning, match="upscaled"):
        s = data.ImageSet.from_folder(d, 128)
    assert min(s.images[0].size) == 128
    _photo(d / "thumb.png", size=(20, 20))
    with pytest.raises(data.DatasetError, match=r"thumb\.png: 20x20"):
        data.ImageSet.from_folder(d, 128)


@pytest.mark.parametrize("mode,color,expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),        # CMYK red
    ("LA", (0, 0), (255, 255, 255)),                 # fully transparent grey -> white
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),       # fully transparent red -> white
])
def test_colour_modes_become_rgb(tmp_path, mode, color, expected):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (16, 16), color).save(path)
    out = np.asarray(data.open_image(path)).astype(int)
    assert out.shape == (16, 16, 3) and np.abs(out[8, 8] - expected).max() <= 2


def test_16_bit_png_keeps_its_tones(tmp_path):
    arr = np.full((16, 16), 40000, dtype=np.uint16)  # ~61% grey in 16 bit
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = np.asarray(data.open_image(tmp_path / "deep.png"))
    assert abs(int(out[0, 0, 0]) - 40000 // 256) <= 1  # not clipped to white


def test_palette_png_with_transparency(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0
    im.save(tmp_path / "pal.png", transparency=0)
    out = np.asarray(data.open_image(tmp_path / "pal.png"))
    assert tuple(out[4, 4]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(tmp_path, orientation):
    # An upright 40x30 picture with a red top-left corner, stored as a camera would for this tag.
    upright = np.zeros((30, 40, 3), dtype=np.uint8)
    upright[:10, :10] = (255, 0, 0)
    stored = Image.fromarray(upright)
    inverse = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
               4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
               6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}
    for op in inverse.get(orientation, []):
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "o.png", exif=exif.tobytes())
    out = np.asarray(data.open_image(tmp_path / "o.png"))
    assert out.shape == (30, 40, 3)
    assert tuple(out[2, 2]) == (255, 0, 0) and tuple(out[-2, -2]) == (0, 0, 0)


def test_huge_jpeg_is_decoded_small(tmp_path):
    Image.new("RGB", (8000, 6000), (10, 120, 200)).save(tmp_path / "big.jpg", quality=70)
    im = data.open_image(tmp_path / "big.jpg", target=64)
    assert min(im.size) >= 64 and max(im.size) <= 8000 // 8 + 1  # DCT-scaled while decoding
    s = data.ImageSet.from_paths([tmp_path / "big.jpg"], 64)
    assert min(s.images[0].size) == 64


def test_duplicate_photos_are_warned(tmp_path):
    d = _folder(tmp_path)
    (d / "copy.png").write_bytes((d / "p1.png").read_bytes())
    with pytest.warns(data.DatasetWarning, match="p1.png = copy.png|copy.png = p1.png"):
        data.ImageSet.from_folder(d, 64)


def test_split_token_is_warned_at_training_start(tmp_path):
    with pytest.warns(UserWarning, match="xqzv.*splits into"):
        train(tiny_config(tmp_path, **{"data.token": "xqzv", "train.steps": 1}), resume=None, progress=False)


# ---- config and paths ------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("data.class_name", ""), ("optim.lr_unet", -1e-4), ("train.steps", 0),
                                       ("lora.rank", -4), ("train.batch_size", 0), ("prior.num_class_images", 0),
                                       ("sample.lora_scale_text_encoder", -0.5)])
def test_bad_values_name_the_field(key, value):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.with_overrides(C.Config(), {key: value}).validate()


def test_model_path_that_does_not_exist(tmp_path):
    cfg = tiny_config(tmp_path, **{"model.name": str(tmp_path / "no-model")})
    with pytest.raises(FileNotFoundError, match="no-model"):
        train(cfg, resume=None, progress=False)


def test_output_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = tiny_config(tmp_path, **{"train.output_dir": str(tmp_path / "file" / "runs"), "prior.enabled": False})
    with pytest.raises(PermissionError, match="train.output_dir"):
        train(cfg, resume=None, progress=False)


def test_yaml_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
    bad.write_text("trian:\n  steps: 10\n")
    with pytest.raises(C.ConfigError, match="did you mean 'train'"):
        C.load(bad)
    bad.write_text("lora:\n  rank: four\n")
    with pytest.raises(C.ConfigError, match=r"lora\.rank: expected int"):
        C.load(bad)


# ---- interruption -----------------------------------------------------------------------------

def test_sigkill_then_resume_gives_the_uninterrupted_lora_bytes(tmp_path):
    over = {"train.steps": 80, "train.checkpoint_every": 5, "train.train_text_encoder": True}
    reference = train(tiny_config(tmp_path / "ref", **over), resume=None, progress=False)

    cfg = tiny_config(tmp_path / "killed", **over)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(C.to_yaml(cfg))
    kill_at = random.Random().randint(6, 70)
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth_lab", "train", "--config", str(cfg_file)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "killed" / "runs"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = list(runs.glob("*/metrics.jsonl"))
            if metrics and len(read_metrics(metrics[0].parent)) >= kill_at:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    run = next(runs.iterdir())
    assert not (run / "summary.json").exists(), f"the run finished before the kill at step {kill_at}"
    resumed = train(cfg, resume="auto", progress=False)
    assert resumed.run_dir == run and resumed.resumed_from is not None, f"killed at step {kill_at}"
    assert resumed.lora_path.read_bytes() == reference.lora_path.read_bytes(), f"killed at step {kill_at}"
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 81))
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".ckpt-*"))


def test_half_written_checkpoint_is_ignored(tmp_path):
    from dreambooth_lab import checkpoint

    run = tmp_path / "run"
    (run / "checkpoints" / ".ckpt-abc").mkdir(parents=True)       # a temp folder from a killed save
    (run / "checkpoints" / "step-000009").mkdir(parents=True)     # no state.json: never completed
    assert checkpoint.list_checkpoints(run) == []


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    poison_loss_after(monkeypatch, 4)
    cfg = tiny_config(tmp_path, **{"train.steps": 10, "train.checkpoint_every": 2, "train.mixed_precision": "bf16"})
    with pytest.raises(FloatingPointError, match="train.mixed_precision=no") as exc:
        train(cfg, resume=None, progress=False)
    run = next((tmp_path / "runs").iterdir())
    assert "step 5" in str(exc.value) and str(run / "checkpoints") in str(exc.value)
    from dreambooth_lab import checkpoint

    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-000002", "step-000004"]
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_planted_hub_token_never_reaches_the_run_folder(tmp_path, monkeypatch):
    from dreambooth_lab.report import sample_run

    secret = "hf_PLANTED_secret_token_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    result = train(tiny_config(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 1}), resume=None,
                   progress=False)
    sample_run(result.run_dir, progress=False)
    for path in [*result.run_dir.rglob("*"), *(tmp_path / "class_cache").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_no_remote_code_and_no_pickle_loading_in_the_package():
    source = "\n".join(p.read_text() for p in (REPO / "dreambooth_lab").glob("*.py"))
    assert "trust_remote_code=True" not in source
    assert "torch.load(" not in source and "import pickle" not in source and "use_safetensors=False" not in source


def test_leftover_checkpoint_temporaries_are_cleaned_when_the_run_is_opened(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
    first = train(cfg, resume=None, progress=False)
    (first.run_dir / "summary.json").unlink()  # make it resumable again
    stale = first.run_dir / "checkpoints" / ".ckpt-killed"
    stale.mkdir()
    (stale / "lora_params.safetensors").write_bytes(b"half")
    again = train(cfg, resume=first.run_dir, progress=False)
    assert again.resumed_from == 2 and not stale.exists()
    assert not list((first.run_dir / "checkpoints").glob(".ckpt-*"))  # no temporary is left at all
