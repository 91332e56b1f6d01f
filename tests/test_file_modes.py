"""Written files get the permissions the user's umask gives, like any ordinary write (not mkstemp's
private 0600), so e.g. ComfyUI running as another user can read a LoRA."""

import os
import stat

import pytest
import torch
from PIL import Image

from dreambooth_lab import files


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask):
    assert files.current_umask() == umask
    assert files.current_umask() == umask  # reading it left it as it was


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask  # 0644 under 022, 0640 under 027, 0600 under 077
    written = [
        files.write_text(tmp_path / "a.txt", "x"),
        files.write_json(tmp_path / "a.json", {"a": 1}),
        files.write_bytes(tmp_path / "a.bin", b"x"),
        files.save_image(tmp_path / "a.png", Image.new("RGB", (4, 4))),
        files.write_safetensors(tmp_path / "lora.safetensors", {"w": torch.zeros(2)}, {"k": "v"}),
    ]
    for path in written:
        assert _mode(path) == want, (path.name, oct(_mode(path)), oct(want))
    # the same as a plain open() would give
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == want


def test_overwriting_keeps_umask_permissions(tmp_path, umask):
    path = files.write_text(tmp_path / "a.txt", "1")
    os.chmod(path, 0o600)
    files.write_text(path, "2")
    assert _mode(path) == 0o666 & ~umask and path.read_text() == "2"


def test_follow_umask_opens_what_a_library_left_private(tmp_path, umask):
    """safetensors (under diffusers' save_pretrained) writes weight files 0600; follow_umask gives every
    file under a folder what an ordinary write would, and leaves the folders' own modes alone."""
    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "unet" / "w.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    os.chmod(tmp_path / "config.json", 0o600)
    files.follow_umask(tmp_path)
    assert _mode(tmp_path / "unet" / "w.safetensors") == _mode(tmp_path / "config.json") == 0o666 & ~umask
