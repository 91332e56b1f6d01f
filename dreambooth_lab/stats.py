"""Conclusions from replicated runs: summaries with 95% intervals and a verdict on a comparison.

The method, written down once (README "Replicates, intervals and verdicts" points here):

* **The unit is the run.** A registry row is one training run; a metric read from its images
  (a judge's rate, a mean DINO score) is one number per run. Images of one run are not
  independent draws of the setting — they share its LoRA — so they are never pooled across
  runs: the spread that matters is between replicates (runs of one setting with different
  training seeds, `replicates: N` in a sweep spec).
* **Summary** of a group (`summarise`): n runs, mean, sample standard deviation (n − 1 in the
  denominator) and the 95% t-interval mean ± t(0.975, n − 1) · sd / √n. With n = 1 there is no
  sd and no interval (None), only the single value.
* **Comparison** of groups a and b (`compare`): the difference of means a − b and its 95% Welch
  interval d ± t(0.975, ν) · se, se = √(sa²/na + sb²/nb), ν the Welch–Satterthwaite degrees of
  freedom. A difference is called only when the interval excludes 0; otherwise the verdict is
  "no difference shown". With fewer than 2 runs on either side there is no interval, and the
  verdict says so instead of guessing. When both groups have sd = 0 the interval is the point.
* **t quantiles** come from a numeric inverse (bisection) of Student's t distribution function,
  computed with the regularized incomplete beta function (continued fraction), so no SciPy is
  needed; `t_quantile(0.975, 2)` = 4.303, `t_quantile(0.975, 4)` = 2.776.

Rows are dicts as `experiments.load_registry` returns them; rows whose status is not
"finished" and values that are missing or not numbers are left out.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

LEVEL = 0.95
# What "a is higher than b" means for metrics whose name says which way is better.
VERBS = {"judge_subject_fidelity": "binds the subject better than",
         "judge_prompt_fidelity": "follows the prompt better than"}


# ---- Student's t ---------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (pure)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with df degrees of freedom (df > 0, need not be whole) (pure)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom, by bisection on t_cdf (pure)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must be between 0 and 1")
    if not df > 0:
        raise ValueError(f"t_quantile: df={df} must be > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2.0


# ---- one group, two groups ---------------------------------------------------------------------

def describe(values: Sequence[float], level: float = LEVEL) -> dict:
    """n, mean, sd and the t-interval of the mean (low, high; None when n < 2) (pure)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """The difference of means a − b with its Welch t-interval (low/high/df None when either side
    has fewer than 2 values) (pure)."""
    da, db = describe(a, level), describe(b, level)
    if da["n"] == 0 or db["n"] == 0:
        raise ValueError("welch: each side needs at least one value")
    diff = da["mean"] - db["mean"]
    if da["n"] < 2 or db["n"] < 2:
        return {"difference": diff, "low": None, "high": None, "df": None, "se": None}
    va, vb = da["sd"] ** 2 / da["n"], db["sd"] ** 2 / db["n"]
    se = math.sqrt(va + vb)
    if se == 0.0:  # both groups constant: the interval is the point
        return {"difference": diff, "low": diff, "high": diff, "df": float(da["n"] + db["n"] - 2), "se": 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (da["n"] - 1) + vb ** 2 / (db["n"] - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return {"difference": diff, "low": diff - half, "high": diff + half, "df": df, "se": se}


# ---- registry rows -------------------------------------------------------------------------------

def number(value: Any) -> float | None:
    """A registry cell as a float, None when it is no number (None, NaN, a bool, text) (pure)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _counts(row: dict) -> bool:
    return row.get("status", "finished") == "finished"


def metric_column(rows: Iterable[dict], metric: str) -> str:
    """The registry column of a metric: 'judge_subject_fidelity' is metric_judge_subject_fidelity
    (written by `evaluate`); any numeric column may be named as it is (final_loss). One-line
    ValueError naming the metric and those there are when it is in no row."""
    rows = list(rows)
    columns = {k for r in rows for k in r}
    for name in (metric, f"metric_{metric}"):
        if name in columns:
            return name
    there = sorted(c[len("metric_"):] for c in columns if c.startswith("metric_") and c != "metric_models")
    raise ValueError(f"metric {metric!r} is in no registry row; " + (
        f"metrics there: {', '.join(there)}" if there else
        "no run has been evaluated yet: run `python -m dreambooth_lab evaluate RUN...` first"))


def group_of(row: dict, by: str | Sequence[str] = "group") -> Any:
    """A row's group: its `group` column (the run id without -rK) or, without one, its id; or the
    value(s) of other columns (pure)."""
    if isinstance(by, str):
        return (row.get("group") or row.get("id")) if by == "group" else row.get(by)
    return tuple(row.get(b) for b in by)


def _label(key: Any, by: str | Sequence[str]) -> str:
    if isinstance(by, str):
        return _fmt(key)
    return ", ".join(f"{b}={_fmt(v)}" for b, v in zip(by, key))


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _order(key: Any) -> tuple:
    """Numbers numerically, then everything else as text: a deterministic order of group keys."""
    keys = key if isinstance(key, tuple) else (key,)
    return tuple((0, float(k), "") if number(k) is not None else (1, 0.0, str(k)) for k in keys)


def values_by_group(rows: Iterable[dict], column: str, by: str | Sequence[str] = "group") -> dict[Any, list[float]]:
    """Per group (in a deterministic order) the column's value of each finished run (pure)."""
    out: dict[Any, list[float]] = {}
    for row in rows:
        value = number(row.get(column))
        if _counts(row) and value is not None:
            out.setdefault(group_of(row, by), []).append(value)
    return {k: out[k] for k in sorted(out, key=_order)}


def summarise(rows: Iterable[dict], by: str | Sequence[str] = "group", metrics: Sequence[str] | None = None,
              level: float = LEVEL) -> list[dict]:
    """Per group and metric: n, mean, sd, the 95% t-interval (low, high) across replicates.

    by: 'group' (a replicate's group, else the run id), a registry column ('lr_unet') or a list
    of columns. metrics: names as `metric_column` reads them (default: every metric_* column).
    Rows come out sorted by group, then in the order of `metrics`.
    """
    rows = list(rows)
    if metrics is None:
        metrics = sorted({k for r in rows for k, v in r.items() if k.startswith("metric_") and number(v) is not None})
        if not metrics:
            raise ValueError("no metric in the registry rows: run `python -m dreambooth_lab evaluate RUN...` first, "
                             "or name one, e.g. metrics=['final_loss']")
    columns = [metric_column(rows, m) for m in metrics]
    out = []
    per_metric = {c: values_by_group(rows, c, by) for c in columns}
    keys = sorted({k for groups in per_metric.values() for k in groups}, key=_order)
    for key in keys:
        for metric, column in zip(metrics, columns):
            values = per_metric[column].get(key)
            if values:
                out.append({"group": _label(key, by), "metric": metric, **describe(values, level),
                            "values": values})
    return out


def format_summary(summary: Sequence[dict]) -> str:
    """The summary as a text table: group, metric, n, mean, sd, 95% interval (pure)."""
    def num(v):
        return "" if v is None else f"{v:.3f}"

    head = ["group", "metric", "n", "mean", "sd", "95% interval"]
    table = [[s["group"], s["metric"], str(s["n"]), num(s["mean"]), num(s["sd"]),
              f"[{num(s['low'])}, {num(s['high'])}]" if s["low"] is not None else "none (n = 1)"] for s in summary]
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
    return "\n".join(lines)


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def compare(rows: Iterable[dict], a: Any, b: Any, metric: str, by: str | Sequence[str] = "group",
            level: float = LEVEL, verb: str | None = None) -> dict:
    """Do groups a and b differ on metric? The difference a − b, its Welch interval and a sentence.

    Returns {a, b, group_a, group_b (the groups' labels as summarise writes them), metric, n_a, n_b, mean_a, mean_b, difference, low, high, df, verdict, sentence};
    verdict is 'different' (the interval excludes 0), 'no difference shown' or 'no interval'
    (fewer than 2 runs on a side). Group names are matched as `summarise` labels them. `verb`
    says what "a is higher than b" means ("binds the subject better than"; default: VERBS, else
    "is higher on <metric> than").
    """
    rows = list(rows)
    column = metric_column(rows, metric)
    groups = {_label(k, by): v for k, v in values_by_group(rows, column, by).items()}
    found = []
    for side, name in (("a", a), ("b", b)):
        label = str(name) if str(name) in groups else next(  # 1e-4 finds the group lr_unet 0.0001
            (g for g in groups if _as_float(str(name)) is not None and _as_float(g) == _as_float(str(name))), None)
        if label is None:
            raise ValueError(f"--{side} {name}: no finished run of that group has {metric}; groups with it: "
                             f"{', '.join(groups) or 'none'}")
        found.append(label)
    va, vb = groups[found[0]], groups[found[1]]
    w = welch(va, vb, level)
    d, lo, hi = w["difference"], w["low"], w["high"]
    name = column[len("metric_"):] if column.startswith("metric_") else column
    n_text = f"n = {len(va)} each" if len(va) == len(vb) else f"n = {len(va)} and {len(vb)}"
    pct = f"{level:.0%}"
    if lo is None:
        single = ", ".join(f"{g} has n = 1" for g, v in ((a, va), (b, vb)) if len(v) < 2)
        verdict = "no interval"
        sentence = (f"no interval: {single}, so {a} − {b} = {d:+.2f} on {name} cannot be told from run-to-run "
                    "noise; train replicates (replicates: 3 in the sweep spec, or sweep --replicates 3)")
    elif lo > 0 or hi < 0:
        verdict = "different"
        win, lose, sign = (a, b, 1) if d > 0 else (b, a, -1)
        lo_w, hi_w = sorted((sign * lo, sign * hi))
        verb = verb or VERBS.get(name, f"is higher on {name} than")
        sentence = f"{win} {verb} {lose} by {abs(d):.2f} [{lo_w:.2f}, {hi_w:.2f}] ({pct} interval, {n_text})"
    else:
        verdict = "no difference shown"
        sentence = f"no difference shown on {name}: {a} − {b} = {d:.2f} [{lo:.2f}, {hi:.2f}] ({pct} interval, {n_text})"
    return {"a": a, "b": b, "group_a": found[0], "group_b": found[1], "metric": name, "n_a": len(va), "n_b": len(vb), "mean_a": math.fsum(va) / len(va),
            "mean_b": math.fsum(vb) / len(vb), "difference": d, "low": lo, "high": hi, "df": w["df"],
            "verdict": verdict, "sentence": sentence}
