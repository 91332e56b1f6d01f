"""Load the base pipeline: a hub id or local folder through from_pretrained, or a tiny one.

The tiny pipeline is Stable Diffusion 1.x in shape — UNet2DConditionModel with cross-attention,
AutoencoderKL with an 8x downscale, CLIPTextModel, a DDPM scheduler config and a CLIPTokenizer
with the real 49,408-token CLIP BPE vocabulary — only with small widths. It is built once from
configs with fixed seeds, saved in the diffusers folder layout, and then loaded back through
``StableDiffusionPipeline.from_pretrained`` exactly like a downloaded model.

Two more are built the same way, one per model family: ``tiny-sdxl`` (StableDiffusionXLPipeline:
CLIPTextModel + CLIPTextModelWithProjection, both with the real vocabulary, a UNet with SDXL's
``text_time`` addition embeddings, an SDXL-style VAE config) and ``tiny-sd2v`` (SD2-style: an
OpenCLIP-like text encoder with ``gelu``, linear attention projections, v-prediction). The family
(sd1 / sd2 / sdxl) of any model folder is read from its configs: `detect_family`.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import (SDXL_SHAPED, TINY_MODEL, TINY_SD2V, TINY_SDXL, TOYWORLD, Config, ConfigError, ModelConfig,
                     default_resolution)

# Bump when the tiny architecture or its weights change: the cache folder and class-image cache
# keys include it, so stale copies are never reused.
TINY_VERSION = "tiny-sd1-v1"
TINY_VERSIONS = {TINY_MODEL: TINY_VERSION, TINY_SDXL: "tiny-sdxl-v1", TINY_SD2V: "tiny-sd2v-v1"}
CLIP_VOCAB_SIZE = 49408
FAMILIES = ("sd1", "sd2", "sdxl")


def cache_root() -> Path:
    """User cache folder (``DREAMBOOTH_LAB_CACHE`` or ``~/.cache/dreambooth_lab``)."""
    env = os.environ.get("DREAMBOOTH_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreambooth_lab"


def model_key(name: str) -> str:
    """What identifies a base model in cache keys and sidecars."""
    if name in TINY_VERSIONS:
        return TINY_VERSIONS[name]
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


def _sd15_unet_kwargs() -> dict:
    return dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                attention_head_dim=8)


def _sd15_vae_kwargs() -> dict:
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)


def _sd15_components():
    """Stable Diffusion 1.5's published configs (860M UNet, 84M VAE, 123M CLIP ViT-L/14 text)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, _, _, scheduler = _tiny_components()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_sd15_unet_kwargs())
    vae = AutoencoderKL(**_sd15_vae_kwargs())
    text_encoder = CLIPTextModel(_clip_text_config(768, 3072, 12, 12, 768, "quick_gelu"))
    return unet, vae, text_encoder, scheduler


def _sd1_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type="epsilon", steps_offset=1)


def _clip_text_config(hidden: int, intermediate: int, layers: int, heads: int, projection: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          projection_dim=projection, hidden_act=act, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


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
    text_encoder = CLIPTextModel(_clip_text_config(32, 64, 2, 4, 32, "gelu"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
                              steps_offset=1)
    return unet, vae, text_encoder, scheduler


def _sdxl_scheduler():
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
    text_encoder = CLIPTextModel(_clip_text_config(32, 64, 2, 4, 32, "quick_gelu"))
    torch.manual_seed(23)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, 64, 2, 4, 32, "gelu"))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                scheduler=_sdxl_scheduler())


def _sdxl_unet_kwargs() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet config (2.6B parameters)."""
    return dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def _sdxl_vae_kwargs() -> dict:
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)


def _sdxl_text_configs():
    """CLIP ViT-L/14 (penultimate layer used) and OpenCLIP ViT-bigG/14 with its 1280 projection."""
    return (_clip_text_config(768, 3072, 12, 12, 768, "quick_gelu"),
            _clip_text_config(1280, 5120, 32, 20, 1280, "gelu"))


def _sdxl_components() -> dict:
    """SDXL base 1.0's published architecture with random weights (kept in fp16 on disk, ~7 GB)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1, te2 = _sdxl_text_configs()
    out = {}
    torch.manual_seed(0)
    out["unet"] = UNet2DConditionModel(**_sdxl_unet_kwargs()).half()
    out["vae"] = AutoencoderKL(**_sdxl_vae_kwargs()).half()
    out["text_encoder"] = CLIPTextModel(te1).half()
    out["text_encoder_2"] = CLIPTextModelWithProjection(te2).half()
    out["scheduler"] = _sdxl_scheduler()
    return out


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

    return _build_once(folder, build, marker="model_index.json")


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


def sdxl_shaped_dir() -> Path:
    """SDXL-base-shaped pipeline with random weights (for benchmarks), built on first use (~7 GB
    in fp16, about 14 GB of memory while building). For parameter counts and meta-device models
    `configs_dir(SDXL_SHAPED)` is enough."""
    return build_sdxl_pipeline(cache_root() / "models" / "sdxl-shaped-random-v1", components=_sdxl_components)


