"""Calibrate a world recipe: train it on some photo draws, identifiers and training seeds, and read
each run the way a user would worry about it (study.robustness). What the recipe was tuned on is
what this script is given; `benchmarks/world.py` reports on draws, seeds and identifiers it never saw.

    python benchmarks/world_calibrate.py --set optim.lr_unet=1e-3 --draws 1 2 --train-seeds 1 2
    python benchmarks/world_calibrate.py --subject backpack --token hta --steps 800 --out /tmp/cal.jsonl

One JSON line per run (appended to --out), then the mean of every reading over the runs.

    python benchmarks/world_calibrate.py ... --keep-pictures /tmp/pics      # each run's pictures too
    python benchmarks/world_calibrate.py --reread /tmp/pics --judge <folder> --out /tmp/re.jsonl

--reread reads kept pictures again (with another judge, or the same one after a change to how it
reads) without training anything: the same rows, read from the same pictures.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subject", default="dog")
    ap.add_argument("--photos", type=int, default=5)
    ap.add_argument("--token", nargs="+", default=["sks"])
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 2], help="photo draws (subject_dir seed)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sample-seeds", type=int, nargs=2, default=[100, 112], metavar=("FIRST", "STOP"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--scale", type=float, nargs="+", default=None,
                    help="LoRA scales to read each trained run at (one line per run and scale; default: the recipe's)")
    ap.add_argument("--captions", action=argparse.BooleanOptionalAction, default=None,
                    help="per-photo captions naming the context (default: the recipe's)")
    ap.add_argument("--no-prior", action="store_true")
    ap.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=None,
                    help="train the text encoder's LoRA (default: the recipe's)")
    ap.add_argument("--frozen-te", action="store_true", help="the same as --no-text-encoder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--sheet", type=Path, default=None, help="write the first run's pictures here (PNG)")
    ap.add_argument("--judge", type=Path, default=None,
                    help="read the pictures with this judge folder instead of the committed one (runs are "
                         "deterministic: the same call with another judge reads the same pictures)")
    ap.add_argument("--keep-pictures", type=Path, default=None, metavar="DIR",
                    help="save each run's pictures here (one .npz per run and scale, and its row's identity)")
    ap.add_argument("--reread", type=Path, default=None, metavar="DIR",
                    help="train nothing: read the pictures kept in DIR (--keep-pictures) with --judge")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from dreambooth_lab.train import train
    from dreambooth_lab.world.study import WORLD_RECIPE_SCALE, load_world_pipeline, robustness, world_recipe_config

    from dreambooth_lab.cli import _overrides

    overrides = _overrides(args.set)  # the CLI's own reading of --set
    pipe = load_world_pipeline()
    judge = None
    if args.judge is not None:
        from dreambooth_lab.world.judge import load_judge

        judge = load_judge(args.judge)
    if args.reread is not None:
        rows = reread(args.reread, judge, args)
        summarise_rows(rows)
        return
    seeds = list(range(*args.sample_seeds))
    work = Path(tempfile.mkdtemp(prefix="world-cal-"))
    atexit.register(shutil.rmtree, work, True)  # the runs are scratch: gone when the script ends, however it ends
    rows = []
    for token in args.token:
        for draw in args.draws:
            for tseed in args.train_seeds:
                kw = dict(output_dir=work / "runs", overrides={**overrides, "prior.cache_dir": str(work / "cache")},
                          draw=draw, seed=tseed, prior=not args.no_prior)
                if args.captions is not None:
                    kw["captions"] = args.captions
                if args.text_encoder is not None or args.frozen_te:
                    kw["train_text_encoder"] = bool(args.text_encoder) and not args.frozen_te
                if args.steps:
                    kw["steps"] = args.steps
                cfg = world_recipe_config(args.subject, args.photos, token, **kw)
                t0 = time.time()
                res = train(cfg, resume=None, progress=False)
                secs = time.time() - t0
                for scale in args.scale if args.scale is not None else [WORLD_RECIPE_SCALE]:
                    reading = robustness(pipe, res.run_dir, cfg, seeds, scale=scale, judge=judge)
                    read = reading["readings"]
                    if args.sheet and not rows:
                        from dreambooth_lab.world.sheets import seed_grid
                        from dreambooth_lab.world.subjects import subject_photos

                        seed_grid({"training photos": subject_photos(args.subject, args.photos, draw),
                                   **reading["images"]}, args.sheet)
                    row = {"label": args.label, **({"judge": str(args.judge)} if args.judge else {}),
                           "subject": args.subject, "token": token, "draw": draw,
                           "train_seed": tseed, "captions": cfg.data.captions, "te": cfg.train.train_text_encoder,
                           "overrides": overrides, "steps": cfg.train.steps, "scale": scale,
                           "seconds": round(secs, 1), **{k: round(v, 3) for k, v in read.items()}}
                    if args.keep_pictures:
                        keep_pictures(args.keep_pictures, row, kw, args, reading["images"])
                    emit(row, rows, args.out)
    summarise_rows(rows)


def emit(row: dict, rows: list, out: Path | None) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _picture_stem(row: dict) -> str:
    return f"{row['subject']}-d{row['draw']}-t{row['train_seed']}-{row['token']}-x{row['scale']}"


def keep_pictures(folder: Path, row: dict, kw: dict, args, images: dict) -> None:
    """One run's pictures ({prompt: [image per seed]}) as <stem>.npz, and what rebuilds its config and
    its row (<stem>.json), so --reread can read them again."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = _picture_stem(row)
    arrays = {f"p{i}": np.stack([np.asarray(im.convert("RGB")) for im in ims]) for i, ims in enumerate(images.values())}
    np.savez_compressed(folder / f"{stem}.npz", **arrays)
    ident = {"row": {k: v for k, v in row.items() if not isinstance(v, float) or k in ("scale", "seconds")},
             "prompts": list(images), "config": {"subject": args.subject, "photos": args.photos,
                                                 "token": row["token"], **{k: v for k, v in kw.items()
                                                                          if k not in ("output_dir", "overrides")},
                                                 "overrides": kw["overrides"]}}
    (folder / f"{stem}.json").write_text(json.dumps(ident, indent=1, sort_keys=True, default=str) + "\n")


