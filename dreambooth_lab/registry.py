"""The registry of a sweep folder's runs: one row per run, read from the run folders themselves.

A row comes from a run folder's config.yaml, summary.json, metrics.jsonl and (once evaluated)
metrics.json, so the registry can never disagree with the folders; a run that failed is a row
from the sweep folder's failures.json, and replicates.json adds each replicate's columns group,
replicate, training_seed and group_seed (`seed` is always the training seed; the sampling seeds
are `generation_seeds`). `write_registry` writes registry.jsonl and registry.csv under the sweep
folder's file lock; `load_registry` reads either back. Summaries with intervals and verdicts across
replicates: `summarise` and `compare` (the method: stats.py); a metric against one column:
`axis_sheet`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from . import files, runs, stats
from .config import ConfigError, experiment_axes, load

REGISTRY = "registry"
FAILURES = "failures.json"
REPLICATES = "replicates.json"


def read_failures(folder: Path) -> dict:
    """The sweep folder's failures.json: run id -> error, seconds and config hash of its last failure."""
    path = Path(folder) / FAILURES
    return json.loads(path.read_text()) if path.is_file() else {}


def read_replicates(folder: str | Path) -> dict:
    """The sweep folder's replicates.json: run id -> group, replicate and seeds."""
    path = Path(folder) / REPLICATES
    return json.loads(path.read_text()) if path.is_file() else {}


def registry_lock(folder: str | Path):
    """The sweep folder's file lock (.registry.lock): failures.json and the registry are read and
    rewritten under it, so two sweep processes never interleave their writes."""
    from filelock import FileLock

    folder = Path(folder)
    with files.disk_full_as(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".registry.lock"))


# ---- the rows ----------------------------------------------------------------------------------

REPLICATE_COLUMNS = ["group", "replicate", "training_seed", "group_seed"]  # after "id", in replicated sweeps
COLUMNS = ["id", "status", "config_hash", "token", "class", "train_text_encoder", "lr_unet", "lr_text_encoder",
           "steps", "rank", "batch_size", "seed", "resolution", "prior", "class_images", "class_images_generated",
           "lora_scale_unet", "lora_scale_text_encoder", "guidance", "generation_seeds", "dataset", "photos",
           "dataset_digest", "model", "family", "seconds", "final_loss", "final_instance_loss", "final_prior_loss",
           "eval_instance_loss_before", "eval_instance_loss_after", "run_dir", "lora"]


def _absolute(path: str) -> str:
    """A path as an absolute one (a relative one against the current folder)."""
    return str(Path(path).expanduser().resolve())


def _model_path(name: str) -> str:
    """A local model folder as an absolute path; a hub id or a built-in name as it is."""
    return _absolute(name) if Path(name).expanduser().exists() else name


def run_row(run_dir: Path) -> dict:
    """One registry row from a run folder (its config, identity, summary, last metrics and any metrics.json).

    Paths are absolute, so a row still finds its files when read from another folder; generation
    seeds are written as one string ("5 6") so that the CSV cell is one value.
    """
    run_dir = Path(run_dir).resolve()
    cfg = load(run_dir / runs.CONFIG)
    summary = json.loads((run_dir / runs.SUMMARY).read_text()) if (run_dir / runs.SUMMARY).is_file() else {}
    last = (runs.read_metrics(run_dir) or [{}])[-1] if (run_dir / runs.METRICS).is_file() else {}
    identity = runs.read_identity(run_dir)
    digest = summary.get("dataset_digest") or (identity.dataset_digest if identity else None)
    photos = summary.get("photos") or (len(identity.dataset) if identity else None)
    lora = run_dir / runs.LORA_FILE
    row = {
        "id": cfg.run_name, "status": summary.get("status", "interrupted"), "config_hash": cfg.hash(),
        "token": cfg.data.token, "class": cfg.data.class_name, "train_text_encoder": cfg.train.train_text_encoder,
        "lr_unet": cfg.optim.lr_unet, "lr_text_encoder": cfg.optim.lr_text_encoder, "steps": cfg.train.steps,
        "rank": cfg.lora.rank, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
        "resolution": cfg.resolution, "prior": cfg.prior.enabled,
        "class_images": cfg.prior.num_class_images if cfg.prior.enabled else 0,
        "class_images_generated": summary.get("class_images_generated"),
        "lora_scale_unet": cfg.sample.lora_scale_unet, "lora_scale_text_encoder": cfg.sample.lora_scale_text_encoder,
        "guidance": cfg.sample.guidance, "generation_seeds": " ".join(str(x) for x in cfg.sample.seeds),
        "dataset": _absolute(cfg.data.instance_dir), "photos": photos, "dataset_digest": digest,
        "model": _model_path(cfg.model.name), "family": summary.get("family"), "seconds": summary.get("seconds"), "final_loss": last.get("loss"),
        "final_instance_loss": last.get("instance_loss"), "final_prior_loss": last.get("prior_loss"),
        "eval_instance_loss_before": summary.get("eval_instance_loss_before"),
        "eval_instance_loss_after": summary.get("eval_instance_loss_after"),
        "run_dir": str(run_dir), "lora": str(lora) if summary and lora.is_file() else None,
        **experiment_axes(cfg),
    }
    metrics_file = run_dir / runs.EVAL_METRICS  # written by `evaluate`
    if metrics_file.is_file():
        from .metrics import random_metric_models  # torch

        evaluation = json.loads(metrics_file.read_text())
        for key, value in evaluation.get("summary", {}).items():
            row[f"metric_{key}"] = value
        settings = evaluation.get("settings", {})
        if settings.get("dino_model") or settings.get("clip_model"):
            row["metric_models"] = f"{settings.get('dino_model')}, {settings.get('clip_model')}" + (
                " (random weights): NOT MEANINGFUL" if random_metric_models(settings) else "")
    return row


