"""Generation: samplers, seeds, LoRA scales per component, and images saved with sidecars.

Every image gets its own ``torch.Generator`` seeded with its seed (on the CPU, so a seed means
the same starting noise on any device), which makes an image independent of which batch it
was generated in. Every PNG is written beside a JSON sidecar holding everything that decides it
(an ``ImageSpec``; ``read_sidecar`` reads it back). A finished run's LoRA is loaded into a
pipeline, and a picture made again from its sidecar, by ``inference``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import files
from .config import TINY_MODEL

ADAPTER = "dreambooth"


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name, built from the pipeline's scheduler config."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler)

    table = {
        "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "ddim": (DDIMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
        "ddpm": (DDPMScheduler, {}),
    }
    if name not in table:
        raise ValueError(f"sampler {name!r} is unknown: use one of {', '.join(table)}")
    cls, extra = table[name]
    return cls.from_config(config, **extra)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image; seeds up to 2**63 - 1."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@dataclass
class ImageSpec:
    """Everything that decides one picture; written as its sidecar."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    guidance: float = 6.4
    steps: int = 30
    sampler: str = "dpmsolver++"
    width: int = 512
    height: int = 512
    lora_scale_unet: float = 0.0
    lora_scale_text_encoder: float = 0.0
    model: str = TINY_MODEL
    lora: str | None = None  # path of the LoRA file, None for the base model
    run: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # SDXL's second text encoder; None = lora_scale_text_encoder (both encoders at one scale)
    lora_scale_text_encoder_2: float | None = None


def run_spec(cfg, settings, lora: str | Path, run_dir: str | Path, prompt: str, seed: int,
             **extra: Any) -> ImageSpec:
    """The one place a run's picture is described: `settings` (a SampleConfig: the run's own or a
    preset's) drawn at the run's resolution with its model and `lora`, for one prompt and seed (pure)."""
    s = settings
    return ImageSpec(prompt=prompt, seed=int(seed), negative_prompt=s.negative_prompt, guidance=s.guidance,
                     steps=s.steps, sampler=s.sampler, width=cfg.resolution, height=cfg.resolution,
                     lora_scale_unet=s.lora_scale_unet, lora_scale_text_encoder=s.lora_scale_text_encoder,
                     lora_scale_text_encoder_2=s.lora_scale_text_encoder_2, model=cfg.model.name,
                     lora=str(Path(lora).resolve()), run=str(Path(run_dir).resolve()), **extra)


# ---- generation ------------------------------------------------------------------------------

def apply_vae_options(pipe, slicing: bool, tiling: bool) -> None:
    """VAE slicing (decode one image of a batch at a time) and tiling (decode in tiles)."""
    (pipe.vae.enable_slicing if slicing else pipe.vae.disable_slicing)()
    (pipe.vae.enable_tiling if tiling else pipe.vae.disable_tiling)()


def set_lora_scales(pipe, unet: float, text_encoder: float, text_encoder_2: float | None = None) -> None:
    """Scale the UNet and text-encoder LoRA separately (0 = base model, 1 = as trained);
    text_encoder_2 is SDXL's second text encoder (None = the text_encoder scale)."""
    loaded = pipe.get_list_adapters()
    if ADAPTER not in (loaded.get("unet") or []):
        raise RuntimeError("no LoRA is loaded: call load_lora(pipe, run_dir) first")
    scales = {"unet": unet, "text_encoder": text_encoder,
              "text_encoder_2": text_encoder if text_encoder_2 is None else text_encoder_2}
    weights = {k: float(v) for k, v in scales.items() if ADAPTER in (loaded.get(k) or [])}
    pipe.set_adapters([ADAPTER], adapter_weights=[weights])


def generate(pipe, specs: Sequence[ImageSpec], batch_size: int = 4, progress: bool = True) -> list:
    """Generate one PIL image per spec, batching specs that share every setting but the seed."""
    out: list = [None] * len(specs)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        key = (s.negative_prompt, s.guidance, s.steps, s.sampler, s.width, s.height,
               s.lora_scale_unet, s.lora_scale_text_encoder, s.lora_scale_text_encoder_2)
        groups.setdefault(key, []).append(i)
    with tqdm(total=len(specs), desc="generating", unit="img", disable=not progress) as bar:
        for idx in groups.values():
            s = specs[idx[0]]  # the group's settings
            pipe.scheduler = make_scheduler(s.sampler, pipe.scheduler.config)
            if ADAPTER in (pipe.get_list_adapters().get("unet") or []):  # a base pipeline has no scales
                set_lora_scales(pipe, s.lora_scale_unet, s.lora_scale_text_encoder, s.lora_scale_text_encoder_2)
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                result = pipe(prompt=[specs[i].prompt for i in chunk],
                              negative_prompt=[s.negative_prompt] * len(chunk) if s.negative_prompt else None,
                              generator=generators([specs[i].seed for i in chunk]), num_inference_steps=s.steps,
                              guidance_scale=s.guidance, width=s.width, height=s.height)
                for i, image in zip(chunk, result.images):
                    out[i] = image
                bar.update(len(chunk))
    return out


def save_with_sidecars(images: Sequence, specs: Sequence[ImageSpec], folder: str | Path, stem: str) -> list[Path]:
    """Write <stem>-<k>-seed<seed>.png and a .json sidecar beside each; returns the PNG paths."""
    folder = Path(folder)
    paths = []
    for k, (image, spec) in enumerate(zip(images, specs)):
        png = folder / f"{stem}-{k:02d}-seed{spec.seed}.png"
        if png.exists():
            raise FileExistsError(f"{png} exists already: images are never overwritten")
        files.save_image(png, image)
        files.write_json(png.with_suffix(".json"), asdict(spec))
        paths.append(png)
    return paths


def read_sidecar(path: str | Path) -> ImageSpec:
    """The spec written beside an image (path: the PNG or its .json sidecar)."""
    return ImageSpec(**json.loads(Path(path).with_suffix(".json").read_text()))
