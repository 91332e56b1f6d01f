"""The DreamBooth LoRA training loop: read it top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch holds
``batch_size`` instance photos and, with prior preservation, as many class images; both go
through the UNet in one forward pass and the loss is split again (trainer.DreamBoothObjective):

    loss = MSE(instance) + prior.loss_weight * MSE(class)

Every random draw of step s (data order, crops, flips, VAE sample, noise, timesteps) comes from
generators seeded by (train.seed, s), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would, and two runs with the same config write the same LoRA bytes on CPU.

``train()`` is four parts: open the run folder (runs.py: identity, lock, resume choice) before
anything heavy loads, `set_up` (model, class images, adapters, optimizer, checkpoint), `run_loop`
(the steps; reporting goes to callbacks.py) and `finish` (LoRA file, loss plot, summary). The
caller's global state — torch/numpy/python RNGs and the TF32 flags — is as it was afterwards.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, files, runs
from .callbacks import MetricsFile, OnStep, Progress, RankReport, Tracker
from .config import Config
from .data import ImageSet
from .lora import add_adapters, enable_checkpointing, save_lora
from .models import load_pipeline
from .prior import ensure_class_images
from .runs import METRICS, SUMMARY, find_finished, find_resumable, read_metrics, runs_of  # noqa: F401 (re-exported)
from .trainer import DreamBoothObjective, evaluates, step_seed

__all__ = ["train", "RunResult", "load_result", "read_metrics", "METRICS", "SUMMARY", "find_finished", "find_resumable", "runs_of",
           "TrainingStopped", "NonFiniteLoss", "TrainingInterrupted"]


class TrainingStopped(RuntimeError):
    """Training ended early for a reason the message states in one line (and what to do)."""


class NonFiniteLoss(TrainingStopped, FloatingPointError):
    """The loss became NaN or inf; the run folder is marked failed. The message speaks the Python API;
    `cli_message` says the same in the command line's words (what cli.py prints)."""

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message or message


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a notebook's stop button) during training; the message says how to resume."""


# ---- the run ------------------------------------------------------------------------------------

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


def load_result(run_dir: str | Path) -> RunResult:
    """The RunResult of a finished run, read back from its folder."""
    run_dir = Path(run_dir)
    s = runs.read_summary(run_dir) or {}
    if s.get("status", "finished") != "finished":
        raise TrainingStopped(f"{run_dir} did not finish ({s.get('status')}: {s.get('error', '')})")
    return RunResult(run_dir=run_dir, lora_path=run_dir / runs.LORA_FILE, steps=s["steps"], final_loss=s["final_loss"],
                     eval_loss_before=s["eval_instance_loss_before"], eval_loss_after=s["eval_instance_loss_after"],
                     class_images_generated=s["class_images_generated"], resumed_from=s["resumed_from"],
                     seconds=s["seconds"], history=read_metrics(run_dir), timings=s.get("timings", {}))


