"""Comparison sheets across runs and across generation parameters.

Every sheet uses the same seed(s) in every cell, so what differs between cells is the parameter,
not the noise. Each image is saved with its sidecar beside the sheet.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from . import config as config_mod
from . import files
from .config import Config, SampleConfig
from .runs import EVAL_METRICS, LORA_FILE, load_config
from .inference import load_lora
from .sample import ImageSpec, apply_vae_options, generate, run_spec, save_with_sidecars
from .viz import labeled_grid

SPEC_FIELDS = ("lora_scale_unet", "lora_scale_text_encoder", "guidance", "steps", "seed", "negative_prompt")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def base_spec(cfg: Config, run_dir: Path, prompt: str | None = None, seed: int | None = None,
              settings: SampleConfig | None = None) -> ImageSpec:
    """The run's picture settings (or `settings`, e.g. a preset's), for one prompt and seed."""
    s = settings or cfg.sample
    return run_spec(cfg, s, run_dir / LORA_FILE, run_dir, cfg.fill(prompt or s.prompt),
                    s.seeds[0] if seed is None else seed)


class PipelineCache:
    """One base pipeline per model, with the LoRA of whichever run is asked for swapped in."""

    def __init__(self, device=None):
        self.device, self.pipes = device, {}

    def for_run(self, run_dir: Path, cfg: Config):
        from .models import load_pipeline

        if cfg.model.name not in self.pipes:
            self.pipes[cfg.model.name] = load_pipeline(cfg.model, device=self.device)
            apply_vae_options(self.pipes[cfg.model.name], cfg.sample.vae_slicing, cfg.sample.vae_tiling)
        pipe = self.pipes[cfg.model.name]
        load_lora(pipe, run_dir / LORA_FILE)
        return pipe


METRIC_NAMES = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
# toyworld runs: what the world's judge reads (subject traits present; asked class + attribute present)
JUDGE_NAMES = (("judge_subject_fidelity", "judge: subject"), ("judge_prompt_fidelity", "prompt"))


def metrics_label(run_dir: Path) -> str:
    """'DINO 0.67 CLIP-I 0.80 CLIP-T 0.30' when the run has been evaluated (marked when the metric
    models were the tiny random ones), else nothing."""
    path = Path(run_dir) / EVAL_METRICS
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    m = data.get("summary", {})
    parts = [f"{label} {m[key]:.2f}" for key, label in METRIC_NAMES if isinstance(m.get(key), (int, float))]
    judged = [f"{label} {m[key]:.2f}" for key, label in JUDGE_NAMES if isinstance(m.get(key), (int, float))]
    if not parts and not judged:
        return ""
    from .metrics import random_metric_models

    tiny = random_metric_models(data.get("settings", {}))
    lines = [" ".join(parts)] if parts else []
    lines += ["(tiny metric models: not meaningful)"] if tiny and parts else []
    lines += [" ".join(judged)] if judged else []
    return "".join("\n" + line for line in lines)


def column_prompt(template: str, cfgs: Sequence[Config]) -> str:
    """A column header: the prompt with token and class filled in; where the rows differ, '[token]'
    ('[class]') stands for each row's own (pure)."""
    from .config import fill_prompt

    tokens = {c.data.token for c in cfgs}
    classes = {c.data.class_name for c in cfgs}
    return fill_prompt(template, tokens.pop() if len(tokens) == 1 else "[token]",
                       classes.pop() if len(classes) == 1 else "[class]")


def row_label(run_dir: Path, cfg: Config, spec: ImageSpec, seeds: Sequence[int] | None = None) -> str:
    """A row's label: the run, what it trained, its picture settings (and own seeds), its metrics."""
    te = "TE on" if cfg.train.train_text_encoder else "TE off"
    label = (f"{cfg.run_name}\n{cfg.data.token}, {te}, {cfg.train.steps} steps\n"
             f"scales {spec.lora_scale_unet:g}/{spec.lora_scale_text_encoder:g}")
    if seeds is not None:
        label += "\nseeds " + " ".join(map(str, seeds))
    return label + metrics_label(run_dir) + group_label(run_dir)


