"""dreambooth_lab: a research workbench for DreamBooth LoRA fine-tuning of Stable Diffusion."""

from .config import Config, ConfigError, load as load_config

__all__ = ["Config", "ConfigError", "load_config"]
__version__ = "0.1.0"