class Timeline:
    """Wall-clock seconds of what train() does around the steps, phase by phase (model load,
    family detection, dataset checks, class-image cache, latent caching, the fixed-noise
    evaluation before and after, saving...), with the time to the first step and after the last.
    summary.json records `report()` as `timings` for every run; profile=True prints it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.first_step: float | None = None  # perf_counter when the first step of this call began
        self.last_step: float | None = None  # ... and when its last step ended

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def report(self) -> dict:
        now = time.perf_counter()
        out = {"phases": {k: round(v, 3) for k, v in self.phases.items()}}
        if self.first_step is not None:
            out["to_first_step"] = round(self.first_step - self.start, 3)
        if self.last_step is not None:
            out["after_last_step"] = round(now - self.last_step, 3)
            if self.first_step is not None:
                out["steps"] = round(self.last_step - self.first_step, 3)
        return out


def format_timings(timings: dict) -> str:
    """The timings of a run as lines: each phase in seconds, then the two totals (pure)."""
    lines = ["start-up and finish (s):"]
    lines += [f"  {name:<18} {sec:8.2f}" for name, sec in timings.get("phases", {}).items()]
    for key in ("to_first_step", "steps", "after_last_step"):
        if key in timings:
            lines.append(f"  {key:<18} {timings[key]:8.2f}")
    return "\n".join(lines)


@dataclass
class Session:
    """Everything the loop needs, set up once by `set_up`."""

    cfg: Config
    acc: object
    run_dir: Path
    objective: DreamBoothObjective
    optimizer: object
    lr_scheduler: object
    params: list
    named: dict
    models: list
    start: int
    resumed_from: int | None
    history: list[dict]
    generated: int
    eval_before: float | None  # None: the run does not evaluate (train.eval_loss)
    t0: float
    step: int = 0  # steps completed so far
    clock: Timeline = field(default_factory=Timeline)
    override: dict | None = None
    dataset_digest: str = ""


def train(cfg: Config, *, resume: str | Path | None = "auto", reuse_finished: bool = False,
          allow_change: bool = False, progress: bool = True, on_step: Callable[[dict], None] | None = None,
          profile: bool = False) -> RunResult:
    """Train a DreamBooth LoRA; returns where everything went.

    resume="auto" continues the newest unfinished run of the same config and photos from its
    latest intact checkpoint (a Colab disconnect costs at most checkpoint_every steps); a path
    resumes that run (a different config or different photos are refused unless
    allow_change=True, which summary.json records); None always starts a new run folder.
    reuse_finished=True returns a finished run of the same config and photos instead of training
    it again (what a notebook's re-run wants). profile=True writes profile.json: seconds per
    phase (data, VAE, text encoder, UNet forward, backward, optimizer).
    """
    clock = Timeline()
    cfg = cfg.resolved().validate()
    if cfg.identifier.learned:  # refused before a run folder exists (not yet for SDXL's two encoders)
        from .config import ConfigError
        from .models import detect_family

        with clock.phase("family_detection"):
            family = detect_family(cfg.model.name, cfg.model.revision)
        if family == "sdxl":
            raise ConfigError("identifier.learned is not supported for SDXL models yet (its tokens would need both "
                              "text encoders): use a rare token (identifier.learned: false)")
        check_identifier_tokens(cfg)  # a clash with the tokenizer's own entries: before any folder or model
    with clock.phase("dataset_hash"):
        ident = runs.Identity.of(cfg)  # reads the photos' bytes: a missing folder fails here, in a second
    if reuse_finished and (done := runs.check_reusable(cfg, ident)) is not None:
        if progress:
            print(f"already trained: {done} (pass reuse_finished=False to train again)")
        return load_result(done)
    with clock.phase("dataset_checks"):
        instance = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution, captions=cfg.data.captions,
                                        token=cfg.data.token)  # bad photos (and captions) fail before the model loads
    with preserved_global_state():
        with clock.phase("accelerator"):
            acc = make_accelerator(cfg)
        # The run folder is made (or picked and checked) before anything heavy: an unwritable
        # output folder or a mismatched resume is reported before minutes of model loading.
        with clock.phase("run_folder"):
            opened = runs.open_run(cfg, ident, resume, allow_change) if acc.is_main_process else None
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            opened = broadcast_object_list([opened])[0]  # every process resumes from the same checkpoint
        s: Session | None = None
        try:
            with runs.RunLock(opened.path) if acc.is_main_process else nullcontext():
                try:
                    if acc.is_main_process and not (opened.path / "dataset.png").exists():  # each run: its photos
                        with clock.phase("dataset_sheet"):
                            write_dataset_sheet(cfg, instance, ident, opened.path / "dataset.png")
                    s = set_up(cfg, acc, opened, instance, ident, progress=progress, profile=profile, clock=clock)
                    callbacks = make_callbacks(s, on_step, progress)
                    try:
                        run_loop(s, callbacks)
                    except FloatingPointError as exc:
                        raise stop_failed(s, exc) from None
                    except KeyboardInterrupt:
                        raise TrainingInterrupted(interrupted_message(s)) from None
                    finally:
                        for cb in callbacks:
                            getattr(cb, "close", lambda: None)()
                    return finish(s, ident, callbacks, progress=progress, profile=profile)
                except OSError as exc:
                    if not files.is_disk_full(exc) or not trained_anything(opened, s):
                        raise
                    raise stop_disk_full(cfg, opened.path, s, exc, main=acc.is_main_process) from None
        except OSError as exc:  # a full disk before the first step (or at the lock): nothing to keep
            if not files.is_disk_full(exc) or trained_anything(opened, s):
                raise
            raise discard_untrained(cfg, opened, exc, main=acc.is_main_process) from None


DATASET_SHEET_VERSION = 1  # part of the sheet cache's key: bump when viz.dataset_sheet draws differently


def sheet_cache_dir() -> Path:
    from .models import cache_root

    return cache_root() / "dataset_sheets"


def write_dataset_sheet(cfg: Config, instance: ImageSet, ident: runs.Identity, path: Path) -> Path:
    """dataset.png: the photos as training sees them (viz.dataset_sheet). Runs on the same photos with
    the same labels, title and parameters (a sweep, a world study, a notebook run again) get a copy of
    the first one's sheet from `<cache>/dataset_sheets/` (keyed by all of these and matplotlib's
    version) instead of importing matplotlib and drawing it again: half a second of every start-up.
    Filling that cache is best effort; the run folder's copy is written like any other file."""
    import hashlib
    import importlib.metadata
    import json

    title = f"{len(instance)} photos in {cfg.data.instance_dir}"
    params = {"resolution": cfg.resolution, "token": cfg.data.token, "class": cfg.data.class_name}
    try:
        mpl = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        mpl = None
    key = hashlib.sha256(json.dumps({
        "version": DATASET_SHEET_VERSION, "matplotlib": mpl, "dataset": ident.dataset_digest, "title": title,
        "params": params, "resolution": instance.resolution,
        "labels": [instance.label(i) for i in range(len(instance))],
    }, sort_keys=True).encode()).hexdigest()[:24]
    cached = sheet_cache_dir() / f"{key}.png"
    try:
        data = cached.read_bytes()
    except OSError:
        data = None
    if data:
        return files.atomic_write(path, lambda tmp: tmp.write_bytes(data))
    from .viz import dataset_sheet

    dataset_sheet(instance, path, title=title, params=params)
    try:
        drawn = path.read_bytes()
        files.atomic_write(cached, lambda tmp: tmp.write_bytes(drawn))
    except OSError:  # a full or read-only cache: the next run draws its own
        pass
    return path


