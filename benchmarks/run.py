"""Training speed, class-image generation speed and memory: one command, one table.

    python benchmarks/run.py                 # the full set (CPU here: about 15 minutes)
    python benchmarks/run.py --quick         # tiny model only (a minute)
    python benchmarks/run.py --only sd512    # one group
    python benchmarks/run.py --startup       # start-up and finish, phase by phase, vs the reference's sequence
    python benchmarks/run.py --startup --before DIR   # ... and the package in DIR (the code before a change)

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


# Start-up: a short run of the SD1.5-shaped random model (model, px, steps). The project's train()
# (phases from summary.json's `timings`) against the diffusers reference's own sequence in
# train_dreambooth_lora.py, timed here with the same model, photos, resolution and steps.
STARTUP = ("sd15-random", 128, 2)


def startup_config(model, res, steps, out, extra=None):
    return case_config(model, res, steps, True, False, extra or {}, out)


def gc_clock() -> list:
    """Python's cyclic garbage collections from now on, as (start, seconds) pairs (perf_counter)."""
    import gc

    events, start = [], [0.0]

    def record(phase, _info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            events.append((start[0], time.perf_counter() - start[0]))

    gc.callbacks.append(record)
    return events


def gc_seconds(events: list, before: float) -> float:
    """Seconds of garbage collection that began before `before` (pure)."""
    return round(sum(sec for t, sec in events if t < before), 3)


def run_startup_project(args) -> dict:
    """In a child process: what a script that trains imports (`from dreambooth_lab.train import
    train`; the package imports diffusers' models, transformers, peft... when it needs them, so
    their time falls in the phases), then train() of the short run. The totals run from process
    start to the start of the first step (the first on_step call less that step's seconds), and
    from the end of the last step (its on_step call) to train()'s return: the same for any version
    of the package (`--before`: a checkout of the code before the cut, via --code). The phases are
    the run's own `timings` where the version records them."""
    if args.code:
        sys.path.insert(0, args.code)
    collections = gc_clock()
    t_imports = time.perf_counter()
    import dreambooth_lab
    from dreambooth_lab.train import train

    imports = time.perf_counter() - t_imports
    model, res, steps, extra = json.loads(args.case)
    cfg = startup_config(model, res, steps, args.out, extra)
    seen = []
    result = train(cfg, resume=None, progress=False, on_step=lambda rec: seen.append((time.perf_counter(), rec)))
    t_end = time.perf_counter()
    (t_first, first), (t_last, _) = seen[0], seen[-1]
    t = getattr(result, "timings", None) or {}
    return {"who": "project", "code": str(Path(dreambooth_lab.__file__).parent), "python": t_imports - args.t0,
            "imports": imports, "phases": t.get("phases", {}), "first_step": first["step_seconds"],
            "to_first_step": t_first - first["step_seconds"] - args.t0, "after_last_step": t_end - t_last,
            "gc_to_first_step": gc_seconds(collections, t_first - first["step_seconds"]),
            "eval_before": result.eval_loss_before, "eval_after": result.eval_loss_after}


def run_startup_reference(args) -> dict:
    """In a child process: what diffusers' examples/dreambooth/train_dreambooth_lora.py does between
    process start and its first step and after its last, on one process (no validation prompt, so
    no validation images): imports; Accelerator; tokenizer, text encoder, VAE, UNet and scheduler
    from_pretrained; frozen models moved and cast; LoRA added; the class folder counted; AdamW;
    the dataset (photos opened per item); schedule; prepare; trackers; then the steps (VAE encode and text
    encoder every step, prior preservation). After the last step: the LoRA saved with
    save_lora_weights, then its "final inference" block, which loads the whole pipeline again with
    from_pretrained and load_lora_weights (unconditionally; images only with a validation prompt)."""
    collections = gc_clock()
    t_imports = time.perf_counter()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from dreambooth_lab.models import pretrained_path
    from dreambooth_lab.prior import cache_folder

    imports = time.perf_counter() - t_imports
    model, res, steps, extra = json.loads(args.case)
    cfg = startup_config(model, res, steps, args.out, extra)
    path = pretrained_path(model)
    phases, clock = {}, [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 3)
        clock[0] = now

    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    torch.manual_seed(cfg.train.seed)
    lap("accelerator")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)
    unet.to(acc.device)
    vae.to(acc.device)
    text_encoder.to(acc.device)
    lap("model_load")
    unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lap("adapters")
    class_dir, _ = cache_folder(cfg)  # the reference counts the class folder; ours were made by the warm-up run
    class_paths = sorted(p for p in class_dir.iterdir() if p.suffix == ".png")[:cfg.prior.num_class_images]
    lap("class_images")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr_unet, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    instance_paths = sorted(p for p in Path(cfg.data.instance_dir).iterdir() if p.suffix.lower() in (".jpg", ".png"))

    def pixels(p):  # Resize(res) + CenterCrop(res) + ToTensor + Normalize([0.5], [0.5])
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = res / min(w, h)
        im = im.resize((max(res, round(w * s)), max(res, round(h * s))), Image.BILINEAR)
        left, top = (im.size[0] - res) // 2, (im.size[1] - res) // 2
        a = np.asarray(im.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(a).permute(2, 0, 1)

    def ids(prompt):
        return tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    inst_ids, class_ids = ids(cfg.fill(cfg.data.instance_prompt)), ids(cfg.fill(cfg.data.class_prompt))
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    acc.init_trackers("dreambooth-lora")
    lap("optimizer")
    to_first = time.perf_counter() - args.t0
    gc_to_first = gc_seconds(collections, time.perf_counter())
    step_times = []
    unet.train()
    for step in range(steps):
        t_step = time.perf_counter()
        with acc.accumulate(unet):
            batch = torch.stack([pixels(instance_paths[step % len(instance_paths)]),
                                 pixels(class_paths[step % len(class_paths)])]).to(acc.device)
            latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (2,), device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            states = text_encoder(torch.cat([inst_ids, class_ids]).to(acc.device))[0]
            pred = unet(noisy, timesteps, states).sample
            inst = F.mse_loss(pred[:1].float(), noise[:1].float())
            prior = F.mse_loss(pred[1:].float(), noise[1:].float())
            acc.backward(inst + cfg.prior.loss_weight * prior)
            acc.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        step_times.append(time.perf_counter() - t_step)
    clock[0] = time.perf_counter()
    out = Path(args.out) / "reference-lora"
    acc.wait_for_everyone()
    unet = acc.unwrap_model(unet).to(torch.float32)
    StableDiffusionPipeline.save_lora_weights(save_directory=out, safe_serialization=True,
                                              unet_lora_layers=convert_state_dict_to_diffusers(
                                                  get_peft_model_state_dict(unet)))
    lap("lora_file")
    pipeline = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32).to(acc.device)
    pipeline.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    lap("final_pipeline")
    acc.end_training()
    return {"who": "reference", "python": t_imports - args.t0, "imports": imports, "phases": phases,
            "first_step": step_times[0], "to_first_step": to_first, "gc_to_first_step": gc_to_first,
            "after_last_step": phases["lora_file"] + phases["final_pipeline"],
            "after_last_step_save_only": phases["lora_file"]}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_train_case(args) -> dict:
    """In a child process: one training run, its step times and peak memory."""
    import torch

    from dreambooth_lab.memory import estimate
    from dreambooth_lab.runs import read_metrics
    from dreambooth_lab.train import train

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


