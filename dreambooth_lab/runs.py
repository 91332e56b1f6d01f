"""A run folder: its layout, its identity, what it says about itself, and which folder a train() call uses.

A run is what it says it is: its identity is the config hash (what decides the weights, see
``Config.hash``) *and* a digest of the photos (file names and bytes, in sorted order). Both are
written into ``identity.json`` when the folder is made and into ``summary.json`` and the LoRA's
metadata when it finishes. A finished run is reused, and an unfinished one resumed, only when both
match; otherwise the caller hears what changed and how to start fresh (``decide``: one scan of the
runs folder, one answer). The lock a process holds while it trains a run lives in run_lock.py.

Layout of a run folder::

    config.yaml  identity.json  train.lock  metrics.jsonl  checkpoints/step-NNNNNN/
    dataset.png  pytorch_lora_weights.safetensors  summary.json  loss.png  samples/ ...
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import files
from .config import Config, ConfigError, load, to_yaml

CONFIG = "config.yaml"
IDENTITY = "identity.json"
METRICS = "metrics.jsonl"  # the training loss, a line per step (not the evaluation's EVAL_METRICS)
SUMMARY = "summary.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
DATASET_SHEET = "dataset.png"  # the photos as training sees them
LOSS_PLOT = "loss.png"
PROFILE = "profile.json"  # train(profile=True): seconds per phase
SAMPLES = "samples"  # report.py's folder of pictures
EVAL_METRICS = "metrics.json"  # written by `evaluate`: the judged numbers of the finished run


class RunMismatch(ValueError):
    """An existing run was made with another config or other photos than the one asked for."""


# ---- identity ---------------------------------------------------------------------------------

def dataset_manifest(folder: str | Path, captions: str = "none") -> dict[str, str]:
    """File name -> sha256 of every photo the loader would read from folder, sorted (side-effect free);
    with captions="sidecar" also of each photo's caption file (a changed caption is a changed dataset)."""
    from .data import caption_path, find_images

    out = {}
    for path in find_images(folder):
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        if captions == "sidecar" and (cap := caption_path(path)).is_file():
            out[cap.name] = hashlib.sha256(cap.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def dataset_digest(manifest: dict[str, str]) -> str:
    """One digest of the photos: names and bytes in sorted order (pure)."""
    h = hashlib.sha256()
    for name, sha in sorted(manifest.items()):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()[:16]


def describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    """'2 added (a.jpg, b.jpg), 1 changed (c.jpg)': how two photo sets differ (pure)."""
    def names(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", … {len(keys) - 4} more" if len(keys) > 4 else "")

    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    parts = [f"{len(v)} {word} ({names(v)})" for word, v in (("added", added), ("removed", removed),
                                                               ("changed", changed)) if v]
    return ", ".join(parts) or "no difference"


@dataclass(frozen=True)
class Identity:
    config_hash: str
    dataset: dict[str, str]  # photo name -> sha256

    @property
    def dataset_digest(self) -> str:
        return dataset_digest(self.dataset)

    @classmethod
    def of(cls, cfg: Config) -> "Identity":
        return cls(cfg.hash(), dataset_manifest(cfg.data.instance_dir, cfg.data.captions))

    def to_json(self) -> dict:
        return {"config_hash": self.config_hash, "dataset_digest": self.dataset_digest, "dataset": self.dataset}

    def differences(self, other: "Identity") -> list[str]:
        """What differs from `other` (the run's recorded identity), in words."""
        out = []
        if other.config_hash != self.config_hash:
            out.append(f"the config differs (hash {other.config_hash} in the run, {self.config_hash} now)")
        if other.dataset_digest != self.dataset_digest:
            out.append(f"the photos differ: {describe_change(other.dataset, self.dataset)} since the run started")
        return out


def read_identity(run: Path) -> Identity | None:
    """A run's recorded identity; None for a folder without one (made by an older version)."""
    try:
        data = json.loads((Path(run) / IDENTITY).read_text())
        return Identity(data["config_hash"], dict(data["dataset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- state of a run folder ----------------------------------------------------------------------

def read_summary(run: Path) -> dict | None:
    try:
        return json.loads((Path(run) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def is_finished(run: Path) -> bool:
    s = read_summary(run)
    return bool(s) and s.get("status", "finished") == "finished" and (Path(run) / LORA_FILE).is_file()


def is_open(run: Path) -> bool:
    """A run that can be resumed: not finished and not ended for good (no summary.json yet, or
    one that says the run stopped on a full disk with a checkpoint to go on from: `resumable`)."""
    if not (Path(run) / SUMMARY).exists():
        return True
    s = read_summary(run)
    return isinstance(s, dict) and s.get("status") == "failed" and s.get("resumable") is True


def _scan(cfg: Config, want: str) -> list[tuple[Path, Identity | None]]:
    """Run folders of this exact training config (`want`: its hash), newest first, with their recorded identity."""
    out = Path(cfg.train.output_dir).expanduser()
    found = []  # (glob finds nothing in a folder that does not exist)
    for run in sorted(out.glob(f"{cfg.run_name}-*"), reverse=True):
        ident = read_identity(run)
        try:
            same = ident.config_hash == want if ident else (
                (run / CONFIG).is_file() and load(run / CONFIG).hash() == want)
        except (ConfigError, OSError):  # a folder from another version or a hand-edited config
            continue
        if same:
            found.append((run, ident))
    return found


def _finished(scanned: list[tuple[Path, Identity | None]], ident: Identity) -> tuple[Path | None, list]:
    """(the newest finished run trained on these very photos, the finished runs with an identity)."""
    done = [(run, rec) for run, rec in scanned if rec is not None and is_finished(run)]
    return next((run for run, rec in done if not ident.differences(rec)), None), done


def _resumable(scanned: list[tuple[Path, Identity | None]]) -> tuple[Path, Identity] | None:
    """The newest unfinished run with an identity and a checkpoint, whatever its photos."""
    from .checkpoint import list_checkpoints

    return next(((run, rec) for run, rec in scanned if is_open(run) and rec is not None and list_checkpoints(run)),
                None)


def find_finished(cfg: Config) -> Path | None:
    """The newest finished run of this config trained on these very photos (None when the photo
    folder is missing: nothing can have been trained on it)."""
    from .data import DatasetError

    try:
        ident = Identity.of(cfg)
    except DatasetError:
        return None
    return _finished(_scan(cfg, ident.config_hash), ident)[0]


def find_resumable(cfg: Config) -> Path | None:
    """The newest unfinished run of this config that has a checkpoint, whatever its photos."""
    found = _resumable(_scan(cfg, cfg.hash()))
    return found[0] if found else None


# ---- which folder a train() call uses ---------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """Which folder a train() call trains in: `kind` "new" (a folder to make; `path` None), "resume"
    (that unfinished run) or "reuse" (that finished run, returned as it is), and `reason`, in words.
    A resume that allow_change let through carries what differed (`override`, recorded in
    summary.json); `reopen_failed`: the run had failed, its summary.json is set aside when it opens."""
    kind: str
    path: Path | None
    reason: str
    override: dict | None = None
    reopen_failed: bool = False


def decide(cfg: Config, ident: Identity, resume="auto", allow_change: bool = False,
           reuse_finished: bool = False) -> Decision:
    """Which folder this config trains in, from one scan of the runs folder; nothing is written.
    `ident` is Identity.of(cfg): the scan matches its config hash (the config is hashed once per train()).

    reuse_finished: a finished run of this config and these photos is reused (RunMismatch when the
    only finished runs of this config were trained on other photos: reusing one would hand back the
    wrong LoRA). resume="auto": the newest unfinished run of this config, if its photos are the same
    (else RunMismatch). resume=<path>: that run; a different config or different photos are refused
    unless allow_change=True, which is recorded. resume=None: always a new folder.
    """
    scanned = _scan(cfg, ident.config_hash) if reuse_finished or resume == "auto" else []
    if reuse_finished:
        done, finished = _finished(scanned, ident)
        if done is not None:
            return Decision("reuse", done, "a finished run of this config and these photos")
        if finished:
            run, recorded = finished[0]
            raise RunMismatch(f"{run} has this config but {'; '.join(ident.differences(recorded))}. "
                              f"To train on the current photos start a new run: train(cfg) without "
                              f"reuse_finished, or `train --new-run` from the command line")
    if resume not in (None, "auto"):
        return _decide_path(cfg, ident, Path(resume).expanduser(), allow_change)
    if resume == "auto" and (found := _resumable(scanned)) is not None:
        run, recorded = found
        diffs = ident.differences(recorded)
        if diffs:
            raise RunMismatch(f"the unfinished run {run} has this config but {'; '.join(diffs)}. To train on the "
                              "current photos start a new run: train(cfg, resume=None), or `train --new-run`")
        return Decision("resume", run, "the newest unfinished run of this config and these photos")
    return Decision("new", None, "no unfinished run of this config" if resume == "auto" else "resume=None")


def _decide_path(cfg: Config, ident: Identity, run: Path, allow_change: bool) -> Decision:
    """resume=<path>: that run, if it can go on with this config and these photos."""
    from .checkpoint import list_checkpoints, step_of

    if not (run / CONFIG).is_file():
        raise FileNotFoundError(f"{run} is not a run folder (it has no {CONFIG}): pass the folder that "
                                f"train() printed, or resume='auto'")
    ckpts = list_checkpoints(run)
    status = (read_summary(run) or {}).get("status", "finished")
    failed = status == "failed" and bool(ckpts)  # e.g. a NaN: go on from its last good checkpoint
    if not is_open(run) and not failed:
        raise RunMismatch(f"{run} has already ended ({status}"
                          f"{' with no checkpoint to go on from' if status == 'failed' else ''}); it cannot be "
                          "resumed: start a new run")
    recorded = read_identity(run)
    diffs = ident.differences(recorded) if recorded else ["the run has no identity.json (an older version)"]
    if diffs and not allow_change:
        raise RunMismatch(f"cannot resume {run}: {'; '.join(diffs)}. Resume it with the config and photos it "
                          "was started with, start a new run (resume=None / --new-run), or pass "
                          "allow_change=True (--allow-change) to continue it anyway (recorded in summary.json)")
    if diffs and ckpts:  # what a checkpoint cannot take: refused before anything loads
        problem = resume_change_problem(load(run / CONFIG), cfg, step_of(ckpts[-1]))
        if problem:
            raise RunMismatch(f"cannot resume {run} with this change: {problem}")
    override = {"differences": diffs, "config_hash": ident.config_hash,
                "dataset_digest": ident.dataset_digest} if diffs else None
    return Decision("resume", run, "the run asked for" + (" (with a change: allow_change)" if diffs else ""),
                    override, failed)


@dataclass
class Opened:
    path: Path
    new: bool
    override: dict | None = None  # what differed when an explicit resume was forced


def open_run(cfg: Config, ident: Identity, decision: Decision) -> Opened:
    """Make the new run folder, or open the one to resume, that `decide` chose (not for "reuse")."""
    if decision.kind == "resume":
        run = decision.path
        if decision.override:
            files.write_text(run / f"config-resumed-{files.timestamp()}.yaml", to_yaml(cfg))
        if decision.reopen_failed and (run / SUMMARY).exists():  # the failure stays on record beside the run,
            os.replace(run / SUMMARY, run / f"summary-failed-{files.timestamp()}.json")  # which is open again
        return Opened(run, False, decision.override)
    assert decision.kind == "new", decision
    run = None
    try:
        run = files.new_dir(cfg.train.output_dir, cfg.run_name)
        files.write_text(run / CONFIG, to_yaml(cfg))
        files.write_json(run / IDENTITY, ident.to_json())
    except BaseException as exc:  # e.g. a full disk: no empty or half-made run folder stays behind
        if run is not None:
            shutil.rmtree(run, ignore_errors=True)
        if isinstance(exc, files.DiskFull):
            raise exc.again(hint="free space there or point train.output_dir to another disk, then run the same "
                                 "command (no run folder was made)") from None
        raise
    return Opened(run, True)


# What a checkpoint's LoRA and optimizer state are shaped by: a resume cannot change them.
SHAPE_FIELDS = ("model.name", "model.revision", "lora.rank", "lora.unet_targets", "lora.text_encoder_targets",
                "lora.conv", "lora.use_dora", "train.train_text_encoder", "identifier.learned",
                "identifier.num_vectors", "optim.optimizer")


def resume_change_problem(old: Config, new: Config, step: int | None) -> str | None:
    """Why a run started with `old` and checkpointed at `step` cannot go on with `new`, in words; None
    when it can (a changed learning rate, schedule, loss or data takes effect from the resumed step) (pure)."""
    from .config import _get

    def value(cfg: Config, name: str):
        v = _get(cfg, name)
        return list(v) if isinstance(v, (list, tuple)) else v

    for name in SHAPE_FIELDS:
        was, now = value(old, name), value(new, name)
        if was != now:
            return (f"{name} is {now!r} now but {was!r} in the run, and its checkpoint at step {step} holds a LoRA "
                    f"(and optimizer state) of that shape: resume with {name}={was!r}, or start a new run (--new-run)")
    if step is not None and new.train.steps < step:
        return (f"train.steps={new.train.steps} is fewer than the {step} steps its checkpoint has trained: resume "
                f"with train.steps of at least {step}, or start a new run (--new-run)")
    return None


# ---- what a run says about itself: summary.json, its result, its config -------------------------

class TrainingStopped(RuntimeError):
    """Training ended early for a reason the message states in one line (and what to do)."""


@dataclass
class RunResult:
    run_dir: Path
    lora_path: Path
    steps: int
    final_loss: float
    eval_loss_before: float | None  # None: not measured (train.eval_loss)
    eval_loss_after: float | None
    class_images_generated: int
    resumed_from: int | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # Timeline.report(): where start-up and finish went


def write_summary(run: Path, status: str, *, config_hash: str, steps: int, error: str | None = None,
                  failed_at_step: int | None = None, reason: str | None = None,
                  resumable: bool | None = None, final_loss: float | None = None, eval_before: float | None = None,
                  eval_after: float | None = None, class_images_generated: int = 0, resumed_from: int | None = None,
                  seconds: float = 0.0, family: str | None = None, ident: Identity | None = None,
                  timings: dict | None = None, resume_override: dict | None = None) -> Path:
    """Write <run>/summary.json, how the run ended: every field it can hold is named here. A failed
    run with a `reason` (e.g. disk_full) says whether the same command resumes it (`resumable`, read by is_open)."""
    if status == "finished":
        data = {"status": status, "steps": steps, "final_loss": final_loss, "eval_instance_loss_before": eval_before,
                "eval_instance_loss_after": eval_after, "class_images_generated": class_images_generated,
                "resumed_from": resumed_from, "seconds": seconds, "config_hash": config_hash, "family": family,
                "dataset_digest": ident.dataset_digest, "photos": len(ident.dataset), "timings": timings}
        if resume_override:
            data["resume_override"] = resume_override
    else:
        from .checkpoint import list_checkpoints

        ckpts = list_checkpoints(run)
        data = {"status": status, **({"reason": reason} if reason is not None else {}), "error": error,
                "failed_at_step": failed_at_step, "last_checkpoint": str(ckpts[-1]) if ckpts else None,
                **({"resumable": resumable} if resumable is not None else {}), "config_hash": config_hash,
                "steps": steps}
    return files.write_json(Path(run) / SUMMARY, data)


def load_result(run_dir: str | Path) -> RunResult:
    """The RunResult of a finished run, read back from its folder."""
    run_dir = Path(run_dir)
    s = read_summary(run_dir) or {}
    if s.get("status", "finished") != "finished":
        raise TrainingStopped(f"{run_dir} did not finish ({s.get('status')}: {s.get('error', '')})")
    return RunResult(run_dir=run_dir, lora_path=run_dir / LORA_FILE, steps=s["steps"], final_loss=s["final_loss"],
                     eval_loss_before=s["eval_instance_loss_before"], eval_loss_after=s["eval_instance_loss_after"],
                     class_images_generated=s["class_images_generated"], resumed_from=s["resumed_from"],
                     seconds=s["seconds"], history=read_metrics(run_dir), timings=s.get("timings", {}))


def load_config(run_dir: str | Path) -> Config:
    """The config a run was trained with (its config.yaml)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG}): pass a folder under runs/")
    return load(path)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, a dict per step (up to a last line that a kill cut short)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            break
    return rows
