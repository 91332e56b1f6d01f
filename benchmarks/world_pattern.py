"""Can the world draw its subjects' pattern at all?

The dog subject is violet with yellow *dots*; the same dog with yellow *stripes*, or with its dots
run together into one yellow patch, is not the subject (the judge's near misses). Every generated
picture goes through the model's VAE, so a pattern the VAE cannot keep cannot be drawn, bound or
judged. This measures, on the same scenes:

- **kept by the VAE**: the pixel difference between a scene drawn with the subject's pattern and the
  same scene with the other pattern (dots <-> stripes) or merged into one patch of the marking's
  colour, after the round trip, as a fraction of the same difference before it (1 = all of it
  kept; 0 = the two decode alike), over the pixels where the two drawings differ; for the shipped
  8x VAE (8x8 latents) and the 4x stage (16x16);
- **the judge on the round trip**: how often each pattern reads as the subject;
- **the base model in words**: "a violet dog with yellow dots" against "... with yellow stripes"
  (and the backpack's "cyan ... pink stripes" against "... pink dots"), the judge's subject rate
  over the sampling seeds.

    python benchmarks/world_pattern.py [--judge FOLDER] [--json F] [--png F]

Writes a picture (world.sheets.seed_grid, a labelled row each): the drawings, their round trips
through each VAE, and the base model's pictures of the two phrasings at the same seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VAES = {"8x (shipped)": ROOT / "dreambooth_lab/world/weights/toyworld/vae",
        "4x (stage vae4x)": ROOT / "dreambooth_lab/world/weights/stages/vae4x"}
OTHER = {"dots": "stripes", "stripes": "dots"}
WORDS = {"dog": ("a violet dog with yellow dots", "a violet dog with yellow stripes"),
         "backpack": ("a cyan backpack with pink stripes", "a cyan backpack with pink dots")}


def drawings(subject: str, n: int, seed: int) -> dict[str, list]:
    """n scenes of `subject`'s look (its own class, bare: no shirt, car or style), each drawn with its
    own pattern, the other pattern and the merged patch."""
    from dreambooth_lab.world.draw import render
    from dreambooth_lab.world.scene import MERGED, SUBJECTS, look_scene

    sub = SUBJECTS[subject]
    rng = np.random.default_rng([seed, 8])
    scenes = [replace(look_scene(sub, rng), outfit=False, driving=False, style=False) for _ in range(n)]
    return {kind: [render(replace(sc, marking=marking)) for sc in scenes]
            for kind, marking in (("own", sub.marking), ("other", OTHER[sub.marking]), ("merged", MERGED))}


def kept(before_a, before_b, after_a, after_b) -> float:
    """How much of the difference between drawings a and b is left after the round trip (mean over
    the pixels where a and b differ)."""
    fa, fb = (np.stack([np.asarray(im, dtype=float) for im in x]) for x in (before_a, before_b))
    ga, gb = (np.stack([np.asarray(im, dtype=float) for im in x]) for x in (after_a, after_b))
    where = np.abs(fa - fb).sum(-1) > 30
    return float(np.abs(ga - gb).sum(-1)[where].mean() / np.abs(fa - fb).sum(-1)[where].mean())


def subject_rate(images, subject: str, judge) -> float:
    from dreambooth_lab.world.judge import read_images

    return float(np.mean([r[f"subject_{subject}"] for r in read_images(images, judge)]))


def side_by_side(pictures: dict[str, list], n: int = 3) -> list:
    """The first n scenes, each as its own pattern, the other and merged, in a row."""
    return [im for i in range(n) for im in (pictures["own"][i], pictures["other"][i], pictures["merged"][i])]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="scenes per subject")
    ap.add_argument("--seeds", type=int, default=16, help="sampling seeds of the base model (from --first-seed)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--judge", type=Path, default=None, help="read with this judge folder (default: the committed one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/world_pattern.json")
    ap.add_argument("--png", type=Path, default=ROOT / "benchmarks/world_pattern.png")
    args = ap.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL
    from dreambooth_lab.world.judge import load_judge, round_trip, to_batch, to_images
    from dreambooth_lab.world.sheets import seed_grid
    from dreambooth_lab.world.study import load_world_pipeline, sample_prompts

    torch.set_num_threads(args.threads)
    judge = load_judge(args.judge) if args.judge else load_judge()
    out = {"n": args.n, "judge": str(args.judge or "committed"), "vae": {}, "words": {}}
    vaes = {name: AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval() for name, folder in VAES.items()}
    rows = {}  # the picture: label -> pictures
    for subject in ("dog", "backpack"):
        drawn = drawings(subject, args.n, seed=17)
        rows[f"{subject}: drawn (own pattern / other / merged, x3)"] = side_by_side(drawn)
        row = {"drawn": {k: subject_rate(v, subject, judge) for k, v in drawn.items()}}
        for name, vae in vaes.items():
            after = {k: to_images(round_trip(to_batch(v), vae)) for k, v in drawn.items()}
            row[name] = {"subject_rate": {k: subject_rate(v, subject, judge) for k, v in after.items()},
                         "kept_vs_other": kept(drawn["own"], drawn["other"], after["own"], after["other"]),
                         "kept_vs_merged": kept(drawn["own"], drawn["merged"], after["own"], after["merged"])}
            rows[f"{subject}: through the {name} VAE"] = side_by_side(after)
        out["vae"][subject] = row
    pipe = load_world_pipeline()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for subject, prompts in WORDS.items():
        images = sample_prompts(pipe, list(prompts), seeds)
        out["words"][subject] = {p: subject_rate(images[p], subject, judge) for p in prompts}
        rows.update({f'base model: "{p}", seeds {seeds[0]}-{seeds[0] + 8}': images[p][:9] for p in prompts})
    out["sampling_seeds"] = seeds
    args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    seed_grid(rows, args.png, per_row=9)
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