def reread(folder: Path, judge, args) -> list[dict]:
    from PIL import Image

    from dreambooth_lab.world.study import read_robustness, world_recipe_config

    stems = sorted(p.stem for p in folder.glob("*.json"))
    if not stems:
        raise SystemExit(f"error: no kept pictures in {folder} (*.json beside *.npz); make them with --keep-pictures")
    rows = []
    for stem in stems:
        ident = json.loads((folder / f"{stem}.json").read_text())
        c = dict(ident["config"])
        cfg = world_recipe_config(c.pop("subject"), c.pop("photos"), c.pop("token"), output_dir=folder / "unused", **c)
        data = np.load(folder / f"{stem}.npz")
        images = {p: [Image.fromarray(a) for a in data[f"p{i}"]] for i, p in enumerate(ident["prompts"])}
        read = read_robustness(images, cfg, judge)
        row = {**ident["row"], "label": args.label or ident["row"].get("label", ""),
               **({"judge": str(args.judge)} if args.judge else {}), "reread": str(folder),
               **{k: round(v, 3) for k, v in read.items()}}
        emit(row, rows, args.out)
    return rows


def summarise_rows(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float) and k not in ("scale",)]
    for scale in sorted({r["scale"] for r in rows}):
        at = [r for r in rows if r["scale"] == scale]
        print(f"scale {scale}: mean over {len(at)} runs:")
        for k in keys:
            vals = [r[k] for r in at]
            print(f"  {k:48s} {np.mean(vals):.2f}  (min {min(vals):.2f}, max {max(vals):.2f})")


if __name__ == "__main__":
    main()
