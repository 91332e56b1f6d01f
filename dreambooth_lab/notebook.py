"""What the notebooks' cells call: set-up, the form -> config, dataset checks, live plots, display.

The notebooks stay thin: a cell sets a few values or calls one function from here and shows what
it returned. ``DREAMBOOTH_LAB_SMOKE=1`` turns any notebook into a seconds-long run on the tiny
model (the test suite sets it); the defaults a user sees in the form stay the real ones. Smoke
mode shrinks steps and sizes only: it never swaps in other photos, so a missing photo folder stops
a notebook at its dataset cell in smoke mode too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import DEFAULT_MODEL, TINY_MODEL, Config, load, read_yaml, with_overrides

if TYPE_CHECKING:
    from .config import EvalConfig

SMOKE_ENV = "DREAMBOOTH_LAB_SMOKE"
OUTPUT_ENV = "DREAMBOOTH_LAB_OUTPUT"  # smoke runs write here instead of the form's OUTPUT_DIR

DRIVE = Path("/content/drive/MyDrive")  # Google Drive, once mounted on Colab
DRIVE_HOME = DRIVE / "dreambooth_lab"
DRIVE_RUNS = DRIVE_HOME / "runs"
DRIVE_DATASETS = DRIVE_HOME / "datasets"
MODEL_CACHE = DRIVE_HOME / "hf-cache"  # the hub cache on Drive, when the set-up cell is asked to keep it
COLAB_CHECKOUT = Path("/content/dreambooth_lab")
INSTALL_MARKER = ".install-complete"  # written last by ensure_installed: its absence means "install again"

# Form field -> config field. RANK also sets alpha (scaling 1); USE_8BIT_ADAM picks the optimizer.
FORM_FIELDS = {
    "BASE_MODEL": "model.name",
    "DATASET_DIR": "data.instance_dir",
    "OUTPUT_DIR": "train.output_dir",
    "RARE_TOKEN": "data.token",
    "CLASS": "data.class_name",
    "CAPTIONS": "data.captions",
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
    "RESOLUTION": "data.resolution",
    "MIXED_PRECISION": "train.mixed_precision",
    "USE_8BIT_ADAM": "optim.optimizer",
    "GRADIENT_CHECKPOINTING": "train.gradient_checkpointing",
    "CHECKPOINT_EVERY": "train.checkpoint_every",
    "SAVE_LORA_EVERY": "train.save_lora_every",
    "STEP_IMAGES": "train.step_images",
    "LORA_SCALE_UNET": "sample.lora_scale_unet",
    "LORA_SCALE_TEXT_ENCODER": "sample.lora_scale_text_encoder",
    "GUIDANCE": "sample.guidance",
    "SAMPLE_STEPS": "sample.steps",
    "NEGATIVE_PROMPT": "sample.negative_prompt",
    "GEN_SEED": "sample.seeds",
}

# The values main.ipynb's form ships with: a first real run on Colab's T4. tests check that the
# notebook's parameters cell says the same. With a PRESET, a field still at this value is "not set
# by you" and the preset's value (or the package default) is used; a field you changed wins.
FORM_DEFAULTS: dict[str, Any] = {
    "BASE_MODEL": DEFAULT_MODEL,
    "DATASET_DIR": str(DRIVE_DATASETS / "my_dog"),
    "OUTPUT_DIR": "",
    "RARE_TOKEN": "sks",
    "CLASS": "dog",
    "CAPTIONS": "none",
    "TRAIN_TEXT_ENCODER": True,
    "STEPS": 800,
    "BATCH_SIZE": 1,
    "LR_UNET": 3e-4,
    "LR_TEXT_ENCODER": 1e-4,
    "SEED": 42,
    "PRIOR_PRESERVATION": True,
    "NUM_CLASS_IMAGES": 100,
    "PRIOR_LOSS_WEIGHT": 1.0,
    "RANK": 4,
    "RESOLUTION": 512,
    "MIXED_PRECISION": "fp16",
    "USE_8BIT_ADAM": True,
    # "auto": on when the memory model predicts the run does not fit this GPU without it (a T4 when
    # there is none here); "on" / "off" are the user's and always win
    "GRADIENT_CHECKPOINTING": "auto",
    # No T4 step time has been measured for this project yet (benchmarks/gpu_check.py has not run on
    # one); 400 steps is a disconnect's worst loss, whatever the speed turns out to be.
    "CHECKPOINT_EVERY": 400,
    # a usable LoRA file every 200 steps, with pictures of "A {token} {class}" at each: the step
    # before the subject overfits can be seen, picked and exported
    "SAVE_LORA_EVERY": 200,
    "STEP_IMAGES": True,
    "LORA_SCALE_UNET": 0.4,
    "LORA_SCALE_TEXT_ENCODER": 0.4,
    "GUIDANCE": 6.4,
    "SAMPLE_STEPS": 30,
    "NEGATIVE_PROMPT": "",
    "GEN_SEED": 0,
}
ALWAYS_FORM = ("DATASET_DIR", "OUTPUT_DIR")  # where things are on this machine: never from a preset
# How this runtime trains, not what the experiment is: always the form's (a preset describes the
# experiment: token, steps, lr, photos, seeds), adapted to the machine (no fp16 without CUDA).
MACHINE_FIELDS = ("MIXED_PRECISION", "USE_8BIT_ADAM", "GRADIENT_CHECKPOINTING", "CHECKPOINT_EVERY", "SAVE_LORA_EVERY",
                  "STEP_IMAGES")
# The form's switches for this one call of the train cell (not config fields, never from a preset).
FORM_SWITCHES: dict[str, Any] = {"NEW_RUN": False, "TAKE_OVER_LOCK": False, "ALLOW_CPU": False}
# The machine settings the summary prints first.
MACHINE_KEYS = ("train.mixed_precision", "optim.optimizer", "train.gradient_checkpointing", "train.checkpoint_every")
GRADIENT_CHECKPOINTING_CHOICES = ("auto", "on", "off")
# BASE_MODEL's dropdown (any other hub id or folder can be typed in): SD1.5 and SDXL base. The family
# comes from the model itself (models.detect_family); the form has no per-family code.
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
BASE_MODELS = (DEFAULT_MODEL, SDXL_BASE)
T4_GIB = 15.0  # what memory_note compares with when there is no GPU here (a Colab T4)
# The memory model's measured / predicted on the CPU runs (BENCHMARKS.md): up to ~1.3-1.4 beyond
# the weights. memory_note warns when the prediction times this margin does not fit.
MEMORY_MARGIN = 1.3


def smoke() -> bool:
    return os.environ.get(SMOKE_ENV, "") not in ("", "0", "false", "False")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def find_repo_root(start: str | Path | None = None) -> Path:
    """The checkout this package lives in (the folder holding dreambooth_lab/ and configs/)."""
    from .experiments import project_root

    return project_root(start)


class NotebookStop(Exception):
    """Stops a notebook at this cell with a message and no traceback (what to do is in the message)."""

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return [f"{type(self).__name__}: the notebook stops here.", *str(self).splitlines()]


class PhotosMissing(NotebookStop, ValueError):
    """The photo folder is missing or holds no photos."""


# ---- set-up -----------------------------------------------------------------------------------

# What `setup` installs on Colab. torch is not listed: Colab's CUDA build is kept.
INSTALL_COMMANDS = (
    ("-m", "pip", "install", "-q", "-r", "requirements.txt"),
    ("-m", "pip", "install", "-q", "--no-deps", "open-clip-torch==3.3.0"),
)


def install_key(root: str | Path) -> str:
    """What the marker records: the requirements and the commands, so a changed list installs again."""
    req = Path(root) / "requirements.txt"
    blob = (req.read_bytes() if req.is_file() else b"") + repr(INSTALL_COMMANDS).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_installed(root: str | Path, run: Callable[..., Any] = subprocess.run) -> bool:
    """Install the requirements into this Python unless the marker says it already finished.

    The marker file is written only after every command succeeded, so an install cut short (a
    disconnect, a failed download) leaves no marker and the next call installs again rather than
    trusting that the folder exists. Returns True when it installed now.
    """
    root = Path(root)
    marker = root / INSTALL_MARKER
    key = install_key(root)
    if marker.is_file() and marker.read_text().strip() == key:
        return False
    marker.unlink(missing_ok=True)
    from .colab import pip_report, requirement_names

    req = root / "requirements.txt"
    ours = requirement_names(req.read_text()) if req.is_file() else set()
    for args in INSTALL_COMMANDS:
        done = run([sys.executable, *args], check=True, cwd=str(root), capture_output=True, text=True)
        output = f"{getattr(done, 'stdout', '') or ''}\n{getattr(done, 'stderr', '') or ''}"
        for line in pip_report(output, ours):
            print(line)
    marker.write_text(key + "\n")
    return True


def restore_checkout(root: str | Path, run: Callable[..., Any] = subprocess.run) -> list[str]:
    """Check out again any tracked file missing from the clone (a clone cut short); their names."""
    out = run(["git", "-C", str(root), "ls-files", "--deleted"], capture_output=True, text=True)
    missing = [line for line in (out.stdout or "").splitlines() if line.strip()]
    if missing:
        run(["git", "-C", str(root), "checkout", "--", *missing], check=True)
    return missing


def versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def device_report() -> str:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        bf16 = "bf16 yes" if bf16_supported() else "no bf16 (use MIXED_PRECISION='fp16')"
        return (f"GPU: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"{bf16}")
    return ("no GPU: a hub model will not train here (the train cell stops and says how to switch to a T4); "
            "BASE_MODEL='toyworld' or 'tiny' train on a CPU in seconds")


def setup(mount_drive: bool = True, hub_token: bool = False, root: str | Path | None = None,
          run: Callable[..., Any] = subprocess.run, cache_model_on_drive: bool = False) -> str:
    """Every notebook's set-up cell: Drive, code, packages, widgets; returns what it found.

    On Colab: mounts Google Drive (runs and class images are kept there across disconnects),
    restores files a cut-short clone left out, installs the requirements (again, if a previous
    install did not finish), and turns on Colab's widget manager. Everywhere: the versions of
    torch/diffusers/transformers/peft/accelerate, the GPU, and where results will go. `run` stands
    in for subprocess.run (the tests). cache_model_on_drive keeps the downloaded base model in
    Drive (MODEL_CACHE), so a reconnect does not download it again.
    """
    root = Path(root) if root else find_repo_root()
    lines = [f"code: {root}"]
    if in_colab():
        if mount_drive and not DRIVE.exists():
            from google.colab import drive  # type: ignore

            drive.mount(str(DRIVE.parent))
        if (root / ".git").exists() and (missing := restore_checkout(root, run)):
            lines.append(f"restored {len(missing)} file(s) an interrupted clone left out")
        print("installing the requirements (about a minute on a fresh runtime)..." if not
              (root / INSTALL_MARKER).is_file() else "checking the install...", flush=True)
        lines.append("packages: installed now" if ensure_installed(root, run) else "packages: already installed")
        from google.colab import output  # type: ignore

        output.enable_custom_widget_manager()
    if cache_model_on_drive:
        from .colab import drive_model_cache

        lines.append(drive_model_cache(MODEL_CACHE) if DRIVE.is_dir() else
                     "model cache: Google Drive is not mounted, so the model is cached on this machine only")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lines.append(device_report())
    out = _absolute(default_output_dir())
    if DRIVE.is_dir():
        lines.append(f"Google Drive: mounted; results go to {out} unless OUTPUT_DIR is set")
    elif in_colab():
        lines.append(f"Google Drive: not mounted; results go to {out}, which a disconnect erases "
                     "(check MOUNT_DRIVE, or set OUTPUT_DIR to a Drive folder)")
    else:
        lines.append(f"results go to {out} unless OUTPUT_DIR is set")
    if hub_token and not smoke():
        hub_login()  # Colab secret HF_TOKEN, or asks; never printed, never written to disk
    return "\n".join(lines)


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


# ---- the photos ------------------------------------------------------------------------------------

def drive_location(path: str | Path) -> str | None:
    """'My Drive › a › b' for a path on the mounted Drive, else None (pure)."""
    try:
        rel = Path(path).relative_to(DRIVE)
    except ValueError:
        return None
    return " › ".join(("My Drive", *rel.parts))


def photos_message(folder: str | Path, problem: str, expect: str, *, param: str = "DATASET_DIR",
                   colab: bool = False, drive_mounted: bool = False) -> str:
    """The message a notebook stops with when its photos are not there (pure)."""
    lines = [f"No training photos: {problem}.", f"Put {expect} (JPEG or PNG) in {folder or 'a folder'}"]
    where = drive_location(folder) if folder else None
    if where:
        lines[-1] += f" — in Google Drive: {where}"
    lines[-1] += f" — or set {param} in the parameters cell to the folder that holds them, then run again."
    if where and not colab:
        lines.append(f"This is not Colab, so there is no Google Drive here: set {param} to a folder on this machine "
                     "(absolute, or relative to the repository root).")
    elif where and not drive_mounted:
        lines.append("Google Drive is not mounted: run the set-up cell with MOUNT_DRIVE checked first.")
    lines.append("To try the workbench without photos of your own, use the synthetic sample: "
                 f"{param} = \"datasets/sample_subject\" (class 'toy').")
    return "\n".join(lines)


def check_photos(folder: str | Path, expect: str = "3–30 photos of the subject",
                 param: str = "DATASET_DIR") -> list[Path]:
    """The photos in `folder` (relative = from the repository root), or stop the notebook with one
    message: where to put them, how many, which parameter to set. Smoke mode checks the same way."""
    from .data import DatasetError, find_images

    path = Path(_absolute(folder)) if str(folder).strip() else None
    if path is None:
        raise PhotosMissing(photos_message("", f"{param} is empty", expect, param=param,
                                           colab=in_colab(), drive_mounted=DRIVE.is_dir()))
    if not path.exists():
        problem = f"{path} does not exist"
    else:
        try:
            photos = find_images(path)
        except DatasetError as exc:
            problem = f"{path} holds no photos" if str(exc).startswith("no images in") else str(exc)
        else:
            print(f"{len(photos)} photo(s) in {path}")
            return photos
    raise PhotosMissing(photos_message(path, problem, expect, param=param, colab=in_colab(),
                                       drive_mounted=DRIVE.is_dir()))


def add_photos(folder: str | Path, *, upload: bool = False, zip_path: str = "") -> list[Path]:
    """Photos into the dataset folder: from Colab's file picker (upload=True; .zip files are
    unpacked) and/or a .zip on Drive (zip_path). Folders inside an archive are flattened, caption
    .txt files come along, other files are skipped and named; a different photo of the same name
    is never overwritten. Returns the photos added (the notebook's next cell checks the folder)."""
    from .colab import add_files, read_zip

    dest = Path(_absolute(folder))
    items: dict[str, bytes] = {}
    try:
        if upload:
            if not in_colab():
                raise NotebookStop(f"the file picker is Colab's: here, copy the photos into {dest} "
                                   "(or give ZIP_PATH, a .zip of them)")
            from google.colab import files as colab_files  # type: ignore

            for name, data in colab_files.upload().items():
                items.update(read_zip(io.BytesIO(data)) if name.lower().endswith(".zip") else {name: data})
        if zip_path:
            items.update(read_zip(_absolute(zip_path)))
        added, skipped = add_files(dest, items)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise NotebookStop(str(exc)) from None
    photos = [p for p in added if p.suffix.lower() != ".txt"]
    print(f"added {len(photos)} photo(s) to {dest}" + (f"; skipped (not photos or captions): {', '.join(skipped)}"
                                                        if skipped else ""))
    return photos


# ---- the form -> config ---------------------------------------------------------------------------

def field_overrides(name: str, value: Any) -> dict[str, Any]:
    """One form field as dotted config overrides (pure)."""
    path = FORM_FIELDS[name]
    if name == "USE_8BIT_ADAM":
        return {path: "adamw8bit" if value else "adamw"}
    if name == "GEN_SEED":
        return {path: [int(value) + i for i in range(4)]}  # the seed grid: 4 consecutive seeds
    if name == "RANK":
        return {path: int(value), "lora.alpha": float(value)}
    if name == "GRADIENT_CHECKPOINTING":
        if value in (True, "on"):
            return {path: True}
        if value in (False, "off"):
            return {path: False}
        if value == "auto":
            return {}  # decided by `_auto_checkpointing` once the config is known
        raise ValueError(f"GRADIENT_CHECKPOINTING={value!r}: choose one of {', '.join(GRADIENT_CHECKPOINTING_CHOICES)}")
    if name == "RESOLUTION":
        return {path: int(value) if value else None}  # 0 / None = the model's own size
    if name in ("LR_UNET", "LR_TEXT_ENCODER", "PRIOR_LOSS_WEIGHT", "LORA_SCALE_UNET", "LORA_SCALE_TEXT_ENCODER",
                "GUIDANCE"):
        return {path: float(value)}
    return {path: value}


def form_overrides(form: dict[str, Any]) -> dict[str, Any]:
    """Translate the hyperparameter cell's values into dotted config overrides (pure)."""
    missing = [k for k in FORM_FIELDS if k not in form]
    if missing:
        raise KeyError(f"the hyperparameter cell does not define {', '.join(missing)}")
    out: dict[str, Any] = {}
    for name in FORM_FIELDS:
        out.update(field_overrides(name, form[name]))
    return out


def merge_form(form: dict[str, Any], preset: bool, defaults: dict[str, Any] = FORM_DEFAULTS
               ) -> tuple[dict[str, Any], list[str]]:
    """The form's overrides, and the names of the fields they came from (pure).

    Without a preset every field applies. With one, the machine's fields (MACHINE_FIELDS: precision,
    optimizer, checkpointing, checkpoint interval) and the folders always apply, whatever their
    value; an experiment field applies when it differs from its default in the form (you changed
    it) or is named in the form's FORM_WINS ("STEPS, LR_UNET": set back to the form's default on
    purpose); the others are left to the preset, or to the package default when the preset does not set them.
    """
    missing = [k for k in FORM_FIELDS if k not in form]
    if missing:
        raise KeyError(f"the hyperparameter cell does not define {', '.join(missing)}")
    wins = form_wins(form.get("FORM_WINS", ""))
    used = [name for name in FORM_FIELDS
            if not preset or name in ALWAYS_FORM or name in MACHINE_FIELDS or name not in defaults
            or name in wins or form[name] != defaults[name]]
    out: dict[str, Any] = {}
    for name in used:
        if name in ALWAYS_FORM and not form[name]:
            continue  # empty = the preset's / the default folder
        out.update(field_overrides(name, form[name]))
    return out, used


def form_wins(text: str | None) -> set[str]:
    """The form fields named in FORM_WINS ("STEPS, LR_UNET"): with a preset they apply even at the
    form's default value, so a preset's 1300 steps can be set back to the form's 800 (pure)."""
    names = [n.strip().upper() for n in str(text or "").replace(";", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in FORM_FIELDS]
    if unknown:
        raise ValueError(f"FORM_WINS names {', '.join(unknown)}, which the form does not have; use the "
                         f"form's field names, e.g. STEPS, LR_UNET, RARE_TOKEN")
    return set(names)


def preset_keys(path: str | Path) -> set[str]:
    """The dotted fields a preset YAML sets, itself or through `extends`."""
    from .experiments import file_keys

    return file_keys(path)


def preset_path(preset: str | Path) -> Path:
    return Path(preset) if Path(preset).is_absolute() else find_repo_root() / preset


def preset_choices(root: str | Path | None = None) -> list[str]:
    """Every config preset in configs/ (relative paths), for the form's dropdown: the Colab and
    tiny presets, then the study's (exp1..exp8, small_dog_*); sweep specs and bases are left out."""
    root = Path(root) if root else find_repo_root()
    out = []
    for path in sorted((root / "configs").rglob("*.yaml")):
        data = read_yaml(path) or {}
        if not isinstance(data, dict) or "runs" in data or "grid" in data or path.name == "base.yaml":
            continue
        out.append(str(path.relative_to(root)))
    return sorted(out, key=lambda p: (p.count("/"), p))


def smoke_overrides(output_dir: str | None = None) -> dict[str, Any]:
    """Seconds-long settings on the tiny model: the test suite's switch, same code path, same photos."""
    out = {
        "model.name": TINY_MODEL, "data.resolution": None, "train.steps": 12, "train.checkpoint_every": 6,
        "train.save_lora_every": 6,
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


def machine_overrides(dataset_dir: str = "", output_dir: str = "") -> dict[str, Any]:
    """Where photos and results live on this machine (absolute), plus the smoke settings when on.
    The photo folder is never replaced: a missing one is reported by `check_photos`."""
    out: dict[str, Any] = smoke_overrides(os.environ.get(OUTPUT_ENV)) if smoke() else {}
    out.setdefault("train.output_dir", output_dir or str(default_output_dir()))
    out["train.output_dir"] = _absolute(out["train.output_dir"])
    if dataset_dir:
        out["data.instance_dir"] = _absolute(dataset_dir)
    return out


def _machine_precision(cfg: Config, sources: dict[str, str]) -> Config:
    """fp16 needs CUDA (CPU autocast is bf16 only); bf16 needs a GPU that has it (a T4 has not)."""
    import torch

    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        print("note: no CUDA here, so MIXED_PRECISION='fp16' is off for this run")
        cfg.train.mixed_precision, sources["train.mixed_precision"] = "no", "this machine"
    elif mp == "bf16" and torch.cuda.is_available() and not bf16_supported():
        print(f"warning: {torch.cuda.get_device_name(0)} has no bf16; using MIXED_PRECISION='fp16' instead")
        cfg.train.mixed_precision, sources["train.mixed_precision"] = "fp16", "this machine"
    return cfg


def _machine_variant(cfg: Config, sources: dict[str, str]) -> Config:
    """On a GPU training in fp16, the repository's fp16 weights when it has them (SD1.5 and SDXL do):
    half the download, and the frozen weights are used in fp16 anyway."""
    import torch

    from .colab import fp16_variant

    variant = fp16_variant(cfg.model.name, cfg.model.variant, torch.cuda.is_available(), cfg.train.mixed_precision)
    if variant != cfg.model.variant:
        cfg.model.variant, sources["model.variant"] = variant, "this machine"
    return cfg


def _auto_checkpointing(cfg: Config, sources: dict[str, str], gpu_gib: float | None = None) -> Config:
    """GRADIENT_CHECKPOINTING='auto': on when the memory model predicts that the run, without it,
    does not fit this GPU (a 15 GB T4 when there is none here) with the usual margin; off otherwise,
    and off (the package default) when the model's configs cannot be read here."""
    try:
        from .memory import estimate

        cfg.train.gradient_checkpointing = False
        peak = estimate(cfg, "cuda").as_gib()["peak"]
    except Exception:  # noqa: BLE001 - no estimate: the package default, said in the sources
        cfg.train.gradient_checkpointing, sources["train.gradient_checkpointing"] = False, "auto (no estimate)"
        return cfg
    if gpu_gib is None:
        import torch

        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else T4_GIB
    cfg.train.gradient_checkpointing = peak * MEMORY_MARGIN > gpu_gib
    sources["train.gradient_checkpointing"] = f"auto ({peak:.1f} GiB predicted without it, {gpu_gib:.0f} GiB here)"
    return cfg


def _finish(base: Config, preset_set: set[str], form_over: dict[str, Any], dataset_dir: str,
            output_dir: str, auto_checkpointing: bool = False) -> tuple[Config, dict[str, str]]:
    cfg = with_overrides(base, form_over)
    sources = {k: "preset" for k in preset_set}
    sources.update({k: "form" for k in form_over})
    if smoke():
        small = smoke_overrides()
        cfg = with_overrides(cfg, small)
        sources.update({k: "smoke" for k in small})
    env_out = os.environ.get(OUTPUT_ENV) if smoke() else None
    if env_out:
        cfg.train.output_dir, sources["train.output_dir"] = _absolute(env_out), "smoke"
    elif output_dir:
        cfg.train.output_dir, sources["train.output_dir"] = _absolute(output_dir), "form"
    else:  # Drive when mounted, else runs/
        cfg.train.output_dir, sources["train.output_dir"] = _absolute(default_output_dir()), "this machine"
    if dataset_dir:
        sources["data.instance_dir"] = "form"
        cfg.data.instance_dir = dataset_dir
    cfg.data.instance_dir = _absolute(cfg.data.instance_dir) if cfg.data.instance_dir else ""
    cfg = _machine_precision(cfg, sources)
    cfg = _machine_variant(cfg, sources)
    if auto_checkpointing:
        cfg = _auto_checkpointing(cfg, sources)
    return cfg.validate(), sources


def configure(form: dict[str, Any], preset: str = "") -> tuple[Config, dict[str, str]]:
    """The run's config from the hyperparameter cell and an optional YAML preset, with where each
    value came from: 'form', 'preset', 'default' (the package's), 'smoke' or 'this machine'.

    Without a preset the form is the config. With one, the preset is the base and the fields you
    changed in the form go on top (see `merge_form`). Relative paths are taken from the repository
    root; without CUDA, fp16 is turned off, and bf16 on a GPU without it becomes fp16, with a note.
    """
    if preset:
        path = preset_path(preset)
        base, keys = load(path), preset_keys(path)
    else:
        base, keys = Config(), set()
    over, _ = merge_form(form, bool(preset))
    over = {k: v for k, v in over.items() if k not in ("data.instance_dir", "train.output_dir")}
    if not preset and not form["DATASET_DIR"]:
        over["data.instance_dir"] = ""  # no silent fallback: validation names DATASET_DIR's field
    return _finish(base, keys, over, form["DATASET_DIR"], form["OUTPUT_DIR"],
                   auto_checkpointing=form["GRADIENT_CHECKPOINTING"] == "auto")


def build_config(form: dict[str, Any], preset: str = "") -> Config:
    """`configure` without the sources."""
    return configure(form, preset)[0]


def preset_settings(preset: str, dataset_dir: str = "", output_dir: str = "") -> tuple[Config, dict[str, str]]:
    """A YAML preset (path relative to the repository root) with this machine's folders, and sources."""
    path = preset_path(preset)
    return _finish(load(path), preset_keys(path), {}, dataset_dir, output_dir)


def preset_config(preset: str, dataset_dir: str = "", output_dir: str = "") -> Config:
    return preset_settings(preset, dataset_dir, output_dir)[0]


def eval_settings(**values) -> "EvalConfig":
    """The evaluation form as an EvalConfig; the smoke switch swaps in the tiny DINO/CLIP models."""
    from dataclasses import replace

    from .config import EvalConfig

    ev = replace(EvalConfig(), **values)
    if smoke():
        ev = replace(ev, dino_model=TINY_MODEL, clip_model=TINY_MODEL, images_per_prompt=1, drift_images=2)
    return ev


def output_folder(value: str = "") -> str:
    """Where a notebook's runs and pictures go (absolute): the smoke switch's folder in the tests,
    else OUTPUT_DIR when set, else Google Drive when mounted (a disconnect keeps them), else runs/."""
    env_out = os.environ.get(OUTPUT_ENV) if smoke() else None
    return _absolute(env_out or value or default_output_dir())


def default_output_dir() -> Path:
    """Google Drive when it is mounted (results survive a Colab disconnect), else ./runs."""
    return DRIVE_RUNS if DRIVE.is_dir() else Path("runs")


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
    from .train import run_params

    return "\n".join(f"{k:>20}: {v}" for k, v in run_params(cfg).items())


def memory_note(cfg: Config, gpu_gib: float | None = None, gpu_name: str | None = None) -> str:
    """One line: the memory model's predicted peak for this config on this GPU (a 15 GB T4 when
    there is none), and what to change when it would not fit. Never raises: a model whose configs
    cannot be read here gets a line saying so."""
    try:
        from .memory import estimate

        est = estimate(cfg, "cuda")
    except Exception as exc:  # noqa: BLE001 - a note, not a gate
        return f"memory model: no estimate for {cfg.model.name!r} here ({type(exc).__name__}: {str(exc)[:120]})"
    if gpu_gib is None:
        import torch

        if torch.cuda.is_available():
            gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            gpu_name = gpu_name or torch.cuda.get_device_name(0)
        else:
            gpu_gib = T4_GIB
    where = f"{gpu_name or 'this GPU'} ({gpu_gib:.1f} GiB)" if gpu_name or gpu_gib != T4_GIB else \
        "a 15 GB T4 (no GPU here)"
    g = est.as_gib()
    line = (f"memory model: {g['peak']:.1f} GiB predicted peak (training steps {g['total']:.1f}, set-up "
            f"{g['setup']:.1f}) for {cfg.resolution} px on {where}")
    if g["peak"] * MEMORY_MARGIN <= gpu_gib:
        return line + ": fits"
    fixes = [name for name, off in (("GRADIENT_CHECKPOINTING", not cfg.train.gradient_checkpointing),
                                    ("USE_8BIT_ADAM", cfg.optim.optimizer != "adamw8bit"),
                                    ("MIXED_PRECISION='fp16'", cfg.train.mixed_precision == "no")) if off]
    advice = (f"turn on {', '.join(fixes)}, " if fixes else "") + "lower RESOLUTION or BATCH_SIZE"
    if cfg.model.name == SDXL_BASE:
        advice += ", or use PRESET configs/colab_t4_sdxl.yaml"
    return line + f": likely out of memory (× {MEMORY_MARGIN} margin) — {advice}"


# ---- training and sweeps from a notebook ---------------------------------------------------------

def train_run(cfg: Config, every: int = 25, *, new_run: bool = False, allow_cpu: bool = False,
              take_over_lock: bool = False):
    """Train (or resume, or reuse the finished run) with a live loss plot; prints where it all went.

    new_run=True (the form's NEW_RUN) starts a new run folder instead of resuming or reusing one
    (after the photos or settings changed; the old run is kept). take_over_lock=True
    (TAKE_OVER_LOCK) takes over the lock of a runtime that is gone (never a live process's here). A hub model on a runtime without a
    GPU stops here, before anything loads, unless allow_cpu (ALLOW_CPU). Every refusal is one
    message that names the form field to change, never a traceback.
    """
    import torch

    from .colab import cpu_runtime_problem
    from .runs import RunLocked, RunMismatch
    from .runs import take_over_lock as take_over
    from .train import train

    problem = None if allow_cpu else cpu_runtime_problem(cfg.model.name, torch.cuda.is_available(), in_colab())
    if problem:
        raise NotebookStop(problem)
    live = LiveLoss(every=4 if smoke() else every)
    for attempt in range(2):
        try:
            result = train(cfg, on_step=live, reuse_finished=not new_run, resume=None if new_run else "auto")
            break
        except RunMismatch as exc:
            raise NotebookStop(mismatch_message(exc)) from None
        except RunLocked as exc:
            if not (take_over_lock and exc.can_take_over and attempt == 0):
                raise NotebookStop(locked_message(exc, take_over_lock)) from None
            take_over(exc.run_dir, holder=exc.holder)  # the user ticked TAKE_OVER_LOCK: this very lock, once
    print(f"run folder: {result.run_dir}")
    print(f"LoRA:       {result.lora_path}")
    print(f"loss curve: {result.run_dir / 'loss.png'}")
    print(f"metrics:    {result.run_dir / 'metrics.jsonl'}, {result.run_dir / 'summary.json'}")
    return result


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


def locked_message(exc: Exception, ticked: bool) -> str:
    """RunLocked in the notebook's words: who holds the run and whether ticking TAKE_OVER_LOCK helps (pure)."""
    text = str(exc)
    if not getattr(exc, "can_take_over", False):
        return text + "\nThis lock belongs to a process that is still running on this machine: let it finish, or stop it."
    if ticked:
        return text + "\nThe lock changed while it was being taken over: run this cell again."
    return (text + "\nIf that runtime is gone (a disconnect), tick TAKE_OVER_LOCK in the form (section 2), run the "
            "form and this cell again: the run resumes from its last checkpoint. Untick it afterwards.")


def mismatch_message(exc: Exception) -> str:
    """RunMismatch in the notebook's words: what differs, and the form field that starts a new run (pure)."""
    text = str(exc)
    for cut in (". To train on", ". Resume it with", ": start a new run"):
        text = text.split(cut, 1)[0]
    return (f"{text.rstrip('.')}.\nTo train on the current photos and settings, tick NEW_RUN in the form "
            "(section 2) and run the form and this cell again: a new run folder is made and the old run is kept. "
            "Untick it afterwards, so that a reconnect resumes instead of starting over.")


def export_lora(run_dir: str | Path, step: int | None = None, download: bool = True) -> Path:
    """The run's LoRA (the final one, or a saved step's) as a kohya file for A1111/ComfyUI, named
    after the run folder (and the step), so files of different runs never share a name; offered
    for download on Colab, and its place on Drive printed."""
    from .export import kohya_for_download

    try:
        path = kohya_for_download(run_dir, step=step or None)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise NotebookStop(str(exc)) from None
    where = drive_location(path)
    print(f"kohya LoRA for A1111 / ComfyUI: {path}" + (f" (Google Drive: {where})" if where else ""))
    if download and in_colab():
        from google.colab import files as colab_files  # type: ignore

        colab_files.download(str(path))
    return path


def load_study(spec: str | Path, dataset_dir: str = "", output_dir: str = "", replicates: int | None = None):
    """A sweep spec (relative = from the repository root) with this machine's folders; the runtime's
    precision, optimizer and checkpoint interval fill what the spec's files leave unset.
    `replicates` (None: the spec's) trains every run that many times (training seeds differ)."""
    from .experiments import load_sweep

    return load_sweep(Path(_absolute(spec)), machine_overrides(dataset_dir, output_dir), machine=runtime_settings(),
                      replicates=replicates)


def intervals(rows: list[dict], metrics: list[str], a: str = "", b: str = "", metric: str = "",
              by: str = "group") -> str:
    """Printed and returned: per group (a run's replicates; a run without any is its own group) and
    metric n, mean, sd and the 95% interval (experiments.summarise), then the verdict on a vs b
    (experiments.compare on `metric`, default the first) — or why there is none: a group with no
    evaluated run is named, not an error (this notebook evaluates only what has finished)."""
    from . import stats
    from .experiments import compare, summarise

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
    from .runs import find_finished

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
    from .experiments import REGISTRY, format_registry

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
    from .evaluate import METRICS_FILE, evaluate_runs

    results = evaluate_runs(run_dirs, ev)
    for run_dir, r in zip(run_dirs, results):
        pictures = f"; pictures in {r.folder}" if r.folder else ""
        print(f"{Path(run_dir).name}: {Path(run_dir) / METRICS_FILE}{pictures}")
    return results


def write_registry(folder: Path) -> list[dict]:
    """The sweep folder's registry, rewritten from its run folders; prints where."""
    from .experiments import REGISTRY
    from .experiments import write_registry as write

    rows = write(folder)
    print(f"registry: {folder / (REGISTRY + '.csv')}, {folder / (REGISTRY + '.jsonl')}")
    return rows


# ---- showing things -----------------------------------------------------------------------------

def show(*paths: str | Path) -> None:
    """Display PNGs inline (and print their paths, so they can be found on Drive)."""
    from IPython.display import Image, display

    for p in paths:
        print(f"written: {p}")
        display(Image(filename=str(p)))


def show_dataset(cfg: Config, out: str | Path | None = None) -> Path:
    """The training photos as they will be seen (upright, cropped), as a grid PNG beside the runs,
    named after the photo folder (another dataset's sheet is not overwritten)."""
    from .data import ImageSet
    from .viz import image_grid, tensor_to_pil

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

        from .viz import plot_loss_curve

        target = self.path or Path(tempfile.gettempdir()) / "dreambooth_lab_live_loss.png"
        plot_loss_curve(self.rows, target, title=f"step {self.rows[-1]['step']}")
        if self.handle is not None:
            self.handle.update(Image(filename=str(target)))
