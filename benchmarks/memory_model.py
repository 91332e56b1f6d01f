"""The memory model against the measurements, and the T4 (15 GB) estimate table.

    python benchmarks/memory_model.py            # reads benchmarks/latest.json, prints both tables
    python benchmarks/memory_model.py --sdxl     # the SDXL T4 table, calibrated by benchmarks/sdxl_memory.json
    python benchmarks/memory_model.py --measure-sdxl --write   # SDXL CPU measurements (~20 min, 1 thread,
                                                 # ~12 GB RAM), then the SDXL section of BENCHMARKS.md

SDXL: the measurements run SDXL's real UNet (2.6B parameters, random weights, fp32) for one training
step at 128-384 px and its VAE on one image at 512-1024 px on the CPU, each in its own process, and
compare the peak of tensor memory allocated at once (the CPU allocator's events, from PyTorch's
profiler: the CPU's torch.cuda.max_memory_allocated) and the peak RSS growth with the memory model;
the T4 table applies the worst measured/predicted ratio of each part (never below 1).

Predictions come from dreambooth_lab.memory (parameter counts from the SD1.5 configs, saved
activations counted on the meta device: no GPU and no real memory needed). On a CPU the
"measured" figure is the growth of the process's peak RSS during the run, which also holds the
VAE and text encoder (nothing is offloaded on a CPU) and allocator slack; on CUDA it is
torch.cuda.max_memory_allocated().
"""

from __future__ import annotations

import argparse
import json
import os
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
             f"activations (+ recomputed segment) | predicted GiB | × {factor:.2f} (measured ratio) | "
             "fits 15 GB T4? |",
             "|---|---|---|---|---|---|---|"]
    for name, over in T4_OPTIONS:
        g = estimate(with_overrides(base, over), "cuda").as_gib()
        worst = g["total"] * factor
        fits = "yes" if worst < T4_GIB * 0.85 else ("tight" if worst < T4_GIB else "no")
        lines.append(f"| {name} | {g['weights']:.2f} | {g['lora'] + g['gradients'] + g['optimizer']:.3f} | "
                     f"{g['activations'] + g['recompute']:.2f} | {g['total']:.2f} | {worst:.2f} | {fits} |")
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


# ---- SDXL: the T4 table, and the CPU measurements that calibrate it ---------------------------------

SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_PRESET = ROOT / "configs" / "colab_t4_sdxl.yaml"
SDXL_JSON = ROOT / "benchmarks" / "sdxl_memory.json"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SDXL_START, SDXL_END = "<!-- sdxl-memory:start -->", "<!-- sdxl-memory:end -->"
SDXL_RESOLUTIONS = (1024, 768, 512)
CKPT_8BIT = {"train.gradient_checkpointing": True, "optim.optimizer": "adamw8bit"}
# On top of the preset (configs/colab_t4_sdxl.yaml: fp16, checkpointing, 8-bit AdamW, caches on,
# text encoders frozen, prior preservation on, batch 1 + 1 class row).
SDXL_OPTIONS = [
    ("the preset: fp16, checkpointing, 8-bit AdamW, caches on", {}),
    ("fp16, AdamW, no checkpointing", {"train.gradient_checkpointing": False, "optim.optimizer": "adamw"}),
    ("preset + both text encoders trained", {"train.train_text_encoder": True}),
    ("preset, no prior preservation (batch 1, 1 row)", {"prior.enabled": False}),
    ("preset, caches off (VAE + both text encoders stay on the GPU)",
     {"train.cache_latents": False, "train.cache_text_embeddings": False}),
    ("fp32 (no mixed precision), checkpointing", {"train.mixed_precision": "no"}),
]
# CPU calibration cases: (kind, resolution, gradient checkpointing). "unet": one training step of
# SDXL's real UNet (2.6B, random weights, fp32, LoRA rank 4, AdamW), batch 1 + 1 class row;
# "encode"/"decode": one image through SDXL's VAE, no grad, fp32.
SDXL_CASES = [("unet", 128, False), ("unet", 256, False), ("unet", 256, True), ("unet", 384, True),
              ("encode", 512, False), ("encode", 1024, False), ("decode", 1024, False)]


