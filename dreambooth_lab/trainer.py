"""What one training step computes: the batch plan, latents, prompt states and the loss.

Two caches change nothing but time (latent_cache.py says how they fill): the VAE's latent
distribution of every centre crop, and with the text encoder frozen its prompts' states. Every
random draw of a step comes from one generator seeded by (seed, step, micro-step), in the same
order with and without them, which is what makes cached and uncached losses agree. Afterwards
the VAE and the frozen text encoder leave the accelerator (`train.offload_frozen`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import buckets, identifier
from .conditioning import Cond, added_cond_kwargs, encode, time_ids
from .config import Config
from .data import ImageSet, crop_box, indices_for_step, to_tensor
from .latent_cache import LatentCache, encode_lazily, latent_keys
from .losses import dreambooth_loss, min_snr_weights, offset_noise, snr, training_target
from .models import BaseModel, pipeline_class
from .optim import make_optimizer
from .prompts import truncation_warning
from .timing import PhaseTimer


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """A seed for the randomness of one micro-step, derived from the run seed (pure)."""
    return (seed * 1_000_003 + step * 97 + micro) % (2**63)


@dataclass
class Updates:
    """What each optimizer step changes and how: the trainable parameters (a list, clipped together;
    by name, what a checkpoint holds), the optimizer and the learning-rate schedule."""

    params: list
    named: dict
    optimizer: object
    lr_scheduler: object


# The fixed-noise evaluation (DreamBoothObjective.eval_instance_loss): these timesteps, each photo once.
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)
EVAL_SHARE = 0.05  # train.eval_loss=auto: on when before + after cost at most this share of the training


def evaluates(cfg: Config, photos: int) -> bool:
    """Does the run compute the fixed-noise instance loss before the first step and after the last
    (train.eval_loss)? auto: when the two evaluations' UNet rows (forward only: photos x timesteps,
    twice) are at most EVAL_SHARE of the training's (steps x rows per step, forward and backward
    counted as three forwards). The study's 1300 steps on 18 photos: yes (2%); a 2-step run: no (pure)."""
    t = cfg.train
    if t.eval_loss != "auto":
        return t.eval_loss == "on"
    train_rows = 3 * t.steps * t.batch_size * t.gradient_accumulation_steps * (2 if cfg.prior.term is not None else 1)
    return 2 * photos * len(EVAL_TIMESTEPS) <= EVAL_SHARE * train_rows


@dataclass
class Row:
    """One example of a batch: which image set, which photo, flipped or not, where cropped."""

    kind: str  # "instance" | "class"
    index: int
    flip: bool
    box: tuple[int, int, int, int]
    bucket: tuple[int, int] | None = None  # (width, height) with data.buckets
    resized: tuple[int, int] | None = None  # the image is resized to this before the crop box


@dataclass
class MicroLoss:
    """What one micro-batch gives the loop: the loss to back-propagate, its instance and prior parts
    (prior None without prior rows), and the rows it trained on (for the callbacks' on_micro)."""

    loss: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None
    rows: list[Row]


