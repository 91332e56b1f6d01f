"""The published architectures with random weights, for benchmarks: ``sd15-random`` (SD1.5's 860M
UNet, 84M VAE and CLIP ViT-L/14 text encoder) and ``sdxl-random`` (SDXL base 1.0's), built on first
use, and their configs alone (no weights) for parameter counts and meta-device models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..cache import build_once, cache_root
from . import SD15_SHAPED, SDXL_SHAPED
from .clip_vocab import clip_text_config
from .tiny import build_sdxl_pipeline, build_tiny_pipeline, sd1_scheduler, sdxl_scheduler


def sd15_unet_kwargs() -> dict:
    return dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                attention_head_dim=8)


def sd15_vae_kwargs() -> dict:
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)


def sd15_components():
    """Stable Diffusion 1.5's published configs (860M UNet, 84M VAE, 123M CLIP ViT-L/14 text)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    scheduler = sd1_scheduler()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_kwargs())
    vae = AutoencoderKL(**sd15_vae_kwargs())
    text_encoder = CLIPTextModel(clip_text_config(768, 3072, 12, 12, 768, "quick_gelu"))
    return unet, vae, text_encoder, scheduler


def sdxl_unet_kwargs() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet config (2.6B parameters)."""
    return dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def sdxl_vae_kwargs() -> dict:
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)


def sdxl_text_configs():
    """CLIP ViT-L/14 (penultimate layer used) and OpenCLIP ViT-bigG/14 with its 1280 projection."""
    return (clip_text_config(768, 3072, 12, 12, 768, "quick_gelu"),
            clip_text_config(1280, 5120, 32, 20, 1280, "gelu"))


def sdxl_components() -> dict:
    """SDXL base 1.0's published architecture with random weights (kept in fp16 on disk, ~7 GB)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1, te2 = sdxl_text_configs()
    out = {}
    torch.manual_seed(0)
    out["unet"] = UNet2DConditionModel(**sdxl_unet_kwargs()).half()
    out["vae"] = AutoencoderKL(**sdxl_vae_kwargs()).half()
    out["text_encoder"] = CLIPTextModel(te1).half()
    out["text_encoder_2"] = CLIPTextModelWithProjection(te2).half()
    out["scheduler"] = sdxl_scheduler()
    return out


def sd15_shaped_dir() -> Path:
    """SD1.5-shaped pipeline with random weights (for benchmarks), built on first use (~4 GB)."""
    return build_tiny_pipeline(cache_root() / "models" / "sd15-shaped-random-v1", components=sd15_components)


def sdxl_shaped_dir() -> Path:
    """SDXL-base-shaped pipeline with random weights (for benchmarks), built on first use (~7 GB
    in fp16, about 14 GB of memory while building). For parameter counts and meta-device models
    `configs_dir(SDXL_SHAPED)` is enough."""
    return build_sdxl_pipeline(cache_root() / "models" / "sdxl-shaped-random-v1", components=sdxl_components)


def configs_dir(name: str) -> Path:
    """A folder with the configs of a random benchmark shape (sd15-random, sdxl-random) and no
    weights: model_index.json and each component's config, readable by load_config /
    from_pretrained(config only), written without building the weights."""
    if name not in (SD15_SHAPED, SDXL_SHAPED):
        raise ValueError(f"{name!r} is not a random benchmark shape ({SD15_SHAPED}, {SDXL_SHAPED})")

    def build(out: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        xl = name == SDXL_SHAPED
        out.mkdir(parents=True)
        if xl:
            unet_kw, vae_kw = sdxl_unet_kwargs(), sdxl_vae_kwargs()
            te1, te2 = sdxl_text_configs()
            encoders = {"text_encoder": ("CLIPTextModel", te1), "text_encoder_2": ("CLIPTextModelWithProjection", te2)}
            scheduler = sdxl_scheduler()
        else:
            unet_kw, vae_kw = sd15_unet_kwargs(), sd15_vae_kwargs()
            encoders = {"text_encoder": ("CLIPTextModel", clip_text_config(768, 3072, 12, 12, 768, "quick_gelu"))}
            scheduler = sd1_scheduler()
        with torch.device("meta"):
            UNet2DConditionModel(**unet_kw).save_config(out / "unet")
            AutoencoderKL(**vae_kw).save_config(out / "vae")
        scheduler.save_config(out / "scheduler")
        index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", type(scheduler).__name__]}
        for sub, (cls, conf) in encoders.items():
            conf.save_pretrained(out / sub)
            index[sub] = ["transformers", cls]
            index["tokenizer" + sub.removeprefix("text_encoder")] = ["transformers", "CLIPTokenizer"]
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    return build_once(cache_root() / "models" / f"{name}-configs-v1", build, marker="model_index.json")

