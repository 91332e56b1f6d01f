"""The toy world's base model, prompt by prompt: does every class draw, alone and in each context,
outfit, style and driving prompt it can take? (issue #21's base target: >= 0.8 each)

    python benchmarks/world_base.py                                   # the committed toyworld
    python benchmarks/world_base.py ~/.cache/dreambooth_lab/world-build-v5/snapshot --against toyworld

Reads each prompt's pictures with the judge (class rate: the class is drawn; both: the class AND
the prompt's context/outfit/style/car); with --against, the two pipelines side by side on the
same seeds. Writes nothing unless --json is given.

--looks adds the subjects' looks described in words ("a violet dog with yellow dots", with each
test prompt's attribute): the base world never shows these combinations, so they measure whether
the base composes a described look with an asked attribute, which a LoRA then builds on
(subject / subject AND attribute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 0.8


def load(name: str):
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.models import load_pipeline

    return load_pipeline(ModelConfig(name=str(Path(name).expanduser()) if name != "toyworld" else name,
                                     dtype="float32"), device="cpu")


def measure(pipe, prompts, seeds, judge=None, guidance: float | None = None) -> dict[str, dict]:
    from dreambooth_lab.world.study import read_prompt, sample_prompts

    images = sample_prompts(pipe, prompts, seeds, **({"guidance": guidance} if guidance is not None else {}))
    return {p: read_prompt(p, ims, judge).as_dict() for p, ims in images.items()}


LOOKS = {"dog": "a violet dog with yellow dots", "backpack": "a cyan backpack with pink stripes"}
LOOK_ATTRIBUTES = ("", " in the forest", " in red t-shirts", " in the style of van gogh", " driving car")


def look_prompts() -> list[tuple[str, str]]:
    """(subject, prompt) for each subject's look in words, alone and with each attribute it can take."""
    from dreambooth_lab.world.scene import ANIMATE, SUBJECTS

    return [(sub, look + attr) for sub, look in LOOKS.items() for attr in LOOK_ATTRIBUTES
            if SUBJECTS[sub].cls in ANIMATE or attr not in (" in red t-shirts", " driving car")]


def main(argv=None) -> None:
    from benchmarks.world import base_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", nargs="?", default="toyworld", help="a pipeline folder, or toyworld")
    ap.add_argument("--against", default=None, help="a second pipeline on the same seeds")
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--first-seed", type=int, default=300, help="sampling seeds from here (300+: unused elsewhere)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--looks", action="store_true", help="also the subjects' looks described in words, with attributes")
    ap.add_argument("--judge", type=Path, default=None, help="read with this judge folder (default: the committed one)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the world's, 6.4)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    prompts = base_prompts()
    names = [args.pipeline] + ([args.against] if args.against else [])
    looks = look_prompts() if args.looks else []
    results = {}
    for name in names:
        t0 = time.time()
        judge = None
        if args.judge is not None:
            from dreambooth_lab.world.judge import load_judge

            judge = load_judge(args.judge)
        results[name] = measure(load(name), prompts + [p for _, p in looks], seeds, judge, args.guidance)
        print(f"{name}: {len(prompts)} prompts x {len(seeds)} seeds in {time.time() - t0:.0f} s", flush=True)
    head = f"{'prompt':<38}" + "".join(f"{'class / both':>16}" for _ in names)
    print(head)
    below = {n: 0 for n in names}
    for p in prompts:
        cells = []
        for n in names:
            r = results[n][p]
            low = r["both_rate"] < TARGET  # the class, and the asked attribute when the prompt asks one
            below[n] += low
            cells.append(f"{r['class_rate']:>7.2f} / {r['both_rate']:.2f}{'*' if low else ' '}")
        print(f"{p:<38}" + "".join(f"{c:>16}" for c in cells))
    for n in names:
        print(f"{n}: {below[n]} of {len(prompts)} prompts below {TARGET} (*)")
    if looks:
        print(f"{'described look':<50}" + "".join(f"{'subject / both':>16}" for _ in names))
        for sub, p in looks:
            cells = [f"{results[n][p]['subject_rate'][sub]:>7.2f} / {results[n][p]['subject_and_asked'][sub]:.2f} "
                     for n in names]
            print(f"{p:<50}" + "".join(f"{c:>16}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "results": results}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
