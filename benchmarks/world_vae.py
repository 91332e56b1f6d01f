"""What a world VAE keeps: the committed judge on pictures round-tripped through the toyworld
model's 8x VAE and through the VAE folder given, same scenes and seeds: the subjects' near misses
rejected, subject recall, class, the cap, and the subjects' photos (draw 3).

    python benchmarks/world_vae.py dreambooth_lab/world/weights/stages/vae4x
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_vae(vae) -> dict:
    from dreambooth_lab.world.judge import accuracy, near_miss_rates
    from dreambooth_lab.world.study import vae_ceiling

    acc = accuracy(n=1000, seed=12345, vae=vae, through_vae=1.0)
    return {"near_miss_rejected": near_miss_rates(n=100, seed=777, vae=vae),
            "subject_recall": {k: v for k, v in acc.items() if "subject" in k},
            "class": acc["class"], "http_recall": acc.get("http_recall"),
            "vae_ceiling_draw3": {s: vae_ceiling(None, s, 5, draw=3, vae=vae) for s in ("dog", "backpack")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, help="a world VAE folder (diffusers AutoencoderKL)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    out = {}
    for name, path in (("8x (the toyworld model)", ROOT / "dreambooth_lab/world/weights/toyworld/vae"),
                       ("given", args.vae)):
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = read_vae(vae)
        print(name, json.dumps(out[name], indent=1), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
