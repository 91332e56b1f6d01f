"""The DreamBooth LoRA training loop: read it top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch holds
``batch_size`` instance photos and, with prior preservation, as many class images; both go
through the UNet in one forward pass and the loss is split again (trainer.DreamBoothObjective):

    loss = MSE(instance) + prior.loss_weight * MSE(class)

Every random draw of step s (data order, crops, flips, VAE sample, noise, timesteps) comes from
generators seeded by (train.seed, s), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would, and two runs with the same config write the same LoRA bytes on CPU.

``train()`` is four parts: resolve the base model and open the run folder (runs.py) before anything
heavy loads, `set_up` (model, class images, adapters, optimizer, checkpoint), `run_loop` (the steps;
reporting goes to callbacks.py) and `finish` (LoRA file, loss plot, summary); a run that stops early
is faults.py's. The caller's RNGs and TF32 flags are as they were afterwards (runtime.py).
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, files, runs
from .callbacks import MetricsFile, OnStep, Progress, RankReport, Tracker
from .config import Config, run_params
from .data import ImageSet
from .dataset_sheet import write_dataset_sheet
from .faults import discard_untrained, stop_disk_full, stopped, trained_anything
from .lora import adapt, write_lora
from .models import BaseModel, check_supported, load_pipeline, resolve
from .optim import hold_lora
from .prior import class_image_set, generation_dtype
from .run_lock import RunLock, RunWarning
from .runs import RunResult, load_result, read_metrics
from .runtime import configure_speed, make_accelerator, prefetch_import, preserved_global_state
from .timing import Timeline, format_profile, format_timings, profile_report
from .tokens import warn_about_token
from .trainer import DreamBoothObjective, Updates, evaluates, step_seed

__all__ = ["train"]  # what a stopped run raises is faults.py's; a run's files and result are runs.py's


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class Session:
    """What the loop and `finish` share, set up once by `set_up`: the run folder and the photos'
    identity, the objective and what updates it, what set-up measured, and how far the run got."""

    cfg: Config
    acc: object
    opened: runs.Opened  # the run folder (.path), and what a forced resume changed (.override)
    ident: runs.Identity
    objective: DreamBoothObjective
    updates: Updates
    start: int  # the step this call starts from: the checkpoint's it resumed, else 0
    history: list[dict]
    generated: int  # class images made by this call
    eval_before: float | None  # None: the run does not evaluate (train.eval_loss)
    clock: Timeline
    t0: float  # time.time() when set-up began: metrics.jsonl's and summary.json's seconds
    step: int = 0  # steps completed so far

    @property
    def run_dir(self) -> Path:
        return self.opened.path

    @property
    def resumed_from(self) -> int | None:
        return self.start or None


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
    with clock.phase("family_detection"):
        base = resolve(cfg.model)  # the family, told once: everything below is handed `base`
    with clock.phase("dataset_hash"):
        ident = runs.Identity.of(cfg)  # reads the photos' bytes: a missing folder fails here, in a second
    with clock.phase("run_folder"):  # which folder, from one scan: refused here, before anything is made
        decision = runs.decide(cfg, ident, resume, allow_change, reuse_finished)
    if decision.kind == "reuse":
        if progress:
            print(f"already trained: {decision.path} (pass reuse_finished=False to train again)")
        return load_result(decision.path)
    check_supported(base, cfg)  # what the model cannot take: refused before any run folder exists
    with clock.phase("dataset_checks"):
        instance = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution, captions=cfg.data.captions,
                                        token=cfg.data.token)  # bad photos (and captions) fail before the model loads
    with preserved_global_state():
        with clock.phase("accelerator"):
            acc = make_accelerator(cfg.train, base.family)
        # The run folder is made (or opened) before anything heavy: an unwritable output folder is
        # reported before minutes of model loading.
        with clock.phase("run_folder"):
            opened = runs.open_run(cfg, ident, decision) if acc.is_main_process else None
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            opened = broadcast_object_list([opened])[0]  # every process resumes from the same checkpoint
        s: Session | None = None
        try:
            with RunLock(opened.path) if acc.is_main_process else nullcontext():
                try:
                    if acc.is_main_process and not (opened.path / runs.DATASET_SHEET).exists():  # each run: its photos
                        with clock.phase("dataset_sheet"):
                            write_dataset_sheet(cfg.data, cfg.resolution, instance, ident.dataset_digest,
                                                opened.path / runs.DATASET_SHEET)
                    s = set_up(cfg, acc, base, opened, instance, ident, progress=progress, profile=profile, clock=clock)
                    callbacks = run_loop(s, on_step, progress)
                    return finish(s, callbacks, progress=progress, profile=profile)
                except OSError as exc:
                    step = s.step if s is not None else None
                    if not files.is_disk_full(exc) or not trained_anything(opened, step):
                        raise
                    raise stop_disk_full(cfg, opened.path, step, exc, main=acc.is_main_process) from None
        except OSError as exc:  # a full disk before the first step (or at the lock): nothing to keep
            if not files.is_disk_full(exc) or trained_anything(opened, s.step if s is not None else None):
                raise
            raise discard_untrained(opened, exc, main=acc.is_main_process) from None


def set_up(cfg: Config, acc, base: BaseModel, opened: runs.Opened, instance: ImageSet, ident: runs.Identity, *,
           progress: bool, profile: bool, clock: Timeline) -> Session:
    """Model, class images, adapters, optimizer and scheduler; restored from the newest intact
    checkpoint when the run has one."""
    with clock.phase("imports_in_train"):  # diffusers' top level (its model classes load in model_load)
        from accelerate.utils import set_seed
        import diffusers.optimization  # noqa: F401 (timed here; trainer.prepare makes the schedule with it)
    t0 = time.time()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
    prior_dtype = generation_dtype(cfg.prior, acc.device)  # what class images are made (and keyed) in
    set_seed(cfg.train.seed)
    with acc.main_process_first(), clock.phase("model_load"):  # a built-in model is built once, by the main process
        pipe = load_pipeline(cfg.model, device=acc.device, dtype=weight_dtype, base=base)
    pipe.vae.requires_grad_(False)  # never trained: no gradients kept for it
    with clock.phase("token_check"):
        warn_about_token(cfg.data.token, pipe.tokenizer, learned=cfg.identifier.learned)
    with clock.phase("class_images"):
        classes, generated = class_image_set(cfg, acc, base, pipe, weight_dtype, prior_dtype, progress)

    with clock.phase("latent_cache"):  # and the text states of the frozen encoder
        objective = DreamBoothObjective(cfg, pipe, instance, classes, acc, profile=profile, base=base)
    torch.manual_seed(cfg.train.seed)  # LoRA init draws from the global generator
    with clock.phase("adapters"):
        params = adapt(cfg.lora, cfg.train, objective.unet, objective.text_encoders, objective.identifier)
    eval_before = None
    if evaluates(cfg, len(instance)):  # train.eval_loss (auto: not on a short run, where it is most of the time)
        with clock.phase("eval_before"):
            eval_before = objective.eval_instance_loss()

    t_optimizer = time.perf_counter()  # speed options, optimizer, schedule, accelerate's prepare, checkpoint lookup
    configure_speed(cfg.train, objective.unet)
    updates = objective.prepare(params)
    history = read_metrics(opened.path) if acc.is_main_process else []  # cut below at the step resumed from
    # The step the run goes on from: its newest intact checkpoint's (loaded into the LoRA, the optimizer,
    # the schedule and the loss scaler; with a forced change the config's hyperparameters from then on), else 0.
    if acc.is_main_process:  # a kill during a checkpoint write leaves its temp folder behind
        checkpoint.clean_temporaries(opened.path)
    choice = checkpoint.latest_good(opened.path)
    if choice.message() and acc.is_main_process:
        warnings.warn(f"{opened.path}: {choice.message()}", RunWarning, stacklevel=3)
    start = 0
    if choice.path is not None:  # --allow-change (an override): the config's learning rates and optimizer settings
        start = checkpoint.load(choice.path, updates.named, updates.optimizer.optimizer, updates.lr_scheduler,
                                acc.scaler, config_hyperparameters=bool(opened.override))
    history = [r for r in history if r["step"] <= start]
    clock.add("optimizer", time.perf_counter() - t_optimizer)
    return Session(cfg=cfg, acc=acc, opened=opened, ident=ident, objective=objective, updates=updates, start=start,
                   history=history, generated=generated, eval_before=eval_before, clock=clock, t0=t0, step=start)


def make_callbacks(s: Session, on_step, progress: bool) -> list:
    """What the loop reports to, in this order: metrics.jsonl and TensorBoard (main process), the
    progress bar, the caller's on_step, the rank report, and the LoRA of chosen steps. TensorBoard's
    writer is opened after the others are made (it goes down into tracking.py)."""
    main = s.acc.is_main_process
    metrics = [MetricsFile(s.run_dir, s.history)] if main else []
    bar = [Progress(s.start, s.cfg.train.steps)] if main and progress else []
    caller = [OnStep(on_step)] if on_step is not None else []
    ranks = [RankReport(s.acc, s.updates.named)] if RankReport.wanted() else []
    tracker = [Tracker(s.acc, s.cfg, s.objective, s.run_dir)] if main else []
    out = metrics + tracker + bar + caller + ranks
    if main and s.cfg.train.save_lora_every:
        from .steps import StepSaver

        out.append(StepSaver(s.acc, s.cfg, s.objective, s.run_dir, lambda step, path: write_lora(
            path, s.cfg, s.acc, s.objective, s.ident.dataset_digest, step=step), s.clock))
    return out


def run_loop(s: Session, on_step, progress: bool) -> list:
    """The steps from s.start to train.steps, reported to the callbacks it makes (`make_callbacks`);
    each ends with a record (metrics.jsonl's line), and every checkpoint_every steps with a checkpoint.
    A non-finite loss or Ctrl-C stops it with what faults.stopped says. The callbacks are closed
    however it ends; returns them (finish writes the rank report)."""
    cfg, acc, objective, u = s.cfg, s.acc, s.objective, s.updates
    callbacks = make_callbacks(s, on_step, progress)
    if acc.is_main_process:
        prefetch_import(f"{__package__}.viz")  # the loss plot's matplotlib, loaded while the steps run
    k = cfg.train.gradient_accumulation_steps
    on_micro = [cb.on_micro for cb in callbacks if hasattr(cb, "on_micro")]
    on_steps = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    prior_logged = objective.sets["class"] is not None or objective.base_model_prior
    try:
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
                with acc.accumulate(*objective.trained_modules):
                    with acc.autocast():
                        out = objective.loss(step, micro)
                    with objective.timer.phase("backward"):
                        acc.backward(out.loss)
                    with objective.timer.phase("optimizer"):
                        if acc.sync_gradients:
                            if step < cfg.identifier.embedding_only_steps:  # the identifier learns alone first
                                hold_lora(u.params, objective.identifier)
                            acc.clip_grad_norm_([p for p in u.params if p.grad is not None], cfg.optim.max_grad_norm)
                        u.optimizer.step()
                        u.optimizer.zero_grad(set_to_none=True)
                prior = out.prior.detach() if out.prior is not None else out.loss * 0
                parts = torch.stack([out.loss.detach(), out.instance.detach(), prior])
                parts = acc.reduce(parts, "mean") if acc.num_processes > 1 else parts  # log the global batch
                sums += parts.float().cpu() / k
                for fn in on_micro:
                    fn(step, micro, out.rows)
            if not u.optimizer.step_was_skipped:  # fp16 overflow skipped the update: the schedule waits too
                u.lr_scheduler.step()
            # The step's record (metrics.jsonl's line): its losses, learning rates (per parameter group) and seconds.
            seconds = time.time() - t_step
            loss, instance_loss, prior_loss = sums.tolist()
            lrs = {g.get("name", "unet"): lr for g, lr in zip(u.optimizer.param_groups, u.lr_scheduler.get_last_lr())}
            record = {"step": step + 1, "loss": loss, "instance_loss": instance_loss,
                      "prior_loss": prior_loss if prior_logged else None, "lr": lrs["unet"],
                      "lr_text_encoder": lrs.get("text_encoder"), "lr_identifier": lrs.get("identifier"),
                      "loss_scale": acc.scaler.get_scale() if acc.scaler is not None else None,
                      "step_seconds": round(seconds, 4), "seconds": round(time.time() - s.t0, 3)}
            if "text_encoder_2" in lrs:  # SDXL with its text encoders trained
                record["lr_text_encoder_2"] = lrs["text_encoder_2"]
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at step {step + 1}")
            s.history.append(record)
            s.step = step + 1
            for fn in on_steps:
                fn(record)
            if acc.is_main_process and s.step % cfg.train.checkpoint_every == 0 and s.step < cfg.train.steps:
                checkpoint.save(s.run_dir, s.step, u.named, u.optimizer.optimizer, u.lr_scheduler,
                                cfg.train.checkpoints_to_keep, scaler=acc.scaler)
            s.clock.last_step = time.perf_counter()
    except (FloatingPointError, KeyboardInterrupt) as exc:  # a non-finite loss, Ctrl-C
        raise stopped(exc, cfg, s.run_dir, s.start, s.step, u.named, objective.identifier,
                      main=acc.is_main_process) from None
    finally:
        for cb in callbacks:
            getattr(cb, "close", lambda: None)()
    return callbacks


def finish(s: Session, callbacks: list, *, progress: bool, profile: bool) -> RunResult:
    """Evaluate, write the LoRA, the loss plot and summary.json; every process returns the result."""
    cfg, acc, objective, ident = s.cfg, s.acc, s.objective, s.ident
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

        params = run_params(cfg)  # written beside the loss plot
        # The last step is checkpointed before anything else is written: a full disk from here on
        # loses no step (the same command resumes at the last step); it goes once summary.json is.
        with clock.phase("last_checkpoint"):
            u = s.updates
            last = checkpoint.save_last(s.run_dir, s.step, u.named, u.optimizer.optimizer, u.lr_scheduler,
                                        scaler=acc.scaler)
        with clock.phase("lora_file"):
            write_lora(s.run_dir / runs.LORA_FILE, cfg, acc, objective, ident.dataset_digest)
        with clock.phase("loss_plot"):
            plot_loss_curve(s.history, s.run_dir / runs.LOSS_PLOT, title=f"{s.run_dir.name}", params=params)
        timings = clock.report()  # the same dict as the result's
        runs.write_summary(
            s.run_dir, "finished", steps=cfg.train.steps, final_loss=s.history[-1]["loss"] if s.history else None,
            eval_before=s.eval_before, eval_after=eval_after, class_images_generated=s.generated,
            resumed_from=s.resumed_from, seconds=round(time.time() - s.t0, 2), config_hash=cfg.hash(),
            family=objective.family, ident=ident, timings=timings,
            # the changed config trained from the resumed step on (steps before it: the run's own)
            resume_override={**s.opened.override, "applied_from_step": s.start} if s.opened.override else None)
        shutil.rmtree(last, ignore_errors=True)
        if profile:
            report = profile_report(objective.timer.seconds, cfg.train.steps - s.start)
            files.write_json(s.run_dir / runs.PROFILE, report)
            if progress:
                print(format_profile(report))
                print(format_timings(timings))
    acc.wait_for_everyone()  # every rank tears its process group down together, none while the main one writes
    acc.end_training()
    return RunResult(run_dir=s.run_dir, lora_path=s.run_dir / runs.LORA_FILE, steps=cfg.train.steps,
                     final_loss=s.history[-1]["loss"] if s.history else float("nan"), eval_loss_before=s.eval_before,
                     eval_loss_after=eval_after, class_images_generated=s.generated, resumed_from=s.resumed_from,
                     seconds=time.time() - s.t0, history=s.history, timings=timings or clock.report())
