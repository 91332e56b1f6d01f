"""Which judge can tell the subject's pattern from its marking run together, and through which VAE?

For each judge folder and each VAE (none, the shipped 8x, the 4x stage), the fraction of fresh
near misses that the judge reads as "not the subject" (`<subject>/<trait>`; `merged` is the marking
run together into one patch of its colour, scene.MERGED), and the fraction of the true look it reads
as the subject (`<subject>/look`). Same scenes (seed 4242, never used to train a judge) for every
cell, half of them blurred or noised as in judge.near_miss_rates.

    python benchmarks/world_judges.py [--judge NAME=FOLDER ...] [--json F]

A judge that rejects the merged patch drawn or after a VAE, yet still reads the true look after
that VAE, can tell the pattern; one that reads the true look as "not the subject" after a VAE
says that VAE does not keep the pattern (BENCHMARKS: "the 8x world cannot draw the subject's pattern").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.world_pattern import VAES as ROUND_TRIPS  # noqa: E402 (the shipped 8x and the 4x stage)

WEIGHTS = ROOT / "dreambooth_lab/world/weights"
VAES = {"none": None, **ROUND_TRIPS}
STAGE_JUDGE = "judge-v12 (stage)"  # the judge for a 4x world, beside the committed one
JUDGES = {"committed": WEIGHTS / "judge", STAGE_JUDGE: WEIGHTS / "stages/judge-v12"}


def judge_arg(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--judge {text!r}: write NAME=FOLDER, e.g. mine=~/judge")
    return name, Path(folder).expanduser()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", type=judge_arg, action="append", default=None,
                    help="NAME=FOLDER (repeat); default: the committed judge and the judge-v12 stage")
    ap.add_argument("--n", type=int, default=100, help="scenes per subject and trait")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL
    from dreambooth_lab.world.judge import load_judge, near_miss_rates
    from dreambooth_lab.world.scene import MERGED, NEAR_MISS_TRAITS

    torch.set_num_threads(args.threads)
    judges = dict(args.judge) if args.judge else JUDGES
    vaes = {name: None if folder is None else AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
            for name, folder in VAES.items()}
    out = {"n": args.n, "seed": args.seed, "judges": {k: str(v) for k, v in judges.items()}, "rates": {}}
    for name, folder in judges.items():
        judge = load_judge.__wrapped__(folder)
        out["rates"][name] = {vae_name: near_miss_rates(judge, n=args.n, seed=args.seed, vae=vae,
                                                        traits=NEAR_MISS_TRAITS + (MERGED,))
                              for vae_name, vae in vaes.items()}
    text = json.dumps(out, indent=1, sort_keys=True) + "\n"
    if args.json:
        args.json.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
