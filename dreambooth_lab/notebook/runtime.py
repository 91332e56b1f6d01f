"""Set-up: the machine a notebook runs on — Colab or not, Drive, the install, the hub token, the GPU.

Every notebook's set-up cell calls `setup`: it mounts Google Drive, restores a clone cut short,
installs the requirements once (a marker file says the install finished), and reports versions,
the GPU and where results go. Here too is what every other part of the notebook package asks of
the machine: the smoke switch (``DREAMBOOTH_LAB_SMOKE=1``), where relative paths are taken from,
where results go (`output_folder`) and how much GPU memory there is (`this_gpu`). It imports only
the standard library at start-up: the set-up cell imports it before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

SMOKE_ENV = "DREAMBOOTH_LAB_SMOKE"
OUTPUT_ENV = "DREAMBOOTH_LAB_OUTPUT"  # smoke runs write here instead of the form's OUTPUT_DIR

DRIVE = Path("/content/drive/MyDrive")  # Google Drive, once mounted on Colab
DRIVE_HOME = DRIVE / "dreambooth_lab"
DRIVE_RUNS = DRIVE_HOME / "runs"
DRIVE_DATASETS = DRIVE_HOME / "datasets"
MODEL_CACHE = DRIVE_HOME / "hf-cache"  # the hub cache on Drive, when the set-up cell is asked to keep it
COLAB_CHECKOUT = Path("/content/dreambooth_lab")
INSTALL_MARKER = ".install-complete"  # written last by ensure_installed: its absence means "install again"
T4_GIB = 15.0  # the GPU memory assumed when there is no GPU here (a Colab T4)

# What `setup` installs on Colab. torch is not listed: Colab's CUDA build is kept.
INSTALL_COMMANDS = (
    ("-m", "pip", "install", "-q", "-r", "requirements.txt"),
    ("-m", "pip", "install", "-q", "--no-deps", "open-clip-torch==3.3.0"),
)


def smoke() -> bool:
    return os.environ.get(SMOKE_ENV, "") not in ("", "0", "false", "False")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def find_repo_root(start: str | Path | None = None) -> Path:
    """The checkout this package lives in (the folder holding dreambooth_lab/ and configs/)."""
    from ..experiments import project_root

    return project_root(start)


class NotebookStop(Exception):
    """Stops a notebook at this cell with a message and no traceback (what to do is in the message)."""

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return [f"{type(self).__name__}: the notebook stops here.", *str(self).splitlines()]


def from_root(path: str | Path) -> str:
    """A relative path is taken from the repository root (notebooks run from several folders)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else find_repo_root() / p)


def default_output_dir() -> Path:
    """Google Drive when it is mounted (results survive a Colab disconnect), else ./runs."""
    return DRIVE_RUNS if DRIVE.is_dir() else Path("runs")


def output_source(value: str = "") -> str:
    """Who chose the output folder `output_folder` gives: 'smoke', 'form' or 'this machine' (pure
    given the environment)."""
    return "smoke" if smoke() and os.environ.get(OUTPUT_ENV) else "form" if value else "this machine"


def output_folder(value: str = "") -> str:
    """Where a notebook's runs and pictures go (absolute): the smoke switch's folder in the tests,
    else OUTPUT_DIR when set, else Google Drive when mounted (a disconnect keeps them), else runs/."""
    env_out = os.environ.get(OUTPUT_ENV) if smoke() else None
    return from_root(env_out or value or default_output_dir())


# ---- the install ---------------------------------------------------------------------------------

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
    from ..colab import pip_report, requirement_names

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


# ---- the GPU ------------------------------------------------------------------------------------

def bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def this_gpu() -> tuple[float, str | None]:
    """This GPU's memory in GiB and its name; a 15 GB T4 (T4_GIB) and None when there is no GPU here."""
    import torch

    if not torch.cuda.is_available():
        return T4_GIB, None
    return torch.cuda.get_device_properties(0).total_memory / 2**30, torch.cuda.get_device_name(0)


def device_report() -> str:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        bf16 = "bf16 yes" if bf16_supported() else "no bf16 (use MIXED_PRECISION='fp16')"
        return (f"GPU: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"{bf16}")
    return ("no GPU: a hub model will not train here (the train cell stops and says how to switch to a T4); "
            "BASE_MODEL='toyworld' or 'tiny' train on a CPU in seconds")


# ---- the set-up cell ----------------------------------------------------------------------------

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
        from ..colab import drive_model_cache

        lines.append(drive_model_cache(MODEL_CACHE) if DRIVE.is_dir() else
                     "model cache: Google Drive is not mounted, so the model is cached on this machine only")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lines.append(device_report())
    out = from_root(default_output_dir())
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
