"""Build the toy world's base model from scratch on the generator: VAE first, then text encoder
and UNet jointly. Seeded and resumable: every phase writes its state to a folder outside the
repository, and a killed build picks up from the last checkpoint when started again.

    python -m dreambooth_lab.world.build                     # ~/.cache/dreambooth_lab/world-build
    python -m dreambooth_lab.world.build --unet-minutes 80   # the phase budgets are wall time
    python -m dreambooth_lab.world.build --export dreambooth_lab/world/weights/toyworld

Phases (each skipped when its output exists):
  1. vae      AutoencoderKL on open-world scenes (any hue, the subjects' looks included) so it
              reconstructs colours the base world never shows; L1 + MSE + a tiny KL term.
  2. latents  base-world scenes + captions, encoded once (latent mean and std, fp16, in chunks).
  3. unet     UNet + text encoder on those latents: epsilon objective on SD's schedule, min-SNR
              weights, 10% empty captions (for classifier-free guidance), EMA weights; the text
              encoder has no weight decay so token rows its captions never use (sks, hta, oue)
              keep their initial values. A usable pipeline snapshot (EMA weights, diffusers
              layout) is written every --snapshot-minutes.
Step counts are fixed on first start from the measured seconds per step and the phase's minute
budget, then stored, so a resumed build follows the same schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..builtin.clip_vocab import write_clip_tokenizer
from ..cache import cache_root
from ..files import follow_umask
from .architecture import (RESOLUTION, UNET_LAYERS, UNET_WIDTHS, VAE_FACTORS, make_scheduler, make_text_encoder,
                           make_unet, make_vae, unet_shape_problem, vae_shape)
from .captions import caption
from .draw import render
from .scene import sample_base_scene, sample_open_scene

EMPTY_CAPTION_P = 0.1


def default_build_dir() -> Path:
    return cache_root() / "world-build"


def log(out: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out / "build.log", "a") as f:
        f.write(line + "\n")


# ---- state files (safetensors + JSON; no pickles) ---------------------------------------------

def save_state(path: Path, modules: dict, opt: torch.optim.Optimizer | None, meta: dict) -> None:
    """Weights, AdamW moments and a JSON of counters, written atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{name}/{k}"] = v.detach().contiguous()
    if opt is not None:
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                for k, v in opt.state.get(p, {}).items():
                    tensors[f"opt/{gi}/{pi}/{k}"] = v.detach().reshape(-1).contiguous() if v.ndim == 0 else v.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    tmpj = path.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(meta, indent=1))
    os.replace(tmpj, path.with_suffix(".json"))


def load_state(path: Path, modules: dict, opt: torch.optim.Optimizer | None) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, mod in modules.items():
        prefix = f"{name}/"
        mod.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if opt is not None:
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                st = {}
                for k in ("step", "exp_avg", "exp_avg_sq"):
                    key = f"opt/{gi}/{pi}/{k}"
                    if key in tensors:
                        st[k] = tensors[key].reshape(()) if k == "step" else tensors[key]
                if st:
                    opt.state[p] = st
    return json.loads(path.with_suffix(".json").read_text())


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine down to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def eta(seconds_per_step: float, step: int, total: int | None) -> str:
    """Time left at the measured pace, as 'H h MM min' ('?' before the total is known)."""
    if not total:
        return "?"
    left = max(0, total - step) * seconds_per_step / 60
    return f"{int(left // 60)} h {int(left % 60):02d} min"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def render_batch(scenes) -> np.ndarray:
    return np.stack([np.asarray(render(s, RESOLUTION)) for s in scenes])


# ---- phase 1: VAE -------------------------------------------------------------------------------

