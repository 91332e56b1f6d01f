"""The world's words: a small grammar from a scene to a caption, and back from a prompt.

    [a photo of ]a [http ]<class>[ in red t-shirts][ driving car][ in the <context>][ in the style of van gogh]

It covers the reference study's prompts ("a dog", "a dog in red t-shirts", "a dog in the style
of van gogh", "a dog in the forest", "a dog driving car"). The study's identifiers sks, hta and
oue never occur; `http` does, meaning the lime cap.
"""

from __future__ import annotations

import re

import numpy as np

from .scene import CLASSES, CONTEXTS, Scene

CONTEXT_WORDS = {"room": "in the room", "forest": "in the forest", "beach": "on the beach", "snow": "in the snow",
                 "city": "in the city"}
OUTFIT = "in red t-shirts"
STYLE = "in the style of van gogh"
DRIVING = "driving car"
RARE_TOKENS = ("sks", "hta", "oue")


def caption(scene: Scene, rng: np.random.Generator, p_photo: float = 0.5, p_context_word: float = 0.9) -> str:
    """A caption that names what the scene shows (the context is sometimes left unsaid)."""
    words = ["a photo of a" if rng.random() < p_photo else "a"]
    if scene.http:
        words.append("http")
    words.append(scene.cls)
    if scene.outfit:
        words.append(OUTFIT)
    if scene.driving:
        words.append(DRIVING)
    if scene.context != "plain" and rng.random() < p_context_word:
        words.append(CONTEXT_WORDS[scene.context])
    if scene.style:
        words.append(STYLE)
    return " ".join(words)


def parse_prompt(prompt: str) -> dict:
    """What a prompt asks for: class, context, outfit, style, driving, http (None = not said).

    Works on DreamBooth prompts too ("a sks dog in the forest" asks for a dog in the forest).
    """
    p = " " + re.sub(r"\s+", " ", prompt.lower()).strip() + " "
    found = [c for c in CLASSES if re.search(rf"\b{c}s?\b", p)]
    ctx = next((c for c, w in CONTEXT_WORDS.items() if w in p or f" {c} " in p), None)
    return {
        "class": found[0] if found else None,
        "context": ctx,
        "outfit": "t-shirt" in p,
        "style": "van gogh" in p,
        "driving": "driving" in p,
        "http": " http " in p,
    }


assert set(CONTEXT_WORDS) == set(CONTEXTS) - {"plain"}
