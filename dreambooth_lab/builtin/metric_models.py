"""Tiny metric models (a DINO ViT and a CLIP), built offline for evaluation tests: eval.dino_model /
eval.clip_model set to "tiny" load these instead of downloaded ones."""

from __future__ import annotations

from pathlib import Path

import torch

from ..cache import build_once, cache_root
from . import TINY_MODEL
from .clip_vocab import CLIP_VOCAB_SIZE
from .tiny import tiny_model_dir

TINY_CLIP_VERSION = "tiny-clip-v1"
TINY_DINO_VERSION = "tiny-dino-v1"


def build_tiny_clip(folder: Path) -> Path:
    """A small CLIPModel (text + vision towers) with the real CLIP tokenizer, saved for from_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    def build(tmp: Path) -> None:
        torch.manual_seed(3)
        config = CLIPConfig(
            text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                             eos_token_id=49407, pad_token_id=49407),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4),
            projection_dim=32,
        )
        CLIPModel(config).save_pretrained(tmp, safe_serialization=True)
        CLIPTokenizer.from_pretrained(tiny_model_dir(TINY_MODEL), subfolder="tokenizer").save_pretrained(tmp)
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp)

    return build_once(folder, build)


def build_tiny_dino(folder: Path) -> Path:
    """A small ViTModel (no pooler: DINO's CLS token is the embedding) with an ImageNet processor."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    def build(tmp: Path) -> None:
        torch.manual_seed(4)
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
        ViTModel(config, add_pooling_layer=False).save_pretrained(tmp, safe_serialization=True)
        ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp)

    return build_once(folder, build)


def metric_model_path(name: str, kind: str) -> str:
    """'tiny' -> the offline test model of that kind (clip or dino); anything else unchanged."""
    if name != TINY_MODEL:
        return name
    if kind == "clip":
        return str(build_tiny_clip(cache_root() / "models" / TINY_CLIP_VERSION))
    return str(build_tiny_dino(cache_root() / "models" / TINY_DINO_VERSION))
