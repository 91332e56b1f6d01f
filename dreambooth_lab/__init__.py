"""dreambooth_lab: a research workbench for DreamBooth LoRA fine-tuning of Stable Diffusion."""

import logging
import re

from .config import Config, ConfigError, load as load_config

__all__ = ["Config", "ConfigError", "load_config"]
__version__ = "0.1.0"

# Library log lines that every command would print and that say nothing about this workbench.
# Each is dropped on its own logger by its own message; anything else those loggers say still
# shows. (No filter touches torch, and no warning category is silenced wholesale.)
IRRELEVANT_LOG_MESSAGES = {
    # transformers 5 without torchvision, when diffusers imports CLIPImageProcessor and
    # SiglipImageProcessor: the PIL fallback it picks is what this package uses anyway.
    "transformers.utils.import_utils":
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
    # bitsandbytes on a CPU with AVX512-BF16 but without the optional `kernels` package: only its
    # 4-bit CPU inference would use that kernel, never 8-bit AdamW.
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


for _name, _pattern in IRRELEVANT_LOG_MESSAGES.items():
    _logger = logging.getLogger(_name)  # the library gets this same logger when it is imported
    if not any(isinstance(f, _DropMessage) for f in _logger.filters):
        _logger.addFilter(_DropMessage(_pattern))
