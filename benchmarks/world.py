"""The reference study in the toy world, measured by the judge on the committed `toyworld` model.

    python benchmarks/world.py            # everything (CPU, 2 cores: see the wall times it reports)
    python benchmarks/world.py --quick    # 8 seeds, fewer runs, scales and tokens

Writes benchmarks/world.json, benchmarks/world.png (seed grids per row) and the "Toy world"
section of BENCHMARKS.md. Every DreamBooth run goes through the package's own train(); every
picture through sample.generate; every number is the judge's reading of those pictures.
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

MARK_START, MARK_END = "<!-- world:start -->", "<!-- world:end -->"
from dreambooth_lab.world.study import WORLD_RECIPE, WORLD_RECIPE_SCALE, WORLD_RECIPE_STEPS  # noqa: E402


def base_prompts():
    from dreambooth_lab.world.scene import ANIMATE, CLASSES

    out = []
    for c in CLASSES:
        out += [f"a {c}", f"a {c} in the forest", f"a {c} on the beach", f"a {c} in the style of van gogh"]
        if c in ANIMATE:
            out += [f"a {c} in red t-shirts", f"a {c} driving car"]
    return out


def measure_base(pipe, seeds) -> dict:
    from dreambooth_lab.world.study import read_prompt, sample_prompts

    t0 = time.time()
    images = sample_prompts(pipe, base_prompts(), seeds)
    rows = {p: read_prompt(p, ims).as_dict() for p, ims in images.items()}
    return {"prompts": rows, "seconds": round(time.time() - t0, 1), "_images": images}


def run_one(cfg, label: str, log) -> tuple:
    from dreambooth_lab.train import train

    t0 = time.time()
    res = train(cfg, resume=None, progress=False)
    secs = time.time() - t0
    log(f"  {label}: {cfg.train.steps} steps in {secs:.0f} s (final loss {res.final_loss:.4f})")
    return res, secs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--steps", type=int, default=None, help="DreamBooth steps (default: the world config's)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("WORLD_THREADS", "1")))
    ap.add_argument("--markdown-only", action="store_true", help="re-write world.md and BENCHMARKS.md from world.json")
    args = ap.parse_args(argv)
    if args.markdown_only:
        write_markdown(json.loads((args.out / "world.json").read_text()), args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from dreambooth_lab.world.study import (load_world_pipeline, read_run, run_config, summarise, world_config,
                                            world_recipe_config)
    from dreambooth_lab.world.subjects import subject_photos

    seeds = list(range(8 if args.quick else 16))
    work = Path(tempfile.mkdtemp(prefix="world-bench-"))
    lines: list[str] = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t_all = time.time()
    pipe = load_world_pipeline()
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"torch threads {args.threads}", "seeds": len(seeds), "runs": {}}
    log("base model ...")
    base = measure_base(pipe, seeds)
    grids = {"base": {p: base["_images"][p] for p in ("a dog", "a dog in the forest", "a dog in red t-shirts",
                                                       "a dog in the style of van gogh", "a dog driving car")}}
    result["base"] = {k: v for k, v in base.items() if k != "_images"}
    from dreambooth_lab.world.study import vae_ceiling

    result["vae_ceiling"] = {f"{s}{n}": vae_ceiling(pipe, s, n) for s, n in (("dog", 5), ("dog", 18), ("backpack", 5))}
    base_dog = read_run(pipe, None, world_config("dog", 5), seeds)
    result["base_sks"] = summarise(base_dog, world_config("dog", 5))

    kw = {} if args.steps is None else {"steps": args.steps}

    def dreambooth(name, subject, photos, token="sks", prior=True, te=False, scales=(0.4, 0.6), steps=None,
                   recipe=False, overrides=None):
        cfg = run_config(recipe, subject, photos, token, output_dir=work / "runs", prior=prior,
                         train_text_encoder=te, overrides=overrides, **({"steps": steps} if steps else kw))
        res, secs = run_one(cfg, name, log)
        entry = {"steps": cfg.train.steps, "seconds": round(secs, 1), "photos": photos, "token": token,
                 "prior": prior, "text_encoder": te, "recipe": recipe, "final_loss": res.final_loss, "scales": {}}
        readings = {}
        for s in scales:
            r = read_run(pipe, res.run_dir, cfg, seeds, scale=s)
            readings[s] = r
            entry["scales"][str(s)] = summarise(r, cfg)
        result["runs"][name] = entry
        return res, cfg, readings

    # 2. DreamBooth at the study's settings (5 and 18 photos, prior preservation; 3. without it)
    log("DreamBooth runs, the study's settings ...")
    dreambooth("dog5", "dog", 5)
    dreambooth("dog18", "dog", 18)
    dreambooth("dog5-noprior", "dog", 5, prior=False)
    if not args.quick:
        dreambooth("backpack5", "backpack", 5)
    # ... and with the world's recipe (study.WORLD_RECIPE: where the subject binds in the world)
    log("DreamBooth runs, the world's recipe ...")
    res5, cfg5, r5 = dreambooth("dog5-recipe", "dog", 5, te=True, scales=(0.6, 1.0), recipe=True)
    res18, cfg18, r18 = dreambooth("dog18-recipe", "dog", 18, te=True, scales=(1.0,), recipe=True)
    _, _, r5np = dreambooth("dog5-recipe-noprior", "dog", 5, te=True, prior=False, scales=(1.0,), recipe=True)
    if not args.quick:
        dreambooth("backpack5-recipe", "backpack", 5, te=True, scales=(1.0,), recipe=True)
    photos5 = subject_photos("dog", 5)
    grids["dreambooth, the world's recipe (dog5, scale 1.0)"] = {"training photos": photos5, **{
        p: ims for p, ims in r5[1.0]["images"].items()}}
    grids["the world's recipe (dog18, scale 1.0)"] = {p: ims for p, ims in r18[1.0]["images"].items()}
    grids["no prior preservation (dog5-recipe-noprior, scale 1.0)"] = {"a dog": r5np[1.0]["images"]["a dog"]}

    # 4a. LoRA scale sweep on the 18-photo recipe run
    log("LoRA scale sweep ...")
    sweep = {}
    for s in ([0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0] if not args.quick else [0.0, 0.6, 1.0]):
        r = read_run(pipe, res18.run_dir, cfg18, seeds, scale=s)
        sweep[str(s)] = summarise(r, cfg18)
    result["scale_sweep_dog18"] = sweep

    # 4b. steps: subject rate and memorisation (nearest training photo) as training goes on (recipe)
    from dreambooth_lab.world.study import nearest_training_distance

    log("steps ...")
    step_rows = {}
    for n in ([400, 800, WORLD_RECIPE_STEPS, 2 * WORLD_RECIPE_STEPS] if not args.quick else [400, WORLD_RECIPE_STEPS]):
        cfg = world_recipe_config("dog", 5, output_dir=work / "runs", steps=n)
        if n == cfg5.train.steps:  # the dog5-recipe run already is this row
            res, secs = res5, result["runs"]["dog5-recipe"]["seconds"]
        else:
            res, secs = run_one(cfg, f"steps-{n}", log)
        r = read_run(pipe, res.run_dir, cfg, seeds, scale=WORLD_RECIPE_SCALE)
        row = summarise(r, cfg)
        d = nearest_training_distance(r["images"]["a sks dog"], photos5)
        row.update(seconds=round(secs, 1), nearest_photo_distance_mean=float(sum(d) / len(d)),
                   memorised_fraction=float(sum(x < 0.05 for x in d) / len(d)))
        step_rows[str(n)] = row
    result["steps_dog5"] = step_rows

    # 4c/5. tokens x text encoder: the 8-run study with the world's recipe, timed
    log("tokens x text encoder ...")
    t8 = time.time()
    for token in ("sks", "hta", "oue", "http") if not args.quick else ("sks", "http"):
        for te in (False, True):
            name = f"token-{token}-{'te' if te else 'unet'}"
            if token == "sks" and te:  # dog5-recipe is this run
                result["runs"][name] = dict(result["runs"]["dog5-recipe"], scales={
                    "1.0": result["runs"]["dog5-recipe"]["scales"]["1.0"]})
                continue
            dreambooth(name, "dog", 5, token=token, te=te, scales=(1.0,), recipe=True)
    result["token_study_seconds"] = round(time.time() - t8 + result["runs"]["dog5-recipe"]["seconds"], 1)
    result["total_seconds"] = round(time.time() - t_all, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world.json").write_text(json.dumps(result, indent=1) + "\n")
    save_figure(grids, args.out / "world.png")
    print(write_markdown(result, args.out))


# ---- outputs -------------------------------------------------------------------------------------

def write_markdown(result: dict, out: Path) -> str:
    """<out>/world.md and the Toy world section of BENCHMARKS.md, from a result; returns the text."""
    md = markdown(result)
    (out / "world.md").write_text(md)
    update_benchmarks_md(ROOT / "BENCHMARKS.md", md)
    return md

def save_figure(grids: dict, path: Path) -> None:
    """Seed grids, one row per prompt, grouped by section."""
    from dreambooth_lab.world.sheets import seed_grid

    seed_grid({f"{sec}: {p}": ims for sec, d in grids.items() for p, ims in d.items()}, path)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(r: dict) -> str:
    out = [MARK_START, "## Toy world: the study's phenomena, measured by the judge", "",
           f"`python benchmarks/world.py` on the committed `toyworld` model ({r['machine']}); {r['seeds']} seeds "
           f"per prompt; total {r['total_seconds'] / 60:.1f} min. Rates are the judge's readings (fraction of "
           "images). Figure: `benchmarks/world.png`.", "",
           "**Base model** (targets: class ≥ 0.8, asked attribute ≥ 0.8)", "",
           "| prompt | class | asked | both | diversity |", "|---|---|---|---|---|"]
    for p, v in r["base"]["prompts"].items():
        out.append(f"| {p} | {_pct(v['class_rate'])} | {_pct(v['asked_rate'])} | {_pct(v['both_rate'])} | "
                   f"{v['diversity']:.3f} |")
    if "vae_ceiling" in r:
        out += ["", "VAE ceiling (the judge's subject rate on the subject's own photos after a VAE round trip; no "
                    "generation can score higher): " + ", ".join(f"{k} {v:.2f}" for k, v in r["vae_ceiling"].items())]
    b = r["base_sks"]
    out += ["", f"Base model on \"a sks dog\": subject-trait rate {b['subject_rate']:.2f} (the DreamBooth runs "
                "start from this).", "",
            "**DreamBooth runs** (subject-trait rate for \"a sks dog\", target ≥ 0.8; traits + asked attribute "
            "for the four test prompts, target ≥ 0.6; drift = subject traits in \"a dog\")", "",
            "| run | steps | s | scale | subject | t-shirt | van gogh | forest | driving | drift | class div. |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in r["runs"].items():
        for s, v in e["scales"].items():
            t = list(v["test_prompts_subject_and_asked"].values())
            out.append(f"| {name} | {e['steps']} | {e['seconds']:.0f} | {s} | {v['subject_rate']:.2f} | "
                       + " | ".join(f"{x:.2f}" for x in t)
                       + f" | {v['drift_subject_rate_in_class_prompt']:.2f} | {v['class_diversity']:.3f} |")
    out += ["", "Rows without -recipe: the study's settings scaled to the world (rank 4, lr 3e-4 / 1e-4, prior "
                "preservation, text encoder frozen). Rows with -recipe (and the token rows): the world's recipe "
                "(`world.study.WORLD_RECIPE`): " + ", ".join(f"`{k}: {v}`" for k, v in WORLD_RECIPE.items())
                + f", text encoder trained unless the row says unet, {WORLD_RECIPE_STEPS} steps, LoRA scale "
                f"{WORLD_RECIPE_SCALE}."]
    out += ["", "**LoRA scale sweep** (dog18-recipe): subject rate vs prompt fidelity", "",
            "| scale | subject | t-shirt asked | van gogh asked | forest asked | driving asked | traits + asked (mean) "
            "| drift |", "|---|---|---|---|---|---|---|---|"]
    for s, v in r["scale_sweep_dog18"].items():
        a = list(v["test_prompts_asked"].values())
        both = list(v["test_prompts_subject_and_asked"].values())
        out.append(f"| {s} | {v['subject_rate']:.2f} | " + " | ".join(_pct(x) for x in a)
                   + f" | {sum(both) / len(both):.2f} | {v['drift_subject_rate_in_class_prompt']:.2f} |")
    out += ["", "**Steps** (dog5, the world's recipe, scale 1.0): subject rate and memorisation (RMS distance of a generation to its "
                "nearest training photo, 16×16 thumbnails; < 0.05 counted as memorised)", "",
            "| steps | s | subject | forest (traits + asked) | nearest-photo distance | memorised |", "|---|---|---|---|---|---|"]
    for n, v in r["steps_dog5"].items():
        forest = [x for k, x in v["test_prompts_subject_and_asked"].items() if "forest" in k][0]
        out.append(f"| {n} | {v['seconds']:.0f} | {v['subject_rate']:.2f} | {forest:.2f} | "
                   f"{v['nearest_photo_distance_mean']:.3f} | {v['memorised_fraction']:.2f} |")
    out += ["", f"Token × text-encoder study (the world's recipe, text encoder trained or not): "
                f"{r['token_study_seconds'] / 60:.1f} min for its 8 runs (rows token-*; token-sks-te is dog5-recipe). `http` captions mean a lime cap in the world; its rate in \"a http dog\" "
                "samples is in world.json (http_rate_subject_prompt).", MARK_END, ""]
    return "\n".join(out)


def update_benchmarks_md(path: Path, section: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace the section between the markers `start` and `end` (or append it)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
