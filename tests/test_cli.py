import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO


def test_demo_command_writes_the_run_and_its_pictures(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "dreambooth_lab", "demo", "--output-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    run = Path(lines["run folder"].strip())
    assert run.parent == tmp_path / "runs" and (run / "pytorch_lora_weights.safetensors").is_file()
    assert "name: toyworld" in (run / "config.yaml").read_text()  # one demo everywhere: make demo's
    for key in ("seed grid", "test prompts", "comparison", "loss curve"):
        assert Path(lines[key].strip()).is_file(), key


def test_train_sample_compare_commands(tmp_path):
    from conftest import SAMPLE_SUBJECT
    from dreambooth_lab.cli import main

    sets = ["--set", "train.steps=2", "--set", "prior.num_class_images=2", "--set", "prior.steps=2",
            "--set", f"prior.cache_dir={tmp_path / 'cache'}", "--set", f"train.output_dir={tmp_path / 'runs'}"]
    assert main(["train", "--model", "tiny", "--data", str(SAMPLE_SUBJECT), *sets]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert main(["sample", str(run), "--seeds", "5", "--steps", "2", "--scale-unet", "1.0"]) == 0
    assert main(["compare", str(run)]) == 0
    assert (next((run / "samples").iterdir()) / "compare.png").is_file()


def test_cli_errors_name_the_problem(tmp_path, capsys):
    from dreambooth_lab.cli import main

    assert main(["train", "--model", "tiny", "--set", "optim.lr_unte=1"]) == 2
    assert "optim.lr_unet" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ---- damaged or foreign LoRA files: one line naming the file, never a traceback -------------------

def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the shared run that a test may damage: the finished run alone, without what other
    tests sampled, exported or evaluated from it (so no test depends on the order they ran in)."""
    import shutil

    return Path(shutil.copytree(trained_run.run_dir, tmp_path / trained_run.run_dir.name,
                                ignore=shutil.ignore_patterns("samples", "export", "eval")))


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_info_accepts_a_run_folder(trained_run, capsys):
    from dreambooth_lab.cli import main

    assert main(["info", str(trained_run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(trained_run.lora_path)) and "token: sks" in out


@pytest.mark.parametrize("case", ["truncated", "header_cut", "pickle", "folder", "foreign"])
def test_info_on_a_damaged_or_foreign_file_is_one_line(run_copy, tmp_path, capsys, case):
    from safetensors.torch import save_file

    from dreambooth_lab.cli import main

    lora = run_copy / "pytorch_lora_weights.safetensors"
    target, needle = {
        "truncated": lambda: (_truncate(lora), "damaged or not a safetensors file"),
        "header_cut": lambda: (_truncate(lora, 0.001), "damaged or not a safetensors file"),
        "pickle": lambda: (tmp_path / "lora.bin", "only .safetensors"),
        "folder": lambda: (tmp_path / "photos", "holds no pytorch_lora_weights.safetensors"),
        "foreign": lambda: (tmp_path / "unet.safetensors", "holds no LoRA tensors"),
    }[case]()
    if case == "pickle":
        target.write_bytes(b"\x80\x04K\x01.")
    elif case == "folder":
        target.mkdir()
    elif case == "foreign":
        save_file({"conv_in.weight": torch.zeros(2, 2)}, str(target))
    assert main(["info", str(target)]) == 2
    _one_line_error(capsys, str(target), needle)


def test_export_and_sample_on_a_damaged_lora_are_one_line(run_copy, tmp_path, capsys):
    from dreambooth_lab.cli import main

    lora = _truncate(run_copy / "pytorch_lora_weights.safetensors")
    for argv in (["export", str(run_copy)], ["export", str(run_copy), "--format", "fused"], ["export", str(lora)],
                 ["sample", str(run_copy), "--steps", "2"]):
        assert main(argv) == 2, argv
        _one_line_error(capsys, str(lora), "damaged")
    assert not (run_copy / "export").exists() and not (run_copy / "samples").exists()

    bad = tmp_path / "lora.bin"
    bad.write_bytes(b"\x80\x04K\x01.")
    assert main(["export", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "only .safetensors")

    lora.unlink()  # a run that has not finished (no LoRA yet)
    for argv in (["sample", str(run_copy)], ["export", str(run_copy)]):
        assert main(argv) == 2, argv
        _one_line_error(capsys, str(run_copy), "has not finished")


# ---- sample options go through the config's validation ---------------------------------------------

@pytest.mark.parametrize("option,value,field", [
    ("--scale-unet", "5", "sample.lora_scale_unet"),
    ("--scale-text-encoder", "-3", "sample.lora_scale_text_encoder"),
    ("--seeds", "-1", "sample.seeds[0]"),
    ("--steps", "0", "sample.steps"),
])
def test_sample_options_are_validated(trained_run, capsys, option, value, field):
    from dreambooth_lab.cli import main

    before = set((trained_run.run_dir / "samples").glob("*"))
    assert main(["sample", str(trained_run.run_dir), option, value]) == 2
    _one_line_error(capsys, f"{option} {value}", field)
    assert set((trained_run.run_dir / "samples").glob("*")) == before  # nothing was generated


def test_sample_run_refuses_zero_steps_instead_of_using_the_default(trained_run):
    from dreambooth_lab.config import ConfigError
    from dreambooth_lab.report import sample_run

    with pytest.raises(ConfigError, match=r"sample\.steps=0"):
        sample_run(trained_run.run_dir, steps=0, progress=False)


def test_fused_export_scales_are_validated(trained_run, capsys):
    from dreambooth_lab.cli import main

    assert main(["export", str(trained_run.run_dir), "--format", "fused", "--scale-unet", "5"]) == 2
    _one_line_error(capsys, "--scale-unet 5", "sample.lora_scale_unet")