def configs_dir(name: str) -> Path:
    """A folder with the configs of a pipeline and no weights: model_index.json and each
    component's config, readable by load_config / from_pretrained(config only). For the random
    benchmark shapes (sd15-random, sdxl-random) it is written without building the weights; any
    other name returns its pretrained_path."""
    if name not in (SD15_SHAPED, SDXL_SHAPED):
        return Path(pretrained_path(name))

    def build(out: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        xl = name == SDXL_SHAPED
        out.mkdir(parents=True)
        if xl:
            unet_kw, vae_kw = _sdxl_unet_kwargs(), _sdxl_vae_kwargs()
            te1, te2 = _sdxl_text_configs()
            encoders = {"text_encoder": ("CLIPTextModel", te1), "text_encoder_2": ("CLIPTextModelWithProjection", te2)}
            scheduler = _sdxl_scheduler()
        else:
            unet_kw, vae_kw = _sd15_unet_kwargs(), _sd15_vae_kwargs()
            encoders = {"text_encoder": ("CLIPTextModel", _clip_text_config(768, 3072, 12, 12, 768, "quick_gelu"))}
            scheduler = _sd1_scheduler()
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

    return _build_once(cache_root() / "models" / f"{name}-configs-v1", build, marker="model_index.json")


def pretrained_path(name: str) -> str:
    """What from_pretrained receives: a tiny model's folder, or the user's string unchanged."""
    if name in TINY_VERSIONS:
        return str(tiny_model_dir(name))
    if name == SD15_SHAPED:
        return str(sd15_shaped_dir())
    if name == SDXL_SHAPED:
        return str(sdxl_shaped_dir())
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


# ---- model families ------------------------------------------------------------------------------

def _read_config(source: str, file: str, revision: str | None = None) -> dict | None:
    """A JSON config of a pipeline folder or hub repo (model_index.json, unet/config.json, ...);
    None when it has none."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / file
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): the model folder is damaged") from None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, file, revision=revision)).read_text())
    except EntryNotFoundError:
        return None


def family_from_configs(index: dict | None, scheduler: dict | None, text_encoder: dict | None) -> str:
    """sdxl / sd2 / sd1 from a pipeline's model_index.json, scheduler and text-encoder configs (pure).

    An XL pipeline class or a second text encoder is SDXL; v-prediction or an OpenCLIP-style
    first text encoder (gelu, or SD2's 1024 width) is SD2; anything else SD1.
    """
    index = index or {}
    te2 = index.get("text_encoder_2")
    if "XL" in str(index.get("_class_name", "")) or (te2 is not None and te2 != [None, None]):
        return "sdxl"
    if (scheduler or {}).get("prediction_type") == "v_prediction":
        return "sd2"
    te = text_encoder or {}
    if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024:
        return "sd2"
    return "sd1"


_FAMILY_CACHE: dict[tuple, str] = {}


def detect_family(source, revision: str | None = None) -> str:
    """The model family of a pipeline, a pipeline folder, a hub id or a model name: "sd1" | "sd2" | "sdxl"."""
    if not isinstance(source, (str, os.PathLike)):  # a loaded pipeline
        pipe = source
        index = {"_class_name": type(pipe).__name__,
                 "text_encoder_2": [None, None] if getattr(pipe, "text_encoder_2", None) is None else ["x", "x"]}
        te = getattr(pipe, "text_encoder", None)
        return family_from_configs(index, dict(pipe.scheduler.config),
                                   te.config.to_dict() if te is not None else None)
    name = str(source)
    if name == SDXL_SHAPED or name == SD15_SHAPED:  # known without building ~7 GB of weights
        return "sdxl" if name == SDXL_SHAPED else "sd1"
    path = pretrained_path(name)
    key = (path, revision)
    if key not in _FAMILY_CACHE:
        index = _read_config(path, "model_index.json", revision)
        if index is None:
            raise FileNotFoundError(f"{name}: no model_index.json, so the model family cannot be told: point "
                                    "model.name at a diffusers pipeline folder or hub id")
        sched_dir = "scheduler/scheduler_config.json"
        _FAMILY_CACHE[key] = family_from_configs(index, _read_config(path, sched_dir, revision),
                                                 _read_config(path, "text_encoder/config.json", revision))
    return _FAMILY_CACHE[key]


@dataclass(frozen=True)
class BaseModel:
    """The base model, resolved once: what every later step asks instead of looking again."""

    name: str  # as configured: hub id, local folder or built-in name
    revision: str | None
    family: str  # "sd1" | "sd2" | "sdxl"
    resolution: int  # native resolution: what data.resolution defaults to


def resolve(model: ModelConfig) -> BaseModel:
    """The model's family and native resolution, read once from its configs (remembered per name
    and revision: a second call is free)."""
    return BaseModel(model.name, model.revision, detect_family(model.name, model.revision),
                     default_resolution(model.name))


def check_supported(base: BaseModel, cfg: Config) -> None:
    """Refuse what the base model's family cannot do (ConfigError), before any run folder exists."""
    if base.family == "sdxl" and cfg.identifier.learned:
        raise ConfigError("identifier.learned is not supported for SDXL models yet (its tokens would need both "
                          "text encoders): use a rare token (identifier.learned: false)")


def pipeline_class(family: str):
    """The diffusers pipeline class of a family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is unknown: one of {', '.join(FAMILIES)}")
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def load_pipeline(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  base: BaseModel | None = None):
    """Load the family's pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) with
    from_pretrained: hub id, local folder or a built-in model's name. `base`: the model already
    resolved (else it is resolved here)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, use_safetensors=True)  # never unpickle downloaded weights
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    path = pretrained_path(cfg.name)
    family = (base or resolve(cfg)).family
    if family == "sdxl":
        kwargs["add_watermarker"] = False  # an invisible watermark changes pixels: a seed means one image
    elif not cfg.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = pipeline_class(family).from_pretrained(path, **kwargs)
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
        CLIPTokenizer.from_pretrained(tiny_model_dir(TINY_MODEL), subfolder="tokenizer").save_pretrained(tmp)
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