def group_label(run_dir: Path) -> str:
    """'\ngroup of 3: judge: subject 0.62 ± 0.10' when the run is a replicate (its sweep folder's
    registry gives it a group) and 2 or more replicates of the group have the metric: the group's
    mean ± the half-width of its 95% t-interval (stats.py), else nothing."""
    from . import stats
    from .registry import REGISTRY, load_registry

    registry = Path(run_dir).resolve().parent / f"{REGISTRY}.jsonl"
    if not registry.is_file():
        return ""
    rows = load_registry(registry)
    group = next((r.get("group") for r in rows if r.get("run_dir") == str(Path(run_dir).resolve())), None)
    if group is None:
        return ""
    mine = [r for r in rows if r.get("group") == group]
    parts, n = [], 0
    for key, label in METRIC_NAMES + JUDGE_NAMES:
        values = [stats.number(r.get("metric_" + key)) for r in mine if r.get("status") == "finished"]
        s = stats.describe([v for v in values if v is not None])
        if s["n"] >= 2:
            parts.append(f"{label} {s['mean']:.2f} ± {s['high'] - s['mean']:.2f}")
            n = max(n, s["n"])
    return f"\ngroup of {n}: " + " ".join(parts) if parts else ""


def runs_by_prompts(run_dirs: Sequence[str | Path], out: str | Path, *, seeds: Sequence[int] | str | None = None,
                    test_prompts: Sequence[str] | None = None, cache: PipelineCache | None = None,
                    progress: bool = True) -> Path:
    """Rows: runs. Columns: the base prompt with each seed, then every test prompt with the first seed.

    Seeds: a list = the same seeds in every row; None = the first run's sample.seeds in every row;
    "own" = each run's own sample.seeds (the reference study gave every run its own generation
    seed), columns then being seed #1, #2, ... Prompts default to the first run's test prompts.
    Column headers show the prompts filled in; row labels name the run, its settings and metrics.
    """
    if not run_dirs:
        raise ValueError("runs_by_prompts needs at least one run folder (none were given: has any run finished?)")
    run_dirs = [Path(r) for r in run_dirs]
    cfgs = [load_config(r) for r in run_dirs]
    own = isinstance(seeds, str)
    if own and seeds != "own":
        raise ValueError(f"seeds={seeds!r}: give a list of seeds, None (the first run's) or 'own' (each run's)")
    shared = None if own else list(seeds or cfgs[0].sample.seeds)
    prompts = list(test_prompts if test_prompts is not None else cfgs[0].sample.test_prompts)
    cache = cache or PipelineCache()
    with files.Building(out, "runs_x_prompts") as b:  # named only when complete (a full disk leaves nothing)
        sheet = _runs_by_prompts(run_dirs, cfgs, b.tmp, own, shared, prompts, cache, progress)
    return b.final(sheet)


def _runs_by_prompts(run_dirs: list[Path], cfgs: list[Config], folder: Path, own: bool, shared, prompts: list[str],
                     cache: PipelineCache, progress: bool) -> Path:
    rows, labels, cells = [], [], []
    for run_dir, cfg in zip(run_dirs, cfgs):
        row_seeds = list(cfg.sample.seeds) if own else shared
        first = base_spec(cfg, run_dir, seed=row_seeds[0])
        specs = [replace(first, seed=s) for s in row_seeds]
        specs += [replace(first, prompt=cfg.fill(p), seed=row_seeds[0]) for p in prompts]
        images = generate(cache.for_run(run_dir, cfg), specs, batch_size=cfg.sample.batch_size, progress=progress)
        paths = save_with_sidecars(images, specs, folder, run_dir.name)
        rows.append(images)
        cells.append([p.name for p in paths])
        labels.append(row_label(run_dir, cfg, first, row_seeds if own else None))
    width = max(len(c.sample.seeds) for c in cfgs) if own else len(shared)
    if own:  # rows with fewer seeds than the widest leave their extra seed columns empty
        for i, cfg in enumerate(cfgs):
            n_base = len(cfg.sample.seeds)
            rows[i] = rows[i][:n_base] + [None] * (width - n_base) + rows[i][n_base:]
            cells[i] = cells[i][:n_base] + [None] * (width - n_base) + cells[i][n_base:]
    templates = {c.sample.prompt for c in cfgs}
    base = column_prompt(cfgs[0].sample.prompt, cfgs) if len(templates) == 1 else "each run's own prompt"
    if own:
        cols = [f"{base}\nseed #{k + 1} (the run's own)" for k in range(width)]
        cols += [f"{column_prompt(p, cfgs)}\nseed #1 (the run's own)" for p in prompts]
    else:
        cols = [f"{base}\nseed {s}" for s in shared] + [f"{column_prompt(p, cfgs)}\nseed {shared[0]}" for p in prompts]
    params = {"runs": len(run_dirs), "guidance": cfgs[0].sample.guidance, "steps": cfgs[0].sample.steps,
              "sampler": cfgs[0].sample.sampler,
              "seeds": "each run's own (in its row label)" if own else ",".join(map(str, shared))}
    title = "runs × prompts (" + ("each run with its own seeds" if own else "same seeds in every row") + ")"
    if any("[token]" in c or "[class]" in c for c in cols):
        title += "; [token]/[class] = the row's own"
    return labeled_grid(rows, labels, cols, folder / "runs_x_prompts.png", title=title, params=params,
                        cell_files=cells)


