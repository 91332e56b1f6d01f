"""The class-image cache key (every field that decides the pictures) and where the cache lives."""

import pytest

from dreambooth_lab import config as C
from dreambooth_lab import prior
from dreambooth_lab.cache import cache_root

# Each of these decides what the class images look like: changing it must give another folder.
KEY_FIELDS = [
    ("model.name", "tiny"),
    ("model.revision", "refs/pr/1"),
    ("model.variant", "fp16"),
    ("model.safety_checker", True),
    ("data.class_name", "cat"),
    ("data.class_prompt", "a picture of {class}"),
    ("data.resolution", 256),
    ("prior.sampler", "ddim"),
    ("prior.steps", 30),
    ("prior.guidance", 5.0),
    ("prior.seed", 1),
]
# These change the run, not the class images: the same cache serves both.
NOT_KEY_FIELDS = [
    ("prior.num_class_images", 7),  # a larger request tops the same folder up
    ("prior.batch_size", 1),
    ("prior.loss_weight", 0.5),
    ("data.token", "oue"),
    ("data.instance_prompt", "a {token} {class} photo"),
    ("train.steps", 10),
    ("train.seed", 1),
    ("model.dtype", "float16"),  # training / sampling precision; class images use prior.dtype
]


def _cfg(tmp_path, **overrides):
    cfg = C.with_overrides(C.Config(), {"prior.cache_dir": str(tmp_path / "cache")})
    return C.with_overrides(cfg, overrides) if overrides else cfg


@pytest.mark.parametrize("key,value", KEY_FIELDS, ids=[k for k, _ in KEY_FIELDS])
def test_each_key_field_gives_another_cache_folder(tmp_path, key, value):
    base = prior.cache_folder(_cfg(tmp_path), "float32")
    changed = prior.cache_folder(_cfg(tmp_path, **{key: value}), "float32")
    assert changed[1] != base[1] and changed[0] != base[0]


@pytest.mark.parametrize("key,value", NOT_KEY_FIELDS, ids=[k for k, _ in NOT_KEY_FIELDS])
def test_fields_that_do_not_decide_the_pictures_share_the_cache(tmp_path, key, value):
    assert prior.cache_folder(_cfg(tmp_path, **{key: value}), "float32") == prior.cache_folder(_cfg(tmp_path), "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_generation_dtype_is_in_the_key(tmp_path, dtype):
    folder32, key32 = prior.cache_folder(_cfg(tmp_path), "float32")
    folder, key = prior.cache_folder(_cfg(tmp_path), dtype)
    assert key["dtype"] == dtype and key32["dtype"] == "float32" and folder != folder32


def test_same_inputs_give_the_same_key(tmp_path):
    a = prior.cache_folder(_cfg(tmp_path, **{"model.revision": "abc", "model.variant": "fp16"}), "float16")
    b = prior.cache_folder(_cfg(tmp_path, **{"model.revision": "abc", "model.variant": "fp16"}), "float16")
    assert a == b
    assert prior.key_digest(a[1]) == prior.key_digest(dict(reversed(list(a[1].items()))))  # order-free
    key = a[1]
    assert (key["revision"], key["variant"], key["dtype"]) == ("abc", "fp16", "float16")


def test_class_image_key_is_pure_and_wants_an_explicit_dtype(tmp_path):
    cfg = _cfg(tmp_path)
    assert prior.class_image_key(cfg, "float32") == prior.class_image_key(cfg, "float32")
    with pytest.raises(ValueError, match="explicit dtype"):
        prior.class_image_key(cfg, "auto")


def test_generation_dtype_resolves_auto_by_device(tmp_path):
    import torch

    cfg = _cfg(tmp_path)
    assert prior.generation_dtype(cfg.prior, "cpu") == "float32"
    assert prior.generation_dtype(cfg.prior, "cuda") == "float16"
    assert prior.generation_dtype(cfg.prior, "cuda:1") == "float16"
    assert prior.generation_dtype(cfg.prior, torch.device("cuda", 0)) == "float16"
    assert prior.generation_dtype(cfg.prior, torch.device("cpu")) == "float32"
    explicit = _cfg(tmp_path, **{"prior.dtype": "bfloat16"})
    assert prior.generation_dtype(explicit.prior, "cuda") == prior.generation_dtype(explicit.prior, "cpu") == "bfloat16"
    # without a dtype, the key takes this machine's generation dtype (CPU here: float32)
    assert prior.cache_folder(cfg)[1]["dtype"] == prior.generation_dtype(cfg.prior, "cuda" if torch.cuda.is_available() else "cpu")


# ---- where the cache lives ----------------------------------------------------------------------

def test_explicit_cache_dir_wins(tmp_path):
    cfg = _cfg(tmp_path)
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    assert prior.cache_root_for(cfg, {"OUTPUT_DIR": "/x"}, drive) == tmp_path / "cache"


def test_cache_goes_under_the_output_folder_when_drive_is_mounted(tmp_path, monkeypatch):
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    cfg = C.with_overrides(C.Config(), {"train.output_dir": str(tmp_path / "runs")})
    drive = tmp_path / "MyDrive"
    assert prior.cache_root_for(cfg, {}, drive) == cache_root() / "class_images"  # no Drive: user cache
    drive.mkdir()
    assert prior.cache_root_for(cfg, {}, drive) == tmp_path / "runs" / "class_images"
    monkeypatch.setattr(prior, "DRIVE", drive)
    assert prior.cache_folder(cfg, "float32")[0].parent == tmp_path / "runs" / "class_images"


def test_cache_goes_under_the_output_folder_when_output_dir_is_set(tmp_path, monkeypatch):
    cfg = C.with_overrides(C.Config(), {"train.output_dir": str(tmp_path / "runs")})
    missing_drive = tmp_path / "no-drive"
    monkeypatch.setattr(prior, "DRIVE", missing_drive)
    assert prior.cache_root_for(cfg, {"OUTPUT_DIR": str(tmp_path / "runs")}, missing_drive) == tmp_path / "runs" / "class_images"
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "runs"))
    folder, _ = prior.cache_folder(cfg, "float32")
    assert folder.parent == tmp_path / "runs" / "class_images"
    monkeypatch.delenv("OUTPUT_DIR")
    assert prior.cache_folder(cfg, "float32")[0].parent == cache_root() / "class_images"
