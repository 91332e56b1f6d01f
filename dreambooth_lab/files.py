"""Atomic writes and never-overwriting folders: a kill never leaves a half-written file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
import threading
from contextlib import contextmanager, suppress
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

# ---- a full disk or an exhausted quota: one error type, one line ---------------------------------

FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
DEFAULT_HINT = "free space there, or write somewhere else"


def human_bytes(n: int | float) -> str:
    """'512 B', '3.4 KB', '1.2 MB', '5.0 GB' (pure)."""
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the disk of folder (or of its nearest existing parent); None when unknown."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    """Is this a write that failed for want of space (ENOSPC) or over a quota (EDQUOT)?"""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def disk_full_message(folder: Path, needed: int | None, free: int | None, quota: bool, hint: str) -> str:
    """The one line a full disk gets: the folder, what was needed and what is free, what to do (pure)."""
    what = "over its quota" if quota else "full"
    sizes = ([f"{human_bytes(needed)} needed"] if needed is not None else []) + \
        ([f"{human_bytes(free)} free"] if free is not None else [])
    on_colab = " (on Colab: Google Drive's storage is full)" if quota else ""
    return f"the disk of {folder} is {what}{on_colab}" + (f" ({', '.join(sizes)})" if sizes else "") + f": {hint}"


class DiskFull(OSError):
    """A write failed with ENOSPC or EDQUOT; str() is one line naming the folder and what to do.

    `folder`: where it was writing; `needed`: bytes the write needed (None when unknown); `free`:
    bytes free there when it failed; `hint`: what to do (callers say it better with `again`)."""

    def __init__(self, folder: str | Path, needed: int | None = None, *, free: int | None = None,
                 quota: bool = False, hint: str = DEFAULT_HINT):
        self.folder, self.needed, self.free, self.quota, self.hint = Path(folder), needed, free, quota, hint
        code = getattr(errno, "EDQUOT", errno.ENOSPC) if quota else errno.ENOSPC
        super().__init__(code, disk_full_message(self.folder, needed, free, quota, hint))

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # picklable (multiprocessing and accelerate pass exceptions around)
        return partial(DiskFull, free=self.free, quota=self.quota, hint=self.hint), (str(self.folder), self.needed)

    def again(self, *, folder: str | Path | None = None, needed: int | None = None,
              hint: str | None = None) -> "DiskFull":
        """The same fault told better: another folder (free space measured there), size or hint."""
        where, free = (Path(folder), free_bytes(folder)) if folder is not None else (self.folder, self.free)
        return DiskFull(where, self.needed if needed is None else needed, free=free, quota=self.quota,
                        hint=self.hint if hint is None else hint)


def as_disk_full(exc: OSError, folder: str | Path, needed: int | None = None, hint: str | None = None) -> DiskFull:
    """A full-disk OSError (raw or DiskFull already) as DiskFull naming `folder`."""
    if isinstance(exc, DiskFull):
        return exc.again(folder=folder, needed=needed, hint=hint)
    return DiskFull(folder, needed, free=free_bytes(folder), quota=exc.errno != errno.ENOSPC,
                    hint=DEFAULT_HINT if hint is None else hint)


@contextmanager
def disk_full_as(folder: str | Path, needed: int | None = None, hint: str | None = None) -> Iterator[None]:
    """Inside: a raw ENOSPC/EDQUOT OSError becomes DiskFull(folder); a DiskFull raised deeper
    passes unchanged; other errors pass through."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, DiskFull) or not is_disk_full(exc):
            raise
        raise as_disk_full(exc, folder, needed, hint) from exc


