"""The toy world's base model: Stable Diffusion 1.x in shape, sized for a CPU.

64 px RGB through an 8x AutoencoderKL (latents 8x8x8; SD has 4 channels), a 2-layer
CLIPTextModel (hidden 64) over the real 49,408-token CLIP vocabulary, a ~1 M-parameter
UNet2DConditionModel with cross-attention in both levels, and SD's DDPM training schedule.
"""

from __future__ import annotations

import torch

RESOLUTION = 64
# 8 latent channels (SD1.x has 4): an 8x VAE this small, trained for minutes, cannot keep the
# subjects' colours and dots in 4 channels at 8x8 (measured: they came back as brown blobs).
LATENT_CHANNELS = 8
CLIP_VOCAB_SIZE = 49408


def make_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 64), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def make_text_encoder(seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def make_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                         steps_offset=1)
