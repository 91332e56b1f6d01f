"""The built-in offline base models, registered by name: what each one is and how its folder is made.

``tiny``, ``tiny-sdxl`` and ``tiny-sd2v`` are small SD1 / SDXL / SD2-v-prediction pipelines with
random weights (tiny.py), ``sd15-random`` and ``sdxl-random`` the published architectures with
random weights for benchmarks (shaped.py), ``toyworld`` the toy world's learned model shipped in
the package (toyworld.py). Each entry knows its family, native resolution, whether it trains in
seconds on a CPU and whether it is the toy world (whose judge reads its pictures); its folder is
built on first use. This module is import-light (no torch): config.py reads its name table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .toyworld import toyworld_dir, toyworld_key

TINY_MODEL = "tiny"
# The other offline test models: SDXL-shaped (two text encoders, text_time embeddings) and SD2-style
# v-prediction, built like "tiny" (builtin/tiny.py); "sdxl-random" is SDXL's real architecture with random
# weights (benchmarks), as "sd15-random" is SD1.5's.
TINY_SDXL = "tiny-sdxl"
TINY_SD2V = "tiny-sd2v"
TINY_MODELS = (TINY_MODEL, TINY_SDXL, TINY_SD2V)
SD15_SHAPED = "sd15-random"
SDXL_SHAPED = "sdxl-random"
TOYWORLD = "toyworld"  # the learned offline base model of the toy world (dreambooth_lab/world)


@dataclass(frozen=True)
class Builtin:
    """One built-in model. `folder()` builds (or finds) its diffusers pipeline folder; `key()` is
    what names it in cache keys; `configs()` is a folder with its configs, without weights when
    they would be costly to build."""

    name: str
    family: str  # "sd1" | "sd2" | "sdxl"
    resolution: int  # native resolution (what data.resolution defaults to)
    cpu_fast: bool  # trains in seconds on a CPU
    toy_world: bool  # the toy world's base model: its judge can read the pictures
    make: Callable[[], Path]
    keyed: Callable[[], str] | None = None  # None: the name is the key
    make_configs: Callable[[], Path] | None = None  # None: folder() holds the configs

    def folder(self) -> Path:
        return self.make()

    def key(self) -> str:
        return self.keyed() if self.keyed else self.name

    def configs(self) -> Path:
        return self.make_configs() if self.make_configs else self.folder()


# The builders import torch, diffusers and transformers: loaded when a folder is first asked for
# (the toy world's folder is only found: toyworld.py is light).
def _tiny(name: str) -> Callable[[], Path]:
    def make() -> Path:
        from .tiny import tiny_model_dir

        return tiny_model_dir(name)
    return make


def _shaped(name: str, configs_only: bool = False) -> Callable[[], Path]:
    def make() -> Path:
        from . import shaped

        if configs_only:
            return shaped.configs_dir(name)
        return shaped.sdxl_shaped_dir() if name == SDXL_SHAPED else shaped.sd15_shaped_dir()
    return make


# Bump a version when that model's architecture or weights change: its cache folder and the
# class-image cache keys include it, so stale copies are never reused.
TINY_VERSIONS = {TINY_MODEL: "tiny-sd1-v1", TINY_SDXL: "tiny-sdxl-v1", TINY_SD2V: "tiny-sd2v-v1"}

MODELS: dict[str, Builtin] = {m.name: m for m in (
    *(Builtin(name, family, 64, cpu_fast=True, toy_world=False, make=_tiny(name), keyed=lambda v=TINY_VERSIONS[name]: v)
      for name, family in ((TINY_MODEL, "sd1"), (TINY_SDXL, "sdxl"), (TINY_SD2V, "sd2"))),
    Builtin(SD15_SHAPED, "sd1", 512, cpu_fast=False, toy_world=False, make=_shaped(SD15_SHAPED),
            make_configs=_shaped(SD15_SHAPED, configs_only=True)),
    Builtin(SDXL_SHAPED, "sdxl", 1024, cpu_fast=False, toy_world=False, make=_shaped(SDXL_SHAPED),
            make_configs=_shaped(SDXL_SHAPED, configs_only=True)),
    Builtin(TOYWORLD, "sd1", 64, cpu_fast=True, toy_world=True, make=toyworld_dir, keyed=toyworld_key),
)}

CPU_MODELS = tuple(name for name, m in MODELS.items() if m.cpu_fast)  # train in seconds on a CPU


def get(name: str) -> Builtin | None:
    """The built-in model of that name, or None (a hub id or a local folder)."""
    return MODELS.get(name)


def is_toy_world(name: str) -> bool:
    """Is `name` the toy world's base model (whose judge reads what its pictures show)?"""
    entry = MODELS.get(name)
    return entry is not None and entry.toy_world