def make_accelerator(cfg: Config):
    """One Accelerator per run. Accelerate keeps one process-wide state; a notebook that trains
    twice with another precision would be refused, so the previous run's is dropped (the process
    group stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from . import tracking

    AcceleratorState._reset_state()
    handlers = []
    if cfg.train.train_text_encoder and not cfg.identifier.learned:
        from accelerate.utils import DistributedDataParallelKwargs

        from .models import detect_family

        # SDXL conditions on the first text encoder's penultimate layer: its last layer's LoRA gets
        # no gradient, which DistributedDataParallel must be told (no effect on one process).
        if detect_family(cfg.model.name, cfg.model.revision) == "sdxl":
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                       log_with=tracking.tracker_backend(cfg), project_config=tracking.project_config(cfg),
                       kwargs_handlers=handlers)


@contextmanager
def preserved_global_state():
    """Training seeds torch (every micro-step), numpy and random, and sets TF32: put them back."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def set_up(cfg: Config, acc, opened: runs.Opened, instance: ImageSet, ident: runs.Identity, *,
           progress: bool, profile: bool, clock: Timeline | None = None) -> Session:
    """Model, class images, adapters, optimizer and scheduler; restored from the newest intact
    checkpoint when the run has one."""
    clock = clock or Timeline()
    with clock.phase("imports_in_train"):  # diffusers' top level (its model classes load in model_load)
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from .models import detect_family
    t0 = time.time()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
    set_seed(cfg.train.seed)
    with acc.main_process_first():  # the tiny model is built once, by the main process
        with clock.phase("family_detection"):  # remembered: load_pipeline's own look is free
            detect_family(cfg.model.name, cfg.model.revision)
        with clock.phase("model_load"):
            pipe = load_pipeline(cfg.model, device=acc.device, dtype=weight_dtype)
    pipe.vae.requires_grad_(False)  # never trained: no gradients kept for it
    with clock.phase("token_check"):
        warn_about_token(cfg, pipe.tokenizer)
    with clock.phase("class_images"):
        classes, generated = class_images(cfg, acc, pipe, weight_dtype, progress)

    with clock.phase("latent_cache"):  # and the text states of the frozen encoder
        objective = DreamBoothObjective(cfg, pipe, instance, classes, acc, profile=profile)
    torch.manual_seed(cfg.train.seed)  # LoRA init draws from the global generator
    second = {"text_encoder_2": objective.text_encoders[1]} if len(objective.text_encoders) > 1 else {}
    with clock.phase("adapters"):
        params = add_adapters(cfg, objective.unet, objective.text_encoder, **second)
    if objective.identifier is not None:  # add_adapters froze the text encoder: the identifier learns
        objective.identifier.requires_grad_(True)
        params.append(objective.identifier)
    if cfg.train.gradient_checkpointing:
        objective.unet.enable_gradient_checkpointing()
        if cfg.train.train_text_encoder:
            for te in objective.text_encoders:
                enable_checkpointing(te)
    eval_before = None
    if evaluates(cfg, len(instance)):  # train.eval_loss (auto: not on a short run, where it is most of the time)
        with clock.phase("eval_before"):
            eval_before = objective.eval_instance_loss()

    t_optimizer = time.perf_counter()  # optimizer, schedule, accelerate's prepare, checkpoint lookup
    configure_speed(cfg, objective.unet)
    encoders = objective.text_encoders if len(objective.text_encoders) > 1 else objective.text_encoder
    optimizer = make_optimizer(cfg, objective.unet, encoders, objective.identifier)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                 num_training_steps=cfg.train.steps)
    encoders = list(objective.text_encoders) if objective.text_trained else []
    models = [objective.unet] + encoders
    *models, optimizer = acc.prepare(*models, optimizer)
    objective.unet = models[0]
    if objective.text_trained:
        objective.text_encoders[:] = models[1:]
    named = {f"unet.{n}": p for n, p in acc.unwrap_model(objective.unet).named_parameters() if p.requires_grad}
    if objective.text_trained:
        for prefix, te in zip(("text_encoder", "text_encoder_2"), objective.text_encoders):
            named.update({f"{prefix}.{n}": p for n, p in acc.unwrap_model(te).named_parameters() if p.requires_grad})

    run_dir, start, resumed_from = opened.path, 0, None
    if acc.is_main_process:  # a kill during a checkpoint write leaves its temp folder behind
        checkpoint.clean_temporaries(run_dir)
    choice = checkpoint.latest_good(run_dir)
    if choice.message() and acc.is_main_process:
        warnings.warn(f"{run_dir}: {choice.message()}", runs.RunWarning, stacklevel=3)
    if choice.path is not None:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.optimizer.param_groups]
        start = resumed_from = checkpoint.load(choice.path, named, optimizer.optimizer, lr_scheduler, acc.scaler)
        if opened.override:  # --allow-change: the config's learning rates and optimizer settings from here on
            use_config_hyperparameters(optimizer.optimizer, lr_scheduler, fresh)
    history = read_metrics(run_dir, up_to_step=start) if acc.is_main_process else []
    clock.add("optimizer", time.perf_counter() - t_optimizer)
    return Session(cfg=cfg, acc=acc, run_dir=run_dir, objective=objective, optimizer=optimizer,
                   lr_scheduler=lr_scheduler, params=params, named=named, models=models, start=start,
                   resumed_from=resumed_from, history=history, generated=generated, eval_before=eval_before,
                   t0=t0, step=start, override=opened.override, dataset_digest=ident.dataset_digest, clock=clock)


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


