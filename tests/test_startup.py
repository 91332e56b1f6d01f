"""Startup: config and path errors come back before torch/diffusers are imported (a second, not a
minute on Colab), and the library noise every command used to print is gone, narrowly."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")

# Runs the CLI as `python -m dreambooth_lab ...` would, then reports what got imported.
WRAPPER = """
import json, runpy, sys
sys.argv = ["dreambooth_lab"] + json.loads(sys.argv[1])
code = 0
try:
    runpy.run_module("dreambooth_lab", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--set", "train.stepz=1"], "did you mean 'train.steps'"),
    (["--set", "train.name=../../x"], "train.name='../../x' contains a path separator"),
    (["--set", "lora.rank=0"], "lora.rank=0"),
    (["--data", "{tmp}/photo.jpg"], "is a file, not a folder"),
    (["--data", "{tmp}/nowhere"], "does not exist"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
], ids=["unknown-key", "name-escapes", "rank-zero", "data-is-a-file", "data-missing", "config-missing"])
def test_train_reports_config_and_path_errors_before_importing_torch(tmp_path, args, message):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result, err = _run_cli(["train", "--model", "tiny", *args], cwd=tmp_path)
    assert result["code"] == 2 and message in err, err
    assert "Traceback" not in err and "alpha" not in err, err
    assert result["heavy"] == [], f"imported before the error was reported: {result['heavy']}"


def test_config_module_and_cli_import_nothing_heavy():
    code = ("import sys, dreambooth_lab, dreambooth_lab.config, dreambooth_lab.cli\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_irrelevant_library_warnings_are_silenced_and_only_those():
    """The image-processor fallback lines (transformers without torchvision) and bitsandbytes'
    missing-`kernels` line are dropped; other messages on the same loggers still show."""
    code = "\n".join([
        "import importlib.util, logging",
        "import dreambooth_lab",
        "from diffusers import StableDiffusionPipeline  # imports CLIP/Siglip image processors",
        "import transformers",
        "if importlib.util.find_spec('torchvision') is None:  # the fallback that used to warn did run",
        "    print('fallback', transformers.CLIPImageProcessor.__name__)",
        "bnb = logging.getLogger('bitsandbytes.backends.cpu.ops')",
        "bnb.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
        "already `pip install kernels` and the kernels >= 0.11.1', 'No module named kernels')",
        "bnb.warning('another bitsandbytes message')",
        "from transformers.utils import logging as tlog",
        "tlog.get_logger('transformers.utils.import_utils').warning('another transformers message')",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        assert "fallback CLIPImageProcessorPil" in proc.stdout
    for noise in ("requires torchvision", "CLIPImageProcessor", "SiglipImageProcessor", "gemm_4bit_forward"):
        assert noise not in proc.stderr, proc.stderr
    assert "another bitsandbytes message" in proc.stderr and "another transformers message" in proc.stderr
