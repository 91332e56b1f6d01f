"""Sweeps from a notebook: load a study with this machine's folders, say what has finished, train,
evaluate and tabulate.

Notebooks 02 and 04 work on a sweep spec: `load_study` reads it with this machine's folders and
the runtime's precision and optimizer where its files are silent; `sweep_status` / `finished_runs`
say which runs have finished (nothing is trained there); `sweep_results`, `evaluate_finished`,
`write_registry` and `intervals` print what was trained, evaluated and concluded, and where it
was written. `eval_settings` is the evaluation form as an EvalConfig.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import TINY_MODEL, EvalConfig
from .form import machine_overrides
from .runtime import NotebookStop, from_root, smoke

def runtime_settings(cuda: bool | None = None) -> dict[str, Any]:
    """How this runtime trains when a sweep's files do not say (pure given `cuda`): on a GPU fp16
    autocast and 8-bit AdamW (what fits a T4) and a checkpoint every 250 steps, so a disconnect
    costs little; on a CPU the package defaults (fp32, AdamW)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return {"train.mixed_precision": "no", "optim.optimizer": "adamw", "train.checkpoint_every": 250}
    return {"train.mixed_precision": "fp16", "optim.optimizer": "adamw8bit", "train.checkpoint_every": 250}


def load_study(spec: str | Path, dataset_dir: str = "", output_dir: str = "", replicates: int | None = None):
    """A sweep spec (relative = from the repository root) with this machine's folders; the runtime's
    precision, optimizer and checkpoint interval fill what the spec's files leave unset.
    `replicates` (None: the spec's) trains every run that many times (training seeds differ)."""
    from ..experiments import load_sweep

    return load_sweep(Path(from_root(spec)), machine_overrides(dataset_dir, output_dir), machine=runtime_settings(),
                      replicates=replicates)


def intervals(rows: list[dict], metrics: list[str], a: str = "", b: str = "", metric: str = "",
              by: str = "group") -> str:
    """Printed and returned: per group (a run's replicates; a run without any is its own group) and
    metric n, mean, sd and the 95% interval (experiments.summarise), then the verdict on a vs b
    (experiments.compare on `metric`, default the first) — or why there is none: a group with no
    evaluated run is named, not an error (this notebook evaluates only what has finished)."""
    from .. import stats
    from ..experiments import compare, summarise

    lines = [stats.format_summary(summarise(rows, by=by, metrics=metrics))]
    if a and b:
        try:
            lines.append(compare(rows, a, b, metric or metrics[0], by=by)["sentence"])
        except ValueError as exc:
            why = str(exc).split(" ", 1)[1] if str(exc).startswith("--") else str(exc)  # '--b exp2: ...'
            lines.append(f"no verdict on {a} vs {b}: {why}")
    else:
        lines.append("no verdict: name two groups (COMPARE_A, COMPARE_B) to compare")
    text = "\n".join(lines)
    print(text)
    return text


def sweep_status(sweep) -> tuple[dict[str, Path], list[str]]:
    """Each run of the sweep, finished (its folder) or not, printed as a table; nothing is trained."""
    from ..runs import find_finished

    done, todo = {}, []
    for run in sweep.runs:
        found = find_finished(run.config)
        if found is None:
            todo.append(run.id)
        else:
            done[run.id] = found
        c = run.config
        print(f"{run.id:<10} token={c.data.token:<6} text encoder={c.train.train_text_encoder!s:<5} "
              f"steps={c.train.steps:<5} precision={c.train.mixed_precision:<4} optimizer={c.optim.optimizer:<9} "
              f"{'finished: ' + str(found) if found else 'not trained yet'}")
    print(f"runs go to {sweep.folder}")
    return done, todo


def finished_runs(sweep, train_in: str = "02_token_sweep.ipynb") -> list[Path]:
    """The finished runs of a sweep (for evaluation), naming the missing ones; stops when none is."""
    done, todo = sweep_status(sweep)
    if not done:
        raise NotebookStop(f"none of the {len(sweep.runs)} runs of '{sweep.name}' has finished in {sweep.folder}: "
                           f"train them with {train_in} (same DATASET_DIR and OUTPUT_DIR), then run this "
                           "notebook again. This notebook evaluates; it never trains.")
    if todo:
        print(f"missing (not evaluated): {', '.join(todo)} — train with {train_in}; "
              f"evaluating the {len(done)} finished run(s)")
    return list(done.values())


def sweep_results(rows: list[dict], folder: Path) -> list[dict]:
    """After run_sweep: the registry table, where it was written, failures; stops when nothing finished."""
    from ..experiments import REGISTRY, format_registry

    print(format_registry(rows))
    for r in rows:
        if r.get("run_dir"):
            print(f"{r['id']}: {r['run_dir']}")
    print(f"registry: {folder / (REGISTRY + '.csv')}, {folder / (REGISTRY + '.jsonl')}")
    failed = [r for r in rows if r.get("status") == "failed"]
    for r in failed:
        print(f"failed: {r['id']}: {r.get('error', '')} (details in {folder / 'failures.json'})")
    done = [r for r in rows if r.get("status") == "finished"]
    if not done:
        raise NotebookStop(f"no run of this sweep finished (see above and {folder}); fix the cause and run again")
    return done


def evaluate_finished(run_dirs: list[Path], ev) -> list:
    """Evaluate each run (reusing results made with the same settings); prints what was written."""
    from ..evaluate import evaluate_runs
    from ..runs import EVAL_METRICS

    results = evaluate_runs(run_dirs, ev)
    for run_dir, r in zip(run_dirs, results):
        pictures = f"; pictures in {r.folder}" if r.folder else ""
        print(f"{Path(run_dir).name}: {Path(run_dir) / EVAL_METRICS}{pictures}")
    return results


def write_registry(folder: str | Path) -> list[dict]:
    """The sweep folder's registry, rewritten from its run folders; prints where."""
    from ..experiments import REGISTRY
    from ..experiments import write_registry as write

    folder = Path(folder)
    rows = write(folder)
    print(f"registry: {folder / (REGISTRY + '.csv')}, {folder / (REGISTRY + '.jsonl')}")
    return rows


def eval_settings(**values) -> EvalConfig:
    """The evaluation form as an EvalConfig; the smoke switch swaps in the tiny DINO/CLIP models."""
    ev = replace(EvalConfig(), **values)
    if smoke():
        ev = replace(ev, dino_model=TINY_MODEL, clip_model=TINY_MODEL, images_per_prompt=1, drift_images=2)
    return ev