def build_vae(out: Path, minutes: float, seed: int, pool_size: int = 8000, batch: int = 16,
              steps: int | None = None, factor: int = 8) -> None:
    if (out / "vae" / "config.json").is_file():
        return
    pool_path = out / "vae_pool.npy"
    if not pool_path.is_file():
        rng = np.random.default_rng([seed, 1])
        log(out, f"vae: rendering {pool_size} open-world scenes")
        pool = render_batch([sample_open_scene(rng) for _ in range(pool_size)])
        np.save(out / "vae_pool.tmp.npy", pool)
        os.replace(out / "vae_pool.tmp.npy", pool_path)
    pool = np.load(pool_path)
    vae = make_vae(seed, factor)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    state = out / "vae_state.safetensors"
    meta = load_state(state, {"vae": vae}, opt) if state.is_file() else {"step": 0, "total": steps}
    step, total = meta["step"], meta["total"]
    t_last, t0 = time.time(), time.time()
    while total is None or step < total:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(pool), (batch,), generator=g).numpy()
        x = to_tensor(pool[idx])
        for group in opt.param_groups:
            group["lr"] = 2e-3 * lr_factor(step, total or 10**9, 100)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + 0.5 * (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 20:
            sps = (time.time() - t0) / 20
            total = total or max(20, int(minutes * 60 / sps))
            log(out, f"vae: {sps:.3f} s/step at batch {batch}; {total} steps for {minutes} min")
        if step % 50 == 0:
            log(out, f"vae: step {step}/{total} loss {loss.item():.4f}, ETA "
                     f"{eta((time.time() - t0) / max(1, step - meta['step']), step, total)}")
        if time.time() - t_last > 180 or (total and step >= total):
            save_state(state, {"vae": vae}, opt, {"step": step, "total": total})
            t_last = time.time()
    # scaling factor: latents of unit variance, as SD's 0.18215 does for its VAE
    with torch.no_grad():
        z = torch.cat([vae.encode(to_tensor(pool[i:i + 64])).latent_dist.mean for i in range(0, min(1024, len(pool)), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out / "vae.tmp", safe_serialization=True)
    os.replace(out / "vae.tmp", out / "vae")
    log(out, f"vae: done, scaling_factor {1.0 / z.std():.4f}")


def finetune_decoder(out: Path, minutes: float, seed: int, batch: int = 16, lr: float = 1e-3) -> None:
    """Go on training only the VAE's decoder (encoder frozen, so every latent the UNet learns from
    stays valid) — SD's own ft-MSE decoder trick — and swap it into <out>/vae when done. Runs
    beside the UNet phase as a second process; later pipeline snapshots pick it up."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae")
    pool = np.load(out / "vae_pool.npy")
    with torch.no_grad():
        post = [vae.encode(to_tensor(pool[i:i + 200])).latent_dist for i in range(0, len(pool), 200)]
    mean, std = torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0, step = time.time(), 0
    total = None
    while total is None or step < total:
        g = torch.Generator().manual_seed(seed * 7_000_003 + step)
        idx = torch.randint(0, len(pool), (batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        x = to_tensor(pool[idx.numpy()])
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, total or 10**9, 50)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + 0.5 * (rec - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 20:
            total = max(20, int(minutes * 60 / ((time.time() - t0) / 20)))
            log(out, f"decoder: {(time.time() - t0) / 20:.3f} s/step; {total} steps for {minutes} min")
        if step % 100 == 0:
            log(out, f"decoder: step {step}/{total} loss {loss.item():.4f}")
    import shutil

    vae.save_pretrained(out / "vae.ft", safe_serialization=True)
    shutil.rmtree(out / "vae.before-ft", ignore_errors=True)
    os.replace(out / "vae", out / "vae.before-ft")
    os.replace(out / "vae.ft", out / "vae")
    log(out, f"decoder: done after {step} steps; <out>/vae now holds the fine-tuned decoder")


# ---- phase 2: latents -----------------------------------------------------------------------------

def tokenizer_dir(out: Path) -> Path:
    folder = out / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        write_clip_tokenizer(folder)
    return folder


# What the latents phase draws and how it words it. The defaults are builds v1-v4's; v6 names the
# look (colour and marking) more often and shows outfits, styles and cars more often, so the base
# learns to compose a described look with an asked attribute.
SCENE_MIX_DEFAULT = {"p_look": 0.5, "p_outfit": 0.18, "p_style": 0.15, "p_driving": 0.15}


def scene_mix_problem(folder: Path, mix: dict) -> str | None:
    """Latent chunks already in `folder` were drawn with another mix: say so (they cannot be mixed).
    Chunks without a MIX.json are builds v1-v4's, drawn with the default mix."""
    path = folder / "MIX.json"
    if path.is_file():
        have, where = json.loads(path.read_text()), path
    elif any(folder.glob("chunk_*.safetensors")):
        have, where = SCENE_MIX_DEFAULT, folder
    else:
        return None
    if have != mix:
        return (f"{where}: this build's latents were drawn with {have}, not {mix}; use the same --p-look/"
                f"--p-compose/--min-contrast as before, or a new --out folder")
    return None


def build_latents(out: Path, seed: int, scenes: int, chunk: int = 4000, mix: dict | None = None) -> None:
    """Encode `scenes` base-world scenes drawn with `mix` (checked against earlier chunks by main), in
    whole chunks of `chunk` (one chunk of `scenes` when fewer are asked: a quick check of the path)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    mix = dict(SCENE_MIX_DEFAULT if mix is None else mix)
    folder = out / "latents"
    folder.mkdir(exist_ok=True)
    (folder / "MIX.json").write_text(json.dumps(mix, indent=1, sort_keys=True) + "\n")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir(out))
    chunk = min(chunk, scenes)
    for c in range(math.ceil(scenes / chunk)):
        path = folder / f"chunk_{c:03d}.safetensors"
        if path.is_file():
            continue
        rng = np.random.default_rng([seed, 2, c])
        batch = [sample_base_scene(rng, p_outfit=mix["p_outfit"], p_style=mix["p_style"], p_driving=mix["p_driving"],
                                   min_contrast=mix.get("min_contrast", 0.0)) for _ in range(chunk)]
        caps = [caption(s, rng, p_colour=mix["p_look"], p_marking=mix["p_look"]) for s in batch]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, chunk, 200):
                post = vae.encode(to_tensor(render_batch(batch[i:i + 200]))).latent_dist
                means.append(post.mean.half())
                stds.append(post.std.half())
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "input_ids": ids.int().contiguous()}, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        (folder / f"chunk_{c:03d}.json").write_text(json.dumps(caps[:50], indent=0))
        log(out, f"latents: chunk {c} ({chunk} scenes) done")


def load_latents(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    parts = [load_file(str(p)) for p in sorted((out / "latents").glob("chunk_*.safetensors"))]
    return {k: torch.cat([p[k] for p in parts]) for k in ("mean", "std", "input_ids")}


# ---- phase 3: UNet + text encoder -------------------------------------------------------------------

def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def save_pipeline(out: Path, folder: Path, unet, text_encoder) -> None:
    """A diffusers-layout pipeline folder (what from_pretrained loads), written atomically."""
    import shutil

    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        unet=unet, vae=AutoencoderKL.from_pretrained(out / "vae"), text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir(out)), scheduler=make_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def init_from(out: Path, src: Path) -> None:
    """Start a build from a finished pipeline folder (e.g. the committed weights): its VAE is
    taken as is (fp32), so only the latents and the UNet phase run; `build_unet` starts the UNet
    and text encoder from its weights."""
    vae_from(out, Path(src) / "vae")


def vae_from(out: Path, src: Path) -> None:
    """Start a build with a finished VAE (e.g. the committed 4x stage, weights/stages/vae4x): copied
    as float32 into <out>/vae, so the VAE phase is skipped and the latents are encoded with it."""
    from diffusers import AutoencoderKL

    if (out / "vae" / "config.json").is_file():
        return
    if not (Path(src) / "config.json").is_file():
        raise FileNotFoundError(f"--vae-from {src}: no config.json there; point it at a VAE folder "
                                "(e.g. dreambooth_lab/world/weights/stages/vae4x)")
    vae = AutoencoderKL.from_pretrained(src, torch_dtype=torch.float32)
    vae.save_pretrained(out / "vae.tmp", safe_serialization=True)
    os.replace(out / "vae.tmp", out / "vae")
    log(out, f"vae: taken from {src}")


def matching_state(model: torch.nn.Module, state: dict) -> tuple[dict, list[str]]:
    """The tensors of `state` whose name and shape `model` shares, and the names it had to leave out
    (a UNet read onto another latent shape keeps everything but its first and last convolution)."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    return keep, sorted(set(own) - set(keep))


def _load_init(src: Path, unet, te) -> list[str]:
    """Start the UNet and text encoder from a finished pipeline; tensors whose shape differs (another
    VAE's latent channels) keep their fresh initialisation and are returned by name."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    te.load_state_dict(CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32).state_dict())
    keep, fresh = matching_state(unet, UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32).state_dict())
    unet.load_state_dict(keep, strict=False)
    return fresh


def resumed_shape_problem(state: Path, shape: dict) -> str | None:
    """A build folder's UNet state made with another --unet-widths/--unet-layers than asked, in one line
    naming the folder; None when there is no state or it matches (states from before these options
    are the world's default shape)."""
    meta_file = state.with_suffix(".json")
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    had = {"unet_widths": meta.get("unet_widths", list(UNET_WIDTHS)), "unet_layers": meta.get("unet_layers", UNET_LAYERS)}
    if had == shape:
        return None
    return (f"{state.parent}: its UNet was built with --unet-widths {','.join(map(str, had['unet_widths']))} "
            f"--unet-layers {had['unet_layers']}; give those to go on, or use a new --out for another shape")


def build_unet(out: Path, minutes: float, seed: int, batch: int = 64, lr: float = 1e-3,
               snapshot_minutes: float = 10, ema_decay: float = 0.999, steps: int | None = None,
               init: Path | None = None, widths: tuple[int, ...] = UNET_WIDTHS, layers: int = UNET_LAYERS) -> None:
    import copy

    from transformers import CLIPTokenizer

    if (out / "final" / "model_index.json").is_file() and steps is None:
        return
    data = load_latents(out)
    n = len(data["mean"])
    from diffusers import AutoencoderKL

    vae_config = AutoencoderKL.load_config(out / "vae")
    scaling = vae_config["scaling_factor"]
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir(out))
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    channels, side = vae_shape(vae_config)
    state = out / "unet_state.safetensors"
    shape = {"unet_widths": list(widths), "unet_layers": layers}
    problem = resumed_shape_problem(state, shape)
    if problem:
        raise SystemExit(f"error: {problem}")
    unet, te = make_unet(seed, channels, side, widths, layers), make_text_encoder(seed + 1)
    if init is not None and not state.is_file():
        fresh = _load_init(Path(init), unet, te)
        log(out, f"unet: starting from the weights in {init}"
                 + (f"; kept fresh (another shape): {', '.join(fresh) if len(fresh) <= 6 else f'{len(fresh)} tensors'}"
                    if fresh else ""))
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(te)
    for m in (ema_unet, ema_te):
        m.requires_grad_(False)
    sched = make_scheduler()
    alphas = sched.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "weight_decay": 1e-2, "base_lr": lr},
        # no decay on the text encoder: rows of tokens the captions never use stay as initialised
        {"params": list(te.parameters()), "weight_decay": 0.0, "base_lr": lr * 0.5},
    ], lr=lr)
    mods = {"unet": unet, "te": te, "ema_unet": ema_unet, "ema_te": ema_te}
    meta = load_state(state, mods, opt) if state.is_file() else {"step": 0, "total": steps, "loss_ema": None}
    step, total, loss_ema = meta["step"], meta["total"], meta["loss_ema"]
    total = steps or total  # --unet-steps on a resumed build extends (or shortens) its schedule
    log(out, f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, text encoder "
             f"{sum(p.numel() for p in te.parameters()) / 1e6:.2f} M, {n} latents, resuming at step {step}")
    t_save = t_snap = t0 = time.time()
    while total is None or step < total:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch,), generator=g)
        mean, std = data["mean"][idx].float(), data["std"][idx].float()
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * scaling
        ids = data["input_ids"][idx].long()
        drop = torch.rand(batch, generator=g) < EMPTY_CAPTION_P
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, total or 10**9, 300)
        pred = unet(noisy, t, te(ids)[0]).sample
        snr = snr_all[t]
        w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, te, decay)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
        if step == meta["step"] + 20:
            sps = (time.time() - t0) / 20
            total = total or max(20, int(minutes * 60 / sps))
            log(out, f"unet: {sps:.3f} s/step at batch {batch}; {total} steps for {minutes} min")
        if step % 100 == 0:
            sps = (time.time() - t0) / max(1, step - meta["step"])
            log(out, f"unet: step {step}/{total} loss(ema) {loss_ema:.4f} {sps:.3f} s/step, "
                     f"ETA {eta(sps, step, total)}")
        done = total is not None and step >= total
        if time.time() - t_save > 180 or done:
            save_state(state, mods, opt, {"step": step, "total": total, "loss_ema": loss_ema, **shape})
            t_save = time.time()
        if time.time() - t_snap > snapshot_minutes * 60 or done:
            save_pipeline(out, out / "snapshot", ema_unet, ema_te)
            (out / "snapshot" / "build_step.json").write_text(json.dumps({"step": step, "total": total,
                                                                          "loss_ema": loss_ema}))
            log(out, f"unet: snapshot at step {step}")
            t_snap = time.time()
    save_pipeline(out, out / "final", ema_unet, ema_te)
    log(out, "unet: done")