def axis_values(settings: SampleConfig, name: str, values: Sequence) -> list:
    """An axis's values read as the sample field they set and checked as `sample` checks them
    (config.validate_sample): `lora_scale_unet=5` or `steps=0` is a ConfigError naming the axis."""
    field = "seeds" if name == "seed" else name
    out = []
    for v in values:
        try:
            value = config_mod.coerce_field(f"sample.{field}", [v] if name == "seed" else v)
            config_mod.validate_sample(replace(settings, **{field: value}))
        except config_mod.ConfigError as exc:
            raise config_mod.ConfigError(f"sheet axis {name}={v}: {exc}") from None
        out.append(value[0] if name == "seed" else value)
    return out


def parameter_grid(run_dir: str | Path, out: str | Path | None = None, *,
                   rows: tuple[str, Sequence] = ("lora_scale_unet", (0.2, 0.4, 0.6, 0.8, 1.0)),
                   cols: tuple[str, Sequence] = ("guidance", (3.0, 4.5, 6.0, 7.5, 9.0)),
                   prompt: str | None = None, seed: int | None = None, settings: SampleConfig | None = None,
                   pipe=None, progress: bool = True) -> Path:
    """One run, one seed: a grid over two generation parameters (e.g. UNet scale × guidance).

    What is not on an axis comes from `settings` (default: the run's own sample config).
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    for name, _ in (rows, cols):
        if name not in SPEC_FIELDS:
            raise ValueError(f"cannot vary {name!r}: choose from {', '.join(SPEC_FIELDS)}")
    rows, cols = (rows[0], axis_values(settings or cfg.sample, *rows)), (cols[0], axis_values(settings or cfg.sample, *cols))
    first = base_spec(cfg, run_dir, prompt, seed, settings)
    specs = [replace(first, **{rows[0]: r, cols[0]: c}) for r in rows[1] for c in cols[1]]
    if pipe is None:
        pipe = PipelineCache().for_run(run_dir, cfg)
    images = generate(pipe, specs, batch_size=cfg.sample.batch_size, progress=progress)
    with files.Building(Path(out) if out else run_dir / "sheets", f"{rows[0]}_x_{cols[0]}") as b:
        folder = b.tmp  # named only when complete (a full disk leaves nothing)
        names = [p.name for p in save_with_sidecars(images, specs, folder, "img")]
        n = len(cols[1])
        grid = [images[i * n:(i + 1) * n] for i in range(len(rows[1]))]
        cells = [names[i * n:(i + 1) * n] for i in range(len(rows[1]))]
        fixed = {k: getattr(first, k) for k in SPEC_FIELDS if k not in (rows[0], cols[0])}
        sheet = labeled_grid(grid, [f"{rows[0]}\n{_fmt(v)}" for v in rows[1]],
                             [f"{cols[0]} {_fmt(v)}" for v in cols[1]], folder / f"{rows[0]}_x_{cols[0]}.png",
                             title=f'{run_dir.name}: "{first.prompt}"', params={**fixed, "sampler": first.sampler},
                             cell_files=cells)
    return b.final(sheet)
