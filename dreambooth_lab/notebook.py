"""What the notebooks' cells call: environment set-up, the form -> config, live plots, display.

The notebooks stay thin: a cell sets a few values or calls one function from here and shows what
it returned. ``DREAMBOOTH_LAB_SMOKE=1`` turns any notebook into a seconds-long run on the tiny
model (the test suite sets it); the defaults a user sees in the form stay the real ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .config import TINY_MODEL, Config, load, with_overrides

SMOKE_ENV = "DREAMBOOTH_LAB_SMOKE"
OUTPUT_ENV = "DREAMBOOTH_LAB_OUTPUT"  # smoke runs write here instead of the form's OUTPUT_DIR

# Form field -> config field. RANK also sets alpha (scaling 1); USE_8BIT_ADAM picks the optimizer.
FORM_FIELDS = {
    "BASE_MODEL": "model.name",
    "DATASET_DIR": "data.instance_dir",
    "OUTPUT_DIR": "train.output_dir",
    "RARE_TOKEN": "data.token",
    "CLASS": "data.class_name",
    "TRAIN_TEXT_ENCODER": "train.train_text_encoder",
    "STEPS": "train.steps",
    "BATCH_SIZE": "train.batch_size",
    "LR_UNET": "optim.lr_unet",
    "LR_TEXT_ENCODER": "optim.lr_text_encoder",
    "SEED": "train.seed",
    "PRIOR_PRESERVATION": "prior.enabled",
    "NUM_CLASS_IMAGES": "prior.num_class_images",
    "PRIOR_LOSS_WEIGHT": "prior.loss_weight",
    "RANK": "lora.rank",
    "MIXED_PRECISION": "train.mixed_precision",
    "USE_8BIT_ADAM": "optim.optimizer",
    "GRADIENT_CHECKPOINTING": "train.gradient_checkpointing",
    "LORA_SCALE_UNET": "sample.lora_scale_unet",
    "LORA_SCALE_TEXT_ENCODER": "sample.lora_scale_text_encoder",
    "GUIDANCE": "sample.guidance",
    "GEN_SEED": "sample.seeds",
}


def smoke() -> bool:
    return os.environ.get(SMOKE_ENV, "") not in ("", "0", "false", "False")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def find_repo_root(start: str | Path | None = None) -> Path:
    """The checkout this package lives in (the folder holding dreambooth_lab/ and datasets/)."""
    here = Path(__file__).resolve().parents[1]
    if (here / "datasets").is_dir():
        return here
    path = Path(start or os.getcwd()).resolve()
    for p in (path, *path.parents):
        if (p / "dreambooth_lab").is_dir():
            return p
    return path


# ---- set-up -----------------------------------------------------------------------------------

def device_report() -> str:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return (f"GPU: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                f"(torch {torch.__version__})")
    return f"no GPU (torch {torch.__version__}): training will be slow; BASE_MODEL='tiny' runs the offline CPU model"


def setup(mount_drive: bool = False) -> str:
    """Drive (Colab, when asked), Colab's widget manager, and a one-line device report."""
    if in_colab():
        if mount_drive and not Path("/content/drive/MyDrive").exists():
            from google.colab import drive  # type: ignore

            drive.mount("/content/drive")
        from google.colab import output  # type: ignore

        output.enable_custom_widget_manager()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return device_report()


def hub_login(prompt: bool = True) -> bool:
    """Make a hub token available to this process only (never printed, never written to disk).

    Looks in Colab's secrets (HF_TOKEN), then the environment, then asks with getpass.
    """
    token = None
    if in_colab():
        try:
            from google.colab import userdata  # type: ignore

            token = userdata.get("HF_TOKEN")
        except Exception:  # secret missing or access not granted
            token = None
    token = token or os.environ.get("HF_TOKEN")
    if not token and prompt:
        import getpass

        token = getpass.getpass("Hugging Face token (input hidden): ").strip()
    if not token:
        return False
    os.environ["HF_TOKEN"] = token  # huggingface_hub reads it from the environment; no file is written
    return True


# ---- the form -> config ---------------------------------------------------------------------------

def form_overrides(form: dict[str, Any]) -> dict[str, Any]:
    """Translate the hyperparameter cell's values into dotted config overrides (pure)."""
    missing = [k for k in FORM_FIELDS if k not in form]
    if missing:
        raise KeyError(f"the hyperparameter cell does not define {', '.join(missing)}")
    out = {}
    for name, path in FORM_FIELDS.items():
        value = form[name]
        if name == "USE_8BIT_ADAM":
            value = "adamw8bit" if value else "adamw"
        elif name == "GEN_SEED":
            value = [int(value) + i for i in range(4)]  # the seed grid: 4 consecutive seeds
        elif name == "RANK":
            out["lora.alpha"] = float(value)
        elif name in ("LR_UNET", "LR_TEXT_ENCODER", "PRIOR_LOSS_WEIGHT", "LORA_SCALE_UNET",
                      "LORA_SCALE_TEXT_ENCODER", "GUIDANCE"):
            value = float(value)
        out[path] = value
    return out