# ---- export: the committed weights -------------------------------------------------------------------

def export(src: Path, dest: Path, fp16: bool = True) -> None:
    """Copy a pipeline folder for committing, with weights stored as fp16 (loads as fp32 too)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    if not (src / "model_index.json").is_file():  # checked before anything at dest is touched
        raise FileNotFoundError(f"{src} is not a finished pipeline folder (no model_index.json): run the build "
                                "until it writes a snapshot or final, then export again; nothing was changed")
    tmp = dest.with_name(dest.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("build_step.json"))
    for f in tmp.rglob("*.safetensors"):
        tensors = load_file(str(f))
        if fp16:
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    for f in tmp.rglob("config.json"):  # a build folder's local path is no part of the model
        cfg = json.loads(f.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (src / "build_step.json").is_file():
        (tmp / "BUILD.json").write_text((src / "build_step.json").read_text())
    follow_umask(tmp)  # safetensors writes 0600
    old = dest.with_name(dest.name + ".export-old")  # the previous export, swapped out only now
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def widths_arg(text: str) -> tuple[int, ...]:
    """--unet-widths 32,64 -> (32, 64) (argparse names the option when this raises)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give channel counts separated by commas, e.g. 32,64") from None


def arg_problem(args) -> str | None:
    """What is wrong with the build's arguments, in one line naming the option; None when they can
    run (pure but for looking at the --init / --vae-from folders)."""
    if args.threads < 1:
        return f"--threads {args.threads}: use 1 or more torch threads (1 leaves a core free)"
    for name in ("vae_steps", "unet_steps", "scenes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} {value}: use 1 or more (a build of no steps makes nothing)"
    for name in ("vae_minutes", "unet_minutes", "snapshot_minutes", "finetune_decoder", "lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"--{name.replace('_', '-')} {value}: use a positive number"
    contrast = getattr(args, "min_contrast", 0.0)
    if not (math.isfinite(contrast) and contrast >= 0):
        return f"--min-contrast {contrast}: use 0 (any colour) or a positive RGB distance such as 60"
    for name in ("p_look", "p_compose"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            return f"--{name.replace('_', '-')} {value}: use a probability from 0 to 1"
    if getattr(args, "unet_widths", None) is not None:
        problem = unet_shape_problem(args.unet_widths, args.unet_layers)
        if problem:
            return problem
    if args.init is not None and not (Path(args.init).expanduser() / "model_index.json").is_file():
        return (f"--init {args.init}: no model_index.json there; point it at a finished pipeline folder "
                "(e.g. dreambooth_lab/world/weights/toyworld)")
    if args.vae_from is not None and not (Path(args.vae_from).expanduser() / "config.json").is_file():
        return (f"--vae-from {args.vae_from}: no config.json there; point it at a VAE folder "
                "(e.g. dreambooth_lab/world/weights/stages/vae4x)")
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="build folder (default <cache>/world-build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core free)")
    ap.add_argument("--vae-minutes", type=float, default=14)  # the committed build used --vae-steps 600
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps (instead of --vae-minutes)")
    ap.add_argument("--unet-steps", type=int, default=None, help="fixed UNet steps (instead of --unet-minutes); on a finished or resumed build, "
                    "the new total (training goes on from the last state)")
    ap.add_argument("--scenes", type=int, default=20000, help="base-world scenes encoded for the UNet phase")
    ap.add_argument("--unet-minutes", type=float, default=80)
    ap.add_argument("--snapshot-minutes", type=float, default=10)
    ap.add_argument("--finetune-decoder", type=float, default=None, metavar="MINUTES",
                    help="only fine-tune the VAE decoder for MINUTES (beside a running UNet phase) and exit")
    ap.add_argument("--init", type=Path, default=None, metavar="PIPELINE",
                    help="start from a finished pipeline folder: take its VAE, start UNet and text encoder from its weights")
    ap.add_argument("--lr", type=float, default=1e-3, help="UNet learning rate (text encoder: half)")
    ap.add_argument("--vae-factor", type=int, default=8, choices=sorted(VAE_FACTORS),
                    help="the VAE's downsampling: 8 (8x8x8 latents, builds v1-v4) or 4 (16x16x4)")
    ap.add_argument("--vae-from", type=Path, default=None, metavar="VAE_FOLDER",
                    help="take this finished VAE instead of training one (e.g. dreambooth_lab/world/weights/stages/vae4x)")
    ap.add_argument("--p-look", type=float, default=SCENE_MIX_DEFAULT["p_look"],
                    help="how often a caption names the body colour, and the marking (builds v1-v4: 0.5)")
    ap.add_argument("--p-compose", type=float, default=None, metavar="P",
                    help="how often a base scene shows a t-shirt, a van Gogh style, a car (each; default 0.18/0.15/0.15)")
    ap.add_argument("--min-contrast", type=float, default=0.0, metavar="D",
                    help="keep each base scene's body colour at least D (RGB distance) from what it stands against "
                         "(scene.SURROUNDINGS; build v10: 60; builds v1-v8: 0, any colour anywhere)")
    ap.add_argument("--unet-widths", type=widths_arg, default=UNET_WIDTHS, metavar="C1,C2[,..]",
                    help="the UNet's channels per level (builds v1-v6: 32,64; ~1 M parameters)")
    ap.add_argument("--unet-layers", type=int, default=UNET_LAYERS, help="ResNet layers per UNet block (builds v1-v6: 1)")
    ap.add_argument("--stop-after", choices=("vae", "latents", "unet"), default="unet",
                    help="end the build after this phase (a staged build: measure each stage before going on)")
    ap.add_argument("--export", type=Path, default=None, help="write <out>/final (or snapshot) here as fp16 and exit")
    args = ap.parse_args(argv)
    problem = arg_problem(args)
    if problem:  # one line, before any folder is made or anything loads
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    out = (args.out or default_build_dir()).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.finetune_decoder:
        finetune_decoder(out, args.finetune_decoder, args.seed)
        return
    if args.export:
        src = out / "final" if (out / "final" / "model_index.json").is_file() else out / "snapshot"
        export(src, args.export)
        print(f"exported {src} -> {args.export}")
        return
    mix = dict(SCENE_MIX_DEFAULT, p_look=args.p_look)
    if args.p_compose is not None:
        mix.update(p_outfit=args.p_compose, p_style=args.p_compose, p_driving=args.p_compose)
    if args.min_contrast:  # absent from the mix of builds without it, so their folders still match
        mix["min_contrast"] = args.min_contrast
    problem = scene_mix_problem(out / "latents", mix)
    if problem:  # before anything loads
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.time()
    log(out, f"build start: seed {args.seed}, {args.threads} thread(s), scene mix {mix}")
    if args.vae_from:
        vae_from(out, args.vae_from)
    if args.init:
        init_from(out, args.init)
    build_vae(out, args.vae_minutes, args.seed, steps=args.vae_steps, factor=args.vae_factor)
    if args.stop_after == "vae":
        log(out, "stopped after the VAE phase (--stop-after vae)")
        return
    build_latents(out, args.seed, args.scenes, mix=mix)
    if args.stop_after == "latents":
        log(out, "stopped after the latents phase (--stop-after latents)")
        return
    build_unet(out, args.unet_minutes, args.seed, snapshot_minutes=args.snapshot_minutes,
               steps=args.unet_steps, init=args.init, lr=args.lr, widths=args.unet_widths, layers=args.unet_layers)
    log(out, f"build finished in this session after {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
