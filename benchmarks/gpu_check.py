"""The GPU check: the T4-relevant training configurations, measured, against the memory model.

    python benchmarks/gpu_check.py                  # on a CUDA machine; about 10-20 minutes
    python benchmarks/gpu_check.py --steps 30 --resolution 512 --no-resume-check
    python benchmarks/gpu_check.py --sdxl-only      # only the SDXL cases (sdxl-random, 1024 px)

On a machine without CUDA it says so and exits 0 (nothing is run or written).

Every case trains the SD1.5-shaped random pipeline (`sd15-random`: SD1.5's architecture, random
weights, built offline by the package, so no download) on the sample subject at 512 px, batch 1
with prior preservation (1 instance + 1 class row per step, 2 cached class images), rank 4, for
30 steps, through the package's real `train()`, each in its own process (clean peak memory).
The cases are cumulative, as a T4 user would add them until the run fits:

    1. fp16 + 8-bit AdamW
    2. + gradient checkpointing
    3. + text encoder trained
    4. fp32 (no mixed precision), AdamW, nothing else: the reference

Recorded per case: seconds per step (mean after 5 warm-up steps), the peak of
`torch.cuda.max_memory_allocated()` over the training steps (reset after step 1, so class-image
generation and loading do not count) and over the whole process, the memory model's prediction
(`dreambooth_lab.memory.estimate`) and measured / predicted. Then the kill-and-resume check
(fp16, AdamW): one run killed (SIGKILL, as a Colab disconnect) after its step-10 checkpoint and
resumed, against an uninterrupted run of the same config; a second uninterrupted run gives the
run-to-run noise on this GPU (kernels need not be deterministic). The LoRA tensors are compared.

Then the SDXL cases, on `sdxl-random` (SDXL base 1.0's architecture with random weights, built
offline by the package on first use: ~7 GB on disk) on top of configs/colab_t4_sdxl.yaml (fp16,
gradient checkpointing, 8-bit AdamW, both text encoders' outputs and the latents cached, SDXL's VAE
in fp32 for the one-time encoding) at its 1024 px, 12 steps (3 warm-up): the preset; + both text
encoders trained; the preset without gradient checkpointing (predicted not to fit a T4: on a
larger GPU it measures how far off). Each records the same figures, plus the memory model's
set-up-phase prediction against the whole process's peak (class images at 1024 px and the caches
are where SDXL's set-up peaks).

Results go to benchmarks/gpu.json and a "## GPU check" section of BENCHMARKS.md (replaced when
the script runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_JSON = ROOT / "benchmarks" / "gpu.json"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "## GPU check"
WARMUP = 5
RESUME_KILL_AFTER = 10  # the resumed run is killed once its checkpoint of this step is complete

FP16_8BIT = {"train.mixed_precision": "fp16", "optim.optimizer": "adamw8bit"}
CASES = [
    ("fp16 + 8-bit AdamW", FP16_8BIT),
    ("+ gradient checkpointing", {**FP16_8BIT, "train.gradient_checkpointing": True}),
    ("+ text encoder trained", {**FP16_8BIT, "train.gradient_checkpointing": True, "train.train_text_encoder": True}),
    ("fp32, AdamW", {"train.mixed_precision": "no", "optim.optimizer": "adamw"}),
]
RESUME_CASE = {"train.mixed_precision": "fp16", "optim.optimizer": "adamw"}

# SDXL (`sdxl-random`: SDXL base 1.0's architecture, random weights) on top of configs/colab_t4_sdxl.yaml
# (fp16, gradient checkpointing, 8-bit AdamW, latents and both text encoders' outputs cached, VAE and
# text encoders offloaded after caching), at the preset's 1024 px unless --sdxl-resolution says otherwise.
SDXL_PRESET = ROOT / "configs" / "colab_t4_sdxl.yaml"
SDXL_STEPS = 12  # SDXL steps are slow: fewer steps, fewer warm-up steps
SDXL_WARMUP = 3
SDXL_CASES = [
    ("SDXL: the colab_t4_sdxl preset", {}),
    ("SDXL: preset + both text encoders trained", {"train.train_text_encoder": True}),
    ("SDXL: preset without gradient checkpointing", {"train.gradient_checkpointing": False}),
]


def case_overrides(extra: dict, *, steps: int, resolution: int, out: str, cache: str,
                   checkpoint_every: int = 10_000) -> dict:
    """The dotted overrides of one case (pure)."""
    return {"model.name": "sd15-random", "data.instance_dir": str(ROOT / "datasets" / "sample_subject"),
            "data.resolution": resolution, "train.steps": steps, "train.batch_size": 1,
            "train.checkpoint_every": checkpoint_every, "train.output_dir": out, "lora.rank": 4,
            "prior.enabled": True, "prior.num_class_images": 2, "prior.steps": 2, "prior.cache_dir": cache,
            **extra}


def sdxl_case_overrides(extra: dict, *, steps: int, resolution: int | None, out: str, cache: str) -> dict:
    """The dotted overrides of one SDXL case, on top of the SDXL preset (pure)."""
    over = case_overrides(extra, steps=steps, resolution=resolution, out=out, cache=cache)
    over["model.name"] = "sdxl-random"
    del over["lora.rank"]  # the preset's
    if resolution is None:
        del over["data.resolution"]  # the preset's
    return {"preset": str(SDXL_PRESET), **over}


def make_config(overrides: dict):
    from dreambooth_lab.config import Config, load, with_overrides

    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    return with_overrides(load(preset) if preset else Config(), overrides).validate()


# ---- children: one training each -----------------------------------------------------------------

def child_case(overrides: dict) -> dict:
    """In a child process: train one case; step times, peak memory (steps only and whole) and the prediction."""
    import torch

    from dreambooth_lab.memory import estimate
    from dreambooth_lab.runs import read_metrics
    from dreambooth_lab.train import train

    warmup = overrides.pop("warmup", WARMUP)
    cfg = make_config(overrides)
    torch.cuda.reset_peak_memory_stats()
    before_steps = {"peak": 0}

    def after_step(record: dict) -> None:  # loading and class images are not the training's memory
        if record["step"] == 1:
            torch.cuda.synchronize()
            before_steps["peak"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    result = train(cfg, resume=None, progress=False, on_step=after_step)
    torch.cuda.synchronize()
    steps_peak = torch.cuda.max_memory_allocated()
    times = [r["step_seconds"] for r in read_metrics(result.run_dir)][warmup:]
    predicted = estimate(cfg, "cuda")
    return {"step_seconds": sum(times) / len(times), "timed_steps": len(times),
            "peak_bytes": steps_peak, "peak_bytes_whole": max(before_steps["peak"], steps_peak),
            "predicted_bytes": predicted.total, "predicted_peak_bytes": predicted.peak,
            "predicted_gib": predicted.as_gib(), "model": cfg.model.name, "resolution": cfg.resolution,
            "final_loss": result.final_loss, "run_dir": str(result.run_dir)}


def child_train(overrides: dict) -> dict:
    """In a child process: train (resuming whatever unfinished run of this config there is)."""
    from dreambooth_lab.train import train

    result = train(make_config(overrides), resume="auto", progress=False)
    return {"run_dir": str(result.run_dir), "resumed_from": result.resumed_from}


def run_cases(named, overrides_of, describe, timeout: float = 1800) -> list[dict]:
    """Each (name, extra) case in its own child process; one printed line per case."""
    out = []
    for i, (name, extra) in enumerate(named):
        result = run_child("case", overrides_of(i, extra), timeout=timeout)
        out.append({"name": name, "overrides": extra, **result})
        print(f"  {name}: " + (f"failed: {result['error']}" if "error" in result else describe(result)))
    return out


def run_child(kind: str, overrides: dict, timeout: float = 1800) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--overrides", json.dumps(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
                "stderr_tail": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the kill-and-resume check ---------------------------------------------------------------------

def lora_difference(a: Path, b: Path) -> dict:
    """How two LoRA files differ: same keys?, largest absolute difference, bitwise equal?"""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return {"same_keys": False, "identical": False, "max_abs_diff": None}
    diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    return {"same_keys": True, "identical": all(ta[k].equal(tb[k]) for k in ta), "max_abs_diff": diff}


def resume_check(base: Path, steps: int, resolution: int, cache: str) -> dict:
    """Kill a run after a checkpoint, resume it, and compare it with uninterrupted runs."""
    from dreambooth_lab.checkpoint import list_checkpoints

    over = {key: case_overrides(RESUME_CASE, steps=steps, resolution=resolution, out=str(base / key), cache=cache,
                                checkpoint_every=RESUME_KILL_AFTER) for key in ("straight", "again", "killed")}
    straight, again = run_child("train", over["straight"]), run_child("train", over["again"])
    if "error" in straight or "error" in again:
        return {"error": straight.get("error") or again.get("error")}

    cmd = [sys.executable, __file__, "--child", "train", "--overrides", json.dumps(over["killed"])]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 1800
        while time.time() < deadline and proc.poll() is None:
            done = [c for run in (base / "killed").glob("*/") for c in list_checkpoints(run)]
            if done and int(done[-1].name.split("-")[-1]) >= RESUME_KILL_AFTER:
                os.killpg(proc.pid, signal.SIGKILL)  # as a Colab disconnect would
                killed_at = int(done[-1].name.split("-")[-1])
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if killed_at is None:
        return {"error": "the run finished (or failed) before its checkpoint could be killed"}
    resumed = run_child("train", over["killed"])
    if "error" in resumed:
        return {"error": resumed["error"], "killed_after_step": killed_at}
    lora = "pytorch_lora_weights.safetensors"
    vs_straight = lora_difference(Path(straight["run_dir"]) / lora, Path(resumed["run_dir"]) / lora)
    noise = lora_difference(Path(straight["run_dir"]) / lora, Path(again["run_dir"]) / lora)
    return {"killed_after_step": killed_at, "resumed_from": resumed["resumed_from"], "steps": steps,
            "resumed_vs_uninterrupted": vs_straight, "uninterrupted_vs_uninterrupted": noise,
            "verdict": verdict(vs_straight, noise)}


def verdict(resumed: dict, noise: dict) -> str:
    """In words: is the resumed LoRA the uninterrupted one (pure)."""
    if not resumed.get("same_keys"):
        return "DIFFERENT: the resumed LoRA has other tensors than the uninterrupted one"
    if resumed["identical"]:
        return "exact: the resumed LoRA is bitwise identical to the uninterrupted one"
    if noise.get("same_keys") and resumed["max_abs_diff"] <= max(noise["max_abs_diff"] or 0.0, 0.0) * 1.5:
        return (f"within this GPU's run-to-run noise (max |diff| {resumed['max_abs_diff']:.2e}, two uninterrupted "
                f"runs differ by {noise['max_abs_diff']:.2e}): nondeterministic kernels, not the resume")
    return (f"DIFFERENT: max |diff| {resumed['max_abs_diff']:.2e}, beyond the run-to-run noise "
            f"({(noise.get('max_abs_diff') or 0.0):.2e})")


# ---- the report ------------------------------------------------------------------------------------

def machine() -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bnb, "date": time.strftime("%Y-%m-%d")}


def to_markdown(data: dict) -> str:
    """The BENCHMARKS.md section for one run of the check (pure)."""
    m, a = data["machine"], data["settings"]
    lines = [f"{SECTION} ({m['date']}, {m['gpu']})", "",
             f"`benchmarks/gpu_check.py`: {m['gpu']} ({m['gpu_memory_gib']} GiB, compute {m['capability']}), torch "
             f"{m['torch']} (CUDA {m['cuda']}), diffusers {m['diffusers']}, transformers {m['transformers']}, peft "
             f"{m['peft']}, bitsandbytes {m['bitsandbytes'] or 'not installed'}. `sd15-random` at {a['resolution']} px, "
             f"{a['steps']} steps (s/step after {WARMUP} warm-up steps), batch 1 + 1 class row, rank 4. Peak = "
             "`torch.cuda.max_memory_allocated()` over the training steps (loading and class images excluded); "
             "predicted = `dreambooth_lab.memory.estimate`.", "",
             "| configuration | s/step | peak GiB | peak GiB, whole process | predicted GiB | measured / predicted "
             "| fits a 15 GB T4? |", "|---|---|---|---|---|---|---|"]
    for case in data["cases"]:
        if "error" in case:
            lines.append(f"| {case['name']} | failed: {case['error'][:120]} | | | | | |")
            continue
        peak, whole = case["peak_bytes"] / 2**30, case["peak_bytes_whole"] / 2**30
        pred = case["predicted_bytes"] / 2**30
        fits = "yes" if whole < 15.0 * 0.9 else ("tight" if whole < 15.0 else "no")
        lines.append(f"| {case['name']} | {case['step_seconds']:.3f} | {peak:.2f} | {whole:.2f} | {pred:.2f} | "
                     f"{peak / pred:.2f} | {fits} |")
    if data.get("sdxl_cases"):
        lines += ["", f"SDXL (`sdxl-random`: SDXL base 1.0's architecture, random weights) on top of "
                  f"`configs/colab_t4_sdxl.yaml`, {data['settings'].get('sdxl_steps', SDXL_STEPS)} steps (s/step after "
                  f"{SDXL_WARMUP} warm-up steps). Whole process includes class images and the caches (SDXL's VAE "
                  "in fp32); predicted set-up = the memory model's set-up phase.", "",
                  "| configuration | px | s/step | peak GiB | peak GiB, whole process | predicted GiB | "
                  "predicted set-up GiB | measured / predicted | whole / predicted peak | fits a 15 GB T4? |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case in data["sdxl_cases"]:
            if "error" in case:
                lines.append(f"| {case['name']} | | failed: {case['error'][:120]} | | | | | | | |")
                continue
            peak, whole = case["peak_bytes"] / 2**30, case["peak_bytes_whole"] / 2**30
            pred, pred_peak = case["predicted_bytes"] / 2**30, case["predicted_peak_bytes"] / 2**30
            setup = case["predicted_gib"]["setup"]
            fits = "yes" if whole < 15.0 * 0.9 else ("tight" if whole < 15.0 else "no")
            lines.append(f"| {case['name']} | {case['resolution']} | {case['step_seconds']:.3f} | {peak:.2f} | "
                         f"{whole:.2f} | {pred:.2f} | {setup:.2f} | {peak / pred:.2f} | {whole / pred_peak:.2f} | "
                         f"{fits} |")
    r = data.get("resume")
    if r:
        lines.append("")
        if "error" in r:
            lines.append(f"Kill-and-resume (fp16): not completed: {r['error']}")
        else:
            lines.append(f"Kill-and-resume (fp16, AdamW, {r['steps']} steps): killed (SIGKILL) after the step "
                         f"{r['killed_after_step']} checkpoint, resumed from step {r['resumed_from']}: "
                         f"**{r['verdict']}**.")
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """BENCHMARKS.md with its GPU check section replaced by `section` (appended when absent) (pure)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION)), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--no-resume-check", action="store_true")
    p.add_argument("--sdxl-steps", type=int, default=SDXL_STEPS)
    p.add_argument("--sdxl-resolution", type=int, default=None, help="default: the SDXL preset's (1024)")
    p.add_argument("--no-sdxl", action="store_true", help="skip the SDXL cases")
    p.add_argument("--sdxl-only", action="store_true", help="only the SDXL cases (no SD1.5 cases, no resume check)")
    p.add_argument("--child", choices=["case", "train"], help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = child_case if args.child == "case" else child_train
        print(json.dumps(fn(json.loads(args.overrides))))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}): the GPU check needs one, so nothing was run "
              f"and {GPU_JSON.name} / BENCHMARKS.md are unchanged. Run it on a GPU machine: "
              "python benchmarks/gpu_check.py")
        return 0

    sd15_cases = [] if args.sdxl_only else CASES
    print(f"GPU check on {torch.cuda.get_device_name(0)}: building/loading sd15-random, {len(sd15_cases)} cases x "
          f"{args.steps} steps at {args.resolution} px"
          + ("" if args.no_resume_check or args.sdxl_only else ", then kill-and-resume")
          + ("" if args.no_sdxl else f"; sdxl-random, {len(SDXL_CASES)} cases x {args.sdxl_steps} steps"))
    base = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = str(base / "class_images")
    cases = run_cases(sd15_cases, lambda i, extra: case_overrides(
        extra, steps=args.steps, resolution=args.resolution, out=str(base / f"case{i}"), cache=cache),
        lambda r: f"{r['step_seconds']:.3f} s/step, peak {r['peak_bytes'] / 2**30:.2f} GiB, predicted "
                  f"{r['predicted_bytes'] / 2**30:.2f} GiB (ratio {r['peak_bytes'] / r['predicted_bytes']:.2f})")
    resume = None if args.no_resume_check or args.sdxl_only else resume_check(base, args.steps, args.resolution,
                                                                               cache)
    if resume:
        print(f"  kill-and-resume: {resume.get('verdict') or resume.get('error')}")
    sdxl_cases = run_cases([] if args.no_sdxl else SDXL_CASES, lambda i, extra: {**sdxl_case_overrides(
        extra, steps=args.sdxl_steps, resolution=args.sdxl_resolution, out=str(base / f"sdxl{i}"), cache=cache),
        "warmup": SDXL_WARMUP},
        lambda r: f"{r['step_seconds']:.3f} s/step, peak {r['peak_bytes'] / 2**30:.2f} GiB (whole "
                  f"{r['peak_bytes_whole'] / 2**30:.2f}), predicted {r['predicted_bytes'] / 2**30:.2f} GiB "
                  f"(set-up {r['predicted_gib']['setup']:.2f})", timeout=3600)
    data = {"machine": machine(), "settings": {"steps": args.steps, "resolution": args.resolution,
                                               "warmup_steps": WARMUP, "sdxl_steps": args.sdxl_steps,
                                               "sdxl_resolution": args.sdxl_resolution},
            "cases": cases, "sdxl_cases": sdxl_cases, "resume": resume}
    GPU_JSON.write_text(json.dumps(data, indent=2) + "\n")
    BENCHMARKS_MD.write_text(replace_section(BENCHMARKS_MD.read_text(), to_markdown(data)))
    print(f"wrote {GPU_JSON} and the '{SECTION}' section of {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
