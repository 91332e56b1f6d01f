"""Beyond the paper's recipe, measured in the toy world: one table per experiment axis.

    python benchmarks/world_axes.py              # 5- and 18-photo dog, 8 seeds per prompt
    python benchmarks/world_axes.py --photos 5   # one subject size only
    # the two sizes on two cores, then one table:
    python benchmarks/world_axes.py --photos 5 --out /tmp/a5 & python benchmarks/world_axes.py --photos 18 --out /tmp/a18
    python benchmarks/world_axes.py --merge /tmp/a5/world_axes.json /tmp/a18/world_axes.json
    # a quick check of the code path (a few steps and seeds, one axis, two replicates; into /tmp):
    python benchmarks/world_axes.py --axes loss --photos 5 --replicates 2 --seeds 2 --steps 20 --out /tmp/ax

Every row is DreamBooth trained --replicates times (default 3; training seeds 42 and
experiments.replicate_seed(42, k), as a sweep's replicates) through the package's own train() on
the committed `toyworld` model, with the world's recipe (study.world_recipe_config: the study's
settings where DreamBooth visibly binds in the world) and one axis changed; the first row of every
table is the same default runs. Figures are the mean with its 95% t-interval over the replicates
(a run's rate over its sampling seeds is the unit), and under the tables every setting is compared
with the default by stats.compare: a difference is claimed only where its 95% interval excludes 0,
else "no difference shown". Columns are the judge's readings at the recipe's LoRA scale
(study.WORLD_RECIPE_SCALE): subject fidelity ("a sks dog" shows the subject's traits), prompt
fidelity (the four test prompts' asked context/outfit/style/car present), subject + prompt (both at
once), drift (the subject's traits in plain "a dog") and class diversity, plus the run's wall time.

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
    "identifier": {  # the recipe (build v4) learns <sks>'s embedding, started from sks's own
        "rare token sks (no learned identifier)": {"identifier.learned": False},
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
DEFAULT_LABEL = {"identifier": "learned <sks>, init sks (the recipe)", "prior": "class images (the paper's)",
                 "loss": "mse (the paper's)",
                 "adapter": "LoCon rank 4 (the recipe)", "buckets": "square photos (default)"}


def landscape_dir(source: str | Path, root: Path) -> Path:
    """The photos of folder `source` cut to 64x48 (the sky row band removed), their caption files
    beside them unchanged (the recipe trains on per-photo captions): a folder of non-square photos."""
    import shutil

    from PIL import Image

    source = Path(source)
    folder = root / f"{source.name}-landscape"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for photo in sorted(source.glob("*.png")):
            with Image.open(photo) as im:
                im.crop((0, 16, 64, 64)).save(folder / photo.name)
        for text in sorted(source.glob("*.txt")):
            shutil.copyfile(text, folder / text.name)
    return folder


def mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


COLUMNS = ("subject", "prompt", "subject_and_prompt", "drift", "class_diversity", "seconds")
VERDICT_METRICS = ("subject", "prompt", "subject_and_prompt", "drift", "class_diversity")  # the paper's PRES and DIV too


def run_row(pipe, subject: str, photos: int, overrides: dict, seeds, work: Path, log, replicates: int = 1,
            steps: int | None = None) -> dict:
    """One table row: the setting trained `replicates` times afresh, each run read by the judge at
    the recipe's scale; {runs: [per run], n, and per column the mean over the runs}."""
    from dreambooth_lab.world.replicates import replicate_configs, warm_class_images, world_measure
    from dreambooth_lab.world.study import WORLD_RECIPE_SCALE, world_recipe_config

    overrides = dict(overrides)
    landscape = overrides.pop("_landscape", False)
    prior = overrides.pop("prior.enabled", True)
    overrides.setdefault("prior.cache_dir", str(work / "class_cache"))  # the class images, made once
    cfg = world_recipe_config(subject, photos, output_dir=work / "runs", prior=prior, overrides=overrides,
                              **({"steps": steps} if steps else {}))
    if landscape:
        cfg.data.instance_dir = str(landscape_dir(cfg.data.instance_dir, work))
    warm_class_images(pipe, cfg)  # made once, untimed: a run's seconds are its training
    measure = world_measure(pipe, seeds, WORLD_RECIPE_SCALE, reuse_finished=False)
    runs = []
    for k, rcfg in enumerate(replicate_configs(cfg, replicates)):
        run = {"replicate": k, "training_seed": rcfg.train.seed,
               **{key: v for key, v in measure(rcfg).items() if key != "run_dir"}}
        runs.append(run)
        shown = {key: v for key, v in overrides.items() if key != "prior.cache_dir"}
        log(f"  {subject}{photos} {shown or 'default'}{' landscape' if landscape else ''}{' no prior' if not prior else ''}"
            f" r{k} (training seed {rcfg.train.seed}): {run['seconds']:.0f} s, subject {run['subject']:.2f}, "
            f"prompt {run['prompt']:.2f}, both {run['subject_and_prompt']:.2f}, drift {run['drift']:.2f}")
    return {**{c: mean(r[c] for r in runs) for c in (*COLUMNS, "final_loss")}, "n": len(runs), "runs": runs}