def sdxl_config(overrides: dict | None = None, resolution: int | None = None):
    from dreambooth_lab.config import load, with_overrides

    over = dict(overrides or {})
    if resolution is not None:
        over["data.resolution"] = resolution
    return with_overrides(load(SDXL_PRESET), over)


def fits(gib: float) -> str:
    return "yes" if gib < T4_GIB * 0.85 else ("tight" if gib < T4_GIB else "no")


def sdxl_factors(data: dict | None, measure: str = "alloc") -> dict:
    """measured / predicted from the CPU runs, the worst case per part (1.0 where not measured):
    weights, a training step's memory beyond the weights, VAE transients. `measure`: "alloc" (peak
    tensor memory allocated, what torch.cuda.max_memory_allocated is on a GPU) or "rss" (peak RSS
    growth: glibc's heap slack included)."""
    out = {"weights": 1.0, "step": 1.0, "vae": 1.0}
    for case in (data or {}).get("cases", []):
        if "error" in case:
            continue
        if case["kind"] == "unet":
            out["weights"] = max(out["weights"], case["weights_ratio"])
            out["step"] = max(out["step"], case[f"{measure}_ratio"])
        else:
            out["vae"] = max(out["vae"], case[f"{measure}_ratio"])
    return out


def adjusted(est, f: dict) -> tuple[float, float]:
    """(training steps, set-up) in GiB with the measured ratios applied part by part."""
    train = (est.weights * f["weights"] + (est.total - est.weights) * f["step"]) / 2**30
    setup = (est.setup_weights * f["weights"] + est.setup_transient * f["vae"]) / 2**30
    return train, setup


