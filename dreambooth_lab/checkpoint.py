"""Training checkpoints in safetensors + JSON only (nothing is ever unpickled).

A checkpoint holds what a resumed run needs and nothing it can derive: the LoRA parameters, the
optimizer state, the LR-scheduler state and the step. Randomness needs no saving because every
step draws from generators seeded by (seed, step) — see train.step_seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and the rest (for JSON).

    Nested dicts (bitsandbytes keeps its quantisation state in one) are walked with '/' paths.
    """
    tensors, scalars = {}, {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value.detach().to("cpu").contiguous()
        elif isinstance(value, dict):
            scalars[prefix + "/"] = {}  # marks an (possibly empty) dict
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        else:
            scalars[prefix] = value

    for pid, slots in state["state"].items():
        walk(str(pid), slots)
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    root: dict = {}
    items = list(meta["scalars"].items()) + list(tensors.items())
    for key, value in items:
        parts = key.rstrip("/").split("/")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if key.endswith("/"):
            node.setdefault(parts[-1], {})
        else:
            node[parts[-1]] = value
    state = {int(pid): slots for pid, slots in root.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, lr_scheduler, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically (temp folder + rename), keep the newest `keep`."""
    root = Path(folder) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=root))
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in params.items()}, str(tmp / "lora_params.safetensors"))
        tensors, meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "scheduler.json").write_text(json.dumps(lr_scheduler.state_dict(), default=_jsonable))
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        final = root / f"step-{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value):
    return None if callable(value) else str(value)


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the temp folders of checkpoint writes that a kill interrupted; return what went.

    Called when a run is opened (before anything resumes or writes), never while a save of this
    process is in flight.
    """
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    gone = sorted(p for p in root.iterdir() if p.name.startswith(".ckpt-"))
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temp folders are ignored)."""
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load(path: Path, params: dict[str, torch.Tensor], optimizer, lr_scheduler) -> int:
    """Restore params, optimizer and scheduler in place; return the step to continue from."""
    saved = load_file(str(path / "lora_params.safetensors"))
    missing = set(params) ^ set(saved)
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match this config's LoRA (differs in {sorted(missing)[:3]}...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    lr_scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    return int(json.loads((path / "state.json").read_text())["step"])
