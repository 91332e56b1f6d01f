"""Beyond the paper's recipe, measured in the toy world: one table per experiment axis.

    python benchmarks/world_axes.py              # 5- and 18-photo dog, 8 seeds per prompt
    python benchmarks/world_axes.py --photos 5   # one subject size only
    # the two sizes on two cores, then one table:
    python benchmarks/world_axes.py --photos 5 --out /tmp/a5 & python benchmarks/world_axes.py --photos 18 --out /tmp/a18
    python benchmarks/world_axes.py --merge /tmp/a5/world_axes.json /tmp/a18/world_axes.json

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
        "attention/linear layers only (no LoCon)": {"lora.conv": False},
    },
    "buckets": {
        "landscape photos, buckets": {"data.buckets": True, "_landscape": True},
        "landscape photos, centre crop": {"_landscape": True},
    },
}
DEFAULT_LABEL = {"identifier": "rare token sks", "prior": "class images (the paper's)", "loss": "mse (the paper's)",
                 "adapter": "LoCon rank 4 (the recipe)", "buckets": "square photos (default)"}


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
    from dreambooth_lab.world.study import WORLD_RECIPE

    recipe = ", ".join(f"`{k}: {v}`" for k, v in WORLD_RECIPE.items())
    out = [MARK_START, "## Toy world: experiment axes (beyond the paper's recipe)", "",
           f"`python benchmarks/world_axes.py` on the committed `toyworld` model ({result['machine']}); "
           f"{result['seeds']} seeds per prompt, LoRA scale 1.0, guidance 6.4, the world's recipe "
           f"(`world.study.world_recipe_config`: rank 4, {recipe}, text encoder trained, "
           f"{result['steps']} steps, prior preservation) with one "
           f"setting changed per row; {result['total_seconds'] / 60:.1f} min of runs"
           f"{' (in ' + str(result['runs_in_parallel']) + ' processes side by side)' if result.get('runs_in_parallel') else ''}. "
           "Subject = the judge finds the subject's traits in \"a sks dog\"; prompt = the four test prompts' asked "
           "attribute is present; both = traits and attribute in one picture; drift = traits in plain \"a dog\"; "
           "div. = class-prompt diversity; s = the run's wall time on a shared machine (compare within a table). "
           "The first row of every table is the same run, the recipe itself.", ""]
    for axis in [a for a in AXES if a in result["axes"]] + [a for a in result["axes"] if a not in AXES]:
        rows = result["axes"][axis]
        order = [label for label in [DEFAULT_LABEL.get(axis), *AXES.get(axis, {})] if label in rows]
        order += [label for label in rows if label not in order]
        out += [f"**{axis}**", "", "| setting | photos | subject | prompt | both | drift | div. | s |",
                "|---|---|---|---|---|---|---|---|"]
        for label in order:
            for photos, r in sorted(rows[label].items(), key=lambda kv: int(kv[0])):
                out.append(f"| {label} | {photos} | {r['subject']:.2f} | {r['prompt']:.2f} | "
                           f"{r['subject_and_prompt']:.2f} | {r['drift']:.2f} | {r['class_diversity']:.3f} | "
                           f"{r['seconds']:.0f} |")
        out.append("")
    out += [MARK_END, ""]
    return "\n".join(out)


def merge(results: list[dict]) -> dict:
    """One result from runs over different photo counts (same seeds and steps): rows joined per axis."""
    out = {k: v for k, v in results[0].items() if k != "axes"}
    out["axes"] = {}
    for r in results:
        if (r["seeds"], r["steps"]) != (out["seeds"], out["steps"]):
            raise SystemExit("--merge: the results differ in seeds or steps; run them with the same settings")
        for axis, rows in r["axes"].items():
            for label, by_photos in rows.items():
                out["axes"].setdefault(axis, {}).setdefault(label, {}).update(by_photos)
    out["total_seconds"] = round(sum(r["total_seconds"] for r in results), 1)
    out["runs_in_parallel"] = len(results)
    return out


def write(result: dict, out: Path, markdown_file: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "world_axes.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    md = markdown(result)
    if markdown_file is not None:
        from benchmarks.world import update_benchmarks_md

        update_benchmarks_md(markdown_file, md, MARK_START, MARK_END)
    print(md)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, nargs="+", default=[5, 18])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("WORLD_THREADS", "1")))
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="join world_axes.json files (e.g. one per photo count) into --out and BENCHMARKS.md")
    args = ap.parse_args(argv)
    default_out = args.out == ROOT / "benchmarks"
    if args.merge:
        write(merge([json.loads(p.read_text()) for p in args.merge]), args.out, ROOT / "BENCHMARKS.md")
        return
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
    # a run into another folder (one half of a --merge) leaves BENCHMARKS.md alone
    write(result, args.out, ROOT / "BENCHMARKS.md" if default_out else None)


if __name__ == "__main__":
    main()