def sdxl_table(factors: dict) -> str:
    """Predicted GiB per option and resolution on a T4 (CUDA: cached parts offloaded)."""
    from dreambooth_lab.memory import estimate

    head = " | ".join(f"{r} px" for r in SDXL_RESOLUTIONS)
    lines = [f"| SDXL base, batch 1 | {head} |", "|---" * (len(SDXL_RESOLUTIONS) + 1) + "|"]
    for name, over in SDXL_OPTIONS:
        cells = []
        for res in SDXL_RESOLUTIONS:
            est = estimate(sdxl_config(over, res), "cuda")
            train, setup = adjusted(est, factors)
            cells.append(f"{est.total / 2**30:.1f} / {est.setup / 2**30:.1f} → **{max(train, setup):.1f}** "
                         f"{fits(max(train, setup))}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sdxl_breakdown(factors: dict) -> str:
    """The preset's estimate, part by part."""
    from dreambooth_lab.config import load
    from dreambooth_lab.memory import estimate

    cfg = load(SDXL_PRESET)
    est = estimate(cfg, "cuda")
    g = est.as_gib()
    train, setup = adjusted(est, factors)
    return (f"| {cfg.resolution} px | {g['weights']:.2f} | {g['lora'] + g['gradients'] + g['optimizer']:.3f} | "
            f"{g['activations']:.2f} | {g['recompute']:.2f} | {g['total']:.2f} | {g['setup_weights']:.2f} | "
            f"{g['setup_transient']:.2f} | {g['setup']:.2f} | {train:.2f} / {setup:.2f} | "
            f"{fits(max(train, setup))} |")


def measurements_table(data: dict) -> str:
    lines = ["| case | px | checkpointing | s | predicted GiB | allocated GiB (peak) | allocated / predicted | "
             "RSS growth GiB | RSS / predicted |", "|---|---|---|---|---|---|---|---|---|"]
    label = {"unet": "UNet training step (beyond the weights)", "encode": "VAE encode, 1 image",
             "decode": "VAE decode, 1 image"}
    for c in data["cases"]:
        name, ck = label[c["kind"]], ("on" if c.get("checkpointing") else "off") if c["kind"] == "unet" else "–"
        if "error" in c:
            lines.append(f"| {name} | {c['resolution']} | {ck} | failed: {c['error'][:100]} | | | | | |")
            continue
        pred = c["step_pred_gib"] if c["kind"] == "unet" else c["predicted_gib"]
        lines.append(f"| {name} | {c['resolution']} | {ck} | {c['seconds']:.0f} | {pred:.3f} | {c['alloc_gib']:.3f} | "
                     f"**{c['alloc_ratio']:.2f}** | {c['rss_gib']:.3f} | {c['rss_ratio']:.2f} |")
    unets = [c for c in data["cases"] if c["kind"] == "unet" and "error" not in c]
    if unets:
        w = unets[0]
        saved = ", ".join(f"{c['resolution']} px{' ckpt' if c['checkpointing'] else ''}: {c['saved_gib']:.3f} vs "
                          f"{c['activations_pred_gib']:.3f}" for c in unets)
        lines += ["", f"UNet weights + LoRA in fp32: {w['weights_gib']:.3f} GiB measured (RSS growth while "
                  f"building) vs {w['weights_pred_gib']:.3f} predicted (× {w['weights_ratio']:.3f}). Tensors saved "
                  f"for backward, the same hook on the real CPU forward vs the meta-device count (GiB): {saved}."]
    return "\n".join(lines)


def sdxl_section(data: dict | None) -> str:
    """The SDXL part of BENCHMARKS.md (between its markers)."""
    from dreambooth_lab.config import load
    from dreambooth_lab.memory import estimate

    f, f_rss = sdxl_factors(data), sdxl_factors(data, "rss")
    m = (data or {}).get("machine", {})
    preset = estimate(load(SDXL_PRESET), "cuda")
    rss_train, rss_setup = adjusted(preset, f_rss)
    parts = [SDXL_START, "## SDXL on a T4 (15 GB): predicted by the memory model, calibrated on CPU", "",
             "`python benchmarks/memory_model.py --sdxl --write` writes this section (`--measure-sdxl` first "
             "reruns the CPU measurements: ~20 min at 1 thread, ~12 GB of RAM). SDXL base 1.0's architecture: "
             "UNet 2,567,463,684 parameters, text encoders 123,060,480 (CLIP ViT-L) + 694,659,840 (OpenCLIP "
             "bigG), VAE 83,653,863, counted from the published configs on the meta device. Settings start "
             "from `configs/colab_t4_sdxl.yaml`; CUDA, so cached parts are offloaded as the trainer does.", "",
             "Each cell: training-step estimate / set-up estimate (class images and caches: every component on "
             "the GPU plus one VAE decode or encode, SDXL's VAE in fp32 because it overflows in fp16) → **the "
             "larger, times the measured/predicted ratios below** (weights × "
             f"{f['weights']:.3f}, the rest of a training step × {f['step']:.2f}, VAE transients × {f['vae']:.2f}: "
             "the worst CPU case of each), in GiB, and whether that fits a 15 GB T4 (yes: under 85%, tight: under "
             "15, no). **Not measured on a GPU**: a CUDA run adds its context (~0.3–0.5 GB) and the caching "
             "allocator's fragmentation.", "",
             sdxl_table(f), "",
             "The preset, part by part (GiB, predicted; then with the ratios applied):", "",
             "| px | weights | LoRA+grads+8-bit state | activations | recompute (largest checkpointed segment) | "
             "training total | set-up weights | VAE transient | set-up total | × ratios: training / set-up | "
             "fits 15 GB T4? |", "|---|---|---|---|---|---|---|---|---|---|---|",
             sdxl_breakdown(f), "",
             f"With the RSS ratios instead (glibc's heap slack counted as if a GPU had it: steps × "
             f"{f_rss['step']:.2f}, VAE × {f_rss['vae']:.2f}) the preset would need {rss_train:.2f} GiB for the "
             f"training steps and {rss_setup:.2f} GiB for the set-up: \"{fits(max(rss_train, rss_setup))}\" by the "
             "same rule.", ""]
    if data:
        parts += [f"**CPU measurements** ({m.get('date', '?')}, {m.get('cpu', 'CPU')}, torch {m.get('torch', '?')}, "
                  "1 thread, `benchmarks/sdxl_memory.json`): SDXL's real UNet (random weights, fp32, LoRA rank 4 "
                  "on the attention projections, AdamW) for one step of batch 1 + 1 class row, and SDXL's VAE on "
                  "one image, each in its own process. Allocated = the peak of tensor memory allocated at once "
                  "during the step, from the CPU allocator's events (PyTorch's profiler): the CPU's "
                  "`torch.cuda.max_memory_allocated`, what the memory model predicts. RSS = growth of the "
                  "process's peak RSS (VmHWM, reset before the step), which adds the C heap's slack: glibc keeps "
                  "freed blocks (with checkpointing every segment's tensors are made and freed), so RSS grows with "
                  "all the tensors a step ever makes, not only those alive at once; that is why it is far above "
                  "the prediction with checkpointing. Predicted = `dreambooth_lab.memory` for the same settings "
                  "(fp32, CPU): activations + recomputed segment + LoRA gradients + AdamW state.", "",
                  measurements_table(data), ""]
    else:
        parts += ["No CPU measurements recorded yet (`--measure-sdxl`): the table uses ratio 1.", ""]
    parts.append(SDXL_END)
    return "\n".join(parts) + "\n"


def replace_sdxl_section(text: str, section: str) -> str:
    """BENCHMARKS.md with the SDXL section replaced (inserted before the toy world when absent) (pure)."""
    if SDXL_START in text and SDXL_END in text:
        start, end = text.index(SDXL_START), text.index(SDXL_END) + len(SDXL_END)
        return text[:start] + section.rstrip("\n") + text[end:]
    anchor = text.find("<!-- world:start -->")
    if anchor < 0:
        return text.rstrip("\n") + "\n\n" + section
    return text[:anchor] + section + "\n" + text[anchor:]


# ---- the CPU measurements (children) ------------------------------------------------------------------

def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peaks(fn) -> tuple[float, int, int, int]:
    """Run fn once: (seconds, peak allocated tensor bytes, peak RSS growth, RSS before it)."""
    _reset_peak()
    base = _status("VmRSS")
    t = time.time()
    allocated = _allocated_peak(fn)
    return time.time() - t, allocated, _status("VmHWM") - base, base


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def _allocated_peak(fn) -> int:
    """Peak bytes of tensor memory allocated at once while fn runs, beyond what was allocated before:
    the CPU allocator's events as the profiler records them (the CPU's torch.cuda.max_memory_allocated)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _filled(module):
    """A meta module made real on the CPU, every value zero: memory, not arithmetic, is measured
    (zeros also keep 70 transformer blocks of random weights from overflowing)."""
    import torch

    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.zero_()
    return module


def child_measure(kind: str, resolution: int, checkpointing: bool) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    import diffusers  # noqa: F401  (imported before the baselines)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from dreambooth_lab import memory
    from dreambooth_lab.config import Config, with_overrides

    torch.set_num_threads(1)
    cfg = with_overrides(Config(), {"model.name": "sdxl-random", "data.resolution": resolution,
                                    "train.gradient_checkpointing": checkpointing, "train.mixed_precision": "no",
                                    "lora.rank": 4, "optim.optimizer": "adamw"}).resolved()
    meta = memory._meta_models(cfg)
    if kind != "unet":
        predicted = memory.vae_peak(cfg, meta, decode=kind == "decode")
        base0 = _status("VmRSS")
        vae = _filled(meta.vae).float().eval()
        side = resolution
        x = (torch.zeros(1, 4, side // 8, side // 8) if kind == "decode" else torch.zeros(1, 3, side, side))
        def run():
            with torch.no_grad():
                vae.decode(x) if kind == "decode" else vae.encode(x).latent_dist.mean

        seconds, allocated, rss, base = _peaks(run)
        return {"seconds": seconds, "predicted_gib": predicted / 2**30, "alloc_gib": allocated / 2**30,
                "alloc_ratio": allocated / predicted, "rss_gib": rss / 2**30, "rss_ratio": rss / predicted,
                "vae_weights_gib": (base - base0) / 2**30}

    activations, recompute = memory.saved_activations(cfg, memory._meta_models(cfg))
    lora = sum(p.numel() for p in meta.unet.parameters() if p.requires_grad)
    weights_pred = memory.count_params(meta.unet) * 4  # base and LoRA, fp32
    step_pred = activations + recompute + lora * 4 + lora * 8  # gradients, AdamW state
    base0 = _status("VmRSS")
    unet = _filled(meta.unet)
    for p in unet.parameters():
        p.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    weights = _status("VmRSS") - base0
    rows, side = memory.training_rows(cfg), resolution // 8
    seen: dict[int, int] = {}
    pack = memory._saved_counter(memory._param_storages(unet), seen)  # the meta count's hook, on real tensors

    unet.train()

    def step():
        latents, noise = torch.randn(rows, 4, side, side), torch.randn(rows, 4, side, side)
        added = {"text_embeds": torch.randn(rows, 1280), "time_ids": torch.randn(rows, 6)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pred = unet(latents, torch.full((rows,), 500), torch.randn(rows, 77, 2048), added_cond_kwargs=added).sample
        F.mse_loss(pred, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, allocated, rss, _ = _peaks(step)
    return {"seconds": seconds, "weights_gib": weights / 2**30, "weights_pred_gib": weights_pred / 2**30,
            "weights_ratio": weights / weights_pred, "saved_gib": sum(seen.values()) / 2**30,
            "activations_pred_gib": activations / 2**30, "recompute_pred_gib": recompute / 2**30,
            "step_pred_gib": step_pred / 2**30, "alloc_gib": allocated / 2**30, "alloc_ratio": allocated / step_pred,
            "rss_gib": rss / 2**30, "rss_ratio": rss / step_pred}


def measure_sdxl() -> dict:
    import platform
    import subprocess
    import time

    import torch

    cases = []
    for kind, res, ck in SDXL_CASES:
        print(f"measuring {kind} at {res} px (checkpointing {'on' if ck else 'off'}) ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, res, ck])], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
        case = {"kind": kind, "resolution": res, "checkpointing": ck}
        if proc.returncode != 0:
            case["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        else:
            case.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in case.items()}, flush=True)
        cases.append(case)
    machine = {"cpu": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    return {"machine": machine, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sdxl", action="store_true", help="the SDXL T4 table (reads benchmarks/sdxl_memory.json)")
    p.add_argument("--measure-sdxl", action="store_true", help="rerun the SDXL CPU measurements first")
    p.add_argument("--write", action="store_true", help="write the SDXL section of BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_measure(*json.loads(args.child))))
        return 0
    if args.measure_sdxl:
        SDXL_JSON.write_text(json.dumps(measure_sdxl(), indent=2) + "\n")
        print(f"wrote {SDXL_JSON}")
    if args.sdxl or args.measure_sdxl or args.write:
        data = json.loads(SDXL_JSON.read_text()) if SDXL_JSON.is_file() else None
        section = sdxl_section(data)
        print(section)
        if args.write:
            BENCHMARKS_MD.write_text(replace_sdxl_section(BENCHMARKS_MD.read_text(), section))
            print(f"wrote the SDXL section of {BENCHMARKS_MD}")
        return 0
    latest = ROOT / "benchmarks" / "latest.json"
    factor = 1.0
    if latest.is_file():
        table, factor = against_measurements(latest)
        print(table, "\n")
    print(t4_table(factor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
