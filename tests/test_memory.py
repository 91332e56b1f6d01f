"""The memory model: parameter counts from the configs, activations counted on the meta device."""

import sys

import pytest
import torch

from conftest import REPO, tiny_config
from dreambooth_lab import memory

SDXL_PRESET = REPO / "configs" / "colab_t4_sdxl.yaml"


def _real_saved_bytes(unet, *args, **kwargs) -> int:
    """What autograd saves in one real CPU forward of `unet` (the hook the meta count uses)."""
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def pack(t):  # each storage once, as the meta count does
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    unet.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(*args, **kwargs)
    return sum(seen.values())


def test_lora_count_matches_the_real_adapters(tmp_path, tiny_pipe):
    from dreambooth_lab.lora import add_adapters
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.config import ModelConfig

    cfg = tiny_config(tmp_path, **{"train.train_text_encoder": True, "lora.rank": 8})
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    real = sum(p.numel() for p in add_adapters(cfg.resolved().lora, pipe.unet, pipe.text_encoder,
                                                  train_text_encoder=cfg.train.train_text_encoder))
    est = memory.estimate(cfg, "cpu")
    assert est.lora == real * 4 and est.gradients == real * 4 and est.optimizer == real * 8


def test_meta_count_equals_a_real_forward(tmp_path):
    """Counting saved tensors on the meta device comes close to what a real CPU forward saves
    (kernels differ: CPU attention saves other intermediates than the meta kernels)."""
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.lora import add_adapters

    cfg = tiny_config(tmp_path).resolved()
    predicted = memory.saved_activation_bytes(cfg, memory._meta_models(cfg))
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    add_adapters(cfg.lora, pipe.unet, pipe.text_encoder, train_text_encoder=cfg.train.train_text_encoder)
    real = _real_saved_bytes(pipe.unet, torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long),
                             torch.zeros(2, 77, 32))
    assert 0.75 < predicted / real < 1.35


def test_sdxl_meta_count_equals_a_real_forward(tmp_path):
    """The SDXL-shaped UNet (pooled text embedding and time ids) counted on the meta device, against
    the same hook on a real forward of the tiny SDXL pipeline's UNet."""
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.lora import add_adapters
    from dreambooth_lab.models import load_pipeline

    cfg = tiny_config(tmp_path, **{"model.name": "tiny-sdxl"}).resolved()
    models = memory._meta_models(cfg)
    assert models.family == "sdxl" and len(models.text_encoders) == 2
    predicted = memory.saved_activation_bytes(cfg, models)
    unet = load_pipeline(ModelConfig(name="tiny-sdxl"), device="cpu").unet
    add_adapters(cfg.lora, unet, torch.nn.Module(), train_text_encoder=False)
    rows, side, c = 2, cfg.resolution // 8, unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    real = _real_saved_bytes(unet, torch.zeros(rows, c.in_channels, side, side), torch.zeros(rows, dtype=torch.long),
                             torch.zeros(rows, 77, c.cross_attention_dim),
                             added_cond_kwargs={"text_embeds": torch.zeros(rows, pooled),
                                                "time_ids": torch.zeros(rows, 6)})
    assert 0.75 < predicted / real < 1.35


def test_sdxl_counts_both_text_encoders(tmp_path):
    frozen = tiny_config(tmp_path, **{"model.name": "tiny-sdxl"})
    models = memory._meta_models(frozen.resolved())
    te1, te2 = (memory.count_params(te) for te in models.text_encoders)
    unet, vae = memory.count_params(models.unet), memory.count_params(models.vae)
    lora_unet = sum(p.numel() for p in models.unet.parameters() if p.requires_grad)
    # on a CPU nothing is offloaded: UNet, VAE and both encoders, fp32
    assert memory.estimate(frozen, "cpu").weights == (unet - lora_unet + vae + te1 + te2) * 4
    trained = memory.estimate(tiny_config(tmp_path, **{"model.name": "tiny-sdxl", "train.train_text_encoder": True}))
    lora_te = trained.lora // 4 - lora_unet
    meta = memory._meta_models(tiny_config(tmp_path, **{"model.name": "tiny-sdxl",
                                                          "train.train_text_encoder": True}).resolved())
    assert all(any(p.requires_grad for p in te.parameters()) for te in meta.text_encoders)  # LoRA on both
    assert lora_te == sum(p.numel() for te in meta.text_encoders for p in te.parameters() if p.requires_grad)
    assert trained.activations > memory.estimate(frozen).activations  # the encoders run in the step