def class_images(cfg: Config, acc, pipe, weight_dtype, progress: bool) -> tuple[ImageSet | None, int]:
    """The prior-preservation images (generated once into the keyed cache), or (None, 0).

    They are made in prior.dtype (auto: fp16 on a GPU, about twice as fast; fp32 on a CPU), which
    is part of their cache key; the training pipeline is reused when it has that dtype.
    """
    from .prior import generation_dtype

    if not (cfg.prior.enabled and cfg.prior.loss_weight > 0 and cfg.prior.target == "class_images"):
        return None, 0  # no prior, or the base model's own prediction is the prior (trainer.base_prediction)
    dtype = generation_dtype(cfg, acc.device)

    def generation_pipe():
        if getattr(torch, dtype) == weight_dtype:
            return pipe
        other = load_pipeline(cfg.model, device=acc.device, dtype=getattr(torch, dtype))
        other.vae.enable_slicing()
        return other

    with acc.main_process_first():  # one process generates; the others find the cache full
        made = ensure_class_images(cfg, generation_pipe, progress=progress and acc.is_main_process, dtype=dtype)
    if acc.device.type == "cuda":
        torch.cuda.empty_cache()
    return ImageSet.from_paths(made.paths, cfg.resolution), made.generated


def make_callbacks(s: Session, on_step, progress: bool) -> list:
    main = s.acc.is_main_process
    out: list = []
    if main:
        out += [MetricsFile(s.run_dir, s.history), Tracker(s.acc, s.cfg, s.objective, s.run_dir)]
    if main and progress:
        out.append(Progress(s.start, s.cfg.train.steps))
    if on_step is not None:
        out.append(OnStep(on_step))
    if RankReport.wanted():
        out.append(RankReport(s.acc, s.named))
    if main and s.cfg.train.save_lora_every:
        from .steps import StepSaver

        out.append(StepSaver(s.acc, s.cfg, s.objective, s.run_dir,
                             lambda step, path: write_lora(s, path.parent, path.name, step=step)))
    return out


def run_loop(s: Session, callbacks: list) -> None:
    """The steps from s.start to train.steps; each ends with a record, and every checkpoint_every
    steps with a checkpoint."""
    cfg, acc, objective = s.cfg, s.acc, s.objective
    k = cfg.train.gradient_accumulation_steps
    on_micro = [cb.on_micro for cb in callbacks if hasattr(cb, "on_micro")]
    on_step = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    objective.unet.train()
    for te in objective.text_encoders:
        te.train(objective.text_trained)
    for step in range(s.start, cfg.train.steps):
        t_step = time.time()
        if s.clock.first_step is None:
            s.clock.first_step = time.perf_counter()
        sums = torch.zeros(3)
        for micro in range(k):
            torch.manual_seed(step_seed(cfg.train.seed, step, micro))  # LoRA dropout, if any
            with acc.accumulate(*s.models):
                with acc.autocast():
                    loss, inst, prior = objective.loss(step, micro)
                with objective.timer.phase("backward"):
                    acc.backward(loss)
                with objective.timer.phase("optimizer"):
                    if acc.sync_gradients:
                        if step < cfg.identifier.embedding_only_steps:  # the identifier learns alone first
                            hold_lora(s.params, objective.identifier)
                        acc.clip_grad_norm_([p for p in s.params if p.grad is not None], cfg.optim.max_grad_norm)
                    s.optimizer.step()
                    s.optimizer.zero_grad(set_to_none=True)
            parts = torch.stack([loss.detach(), inst.detach(), prior.detach() if prior is not None else loss * 0])
            parts = acc.reduce(parts, "mean") if acc.num_processes > 1 else parts  # log the global batch
            sums += parts.float().cpu() / k
            for fn in on_micro:
                fn(step, micro, objective.last_rows)
        if not s.optimizer.step_was_skipped:  # fp16 overflow skipped the update: the schedule waits too
            s.lr_scheduler.step()
        record = step_record(s, step, sums.tolist(), time.time() - t_step)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became {record['loss']} at step {step + 1}")
        s.history.append(record)
        s.step = step + 1
        for fn in on_step:
            fn(record)
        if acc.is_main_process and s.step % cfg.train.checkpoint_every == 0 and s.step < cfg.train.steps:
            checkpoint.save(s.run_dir, s.step, s.named, s.optimizer.optimizer, s.lr_scheduler,
                            cfg.train.checkpoints_to_keep, scaler=acc.scaler)
        s.clock.last_step = time.perf_counter()


