"""Training checkpoints in safetensors + JSON only (nothing is ever unpickled).

A checkpoint holds what a resumed run needs and nothing it can derive: the LoRA parameters, the
optimizer state, the LR-scheduler state, the fp16 GradScaler state (when there is one) and the
step. Randomness needs no saving because every step draws from generators seeded by
(seed, step) — see trainer.step_seed.

A checkpoint is written into a temporary folder and renamed into place; ``manifest.json`` records
each file's size and sha256, and ``state.json`` is written last. Loading verifies the manifest, so
a truncated or damaged file is named instead of failing deep inside safetensors, and resume falls
back to the next older checkpoint that is intact (``latest_good``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what is wrong with it."""


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
    for key, value in [*meta["scalars"].items(), *tensors.items()]:
        parts = key.rstrip("/").split("/")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if key.endswith("/"):
            node.setdefault(parts[-1], {})
        else:
            node[parts[-1]] = value
    return {"state": {int(pid): slots for pid, slots in root.items()}, "param_groups": meta["param_groups"]}


def _json(data) -> bytes:
    """Sorted JSON; a function (a scheduler's lr_lambda) as null, anything else unknown as its str."""
    return json.dumps(data, sort_keys=True, default=lambda v: None if callable(v) else str(v)).encode()


def step_folder(folder: Path, step: int) -> Path:
    """Where a run folder's checkpoint of `step` goes: checkpoints/step-NNNNNN (pure)."""
    return Path(folder) / CHECKPOINTS / f"step-{step:06d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint folder step-NNNNNN (pure)."""
    return int(_STEP_DIR.match(Path(path).name).group(1))


def save(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, lr_scheduler, keep: int,
         scaler=None) -> Path:
    """Write checkpoints/step-NNNNNN atomically (temp folder + rename), keep the newest `keep`.

    Every file is written deterministically (sorted safetensors header, sorted JSON), so two runs
    with the same config write the same bytes.
    """
    root = Path(folder) / CHECKPOINTS
    with files.disk_full_as(root):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=root))
    written: dict[str, bytes] = {}
    try:
        os.chmod(tmp, 0o777 & ~files.current_umask())  # mkdtemp makes it private; the user's umask decides
        written["lora_params.safetensors"] = files.safetensors_bytes(params)
        tensors, meta = flatten_optimizer_state(optimizer.state_dict())
        written["optimizer.safetensors"] = files.safetensors_bytes(tensors)
        written["optimizer.json"] = _json(meta)
        written["scheduler.json"] = _json(lr_scheduler.state_dict())
        if scaler is not None:
            written["scaler.json"] = _json(scaler.state_dict())
        for name, data in written.items():
            files.write_bytes(tmp / name, data)
        manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                    for name, data in sorted(written.items())}
        files.write_bytes(tmp / MANIFEST, _json(manifest))
        files.write_bytes(tmp / "state.json", _json({"step": step}))  # last: marks it complete
        final = step_folder(folder, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:  # a full disk: name the checkpoints folder and the checkpoint's size
        if not files.is_disk_full(exc):
            raise
        raise files.as_disk_full(exc, root, needed=sum(map(len, written.values())) or None) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_last(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, lr_scheduler,
              scaler=None) -> Path:
    """A checkpoint of a run's last step (the loop's checkpoints stop short of it), written without
    pruning any (train.checkpoints_to_keep does not apply): what a resume needs when a write after
    the last step fails. When the run resumed from that very step, its checkpoint is already there."""
    path = step_folder(folder, step)
    if path in list_checkpoints(folder):
        return path
    return save(folder, step, params, optimizer, lr_scheduler, keep=10**9, scaler=scaler)


def clean_temporaries(folder: Path) -> None:
    """Remove the temp folders of checkpoint writes that a kill interrupted (called when a run is
    opened, under the run's lock, before anything resumes or writes)."""
    for p in (Path(folder) / CHECKPOINTS).glob(".ckpt-*"):
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temp folders are ignored)."""
    found = [p for p in (Path(folder) / CHECKPOINTS).glob("step-*")  # none when the folder does not exist
             if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file of a checkpoint."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        int(json.loads((path / "state.json").read_text())["step"])
    except FileNotFoundError as exc:
        raise CheckpointError(f"{exc.filename}: missing (the checkpoint was not completely written)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / MANIFEST} or state.json is not valid JSON ({exc})") from None
    for name, want in sorted(manifest.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, {want['bytes']} expected (truncated or damaged)")
        with open(f, "rb") as data:
            digest = hashlib.file_digest(data, "sha256").hexdigest()
        if digest != want["sha256"]:
            raise CheckpointError(f"{f}: contents differ from what was written (sha256 mismatch)")


@dataclass
class Choice:
    """Which checkpoint a resume uses, and the damaged ones it skipped (with why)."""

    path: Path | None
    skipped: list[str]

    def message(self) -> str | None:
        if not self.skipped:
            return None
        where = f"resuming from {self.path.name}" if self.path else "no intact checkpoint is left: starting at step 0"
        return "damaged checkpoint(s) skipped: " + "; ".join(self.skipped) + f" — {where}"


def latest_good(folder: Path) -> Choice:
    """The newest checkpoint that verifies; older ones are tried in turn."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        try:
            verify(path)
            return Choice(path, skipped)
        except CheckpointError as exc:
            skipped.append(f"{path.name} ({exc})")
    return Choice(None, skipped)


def load(path: Path, params: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler=None, *,
         config_hyperparameters: bool = False) -> int:
    """Restore params, optimizer, scheduler (and the fp16 scaler) in place; return the step to continue from.
    config_hyperparameters (a run resumed with a changed config): the optimizer's groups keep the
    hyperparameters they were built with, from that step on (`use_config_hyperparameters`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        saved = load_file(str(path / "lora_params.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    mismatch = set(params) ^ set(saved)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not match this config's LoRA "
                              f"(differs in {sorted(mismatch)[:3]}...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    lr_scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    scaler_file = path / "scaler.json"
    if scaler is not None and scaler_file.is_file():
        scaler.load_state_dict(json.loads(scaler_file.read_text()))
    if config_hyperparameters:
        use_config_hyperparameters(optimizer, lr_scheduler, fresh)
    return int(json.loads((path / "state.json").read_text())["step"])


def use_config_hyperparameters(optimizer, lr_scheduler, fresh: list[dict]) -> None:
    """After a checkpoint is loaded into a run resumed with a changed config: its optimizer groups take
    the config's hyperparameters (`fresh`: the groups as the config built them, before the load, which
    replaced them with the checkpoint's) and the schedule the config's base learning rates, at the
    step the checkpoint reached. The moments (Adam's state) stay the checkpoint's."""
    for group, new in zip(optimizer.param_groups, fresh):
        group.update(new)
    lr_scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)  # diffusers' schedules are all LambdaLR
    if lambdas is not None:
        lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs
