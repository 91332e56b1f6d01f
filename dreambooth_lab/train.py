"""The DreamBooth LoRA training loop: read it top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch holds
``batch_size`` instance photos and, with prior preservation, as many class images; both go
through the UNet in one forward pass and the loss is split again:

    loss = MSE(instance) + prior.loss_weight * MSE(class)

Every random draw of step s (data order, crops, flips, VAE sample, noise, timesteps) comes from
generators seeded by (train.seed, s), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would, and two runs with the same config write the same LoRA bytes on CPU.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import checkpoint, files, tracking
from .config import Config, to_yaml
from .data import ImageSet
from .lora import add_adapters, enable_checkpointing, save_lora
from .models import load_pipeline
from .prior import ensure_class_images
from .sample import LORA_FILE
from .trainer import Trainer, step_seed

METRICS = "metrics.jsonl"
RANK_REPORT_ENV = "DREAMBOOTH_LAB_RANK_REPORT"
SUMMARY = "summary.json"


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_dir: Path
    lora_path: Path
    steps: int
    final_loss: float
    eval_loss_before: float
    eval_loss_after: float
    class_images_generated: int
    resumed_from: int | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def runs_of(cfg: Config) -> list[Path]:
    """Run folders of this exact training config (same hash), newest first."""
    from .config import ConfigError, load

    out = Path(cfg.train.output_dir).expanduser()
    if not out.is_dir():
        return []
    want, found = cfg.hash(), []
    for run in sorted(out.glob(f"{cfg.run_name}-*"), reverse=True):
        try:
            if (run / "config.yaml").is_file() and load(run / "config.yaml").hash() == want:
                found.append(run)
        except (ConfigError, OSError):  # a folder from another version or a hand-edited config
            continue
    return found


def find_resumable(cfg: Config) -> Path | None:
    """The newest unfinished run of this config that has a checkpoint, if any."""
    for run in runs_of(cfg):
        if not (run / SUMMARY).exists() and checkpoint.list_checkpoints(run):
            return run
    return None


def find_finished(cfg: Config) -> Path | None:
    for run in runs_of(cfg):
        if (run / SUMMARY).exists() and (run / LORA_FILE).exists():
            return run
    return None


def load_result(run_dir: str | Path) -> RunResult:
    """The RunResult of a finished run, read back from its folder."""
    run_dir = Path(run_dir)
    s = json.loads((run_dir / SUMMARY).read_text())
    history = read_metrics(run_dir)
    return RunResult(run_dir=run_dir, lora_path=run_dir / LORA_FILE, steps=s["steps"], final_loss=s["final_loss"],
                     eval_loss_before=s["eval_instance_loss_before"], eval_loss_after=s["eval_instance_loss_after"],
                     class_images_generated=s["class_images_generated"], resumed_from=s["resumed_from"],
                     seconds=s["seconds"], history=history)


def read_metrics(run_dir: Path, up_to_step: int | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            break
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def train(cfg: Config, *, resume: str | Path | None = "auto", reuse_finished: bool = False, progress: bool = True,
          on_step: Callable[[dict], None] | None = None, profile: bool = False) -> RunResult:
    """Train a DreamBooth LoRA; returns where everything went.

    resume="auto" continues the newest unfinished run of the same config from its latest
    checkpoint (a Colab disconnect costs at most checkpoint_every steps); a path resumes that
    run; None always starts a new run folder. reuse_finished=True returns a finished run of the
    same config instead of training it again (what a notebook's re-run wants). profile=True
    writes profile.json: seconds per phase (data, VAE, text encoder, UNet forward, backward,
    optimizer), with CUDA synchronised at the edges (which itself costs a little time).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    cfg = cfg.resolved().validate()
    if reuse_finished and (done := find_finished(cfg)) is not None:
        if progress:
            print(f"already trained: {done} (pass reuse_finished=False to train again)")
        return load_result(done)
    t0 = time.time()
    # Fail on bad photos before spending minutes loading a model.
    instance = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)

    # Accelerate keeps one process-wide state; a notebook that trains twice with another
    # precision would be refused, so drop the previous run's (the process group stays).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision,
                      gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                      log_with=tracking.tracker_backend(cfg), project_config=tracking.project_config(cfg))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
    set_seed(cfg.train.seed)
    with acc.main_process_first():  # the tiny model is built once, by the main process
        pipe = load_pipeline(cfg.model, device=acc.device, dtype=weight_dtype)
    warn_about_token(cfg, pipe.tokenizer)

    classes, generated = None, 0
    if cfg.prior.enabled and cfg.prior.loss_weight > 0:
        def generation_pipe():
            # Class images need no fp32: on a GPU they are made in fp16 (about twice as fast).
            if acc.device.type == "cuda" and weight_dtype == torch.float32:
                fast = load_pipeline(cfg.model, device=acc.device, dtype=torch.float16)
                fast.vae.enable_slicing()
                return fast
            return pipe

        with acc.main_process_first():  # one process generates; the others find the cache full
            made = ensure_class_images(cfg, generation_pipe, progress=progress and acc.is_main_process)
        if acc.device.type == "cuda":
            torch.cuda.empty_cache()
        classes, generated = ImageSet.from_paths(made.paths, cfg.resolution), made.generated

    run_dir = None
    if acc.is_main_process:  # only the main process creates and writes files
        run_dir = Path(resume) if resume not in (None, "auto") else (find_resumable(cfg) if resume == "auto" else None)
        if run_dir is None:
            run_dir = files.new_dir(cfg.train.output_dir, cfg.run_name)
            files.write_text(run_dir / "config.yaml", to_yaml(cfg))
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_dir = broadcast_object_list([run_dir])[0]  # every process resumes from the same checkpoint

    trainer = Trainer(cfg, pipe, instance, classes, acc, profile=profile)
    torch.manual_seed(cfg.train.seed)  # LoRA init draws from the global generator
    params = add_adapters(cfg, trainer.unet, trainer.text_encoder)
    if cfg.train.gradient_checkpointing:
        trainer.unet.enable_gradient_checkpointing()
        if cfg.train.train_text_encoder:
            enable_checkpointing(trainer.text_encoder)
    eval_before = trainer.eval_instance_loss()

    configure_speed(cfg, trainer.unet, acc.device)
    optimizer = make_optimizer(cfg, trainer.unet, trainer.text_encoder)
    n_groups = len(optimizer.param_groups)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                 num_training_steps=cfg.train.steps)
    models = [trainer.unet] + ([trainer.text_encoder] if cfg.train.train_text_encoder else [])
    prepared = acc.prepare(*models, optimizer)
    trainer.unet = prepared[0]
    if cfg.train.train_text_encoder:
        trainer.text_encoder = prepared[1]
    optimizer = prepared[-1]

    named = {f"unet.{n}": p for n, p in acc.unwrap_model(trainer.unet).named_parameters() if p.requires_grad}
    if cfg.train.train_text_encoder:
        named.update({f"text_encoder.{n}": p for n, p in acc.unwrap_model(trainer.text_encoder).named_parameters()
                      if p.requires_grad})

    start, resumed_from = 0, None
    if acc.is_main_process:  # a kill during a checkpoint write leaves its temp folder behind
        checkpoint.clean_temporaries(run_dir)
    ckpts = checkpoint.list_checkpoints(run_dir)
    if ckpts:
        start = resumed_from = checkpoint.load(ckpts[-1], named, optimizer.optimizer, lr_scheduler)
    history = read_metrics(run_dir, up_to_step=start) if acc.is_main_process else []
    if acc.is_main_process:  # drop log lines written after the checkpoint we resume from
        files.write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    rank_log: list | None = [] if os.environ.get(RANK_REPORT_ENV) else None  # the multi-process test's record
    logging = acc.is_main_process and tracking.start(acc, cfg, run_dir)
    trainer.unet.train()
    trainer.text_encoder.train(cfg.train.train_text_encoder)
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="training",
               disable=not (progress and acc.is_main_process))
    log = open(run_dir / METRICS, "a") if acc.is_main_process else None
    try:
        for step in bar:
            t_step = time.time()
            sums = {"loss": 0.0, "instance_loss": 0.0, "prior_loss": 0.0}
            for micro in range(cfg.train.gradient_accumulation_steps):
                torch.manual_seed(step_seed(cfg.train.seed, step, micro))  # LoRA dropout, if any
                with acc.accumulate(*models):
                    with acc.autocast():
                        loss, inst, prior = trainer.loss(step, micro)
                    with trainer.timer.phase("backward"):
                        acc.backward(loss)
                    with trainer.timer.phase("optimizer"):
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                k = cfg.train.gradient_accumulation_steps
                parts = torch.stack([loss.detach(), inst.detach(), prior.detach() if prior is not None else loss * 0])
                parts = acc.reduce(parts, "mean") if acc.num_processes > 1 else parts  # log the global batch
                sums["loss"] += parts[0].item() / k
                sums["instance_loss"] += parts[1].item() / k
                sums["prior_loss"] += parts[2].item() / k
                if rank_log is not None:
                    rank_log.append([step, micro, [[r.kind, r.index, r.flip] for r in trainer.last_rows]])
            lr_scheduler.step()
            if not torch.isfinite(torch.tensor(sums["loss"])):
                raise FloatingPointError(
                    f"loss became {sums['loss']} at step {step + 1}; the last good checkpoint is kept in "
                    f"{run_dir / checkpoint.CHECKPOINTS}. With fp16 this is usually overflow: try bf16 or no mixed precision"
                )
            record = {"step": step + 1, **sums, "prior_loss": sums["prior_loss"] if classes is not None else None,
                      "lr": lr_scheduler.get_last_lr()[0],
                      "lr_text_encoder": lr_scheduler.get_last_lr()[1] if n_groups > 1 else None,
                      "step_seconds": round(time.time() - t_step, 4), "seconds": round(time.time() - t0, 3)}
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if logging:
                tracking.log_scalars(acc, record)
            every = cfg.train.validation_every
            if acc.is_main_process and every and (step + 1) % every == 0:
                tracking.log_validation(acc, cfg, trainer, step + 1, run_dir)
            bar.set_postfix(loss=f"{sums['loss']:.4f}")
            if on_step:
                on_step(record)
            done = step + 1
            if acc.is_main_process and (done % cfg.train.checkpoint_every == 0) and done < cfg.train.steps:
                checkpoint.save(run_dir, done, named, optimizer.optimizer, lr_scheduler, cfg.train.checkpoints_to_keep)
    finally:
        bar.close()
        if log:
            log.close()

    trainer.unet.eval()
    trainer.text_encoder.eval()
    eval_after = trainer.eval_instance_loss()
    write_rank_report(acc, rank_log, named)
    acc.wait_for_everyone()
    lora_path = run_dir / LORA_FILE if run_dir is not None else None
    if acc.is_main_process:
        from .export import run_metadata

        save_lora(run_dir, acc.unwrap_model(trainer.unet), acc.unwrap_model(trainer.text_encoder),
                  cfg.train.train_text_encoder, metadata=run_metadata(cfg))
        from .viz import plot_loss_curve

        plot_loss_curve(history, run_dir / "loss.png", title=f"{run_dir.name}",
                        params=run_params(cfg))
        summary = {"status": "finished", "steps": cfg.train.steps, "final_loss": history[-1]["loss"] if history else None,
                   "eval_instance_loss_before": eval_before, "eval_instance_loss_after": eval_after,
                   "class_images_generated": generated, "resumed_from": resumed_from,
                   "seconds": round(time.time() - t0, 2), "config_hash": cfg.hash()}
        files.write_json(run_dir / SUMMARY, summary)
        if profile:
            report = profile_report(trainer.timer.seconds, cfg.train.steps - start)
            files.write_json(run_dir / "profile.json", report)
            if progress:
                print(format_profile(report))
    acc.end_training()
    return RunResult(run_dir=run_dir, lora_path=lora_path, steps=cfg.train.steps,
                     final_loss=history[-1]["loss"] if history else float("nan"), eval_loss_before=eval_before,
                     eval_loss_after=eval_after, class_images_generated=generated, resumed_from=resumed_from,
                     seconds=time.time() - t0, history=history)


