"""Sweeps and the run registry.

A sweep spec (YAML) names a base config and the runs to make from it:

    name: study-tokens
    output_dir: runs                 # runs go to runs/study-tokens/<run id>-<timestamp>/
    base: base.yaml                  # a config file (relative to the spec) or an inline mapping
    runs: [exp1.yaml, exp2.yaml]     # explicit runs: config files, or {name: ..., set: {key: value}}
    grid:                            # and/or a grid: every combination of these values
      data.token: [sks, oue]
      train.train_text_encoder: [false, true]

Runs execute one after another and share the class-image cache. A run whose exact training
config already finished is skipped; an interrupted one resumes from its checkpoint, so a Colab
disconnect costs at most the run in flight. The registry is derived from the run folders
themselves (config.yaml, summary.json, metrics.json), so it can never disagree with them.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import files
from .config import Config, ConfigError, from_dict, load, read_yaml, with_overrides

REGISTRY = "registry"
FAILURES = "failures.json"


@dataclass
class SweepRun:
    id: str
    config: Config


@dataclass
class Sweep:
    name: str
    folder: Path
    runs: list[SweepRun]


def expand_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order the keys are written (pure)."""
    if not grid:
        return [{}]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_id(values: dict[str, Any]) -> str:
    """A readable folder-safe id such as 'token=sks_train_text_encoder=true' (pure)."""
    parts = []
    for key, value in values.items():
        short = key.rsplit(".", 1)[-1]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{short}={text}")
    raw = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=_.-" else "-" for c in raw)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read a sweep spec; `overrides` (dotted keys) go on top of every run (e.g. the smoke switch)."""
    path = Path(path)
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping with name, base, runs and/or grid")
    unknown = set(spec) - {"name", "output_dir", "base", "runs", "grid"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; use name, output_dir, base, runs, grid")
    name = str(spec.get("name") or path.stem)
    here = path.parent
    base_spec = spec.get("base")
    if isinstance(base_spec, str):
        base = load(here / base_spec)
    elif isinstance(base_spec, dict):
        base = from_dict(base_spec)
    elif base_spec is None:
        base = Config()
    else:
        raise ConfigError(f"{path}: base must be a config file name or a mapping")

    explicit: list[tuple[str, Config]] = []
    for i, item in enumerate(spec.get("runs") or []):
        if isinstance(item, str):
            explicit.append((Path(item).stem, load(here / item)))
        elif isinstance(item, dict) and "name" in item:
            cfg = load(here / item["config"]) if "config" in item else base
            explicit.append((str(item["name"]), with_overrides(cfg, item.get("set") or {})))
        else:
            raise ConfigError(f"{path}: runs[{i}] must be a config file or a mapping with 'name' (and 'config'/'set')")
    grid = expand_grid(spec.get("grid") or {})
    runs: list[tuple[str, Config]] = []
    if explicit:
        for rid, cfg in explicit:  # a grid, when given too, varies every explicit run
            runs += [(rid if not values else f"{rid}_{run_id(values)}", with_overrides(cfg, values)) for values in grid]
    elif spec.get("grid"):
        runs = [(run_id(values), with_overrides(base, values)) for values in grid]
    else:
        raise ConfigError(f"{path}: the sweep has no runs: add 'runs' and/or 'grid'")
    ids = [rid for rid, _ in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: run ids repeat ({ids}); give explicit runs distinct names")

    folder = Path(spec.get("output_dir") or base.train.output_dir) / name
    if overrides and overrides.get("train.output_dir"):
        folder = Path(overrides["train.output_dir"]) / name
    out = []
    for rid, cfg in runs:
        cfg = with_overrides(cfg, {k: v for k, v in (overrides or {}).items() if k != "train.output_dir"})
        cfg = with_overrides(cfg, {"train.output_dir": str(folder), "train.name": rid})
        out.append(SweepRun(rid, cfg.validate()))
    return Sweep(name, folder, out)


def run_sweep(sweep: Sweep, *, progress: bool = True, on_run: Callable[[str, str], None] | None = None) -> list[dict]:
    """Train every run that has not finished; returns the registry rows of the sweep's folder.

    on_run(run_id, status) is called after each run with 'skipped', 'finished' or 'failed'.
    A failing run is recorded (failures.json) and the sweep goes on with the next.
    """
    from .train import find_finished, train

    sweep.folder.mkdir(parents=True, exist_ok=True)
    failures = _read_failures(sweep.folder)
    for i, run in enumerate(sweep.runs, 1):
        if find_finished(run.config) is not None:
            status = "skipped"
        else:
            if progress:
                print(f"[{i}/{len(sweep.runs)}] {run.id}")
            t0 = time.time()
            try:
                train(run.config, resume="auto", progress=progress)
                failures.pop(run.id, None)
                status = "finished"
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next run
                failures[run.id] = {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.time() - t0, 2),
                                    "config_hash": run.config.hash()}
                status = "failed"
                if progress:
                    print(f"    failed: {failures[run.id]['error']}")
            if failures or (sweep.folder / FAILURES).exists():
                files.write_json(sweep.folder / FAILURES, failures)
        write_registry(sweep.folder)
        if on_run:
            on_run(run.id, status)
    return write_registry(sweep.folder)


def _read_failures(folder: Path) -> dict:
    path = folder / FAILURES
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- the registry ------------------------------------------------------------------------------

COLUMNS = ["id", "status", "config_hash", "token", "class", "train_text_encoder", "lr_unet", "lr_text_encoder",
           "steps", "rank", "batch_size", "seed", "prior", "dataset", "model", "seconds", "final_loss",
           "final_instance_loss", "final_prior_loss", "eval_instance_loss_before", "eval_instance_loss_after",
           "run_dir", "lora"]


def run_row(run_dir: Path) -> dict:
    """One registry row from a run folder (its config, summary, last metrics and any metrics.json)."""
    from .train import METRICS, SUMMARY, read_metrics

    cfg = load(run_dir / "config.yaml")
    summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    last = (read_metrics(run_dir) or [{}])[-1] if (run_dir / METRICS).is_file() else {}
    name = cfg.run_name
    row = {
        "id": name, "status": summary.get("status", "interrupted"), "config_hash": cfg.hash(),
        "token": cfg.data.token, "class": cfg.data.class_name, "train_text_encoder": cfg.train.train_text_encoder,
        "lr_unet": cfg.optim.lr_unet, "lr_text_encoder": cfg.optim.lr_text_encoder, "steps": cfg.train.steps,
        "rank": cfg.lora.rank, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
        "prior": cfg.prior.enabled, "dataset": cfg.data.instance_dir, "model": cfg.model.name,
        "seconds": summary.get("seconds"), "final_loss": last.get("loss"),
        "final_instance_loss": last.get("instance_loss"), "final_prior_loss": last.get("prior_loss"),
        "eval_instance_loss_before": summary.get("eval_instance_loss_before"),
        "eval_instance_loss_after": summary.get("eval_instance_loss_after"),
        "run_dir": str(run_dir), "lora": str(run_dir / "pytorch_lora_weights.safetensors") if summary else None,
    }
    metrics_file = run_dir / "metrics.json"  # written by `evaluate`
    if metrics_file.is_file():
        for key, value in json.loads(metrics_file.read_text()).get("summary", {}).items():
            row[f"metric_{key}"] = value
    return row


def scan_runs(root: str | Path) -> list[dict]:
    """Registry rows for every run folder under root (any depth), in the order they started."""
    root = Path(root)
    rows = []
    for cfg_file in sorted(root.rglob("config.yaml"), key=lambda p: (p.stat().st_mtime, str(p))):
        run_dir = cfg_file.parent
        if run_dir.name.startswith(".") or "checkpoints" in run_dir.parts:
            continue
        try:
            rows.append(run_row(run_dir))
        except (ConfigError, OSError, json.JSONDecodeError):
            continue
    for rid, failure in _read_failures(root).items():
        rows.append({"id": rid, "status": "failed", "config_hash": failure.get("config_hash"),
                     "error": failure.get("error"), "seconds": failure.get("seconds")})
    return rows


def write_registry(root: str | Path) -> list[dict]:
    """Write <root>/registry.jsonl and registry.csv from the run folders; return the rows."""
    root = Path(root)
    rows = scan_runs(root)
    files.write_text(root / f"{REGISTRY}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    columns = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(root / f"{REGISTRY}.csv", buf.getvalue())
    return rows


def load_registry(path: str | Path) -> list[dict]:
    """The registry as a list of dicts (a folder, or its registry.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{REGISTRY}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_registry(rows: list[dict], columns: tuple[str, ...] = ("id", "status", "token", "train_text_encoder",
                                                                   "steps", "final_loss", "seconds")) -> str:
    """A plain-text table of chosen columns (pure)."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    widths = [max([len(c)] + [len(cell(r.get(c))) for r in rows]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)
