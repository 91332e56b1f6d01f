"""Replicated world studies: every setting trained N times, read by the judge, summarised with
95% intervals and compared with a verdict (#23).

A setting is a Config; its replicates are the runs `<name>-r0 … -r{N-1}` that differ only in
train.seed, derived as a sweep derives them (`sweep_spec.replicate_seed`: replicate 0 keeps the
setting's seed). Each run becomes one row — the unit of every interval — with the judge's
readings at one LoRA scale (`judged`); `stats.summarise` / `stats.compare` do the arithmetic
(the method is written down in stats.py). The notebooks (05, 06) and the world benchmarks
(benchmarks/world.py's token study, benchmarks/world_axes.py) share these functions, so a table
and its "what we found" sentences come from the same numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .. import stats
from ..config import Config, with_overrides
from ..sweep_spec import replicate_id, replicate_seed

# what the judge reads from one run, per row (names are the rows' columns)
METRICS = ("subject", "prompt", "subject_and_prompt", "drift", "class_diversity")
# the four test prompts, composed with the subject ("both" = the subject's traits AND the asked attribute)
TESTS = {"t-shirt": "in red t-shirts", "van gogh": "in the style of van gogh", "forest": "in the forest",
         "driving": "driving car"}
VERBS = {
    "subject": "binds the subject better than",
    "prompt": "follows the test prompts better than",
    "subject_and_prompt": "composes the subject with the test prompts better than",
    "drift": "leaks the subject into the plain class prompt more than",
    "class_diversity": "keeps plain class pictures more varied than",
    "subject_diversity": "varies the subject's pictures more than",
    "seconds": "takes longer than",
    **{name: f"draws the subject {phrase} more often than" for name, phrase in TESTS.items()},
}
DIGITS = {"class_diversity": 3, "subject_diversity": 3, "seconds": 0}


# ---- replicates of one setting ---------------------------------------------------------------------

def replicate_configs(cfg: Config, n: int) -> list[Config]:
    """The setting's n replicates: train.seed as a sweep's replicates take it (replicate 0 keeps
    cfg's seed) and train.name `<name>-rK`; n = 1 is the setting itself, unchanged (pure)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"replicates={n!r}: give a whole number >= 1 (how many times each setting is trained)")
    if n == 1:
        return [cfg]
    return [with_overrides(cfg, {"train.name": replicate_id(cfg.train.name, k),
                                 "train.seed": replicate_seed(cfg.train.seed, k)}) for k in range(n)]


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else float("nan")


def judged(numbers: dict) -> dict:
    """One run's row from study.summarise's output: subject ("a <tok> <class>" shows the subject),
    prompt (the test prompts' asked attribute, mean of four), subject_and_prompt (both at once,
    mean of four), drift ("a <class>" shows the subject), class_diversity, subject_diversity, and
    per test prompt (t-shirt, van gogh, forest, driving) the subject AND its asked attribute (pure)."""
    both = numbers["test_prompts_subject_and_asked"]
    out = {"subject": numbers["subject_rate"], "prompt": _mean(numbers["test_prompts_asked"].values()),
           "subject_and_prompt": _mean(both.values()), "drift": numbers["drift_subject_rate_in_class_prompt"],
           "class_diversity": numbers["class_diversity"], "subject_diversity": numbers["subject_diversity"]}
    for name, phrase in TESTS.items():
        out.update({name: v for prompt, v in both.items() if prompt.endswith(phrase)})
    return out


def warm_class_images(pipe, cfg: Config) -> int:
    """Make cfg's class images (prior preservation's) with `pipe`, the loaded base world model, before
    any run is timed, so that the first run's seconds are training like the others'; returns how
    many were made (0: none needed, or the cache had them)."""
    from ..prior import ensure_class_images

    if not (cfg.prior.enabled and cfg.prior.loss_weight > 0 and cfg.prior.target == "class_images"):
        return 0
    return ensure_class_images(cfg, lambda: pipe, progress=False).generated


def world_measure(pipe, seeds: Sequence[int], scale: float, *, progress: bool = False,
                  reuse_finished: bool = True, keep_images: bool = False) -> Callable[[Config], dict]:
    """measure(cfg) for `run_replicates`: train the run (a finished one of the same config is
    reused), read it with study.read_run at `scale` on `seeds`, and return its row's numbers
    (`judged`), the training's wall time (seconds; 0-ish for a reused run), the run folder and,
    with keep_images, the pictures."""
    from ..train import train
    from . import study

    def measure(cfg: Config) -> dict:
        t0 = time.time()
        res = train(cfg, reuse_finished=reuse_finished, resume=None if not reuse_finished else "auto",
                    progress=progress)
        secs = time.time() - t0
        reading = study.read_run(pipe, res.run_dir, cfg, list(seeds), scale=scale)
        row = {"seconds": round(secs, 1), "final_loss": res.final_loss, "run_dir": str(res.run_dir),
               "class_images_generated": res.class_images_generated,
               **judged(study.summarise(reading, cfg))}
        if keep_images:
            row["images"] = reading["images"]
        return row

    return measure


def run_replicates(settings: dict[str, Config], replicates: int, measure: Callable[[Config], dict], *,
                   columns: dict[str, dict] | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """Every setting trained `replicates` times and measured: one row per run with id, group (the
    setting's name), replicate, training_seed, status 'finished', the setting's `columns` and what
    `measure` returned — the rows stats.summarise and stats.compare read (group = setting)."""
    rows = []
    for group, cfg in settings.items():
        for k, rcfg in enumerate(replicate_configs(cfg, replicates)):
            numbers = measure(rcfg)
            row = {"id": replicate_id(group, k) if replicates > 1 else group, "group": group, "replicate": k,
                   "training_seed": rcfg.train.seed, "status": "finished", **(columns or {}).get(group, {}),
                   **numbers}
            rows.append(row)
            if log:
                shown = ", ".join(f"{m} {row[m]:.2f}" for m in ("subject", "prompt", "drift") if m in row)
                log(f"  {row['id']} (training seed {rcfg.train.seed}): "
                    + (f"{row['seconds']:.0f} s, " if "seconds" in row else "") + shown)
    return rows


# ---- tables and verdicts ---------------------------------------------------------------------------

def cell(d: dict, digits: int = 2) -> str:
    """A summary as 'mean [low, high]' (its 95% interval), 'mean (n = 1)' without one (pure)."""
    if d["mean"] is None:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:.{digits}f} (n = 1)"
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def summary_table(rows: Sequence[dict], metrics: Sequence[str] = METRICS, by: str = "group",
                  order: Sequence[str] | None = None, head: str = "setting") -> str:
    """A markdown table: per group n and, per metric, the mean with its 95% t-interval across the
    runs (`cell`); groups in `order` (default: as they first occur in rows) (pure)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status", "finished") == "finished":
            groups.setdefault(str(stats.group_of(r, by)), []).append(r)
    keys = list(order) if order is not None else list(groups)
    out = [f"| {head} | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for key in keys:
        runs = groups.get(key, [])
        cells = []
        for m in metrics:
            values = [v for v in (stats.number(r.get(m)) for r in runs) if v is not None]
            cells.append(cell(stats.describe(values), DIGITS.get(m, 2)))
        out.append(f"| {key} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def verdicts(rows: Sequence[dict], pairs: Sequence[tuple[str, str]], metrics: Sequence[str],
             by: str = "group") -> list[dict]:
    """stats.compare for every pair (a, b) and metric, with the world's verbs (pure)."""
    return [stats.compare(rows, a, b, m, by=by, verb=VERBS.get(m)) for a, b in pairs for m in metrics]


def _d(v: dict) -> int:
    return DIGITS.get(v["metric"], 2)


def findings(rows: Sequence[dict], pairs: Sequence[tuple[str, str]], metrics: Sequence[str],
             by: str = "group") -> list[str]:
    """One line per pair: 'a vs b (n = 3 each, 95% intervals):', then every difference whose 95%
    interval excludes 0 as stats.compare words it ("a binds the subject better than b by 0.21 [0.08,
    0.34]"), then "no difference shown (a − b):" the other metrics, each with a − b and its interval;
    a metric without an interval (n = 1) says why (pure)."""
    lines = []
    for a, b in pairs:
        vs = verdicts(rows, [(a, b)], metrics, by)
        said = [v["sentence"].rsplit(" (", 1)[0] for v in vs if v["verdict"] == "different"]
        none = [f"{v['metric']} {v['difference']:+.{_d(v)}f} [{v['low']:.{_d(v)}f}, {v['high']:.{_d(v)}f}]" for v in vs
                if v["verdict"] == "no difference shown"]
        if none:
            said.append("no difference shown (a − b): " + ", ".join(none))
        said += [v["sentence"] for v in vs if v["verdict"] == "no interval"]
        n_a, n_b = vs[0]["n_a"], vs[0]["n_b"]
        n_text = f"n = {n_a} each" if n_a == n_b else f"n = {n_a} and {n_b}"
        lines.append(f"{a} vs {b} ({n_text}, 95% intervals): " + "; ".join(said) + ".")
    return lines


def report(rows: Sequence[dict], pairs: Sequence[tuple[str, str]], metrics: Sequence[str] = METRICS,
           by: str = "group", verdict_metrics: Sequence[str] | None = None) -> str:
    """The interval table and the verdicts under it, as a notebook prints them (pure)."""
    n = sorted({len([r for r in rows if stats.group_of(r, by) == g]) for g in {stats.group_of(r, by) for r in rows}})
    lines = [summary_table(rows, metrics, by), "",
             f"mean [95% t-interval] over {'/'.join(map(str, n))} runs per setting (training seeds differ; a run is "
             "the unit). What differs (Welch 95% interval of the difference; claimed only when it excludes 0):"]
    lines += [f"- {line}" for line in findings(rows, pairs, verdict_metrics or metrics, by)]
    return "\n".join(lines)


def single_run_survival(single: dict[str, dict], rows: Sequence[dict], pairs: Sequence[tuple[str, str]],
                        metrics: Sequence[str], threshold: float = 0.25, by: str = "group") -> dict:
    """Which differences that single runs showed (one run per setting: single[group][metric];
    |a − b| ≥ threshold) the replicated rows confirm: verdict 'different' with the same sign.
    Returns {threshold, findings: [{a, b, metric, single, replicated, low, high, holds}], held, of} (pure)."""
    found = []
    for a, b in pairs:
        for m in metrics:
            if a not in single or b not in single or m not in single[a] or m not in single[b]:
                continue
            d = single[a][m] - single[b][m]
            if abs(d) < threshold - 1e-9:
                continue
            v = stats.compare(rows, a, b, m, by=by, verb=VERBS.get(m))
            holds = v["verdict"] == "different" and (v["difference"] > 0) == (d > 0)
            found.append({"a": a, "b": b, "metric": m, "single": d, "replicated": v["difference"], "low": v["low"],
                          "high": v["high"], "holds": holds})
    return {"threshold": threshold, "findings": found, "held": sum(f["holds"] for f in found), "of": len(found)}


# ---- the token x text-encoder study, replicated -----------------------------------------------------

def token_group(token: str, text_encoder: bool) -> str:
    """'sks-te' (text encoder trained) / 'sks-unet' (frozen): a setting's name in the token study."""
    return f"{token}-{'te' if text_encoder else 'unet'}"


ENCODER = {True: "text encoder trained", False: "text encoder frozen"}


def token_pairs(tokens: Sequence[str], text_encoder: Sequence[bool]) -> list[tuple[str, str]]:
    """The study's comparisons: per token, text encoder trained vs frozen; per text-encoder setting,
    each other token vs the first (pure)."""
    pairs = []
    if len(text_encoder) > 1:
        pairs += [(token_group(t, True), token_group(t, False)) for t in tokens]
    for te in text_encoder:
        pairs += [(token_group(tokens[0], te), token_group(t, te)) for t in tokens[1:]]
    return pairs


def token_study(pipe, subject: str = "dog", photos: int = 5, tokens=("sks", "hta", "oue", "http"),
                text_encoder=(False, True), seeds=range(8), replicates: int = 3, *, scale: float | None = None,
                output_dir: str | Path = "runs", overrides: dict | None = None, recipe: bool = True,
                progress: bool = False, keep_images: bool = False, reuse_finished: bool = True,
                log: Callable[[str], None] | None = print) -> list[dict]:
    """The study's token x text-encoder runs in the world, each setting trained `replicates` times
    (recipe=True the world's recipe, False the study's settings; read at study.read_scale): one row
    per run with group '<token>-te'/'<token>-unet', token, text_encoder and encoder ('text encoder
    trained'/'frozen') columns and the judge's readings."""
    from . import study

    settings, columns = {}, {}
    for token in tokens:
        for te in text_encoder:
            group = token_group(token, te)
            settings[group] = study.run_config(recipe, subject, photos, token, output_dir=output_dir,
                                               train_text_encoder=te, overrides=overrides)
            columns[group] = {"token": token, "text_encoder": te, "encoder": ENCODER[te]}
    warm_class_images(pipe, next(iter(settings.values())))  # one class-image set for every setting, made untimed
    measure = world_measure(pipe, list(seeds), study.read_scale(recipe, scale), progress=progress, keep_images=keep_images,
                            reuse_finished=reuse_finished)
    return run_replicates(settings, replicates, measure, columns=columns, log=log)