def write_rank_report(acc, rows: list, named: dict[str, torch.Tensor]) -> None:
    """With DREAMBOOTH_LAB_RANK_REPORT=<folder>, each process records what data it saw and a digest
    of its final LoRA weights (how the multi-process test checks sharding and synchronisation)."""
    import hashlib

    folder = os.environ.get(RANK_REPORT_ENV)
    if not folder or rows is None:
        return
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(named[name].detach().cpu().float().numpy().tobytes())
    files.write_json(Path(folder) / f"rank{acc.process_index}.json", {
        "rank": acc.process_index, "world": acc.num_processes, "rows": rows, "lora_sha256": digest.hexdigest(),
        "lora": {k: v.detach().cpu().float().flatten()[:8].tolist() for k, v in sorted(named.items())[:4]}})


def warn_about_token(cfg: Config, tokenizer) -> None:
    """A rare token that the tokenizer splits binds badly: say so before the hour of training."""
    import warnings

    from .tokens import TokenWarning, analyze

    report = analyze([cfg.data.token], tokenizer, cfg.data.class_name, cfg.data.instance_prompt)[0]
    if not report.single:
        warnings.warn(f"data.token '{cfg.data.token}' {report.warnings[0]}", TokenWarning, stacklevel=3)


def make_optimizer(cfg: Config, unet, text_encoder):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) with one learning rate per component."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.optim.lr_unet}]
    if cfg.train.train_text_encoder:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                       "lr": cfg.optim.lr_text_encoder})
    kw = dict(betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), weight_decay=cfg.optim.weight_decay,
              eps=cfg.optim.adam_epsilon)
    if cfg.optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def configure_speed(cfg: Config, unet, device: torch.device) -> None:
    """GPU options decided once: TF32, channels-last, torch.compile (SDPA attention is diffusers'
    default on torch 2)."""
    if device.type == "cuda":
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
        "prior_weight": cfg.prior.loss_weight, "class_images": cfg.prior.num_class_images,
        "seed": cfg.train.seed, "resolution": cfg.resolution,
    }