def test_options_move_the_estimate_the_right_way(tmp_path):
    base = tiny_config(tmp_path)
    e = memory.estimate(base)
    assert memory.estimate(tiny_config(tmp_path, **{"data.resolution": 128})).activations > 3 * e.activations
    assert memory.estimate(tiny_config(tmp_path, **{"optim.optimizer": "adamw8bit"})).optimizer == e.optimizer // 4
    ckpt = memory.estimate(tiny_config(tmp_path, **{"train.gradient_checkpointing": True}))
    assert ckpt.activations < e.activations and e.recompute == 0
    assert 0 < ckpt.recompute < e.activations  # one segment rebuilt in backward, not the whole forward
    assert memory.estimate(tiny_config(tmp_path, **{"train.mixed_precision": "fp16"})).weights < e.weights
    no_prior = memory.estimate(tiny_config(tmp_path, **{"prior.enabled": False}))
    assert no_prior.activations == pytest.approx(e.activations / 2, rel=0.05)
    # cached + offloaded: VAE and frozen text encoder are off the GPU; not on a CPU
    assert memory.estimate(base, "cuda").weights < memory.estimate(base, "cpu").weights
    # the set-up phase holds everything plus one VAE pass, and grows with the resolution
    assert e.setup_weights > 0 and e.setup_transient > 0 and e.peak == max(e.total, e.setup)
    assert memory.estimate(tiny_config(tmp_path, **{"data.resolution": 128})).setup_transient > e.setup_transient
    # the models are kept for the next estimate: counting with checkpointing left them as they were
    again = memory.estimate(base)
    assert (again.activations, again.recompute) == (e.activations, e.recompute)


def test_sdxl_vae_counts_in_fp32_under_fp16(tmp_path):
    """SDXL's VAE overflows in fp16 (force_upcast): with fp16 training it is counted in fp32."""
    fp16 = tiny_config(tmp_path, **{"model.name": "tiny-sdxl", "train.mixed_precision": "fp16"}).resolved()
    models = memory._meta_models(fp16)
    assert memory.vae_dtype(fp16, models) == (torch.float32 if models.vae.config.force_upcast else torch.float16)
    sd1 = tiny_config(tmp_path, **{"train.mixed_precision": "fp16"}).resolved()
    assert memory.vae_dtype(sd1, memory._meta_models(sd1)) == torch.float16


def test_live_peak_counts_tensors_alive_at_once():
    mode = memory._LivePeak()
    with mode:
        a = torch.zeros(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = (b + 1).view(10, 100)  # a freed, b and b + 1: 8000; the view shares its storage
        del b
        assert mode.live == 4000  # b + 1 lives on through its view
        del c
        d = torch.zeros(500, device="meta")  # 2000
    assert mode.peak == 8000 and mode.live == 2000
    del d


def test_published_models_are_estimated_without_a_download():
    """SDXL base's hub id is read from the offline shape's configs (the same architecture)."""
    assert memory.SAME_ARCHITECTURE["stabilityai/stable-diffusion-xl-base-1.0"] == "sdxl-random"
    from pathlib import Path

    path = Path(memory.config_source("stabilityai/stable-diffusion-xl-base-1.0"))
    assert (path / "unet" / "config.json").is_file() and (path / "text_encoder_2" / "config.json").is_file()
    assert not (path / "unet" / "diffusion_pytorch_model.safetensors").exists()  # configs only, no weights


def test_colab_t4_sdxl_preset_loads_and_fits_a_t4():
    """configs/colab_t4_sdxl.yaml validates, is SDXL at 1024 px with the T4 switches, and the memory
    model (times the CPU-measured ratios in benchmarks/sdxl_memory.json) puts its peak in 15 GB."""
    sys.path.insert(0, str(REPO))
    from benchmarks.memory_model import SDXL_JSON, adjusted, sdxl_factors
    from dreambooth_lab.config import load

    cfg = load(SDXL_PRESET).validate()
    assert cfg.model.name == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.resolution == 1024
    assert cfg.train.mixed_precision == "fp16" and cfg.train.gradient_checkpointing
    assert cfg.optim.optimizer == "adamw8bit" and not cfg.train.train_text_encoder
    assert cfg.train.cache_text_embeddings and cfg.train.cache_latents and cfg.data.center_crop
    est = memory.estimate(cfg, "cuda")
    import json

    factors = sdxl_factors(json.loads(SDXL_JSON.read_text()) if SDXL_JSON.is_file() else None)
    train, setup = adjusted(est, factors)
    assert est.peak / memory.GiB < 15.0 and max(train, setup) < 15.0 * 0.85
    # offloaded: only the fp16 UNet stays for the steps (2.57B parameters)
    assert est.weights == pytest.approx(2_567_463_684 * 2, rel=0.01)
    # the memory model is what decides: without checkpointing 1024 px would not fit
    from dreambooth_lab.config import with_overrides

    bare = memory.estimate(with_overrides(cfg, {"train.gradient_checkpointing": False}), "cuda")
    assert bare.total / memory.GiB > 15.0


def test_sdxl_section_is_replaced_between_its_markers():
    sys.path.insert(0, str(REPO))
    from benchmarks.memory_model import SDXL_END, SDXL_START, replace_sdxl_section

    doc = "# B\n\n## CPU\n\nx\n\n<!-- world:start -->\n## World\n<!-- world:end -->\n"
    first = replace_sdxl_section(doc, f"{SDXL_START}\n## SDXL\n\none\n{SDXL_END}\n")
    assert first.index(SDXL_START) < first.index("<!-- world:start -->")  # before the toy world
    second = replace_sdxl_section(first, f"{SDXL_START}\n## SDXL\n\ntwo\n{SDXL_END}\n")
    assert second.count(SDXL_START) == 1 and "two" in second and "one" not in second
    assert second.replace("two", "one") == first
