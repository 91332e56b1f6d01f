"""A sweep spec: the runs a YAML file asks for, each a validated Config (reads files, trains nothing).

A sweep spec (YAML) names a base config and the runs to make from it:

    name: study-tokens
    output_dir: runs                 # runs go to runs/study-tokens/<run id>-<timestamp>/
    base: base.yaml                  # a config file (relative to the spec) or an inline mapping
    runs: [exp1.yaml, exp2.yaml]     # explicit runs: config files, or {name: ..., set: {key: value}}
    grid:                            # and/or a grid: every combination of these values
      data.token: [sks, oue]
      train.train_text_encoder: [false, true]
    replicates: 3                    # optional: each run trained 3 times (default 1)

Relative paths (data.instance_dir and output_dir, wherever they are written: the spec, a run's
config file, a `set`, a grid or `--set`) are taken from the project root — the checkout the
package lives in (the folder holding configs/), else the nearest folder above the current one
that holds dreambooth_lab/, else the current folder — which is also where the notebooks take
them from. So `datasets/study_dog` means the same folder from the CLI, from any working folder,
and from every notebook.

Replicates (`replicates: N`, or `sweep --replicates N`): with N > 1 every run is trained N times,
as runs `<id>-r0 … <id>-r{N-1}` that differ only in train.seed: replicate 0 keeps the run's own
seed, replicate k > 0 takes `replicate_seed(seed, k)` (a hash of both, below 2**31). N = 1 changes
nothing: the same run ids and seeds as without the key.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (Config, ConfigError, Typed, from_dict, load, name_problem, plain, read_yaml,
                     with_overrides)


@dataclass
class SweepRun:
    id: str
    config: Config
    group: str | None = None  # replicates: the run id without -rK, the replicate K and the seed they derive from
    replicate: int | None = None
    group_seed: int | None = None


@dataclass
class Sweep:
    name: str
    folder: Path
    runs: list[SweepRun]
    replicates: int = 1


def replicate_seed(seed: int, k: int) -> int:
    """Training seed of replicate k of a run whose seed is `seed`: the seed itself for k = 0, else
    a hash of both below 2**31 (any library takes it; unrelated to seed + 1, which training uses
    for the class images' noise) (pure)."""
    if k == 0:
        return int(seed)
    return int(hashlib.sha256(f"{int(seed)}/replicate/{k}".encode()).hexdigest()[:8], 16) % 2**31


def replicate_id(rid: str, k: int) -> str:
    """'exp2' -> 'exp2-r0' (pure)."""
    return f"{rid}-r{k}"


def _replicates(value: Any, where: str) -> int:
    """A replicate count as written (spec or --replicates): a whole number >= 1."""
    value = value.value if isinstance(value, Typed) else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: replicates={value!r}: give a whole number >= 1 (how many times each run is "
                          "trained, with different training seeds)")
    return value


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


def project_root(start: str | Path | None = None) -> Path:
    """Where relative paths of sweeps (and the notebooks' forms) are taken from (see the module doc)."""
    here = Path(__file__).resolve().parents[1]
    if (here / "configs").is_dir():
        return here
    path = Path(start or os.getcwd()).resolve()
    for p in (path, *path.parents):
        if (p / "dreambooth_lab").is_dir():
            return p
    return path


def _from_root(path: str | Path, root: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else root / p)


def flat_keys(data: Any, prefix: str = "") -> set[str]:
    """Dotted names of the leaves of a nested mapping (pure)."""
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    out: set[str] = set()
    for key, value in data.items():
        out |= flat_keys(value, f"{prefix}{key}.")
    return out


def file_keys(path: str | Path) -> set[str]:
    """The dotted fields a config YAML sets, itself or through `extends`."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        return set()
    keys = flat_keys({k: v for k, v in data.items() if k != "extends"})
    if "extends" in data:
        keys |= file_keys(path.parent / str(data["extends"]))
    return keys


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None,
               machine: dict[str, Any] | None = None, replicates: int | None = None) -> Sweep:
    """Read a sweep spec; `overrides` (dotted keys) go on top of every run (e.g. the smoke switch).
    `machine` (dotted keys: this runtime's precision, optimizer, checkpoint interval) fills the
    fields a run's spec and config files leave unset: a value written in a file always wins.
    `replicates` (None: the spec's `replicates`, else 1) trains every run that many times."""
    path = Path(path)
    spec = read_yaml(path, keep_text=True)  # config values (base, set, grid) as written: `token: no` is "no"
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping with name, base, runs and/or grid")
    unknown = set(spec) - {"name", "output_dir", "base", "runs", "grid", "replicates"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; use name, output_dir, base, runs, grid, "
                          "replicates")
    n_rep = _replicates(replicates, "--replicates") if replicates is not None else \
        _replicates(spec["replicates"], str(path)) if spec.get("replicates") is not None else 1
    name = str(_text(spec.get("name")) or path.stem)
    if problem := name_problem(name):
        raise ConfigError(f"{path}: name={name!r} {problem}: the sweep's folder is <output_dir>/<name>, so use a "
                          "plain name such as 'study-tokens'")
    here = path.parent
    base_spec = spec.get("base")
    if isinstance(base_spec, str):
        base, base_keys = load(here / base_spec), file_keys(here / base_spec)
    elif isinstance(base_spec, dict):
        base, base_keys = from_dict(base_spec), flat_keys(base_spec)
    elif base_spec is None:
        base, base_keys = Config(), set()
    else:
        raise ConfigError(f"{path}: base must be a config file name or a mapping")

    explicit: list[tuple[str, Config, set[str]]] = []
    for i, item in enumerate(spec.get("runs") or []):
        if isinstance(item, str):
            explicit.append((Path(item).stem, load(here / item), file_keys(here / item)))
        elif isinstance(item, dict) and "name" in item:
            cfg, keys = (load(here / item["config"]), file_keys(here / item["config"])) if "config" in item \
                else (base, base_keys)
            explicit.append((str(_text(item["name"])), with_overrides(cfg, item.get("set") or {}),
                             keys | set(item.get("set") or {})))
        else:
            raise ConfigError(f"{path}: runs[{i}] must be a config file or a mapping with 'name' (and 'config'/'set')")
    grid = expand_grid(spec.get("grid") or {})
    runs: list[tuple[str, Config, set[str]]] = []
    if explicit:
        for rid, cfg, keys in explicit:  # a grid, when given too, varies every explicit run
            runs += [(rid if not values else f"{rid}_{run_id(plain(values))}", with_overrides(cfg, values), keys | set(values))
                     for values in grid]
    elif spec.get("grid"):
        runs = [(run_id(plain(values)), with_overrides(base, values), base_keys | set(values)) for values in grid]
    else:
        raise ConfigError(f"{path}: the sweep has no runs: add 'runs' and/or 'grid'")
    ids = [rid for rid, _, _ in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: run ids repeat ({ids}); give explicit runs distinct names")

    root = project_root()
    folder = Path(_from_root(_text(spec.get("output_dir")) or base.train.output_dir, root)) / name
    if overrides and overrides.get("train.output_dir"):
        folder = Path(_from_root(str(_text(overrides["train.output_dir"])), root)) / name
    out = []
    for rid, cfg, keys in runs:
        cfg = with_overrides(cfg, {k: v for k, v in (machine or {}).items() if k not in keys})
        cfg = with_overrides(cfg, {k: v for k, v in (overrides or {}).items() if k != "train.output_dir"})
        cfg = with_overrides(cfg, {"train.output_dir": str(folder),
                                   "data.instance_dir": _from_root(cfg.data.instance_dir, root)})
        if n_rep == 1:
            out.append(SweepRun(rid, with_overrides(cfg, {"train.name": rid}).validate()))
            continue
        seed = cfg.train.seed
        for k in range(n_rep):
            rep_id = replicate_id(rid, k)
            rep_cfg = with_overrides(cfg, {"train.name": rep_id, "train.seed": replicate_seed(seed, k)})
            out.append(SweepRun(rep_id, rep_cfg.validate(), group=rid, replicate=k, group_seed=seed))
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: run ids repeat once replicated ({ids}); give explicit runs distinct names")
    return Sweep(name, folder, out, n_rep)


def _text(value: Any) -> Any:
    """A name or folder of the spec as written (`name: 2024` is "2024", `name: null` nothing)."""
    return (value.text if value.value is not None else None) if isinstance(value, Typed) else value


def select_runs(sweep: Sweep, only: str | list[str] | None) -> Sweep:
    """The sweep cut to the named runs ('exp2,exp8' or a list), in the spec's order (pure). A
    replicated run's name picks all its replicates; 'exp2-r1' picks one."""
    if not only:
        return sweep
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only) if w.strip()]
    known = list(dict.fromkeys([r.group for r in sweep.runs if r.group] + [r.id for r in sweep.runs]))
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: no such run in sweep '{sweep.name}'; its runs are "
                          f"{', '.join(known)}")
    return Sweep(sweep.name, sweep.folder, [r for r in sweep.runs if r.id in wanted or r.group in wanted],
                 sweep.replicates)