def scan_runs(root: str | Path) -> list[dict]:
    """Registry rows for every run folder under root (any depth), in the order they started."""
    from .checkpoint import CHECKPOINTS  # torch

    root = Path(root)
    rows = []
    for cfg_file in sorted(root.rglob(runs.CONFIG), key=lambda p: (p.stat().st_mtime, str(p))):
        run_dir = cfg_file.parent
        if run_dir.name.startswith(".") or CHECKPOINTS in run_dir.parts:
            continue
        try:
            rows.append(run_row(run_dir))
        except (ConfigError, OSError, json.JSONDecodeError):
            continue
    for rid, failure in read_failures(root).items():
        rows.append({"id": rid, "status": "failed", "config_hash": failure.get("config_hash"),
                     "error": failure.get("error"), "seconds": failure.get("seconds"), "_folder": str(root.resolve())})
    rows = one_row_per_run(rows)
    replicates = read_replicates(root)
    for row in rows:
        if row["id"] in replicates:
            rep = replicates[row["id"]]
            row.update({k: rep.get(k) for k in REPLICATE_COLUMNS})
            if "seed" in row:  # the folder's own config says which seed trained it
                row["training_seed"] = row["seed"]
    return rows


RANK = {"finished": 0, "interrupted": 1}  # which row of one run the registry keeps; any other status after these


def one_row_per_run(rows: list[dict]) -> list[dict]:
    """One row per run: of rows with the same folder, id and config hash (twin folders of one
    configuration, or a failure recorded beside the folder that later finished) the finished one,
    else the open one, else the newest; in the order of the rows kept (pure but for `_folder`)."""
    def key(row: dict) -> tuple:
        folder = row.pop("_folder", None)
        if row.get("run_dir"):
            folder = str(Path(row["run_dir"]).parent)
        return folder, row.get("id"), row.get("config_hash")

    best: dict[tuple, tuple[int, int]] = {}
    keys = [key(r) for r in rows]
    for i, (k, row) in enumerate(zip(keys, rows)):
        rank = (RANK.get(row.get("status"), 2), -i)  # the better status, then the later row
        if k not in best or rank < best[k]:
            best[k] = rank
    keep = {-rank[1] for rank in best.values()}
    return [r for i, r in enumerate(rows) if i in keep]


def write_registry(root: str | Path) -> list[dict]:
    """Write <root>/registry.jsonl and registry.csv from the run folders; return the rows. The folders
    are read and both files replaced under the folder's file lock, so that of two sweep processes
    the later write is always the fresher one."""
    root = Path(root)
    with registry_lock(root):
        return _write_registry(root)


