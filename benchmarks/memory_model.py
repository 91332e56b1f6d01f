"""The memory model against the measurements, and the T4 (15 GB) estimate table.

    python benchmarks/memory_model.py            # reads benchmarks/latest.json, prints both tables

Predictions come from dreambooth_lab.memory (parameter counts from the SD1.5 configs, saved
activations counted on the meta device: no GPU and no real memory needed). On a CPU the
"measured" figure is the growth of the process's peak RSS during the run, which also holds the
VAE and text encoder (nothing is offloaded on a CPU) and allocator slack; on CUDA it is
torch.cuda.max_memory_allocated().
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T4_GIB = 15.0
T4_OPTIONS = [
    ("fp16, AdamW", {}),
    ("fp16, 8-bit AdamW", {"optim.optimizer": "adamw8bit"}),
    ("fp16, 8-bit AdamW, text encoder trained", {"optim.optimizer": "adamw8bit", "train.train_text_encoder": True}),
    ("fp16, gradient checkpointing", {"train.gradient_checkpointing": True}),
    ("fp16, checkpointing, 8-bit, text encoder trained", {"train.gradient_checkpointing": True,
                                                         "optim.optimizer": "adamw8bit",
                                                         "train.train_text_encoder": True}),
    ("fp16, batch 2, checkpointing", {"train.batch_size": 2, "train.gradient_checkpointing": True}),
    ("fp32 (no mixed precision)", {"train.mixed_precision": "no"}),
    ("fp16, caches off (VAE + text encoder stay on the GPU)", {"train.cache_latents": False,
                                                                "train.cache_text_embeddings": False}),
]


def t4_table(factor: float = 1.0) -> str:
    """Predicted memory per option; `factor` is the measured/predicted ratio of the SD-shaped
    benchmark rows (what the model leaves out: transient buffers, allocator slack)."""
    from dreambooth_lab.config import Config, with_overrides
    from dreambooth_lab.memory import estimate

    base = with_overrides(Config(), {"model.name": "sd15-random", "train.mixed_precision": "fp16"})
    lines = ["| SD1.5 at 512 px, prior preservation on, batch 1 (+1 class row) | weights | LoRA+grads+optimizer | "
             f"activations | predicted GiB | × {factor:.2f} (measured ratio) | fits 15 GB T4? |",
             "|---|---|---|---|---|---|---|"]
    for name, over in T4_OPTIONS:
        g = estimate(with_overrides(base, over), "cuda").as_gib()
        worst = g["total"] * factor
        fits = "yes" if worst < T4_GIB * 0.85 else ("tight" if worst < T4_GIB else "no")
        lines.append(f"| {name} | {g['weights']:.2f} | {g['lora'] + g['gradients'] + g['optimizer']:.3f} | "
                     f"{g['activations']:.2f} | {g['total']:.2f} | {worst:.2f} | {fits} |")
    return "\n".join(lines)


def against_measurements(path: Path) -> str:
    from benchmarks.run import case_config
    from dreambooth_lab.memory import estimate

    data = json.loads(path.read_text())
    lines = ["| model | px | text encoder | cache | measured peak GiB | predicted GiB | measured / predicted |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for r in data["train"]:
        cfg = case_config(r["model"], r["resolution"], 1, r["cache"], r["train_text_encoder"], {}, "/tmp")
        pred = estimate(cfg, r["device"]).total / 2**30
        if r["model"] != "tiny":
            ratios.append(r["measured_peak_gib"] / pred)
        lines.append(f"| {r['model']} | {r['resolution']} | {'trained' if r['train_text_encoder'] else 'frozen'} | "
                     f"{'on' if r['cache'] else 'off'} | {r['measured_peak_gib']:.2f} | {pred:.2f} | "
                     f"{r['measured_peak_gib'] / pred:.2f} |")
    return "\n".join(lines), (max(ratios) if ratios else 1.0)


if __name__ == "__main__":
    latest = ROOT / "benchmarks" / "latest.json"
    factor = 1.0
    if latest.is_file():
        table, factor = against_measurements(latest)
        print(table, "\n")
    print(t4_table(factor))
