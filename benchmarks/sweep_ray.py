"""A toy-world sweep on one machine: the runs one after another vs 2 Ray workers (#24).

    flock /tmp/dbl-bench.lock .venv/bin/python benchmarks/sweep_ray.py     # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/sweep_ray.py --steps 10 --out /tmp/sr        # a quick check, no record

Both arms run in ONE run of this script, on the same sweep (the world recipe, `toyworld`, on the
5-photo dog, `--steps` steps (default: the recipe's 400), `--runs` training seeds (default 4)),
each into its own folder:

- sequential: `experiments.run_sweep(sweep)` in this process with one torch thread, what
  `sweep SPEC` does;
- Ray: a local Ray with 2 CPUs (`ray.init(num_cpus=2)`), `run_sweep(sweep, launcher="ray",
  cpus_per_run=1)`: two runs at a time, each in its own worker with one torch thread, what
  `sweep SPEC --launcher ray --cpus-per-run 1` does. Its wall time counts everything: `import
  ray`, `ray.init`, starting the two worker processes and their imports (timed on their own as
  the start-up overhead: a task per worker that trains 1 step, before the sweep, so that the
  sweep's runs find warm workers as the sequential arm finds a warm process), the sweep,
  `ray.shutdown`.

Untimed before both: a 1-step run of the same recipe makes the class images (one cache, read by
both arms) and does the imports, so neither arm pays for them. The arms must train the same
LoRAs (checked, byte for byte). These machines are shared, and a busy neighbour slows the
two-worker arm more than the one-thread arm: the load average before and after is recorded, and
how many cores other people's processes kept busy during each arm (/proc/stat's busy time minus
this benchmark's process tree, Ray's processes and workers included).

Writes <out>/sweep_ray.json (keeping the summaries of the runs it held before, as "earlier");
with --out benchmarks/ (the default) also the "Sweeps on Ray" section of BENCHMARKS.md
(--markdown-only rewrites that section from the json, measuring nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK_START, MARK_END = "<!-- sweep-ray:start -->", "<!-- sweep-ray:end -->"


def _warm_worker(cfg, folder: str) -> int:
    """A Ray task: what a fresh worker does before its first run trains at full speed (imports of
    torch, diffusers and the trainer, their lazy modules, the first model load), as a 1-step run."""
    import torch

    from dreambooth_lab.config import with_overrides
    from dreambooth_lab.train import train

    torch.set_num_threads(1)
    train(with_overrides(cfg, {"train.steps": 1, "train.output_dir": f"{folder}/{os.getpid()}"}), progress=False)
    return os.getpid()


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and all its
    descendants: the Ray processes, the workers, and what they reaped), from /proc; None elsewhere.
    Their deltas over an arm give how much CPU other people's processes took meanwhile."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait (guest is in user)
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    text = (entry / "stat").read_text()
                except OSError:
                    continue
                rest = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ... utime stime cutime cstime
                stats[int(entry.name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]) / tick)
    except (OSError, ValueError, IndexError):
        return None
    ours, todo = 0.0, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        ours += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return busy, ours


def others_cores(before, after, seconds: float) -> float | None:
    """Cores that processes outside this benchmark kept busy on average between two cpu_seconds()."""
    if before is None or after is None or seconds <= 0:
        return None
    return round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds, 2)


def write_spec(folder: Path, name: str, base: dict, seeds: list[int], out: Path) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(out), "base": base,
                                    "grid": {"train.seed": seeds}}))
    return path


def measure(steps: int, runs: int, work: Path) -> dict:
    import torch

    from dreambooth_lab import experiments as E
    from dreambooth_lab.config import with_overrides
    from dreambooth_lab.train import train
    from dreambooth_lab.world.study import world_recipe_config

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    cfg = world_recipe_config("dog", steps=steps, output_dir=work / "runs")
    cfg.prior.cache_dir = str(work / "class-images")
    seeds = list(range(1, runs + 1))

    t = time.perf_counter()  # untimed set-up: imports done, class images made (one cache for both arms)
    train(with_overrides(cfg, {"train.steps": 1, "train.output_dir": str(work / "warm-up")}), progress=False)
    warm_up = time.perf_counter() - t

    base = cfg.to_dict()
    sequential = E.load_sweep(write_spec(work, "sequential", base, seeds, work / "runs"))
    on_ray = E.load_sweep(write_spec(work, "on-ray", base, seeds, work / "runs"))

    c_seq = cpu_seconds()
    t = time.perf_counter()
    seq_rows = E.run_sweep(sequential, progress=False)
    seq_s = time.perf_counter() - t

    c0 = cpu_seconds()
    t0 = time.perf_counter()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    warm = ray.remote(_warm_worker).options(num_cpus=1)
    pids = ray.get([warm.remote(cfg, str(work / "warm-up-ray")) for _ in range(2)])
    t2 = time.perf_counter()
    c2 = cpu_seconds()
    ray_rows = E.run_sweep(on_ray, launcher="ray", cpus_per_run=1, progress=False, poll=0.5)
    t3 = time.perf_counter()
    c3 = cpu_seconds()
    ray.shutdown()
    t4 = time.perf_counter()
    load_after = os.getloadavg()

    by_id = {r["id"]: r for r in seq_rows}
    assert sorted(by_id) == sorted(r["id"] for r in ray_rows) and len(ray_rows) == runs
    assert {r["status"] for r in seq_rows + ray_rows} == {"finished"}, [r["status"] for r in seq_rows + ray_rows]
    same = all(Path(r["lora"]).read_bytes() == Path(by_id[r["id"]]["lora"]).read_bytes() for r in ray_rows)
    assert same, "the Ray sweep trained other LoRAs than the sequential sweep"
    ray_total = t4 - t0
    return {
        "steps": steps, "runs": runs, "run_ids": sorted(by_id),
        "warm_up_s": round(warm_up, 2),
        "sequential_s": round(seq_s, 2),
        "ray_total_s": round(ray_total, 2),
        "ray_import_and_init_s": round(t1 - t0, 2),
        "ray_worker_start_s": round(t2 - t1, 2),
        "ray_sweep_s": round(t3 - t2, 2),
        "ray_shutdown_s": round(t4 - t3, 2),
        "ray_startup_overhead_s": round((t2 - t0) + (t4 - t3), 2),
        "ratio": round(seq_s / ray_total, 3),
        "ratio_without_startup": round(seq_s / (t3 - t2), 3),
        "run_seconds_sequential": [by_id[i]["seconds"] for i in sorted(by_id)],
        "run_seconds_ray": [{r["id"]: r["seconds"] for r in ray_rows}[i] for i in sorted(by_id)],
        "ray_workers": len(set(pids)),
        "same_lora_bytes": same,
        "other_processes_cores_sequential": others_cores(c_seq, c0, seq_s),
        "other_processes_cores_ray_sweep": others_cores(c2, c3, t3 - t2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def machine() -> dict:
    from importlib.metadata import version

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": version("ray"), "commit": commit,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def markdown(result: dict) -> str:
    m, r = result["machine"], result["result"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return "\n".join([
        MARK_START,
        "## Sweeps on Ray: one machine, 2 workers",
        "",
        f"`benchmarks/sweep_ray.py` (results in `benchmarks/sweep_ray.json`), {m['date']}, {m['cpus']} CPU cores, "
        f"torch {m['torch']}, ray {m['ray']}, commit {m['commit']}. A {r['runs']}-run toy-world sweep (the world "
        f"recipe on the 5-photo dog, {r['steps']} steps, training seeds {', '.join(i.split('=')[-1] for i in r['run_ids'])}), "
        "both arms in one run of the script, each with one torch thread per run; the class images were made "
        "beforehand (one cache for both) and both arms trained byte-identical LoRAs"
        + (" (checked)." if r["same_lora_bytes"] else " (NOT: see the json)."),
        "",
        "| | wall time (s) | mean run (s) |",
        "|---|---:|---:|",
        f"| sequential (`sweep SPEC`) | {r['sequential_s']:.1f} | {mean(r['run_seconds_sequential']):.1f} |",
        f"| Ray, 2 workers (`sweep SPEC --launcher ray --cpus-per-run 1`), all included | {r['ray_total_s']:.1f} | "
        f"{mean(r['run_seconds_ray']):.1f} |",
        f"| of which the sweep itself | {r['ray_sweep_s']:.1f} | |",
        f"| of which Ray's start-up and shut-down | {r['ray_startup_overhead_s']:.1f} | |",
        "",
        f"**Ratio sequential / Ray: {r['ratio']:.2f}x** with Ray's start-up ({r['ratio_without_startup']:.2f}x "
        f"without). Ray's start-up: `import ray` + `ray.init` {r['ray_import_and_init_s']:.1f} s, the two workers' "
        f"first task (process start, importing torch, diffusers and the trainer) {r['ray_worker_start_s']:.1f} s, "
        f"`ray.shutdown` {r['ray_shutdown_s']:.1f} s: paid once per sweep, so it matters for a sweep of short runs "
        "only. A run's own time (mean run) is longer when two train at once (they share the cores' memory "
        "bandwidth and caches, and the cores with whatever else runs on the machine).",
        "",
        *why_not_2x(m, r),
        f"The CPU is shared with other work: load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in r['load_average_before'])} "
        f"before and {', '.join(f'{x:.2f}' for x in r['load_average_after'])} after"
        + (f"; other people's processes kept {r['other_processes_cores_sequential']:.2f} of the 2 cores busy on "
           f"average during the sequential arm and {r['other_processes_cores_ray_sweep']:.2f} during the Ray sweep "
           "(/proc/stat minus this benchmark's process tree)" if r.get("other_processes_cores_ray_sweep") is not None
           else "") +
        ". The sequential arm needs one core and the Ray arm two, so a neighbour's load slows the Ray arm and "
        "lowers the ratio below what an idle machine gives. Rerun: `flock /tmp/dbl-bench.lock env "
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_ray.py`.",
        *earlier_lines(result.get("earlier") or []),
        MARK_END,
        "",
    ])


def why_not_2x(m: dict, r: dict) -> list[str]:
    """The CPU left to each arm by other people's processes, and what the ratio per core left
    projects for an idle machine (pure; empty without the /proc figures)."""
    if r.get("other_processes_cores_ray_sweep") is None:
        return []
    cpus = m["cpus"] or 2
    seq_left = min(1.0, max(0.01, cpus - r["other_processes_cores_sequential"]))
    ray_left = min(2.0, max(0.01, cpus - r["other_processes_cores_ray_sweep"]))
    per_core = (r["sequential_s"] * seq_left) / (r["ray_sweep_s"] * ray_left)
    return [
        f"Why not 2x here: other people's processes left the sequential arm (which needs one core) "
        f"{seq_left:.2f} core(s) and the Ray sweep (which needs two) {ray_left:.2f}. Per core left, the Ray "
        f"sweep did {per_core:.2f} of the sequential arm's work rate (two runs at once share memory bandwidth and "
        f"caches; Ray's own processes take a little), which on an idle 2-core machine projects to about "
        f"{2 * per_core:.1f}x for the sweep itself: an estimate from this run's figures, not a measurement.",
        "",
    ]


def earlier_lines(earlier: list[dict]) -> list[str]:
    if not earlier:
        return []
    return ["", "Earlier runs of this script (same sweep): " + "; ".join(
        f"{e['date']}: {e['ratio']:.2f}x with start-up, {e['ratio_without_startup']:.2f}x without, load average "
        f"{e['load_average_before'][0]:.2f} before" + (f", other processes {e['other_processes_cores_ray_sweep']:.2f} "
                                                       "core(s) during the Ray sweep"
                                                       if e.get("other_processes_cores_ray_sweep") is not None else "")
        for e in earlier) + "."]


def earlier_runs(path: Path) -> list[dict]:
    """The summaries of the runs recorded in an existing sweep_ray.json (kept when it is rewritten)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    keep = ("ratio", "ratio_without_startup", "sequential_s", "ray_total_s", "load_average_before",
            "other_processes_cores_sequential", "other_processes_cores_ray_sweep")
    r = old.get("result", {})
    this = {"date": old.get("machine", {}).get("date"), **{k: r.get(k) for k in keep}} if "ratio" in r else None
    return (old.get("earlier") or []) + ([this] if this else [])