def _cell(row: dict, column: str, digits: int) -> str:
    """mean [95% interval] over the row's runs; the plain value for a single run (pure)."""
    from dreambooth_lab import stats
    from dreambooth_lab.world.replicates import cell

    runs = row.get("runs") or []
    if len(runs) < 2:
        return f"{row[column]:.{digits}f}"
    return cell(stats.describe([float(r[column]) for r in runs]), digits)


def axis_findings(axis: str, rows: dict, default: str) -> list[str]:
    """Per setting and photo count, the setting against the default (the recipe) on subject, prompt,
    both, drift and class diversity: world.replicates.findings (stats.compare; a difference only where its 95%
    interval excludes 0), settings in the table's order (pure)."""
    from dreambooth_lab.world.replicates import findings

    out = []
    for label in axis_order(axis, rows):
        if label == default:
            continue
        for photos, r in sorted(rows[label].items(), key=lambda kv: int(kv[0])):
            base = rows.get(default, {}).get(photos)
            if base is None or not r.get("runs") or not base.get("runs"):
                continue
            flat = [{"group": g, "status": "finished", **run} for g, row in ((label, r), (default, base))
                    for run in row["runs"]]
            out += [f"- {photos} photos: {line}" for line in findings(flat, [(label, default)], VERDICT_METRICS)]
    return out


def axis_order(axis: str, rows: dict) -> list[str]:
    """An axis's settings as its table lists them: the default, then AXES' order, then any other (pure)."""
    order = [label for label in [DEFAULT_LABEL.get(axis), *AXES.get(axis, {})] if label in rows]
    return order + [label for label in rows if label not in order]


def _load(result: dict) -> str:
    """'load average 2.1 at the start, 3.0 at the end' (each process's, when merged) (pure)."""
    loads = result.get("load_averages") or ([result["load_average"]] if result.get("load_average") else [])
    return "; ".join(f"load average {x['start'][0]:.1f} at the start, {x['end'][0]:.1f} at the end" for x in loads)


def markdown(result: dict) -> str:
    from dreambooth_lab.world.study import WORLD_RECIPE, WORLD_RECIPE_TEXT_ENCODER

    recipe = ", ".join(f"`{k}: {v}`" for k, v in WORLD_RECIPE.items())
    n = result.get("replicates", 1)
    reps = (f"each row {n} training runs (training seeds {', '.join(map(str, result['training_seeds']))}), "
            "figures the mean [95% t-interval] over them (a run's rate over its sampling seeds is the unit); "
            if n > 1 and result.get("training_seeds") else "one training run per row; ")
    wall = f", {result['wall_seconds'] / 60:.1f} min wall time" if result.get("wall_seconds") else ""
    out = [MARK_START, "## Toy world: experiment axes (beyond the paper's recipe)", "",
           f"`python benchmarks/world_axes.py` on the committed `toyworld` model ({result['machine']}); "
           f"{result['seeds']} seeds per prompt, LoRA scale {result.get('scale', 1.0)}, guidance 6.4, the world's recipe "
           f"(`world.study.world_recipe_config`: rank 4, {recipe}, text encoder "
           f"{'trained' if WORLD_RECIPE_TEXT_ENCODER else 'frozen'}, "
           f"{result['steps']} steps, prior preservation) with one "
           f"setting changed per row; {reps}{result['total_seconds'] / 60:.1f} min of runs"
           f"{' (in ' + str(result['runs_in_parallel']) + ' processes side by side' + wall + ')' if result.get('runs_in_parallel') else ''}"
           f"{' on a shared CPU (' + _load(result) + ')' if _load(result) else ''}. "
           "Subject = the judge finds the subject's traits in \"a sks dog\"; prompt = the four test prompts' asked "
           "attribute is present; both = traits and attribute in one picture; drift = traits in plain \"a dog\"; "
           "div. = class-prompt diversity; s = the run's wall time on a shared machine (compare within a table). "
           "The first row of every table is the same runs, the recipe itself.", ""]
    axes = [a for a in AXES if a in result["axes"]] + [a for a in result["axes"] if a not in AXES]
    for axis in axes:
        rows = result["axes"][axis]
        order = axis_order(axis, rows)
        out += [f"**{axis}**", "", "| setting | photos | subject | prompt | both | drift | div. | s |",
                "|---|---|---|---|---|---|---|---|"]
        for label in order:
            for photos, r in sorted(rows[label].items(), key=lambda kv: int(kv[0])):
                out.append(f"| {label} | {photos} | " + " | ".join(
                    _cell(r, c, {"class_diversity": 3, "seconds": 0}.get(c, 2)) for c in COLUMNS) + " |")
        out.append("")
    found = {axis: axis_findings(axis, result["axes"][axis], DEFAULT_LABEL.get(axis, next(iter(result["axes"][axis]))))
             for axis in axes}
    if any(found.values()):
        out += ["**What we found** (generated: each setting against the recipe, `stats.compare`'s difference of "
                "means with its Welch 95% interval over the replicates; a difference is claimed only where the "
                "interval excludes 0, else \"no difference shown\")", ""]
        for axis, lines in found.items():
            if lines:
                out += [f"*{axis}*", "", *lines, ""]
    out += [MARK_END, ""]
    return "\n".join(out)


