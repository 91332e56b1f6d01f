"""Display: pictures inline, the photo sheet, the live loss curve, a config's summary and memory note.

What a notebook shows and prints about a run, never deciding anything: `show` displays PNGs (and
prints their paths, so they can be found on Drive), `show_dataset` draws the photos as training
sees them, `LiveLoss` redraws the loss curve while training, `summary` lists the config's values
with where each came from, and `memory_note` says whether the memory model expects the run to fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from ..config import Config, run_params
from .form import MACHINE_KEYS, MEMORY_MARGIN, SDXL_BASE, fits
from .runtime import T4_GIB, this_gpu

def leaves(cfg: Config) -> list[tuple[str, Any]]:
    """(dotted name, value) of every field, in the dataclasses' order (pure)."""
    out: list[tuple[str, Any]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", value))

    walk(cfg, "")
    return out


def format_sources(cfg: Config, sources: dict[str, str], skip: tuple[str, ...] = ("eval.",)) -> str:
    """Every value with where it came from; unlisted fields are the package's defaults (pure)."""
    rows = [(k, v, sources.get(k, "default")) for k, v in leaves(cfg) if not k.startswith(skip)]
    rows.sort(key=lambda row: MACHINE_KEYS.index(row[0]) if row[0] in MACHINE_KEYS else len(MACHINE_KEYS))
    width = max(len(k) for k, _, _ in rows)
    lines = []
    for k, v, src in rows:
        text = repr(v) if isinstance(v, str) else str(v)
        text = text if len(text) <= 70 else text[:67] + "..."
        lines.append(f"{k:<{width}}  {text:<40}  {src}")
    counts = {s: sum(1 for _, _, src in rows if src == s) for s in dict.fromkeys(src for _, _, src in rows)}
    lines.append("(" + ", ".join(f"{n} from {s}" for s, n in counts.items()) + f"; config hash {cfg.hash()})")
    return "\n".join(lines)


def summary(cfg: Config, sources: dict[str, str] | None = None) -> str:
    """The run's values: with sources, every field and where it came from; else the main ones."""
    if sources is not None:
        return format_sources(cfg, sources)
    return "\n".join(f"{k:>20}: {v}" for k, v in run_params(cfg).items())


def memory_note(cfg: Config, gpu_gib: float | None = None, gpu_name: str | None = None) -> str:
    """One line: the memory model's predicted peak for this config on this GPU (a 15 GB T4 when
    there is none), and what to change when it would not fit. Never raises: a model whose configs
    cannot be read here gets a line saying so."""
    try:
        from ..memory import estimate

        est = estimate(cfg, "cuda")
    except Exception as exc:  # noqa: BLE001 - a note, not a gate
        return f"memory model: no estimate for {cfg.model.name!r} here ({type(exc).__name__}: {str(exc)[:120]})"
    if gpu_gib is None:
        gpu_gib, found = this_gpu()
        gpu_name = gpu_name or found
    where = f"{gpu_name or 'this GPU'} ({gpu_gib:.1f} GiB)" if gpu_name or gpu_gib != T4_GIB else \
        "a 15 GB T4 (no GPU here)"
    g = est.as_gib()
    line = (f"memory model: {g['peak']:.1f} GiB predicted peak (training steps {g['total']:.1f}, set-up "
            f"{g['setup']:.1f}) for {cfg.resolution} px on {where}")
    if fits(g["peak"], gpu_gib):
        return line + ": fits"
    fixes = [name for name, off in (("GRADIENT_CHECKPOINTING", not cfg.train.gradient_checkpointing),
                                    ("USE_8BIT_ADAM", cfg.optim.optimizer != "adamw8bit"),
                                    ("MIXED_PRECISION='fp16'", cfg.train.mixed_precision == "no")) if off]
    advice = (f"turn on {', '.join(fixes)}, " if fixes else "") + "lower RESOLUTION or BATCH_SIZE"
    if cfg.model.name == SDXL_BASE:
        advice += ", or use PRESET configs/colab_t4_sdxl.yaml"
    return line + f": likely out of memory (× {MEMORY_MARGIN} margin) — {advice}"


def show(*paths: str | Path) -> None:
    """Display PNGs inline (and print their paths, so they can be found on Drive)."""
    from IPython.display import Image, display

    for p in paths:
        print(f"written: {p}")
        display(Image(filename=str(p)))


def show_dataset(cfg: Config, out: str | Path | None = None) -> Path:
    """The training photos as they will be seen (upright, cropped), as a grid PNG beside the runs,
    named after the photo folder (another dataset's sheet is not overwritten)."""
    from ..data import ImageSet
    from ..viz import image_grid, tensor_to_pil

    images = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution, captions=cfg.data.captions,
                                  token=cfg.data.token)
    pils = [tensor_to_pil(images.example(i, center_crop=True, flip=False)) for i in range(len(images))]
    if out is None:
        tag = hashlib.sha256(str(Path(cfg.data.instance_dir).resolve()).encode()).hexdigest()[:8]
        out = Path(cfg.train.output_dir) / "dataset_sheets" / f"{Path(cfg.data.instance_dir).name}-{tag}.png"
    return image_grid(pils, [images.label(i) for i in range(len(images))], Path(out),
                      title=f"{len(pils)} photos in {cfg.data.instance_dir}",
                      params={"resolution": cfg.resolution, "token": cfg.data.token, "class": cfg.data.class_name},
                      ncols=min(6, len(pils)))


class LiveLoss:
    """Training callback that redraws the loss curve in place every `every` steps."""

    def __init__(self, every: int = 25, path: str | Path | None = None):
        from IPython.display import display

        self.every, self.rows = every, []
        self.path = Path(path) if path else None
        self.handle = display("training starts...", display_id=True)

    def __call__(self, record: dict) -> None:
        self.rows.append(record)
        if len(self.rows) % self.every == 0:
            self.redraw()

    def redraw(self) -> None:
        import tempfile

        from IPython.display import Image

        from ..viz import plot_loss_curve

        target = self.path or Path(tempfile.gettempdir()) / "dreambooth_lab_live_loss.png"
        plot_loss_curve(self.rows, target, title=f"step {self.rows[-1]['step']}")
        if self.handle is not None:
            self.handle.update(Image(filename=str(target)))
