"""The reference study in the toy world, measured by the judge on the committed `toyworld` model.

    python benchmarks/world.py            # everything (CPU, 2 cores: see the wall times it reports)
    python benchmarks/world.py --quick    # 8 seeds, fewer runs, scales and tokens

    # the two halves side by side on two cores (how BENCHMARKS.md's figures were made, ~15 min):
    python benchmarks/world.py --no-robustness &
    python benchmarks/world.py --robustness-only --out /tmp/wb_rob; wait
    python benchmarks/world.py --merge-robustness /tmp/wb_rob/world.json
    cp /tmp/wb_rob/world_heldout_*.png benchmarks/

    # only the token x text-encoder study (8 settings x 3 replicates), into the existing world.json:
    python benchmarks/world.py --token-study-only [--replicates 3]

Writes benchmarks/world.json, benchmarks/world.png (seed grids per row) and the "Toy world"
section of BENCHMARKS.md (only when --out is benchmarks/: a run into another folder leaves it
alone). The token study trains every setting --replicates times (training seeds 42 and
experiments.replicate_seed(42, k)); its table shows mean and 95% interval over the replicates and
its "what we found" lines are stats.compare's verdicts (a difference only where the interval
excludes 0). Every DreamBooth run goes through the package's own train(); every
picture through sample.generate; every number is the judge's reading of those pictures.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK_START, MARK_END = "<!-- world:start -->", "<!-- world:end -->"
from dreambooth_lab.world.study import (WORLD_RECIPE, WORLD_RECIPE_SCALE, WORLD_RECIPE_STEPS,  # noqa: E402
                                        WORLD_RECIPE_TEXT_ENCODER)


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
    ap.add_argument("--no-robustness", action="store_true", help="skip the held-out robustness section")
    ap.add_argument("--merge-robustness", type=Path, default=None, metavar="WORLD_JSON",
                    help="copy the robustness section of another run's world.json into <out>/world.json, re-write "
                         "the Markdown and exit (two halves run side by side on two cores)")
    ap.add_argument("--robustness-only", action="store_true",
                    help="run only the held-out robustness section (and the base model), into world.json's other results")
    ap.add_argument("--replicates", type=int, default=3,
                    help="training runs (distinct training seeds) per setting of the token study (default 3)")
    ap.add_argument("--token-study-only", action="store_true",
                    help="run only the token x text-encoder study (with --replicates) into <out>/world.json's other "
                         "results and re-write the Markdown")
    args = ap.parse_args(argv)
    if args.replicates < 1:
        ap.error("--replicates: give a whole number >= 1")
    if args.markdown_only:
        write_markdown(json.loads((args.out / "world.json").read_text()), args.out)
        return
    if args.merge_robustness:
        result = json.loads((args.out / "world.json").read_text())
        other = json.loads(args.merge_robustness.read_text())
        result["robustness"] = other["robustness"]
        (args.out / "world.json").write_text(json.dumps(result, indent=1) + "\n")
        print(write_markdown(result, args.out))
        return
    if args.token_study_only and not (args.out / "world.json").is_file():
        raise SystemExit(f"--token-study-only: no {args.out / 'world.json'} to add the token study to; run the whole "
                         "benchmark first (python benchmarks/world.py), or give --out a folder holding a world.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from dreambooth_lab.world.study import (load_world_pipeline, read_run, run_config, summarise, world_config,
                                            world_recipe_config)
    from dreambooth_lab.world.subjects import subject_photos

    seeds = list(range(8 if args.quick else 16))
    work = Path(tempfile.mkdtemp(prefix="world-bench-"))
    atexit.register(shutil.rmtree, work, True)  # the runs are scratch: gone when the script ends, however it ends
    lines: list[str] = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t_all = time.time()
    pipe = load_world_pipeline()
    if args.token_study_only:
        path = args.out / "world.json"
        result = json.loads(path.read_text())
        log(f"tokens x text encoder, {args.replicates} replicates ...")
        ts = measure_token_study(pipe, work, seeds, args.replicates, log, quick=args.quick, steps=args.steps)
        set_token_study(result, ts)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(write_markdown(result, args.out))
        log(f"token study: {ts['runs']} runs in {ts['seconds'] / 60:.1f} min")
        return
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

    if not args.no_robustness:
        log("robustness on held-out draws, seeds and identifiers ...")
        t_r = time.time()
        robust = measure_robustness(pipe, work, log, quick=args.quick)
        robust["seconds"] = round(time.time() - t_r, 1)
        for subject, v in robust["subjects"].items():
            held = v.pop("_grids")
            save_figure({f"held out ({subject})": held}, args.out / f"world_heldout_{subject}.png")
        result["robustness"] = robust
    if args.robustness_only:
        old = json.loads((args.out / "world.json").read_text()) if (args.out / "world.json").is_file() else {}
        result = {**old, **{k: v for k, v in result.items() if k != "runs"}, "runs": old.get("runs", {}),
                  "robustness_total_seconds": round(time.time() - t_all, 1)}
        result.setdefault("total_seconds", result["robustness_total_seconds"])
        (args.out / "world.json").write_text(json.dumps(result, indent=1) + "\n")
        # one half of the documented two-core run: its Markdown waits for --merge-robustness
        print(write_markdown(result, args.out) if "base" in old else "\n".join(robustness_markdown(robust)))
        return

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
    rs = WORLD_RECIPE_SCALE  # recipe runs are read where the recipe is used (and dog5 at 0.6 and 1.0 beside it)
    res5, cfg5, r5 = dreambooth("dog5-recipe", "dog", 5, te=WORLD_RECIPE_TEXT_ENCODER,
                                scales=tuple(sorted({0.6, rs, 1.0})), recipe=True)
    res18, cfg18, r18 = dreambooth("dog18-recipe", "dog", 18, te=WORLD_RECIPE_TEXT_ENCODER, scales=(rs,), recipe=True)
    _, _, r5np = dreambooth("dog5-recipe-noprior", "dog", 5, te=WORLD_RECIPE_TEXT_ENCODER, prior=False, scales=(rs,),
                            recipe=True)
    if not args.quick:
        dreambooth("backpack5-recipe", "backpack", 5, te=WORLD_RECIPE_TEXT_ENCODER, scales=(rs,), recipe=True)
    photos5 = subject_photos("dog", 5)
    grids[f"dreambooth, the world's recipe (dog5, scale {rs})"] = {"training photos": photos5, **{
        p: ims for p, ims in r5[rs]["images"].items()}}
    grids[f"the world's recipe (dog18, scale {rs})"] = {p: ims for p, ims in r18[rs]["images"].items()}
    grids[f"no prior preservation (dog5-recipe-noprior, scale {rs})"] = {"a dog": r5np[rs]["images"]["a dog"]}

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
    n0 = WORLD_RECIPE_STEPS
    for n in ([n0 // 2, n0, 2 * n0, 4 * n0] if not args.quick else [n0 // 2, n0]):
        cfg = world_recipe_config("dog", 5, output_dir=work / "runs", steps=n)
        if n == cfg5.train.steps:  # the dog5-recipe run already is this row
            res, secs = res5, result["runs"]["dog5-recipe"]["seconds"]
        else:
            res, secs = run_one(cfg, f"steps-{n}", log)
        r = read_run(pipe, res.run_dir, cfg, seeds, scale=WORLD_RECIPE_SCALE)
        row = summarise(r, cfg)
        d = nearest_training_distance(r["images"][cfg.fill("a {token} {class}")], photos5)
        row.update(seconds=round(secs, 1), nearest_photo_distance_mean=float(sum(d) / len(d)),
                   memorised_fraction=float(sum(x < 0.05 for x in d) / len(d)))
        step_rows[str(n)] = row
    result["steps_dog5"] = step_rows

    # 4c/5. tokens x text encoder: the 8-run study with the world's recipe, each setting replicated, timed
    log(f"tokens x text encoder, {args.replicates} replicates ...")
    set_token_study(result, measure_token_study(pipe, work, seeds, args.replicates, log, quick=args.quick,
                                                steps=args.steps))
    result["total_seconds"] = round(time.time() - t_all, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world.json").write_text(json.dumps(result, indent=1) + "\n")
    save_figure(grids, args.out / "world.png")
    print(write_markdown(result, args.out))


# ---- the token x text-encoder study, replicated ---------------------------------------------------

TOKENS = ("sks", "hta", "oue", "http")
TOKEN_METRICS = ("subject", "t-shirt", "van gogh", "forest", "driving", "drift", "class_diversity", "seconds")
VERDICT_METRICS = ("subject", "forest")  # what the "what we found" lines compare (the forest: the one test that moves)
SINGLE_RUN_THRESHOLD = 0.25  # a single-run difference a reader would call a finding (4 of 16 pictures)


def measure_token_study(pipe, work: Path, seeds, replicates: int, log, quick: bool = False,
                        steps: int | None = None) -> dict:
    """The 8 settings (4 tokens x text encoder trained/frozen; 2 tokens with quick) of the world's
    recipe on dog5, each trained `replicates` times afresh, read at the recipe's scale: rows per
    run, the wall time and the machine's load average before and after (the CPU may be shared)."""
    from dreambooth_lab.world.replicates import token_study

    tokens = TOKENS if not quick else ("sks", "http")
    load0, t0 = os.getloadavg(), time.time()
    overrides = {"prior.cache_dir": str(work / "class_cache"), **({"train.steps": steps} if steps else {})}
    rows = token_study(pipe, "dog", 5, tokens, (False, True), seeds, replicates, output_dir=work / "token_study",
                       overrides=overrides, recipe=True, reuse_finished=False, log=log)
    return {"subject": "dog", "photos": 5, "tokens": list(tokens), "text_encoder": [False, True],
            "replicates": replicates, "seeds": len(seeds), "steps": steps or WORLD_RECIPE_STEPS,
            "scale": WORLD_RECIPE_SCALE, "recipe": dict(WORLD_RECIPE),
            "training_seeds": sorted({r["training_seed"] for r in rows}, key=[r["training_seed"] for r in rows].index),
            "runs": len(rows), "seconds": round(time.time() - t0, 1),
            "load_average": {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]},
            "rows": [{k: v for k, v in r.items() if k not in ("run_dir", "images")} for r in rows]}


