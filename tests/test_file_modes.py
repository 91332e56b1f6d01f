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