def child(kind: str, case, out: str, code: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--case", json.dumps(case), "--out", out,
           *(["--code", code] if code else []),
           "--t0", repr(time.perf_counter())]  # CLOCK_MONOTONIC: the same clock in the child
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


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def run_startup(args) -> None:
    """A warm-up run (fills the class-image cache and the page cache; not counted), then the
    project, the reference (and with --before the code before the cut) in turn, `repeats` times
    each; medians per phase. Writes benchmarks/startup.md and .json."""
    out = tempfile.mkdtemp(prefix="dreambooth-startup-")
    case = [args.model, args.resolution, args.steps, {}]
    child("startup-project", case, out)
    rows = {"project": [], "reference": []}
    if args.before:
        rows = {"before": [], **rows}
    for _ in range(args.repeats):
        for who in rows:
            kind = "startup-reference" if who == "reference" else "startup-project"
            row = child(kind, case, out, args.before if who == "before" else None)
            rows[who].append({**row, "who": who})
            print(json.dumps(rows[who][-1]), flush=True)
    info = machine()
    md = startup_markdown(info, args, rows)
    (ROOT / "benchmarks" / "startup.md").write_text(md)
    (ROOT / "benchmarks" / "startup.json").write_text(json.dumps({"machine": info, "case": case, "runs": rows},
                                                                 indent=2))
    print(md)


