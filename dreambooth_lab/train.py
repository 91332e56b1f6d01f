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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, files
from .config import Config, to_yaml
from .data import ImageSet, indices_for_step
from .lora import add_adapters, save_lora
from .models import load_pipeline
from .prior import ensure_class_images
from .sample import LORA_FILE

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


# ---- pure helpers -----------------------------------------------------------------------------

def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """A seed for the randomness of one micro-step, derived from the run seed (pure)."""
    return (seed * 1_000_003 + step * 97 + micro) % (2**63)


def training_target(scheduler_config, latents, noise, timesteps, scheduler) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler_config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float):
    """Split a batch of [instance rows; class rows] and return (loss, instance MSE, prior MSE)."""
    pred, target = pred.float(), target.float()
    inst = F.mse_loss(pred[:n_instance], target[:n_instance])
    if pred.shape[0] == n_instance:
        return inst, inst, None
    prior = F.mse_loss(pred[n_instance:], target[n_instance:])
    return inst + prior_weight * prior, inst, prior


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


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


class Trainer:
    """Holds the models and the batch logic; `train()` below drives it."""

    def __init__(self, cfg: Config, pipe, instance: ImageSet, classes: ImageSet | None, accelerator):
        from diffusers import DDPMScheduler

        self.cfg, self.acc = cfg, accelerator
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.instance, self.classes = instance, classes
        self.prompt_ids = tokenize(self.tokenizer, [cfg.fill(cfg.data.instance_prompt), cfg.fill(cfg.data.class_prompt)])

    def batch(self, step: int, micro: int):
        """Pixels and prompt ids of one micro-batch: instance rows first, then class rows."""
        cfg, B = self.cfg, self.cfg.train.batch_size
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, micro))
        flat = step * cfg.train.gradient_accumulation_steps + micro
        kw = dict(center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip, gen=gen)
        pixels = [self.instance.batch(indices_for_step(len(self.instance), B, cfg.train.seed, flat), **kw)]
        ids = [self.prompt_ids[0:1].repeat(B, 1)]
        if self.classes is not None:
            pixels.append(self.classes.batch(indices_for_step(len(self.classes), B, cfg.train.seed + 1, flat), **kw))
            ids.append(self.prompt_ids[1:2].repeat(B, 1))
        return torch.cat(pixels), torch.cat(ids), gen

    def loss(self, pixels, ids, gen, timesteps=None, noise=None):
        """Diffusion loss of a batch; gen drives the VAE sample, noise and timesteps."""
        dev, dtype = self.acc.device, self.vae.dtype
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(dev, dtype)).latent_dist
            latents = dist.sample(generator=gen) * self.vae.config.scaling_factor
        n = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen).to(dev, latents.dtype)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
        timesteps = timesteps.to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(self.cfg.train.train_text_encoder and torch.is_grad_enabled()):
            states = self.text_encoder(ids.to(dev))[0]
        pred = self.unet(noisy, timesteps, states).sample
        target = training_target(self.noise_scheduler.config, latents, noise, timesteps, self.noise_scheduler)
        return dreambooth_loss(pred, target, self.cfg.train.batch_size, self.cfg.prior.loss_weight)

    @torch.no_grad()
    def eval_instance_loss(self, seed: int = 1234, timesteps=(100, 300, 500, 700, 900)) -> float:
        """Instance loss on fixed crops, noise and timesteps: comparable across steps and runs."""
        losses = []
        for i in range(len(self.instance)):
            px = self.instance.example(i, center_crop=True, flip=False)[None].repeat(len(timesteps), 1, 1, 1)
            ids = self.prompt_ids[0:1].repeat(len(timesteps), 1)
            gen = torch.Generator().manual_seed(seed + i)
            with self.acc.autocast():
                dist = self.vae.encode(px.to(self.acc.device, self.vae.dtype)).latent_dist
                latents = dist.mean * self.vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
                t = torch.tensor(timesteps, device=latents.device)
                noisy = self.noise_scheduler.add_noise(latents, noise, t)
                pred = self.unet(noisy, t, self.text_encoder(ids.to(latents.device))[0]).sample
            target = training_target(self.noise_scheduler.config, latents, noise, t, self.noise_scheduler)
            losses.append(F.mse_loss(pred.float(), target.float()).item())
        return sum(losses) / len(losses)


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
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def train(cfg: Config, *, resume: str | Path | None = "auto", reuse_finished: bool = False, progress: bool = True,
          on_step: Callable[[dict], None] | None = None) -> RunResult:
    """Train a DreamBooth LoRA; returns where everything went.

    resume="auto" continues the newest unfinished run of the same config from its latest
    checkpoint (a Colab disconnect costs at most checkpoint_every steps); a path resumes that
    run; None always starts a new run folder. reuse_finished=True returns a finished run of the
    same config instead of training it again (what a notebook's re-run wants).
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
                      gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
    set_seed(cfg.train.seed)
    pipe = load_pipeline(cfg.model, device=acc.device, dtype=weight_dtype)

    classes, generated = None, 0
    if cfg.prior.enabled and cfg.prior.loss_weight > 0:
        made = ensure_class_images(cfg, lambda: pipe, progress=progress)
        classes, generated = ImageSet.from_paths(made.paths, cfg.resolution), made.generated

    run_dir = Path(resume) if resume not in (None, "auto") else (find_resumable(cfg) if resume == "auto" else None)
    if run_dir is None:
        run_dir = files.new_dir(cfg.train.output_dir, cfg.run_name) if acc.is_main_process else None
        if acc.is_main_process:
            files.write_text(run_dir / "config.yaml", to_yaml(cfg))

    trainer = Trainer(cfg, pipe, instance, classes, acc)
    torch.manual_seed(cfg.train.seed)  # LoRA init draws from the global generator
    params = add_adapters(cfg, trainer.unet, trainer.text_encoder)
    if cfg.train.gradient_checkpointing:
        trainer.unet.enable_gradient_checkpointing()
        if cfg.train.train_text_encoder:
            trainer.text_encoder.gradient_checkpointing_enable()
    eval_before = trainer.eval_instance_loss()

    groups = [{"params": [p for p in trainer.unet.parameters() if p.requires_grad], "lr": cfg.optim.lr_unet}]
    if cfg.train.train_text_encoder:
        groups.append({"params": [p for p in trainer.text_encoder.parameters() if p.requires_grad],
                       "lr": cfg.optim.lr_text_encoder})
    opt_kw = dict(betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), weight_decay=cfg.optim.weight_decay,
                  eps=cfg.optim.adam_epsilon)
    if cfg.optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, **opt_kw)
    else:
        optimizer = torch.optim.AdamW(groups, **opt_kw)
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
    ckpts = checkpoint.list_checkpoints(run_dir) if run_dir is not None else []
    if ckpts:
        start = resumed_from = checkpoint.load(ckpts[-1], named, optimizer.optimizer, lr_scheduler)
    history = read_metrics(run_dir, up_to_step=start) if acc.is_main_process else []
    if acc.is_main_process:  # drop log lines written after the checkpoint we resume from
        files.write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in history))

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
                pixels, ids, gen = trainer.batch(step, micro)
                torch.manual_seed(step_seed(cfg.train.seed, step, micro))  # LoRA dropout, if any
                with acc.accumulate(*models):
                    with acc.autocast():
                        loss, inst, prior = trainer.loss(pixels, ids, gen)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                k = cfg.train.gradient_accumulation_steps
                sums["loss"] += loss.item() / k
                sums["instance_loss"] += inst.item() / k
                sums["prior_loss"] += (prior.item() if prior is not None else 0.0) / k
            lr_scheduler.step()
            if not torch.isfinite(torch.tensor(sums["loss"])):
                raise FloatingPointError(
                    f"loss became {sums['loss']} at step {step + 1}; the last good checkpoint is kept in "
                    f"{run_dir / checkpoint.CHECKPOINTS}. With fp16 this is usually overflow: try bf16 or no mixed precision"
                )
            record = {"step": step + 1, **sums, "prior_loss": sums["prior_loss"] if classes is not None else None,
                      "lr": lr_scheduler.get_last_lr()[0],
                      "lr_text_encoder": lr_scheduler.get_last_lr()[1] if len(groups) > 1 else None,
                      "step_seconds": round(time.time() - t_step, 4), "seconds": round(time.time() - t0, 3)}
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
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
    acc.wait_for_everyone()
    lora_path = run_dir / LORA_FILE if run_dir is not None else None
    if acc.is_main_process:
        save_lora(run_dir, acc.unwrap_model(trainer.unet), acc.unwrap_model(trainer.text_encoder),
                  cfg.train.train_text_encoder)
        from .viz import plot_loss_curve

        plot_loss_curve(history, run_dir / "loss.png", title=f"{run_dir.name}",
                        params=run_params(cfg))
        summary = {"status": "finished", "steps": cfg.train.steps, "final_loss": history[-1]["loss"] if history else None,
                   "eval_instance_loss_before": eval_before, "eval_instance_loss_after": eval_after,
                   "class_images_generated": generated, "resumed_from": resumed_from,
                   "seconds": round(time.time() - t0, 2), "config_hash": cfg.hash()}
        files.write_json(run_dir / SUMMARY, summary)
    acc.end_training()
    return RunResult(run_dir=run_dir, lora_path=lora_path, steps=cfg.train.steps,
                     final_loss=history[-1]["loss"] if history else float("nan"), eval_loss_before=eval_before,
                     eval_loss_after=eval_after, class_images_generated=generated, resumed_from=resumed_from,
                     seconds=time.time() - t0, history=history)


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
