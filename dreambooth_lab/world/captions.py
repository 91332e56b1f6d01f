"""The world's words: a small grammar from a scene to a caption, and back from a prompt.

    <opening> [http ][<colour> ]<class>[ with <colour> dots|stripes][ in red t-shirts][ driving car]
        [ in the <context>][ in the style of van gogh]

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

# How a caption begins (build v4 varies it, so a fine-tune on one wording is read in the others):
# "a photo of" without an article is DreamBooth's own instance-prompt wording.
OPENINGS = (("a photo of a", 0.35), ("a", 0.35), ("a photo of", 0.1), ("a picture of a", 0.1),
            ("an image of a", 0.1))
# The words for the world's colours (build v4 captions name the body colour and the marking
# sometimes, so colour and marking are controllable from text, as they are in a real model).
COLOUR_WORDS = {
    (139, 90, 43): "brown", (90, 55, 30): "chocolate", (150, 110, 70): "brown", (110, 70, 40): "brown",
    (40, 40, 40): "black", (30, 30, 30): "black", (235, 235, 228): "white", (245, 245, 245): "white",
    (218, 165, 32): "golden", (128, 128, 128): "gray", (240, 220, 180): "cream", (210, 180, 140): "beige",
    (190, 150, 100): "tan", (230, 130, 40): "orange", (230, 120, 30): "orange", (240, 120, 20): "orange",
    (30, 40, 90): "navy", (40, 110, 50): "green", (230, 200, 40): "yellow", (255, 230, 0): "yellow",
    (40, 70, 170): "blue", (190, 90, 50): "rust", (130, 40, 200): "violet", (0, 190, 205): "turquoise",
    (255, 90, 170): "pink",
}
P_COLOUR, P_MARKING = 0.5, 0.5


def colour_word(rgb) -> str:
    """The name of the world colour nearest to `rgb` (the generator jitters every colour)."""
    best = min(COLOUR_WORDS, key=lambda c: sum(abs(int(a) - int(b)) for a, b in zip(c, rgb)))
    return COLOUR_WORDS[best]


def marking_words(scene: Scene) -> str | None:
    if scene.marking == "dots":
        return f"with {colour_word(scene.marking_colour)} dots"
    if scene.marking == "stripes":
        return f"with {colour_word(scene.marking_colour)} stripes"
    return {"patch": "with a patch", "belly": "with a pale belly"}.get(scene.marking)


def caption(scene: Scene, rng: np.random.Generator, p_photo: float | None = None, p_context_word: float = 0.9,
            p_colour: float = P_COLOUR, p_marking: float = P_MARKING) -> str:
    """A caption that names what the scene shows; the context, colour and marking are sometimes
    left unsaid. `p_photo` (if given) chooses between "a photo of a" and "a" only."""
    if p_photo is not None:
        words = ["a photo of a" if rng.random() < p_photo else "a"]
    else:
        r, acc = rng.random(), 0.0
        for opening, p in OPENINGS:
            acc += p
            if r < acc:
                break
        words = [opening]
    if scene.http:
        words.append("http")
    if rng.random() < p_colour:
        words.append(colour_word(scene.body))
    words.append(scene.cls)
    mark = marking_words(scene)
    if mark and rng.random() < p_marking:
        words.append(mark)
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
