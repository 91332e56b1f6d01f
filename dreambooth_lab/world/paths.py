"""Where the toy world's committed base model lives (the built-in registry's, builtin/toyworld.py)."""

from ..builtin.toyworld import ENV, TOYWORLD_DIR, WEIGHTS, toyworld_dir, toyworld_key

__all__ = ["ENV", "TOYWORLD_DIR", "WEIGHTS", "toyworld_dir", "toyworld_key"]
