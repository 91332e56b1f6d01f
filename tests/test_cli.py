import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_demo_command_writes_the_run_and_its_pictures(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "dreambooth_lab", "demo", "--output-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    run = Path(lines["run folder"].strip())
    assert run.parent == tmp_path / "runs" and (run / "pytorch_lora_weights.safetensors").is_file()
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
