"""Training speed, class-image generation speed and memory: one command, one table.

    python benchmarks/run.py                 # the full set (CPU here: about 15 minutes)
    python benchmarks/run.py --quick         # tiny model only (a minute)
    python benchmarks/run.py --only sd512    # one group

Each case runs in its own process (clean peak-memory numbers) through the package's real
`train()`; speed is the mean of the step times in metrics.jsonl after warm-up steps. Cases
compare the uncached path — the per-step work of diffusers' train_dreambooth_lora.py: VAE
encode and text encoder every step — with the cached one, text encoder frozen and trained, prior
preservation on. Ratios are measured within one run of this script. Results go to
benchmarks/latest.md (and .json) with machine and versions; BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (model, resolution, steps, warm-up steps, cache on, text encoder trained, extra overrides)
TRAIN_CASES = {
    "tiny": [("tiny", 64, 40, 5, c, te, {}) for te in (False, True) for c in (False, True)],
    "sd256": [("sd15-random", 256, 4, 1, c, te, {}) for te in (False, True) for c in (False, True)],
    "sd512": [("sd15-random", 512, 3, 1, c, False, {}) for c in (False, True)],
}
# name: (model, resolution, sampler, steps): the diffusers reference generates class images with
# the pipeline's own scheduler (PNDM for SD1.5) and 50 steps; ours defaults to DPM-Solver++ 25.
GEN_CASES = {
    "tiny": [("tiny", 64, "pndm", 50), ("tiny", 64, "dpmsolver++", 25)],
    "sd256": [("sd15-random", 256, "pndm", 50), ("sd15-random", 256, "dpmsolver++", 25)],
}


def case_config(model, res, steps, cache, te, extra, out):
    from dreambooth_lab.config import Config, with_overrides

    return with_overrides(Config(), {
        "model.name": model, "data.instance_dir": str(ROOT / "datasets" / "sample_subject"), "data.resolution": res,
        "train.steps": steps, "train.checkpoint_every": 10_000, "train.output_dir": out,
        "train.train_text_encoder": te, "train.cache_latents": cache, "train.cache_text_embeddings": cache,
        "prior.num_class_images": 2, "prior.steps": 2, **extra})


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_train_case(args) -> dict:
    """In a child process: one training run, its step times and peak memory."""
    import torch

    from dreambooth_lab.memory import estimate
    from dreambooth_lab.train import read_metrics, train

    import accelerate  # noqa: F401  (imported before the baseline: libraries are not the run's memory)
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    model, res, steps, warm, cache, te, extra = json.loads(args.case)
    cfg = case_config(model, res, steps, cache, te, extra, args.out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_rss()
    result = train(cfg, resume=None, progress=False, profile=True)
    times = [r["step_seconds"] for r in read_metrics(result.run_dir)][warm:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss() - baseline
    predicted = estimate(cfg, device)
    profile = json.loads((result.run_dir / "profile.json").read_text())["phases"]
    return {"model": model, "resolution": res, "cache": cache, "train_text_encoder": te,
            "step_seconds": sum(times) / len(times), "steps_per_second": len(times) / sum(times),
            "measured_peak_gib": measured / 2**30, "predicted_gib": predicted.total / 2**30,
            "predicted": predicted.as_gib(), "device": device,
            "phases_ms": {k: round(v["per_step"] * 1000, 1) for k, v in profile.items()}}


def run_gen_case(args) -> dict:
    import torch

    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.sample import ImageSpec, generate

    model, res, sampler, steps = json.loads(args.case)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    pipe = load_pipeline(ModelConfig(name=model), dtype=dtype)
    specs = [ImageSpec(prompt="a photo of dog", seed=i, sampler=sampler, steps=steps, width=res, height=res,
                       guidance=7.5, model=model) for i in range(4)]
    generate(pipe, specs[:1], batch_size=1, progress=False)  # warm-up
    t0 = time.perf_counter()
    generate(pipe, specs, batch_size=4, progress=False)
    seconds = time.perf_counter() - t0
    return {"model": model, "resolution": res, "sampler": sampler, "steps": steps, "images_per_second": 4 / seconds}


def child(kind: str, case, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--case", json.dumps(case), "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import diffusers
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "gpu": gpu, "date": time.strftime("%Y-%m-%d")}


def to_markdown(info: dict, train_rows: list[dict], gen_rows: list[dict]) -> str:
    lines = [f"Machine: {info['gpu'] or 'CPU'} ({info['cores']} cores), Python {info['python']}, torch {info['torch']}, "
             f"diffusers {info['diffusers']}, transformers {info['transformers']}, {info['date']}", "",
             "| model | px | text encoder | cache | s/step | speed-up (cache) | peak GiB measured | predicted | "
             "VAE ms | TE ms | UNet fwd ms | backward ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in train_rows:
        base = next(b for b in train_rows if b["model"] == r["model"] and b["resolution"] == r["resolution"]
                    and b["train_text_encoder"] == r["train_text_encoder"] and not b["cache"])
        p = r["phases_ms"]
        lines.append(f"| {r['model']} | {r['resolution']} | {'trained' if r['train_text_encoder'] else 'frozen'} | "
                     f"{'on' if r['cache'] else 'off'} | {r['step_seconds']:.3f} | "
                     f"{base['step_seconds'] / r['step_seconds']:.2f}x | {r['measured_peak_gib']:.2f} | "
                     f"{r['predicted_gib']:.2f} | {p.get('vae', 0):.0f} | {p.get('text_encoder', 0):.0f} | "
                     f"{p.get('unet_forward', 0):.0f} | {p.get('backward', 0):.0f} |")
    if gen_rows:
        lines += ["", "| model | px | sampler | steps | images/s | speed-up |", "|---|---|---|---|---|---|"]
        for r in gen_rows:
            ref = next(g for g in gen_rows if g["model"] == r["model"] and g["sampler"] == "pndm")
            lines.append(f"| {r['model']} | {r['resolution']} | {r['sampler']} | {r['steps']} | "
                         f"{r['images_per_second']:.3f} | {r['images_per_second'] / ref['images_per_second']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--only", choices=sorted(TRAIN_CASES), help="one group of cases")
    ap.add_argument("--child", choices=["train", "gen"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_train_case(args) if args.child == "train" else run_gen_case(args)))
        return
    groups = ["tiny"] if args.quick else ([args.only] if args.only else list(TRAIN_CASES))
    out = tempfile.mkdtemp(prefix="dreambooth-bench-")
    train_rows, gen_rows = [], []
    for g in groups:
        for case in TRAIN_CASES[g]:
            train_rows.append(child("train", case, out))
            print(json.dumps(train_rows[-1]), flush=True)
        for case in GEN_CASES.get(g, []):
            gen_rows.append(child("gen", case, out))
            print(json.dumps(gen_rows[-1]), flush=True)
    info = machine()
    md = to_markdown(info, train_rows, gen_rows)
    (ROOT / "benchmarks" / "latest.md").write_text(md)
    (ROOT / "benchmarks" / "latest.json").write_text(json.dumps({"machine": info, "train": train_rows,
                                                                 "generation": gen_rows}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
