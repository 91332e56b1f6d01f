"""Two builds of the toy world compared on the held-out DreamBooth runs, in one go.

Each build trains the world's recipe on the held-out photo draws 3, 4, 5 (identifiers wku, sqn, pbc,
one per draw) x training seeds 11, 12, 13 for the 5-photo dog and the 5-photo backpack, and every
run is read at each LoRA scale (benchmarks/world_calibrate.py's reading, sampling seeds 200-211);
the base model is read at the same seeds for the other classes' base rates.

    python benchmarks/world_builds.py v4=<pipeline folder> v6=/tmp/toyworld-v6 --out /tmp/builds
    python benchmarks/world_builds.py --table benchmarks/world_builds.jsonl   # the Markdown tables again

A label without a folder (`v6=`) is the committed `toyworld`. One JSON line per run and scale goes to
<out>/<label>.jsonl, the base readings to <out>/base.json; then the tables (BENCHMARKS.md, "Toy
world, build v6").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRAW_TOKENS = ((3, "wku"), (4, "sqn"), (5, "pbc"))
TRAIN_SEEDS = ("11", "12", "13")
SAMPLE_SEEDS = ("200", "212")
SCALES = ("0.7", "1.0")
READINGS = [("a {tok} {class}", "subject:a {token} {class}"),
            ("a photo of a {tok} {class}", "subject:a photo of a {token} {class}"),
            ("a picture of a {tok} {class}", "subject:a picture of a {token} {class}"),
            ("… in red t-shirts (subject and t-shirt)", "test:a {token} {class} in red t-shirts"),
            ("… in the style of van gogh", "test:a {token} {class} in the style of van gogh"),
            ("… in the forest (no photo shows it)", "test:a {token} {class} in the forest"),
            ("… driving car", "test:a {token} {class} driving car"),
            ('drift: "a {class}" shows the subject', "drift")]
CLASSES = ("dog", "cat", "toy", "backpack", "vase")
BASE_READING = """
import json, sys, tempfile, torch
torch.set_num_threads(1)
from dreambooth_lab.world.study import load_world_pipeline, robustness, world_recipe_config
cfg = world_recipe_config("dog", 5, "wku", output_dir=tempfile.mkdtemp(), draw=3)
read = robustness(load_world_pipeline(), None, cfg, list(range(*map(int, sys.argv[1:3]))))["readings"]
print(json.dumps({k: v for k, v in read.items() if k.startswith("class:")}))
"""


def run_build(label: str, folder: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if folder:
        env["DREAMBOOTH_LAB_TOYWORLD"] = folder
    for subject in ("dog", "backpack"):
        for draw, token in DRAW_TOKENS:
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "world_calibrate.py"), "--subject", subject,
                            "--token", token, "--draws", str(draw), "--train-seeds", *TRAIN_SEEDS,
                            "--sample-seeds", *SAMPLE_SEEDS, "--scale", *SCALES, "--label", label,
                            "--out", str(out / f"{label}.jsonl")], check=True, env=env)
    got = subprocess.run([sys.executable, "-c", BASE_READING, *SAMPLE_SEEDS], check=True, env=env,
                         capture_output=True, text=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def tables(rows: list[dict], base: dict) -> str:
    """Markdown: per subject, each reading's mean ± sd (min-max) over the runs of each build and scale,
    and each other class's rate after the run over its base rate (pure)."""
    cols = sorted({(r["label"], r["scale"]) for r in rows}, key=lambda c: (c[0], -c[1]))
    out = []
    for subject in ("dog", "backpack"):
        sel = {c: [r for r in rows if r["subject"] == subject and (r["label"], r["scale"]) == c] for c in cols}
        sel = {c: v for c, v in sel.items() if v}
        if not sel:
            continue
        n = {len(v) for v in sel.values()}
        out += [f"\n**{subject}** ({'/'.join(map(str, sorted(n)))} runs per column; mean ± sd (min–max))\n",
                "| reading | " + " | ".join(f"{lab} at {sc}" for lab, sc in sel) + " |",
                "|---|" + "---|" * len(sel)]
        for name, key in READINGS:
            if subject == "backpack" and ("t-shirt" in name or "driving" in name):
                continue  # a backpack wears no t-shirt and drives no car
            vals = [[r[key] for r in v] for v in sel.values()]
            out.append(f"| {name} | " + " | ".join(
                f"{st.fmean(v):.2f} ± {st.stdev(v) if len(v) > 1 else 0:.2f} ({min(v):.2f}–{max(v):.2f})" for v in vals) + " |")
        for cls in (c for c in CLASSES if c != subject):
            cells = []
            for lab, sc in sel:
                b = base[lab][f"class:{cls}"]
                v = [r[f"class:{cls}"] / b for r in sel[(lab, sc)]] if b else [1.0]
                cells.append(f"{st.fmean(v):.2f} (min {min(v):.2f})")
            out.append(f'| "a {cls}" after / before the run | ' + " | ".join(cells) + " |")
    out.append("\nBase rates of \"a {class}\" at the same sampling seeds: " + "; ".join(
        f"{lab}: " + ", ".join(f"{k.split(':')[1]} {v:.2f}" for k, v in sorted(b.items())) for lab, b in sorted(base.items())))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*", metavar="LABEL=FOLDER")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "world_builds")
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSONL",
                    help="print the tables from these JSONL files (base.json beside the first)")
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for f in args.table for line in f.read_text().splitlines() if line.strip()]
        base = json.loads((args.table[0].parent / (args.table[0].stem + "_base.json")).read_text())
        print(tables(rows, base))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    base = {}
    for spec in args.builds:
        label, _, folder = spec.partition("=")
        base[label] = run_build(label, folder, args.out)
    (args.out / "base.json").write_text(json.dumps(base, indent=1, sort_keys=True) + "\n")
    rows = [json.loads(line) for label in base for line in (args.out / f"{label}.jsonl").read_text().splitlines()]
    print(tables(rows, base))


if __name__ == "__main__":
    main()
