"""What a Colab runtime needs that a workstation does not: pip's noise read, the model cached on
Drive, the fp16 weights on a GPU, photos uploaded, and a CPU runtime stopped before a hub model.

Pure helpers (messages, parsing, decisions) with the side effects at the edges; the notebook package's
cells call them and turn their messages into a stop without a traceback.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from .builtin import CPU_MODELS

# ---- pip ---------------------------------------------------------------------------------------------

# pip's resolver complaint about packages that were installed before ours, e.g.
# "torchvision 0.20.1+cu121 requires torch==2.5.1, but you have torch 2.6.0 which is incompatible."
_CONFLICT = re.compile(r"^(?P<pkg>[A-Za-z0-9_.\-]+) [^ ]+ (?:requires|has requirement) (?P<req>[A-Za-z0-9_.\-]+)")


def requirement_names(text: str) -> set[str]:
    """The package names a requirements file lists (lower case, '-' for '_'; pure)."""
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def pip_conflicts(output: str, ours: set[str]) -> tuple[list[str], list[str]]:
    """pip's dependency-resolver complaints split into (expected, ours) (pure): a complaint from a
    package Colab installed for itself (a package we never import) is expected and harmless; one
    from a package we list is ours to look at."""
    expected, mine = [], []
    for line in output.splitlines():
        m = _CONFLICT.match(line.strip())
        if not m:
            continue
        (mine if m["pkg"].lower().replace("_", "-") in ours else expected).append(line.strip())
    return expected, mine


def pip_report(output: str, ours: set[str]) -> list[str]:
    """What to print after the install: which resolver complaints are expected, which are not (pure)."""
    expected, mine = pip_conflicts(output, ours)
    lines = []
    if expected:
        pkgs = sorted({line.split()[0] for line in expected})
        lines.append(f"pip: {len(expected)} dependency warning(s) about Colab's own packages ({', '.join(pkgs)}) "
                     "are expected: this workbench does not import them, so training is not affected")
    for line in mine:
        lines.append(f"pip warning about a package this workbench uses (check it if something fails): {line}")
    return lines


# ---- the model: where it is cached, which weights are loaded -----------------------------------------

HF_CACHE_ENV = "HF_HUB_CACHE"


def drive_model_cache(folder: str | Path, environ=os.environ) -> str:
    """Make the hub cache a Drive folder, so a reconnect finds the base model there instead of
    downloading it again (SD1.5: 4.3 GB in fp32, 2 GB in fp16). Must run before huggingface_hub is
    imported (the set-up cell runs first); returns the line to print."""
    import sys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    environ[HF_CACHE_ENV] = str(folder)
    if "huggingface_hub" in sys.modules:
        return (f"model cache: {folder} asked for, but the hub library is already loaded in this session: "
                "Runtime › Restart session, then run the set-up cell first")
    return f"model cache: {folder} (on Drive: a reconnect does not download the model again)"


# Hub repositories known to publish an fp16 variant of their weights (model_index.json's files
# with ".fp16." in their names). Others are asked on the hub when it can be reached.
FP16_VARIANTS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0")


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a folder here (pure apart from the folder check)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def has_fp16_variant(name: str) -> bool:
    """Whether a hub repository publishes fp16 weights: known ones without asking, else the hub's
    file list; False when the hub cannot be reached."""
    if name in FP16_VARIANTS:
        return True
    if not is_hub_id(name):
        return False
    try:
        from huggingface_hub import list_repo_files

        return any(".fp16." in f and f.endswith(".safetensors") for f in list_repo_files(name))
    except Exception:  # noqa: BLE001 - offline, private, gated: load the full weights
        return False


def fp16_variant(name: str, variant: str | None, cuda: bool, mixed_precision: str) -> str | None:
    """The variant to load: the user's when set; on a GPU training in fp16, the repository's fp16
    files when it has them (half the download; the frozen weights are used in fp16 anyway)."""
    if variant is not None or not cuda or mixed_precision != "fp16":
        return variant
    return "fp16" if has_fp16_variant(name) else None


# ---- a CPU runtime --------------------------------------------------------------------------------

def cpu_runtime_problem(model: str, cuda: bool, colab: bool) -> str | None:
    """Why this run should not start here, or None (pure): a real-size model with no GPU."""
    if cuda or model in CPU_MODELS:
        return None
    how = ("switch the runtime to a GPU: Runtime › Change runtime type › T4 GPU › Save, then run the "
           "notebook again from the set-up cell" if colab else "run it on a machine with a CUDA GPU")
    return (f"no GPU on this runtime: training {model} on a CPU takes many hours (a T4 does it in minutes). "
            f"To train it, {how}. To train on the CPU anyway, tick ALLOW_CPU in the form. "
            f"The built-in offline models ({', '.join(CPU_MODELS)}) train on a CPU in seconds.")


# ---- photos in --------------------------------------------------------------------------------------

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"


def _wanted(name: str) -> bool:
    base = Path(name).name
    return (not base.startswith(".") and "__MACOSX" not in Path(name).parts
            and Path(base).suffix.lower() in (*PHOTO_SUFFIXES, CAPTION_SUFFIX))


def add_files(dest: str | Path, items: dict[str, bytes]) -> tuple[list[Path], list[str]]:
    """Write photos (and caption .txt files) into `dest` by their base names; returns (written,
    skipped). An identical file already there is skipped; a different file of the same name is
    never overwritten: the whole batch is refused first, naming the files."""
    from . import files

    dest = Path(dest)
    batch = {Path(n).name: data for n, data in items.items() if _wanted(n)}
    skipped = sorted(Path(n).name for n in items if not _wanted(n))
    clash = sorted(n for n, data in batch.items() if (dest / n).is_file() and (dest / n).read_bytes() != data)
    if clash:
        raise FileExistsError(f"{dest} already has different files named {', '.join(clash)}: rename them in the "
                              "upload (or remove the old ones from the folder), then add the photos again")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(batch.items()):
        if (dest / name).is_file():
            continue  # the same bytes: already there
        files.write_bytes(dest / name, data)
        written.append(dest / name)
    return written, skipped


def read_zip(source) -> dict[str, bytes]:
    """The members of a .zip, a path or a file object (names as stored; add_files flattens them)."""
    name = "the uploaded .zip"
    if isinstance(source, (str, Path)):
        source = Path(source).expanduser()
        name = str(source)
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist: give the path of a .zip of the photos (on Colab, "
                                    "e.g. /content/drive/MyDrive/my_dog.zip)")
    try:
        with zipfile.ZipFile(source) as z:
            return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{name} is not a readable .zip ({exc}): make the archive again") from None