class DreamBoothObjective:
    """The DreamBooth objective of one step: which rows a micro-batch holds, their latents and
    prompt states, and the loss (instance MSE + weighted prior MSE).

    base: the base model as train() resolved it (models.resolve), the one word on its family.
    `prepare` hands the trained modules to the accelerator; the objective keeps them."""

    def __init__(self, cfg: Config, pipe, instance: ImageSet, classes: ImageSet | None, accelerator,
                 profile: bool = False, *, base: BaseModel):
        from diffusers import DDPMScheduler

        self.cfg, self.acc = cfg, accelerator
        self.family = base.family
        self.unet, self.vae = pipe.unet, pipe.vae
        # SDXL: [CLIP ViT-L, OpenCLIP bigG]; SD1/SD2: the one text encoder. Each gets LoRA when trained.
        xl = self.family == "sdxl"
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if xl else [])
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.latent_dtype = pipe.unet.dtype  # what the UNet's base weights are in (the latents follow)
        if xl and cfg.train.mixed_precision == "fp16" and self.vae.dtype == torch.float16 and \
                getattr(self.vae.config, "force_upcast", False):
            torch.nn.Module.to(self.vae, torch.float32)  # SDXL's VAE overflows in fp16 (its config says force_upcast): encode in fp32
        self.sets = {"instance": instance, "class": classes}
        self.base_model_prior = cfg.prior.term == "base_model"
        # One prompt per instance photo with sidecar captions (data.captions), else the instance
        # prompt for all; the class prompt comes last. prompt_index() maps a row to its prompt.
        captions = instance.captions if cfg.data.captions == "sidecar" else None
        self.n_instance_prompts = len(captions) if captions else 1
        prompts = [cfg.fill(c) for c in captions] if captions else [cfg.fill(cfg.data.instance_prompt)]
        prompts.append(cfg.fill(cfg.data.class_prompt))
        self.preserve = [cfg.fill(p) for p in cfg.prior.preserve_prompts]  # prior.preserve_prompts, last
        prompts += self.preserve
        # A learned identifier (identifier.py): new tokens with a trainable embedding, swapped into
        # the text encoder before the prompts are tokenized; their states can then not be cached.
        self.identifier: torch.nn.Parameter | None = None
        ic = cfg.identifier
        if ic.learned:  # (not for SDXL: models.check_supported refused it before train() got here)
            table = self.text_encoder.get_input_embeddings().weight.detach()
            init = identifier.initial_vectors(ic.init, ic.num_vectors, pipe.tokenizer, table, cfg.data.class_name,
                                              cfg.data.token, cfg.train.seed)
            self.identifier = identifier.attach(self.text_encoder, pipe.tokenizer, cfg.prompt_token,
                                                ic.num_vectors, init)
            prompts = [identifier.expand(p, cfg.prompt_token, ic.num_vectors) for p in prompts]
        for prompt in prompts:
            if (msg := truncation_warning(pipe.tokenizer, prompt)) is not None:
                warnings.warn(msg, UserWarning, stacklevel=3)
        self.prompt_ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids for tok in self.tokenizers]  # one per text encoder
        self.timer = PhaseTimer(profile, accelerator.device)
        self.latent_cache: LatentCache | None = None
        self._text_cache: Cond | None = None
        self._text_pending = False  # the frozen encoder's states are due, computed on first use
        # Aspect-ratio bucketing (buckets.py): each photo's bucket, decided once.
        self.bucket_of: list | None = None
        if cfg.data.buckets:
            sizes = buckets.bucket_sizes(cfg.resolution, buckets.bucket_step(cfg.resolution))
            self.bucket_of = [buckets.nearest_bucket(im.size, sizes) for im in instance.images]
        # What eval_instance_loss measures, decided once: each photo centre-cropped, unflipped (in its
        # own bucket with data.buckets).
        self.eval_rows: list[Row] = []
        for i, im in enumerate(instance.images):
            if self.bucket_of is None:
                self.eval_rows.append(Row("instance", i, False, crop_box(im.size, instance.resolution, True, None)))
            else:
                resized, box = buckets.cover_and_crop_box(im.size, self.bucket_of[i], True, None)
                self.eval_rows.append(Row("instance", i, False, box, self.bucket_of[i], resized))
        # Lazily (a photo the first time a step draws it, the prompts' states at the first step)
        # where the VAE and text encoder stay put anyway; else all now, so that they can leave the
        # GPU before the first step.
        self.lazy = encode_lazily(cfg.train.offload_frozen, accelerator.device)
        if cfg.train.cache_latents and cfg.data.center_crop:
            flips = (False, True) if cfg.data.random_flip else (False,)
            self.latent_cache = LatentCache(latent_keys(self.sets, self.bucket_of, flips), self._encode_one)
            if not self.lazy:
                self.latent_cache.fill()
        if cfg.train.cache_text_embeddings and not self.text_trained:
            self._text_pending = True
            if not self.lazy:
                _ = self.text_cache
        if cfg.train.offload_frozen:
            if self.latent_cache is not None and self.latent_cache.complete:
                self.vae.to("cpu")
            if self._text_cache is not None:
                for te in self.text_encoders:
                    te.to("cpu")
            if self.acc.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def text_cache(self) -> Cond | None:
        """The frozen text encoder's conditioning of every prompt (None when it is not cached),
        computed in one batch the first time it is used: the same tensors whenever that is (no
        gradients, no autocast)."""
        if self._text_pending:
            with torch.no_grad(), torch.autocast(self.acc.device.type, enabled=False):
                self._text_cache = self.encode(torch.arange(len(self.prompt_ids[0])))
            self._text_pending = False
        return self._text_cache

    @property
    def text_encoder(self):
        """The (first) text encoder; SDXL's second is text_encoders[1]."""
        return self.text_encoders[0]

    @property
    def text_trained(self) -> bool:
        """Does anything in the text encoder learn (its LoRA, or a learned identifier)?"""
        return self.cfg.train.train_text_encoder or self.identifier is not None

    @property
    def trained_modules(self) -> list:
        """The modules whose adapters learn: the UNet, and the text encoder(s) when anything in them does."""
        return [self.unet] + (list(self.text_encoders) if self.text_trained else [])

    def prepare(self, params: list) -> Updates:
        """What updates the adapters `params`: the optimizer (optim.make_optimizer) and its learning-rate
        schedule, with the trained modules handed to the accelerator (accelerate's prepare); the
        objective holds the prepared modules from then on."""
        from diffusers.optimization import get_scheduler

        cfg, unwrap = self.cfg, self.acc.unwrap_model
        # The parameters that learn by name (unet.*, text_encoder.*, text_encoder_2.*), what a checkpoint
        # holds: the same parameters before and after prepare.
        named = {f"unet.{n}": p for n, p in unwrap(self.unet).named_parameters() if p.requires_grad}
        if self.text_trained:
            for prefix, te in zip(("text_encoder", "text_encoder_2"), self.text_encoders):
                named.update({f"{prefix}.{n}": p for n, p in unwrap(te).named_parameters() if p.requires_grad})
        encoders = self.text_encoders if len(self.text_encoders) > 1 else self.text_encoder
        optimizer = make_optimizer(cfg.optim, self.unet, encoders, self.identifier,
                                   train_text_encoder=cfg.train.train_text_encoder, identifier_lr=cfg.identifier.lr)
        lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                     num_training_steps=cfg.train.steps)
        *modules, optimizer = self.acc.prepare(*self.trained_modules, optimizer)
        self.unet = modules[0]
        if self.text_trained:
            self.text_encoders[:] = modules[1:]
        return Updates(params, named, optimizer, lr_scheduler)

    def pipeline(self, scheduler):
        """A pipeline of the family around the models as they are now (for validation images)."""
        unwrap = self.acc.unwrap_model
        parts = dict(vae=self.vae, text_encoder=unwrap(self.text_encoders[0]), tokenizer=self.tokenizers[0],
                     unet=unwrap(self.unet), scheduler=scheduler)
        if self.family == "sdxl":
            parts.update(text_encoder_2=unwrap(self.text_encoders[1]), tokenizer_2=self.tokenizers[1],
                         add_watermarker=False)
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return pipeline_class(self.family)(**parts)

    # ---- caches ------------------------------------------------------------------------------
    def _encode_one(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of one centre crop: one VAE pass, no gradients, no autocast (a lazy entry is
        encoded inside a step's autocast; it must equal the one encoded before the first step)."""
        kind, flip, i, bucket = key
        if bucket is None:
            px = self.sets[kind].example(i, center_crop=True, flip=flip)[None]
        else:
            resized, box = buckets.cover_and_crop_box(self.sets[kind].images[i].size, bucket, True, None)
            px = self.pixels(Row(kind, i, flip, box, bucket, resized))[None]
        dev = self.acc.device
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            dist = self.vae.encode(px.to(dev, self.vae.dtype)).latent_dist
        return dist.mean[0], dist.std[0]

    def pixels(self, row: Row) -> torch.Tensor:
        """The row's crop as a [-1, 1] tensor (resized to cover its bucket first, with buckets)."""
        images = self.sets[row.kind]
        if row.resized is None:
            return images.crop(row.index, row.box, row.flip)
        img = images.images[row.index].resize(row.resized, Image.Resampling.BICUBIC).crop(row.box)
        return to_tensor(ImageOps.mirror(img) if row.flip else img)

    # ---- one micro-batch -----------------------------------------------------------------------
    def plan(self, step: int, micro: int) -> tuple[list[Row], list[int], int, torch.Generator]:
        """Which photos, flips and crops a micro-batch uses: instance rows first, then class rows.

        The step draws one global batch of processes x accumulation x batch_size rows per kind,
        exactly as a single process with that batch size would, and this micro-batch of this
        process takes its slice. Returns (its rows, their positions in the global batch, global row
        count, generator).
        """
        cfg, B = self.cfg, self.cfg.train.batch_size
        world, rank = self.acc.num_processes, self.acc.process_index
        # One generator per step, replayed by every micro-batch and process: each draws the whole
        # step's rows (N processes x G micro-batches x batch_size) and takes its own slice, so
        # accumulation and several processes see exactly what one large batch would.
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
        per_step = B * world * cfg.train.gradient_accumulation_steps
        first = (micro * world + rank) * B
        rows, positions, n, bucket = [], [], 0, None
        for kind, seed in (("instance", cfg.train.seed), ("class", cfg.train.seed + 1)):
            images = self.sets[kind]
            if images is None:
                continue
            if self.bucket_of is not None and kind == "instance":  # one bucket per step
                chosen = buckets.indices_for_step(self.bucket_of, per_step, seed, step)
                bucket = self.bucket_of[chosen[0]]
            else:
                chosen = indices_for_step(len(images), per_step, seed, step)
            for j, i in enumerate(chosen):
                flip = cfg.data.random_flip and bool(torch.rand((), generator=gen) < 0.5)
                if bucket is None:
                    box, resized = crop_box(images.images[i].size, images.resolution, cfg.data.center_crop, gen), None
                else:
                    resized, box = buckets.cover_and_crop_box(images.images[i].size, bucket, cfg.data.center_crop, gen)
                if first <= j < first + B:
                    rows.append(Row(kind, i, flip, box, bucket, resized))
                    positions.append(n + j)
            n += per_step
        return rows, positions, n, gen

    def distribution(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) of the rows' crops: from the cache, else encoded now."""
        if self.latent_cache is not None:
            pairs = [self.latent_cache.get(r.kind, r.flip, r.index, r.bucket) for r in rows]
            return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
        pixels = torch.stack([self.pixels(r) for r in rows])
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.acc.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents(self, rows: list[Row], positions: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
        """Scaled latents of the rows: mean + std * eps, as DiagonalGaussianDistribution.sample."""
        dev = self.acc.device
        mean, std = self.distribution(rows)
        eps = torch.randn((n, *mean.shape[1:]), generator=gen, dtype=mean.dtype)[positions]
        latents = (mean.to(dev) + std.to(dev) * eps.to(dev)) * self.vae.config.scaling_factor
        return latents.to(self.latent_dtype)

    def prompt_index(self, row: Row) -> int:
        """Which prompt a row trains on: its photo's caption (or the instance prompt), or the class prompt."""
        if row.kind == "preserve":
            return self.n_instance_prompts + 1 + row.index
        if row.kind != "instance":
            return self.n_instance_prompts
        return row.index if self.n_instance_prompts > 1 else 0

    def encode(self, which: torch.Tensor) -> Cond:
        """Conditioning of prompts `which` (indices into prompt_ids: the instance prompt or each photo's
        caption, then the class prompt last), through the text encoder(s)."""
        return encode(self.family, self.text_encoders, [ids[which].to(self.acc.device) for ids in self.prompt_ids])

    def states(self, rows: list[Row]) -> Cond:
        """Text conditioning for each row's prompt (instance or class): hidden states (SDXL: and pooled)."""
        which = torch.tensor([self.prompt_index(r) for r in rows])
        if self.text_cache is not None:
            return self.text_cache[which.to(self.text_cache.device)]
        with torch.set_grad_enabled(self.text_trained and torch.is_grad_enabled()):
            return self.encode(which)

    def time_ids(self, rows: list[Row]) -> torch.Tensor | None:
        """SDXL's [original h, w, crop top, left, target h, w] per row (None for SD1/SD2): the
        photo's file size, and where this step's crop lies in the resized photo (conditioning.time_ids)."""
        if self.family != "sdxl":
            return None
        out = []
        for r in rows:
            images = self.sets[r.kind]
            width = r.resized[0] if r.resized is not None else images.images[r.index].size[0]
            out.append(time_ids(images.original_size(r.index), r.box, width, r.flip))
        return torch.tensor(out, dtype=torch.float32)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond, ids: torch.Tensor | None):
        """The UNet's prediction, with SDXL's added conditioning when the family has it."""
        return self.unet(noisy, timesteps, cond.states, added_cond_kwargs=added_cond_kwargs(cond, ids)).sample

    def loss(self, step: int, micro: int) -> MicroLoss:
        """The loss of one micro-batch, its instance and prior parts, and the rows it drew."""
        cfg, lc = self.cfg, self.cfg.loss
        with self.timer.phase("data"):
            rows, positions, n, gen = self.plan(step, micro)
        with self.timer.phase("vae"):
            latents = self.latents(rows, positions, n, gen)
        dev = self.acc.device
        noise = torch.randn((n, *latents.shape[1:]), generator=gen)[positions].to(dev, latents.dtype)
        if lc.noise_offset:
            noise = offset_noise(noise, lc.noise_offset, gen, positions, n)
        t_max = lc.timestep_max or self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(lc.timestep_min, t_max, (n,), generator=gen)[positions].to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        with self.timer.phase("text_encoder"):
            states = self.states(rows)
        ids = self.time_ids(rows)
        if self.base_model_prior:  # the prior rows: the same noisy latents, with the class prompt
            with self.timer.phase("base_model_prior"):
                prior_target = self.base_prediction(noisy, timesteps, ids)
            noisy, timesteps = torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps])
            states = states.cat(self.class_states(len(rows)))
            ids = None if ids is None else torch.cat([ids, ids])
            target = torch.cat([target, prior_target])
        if self.preserve:  # prior.preserve_prompts: one of them per step, on the instance (or class) rows' latents
            k = sum(r.kind == "instance" for r in rows)
            on = slice(k, 2 * k) if cfg.prior.preserve_on == "class_images" else slice(0, k)  # class rows follow
            keep = [Row("preserve", (step * self.cfg.train.gradient_accumulation_steps + micro) % len(self.preserve),
                        False, (0, 0, 0, 0))] * k
            with self.timer.phase("base_model_prior"):
                keep_target = self.base_prediction(noisy[on], timesteps[on], None if ids is None else ids[on],
                                                   rows=keep)
                keep_states = self.states(keep)
            noisy, timesteps = torch.cat([noisy, noisy[on]]), torch.cat([timesteps, timesteps[on]])
            states = states.cat(keep_states)
            ids = None if ids is None else torch.cat([ids, ids[on]])
            target = torch.cat([target, keep_target])
        weights = None
        if lc.min_snr_gamma:
            weights = min_snr_weights(snr(self.noise_scheduler.alphas_cumprod, timesteps), lc.min_snr_gamma,
                                      self.noise_scheduler.config.prediction_type)
        with self.timer.phase("unet_forward"):
            pred = self.predict(noisy, timesteps, states, ids)
            parts = dreambooth_loss(pred, target, len(rows) if self.base_model_prior else cfg.train.batch_size,
                                    cfg.prior.loss_weight, weights, lc.kind, lc.huber_c)
        return MicroLoss(*parts, rows)

    # ---- the prior from the frozen base model ------------------------------------------------------
    def class_states(self, n: int) -> Cond:
        """The class prompt's hidden states for n rows (through the text encoder's LoRA if trained)."""
        return self.states([Row("class", 0, False, (0, 0, 0, 0))] * n)

    @torch.no_grad()
    def base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor | None = None,
                        rows: list[Row] | None = None):
        """What the frozen base model (every adapter off) predicts for the class prompt, or for the
        prompts of `rows`: the target of the prior rows when prior.target is base_model, and of the
        prior.preserve_prompts rows (`ids`: the rows' SDXL time ids)."""
        unet = self.acc.unwrap_model(self.unet)
        tes = [self.acc.unwrap_model(te) for te in self.text_encoders] if self.cfg.train.train_text_encoder else []
        unet.disable_adapters()
        for te in tes:
            te.disable_adapters()
        try:
            states = self.states(rows) if rows else self.class_states(noisy.shape[0])
            return self.predict(noisy, timesteps, states, ids).detach()
        finally:
            unet.enable_adapters()
            for te in tes:
                te.enable_adapters()

    @torch.no_grad()
    def eval_instance_loss(self, seed: int = 1234, timesteps=EVAL_TIMESTEPS) -> float:
        """Instance loss on centre crops with fixed noise and timesteps: comparable across steps and runs.
        One UNet pass per photo (its timesteps as one batch), on the mean of its latent distribution;
        `evaluates` says whether a run computes it."""
        losses = []
        n = len(timesteps)
        for i, row in enumerate(self.eval_rows):
            rows = [row] * n
            ids = self.time_ids(rows)  # SDXL's added conditioning (None otherwise)
            mean, _ = self.distribution(rows[:1])
            latents = (mean * self.vae.config.scaling_factor).to(self.latent_dtype).repeat(n, 1, 1, 1)
            gen = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
            t = torch.tensor(timesteps, device=latents.device)
            with self.acc.autocast():
                noisy = self.noise_scheduler.add_noise(latents, noise, t)
                pred = self.predict(noisy, t, self.states(rows), ids)
            target = training_target(self.noise_scheduler, latents, noise, t)
            losses.append(F.mse_loss(pred.float(), target.float()).item())
        return sum(losses) / len(losses)