def update_benchmarks_md(path: Path, section: str) -> None:
    """Replace the section between the markers (or append it)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps per run (400: the world recipe's)")
    ap.add_argument("--runs", type=int, default=4, help="runs in the sweep (training seeds 1..N)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where sweep_ray.json goes")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    ap.add_argument("--markdown-only", action="store_true", help="measure nothing: rewrite the BENCHMARKS.md "
                    "section from <out>/sweep_ray.json")
    args = ap.parse_args(argv)
    if args.markdown_only:
        result = json.loads((args.out / "sweep_ray.json").read_text())
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the Ray workers inherit it
        work = Path(tempfile.mkdtemp(prefix="sweep-ray-"))
        try:
            result = {"machine": machine(), "result": measure(args.steps, args.runs, work)}
        finally:
            if not args.keep:
                import shutil

                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"run folders: {work}")
        result["earlier"] = earlier_runs(args.out / "sweep_ray.json")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_ray.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    print(md)
    wrote = [] if args.markdown_only else [str(args.out / "sweep_ray.json")]
    if args.out.resolve() == (ROOT / "benchmarks").resolve():
        update_benchmarks_md(ROOT / "BENCHMARKS.md", md)
        wrote.append("the Sweeps on Ray section of BENCHMARKS.md")
    print(f"wrote {' and '.join(wrote) or 'nothing'}")


if __name__ == "__main__":
    main()
