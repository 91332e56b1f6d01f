"""Atomic writes and never-overwriting folders: a kill never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside path, then rename it into place.

    The file gets the permissions an ordinary write would (0644 under umask 022), not mkstemp's
    private 0600, so e.g. ComfyUI running as another user can read a LoRA.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. Read from /proc on Linux (no side effect); elsewhere by setting and
    restoring it, which is the only getter there is (a lock keeps our own threads out of the gap)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda t: t.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_image(path: str | Path, image) -> Path:
    """Save a PIL image; the format comes from the real suffix, not the temp name."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG")
    return atomic_write(path, lambda t: image.save(t, format=fmt))


def save_figure(path: str | Path, fig) -> Path:
    return atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=fig.dpi, bbox_inches="tight"))


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def new_dir(parent: str | Path, name: str) -> Path:
    """Create parent/name-<timestamp> (with -2, -3... on a clash); never reuse a folder."""
    parent = Path(parent).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create the output folder {parent} ({exc.strerror or exc}): "
                              "choose another train.output_dir (OUTPUT_DIR)") from exc
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: choose another train.output_dir (OUTPUT_DIR)")
    base = f"{name}-{timestamp()}"
    for i in range(1, 1000):
        path = parent / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new folder for {base} in {parent}")


# ---- safetensors with a deterministic header -----------------------------------------------------
# The safetensors library writes header metadata in hash-map order, which changes from one process
# to the next; a LoRA file's bytes would then depend on more than its config and seed. This writer
# produces the same format (8-byte header length, JSON header, aligned raw data) with sorted keys.

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (name -> torch.Tensor) to safetensors bytes, deterministically (pure)."""
    import struct

    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    data = safetensors_bytes(tensors, metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