def merge(results: list[dict]) -> dict:
    """One result from runs over different photo counts (same seeds and steps): rows joined per axis."""
    out = {k: v for k, v in results[0].items() if k != "axes"}
    out["axes"] = {}
    for r in results:
        if (r["seeds"], r["steps"], r.get("replicates", 1)) != (out["seeds"], out["steps"], out.get("replicates", 1)):
            raise SystemExit("--merge: the results differ in seeds, steps or replicates; run them with the same settings")
        if r.get("scale") != out.get("scale"):
            raise SystemExit(f"--merge: the results were read at LoRA scales {out.get('scale')} and {r.get('scale')}; "
                             "run them with the same recipe")
        for axis, rows in r["axes"].items():
            for label, by_photos in rows.items():
                out["axes"].setdefault(axis, {}).setdefault(label, {}).update(by_photos)
    out["total_seconds"] = round(sum(r["total_seconds"] for r in results), 1)
    out["wall_seconds"] = max(r["total_seconds"] for r in results)
    out["runs_in_parallel"] = len(results)
    out.pop("load_average", None)
    out["load_averages"] = [r["load_average"] for r in results if r.get("load_average")]
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
    ap.add_argument("--replicates", type=int, default=3,
                    help="training runs (distinct training seeds) per row (default 3): intervals and verdicts")
    ap.add_argument("--steps", type=int, default=None, help="DreamBooth steps (default: the recipe's; fewer for a "
                                                              "quick check of the code path)")
    ap.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("WORLD_THREADS", "1")))
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="join world_axes.json files (e.g. one per photo count) into --out and BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.replicates < 1:
        ap.error("--replicates: give a whole number >= 1")
    default_out = args.out == ROOT / "benchmarks"
    if args.merge:
        write(merge([json.loads(p.read_text()) for p in args.merge]), args.out, ROOT / "BENCHMARKS.md")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from dreambooth_lab.world.study import WORLD_RECIPE_SCALE, WORLD_RECIPE_STEPS, load_world_pipeline

    seeds = list(range(args.seeds))
    work = Path(tempfile.mkdtemp(prefix="world-axes-"))
    t_all = time.time()
    pipe = load_world_pipeline()
    def log(msg):
        print(msg, flush=True)

    def row(p, overrides):
        return run_row(pipe, "dog", p, overrides, seeds, work, log, replicates=args.replicates, steps=args.steps)

    load0 = os.getloadavg()
    default = {p: row(p, {}) for p in args.photos}
    axes = {}
    for axis in args.axes:
        print(f"{axis} ...", flush=True)
        rows = {DEFAULT_LABEL[axis]: {str(p): default[p] for p in args.photos}}
        for label, overrides in AXES[axis].items():
            rows[label] = {str(p): row(p, overrides) for p in args.photos}
        axes[axis] = rows
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                         f"{args.threads}", "seeds": len(seeds), "steps": args.steps or WORLD_RECIPE_STEPS,
              "scale": WORLD_RECIPE_SCALE, "replicates": args.replicates,
              "training_seeds": [r["training_seed"] for r in default[args.photos[0]]["runs"]],
              "load_average": {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]},
              "axes": axes, "total_seconds": round(time.time() - t_all, 1)}
    # a run into another folder (one half of a --merge) leaves BENCHMARKS.md alone
    write(result, args.out, ROOT / "BENCHMARKS.md" if default_out else None)


if __name__ == "__main__":
    main()