def hold_lora(params: list, identifier) -> None:
    """Drop the LoRA's gradients so this step updates only the learned identifier (AdamW skips
    parameters without a gradient, their moments included)."""
    for p in params:
        if p is not identifier:
            p.grad = None


def step_record(s: Session, step: int, sums: list[float], seconds: float) -> dict:
    """The line metrics.jsonl gets for one optimizer step."""
    lrs = {g.get("name", "unet"): lr for g, lr in zip(s.optimizer.param_groups, s.lr_scheduler.get_last_lr())}
    prior = sums[2] if s.objective.sets["class"] is not None or s.objective.base_model_prior else None
    record = {"step": step + 1, "loss": sums[0], "instance_loss": sums[1], "prior_loss": prior, "lr": lrs["unet"],
              "lr_text_encoder": lrs.get("text_encoder"), "lr_identifier": lrs.get("identifier"),
              "loss_scale": s.acc.scaler.get_scale() if s.acc.scaler is not None else None,
              "step_seconds": round(seconds, 4), "seconds": round(time.time() - s.t0, 3)}
    if "text_encoder_2" in lrs:  # SDXL with its text encoders trained
        record["lr_text_encoder_2"] = lrs["text_encoder_2"]
    return record


def last_checkpoint_note(run_dir: Path) -> str:
    ckpts = checkpoint.list_checkpoints(run_dir)
    return f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written"


def stop_failed(s: Session, exc: FloatingPointError) -> NonFiniteLoss:
    """Mark the run failed in summary.json and say, in one line, what to try: the learning rate that
    is large (the group whose weights went non-finite, else the one furthest above its default) or
    fp16, and how to go on from the last good checkpoint with the change (train(..., resume=<run>,
    allow_change=True); on the CLI --resume RUN --allow-change), or that nothing is kept."""
    step = s.step + 1
    ckpts = checkpoint.list_checkpoints(s.run_dir)
    if s.cfg.train.mixed_precision == "fp16":
        change = "train.mixed_precision=bf16"
        hint = "fp16 overflow is the usual cause: use train.mixed_precision=bf16 or no"
    else:
        field, value = large_learning_rate(s.cfg, blown_groups(s))
        change = f"{field}={value / 2:g}"
        hint = f"lower {field} (now {value:g}; e.g. halve it)"
    if s.acc.is_main_process:
        files.write_json(s.run_dir / SUMMARY, {
            "status": "failed", "error": str(exc), "failed_at_step": step,
            "last_checkpoint": str(ckpts[-1]) if ckpts else None, "config_hash": s.cfg.hash(),
            "steps": s.cfg.train.steps})
    head = f"loss became non-finite at step {step} in {s.run_dir}: {hint}; also try full precision " \
           "(train.mixed_precision=no)"
    if ckpts:
        api = (f"{head}; the last good checkpoint is {ckpts[-1]}: to go on from it with the change, "
               f"train(cfg, resume={str(s.run_dir)!r}, allow_change=True)")
        cli = (f"{head}; the last good checkpoint is {ckpts[-1]}: to go on from it with the change, run the same "
               f"command with --set {change} --resume {s.run_dir} --allow-change")
    else:
        api = cli = f"{head}; no checkpoint was written, so no step is kept: train again with the change (a new run)"
    return NonFiniteLoss(api, cli)


LR_FIELDS = {"unet": "optim.lr_unet", "text_encoder": "optim.lr_text_encoder",
             "text_encoder_2": "optim.lr_text_encoder_2", "identifier": "identifier.lr"}


