"""benchmarks/gpu_check.py: the no-CUDA path for real, the rest through its pure pieces."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks import gpu_check as G  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_without_cuda_it_says_so_and_writes_nothing():
    before = G.BENCHMARKS_MD.read_text()
    had_json = G.GPU_JSON.exists()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no CUDA device here") and "nothing was run" in proc.stdout
    assert G.BENCHMARKS_MD.read_text() == before and G.GPU_JSON.exists() == had_json


def test_cases_are_the_t4_configurations_each_adding_one_thing():
    names = [n for n, _ in G.CASES]
    assert names == ["fp16 + 8-bit AdamW", "+ gradient checkpointing", "+ text encoder trained", "fp32, AdamW"]
    (_, a), (_, b), (_, c), (_, fp32) = G.CASES
    assert a == {"train.mixed_precision": "fp16", "optim.optimizer": "adamw8bit"}
    assert a.items() < b.items() < c.items()  # cumulative
    assert b["train.gradient_checkpointing"] and c["train.train_text_encoder"]
    assert fp32["train.mixed_precision"] == "no"
    for _, extra in G.CASES + [("resume", G.RESUME_CASE)]:
        cfg = G.make_config(G.case_overrides(extra, steps=30, resolution=512, out="/tmp/x", cache="/tmp/c"))
        assert (cfg.model.name, cfg.resolution, cfg.train.steps, cfg.train.batch_size) == ("sd15-random", 512, 30, 1)
        assert cfg.prior.enabled and cfg.prior.num_class_images == 2


def _data(resume):
    machine = {"date": "2026-11-25", "gpu": "Tesla T4", "gpu_memory_gib": 14.6, "capability": "7.5",
               "torch": "2.13.0", "cuda": "12.4", "diffusers": "0.42.1", "transformers": "5.23.0", "peft": "0.21.2",
               "bitsandbytes": None}
    cases = [{"name": "fp16 + 8-bit AdamW", "step_seconds": 0.61, "peak_bytes": 6 * 2**30,
              "peak_bytes_whole": 7 * 2**30, "predicted_bytes": 5 * 2**30},
             {"name": "fp32, AdamW", "error": "CUDA out of memory"}]
    return {"machine": machine, "settings": {"steps": 30, "resolution": 512}, "cases": cases, "resume": resume}


def test_markdown_section_has_speed_memory_prediction_and_ratio():
    resume = {"steps": 30, "killed_after_step": 10, "resumed_from": 10,
              "verdict": "exact: the resumed LoRA is bitwise identical to the uninterrupted one"}
    text = G.to_markdown(_data(resume))
    assert text.startswith("## GPU check (2026-11-25, Tesla T4)")
    assert "| fp16 + 8-bit AdamW | 0.610 | 6.00 | 7.00 | 5.00 | 1.20 | yes |" in text
    assert "| fp32, AdamW | failed: CUDA out of memory |" in text
    assert "bitsandbytes not installed" in text and "resumed from step 10: **exact" in text
    assert "not completed: boom" in G.to_markdown(_data({"error": "boom"}))


def test_the_section_is_replaced_not_appended_twice():
    doc = "# Benchmarks\n\nintro\n\n## CPU\n\ncpu table\n"
    once = G.replace_section(doc, "## GPU check (a)\n\nfirst\n")
    assert once == doc + "\n## GPU check (a)\n\nfirst\n"
    assert G.replace_section(once, "## GPU check (b)\n\nsecond\n") == doc + "\n## GPU check (b)\n\nsecond\n"
    middle = "# B\n\n## GPU check (a)\n\nold\n\n## Memory\n\nm\n"
    assert G.replace_section(middle, "## GPU check (b)\n\nnew\n") == "# B\n\n## GPU check (b)\n\nnew\n\n## Memory\n\nm\n"


def test_lora_difference_and_verdict(tmp_path):
    from safetensors.torch import save_file

    a = {"w": torch.ones(3, 3), "v": torch.zeros(2)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({k: t.clone() for k, t in a.items()}, str(tmp_path / "same.safetensors"))
    save_file({"w": torch.ones(3, 3) + 1e-3, "v": torch.zeros(2)}, str(tmp_path / "near.safetensors"))
    save_file({"w": torch.ones(3, 3)}, str(tmp_path / "fewer.safetensors"))
    same = G.lora_difference(tmp_path / "a.safetensors", tmp_path / "same.safetensors")
    near = G.lora_difference(tmp_path / "a.safetensors", tmp_path / "near.safetensors")
    fewer = G.lora_difference(tmp_path / "a.safetensors", tmp_path / "fewer.safetensors")
    assert same == {"same_keys": True, "identical": True, "max_abs_diff": 0.0}
    assert not near["identical"] and near["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert G.verdict(same, same).startswith("exact")
    assert G.verdict(near, near).startswith("within this GPU's run-to-run noise")
    assert G.verdict(near, same).startswith("DIFFERENT: max |diff|")
    assert G.verdict(fewer, same).startswith("DIFFERENT: the resumed LoRA has other tensors")


def test_sdxl_cases_run_sdxl_random_on_the_t4_preset():
    names = [n for n, _ in G.SDXL_CASES]
    assert names[0] == "SDXL: the colab_t4_sdxl preset" and len(names) == 3
    preset, te, bare = (G.make_config(G.sdxl_case_overrides(extra, steps=G.SDXL_STEPS, resolution=None,
                                                            out="/tmp/x", cache="/tmp/c"))
                        for _, extra in G.SDXL_CASES)
    for cfg in (preset, te, bare):
        assert (cfg.model.name, cfg.resolution, cfg.train.steps) == ("sdxl-random", 1024, G.SDXL_STEPS)
        assert cfg.train.mixed_precision == "fp16" and cfg.optim.optimizer == "adamw8bit"
        assert cfg.prior.enabled and cfg.prior.num_class_images == 2
    assert preset.train.gradient_checkpointing and not preset.train.train_text_encoder
    assert te.train.train_text_encoder and not bare.train.gradient_checkpointing
    small = G.make_config(G.sdxl_case_overrides({}, steps=4, resolution=512, out="/tmp/x", cache="/tmp/c"))
    assert small.resolution == 512


def test_markdown_has_the_sdxl_table_when_sdxl_cases_ran():
    data = _data(None)
    gib = 2**30
    data["sdxl_cases"] = [
        {"name": "SDXL: the colab_t4_sdxl preset", "resolution": 1024, "step_seconds": 3.2, "peak_bytes": 7 * gib,
         "peak_bytes_whole": 11 * gib, "predicted_bytes": 6 * gib, "predicted_peak_bytes": 10 * gib,
         "predicted_gib": {"setup": 10.0}},
        {"name": "SDXL: preset without gradient checkpointing", "error": "CUDA out of memory"}]
    text = G.to_markdown(data)
    assert "SDXL (`sdxl-random`" in text
    assert "| SDXL: the colab_t4_sdxl preset | 1024 | 3.200 | 7.00 | 11.00 | 6.00 | 10.00 | 1.17 | 1.10 | yes |" in text
    assert "| SDXL: preset without gradient checkpointing | | failed: CUDA out of memory |" in text
    assert "SDXL (" not in G.to_markdown(_data(None))  # no SDXL cases, no SDXL table