def smoke_overrides(output_dir: str | None = None) -> dict[str, Any]:
    """Seconds-long settings on the tiny model: the test suite's switch, same code path."""
    out = {
        "model.name": TINY_MODEL, "data.resolution": None, "train.steps": 12, "train.checkpoint_every": 6,
        "train.mixed_precision": "no", "prior.num_class_images": 4, "prior.steps": 4, "sample.steps": 4,
        "sample.seeds": [0, 1], "sample.test_prompts": ["A {token} {class} in the forest"],
        "optim.lr_unet": 1e-3,
    }
    if output_dir:
        out["train.output_dir"] = output_dir
    return out


def _absolute(path: str | Path) -> str:
    """A relative path is taken from the repository root (notebooks run from several folders)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else find_repo_root() / p)


def _resolve_paths(cfg: Config) -> Config:
    """Absolute data/output paths; smoke runs fall back to the sample subject when the study's
    photo folder is not on this machine."""
    cfg.data.instance_dir = _absolute(cfg.data.instance_dir)
    cfg.train.output_dir = _absolute(cfg.train.output_dir)
    if smoke() and not Path(cfg.data.instance_dir).is_dir():
        cfg.data.instance_dir = str(find_repo_root() / "datasets" / "sample_subject")
    return cfg


def machine_overrides(dataset_dir: str = "", output_dir: str = "") -> dict[str, Any]:
    """Where photos and results live on this machine (absolute), plus the smoke settings when on."""
    out: dict[str, Any] = smoke_overrides(os.environ.get(OUTPUT_ENV)) if smoke() else {}
    out.setdefault("train.output_dir", output_dir or str(default_output_dir()))
    out["train.output_dir"] = _absolute(out["train.output_dir"])
    if dataset_dir:
        out["data.instance_dir"] = _absolute(dataset_dir)
        if smoke() and not Path(out["data.instance_dir"]).is_dir():
            out["data.instance_dir"] = str(find_repo_root() / "datasets" / "sample_subject")
    return out


def preset_config(preset: str, dataset_dir: str = "", output_dir: str = "") -> Config:
    """A YAML preset (path relative to the repository root) with this machine's folders."""
    path = Path(preset) if Path(preset).is_absolute() else find_repo_root() / preset
    cfg = with_overrides(load(path), machine_overrides(dataset_dir, output_dir))
    return _cpu_precision(_resolve_paths(cfg)).validate()


def _cpu_precision(cfg: Config) -> Config:
    import torch

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        print("note: no CUDA here, so MIXED_PRECISION='fp16' is off for this run")
        cfg.train.mixed_precision = "no"
    return cfg


def eval_settings(**values) -> "EvalConfig":
    """The evaluation form as an EvalConfig; the smoke switch swaps in the tiny DINO/CLIP models."""
    from dataclasses import replace

    from .config import EvalConfig

    ev = replace(EvalConfig(), **values)
    if smoke():
        ev = replace(ev, dino_model=TINY_MODEL, clip_model=TINY_MODEL, images_per_prompt=1, drift_images=2)
    return ev


def build_config(form: dict[str, Any], preset: str = "") -> Config:
    """The run's config from the hyperparameter cell, or from a YAML preset when one is chosen.

    Relative paths are taken from the repository root. Without CUDA, fp16 mixed precision is
    turned off (CPU autocast supports bf16 only) with a note.
    """
    if preset:
        return preset_config(preset, form["DATASET_DIR"], form["OUTPUT_DIR"])
    cfg = with_overrides(Config(), form_overrides(form))
    cfg = with_overrides(cfg, machine_overrides(form["DATASET_DIR"], form["OUTPUT_DIR"]))
    return _cpu_precision(_resolve_paths(cfg)).validate()


DRIVE_RUNS = Path("/content/drive/MyDrive/dreambooth_lab/runs")


def default_output_dir() -> Path:
    """Google Drive when it is mounted (results survive a Colab disconnect), else ./runs."""
    return DRIVE_RUNS if DRIVE_RUNS.parents[1].is_dir() else Path("runs")


def summary(cfg: Config) -> str:
    from .train import run_params

    return "\n".join(f"{k:>20}: {v}" for k, v in run_params(cfg).items())


# ---- showing things -----------------------------------------------------------------------------

def show(*paths: str | Path) -> None:
    """Display PNGs inline (and print their paths, so they can be found on Drive)."""
    from IPython.display import Image, display

    for p in paths:
        print(p)
        display(Image(filename=str(p)))


def show_dataset(cfg: Config, out: str | Path | None = None) -> Path:
    """The training photos as they will be seen (upright, cropped), as a grid PNG."""
    from .data import ImageSet
    from .viz import image_grid, tensor_to_pil

    images = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    pils = [tensor_to_pil(images.example(i, center_crop=True, flip=False)) for i in range(len(images))]
    out = Path(out) if out else Path(cfg.train.output_dir) / "dataset.png"
    return image_grid(pils, [p.name for p in images.paths], out, title=f"{len(pils)} photos in {cfg.data.instance_dir}",
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

        from .viz import plot_loss_curve

        target = self.path or Path(tempfile.gettempdir()) / "dreambooth_lab_live_loss.png"
        plot_loss_curve(self.rows, target, title=f"step {self.rows[-1]['step']}")
        if self.handle is not None:
            self.handle.update(Image(filename=str(target)))