def blown_groups(s: Session) -> set[str]:
    """The optimizer groups (unet, text_encoder, text_encoder_2, identifier) with a non-finite weight."""
    out = set()
    ident = s.objective.identifier
    if ident is not None and not bool(torch.isfinite(ident).all()):
        out.add("identifier")
    for name, p in s.named.items():
        if p is not ident and name.split(".", 1)[0] not in out and not bool(torch.isfinite(p).all()):
            out.add(name.split(".", 1)[0])
    return out


def large_learning_rate(cfg: Config, blown: set[str] = frozenset()) -> tuple[str, float]:
    """(field, value) of the learning rate to lower after a non-finite loss: among the groups that
    train (those whose weights went non-finite when any did), the one furthest above its default (pure)."""
    from .config import _get

    defaults = Config()
    trained = {"unet"}
    if cfg.train.train_text_encoder:
        trained |= {"text_encoder"} | ({"text_encoder_2"} if cfg.optim.lr_text_encoder_2 is not None else set())
    if cfg.identifier.learned:
        trained.add("identifier")
    pool = (trained & blown) or trained
    ratios = {}
    for group in pool:
        field = LR_FIELDS[group]
        value = _get(cfg, field)
        default = _get(defaults, field) or defaults.optim.lr_text_encoder
        ratios[field] = (value / default, value)
    field = max(sorted(ratios), key=lambda f: ratios[f][0])
    return field, ratios[field][1]


OUTPUT_HINT = "free space there or point train.output_dir to another disk"


def trained_anything(opened: runs.Opened, s: Session | None) -> bool:
    """Is there anything in the run folder a full disk must not lose: steps done in this call, a
    checkpoint, or a run that existed before this call?"""
    return (not opened.new) or (s is not None and s.step > 0) or bool(checkpoint.list_checkpoints(opened.path))


def output_hint(cfg: Config, exc: files.DiskFull, run_dir: Path) -> str:
    """What to do about a full disk, by where it was writing: the run folder (train.output_dir) or
    elsewhere (the class-image cache says prior.cache_dir itself)."""
    inside = Path(exc.folder).resolve().is_relative_to(Path(run_dir).resolve())
    return OUTPUT_HINT if inside else exc.hint


def stop_disk_full(cfg: Config, run_dir: Path, s: Session | None, exc: OSError, *, main: bool) -> files.DiskFull:
    """A full disk after training began: mark the run failed at its step, resumable from its newest
    checkpoint by the same command (summary.json says so; runs.is_open), and say it in one line."""
    full = exc if isinstance(exc, files.DiskFull) else files.as_disk_full(exc, run_dir)
    step = s.step if s is not None else None
    ckpts = checkpoint.list_checkpoints(run_dir)
    resume = (f"run the same command to resume from step {int(ckpts[-1].name.split('-')[1])}" if ckpts
              else "no checkpoint was written, so the same command starts again from step 0")
    marked = "" if not main else "; " + mark_failed_on_full_disk(cfg, run_dir, step, ckpts, full)
    at = f" at step {step}" if step is not None else ""
    return full.again(hint=f"{output_hint(cfg, full, run_dir)}, then {resume}; training stopped{at}{marked}")


def mark_failed_on_full_disk(cfg: Config, run_dir: Path, step: int | None, ckpts: list[Path],
                             full: files.DiskFull) -> str:
    """Write summary.json (status failed, resumable when a checkpoint is there); the words that say
    whether it could be written."""
    summary = {"status": "failed", "reason": "disk_full", "error": str(full.again(hint="free space")),
               "failed_at_step": step, "last_checkpoint": str(ckpts[-1]) if ckpts else None,
               "resumable": bool(ckpts), "config_hash": cfg.hash(), "steps": cfg.train.steps}
    try:
        files.write_json(run_dir / SUMMARY, summary)
    except OSError as err:
        if not files.is_disk_full(err):
            raise
        return f"summary.json could not be written either, so {run_dir.name} is not marked failed"
    return f"{run_dir} is marked failed in summary.json"


def discard_untrained(cfg: Config, opened: runs.Opened, exc: OSError, *, main: bool) -> files.DiskFull:
    """A full disk before the first step of a new run: the run folder goes (nothing was trained;
    left behind it would be an orphan), and the line says what to do."""
    import shutil

    full = exc if isinstance(exc, files.DiskFull) else files.as_disk_full(exc, opened.path)
    if main:
        shutil.rmtree(opened.path, ignore_errors=True)
    return full.again(hint=f"{output_hint(cfg, full, opened.path)}, then run the same command; nothing was "
                           f"trained, so the new run folder {opened.path.name} was removed")


def interrupted_message(s: Session) -> str:
    if s.step == s.start and s.start == 0:
        where = "before the first step"
    else:
        where = f"at step {s.step}"
    return (f"interrupted {where} of {s.cfg.train.steps} ({s.run_dir}); run the same command to resume "
            f"({last_checkpoint_note(s.run_dir)})")


