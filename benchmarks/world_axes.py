"""Beyond the paper's recipe, measured in the toy world: one table per experiment axis.

    python benchmarks/world_axes.py              # 5- and 18-photo dog, 8 seeds per prompt
    python benchmarks/world_axes.py --photos 5   # one subject size only

Every row is one DreamBooth run through the package's own train() on the committed `toyworld`
model, with the world's recipe (study.world_recipe_config: the study's settings where DreamBooth
visibly binds in the world) and one axis changed; the first row of every table is the same default
run. Columns are the judge's readings at the recipe's LoRA scale (1.0):
subject fidelity ("a sks dog" shows the subject's traits), prompt fidelity (the four test
prompts' asked context/outfit/style/car present), subject + prompt (both at once), drift (the
subject's traits in plain "a dog") and class diversity, plus the run's wall time.

Writes benchmarks/world_axes.json and the "Toy world: experiment axes" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK_START, MARK_END = "<!-- world-axes:start -->", "<!-- world-axes:end -->"

# axis -> {row label: config overrides}; the default run is every table's first row
AXES: dict[str, dict[str, dict]] = {
    "identifier": {
        "learned <sks>, init class word": {"identifier.learned": True, "identifier.init": "class"},
        "learned <sks>, init random": {"identifier.learned": True, "identifier.init": "random"},
    },
    "prior": {
        "base model's prediction": {"prior.target": "base_model"},
        "none": {"prior.enabled": False},
    },
    "loss": {
        "min-SNR-5": {"loss.min_snr_gamma": 5.0},
        "huber (c 0.1)": {"loss.kind": "huber"},
        "noise offset 0.05": {"loss.noise_offset": 0.05},
    },
    "adapter": {
        "LoRA dropout 0.1": {"lora.dropout": 0.1},
        "DoRA": {"lora.use_dora": True},
        "LoCon (conv layers too)": {"lora.conv": True},
    },
    "buckets": {
        "landscape photos, buckets": {"data.buckets": True, "_landscape": True},
        "landscape photos, centre crop": {"_landscape": True},
    },
}
DEFAULT_LABEL = {"identifier": "rare token sks", "prior": "class images (the paper's)", "loss": "mse (the paper's)",
                 "adapter": "LoRA rank 4", "buckets": "square photos (default)"}


def landscape_dir(subject: str, photos: int, root: Path) -> Path:
    """The subject's photos cut to 64x48 (the sky row band removed): a folder of non-square photos."""
    from dreambooth_lab.world.subjects import subject_photos

    folder = root / f"{subject}-{photos}-landscape"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i, im in enumerate(subject_photos(subject, photos)):
            im.crop((0, 16, 64, 64)).save(folder / f"{subject}_{i:02d}.png")
    return folder


def mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def run_row(pipe, subject: str, photos: int, overrides: dict, seeds, work: Path, log) -> dict:
    from dreambooth_lab.train import train
    from dreambooth_lab.world.study import WORLD_RECIPE_SCALE, read_run, summarise, world_recipe_config

    overrides = dict(overrides)
    landscape = overrides.pop("_landscape", False)
    prior = overrides.pop("prior.enabled", True)
    cfg = world_recipe_config(subject, photos, output_dir=work / "runs", prior=prior, overrides=overrides or None)
    if landscape:
        cfg.data.instance_dir = str(landscape_dir(subject, photos, work))
    t0 = time.time()
    res = train(cfg, resume=None, progress=False)
    secs = time.time() - t0
    numbers = summarise(read_run(pipe, res.run_dir, cfg, seeds, scale=WORLD_RECIPE_SCALE), cfg)
    row = {"seconds": round(secs, 1), "final_loss": res.final_loss,
           "subject": numbers["subject_rate"],
           "prompt": mean(numbers["test_prompts_asked"].values()),
           "subject_and_prompt": mean(numbers["test_prompts_subject_and_asked"].values()),
           "drift": numbers["drift_subject_rate_in_class_prompt"],
           "class_diversity": numbers["class_diversity"], "detail": numbers}
    log(f"  {subject}{photos} {overrides or 'default'}{' landscape' if landscape else ''}: {secs:.0f} s, "
        f"subject {row['subject']:.2f}, prompt {row['prompt']:.2f}, both {row['subject_and_prompt']:.2f}, "
        f"drift {row['drift']:.2f}")
    return row


def markdown(result: dict) -> str:
    out = [MARK_START, "## Toy world: experiment axes (beyond the paper's recipe)", "",
           f"`python benchmarks/world_axes.py` on the committed `toyworld` model ({result['machine']}); "
           f"{result['seeds']} seeds per prompt, LoRA scale 1.0, guidance 6.4, the world's recipe "
           f"(`world.study.world_recipe_config`: rank 4, lr 5e-3 / 1e-3, LoCon, text encoder trained, "
           f"{result['steps']} steps, prior preservation) with one "
           f"setting changed per row; total {result['total_seconds'] / 60:.1f} min. Subject = the judge finds the "
           "subject's traits in \"a sks dog\"; prompt = the four test prompts' asked attribute is present; both = "
           "traits and attribute in one picture; drift = traits in plain \"a dog\"; div. = class-prompt diversity.",
           ""]
    for axis, rows in result["axes"].items():
        out += [f"**{axis}**", "", "| setting | photos | subject | prompt | both | drift | div. | s |",
                "|---|---|---|---|---|---|---|---|"]
        for label, by_photos in rows.items():
            for photos, r in by_photos.items():
                out.append(f"| {label} | {photos} | {r['subject']:.2f} | {r['prompt']:.2f} | "
                           f"{r['subject_and_prompt']:.2f} | {r['drift']:.2f} | {r['class_diversity']:.3f} | "
                           f"{r['seconds']:.0f} |")
        out.append("")
    out += [MARK_END, ""]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, nargs="+", default=[5, 18])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("WORLD_THREADS", "1")))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from dreambooth_lab.world.study import WORLD_RECIPE_STEPS, load_world_pipeline

    seeds = list(range(args.seeds))
    work = Path(tempfile.mkdtemp(prefix="world-axes-"))
    t_all = time.time()
    pipe = load_world_pipeline()
    default = {p: run_row(pipe, "dog", p, {}, seeds, work, print) for p in args.photos}
    axes = {}
    for axis in args.axes:
        print(f"{axis} ...", flush=True)
        rows = {DEFAULT_LABEL[axis]: {str(p): default[p] for p in args.photos}}
        for label, overrides in AXES[axis].items():
            rows[label] = {str(p): run_row(pipe, "dog", p, overrides, seeds, work, print) for p in args.photos}
        axes[axis] = rows
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                         f"{args.threads}", "seeds": len(seeds), "steps": WORLD_RECIPE_STEPS,
              "axes": axes, "total_seconds": round(time.time() - t_all, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world_axes.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    md = markdown(result)
    from benchmarks.world import update_benchmarks_md

    update_benchmarks_md(ROOT / "BENCHMARKS.md", md, MARK_START, MARK_END)
    print(md)


if __name__ == "__main__":
    main()
