"""The recipe's LoRA scale, checked on the held-out runs: the same trained runs read at several scales.

Trains the world's recipe on benchmarks/world.py's held-out conditions (HELD_OUT: photo draws 3-5 x
training seeds 11-13, identifiers wku/sqn/pbc rotated over them, sampling seeds 200-211) for the
5-photo dog and backpack, reads every run at each --scale with study.robustness (a paired
comparison: one trained run, several readings), one JSON line per run and scale.

    python benchmarks/world_scale_check.py --scale 0.5 0.7 > /tmp/scales.jsonl
    python benchmarks/world_scale_check.py --table benchmarks/world_scale_check.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics as st
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(subjects, scales) -> None:
    import torch

    from benchmarks.world import HELD_OUT, held_out_runs
    from dreambooth_lab.world.study import load_world_pipeline, robustness

    torch.set_num_threads(1)
    pipe, work = load_world_pipeline(), Path(tempfile.mkdtemp(prefix="scale-check-"))
    seeds = list(range(*HELD_OUT["sample_seeds"]))
    for subject in subjects:
        for run, cfg, res in held_out_runs(subject, work, lambda msg: print(msg, file=sys.stderr, flush=True),
                                           HELD_OUT["draws"], HELD_OUT["train_seeds"], HELD_OUT["tokens"]):
            for s in scales:
                r = robustness(pipe, res.run_dir, cfg, seeds, scale=s)["readings"]
                print(json.dumps({"subject": subject, **run, "scale": s, "readings": r}, sort_keys=True), flush=True)


def table(rows: list[dict]) -> str:
    """Per subject and reading: mean ± sd over the runs at each scale (pure)."""
    out = []
    for subject in dict.fromkeys(r["subject"] for r in rows):
        by = collections.defaultdict(list)
        for r in rows:
            if r["subject"] == subject:
                by[r["scale"]].append(r["readings"])
        scales = sorted(by)
        keys = [k for k in by[scales[0]][0] if k.startswith(("subject:", "test:", "class:")) or k == "drift"]
        out += ["", f"**{subject}** ({len(by[scales[0]])} runs)", "",
                "| reading | " + " | ".join(f"scale {s}" for s in scales) + " |", "|---" * (len(scales) + 1) + "|"]
        for k in keys:
            cells = [f"{st.fmean(x[k] for x in by[s]):.2f} ± {st.stdev([x[k] for x in by[s]]):.2f}" for s in scales]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--subjects", nargs="+", default=["dog", "backpack"])
    ap.add_argument("--table", type=Path, default=None, metavar="JSONL", help="print the tables of earlier lines")
    args = ap.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    measure(args.subjects, args.scale)


if __name__ == "__main__":
    main()