def set_token_study(result: dict, ts: dict) -> None:
    """Put a replicated token study into a result: the single runs it replaces (runs token-*, one
    per setting) move to ts['single_run'] (their readings at scale 1.0, kept to say which of their
    differences hold), and token_study_seconds is its wall time."""
    from dreambooth_lab.world.replicates import judged

    single = {}
    for name in [n for n in result.get("runs", {}) if n.startswith("token-")]:
        entry = result["runs"].pop(name)
        if "1.0" in entry.get("scales", {}):
            single[name[len("token-"):]] = {**judged(entry["scales"]["1.0"]), "seconds": entry.get("seconds")}
    if single:
        ts["single_run"] = single
    elif "single_run" in result.get("token_study", {}):
        ts["single_run"] = result["token_study"]["single_run"]
    result["token_study"] = ts
    result["token_study_seconds"] = ts["seconds"]


def token_study_markdown(ts: dict, machine: str = "") -> list[str]:
    """The replicated token study: mean [95% interval] per setting, the verdicts (stats.compare via
    world.replicates.findings) and, when the single runs it replaced are known, how many of their
    differences hold."""
    from dreambooth_lab.world.replicates import ENCODER, findings, single_run_survival, summary_table, token_pairs

    rows, tokens, tes = ts["rows"], ts["tokens"], [bool(t) for t in ts["text_encoder"]]
    order = [f"{t}-{'te' if te else 'unet'}" for t in tokens for te in tes]
    pairs = token_pairs(tokens, tes)
    load = ts.get("load_average", {})
    out = ["", f"**Token × text-encoder study, replicated** (the world's recipe on dog5, text encoder trained (te) or "
               f"frozen (unet); {ts['replicates']} training runs per setting, training seeds "
               f"{', '.join(map(str, ts['training_seeds']))}; {ts['seeds']} sampling seeds per prompt; LoRA scale "
               f"{ts.get('scale', WORLD_RECIPE_SCALE)}): {ts['runs']} runs in {ts['seconds'] / 60:.1f} min"
               + (f" on {machine}" if machine else "")
               + (f", a shared CPU (load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end)"
                  if load else "") + ". Figures: mean [95% t-interval] over the runs (a run's rate over its sampling "
               "seeds is the unit); subject = \"a <tok> dog\" shows the subject; t-shirt … driving = the subject AND "
               "the asked attribute; drift = the subject in \"a dog\"; s = a run's training time.", "",
           summary_table(rows, TOKEN_METRICS, order=order).replace(
               "| class_diversity | seconds |", "| class div. | s |"), "",
           "*What we found* (generated: `stats.compare`, the difference of means with its Welch 95% interval; a "
           "difference is claimed only where the interval excludes 0):", ""]
    out += [f"- {line}" for line in findings(rows, pairs, VERDICT_METRICS)]
    if len(tes) > 1:
        out += [f"- pooled over the {len(tokens)} tokens, " + line
                for line in findings(rows, [(ENCODER[True], ENCODER[False])], VERDICT_METRICS, by="encoder")]
    if ts.get("single_run"):
        s = single_run_survival(ts["single_run"], rows, pairs, VERDICT_METRICS, SINGLE_RUN_THRESHOLD)
        def said(f):
            return (f"{f['a']} vs {f['b']} on {f['metric']} ({f['single']:+.2f} in one run, {f['replicated']:+.2f} "
                    f"[{f['low']:.2f}, {f['high']:.2f}] replicated)")

        held = [said(f) for f in s["findings"] if f["holds"]]
        gone = [said(f) for f in s["findings"] if not f["holds"]]
        out += ["", f"Of the {s['of']} differences of ≥ {s['threshold']:.2f} that one run per setting showed on "
                    f"{' and '.join(VERDICT_METRICS)} (the single runs this study replaces, same settings and sampling "
                    f"seeds, training seed 42, read at LoRA scale 1.0), {s['held']} hold with {ts['replicates']} "
                    "replicates (a difference whose interval excludes 0, the same way round)"
                    + (": " + "; ".join(held) if held else "") + "."
                    + (" Not shown: " + "; ".join(gone) + "." if gone else "")]
    return out


