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

Writes a picture: the drawings, their round trips through each VAE, and the base model's pictures
of the two phrasings at the same seeds.
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
    from dreambooth_lab.world.scene import SUBJECTS, look_scene

    sub = SUBJECTS[subject]
    rng = np.random.default_rng([seed, 8])
    scenes = [replace(look_scene(sub, rng), outfit=False, driving=False, style=False) for _ in range(n)]
    return {kind: [render(replace(sc, marking=marking)) for sc in scenes]
            for kind, marking in (("own", sub.marking), ("other", OTHER[sub.marking]), ("merged", "merged"))}


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


def save_sheet(strips, path: Path, note: str) -> None:
    """One labelled row per strip of 64 px pictures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(strips), 1, figsize=(9, 1.25 * len(strips)))
    for ax, (label, images) in zip(axes, strips):
        ax.imshow(np.concatenate([np.asarray(im.convert("RGB")) for im in images], 1), interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(f"Can the world draw its subjects' pattern? ({note})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


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
    from dreambooth_lab.world.study import load_world_pipeline, sample_prompts

    torch.set_num_threads(args.threads)
    judge = load_judge(args.judge) if args.judge else load_judge()
    out = {"n": args.n, "judge": str(args.judge or "committed"), "vae": {}, "words": {}}
    strips = []
    for subject in ("dog", "backpack"):
        drawn = drawings(subject, args.n, seed=17)
        triple = "own pattern / other / merged, x3"
        strips.append((f"{subject}: drawn ({triple})",
                       [im for i in range(3) for im in (drawn["own"][i], drawn["other"][i], drawn["merged"][i])]))
        row = {"drawn": {k: subject_rate(v, subject, judge) for k, v in drawn.items()}}
        for name, folder in VAES.items():
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
            after = {k: to_images(round_trip(to_batch(v), vae)) for k, v in drawn.items()}
            row[name] = {"subject_rate": {k: subject_rate(v, subject, judge) for k, v in after.items()},
                         "kept_vs_other": kept(drawn["own"], drawn["other"], after["own"], after["other"]),
                         "kept_vs_merged": kept(drawn["own"], drawn["merged"], after["own"], after["merged"])}
            strips.append((f"{subject}: through the {name} VAE",
                           [im for i in range(3) for im in (after["own"][i], after["other"][i], after["merged"][i])]))
        out["vae"][subject] = row
    pipe = load_world_pipeline()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for subject, prompts in WORDS.items():
        images = sample_prompts(pipe, list(prompts), seeds)
        out["words"][subject] = {p: subject_rate(images[p], subject, judge) for p in prompts}
        strips.extend([(f'base model: "{p}", seeds {seeds[0]}-{seeds[0] + 8}', images[p][:9]) for p in prompts])
    out["sampling_seeds"] = seeds
    args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    save_sheet(strips, args.png, f"judge: {out['judge']}")
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