def _write_registry(root: Path) -> list[dict]:
    rows = scan_runs(root)
    files.write_text(root / f"{REGISTRY}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    head = COLUMNS[:1] + REPLICATE_COLUMNS + COLUMNS[1:] if any("group" in r for r in rows) else COLUMNS
    columns = head + sorted({k for r in rows for k in r} - set(head))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(root / f"{REGISTRY}.csv", buf.getvalue())
    return rows


def load_registry(path: str | Path) -> list[dict]:
    """The registry as a list of dicts (a sweep folder, its registry.jsonl or its registry.csv)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / f"{REGISTRY}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no registry there: give a sweep folder, its registry.jsonl or registry.csv "
                                "(`python -m dreambooth_lab sweep SPEC` writes them)")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(text: str) -> Any:
    """A registry.csv cell back as the value registry.jsonl holds ('' None, 'True', '0.5', '7')."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def summarise(rows: list[dict], by: str | list[str] = "group", metrics: list[str] | None = None) -> list[dict]:
    """Per group and metric: n, mean, sd and the 95% t-interval across replicates (stats.summarise)."""
    return stats.summarise(rows, by=by, metrics=metrics)


def compare(rows: list[dict], a: str, b: str, metric: str, by: str | list[str] = "group") -> dict:
    """Whether groups a and b differ on metric: a − b, its Welch 95% interval and a sentence
    (stats.compare)."""
    return stats.compare(rows, a, b, metric, by=by)


def format_registry(rows: list[dict], columns: tuple[str, ...] = ("id", "status", "token", "train_text_encoder",
                                                                   "steps", "final_loss", "seconds")) -> str:
    """A plain-text table of chosen columns (pure)."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    widths = [max([len(c)] + [len(cell(r.get(c))) for r in rows]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def metrics_note(rows: list[dict], random_models: set[str] | None = None) -> str:
    """A line to print under a metrics table when any of its scores came from the tiny metric
    models with random weights (which say nothing about a run), else '' (pure)."""
    if not (random_models or any(str(r.get("metric_models", "")).endswith("NOT MEANINGFUL") for r in rows)):
        return ""
    which = ", ".join(sorted(random_models or ())) or "eval.dino_model / eval.clip_model = tiny"
    return (f"note: scores marked NOT MEANINGFUL come from tiny metric models with random weights ({which}): they "
            "show that the pipeline runs, not how good a run is. For real numbers use the defaults "
            "(facebook/dino-vits16, openai/clip-vit-base-patch32).")


# settings named under an axis plot: the value when every run shares it, else listed as varying
AXIS_PARAMS = ("model", "token", "class", "train_text_encoder", "steps", "lr_unet", "lr_text_encoder", "rank",
               "batch_size", "resolution", "prior", "lora_scale_unet", "lora_scale_text_encoder", "guidance",
               "generation_seeds")


def axis_sheet(registry: str | Path, axis: str, metric: str, out: str | Path | None = None) -> Path:
    """A metric against one registry column (`sheet axis`): each run a dot, per axis value the mean
    with its 95% t-interval across runs. Written to <sweep folder>/axis_<axis>_<metric>.png (or
    `out`) with a .json of the numbers beside; settings that also vary are named under it."""
    from .viz import metric_vs_axis  # matplotlib

    registry = Path(registry).expanduser()
    rows = [r for r in load_registry(registry) if r.get("status", "finished") == "finished"]
    column = stats.metric_column(rows, metric)
    if not any(axis in r for r in rows):
        there = sorted({k for r in rows for k in r if not k.startswith("metric_")})
        raise ValueError(f"--axis {axis}: not a column of {registry}; columns there: {', '.join(there)}")
    summary = stats.summarise(rows, by=axis, metrics=[column])
    if not summary:
        raise ValueError(f"--metric {metric}: no finished run in {registry} has a value for it")
    used = [r for r in rows if stats.number(r.get(column)) is not None]
    fixed = {c: used[0].get(c) for c in AXIS_PARAMS if c != axis and len({str(r.get(c)) for r in used}) == 1
             and used[0].get(c) is not None}
    varying = [c for c in AXIS_PARAMS if c != axis and len({str(r.get(c)) for r in used}) > 1]
    groups = sorted({str(stats.group_of(r)) for r in used})
    params = {"registry": str(registry), "axis": axis, "metric": column, "runs": len(used), "settings": len(groups),
              "interval": "95% t across runs (a run is the unit)", **fixed}
    if varying:
        params["also varies (pooled per point)"] = " ".join(varying)
    name = column[len("metric_"):] if column.startswith("metric_") else column
    folder = registry if registry.is_dir() else registry.parent
    path = Path(out) if out else folder / f"axis_{axis}_{name}.png"
    files.write_json(path.with_suffix(".json"), {"axis": axis, "metric": column, "params": params, "points": [
        {k: s[k] for k in ("group", "n", "mean", "sd", "low", "high", "values")} for s in summary]})
    return metric_vs_axis([(s["group"], s["values"], s) for s in summary], path, axis=axis, metric=name,
                          title=f"{name} against {axis} ({len(used)} runs)", params=params)