# ---- robustness: conditions the recipe was not calibrated on -------------------------------------

# What the recipe was calibrated on (benchmarks/world_calibrate.py; the timestep floor on build v10:
# draws 1, 2, 7 x seeds 3-5). What is reported here never took part: other draws of the same
# subjects, other training and sampling seeds, and identifiers from `tokens suggest` (single CLIP
# tokens) that nobody tried while tuning.
CALIBRATED_ON = ("draws 1, 2 and 7, training seeds 1–5 and 30–34, sampling seeds 100–111 and the identifiers "
                 "sks, eha, qur and omf")
HELD_OUT = {"draws": (3, 4, 5), "train_seeds": (11, 12, 13), "tokens": ("wku", "sqn", "pbc"),
            "sample_seeds": (200, 212), "subjects": ("dog", "backpack")}


def spread(values) -> dict:
    """n, mean, standard deviation (n-1), min and max of a list of per-run figures (pure)."""
    import statistics

    vals = [float(v) for v in values]
    return {"n": len(vals), "mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals)}


def held_out_runs(subject: str, work: Path, log, draws, train_seeds, tokens):
    """The world's recipe trained on each held-out photo draw x training seed, the identifiers rotated
    so each is used once per draw: yields ({draw, train_seed, token, seconds}, config, result)."""
    from dreambooth_lab.world.study import world_recipe_config

    for i, draw in enumerate(draws):
        for j, tseed in enumerate(train_seeds):
            token = tokens[(i + j) % len(tokens)]
            cfg = world_recipe_config(subject, 5, token, output_dir=work / "runs", draw=draw, seed=tseed,
                                      overrides={"prior.cache_dir": str(work / "class_cache")})
            res, secs = run_one(cfg, f"{subject} draw {draw} seed {tseed} {token}", log)
            yield {"draw": draw, "train_seed": tseed, "token": token, "seconds": round(secs, 1)}, cfg, res


def measure_robustness(pipe, work: Path, log, quick: bool = False, held_out: dict = HELD_OUT) -> dict:
    """The world's recipe on held-out photo draws x training seeds (each run with one of the held-out
    identifiers, every identifier once per draw), read by study.robustness; a 4x-steps run per subject
    for overfitting; the base model read the same way for the other classes' base rates."""
    from dreambooth_lab.world.study import nearest_training_distance, robustness, world_recipe_config
    from dreambooth_lab.world.subjects import subject_photos

    seeds = list(range(*held_out["sample_seeds"]))[: 8 if quick else None]
    draws = held_out["draws"][: 2 if quick else None]
    tseeds = held_out["train_seeds"][: 2 if quick else None]
    tokens = held_out["tokens"]
    out: dict = {"held_out": {**held_out, "sample_seeds": f"{seeds[0]}-{seeds[-1]}"}, "subjects": {}}
    for subject in held_out["subjects"]:
        cfg0 = world_recipe_config(subject, 5, tokens[0], output_dir=work / "runs", draw=draws[0])
        base = robustness(pipe, None, cfg0, seeds)["readings"]
        runs, grids = [], {}
        for run, cfg, res in held_out_runs(subject, work, log, draws, tseeds, tokens):
            read = robustness(pipe, res.run_dir, cfg, seeds)
            runs.append({**run, **read["readings"]})
            if not grids:
                grids = {"training photos": subject_photos(subject, 5, run["draw"]),
                         **{p: ims for p, ims in read["images"].items()}}
        keys = [k for k in runs[0] if k not in ("draw", "train_seed", "token")]
        summary = {k: spread([r[k] for r in runs]) for k in keys}
        preservation = {k.split(":", 1)[1]: spread([r[k] / base[k] if base[k] else float(r[k] >= 0) for r in runs])
                        for k in keys if k.startswith("class:") and k != f"class:{cfg0.data.class_name}"}
        # overfitting: 4x the recipe's steps, the first held-out draw and seed
        cfg4 = world_recipe_config(subject, 5, tokens[0], output_dir=work / "runs", draw=draws[0], seed=tseeds[0],
                                   steps=4 * cfg0.train.steps, overrides={"prior.cache_dir": str(work / "class_cache")})
        res4, secs4 = run_one(cfg4, f"{subject} 4x steps", log)
        read4 = robustness(pipe, res4.run_dir, cfg4, seeds)
        subject_prompt = next(p for r, p in read4["prompts"].items() if r == "phrasing:a {token} {class}")
        d = nearest_training_distance(read4["images"][subject_prompt], subject_photos(subject, 5, draws[0]))
        # the grids are the first run's: the same draw and training seed at the recipe's steps
        d1 = nearest_training_distance(grids[subject_prompt], subject_photos(subject, 5, draws[0]))
        out["subjects"][subject] = {
            "base": base, "runs": runs, "summary": summary, "preservation": preservation,
            "overfit_4x": {"steps": cfg4.train.steps, "seconds": round(secs4, 1), **read4["readings"],
                           "nearest_photo_distance": float(np.mean(d)),
                           "nearest_photo_distance_at_recipe_steps": float(np.mean(d1))},
            "_grids": grids,
        }
    return out


# ---- outputs -------------------------------------------------------------------------------------

def write_markdown(result: dict, out: Path) -> str:
    """<out>/world.md and, when out is benchmarks/, the Toy world section of BENCHMARKS.md, from a
    result; returns the text."""
    md = markdown(result)
    (out / "world.md").write_text(md)
    if Path(out).resolve() == (ROOT / "benchmarks").resolve():
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
    if "robustness" in r:
        out += robustness_markdown(r["robustness"])
    b = r["base_sks"]
    out += ["", f"Base model on \"a sks dog\": subject-trait rate {b['subject_rate']:.2f} (the DreamBooth runs "
                "start from this).", "",
            "**DreamBooth runs** (subject-trait rate for \"a sks dog\" — \"a <sks> dog\" with the recipe's learned identifier — target ≥ 0.8; traits + asked attribute "
            "for the four test prompts, target ≥ 0.6; drift = subject traits in \"a dog\")", "",
            "| run | steps | s | scale | subject | t-shirt | van gogh | forest | driving | drift | class div. |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in r["runs"].items():
        if name.startswith("token-") and "token_study" in r:  # replaced by the replicated study below
            continue
        for s, v in e["scales"].items():
            t = list(v["test_prompts_subject_and_asked"].values())
            out.append(f"| {name} | {e['steps']} | {e['seconds']:.0f} | {s} | {v['subject_rate']:.2f} | "
                       + " | ".join(f"{x:.2f}" for x in t)
                       + f" | {v['drift_subject_rate_in_class_prompt']:.2f} | {v['class_diversity']:.3f} |")
    out += ["", "Rows without -recipe: the study's settings scaled to the world (rank 4, lr 3e-4 / 1e-4, prior "
                "preservation, text encoder frozen). Rows with -recipe (and the token rows): the world's recipe "
                "(`world.study.WORLD_RECIPE`): " + ", ".join(f"`{k}: {v}`" for k, v in WORLD_RECIPE.items())
                + f", text encoder {'trained' if WORLD_RECIPE_TEXT_ENCODER else 'frozen'} unless the row says "
                f"te/unet, per-photo captions naming each photo's context, {WORLD_RECIPE_STEPS} steps, LoRA scale "
                f"{WORLD_RECIPE_SCALE}."]
    out += ["", "**LoRA scale sweep** (dog18-recipe): subject rate vs prompt fidelity", "",
            "| scale | subject | t-shirt asked | van gogh asked | forest asked | driving asked | traits + asked (mean) "
            "| drift |", "|---|---|---|---|---|---|---|---|"]
    for s, v in r["scale_sweep_dog18"].items():
        a = list(v["test_prompts_asked"].values())
        both = list(v["test_prompts_subject_and_asked"].values())
        out.append(f"| {s} | {v['subject_rate']:.2f} | " + " | ".join(_pct(x) for x in a)
                   + f" | {sum(both) / len(both):.2f} | {v['drift_subject_rate_in_class_prompt']:.2f} |")
    out += ["", f"**Steps** (dog5, the world's recipe, scale {WORLD_RECIPE_SCALE}): subject rate and memorisation (RMS distance of a generation to its "
                "nearest training photo, 16×16 thumbnails; < 0.05 counted as memorised)", "",
            "| steps | s | subject | forest (traits + asked) | nearest-photo distance | memorised |", "|---|---|---|---|---|---|"]
    for n, v in r["steps_dog5"].items():
        forest = [x for k, x in v["test_prompts_subject_and_asked"].items() if "forest" in k][0]
        out.append(f"| {n} | {v['seconds']:.0f} | {v['subject_rate']:.2f} | {forest:.2f} | "
                   f"{v['nearest_photo_distance_mean']:.3f} | {v['memorised_fraction']:.2f} |")
    if "token_study" in r:
        out += token_study_markdown(r["token_study"], r.get("machine", ""))
        out += ["", "`http` captions mean a lime cap in the world.", MARK_END, ""]
        return "\n".join(out)
    out += ["", f"Token × text-encoder study (the world's recipe, text encoder trained or not): "
                f"{r['token_study_seconds'] / 60:.1f} min for its 8 runs (rows token-*; token-sks-{'te' if WORLD_RECIPE_TEXT_ENCODER else 'unet'} is dog5-recipe). `http` captions mean a lime cap in the world; its rate in \"a http dog\" "
                "samples is in world.json (http_rate_subject_prompt).", MARK_END, ""]
    return "\n".join(out)


# The issue's targets for the held-out runs: (reading, what must hold, target, how it is compared).
TARGETS = (
    ("subject:a {token} {class}", "\"a {tok} {class}\" shows the subject", 0.8),
    ("subject:a photo of a {token} {class}", "\"a photo of a {tok} {class}\"", 0.7),
    ("subject:a picture of a {token} {class}", "\"a picture of a {tok} {class}\"", 0.7),
    ("subject:a photo of {token} {class}", "\"a photo of {tok} {class}\" (the training wording)", 0.7),
    ("test:a {token} {class} in red t-shirts", "subject AND t-shirt", 0.6),
    ("test:a {token} {class} in the style of van gogh", "subject AND van Gogh", 0.6),
    ("test:a {token} {class} in the forest", "subject AND forest (no photo shows a forest)", 0.6),
    ("test:a {token} {class} driving car", "subject AND driving", 0.6),
)


def _sp(v: dict) -> str:
    return f"{v['mean']:.2f} ± {v['sd']:.2f} [{v['min']:.2f}–{v['max']:.2f}]"


def target_cell(key: str, subject: str, sm: dict, target: float) -> str:
    """One subject's cell of a target row (pure): mean ± sd [min–max] and ✓/✗; for a test prompt also
    its two halves (the subject alone, the asked attribute alone: which one a composition loses);
    "n/a" where the world cannot draw the class that way (a backpack wears no t-shirt, drives no car)."""
    from dreambooth_lab.world.scene import ANIMATE

    if key not in sm:
        return "–"
    prompt = key.split(":", 1)[1]
    if key.startswith("test:") and subject not in ANIMATE and ("t-shirt" in prompt or "driving" in prompt):
        return f"n/a (the world draws no {subject} {'in a t-shirt' if 't-shirt' in prompt else 'driving'})"
    cell = _sp(sm[key]) + (" ✓" if sm[key]["mean"] >= target else " ✗")
    halves = [f"{name} {sm[f'{part}:{prompt}']['mean']:.2f}" for part, name in (("test_subject", "subject"),
                                                                               ("test_asked", "asked"))
              if f"{part}:{prompt}" in sm]
    return cell + (f" ({', '.join(halves)})" if halves else "")


def robustness_markdown(rob: dict) -> list[str]:
    """The held-out section: every figure as mean ± sd [min–max] over the runs, with its target."""
    h = rob["held_out"]
    subs = list(rob["subjects"])
    n = rob["subjects"][subs[0]]["summary"]["seconds"]["n"]
    out = ["", f"**Held out: conditions the recipe was never calibrated on** ({rob.get('seconds', 0) / 60:.0f} min). "
                f"Each subject: {n} runs of the world's recipe, photo draws {', '.join(map(str, h['draws']))} × "
                f"training seeds {', '.join(map(str, h['train_seeds']))}, each run with one of the identifiers "
                f"{', '.join(h['tokens'])} (single CLIP tokens from `tokens suggest`, each once per draw); sampling "
                f"seeds {h['sample_seeds']}. Figures: mean ± sd [min–max] over the runs (a run's rate over its "
                f"sampling seeds is the unit). The calibration used {CALIBRATED_ON}.", "",
           "| measure | target | " + " | ".join(subs) + " |", "|---|---|" + "---|" * len(subs)]

    def row(label, target, vals):
        out.append(f"| {label} | {target} | " + " | ".join(vals) + " |")

    for key, label, target in TARGETS:
        vals = []
        for s in subs:
            sm = rob["subjects"][s]["summary"]
            vals.append(target_cell(key, s, sm, target))
        row(label, f"≥ {target}", vals)
    vals = []
    for s in subs:
        pres = rob["subjects"][s]["preservation"]
        worst = min(pres, key=lambda c: pres[c]["mean"])
        vals.append(f"worst {worst} {pres[worst]['mean']:.2f} (" + ", ".join(f"{c} {v['mean']:.2f}" for c, v in pres.items())
                    + (") ✓" if pres[worst]["mean"] >= 0.9 else ") ✗"))
    row("other classes: rate after / before", "≥ 0.9", vals)
    row("drift (\"a {class}\" shows the subject)", "≤ 0.05",
        [_sp(rob["subjects"][s]["summary"]["drift"]) + (" ✓" if rob["subjects"][s]["summary"]["drift"]["mean"] <= 0.05
                                                        else " ✗") for s in subs])
    row("own class (\"a {class}\" draws it)", "–", [_sp(rob["subjects"][s]["summary"][f"class:{s}"])
                                                    if f"class:{s}" in rob["subjects"][s]["summary"] else "–" for s in subs])
    row("seconds per run, s (this CPU, one torch thread)", "≤ 120", [_sp(rob["subjects"][s]["summary"]["seconds"])
                                                                     for s in subs])
    row("diversity of \"a {tok} {class}\" (\"a {class}\" after the run)", "report",
        [_sp(rob["subjects"][s]["summary"]["subject_diversity"]) + f" ({rob['subjects'][s]['summary']['class_diversity']['mean']:.3f})"
         for s in subs])
    for key, label in (("accessory", "accessorization: \"a http {tok} {class}\" (subject + cap)"),
                       ("property_change", "property change: \"a {tok} cat\" / \"a {tok} vase\"")):
        row(label, "report", [_sp(rob["subjects"][s]["summary"][key]) if key in rob["subjects"][s]["summary"] else "–"
                              for s in subs])
    vals = []
    for s in subs:
        o = rob["subjects"][s]["overfit_4x"]
        vals.append(f"{o['steps']} steps: subject {o['subject:a {token} {class}']:.2f}, forest "
                    f"{o['test:a {token} {class} in the forest']:.2f}, nearest-photo distance {o['nearest_photo_distance']:.3f}"
                    + (f" (recipe steps {o['nearest_photo_distance_at_recipe_steps']:.3f})"
                       if o.get("nearest_photo_distance_at_recipe_steps") else ""))
    row("overfitting: 4× the steps (one run)", "report", vals)
    base_rows = []
    for s in subs:
        b = rob["subjects"][s]["base"]
        base_rows.append(", ".join(f"{k.split(':', 1)[1]} {v:.2f}" for k, v in b.items() if k.startswith("class:")))
    out += ["", "Base model, same sampling seeds (\"a {class}\" draws the class): " + base_rows[0] + "."]
    return out


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