def atomic_write(path: str | Path, write: Callable[[Path], None], size: int | None = None) -> Path:
    """Call write(tmp) on a temporary file beside path, then rename it into place.

    The file gets the permissions an ordinary write would (0644 under umask 022), not mkstemp's
    private 0600, so e.g. ComfyUI running as another user can read a LoRA. Whatever fails, the
    temporary file is gone afterwards; a full disk or quota raises DiskFull naming the folder
    (and `size`, the bytes it needed, when the caller knows it).
    """
    path = Path(path)
    with disk_full_as(path.parent, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, ordinary_file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


_UMASK_LOCK = threading.Lock()


def ordinary_file_mode() -> int:
    """The mode an ordinary write gives a new file under the process umask (0644 under 022)."""
    return 0o666 & ~current_umask()


def follow_umask(folder: str | Path) -> Path:
    """Give every file under `folder` the permissions an ordinary write would (0644 under umask
    022): libraries that save for us (diffusers' and transformers' save_pretrained, through
    safetensors) leave their weight files private (0600), unreadable to e.g. ComfyUI running as
    another user."""
    mode = ordinary_file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
    return Path(folder)


def current_umask() -> int:
    """The process umask. Read from /proc on Linux (no side effect); elsewhere by setting and
    restoring it, which is the only getter there is (a lock keeps our own threads out of the gap)."""
    with suppress(OSError, ValueError, IndexError), open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda t: t.write_bytes(data), size=len(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


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


def _fresh_names(parent: Path, name: str) -> Iterator[Path]:
    """parent/name-<timestamp>, then -2, -3 ... up to -999; after the last, FileExistsError."""
    base = f"{name}-{timestamp()}"
    for i in range(1, 1000):
        yield parent / (base if i == 1 else f"{base}-{i}")
    raise FileExistsError(f"could not make a new folder for {base} in {parent}")


def new_dir(parent: str | Path, name: str) -> Path:
    """Create parent/name-<timestamp> (with -2, -3... on a clash); never reuse a folder."""
    parent = Path(parent).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise as_disk_full(exc, parent) from exc
        raise PermissionError(f"cannot create the output folder {parent} ({exc.strerror or exc}): "
                              "choose another train.output_dir (OUTPUT_DIR)") from exc
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: choose another train.output_dir (OUTPUT_DIR)")
    for path in _fresh_names(parent, name):
        with suppress(FileExistsError), disk_full_as(parent):  # taken meanwhile: the next name
            path.mkdir()
            return path


PARTIAL = ".partial"  # suffix of a folder being filled (hidden: its name starts with a dot)


class Building:
    """A new folder parent/name-<timestamp> that only ever appears complete (a context manager).

    Inside the `with`, files go into `tmp`, a hidden `.name-XXXX.partial` beside it; on success it
    is renamed to a name no folder has (`path`, as `new_dir` would pick it), on any failure it is
    removed. Readers that list `name-*` folders thus never see a half-filled one, and a full disk
    leaves nothing behind.
    """

    def __init__(self, parent: str | Path, name: str):
        self.parent, self.name = Path(parent).expanduser(), name
        self.tmp: Path | None = None
        self.path: Path | None = None

    def __enter__(self) -> "Building":
        with disk_full_as(self.parent):
            self.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-", suffix=PARTIAL, dir=self.parent))
        os.chmod(self.tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the user's umask decides
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, DiskFull):  # name the folder the user knows, not the hidden one that is gone
                raise exc.again(folder=self.parent) from None
            return
        try:
            for path in _fresh_names(self.parent, self.name):
                if path.exists():
                    continue
                try:
                    os.rename(self.tmp, path)  # fails on a non-empty folder of that name made meanwhile
                except OSError as err:
                    if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise
                self.path = path
                return
        except BaseException:  # a failed rename, or no free name left
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def final(self, inside: Path) -> Path:
        """Where a path inside `tmp` lies now that the folder has its final name."""
        return self.path / Path(inside).relative_to(self.tmp)


# ---- safetensors with a deterministic header -----------------------------------------------------
# The safetensors library writes header metadata in hash-map order, which changes from one process
# to the next; a LoRA file's bytes would then depend on more than its config and seed. This writer
# produces the same format (8-byte header length, JSON header, aligned raw data) with sorted keys.

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (name -> torch.Tensor) to safetensors bytes, deterministically (pure)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
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
    return write_bytes(path, safetensors_bytes(tensors, metadata))