def finish(s: Session, ident: runs.Identity, callbacks: list, *, progress: bool, profile: bool) -> RunResult:
    """Evaluate, write the LoRA, the loss plot and summary.json; every process returns the result."""
    cfg, acc, objective = s.cfg, s.acc, s.objective
    objective.unet.eval()
    for te in objective.text_encoders:
        te.eval()
    clock = s.clock
    eval_after = None
    if s.eval_before is not None:  # measured before the first step: measured after the last
        with clock.phase("eval_after"):
            eval_after = objective.eval_instance_loss()
    for cb in callbacks:
        if isinstance(cb, RankReport):
            cb.write()
    acc.wait_for_everyone()
    timings: dict = {}
    if acc.is_main_process:
        from .viz import plot_loss_curve

        # The last step is checkpointed before anything else is written: a full disk from here on
        # loses no step (the same command resumes at the last step); it goes once summary.json is.
        with clock.phase("last_checkpoint"):
            last = keep_last_step(s)
        with clock.phase("lora_file"):
            write_lora(s, s.run_dir)
        if cfg.train.save_lora_every and cfg.train.step_images:
            from .compare import steps_sheet

            with clock.phase("steps_sheet"):
                steps_sheet(s.run_dir)
        with clock.phase("loss_plot"):
            plot_loss_curve(s.history, s.run_dir / "loss.png", title=f"{s.run_dir.name}", params=run_params(cfg))
        summary = {"status": "finished", "steps": cfg.train.steps,
                   "final_loss": s.history[-1]["loss"] if s.history else None,
                   "eval_instance_loss_before": s.eval_before, "eval_instance_loss_after": eval_after,
                   "class_images_generated": s.generated, "resumed_from": s.resumed_from,
                   "seconds": round(time.time() - s.t0, 2), "config_hash": cfg.hash(), "family": objective.family,
                   "dataset_digest": ident.dataset_digest, "photos": len(ident.dataset),
                   "timings": (timings := clock.report())}  # the same dict as the result's
        if s.override:  # the changed config trained from the resumed step on (steps before it: the run's own)
            summary["resume_override"] = {**s.override, "applied_from_step": s.resumed_from or 0}
        files.write_json(s.run_dir / SUMMARY, summary)
        shutil.rmtree(last, ignore_errors=True)
        if profile:
            report = profile_report(objective.timer.seconds, cfg.train.steps - s.start)
            files.write_json(s.run_dir / "profile.json", report)
            if progress:
                print(format_profile(report))
                print(format_timings(summary["timings"]))
    acc.end_training()
    return RunResult(run_dir=s.run_dir, lora_path=s.run_dir / runs.LORA_FILE, steps=cfg.train.steps,
                     final_loss=s.history[-1]["loss"] if s.history else float("nan"), eval_loss_before=s.eval_before,
                     eval_loss_after=eval_after, class_images_generated=s.generated, resumed_from=s.resumed_from,
                     seconds=time.time() - s.t0, history=s.history, timings=timings or clock.report())


def keep_last_step(s: Session) -> Path:
    """A checkpoint of the last step (loop checkpoints stop short of it), kept apart from
    train.checkpoints_to_keep: what a resume needs when a write of `finish` fails."""
    path = s.run_dir / checkpoint.CHECKPOINTS / f"step-{s.step:06d}"
    if path in checkpoint.list_checkpoints(s.run_dir):  # resumed from it: already there
        return path
    return checkpoint.save(s.run_dir, s.step, s.named, s.optimizer.optimizer, s.lr_scheduler, keep=10**9,
                           scaler=s.acc.scaler)


def write_lora(s: Session, folder: Path, name: str = runs.LORA_FILE, step: int | None = None) -> Path:
    """The LoRA as it is now, with the run's metadata (and the learned identifier beside it):
    the final file, or with `step` a step's (its metadata then says dreambooth_lab.step)."""
    from .export import PREFIX, run_metadata

    cfg, acc, objective = s.cfg, s.acc, s.objective
    metadata = {**run_metadata(cfg, objective.family), PREFIX + "dataset_digest": s.dataset_digest}
    if step is not None:
        metadata[PREFIX + "step"] = str(step)
    if objective.identifier is not None:
        from . import identifier
        from .steps import embedding_name

        metadata.update({PREFIX + "identifier": cfg.prompt_token,
                         PREFIX + "identifier_vectors": str(cfg.identifier.num_vectors)})
        identifier.save(folder, objective.identifier, {PREFIX + "placeholder": cfg.prompt_token,
                                                       PREFIX + "init": cfg.identifier.init,
                                                       PREFIX + "base_model": cfg.model.name},
                        name=identifier.EMBEDDING_FILE if step is None else embedding_name(step))
    second = acc.unwrap_model(objective.text_encoders[1]) if len(objective.text_encoders) > 1 else None
    return save_lora(folder, acc.unwrap_model(objective.unet), acc.unwrap_model(objective.text_encoder),
                     cfg.train.train_text_encoder, metadata=metadata, text_encoder_2=second, name=name)


