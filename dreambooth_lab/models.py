"""Load the base pipeline: a hub id or local folder through from_pretrained, or the tiny one.

The tiny pipeline is Stable Diffusion 1.x in shape — UNet2DConditionModel with cross-attention,
AutoencoderKL with an 8x downscale, CLIPTextModel, a DDPM scheduler config and a CLIPTokenizer
with the real 49,408-token CLIP BPE vocabulary — only with small widths. It is built once from
configs with fixed seeds, saved in the diffusers folder layout, and then loaded back through
``StableDiffusionPipeline.from_pretrained`` exactly like a downloaded model.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .config import TINY_MODEL, TOYWORLD, ModelConfig

# Bump when the tiny architecture or its weights change: the cache folder and class-image cache
# keys include it, so stale copies are never reused.
TINY_VERSION = "tiny-sd1-v1"
CLIP_VOCAB_SIZE = 49408


def cache_root() -> Path:
    """User cache folder (``DREAMBOOTH_LAB_CACHE`` or ``~/.cache/dreambooth_lab``)."""
    env = os.environ.get("DREAMBOOTH_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreambooth_lab"


def model_key(name: str) -> str:
    """What identifies a base model in cache keys and sidecars."""
    if name == TINY_MODEL:
        return TINY_VERSION
    if name == TOYWORLD:
        from .world.paths import toyworld_key

        return toyworld_key()
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


# ---- the real CLIP BPE vocabulary -----------------------------------------------------------

def find_clip_bpe_file() -> Path:
    """The CLIP BPE merges file shipped in the open-clip-torch wheel (not imported, only read)."""
    try:
        dist = importlib.metadata.distribution("open-clip-torch")
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "The tiny model needs CLIP's BPE vocabulary, shipped by open-clip-torch. Install it "
            "without its dependencies: pip install --no-deps open-clip-torch"
        ) from exc
    for f in dist.files or []:
        if f.name == "bpe_simple_vocab_16e6.txt.gz":
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError("open-clip-torch is installed but bpe_simple_vocab_16e6.txt.gz is missing; reinstall it")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's vocab.json and merges.txt from the BPE file, as CLIP's own tokenizer does.

    Vocabulary = 256 byte characters, the same with the end-of-word marker, one entry per merge
    (the first 49152 - 256 - 2 merges), then the two special tokens: 49,408 entries.
    """
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(find_clip_bpe_file())
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)


# ---- the tiny SD-shaped pipeline ------------------------------------------------------------

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


def _sd15_components():
    """Stable Diffusion 1.5's published configs (860M UNet, 84M VAE, 123M CLIP ViT-L/14 text)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _, _, _, scheduler = _tiny_components()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return unet, vae, text_encoder, scheduler


def build_tiny_pipeline(folder: Path, components=None) -> Path:
    """Build the tiny pipeline (or `components()`'s) and save it in the diffusers layout, atomically."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    def build(out: Path) -> None:
        write_clip_tokenizer(out.parent / "_tok")
        tokenizer = CLIPTokenizer.from_pretrained(out.parent / "_tok")
        unet, vae, text_encoder, scheduler = (components or _tiny_components)()
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        empty = [d.name for d in out.iterdir() if d.is_dir() and not any(d.iterdir())]
        if empty:  # e.g. a non-main process of a distributed launch, where saving is skipped
            raise RuntimeError(f"building {folder} wrote no files for {empty}; build it from one process first")

    return _build_once(folder, build, marker="model_index.json")


def tiny_model_dir() -> Path:
    """Folder of the tiny pipeline in the user cache, built on first use."""
    return build_tiny_pipeline(cache_root() / "models" / TINY_VERSION)


# ---- loading ----------------------------------------------------------------------------------

def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


SD15_SHAPED = "sd15-random"  # SD1.5's architecture with random weights: same FLOPs and memory


def sd15_shaped_dir() -> Path:
    """SD1.5-shaped pipeline with random weights (for benchmarks), built on first use (~4 GB)."""
    return build_tiny_pipeline(cache_root() / "models" / "sd15-shaped-random-v1", components=_sd15_components)


def pretrained_path(name: str) -> str:
    """What from_pretrained receives: the tiny folder, or the user's string unchanged."""
    if name == TINY_MODEL:
        return str(tiny_model_dir())
    if name == SD15_SHAPED:
        return str(sd15_shaped_dir())
    if name == TOYWORLD:  # the toy world's learned base model, shipped in the package (world/weights)
        from .world.paths import toyworld_dir

        return str(toyworld_dir())
    local = Path(name).expanduser()
    if (name.startswith((".", "/", "~")) or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model.name={name!r} looks like a local folder but {local / 'model_index.json'} does not exist: "
            "point it at a diffusers pipeline folder (saved with save_pretrained) or use a hub id"
        )
    return str(local) if local.exists() else name


def load_pipeline(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load a StableDiffusionPipeline with from_pretrained: hub id, local folder or 'tiny'."""
    from diffusers import StableDiffusionPipeline

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, use_safetensors=True)  # never unpickle downloaded weights
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    if not cfg.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(pretrained_path(cfg.name), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """Only the model's tokenizer (cheap: for token checks before loading anything big)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(pretrained_path(name), subfolder="tokenizer")


def load_text_encoder(name: str):
    """Only the model's text encoder (for embedding-space questions such as token neighbours)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(pretrained_path(name), subfolder="text_encoder", use_safetensors=True)


# ---- tiny metric models (DINO ViT and CLIP), for offline evaluation tests ----------------------

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
        CLIPTokenizer.from_pretrained(tiny_model_dir(), subfolder="tokenizer").save_pretrained(tmp)
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp)

    return _build_once(folder, build)


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

    return _build_once(folder, build)


def _build_once(folder: Path, build, marker: str = "config.json") -> Path:
    """Run build(tmp) in a temporary folder beside `folder`, then rename it into place; a folder
    that already holds `marker` is reused (another process may have finished first)."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        build(tmp / "out")
        try:
            os.replace(tmp / "out", folder)
        except OSError:
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def metric_model_path(name: str, kind: str) -> str:
    """'tiny' -> the offline test model of that kind (clip or dino); anything else unchanged."""
    if name != TINY_MODEL:
        return name
    if kind == "clip":
        return str(build_tiny_clip(cache_root() / "models" / TINY_CLIP_VERSION))
    return str(build_tiny_dino(cache_root() / "models" / TINY_DINO_VERSION))
