"""The tiny built-in pipelines, built from configs with fixed seeds and saved in the diffusers layout.

``tiny`` is Stable Diffusion 1.x in shape — UNet2DConditionModel with cross-attention, AutoencoderKL
with an 8x downscale, CLIPTextModel, a DDPM scheduler config and a CLIPTokenizer with the real
49,408-token CLIP BPE vocabulary — only with small widths. It is built once, saved, and then loaded
back through ``StableDiffusionPipeline.from_pretrained`` exactly like a downloaded model.
``tiny-sdxl`` (StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection, both with the
real vocabulary, a UNet with SDXL's ``text_time`` addition embeddings, an SDXL-style VAE config) and
``tiny-sd2v`` (SD2-style: an OpenCLIP-like text encoder with ``gelu``, linear attention projections,
v-prediction) are built the same way, one per model family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cache import build_once, cache_root
from . import TINY_MODEL, TINY_SD2V, TINY_SDXL, TINY_VERSIONS
from .clip_vocab import CLIP_VOCAB_SIZE, clip_text_config, write_clip_tokenizer


def _tiny_components():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,  # 64 px / 8
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(  # four blocks: the same 8x downscale as SD's VAE
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDPMScheduler(  # SD1.x's training noise schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    return unet, vae, text_encoder, scheduler


def sd1_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type="epsilon", steps_offset=1)


def _tiny_sd2v_components():
    """SD2.x in shape (OpenCLIP-style text encoder with gelu, linear projections in the
    transformers, v-prediction), at the tiny widths."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(10)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16)
    _, vae, _, _ = _tiny_components()
    torch.manual_seed(12)
    text_encoder = CLIPTextModel(clip_text_config(32, 64, 2, 4, 32, "gelu"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
                              steps_offset=1)
    return unet, vae, text_encoder, scheduler


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon", interpolation_type="linear")


def _tiny_sdxl_components() -> dict:
    """SDXL in shape: a UNet with text_time addition embeddings conditioned on both encoders'
    hidden states (32 + 32 = 64) and on the second one's pooled projection plus 6 time ids."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(20)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32)
    torch.manual_seed(21)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                        scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(22)
    text_encoder = CLIPTextModel(clip_text_config(32, 64, 2, 4, 32, "quick_gelu"))
    torch.manual_seed(23)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(32, 64, 2, 4, 32, "gelu"))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                scheduler=sdxl_scheduler())


def _save_pipeline(folder: Path, make) -> Path:
    """Build `make(tokenizer)`'s pipeline with the real CLIP tokenizer and save it in the diffusers
    layout, atomically (a folder that is already complete is reused)."""
    from transformers import CLIPTokenizer

    def build(out: Path) -> None:
        write_clip_tokenizer(out.parent / "_tok")
        pipe = make(CLIPTokenizer.from_pretrained(out.parent / "_tok"), out.parent / "_tok")
        pipe.save_pretrained(out, safe_serialization=True)
        empty = [d.name for d in out.iterdir() if d.is_dir() and not any(d.iterdir())]
        if empty:  # e.g. a non-main process of a distributed launch, where saving is skipped
            raise RuntimeError(f"building {folder} wrote no files for {empty}; build it from one process first")

    return build_once(folder, build, marker="model_index.json")


def build_tiny_pipeline(folder: Path, components=None) -> Path:
    """Build the tiny pipeline (or `components()`'s) and save it in the diffusers layout, atomically."""
    from diffusers import StableDiffusionPipeline

    def make(tokenizer, _):
        unet, vae, text_encoder, scheduler = (components or _tiny_components)()
        return StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    return _save_pipeline(folder, make)


def build_sdxl_pipeline(folder: Path, components=None) -> Path:
    """Build an SDXL-layout pipeline (tiny by default, or `components()`'s) and save it. Its second
    tokenizer pads with "!" as SDXL's does (OpenCLIP's padding)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    def make(tokenizer, tok_dir):
        parts = (components or _tiny_sdxl_components)()
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
        return StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, add_watermarker=False,
                                         force_zeros_for_empty_prompt=True, **parts)

    return _save_pipeline(folder, make)


def tiny_model_dir(name: str = TINY_MODEL) -> Path:
    """Folder of a tiny pipeline (tiny, tiny-sdxl, tiny-sd2v) in the user cache, built on first use."""
    folder = cache_root() / "models" / TINY_VERSIONS[name]
    if name == TINY_SDXL:
        return build_sdxl_pipeline(folder)
    return build_tiny_pipeline(folder, components=_tiny_sd2v_components if name == TINY_SD2V else None)

