"""Image similarity: a pixel-space measure and the DreamBooth paper's DINO / CLIP-I / CLIP-T.

- DINO: mean cosine between ViT-S/16 DINO CLS embeddings of generated and real images.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine between each image's CLIP embedding and its prompt's text embedding.
The pure helpers take unit-length embedding rows; `Embedder` loads the models (from_pretrained:
a hub id, a local folder, or 'tiny' for the offline test models) once and embeds in batches.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image


# ---- pixel similarity (no model) -----------------------------------------------------------------

def pixel_features(images: Sequence[Image.Image], size: int = 32) -> np.ndarray:
    """One unit-length row per image: 32x32 RGB, mean-centred (pure)."""
    rows = []
    for im in images:
        a = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
        a = a - a.mean()
        norm = np.linalg.norm(a)
        rows.append(a / norm if norm > 0 else a)
    return np.stack(rows)


def nearest(generated: Sequence[Image.Image], training: Sequence[Image.Image]) -> list[tuple[int, float]]:
    """For each generated image: (index of the most similar training image, pixel cosine)."""
    return nearest_rows(torch.from_numpy(pixel_features(generated)), torch.from_numpy(pixel_features(training)))


# ---- pure helpers on unit-length embeddings ------------------------------------------------------

def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every (row of a, row of b) pair."""
    return float((a @ b.T).mean())


def mean_pairwise_distance(a: torch.Tensor) -> float:
    """Diversity: mean (1 - cosine) over distinct pairs of rows (0 when fewer than 2 rows)."""
    n = a.shape[0]
    if n < 2:
        return 0.0
    sims = a @ a.T
    off = sims[~torch.eye(n, dtype=torch.bool)]
    return float((1 - off).mean())


def nearest_rows(a: torch.Tensor, b: torch.Tensor) -> list[tuple[int, float]]:
    """For each row of a: (index of the most similar row of b, that cosine)."""
    values, index = (a @ b.T).max(dim=1)
    return [(int(i), float(v)) for i, v in zip(index, values)]


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine of row i of a with row i of b."""
    return (a * b).sum(dim=1).tolist()


def strip_token(prompt: str, token: str) -> str:
    """'a sks dog in the jungle' -> 'a dog in the jungle' (CLIP has never seen the identifier)."""
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", "", prompt)).strip()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


# ---- the models ------------------------------------------------------------------------------------

class Embedder:
    """DINO and CLIP models, loaded lazily once, on the GPU when there is one."""

    def __init__(self, dino_model: str = "facebook/dino-vits16", clip_model: str = "openai/clip-vit-base-patch32",
                 device: str | torch.device | None = None, batch_size: int = 16):
        from .models import default_device

        self.dino_name, self.clip_name = dino_model, clip_model
        self.device = torch.device(device) if device else default_device()
        self.batch_size = batch_size
        self._dino = self._clip = None

    def load(self) -> "Embedder":
        """Load both models now, before any image is generated: a model that cannot be loaded
        (offline, a typo, a folder without weights) is a one-line ConfigError naming the field."""
        from pathlib import Path

        from .config import ConfigError

        for field, name, loader in (("eval.dino_model", self.dino_name, self._load_dino),
                                    ("eval.clip_model", self.clip_name, self._load_clip)):
            try:
                loader()
            except (OSError, ValueError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
                    reason = "no such folder"  # transformers would call a missing path a bad repo id
                raise ConfigError(f"{field}={name!r} could not be loaded ({reason}): download it once while "
                                  f"online, point it at a local folder, or use {field}=tiny offline") from exc
        return self

    def _load_dino(self):
        if self._dino is None:
            from transformers import AutoImageProcessor, ViTModel

            from .builtin.metric_models import metric_model_path

            path = metric_model_path(self.dino_name, "dino")
            model = ViTModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True).to(self.device).eval()
            self._dino = (model, AutoImageProcessor.from_pretrained(path))
        return self._dino

    def _load_clip(self):
        if self._clip is None:
            from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

            from .builtin.metric_models import metric_model_path

            path = metric_model_path(self.clip_name, "clip")
            model = CLIPModel.from_pretrained(path, use_safetensors=True).to(self.device).eval()
            self._clip = (model, AutoImageProcessor.from_pretrained(path), CLIPTokenizer.from_pretrained(path))
        return self._clip

    def _batches(self, items):
        for i in range(0, len(items), self.batch_size):
            yield items[i:i + self.batch_size]

    @torch.no_grad()
    def dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        model, processor = self._load_dino()
        out = []
        for chunk in self._batches([im.convert("RGB") for im in images]):
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device, model.dtype)
            out.append(model(pixel_values=pixels).last_hidden_state[:, 0])  # the CLS token
        return _unit(torch.cat(out)).cpu()

    @torch.no_grad()
    def clip_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        model, processor, _ = self._load_clip()
        out = []
        for chunk in self._batches([im.convert("RGB") for im in images]):
            pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device, model.dtype)
            out.append(_features(model.get_image_features(pixel_values=pixels)))
        return _unit(torch.cat(out)).cpu()

    @torch.no_grad()
    def clip_text(self, prompts: Sequence[str]) -> torch.Tensor:
        model, _, tokenizer = self._load_clip()
        out = []
        for chunk in self._batches(list(prompts)):
            ids = tokenizer(chunk, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
            out.append(_features(model.get_text_features(**ids)))
        return _unit(torch.cat(out)).cpu()


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor, or (in newer transformers) an output holding the projection."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def random_metric_models(settings: dict) -> list[str]:
    """'eval.dino_model=tiny'-style names of the metric models in an evaluation's settings that have
    random weights (the offline test models): scores made with them measure nothing (pure)."""
    from .config import TINY_MODEL

    return [f"eval.{key}={settings[key]}" for key in ("dino_model", "clip_model") if settings.get(key) == TINY_MODEL]