def check_identifier_tokens(cfg: Config, tokenizer=None) -> None:
    """A learned identifier's tokens (<sks>, <sks>_1, ...) must be new to the model's tokenizer (only
    the tokenizer is loaded: a second, before any run folder or the model); ConfigError naming data.token."""
    from .config import ConfigError
    from .identifier import token_names
    from .models import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg.model.name)
    vocab = tokenizer.get_vocab()
    clash = [t for t in token_names(cfg.prompt_token, cfg.identifier.num_vectors) if t in vocab]
    if clash:
        raise ConfigError(f"data.token={cfg.data.token!r}: the learned identifier's token(s) {', '.join(clash)} are "
                          f"already in {cfg.model.name}'s tokenizer, so they cannot be learned: pick another "
                          "data.token")


def warn_about_token(cfg: Config, tokenizer) -> None:
    """A rare token that the tokenizer splits binds badly: say so before the hour of training
    (`tokens.analyze`'s first warning; only the split is needed here, not its word-frequency
    look-up, which costs a second of start-up)."""
    import warnings

    from .tokens import TokenWarning, is_learned, split_warning

    if cfg.identifier.learned or is_learned(cfg.data.token, tokenizer):  # a new <token>: nothing to split
        return
    pieces = tokenizer.tokenize(cfg.data.token)
    if len(pieces) != 1:
        warnings.warn(f"data.token '{cfg.data.token}' {split_warning(pieces)}", TokenWarning, stacklevel=3)


def make_optimizer(cfg: Config, unet, text_encoder, identifier=None):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) with one learning rate per component (named
    groups: unet, text_encoder, text_encoder_2 (SDXL), identifier; the identifier without weight
    decay). text_encoder: the text encoder, or the list of them (SDXL: two)."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.optim.lr_unet, "name": "unet"}]
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    lr_2 = cfg.optim.lr_text_encoder if cfg.optim.lr_text_encoder_2 is None else cfg.optim.lr_text_encoder_2
    for name, lr, te in zip(("text_encoder", "text_encoder_2"), (cfg.optim.lr_text_encoder, lr_2), encoders):
        if cfg.train.train_text_encoder:
            groups.append({"params": [p for p in te.parameters() if p.requires_grad and p is not identifier],
                           "lr": lr, "name": name})
    if identifier is not None:
        groups.append({"params": [identifier], "lr": cfg.identifier.lr, "weight_decay": 0.0, "name": "identifier"})
    kw = dict(betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), weight_decay=cfg.optim.weight_decay,
              eps=cfg.optim.adam_epsilon)
    if cfg.optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def configure_speed(cfg: Config, unet) -> None:
    """GPU options decided once: TF32 (process-wide flags; train() restores the caller's, and they
    do nothing on a CPU or a T4), channels-last, torch.compile (SDPA attention is diffusers'
    default on torch 2)."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    if cfg.train.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        unet.forward = torch.compile(unet.forward)


def profile_report(seconds: dict[str, float], steps: int) -> dict:
    """Seconds per phase in total, per step, and as a share of the profiled time (pure)."""
    total = sum(seconds.values()) or 1.0
    return {"steps": steps, "total_seconds": round(total, 4), "phases": {
        name: {"seconds": round(t, 4), "per_step": round(t / max(steps, 1), 5), "share": round(t / total, 4)}
        for name, t in sorted(seconds.items(), key=lambda kv: -kv[1])}}


def format_profile(report: dict) -> str:
    lines = [f"profile over {report['steps']} steps ({report['total_seconds']:.2f} s):"]
    lines += [f"  {name:<14} {p['per_step'] * 1000:9.1f} ms/step  {p['share'] * 100:5.1f}%"
              for name, p in report["phases"].items()]
    return "\n".join(lines)


def run_params(cfg: Config) -> dict:
    """The parameters people compare runs by; written beside every picture of a run."""
    return {
        "model": cfg.model.name, "token": cfg.data.token, "class": cfg.data.class_name,
        "steps": cfg.train.steps, "batch": cfg.train.batch_size, "lr_unet": cfg.optim.lr_unet,
        "train_text_encoder": cfg.train.train_text_encoder, "lr_te": cfg.optim.lr_text_encoder,
        "rank": cfg.lora.rank, "alpha": cfg.lora_alpha, "prior": cfg.prior.enabled,
        **({"lr_te2": cfg.optim.lr_text_encoder_2} if cfg.optim.lr_text_encoder_2 is not None else {}),
        "prior_weight": cfg.prior.loss_weight, "class_images": cfg.prior.num_class_images,
        "seed": cfg.train.seed, "resolution": cfg.resolution,
    }
