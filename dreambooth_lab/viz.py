"""Matplotlib sheets people look at: image grids, loss curves, dataset-versus-generation.

Every sheet carries its parameters as text under the pictures, so a PNG found months later still
says what made it. Figures are built with the object API (no pyplot state, no GUI backend).
"""

from __future__ import annotations

import textwrap

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from . import files


def tensor_to_pil(t) -> Image.Image:
    """A CHW tensor in [-1, 1] (what the data pipeline makes) back to an RGB image (pure)."""
    arr = ((t.detach().cpu().permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype("uint8")
    return Image.fromarray(arr)


def format_params(params: dict | None, width: int = 110) -> str:
    """'key=value' pairs wrapped into lines of at most `width` characters (pure)."""
    if not params:
        return ""
    lines, line = [], ""
    for k, v in params.items():
        if isinstance(v, float):
            v = f"{v:g}"
        item = f"{k}={v}"
        if line and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line}, {item}" if line else item
    if line:
        lines.append(line)
    return "\n".join(lines)


def _footer(fig: Figure, params: dict | None) -> None:
    text = format_params(params)
    if text:
        fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=7, family="monospace", wrap=True)


def image_grid(images: Sequence, captions: Sequence[str], path: str | Path, *, title: str = "",
               params: dict | None = None, ncols: int | None = None, cell: float = 2.4) -> Path:
    """A grid of images with a caption under each; rows fill left to right."""
    n = len(images)
    ncols = ncols or min(n, 4)
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(cell * ncols, cell * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, im, cap in zip(axes, images, captions):
        ax.imshow(np.asarray(im))
        ax.set_title(cap, fontsize=7, wrap=True)
    if title:
        fig.suptitle(title, fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)


def dataset_sheet(images, path: str | Path, *, title: str = "", params: dict | None = None, ncols: int = 6,
                  tile: int = 160) -> Path:
    """The training photos as training sees them (upright, centre crop at the resolution), named.

    `images` is a data.ImageSet; train() writes one into every new run folder (dataset.png). The
    crops are laid out as one mosaic in a single axes (one imshow, cheap enough for every run).
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    mosaic = Image.new("RGB", (ncols * tile, nrows * tile), (255, 255, 255))
    for i in range(n):
        crop = tensor_to_pil(images.example(i, center_crop=True, flip=False)).resize((tile - 8, tile - 8))
        mosaic.paste(crop, ((i % ncols) * tile + 4, (i // ncols) * tile + 4))
    fig = Figure(figsize=(1.6 * ncols, 1.6 * nrows + 0.7))
    ax = fig.add_axes((0.0, 0.1, 1.0, 0.8))
    ax.imshow(np.asarray(mosaic))
    ax.axis("off")
    for i in range(n):
        label = "\n".join(textwrap.fill(line, 34) for line in images.label(i).split("\n"))
        ax.text((i % ncols + 0.5) * tile, (i // ncols + 1) * tile - 2, label, ha="center", va="bottom",
                fontsize=5 if images.captions else 6,
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    if title:
        fig.suptitle(title, fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)


def plot_loss_curve(history: Sequence[dict], path: str | Path, *, title: str = "", params: dict | None = None,
                    smooth: int = 20) -> Path:
    """Loss, instance loss and prior loss per step, raw and as a moving average."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    steps = [r["step"] for r in history]
    for key, color in (("loss", "tab:blue"), ("instance_loss", "tab:orange"), ("prior_loss", "tab:green")):
        ys = [r.get(key) for r in history]
        if not ys or any(y is None for y in ys):
            continue
        ax.plot(steps, ys, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, moving_average(ys, smooth), color=color, lw=1.6, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.grid(alpha=0.3)
    if history:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (pure; same length as the input)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def dataset_vs_generation(pairs: Sequence[tuple], path: str | Path, *, title: str = "",
                          params: dict | None = None, per_row: int = 4, cell: float = 2.2) -> Path:
    """Each generation beside its nearest training photo and their similarity, `per_row` pairs a row.

    pairs: (generated image, caption, nearest training image, training file name, similarity).
    """
    n = len(pairs)
    per_row = max(1, min(per_row, n))
    nrows = -(-n // per_row)
    fig = Figure(figsize=(cell * 2 * per_row, cell * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, 2 * per_row, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (gen, caption, train_img, train_name, score) in enumerate(pairs):
        a, b = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        a.imshow(np.asarray(gen))
        a.set_title(caption, fontsize=6, wrap=True)
        b.imshow(np.asarray(train_img))
        b.set_title(f"nearest: {train_name}\nsimilarity {score:.3f}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)


def labeled_grid(rows: Sequence[Sequence], row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path,
                 *, title: str = "", params: dict | None = None, cell: float = 2.0,
                 cell_files: Sequence[Sequence[str]] | None = None) -> Path:
    """A rows x columns sheet with a label on every row and column (e.g. runs x prompts).

    Beside the PNG, <name>.json records the layout: labels, parameters and, when given, the
    image file of every cell (whose own sidecar says how to make it again).
    """
    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(cell * ncols + 1.2, cell * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(row) and row[c] is not None:
                ax.imshow(np.asarray(row[c]))
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7, wrap=True)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    _footer(fig, params)
    files.write_json(Path(path).with_suffix(".json"), {
        "title": title, "rows": nrows, "cols": ncols, "row_labels": list(row_labels),
        "col_labels": list(col_labels), "params": params or {},
        "cells": [list(r) for r in cell_files] if cell_files is not None else None})
    return files.save_figure(path, fig)


def compare_loss_curves(histories: dict[str, Sequence[dict]], path: str | Path, *, key: str = "instance_loss",
                        smooth: int = 50, title: str = "", params: dict | None = None) -> Path:
    """One smoothed curve per run (e.g. the instance loss of every run of a sweep)."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for name, rows in histories.items():
        ys = [r.get(key) for r in rows]
        if ys and all(y is not None for y in ys):
            ax.plot([r["step"] for r in rows], moving_average(ys, smooth), lw=1.4, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key} (moving average over {smooth} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or key, fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)


def metric_bars(rows: Sequence[dict], keys: Sequence[str], path: str | Path, *, label: str = "id",
                title: str = "", params: dict | None = None) -> Path:
    """Grouped bars: one group per run, one bar per metric (e.g. DINO, CLIP-I, CLIP-T)."""
    fig = Figure(figsize=(max(6, 1.1 * len(rows) * max(1, len(keys)) / 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(rows))
    for k, key in enumerate(keys):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(x + k * width - 0.4 + width / 2, values, width, label=key.replace("metric_", ""))
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(x, [str(r.get(label)) for r in rows], rotation=30, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)


def metric_vs_axis(groups: Sequence[tuple[str, Sequence[float], dict]], path: str | Path, *, axis: str,
                   metric: str, title: str = "", params: dict | None = None) -> Path:
    """A metric against one axis: per axis value (label, the runs' values, their summary with n,
    mean, low, high) each run as a dot and the mean with its 95% interval as an error bar,
    labelled 'mean [low, high]' and n (a mean alone, 'no interval', where n = 1)."""
    fig = Figure(figsize=(max(5.0, 1.4 * len(groups) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (_, values, s) in enumerate(groups):
        offsets = np.linspace(-0.1, 0.1, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i - 0.15 + offsets, values, s=22, color="tab:blue", alpha=0.7, zorder=3,
                   label="one run (a replicate)" if i == 0 else None)
        if s["low"] is not None:
            ax.errorbar([i + 0.15], [s["mean"]], yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]], fmt="o",
                        color="black", capsize=5, zorder=4, label="mean, 95% t-interval" if i == 0 else None)
            text = f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]\nn = {s['n']}"
            top = s["high"]
        else:
            ax.plot([i + 0.15], [s["mean"]], "o", color="black", zorder=4)
            text, top = f"{s['mean']:.2f}\nn = {s['n']}: no interval", s["mean"]
        ax.annotate(text, (i + 0.15, top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.margins(y=0.25)
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{metric} against {axis}", fontsize=9)
    _footer(fig, params)
    return files.save_figure(path, fig)