AFTER_LAST_STEP = ("eval_after", "last_checkpoint", "lora_file", "steps_sheet", "loss_plot", "final_pipeline")


def startup_markdown(info: dict, args, rows: dict) -> str:
    def med(who, get):
        vals = [get(r) for r in rows[who]]
        vals = [v for v in vals if v is not None]
        return median(vals) if vals else None

    def cell(v):
        return "" if v is None else f"{v:.2f}"

    whos = list(rows)
    phase_names = []
    for who in whos:
        for r in rows[who]:
            phase_names += [k for k in r["phases"] if k not in phase_names]
    lines = [f"Machine: {info['gpu'] or 'CPU'} ({info['cores']} cores), torch {info['torch']}, diffusers "
             f"{info['diffusers']}, {info['date']}. `{args.model}` at {args.resolution} px, {args.steps} steps, "
             f"median of {args.repeats} runs each, in turn (seconds). Phases: summary.json's `timings` (the "
             "code before the cut has none); totals: from process start to the first step, and from the end "
             "of the last step to train()'s return.", "",
             "| phase | " + " | ".join(whos) + " |", "|---" * (len(whos) + 1) + "|"]

    def row(label, get):
        lines.append(f"| {label} | " + " | ".join(cell(med(w, get)) for w in whos) + " |")

    for name in ["python", "imports"]:
        row(name, lambda r, name=name: r[name])
    for name in phase_names:
        row(name, lambda r, name=name: r["phases"].get(name))
    row("other before the first step (imports inside train(), bookkeeping)",
        lambda r: r["to_first_step"] - r["python"] - r["imports"] - sum(
            v for k, v in r["phases"].items() if k not in AFTER_LAST_STEP))
    row("first step", lambda r: r["first_step"])
    row("garbage collection before the first step (inside the rows above)", lambda r: r.get("gc_to_first_step"))
    ref = "reference"
    for key, label in (("to_first_step", "**to the first step**"), ("after_last_step", "**after the last step**")):
        r = med(ref, lambda x: x[key])
        lines.append(f"| {label} | " + " | ".join(
            cell(med(w, lambda x: x[key])) + ("" if w == ref else f" ({med(w, lambda x: x[key]) / r:.2f}x)")
            for w in whos) + " |")
    r = med(ref, lambda x: x.get("after_last_step_save_only"))
    lines.append("| after the last step, reference without its final pipeline load | " + " | ".join(
        cell(med(w, lambda x: x["after_last_step"])) if w != ref else cell(r) for w in whos) + " |")
    lines.append("")
    for w in whos:  # the runs were made in turn: the differences per pair show the spread
        for other in [o for o in whos if o != w and whos.index(o) > whos.index(w)]:
            for key in ("to_first_step", "after_last_step"):
                diffs = [a[key] - b[key] for a, b in zip(rows[w], rows[other])]
                lines.append(f"{w} − {other}, {key.replace('_', ' ')}, per pair (s): "
                             + ", ".join(f"{d:+.2f}" for d in diffs) + f" (median {median(diffs):+.2f})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--only", choices=sorted(TRAIN_CASES), help="one group of cases")
    ap.add_argument("--startup", action="store_true", help="start-up and finish phases vs the reference's sequence")
    ap.add_argument("--model", default=STARTUP[0], help="--startup: the model (default sd15-random)")
    ap.add_argument("--resolution", type=int, default=STARTUP[1], help="--startup: px (default 128)")
    ap.add_argument("--steps", type=int, default=STARTUP[2], help="--startup: steps (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="--startup: runs of each, alternating (median)")
    ap.add_argument("--before", default=None, help="--startup: also time this checkout of the package (a folder "
                    "holding dreambooth_lab/, e.g. `git archive HEAD dreambooth_lab | tar -x -C DIR`)")
    ap.add_argument("--code", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["train", "gen", "startup-project", "startup-reference"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run = {"train": run_train_case, "gen": run_gen_case, "startup-project": run_startup_project,
               "startup-reference": run_startup_reference}[args.child]
        print(json.dumps(run(args)))
        return
    if args.startup:
        run_startup(args)
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
