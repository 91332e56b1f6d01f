"""Prompt sets: the reference study's four test prompts and the DreamBench lists.

DreamBench (DreamBooth paper, arXiv 2208.12242): 25 prompts per subject kind — 10
recontextualisations shared by all subjects, 10 per kind (objects: more contexts; live subjects:
accessories and outfits), and 5 property changes with the adjective before the token.
"""

from __future__ import annotations

from .config import TEST_PROMPTS

SHARED_CONTEXTS = (
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
)
OBJECT_CONTEXTS = (
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
)
LIVE_CONTEXTS = (
    "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
    "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing pink glasses",
    "wearing a yellow shirt", "in a purple wizard outfit",
)
PROPERTY_ADJECTIVES = ("red", "purple", "shiny", "wet", "cube shaped")

# Classes DreamBench treats as live subjects; anything else is an object unless told otherwise.
LIVE_CLASSES = {"dog", "cat", "puppy", "kitten", "animal", "pet", "bird", "horse", "rabbit", "person", "man",
                "woman", "boy", "girl", "baby", "child", "hamster", "parrot", "cow", "sheep", "monkey"}


def class_kind(class_name: str, kind: str = "auto") -> str:
    if kind != "auto":
        return kind
    return "live" if class_name.strip().lower() in LIVE_CLASSES else "object"


def dreambench(kind: str) -> list[str]:
    """The 25 prompt templates for 'live' or 'object' subjects."""
    specific = LIVE_CONTEXTS if kind == "live" else OBJECT_CONTEXTS
    contexts = [f"a {{token}} {{class}} {c}" for c in SHARED_CONTEXTS + specific]
    return contexts + [f"a {adj} {{token}} {{class}}" for adj in PROPERTY_ADJECTIVES]


def prompt_set(name: str, class_name: str, kind: str = "auto") -> list[str]:
    """Prompt templates by set name: 'study' (the four test prompts) or 'dreambench'."""
    if name == "study":
        return list(TEST_PROMPTS)
    if name == "dreambench":
        return dreambench(class_kind(class_name, kind))
    raise ValueError(f"prompt set {name!r} is unknown: use study or dreambench")


def truncation_warning(tokenizer, prompt: str) -> str | None:
    """The words a text encoder will never see because the prompt is longer than its window
    (77 tokens for CLIP), said in a sentence; None when the prompt fits (pure)."""
    limit = tokenizer.model_max_length - 2  # start and end tokens
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    if len(ids) <= limit:
        return None
    kept = tokenizer.decode(ids[:limit]).strip()
    words = prompt.split()
    n_kept = len(kept.split())
    dropped = " ".join(words[max(n_kept - 1, 0):]) if n_kept < len(words) else tokenizer.decode(ids[limit:])
    return (f"prompt is {len(ids)} tokens, over the text encoder's {limit}: the end is cut off and never seen "
            f"(\"…{dropped}\"); shorten it: {prompt[:60]!r}…")
