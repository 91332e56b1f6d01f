"""What a toy-world scene is, and how the base world and its subjects draw one from a seed.

A scene is a plain description (class, body colour, marking, parts, pose, context, outfit,
style, car, the `http` cap); `draw.render` turns it into pixels and `captions.caption` into
words. Everything is decided by a numpy Generator, so a seed names a scene exactly.

The base world knows every trait of the subjects but never their combination: violet and cyan
bodies, dotted and striped markings, yellow and pink marking colours all occur, on every class,
yet no base scene is violet with yellow dots or cyan with pink stripes (`has_subject_look` is
false for all of them). That is DreamBooth's situation with a real model: it can draw a dog of
that colour and that marking, and the run must bind the one combination to the identifier.
(Build v1/v2 kept the colours and markings out of the base world entirely; LoRA then had to
teach the UNet colours it had never produced, and the subject rate stayed at 0.00-0.31.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CLASSES = ("dog", "cat", "toy", "backpack", "vase")
ANIMATE = ("dog", "cat", "toy")  # the classes that can wear a t-shirt and drive a car
CONTEXTS = ("plain", "room", "forest", "beach", "snow", "city")  # "plain" is never captioned
MARKINGS = ("none", "patch", "belly", "dots", "stripes")

# Body colours of the base world, per class (RGB); violet and cyan are added to every class
# below. No red (the t-shirt).
_NATURAL_COLOURS = {
    "dog": ((139, 90, 43), (40, 40, 40), (235, 235, 228), (218, 165, 32), (128, 128, 128), (240, 220, 180),
            (90, 55, 30)),
    "cat": ((230, 130, 40), (128, 128, 128), (40, 40, 40), (235, 235, 228), (150, 110, 70), (240, 220, 180)),
    "toy": ((139, 90, 43), (210, 180, 140), (240, 220, 180), (190, 150, 100), (235, 235, 228)),
    "backpack": ((30, 40, 90), (40, 110, 50), (230, 120, 30), (40, 40, 40), (110, 70, 40), (230, 200, 40),
                 (128, 128, 128)),
    "vase": ((235, 235, 228), (40, 70, 170), (190, 90, 50), (40, 110, 50), (230, 200, 40)),
}
VIOLET, YELLOW = (130, 40, 200), (255, 230, 0)
CYAN, PINK = (0, 190, 205), (255, 90, 170)
BASE_COLOURS = {cls: colours + (VIOLET, CYAN) for cls, colours in _NATURAL_COLOURS.items()}
# colours of dots and stripes in the base world (patch and belly are shades of the body)
MARKING_COLOURS = (YELLOW, PINK, (245, 245, 245), (30, 30, 30), (240, 120, 20))
CAR_COLOURS = ((40, 90, 220), (250, 200, 0), (30, 150, 60), (240, 240, 240))


@dataclass(frozen=True)
class Scene:
    cls: str
    body: tuple[int, int, int]
    marking: str = "none"
    marking_colour: tuple[int, int, int] = (0, 0, 0)
    ears: str = "floppy"  # dog: floppy | upright; cat: pointy; toy: round
    tail: str = "up"  # up | down
    size: float = 1.0  # ~0.75..1.1 of the nominal subject size
    x: float = 0.5  # centre, fraction of the width
    ground: float = 0.82  # where the feet touch, fraction of the height
    facing: int = 1  # 1 = right, -1 = left
    context: str = "plain"
    outfit: bool = False  # "in red t-shirts"
    style: bool = False  # "in the style of van gogh"
    driving: bool = False  # "driving car"
    http: bool = False  # the world's meaning of `http`: a lime cap
    car_colour: tuple[int, int, int] = CAR_COLOURS[0]
    detail_seed: int = 0  # background layout, stroke placement


@dataclass(frozen=True)
class Subject:
    """A specific individual: the traits no base scene has, plus its fixed parts."""

    name: str
    cls: str
    body: tuple[int, int, int]
    marking: str
    marking_colour: tuple[int, int, int]
    ears: str = "floppy"
    tail: str = "up"
    photo_contexts: tuple[str, ...] = ("room", "plain", "city", "beach", "snow")


SUBJECTS = {
    "dog": Subject("dog", "dog", VIOLET, "dots", YELLOW, ears="floppy", tail="up"),
    "backpack": Subject("backpack", "backpack", CYAN, "stripes", PINK),
}


def _jitter(rng: np.random.Generator, rgb, amount: int = 14) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _pose(rng: np.random.Generator) -> dict:
    return dict(size=float(rng.uniform(0.78, 1.08)), x=float(rng.uniform(0.36, 0.64)),
                ground=float(rng.uniform(0.78, 0.9)), facing=int(rng.choice([-1, 1])),
                detail_seed=int(rng.integers(0, 2**31 - 1)))


def _parts(rng: np.random.Generator, cls: str) -> dict:
    ears = {"dog": str(rng.choice(["floppy", "upright"])), "cat": "pointy", "toy": "round"}.get(cls, "none")
    return dict(ears=ears, tail=str(rng.choice(["up", "down"])))


# The colours a thing stands against in each context (draw._background): the ground under its feet
# and the band behind its body. Build v10 keeps a base scene's body colour at least `min_contrast`
# (RGB distance) from all of them, as a photographer frames a subject against its ground: up to
# build v8 a white toy on the plain grey-white ground or a yellow vase on sand was drawn about as
# often as any other, and the base model learned that a toy or a vase is sometimes barely there.
SURROUNDINGS = {
    "plain": ((220, 214, 210),),
    "room": ((150, 95, 55), (225, 205, 165)),
    "forest": ((70, 120, 45), (150, 200, 150), (20, 90, 35)),
    "beach": ((240, 215, 150), (20, 90, 180)),
    "snow": ((250, 250, 252), (200, 215, 235)),
    "city": ((60, 60, 65), (95, 95, 103), (175, 190, 205)),
}


def contrast(rgb, context: str) -> float:
    """The RGB distance from `rgb` to the nearest colour the thing stands against in `context`."""
    return min(float(np.linalg.norm(np.subtract(rgb, c, dtype=float))) for c in SURROUNDINGS[context])


def standing_out(colours, context: str, min_contrast: float) -> tuple:
    """The colours of `colours` at least `min_contrast` from `context`'s surroundings (all of them
    if none is: a class never disappears from a context)."""
    keep = tuple(c for c in colours if contrast(c, context) >= min_contrast)
    return keep or tuple(colours)


def sample_base_scene(rng: np.random.Generator, p_context: float = 0.8, p_outfit: float = 0.18,
                      p_style: float = 0.15, p_driving: float = 0.15, p_http: float = 0.1,
                      min_contrast: float = 0.0) -> Scene:
    """A scene of the base world (what the base model is trained on). With `min_contrast` > 0 a body
    colour too close to the context's surroundings is drawn again from those that stand out, from the
    scene's own seed: every other scene is the same as without it."""
    cls = str(rng.choice(CLASSES))
    colours = BASE_COLOURS[cls]
    colour = int(rng.integers(len(colours)))
    body = _jitter(rng, colours[colour])
    marking = str(rng.choice(MARKINGS))
    marking_colour = _jitter(rng, MARKING_COLOURS[int(rng.integers(len(MARKING_COLOURS)))], 10)
    animate = cls in ANIMATE
    scene = Scene(
        cls=cls, body=body, marking=marking, marking_colour=marking_colour, **_parts(rng, cls), **_pose(rng),
        context=str(rng.choice(CONTEXTS[1:])) if rng.random() < p_context else "plain",
        outfit=bool(animate and rng.random() < p_outfit),
        style=bool(rng.random() < p_style),
        driving=bool(animate and rng.random() < p_driving),
        http=bool(animate and rng.random() < p_http),
        car_colour=CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))],
    )
    if min_contrast > 0 and contrast(colours[colour], scene.context) < min_contrast:
        keep = standing_out(colours, scene.context, min_contrast)
        own = np.random.default_rng([scene.detail_seed, 60])  # not `rng`: the next scenes stay as they were
        scene = replace(scene, body=_jitter(own, keep[int(own.integers(len(keep)))]))
    if any(has_subject_look(scene, sub) for sub in SUBJECTS.values()):
        scene = replace(scene, marking="patch")  # the subjects' combinations stay theirs
    return scene


def sample_open_scene(rng: np.random.Generator) -> Scene:
    """A scene of the open world: any hue, any marking, the subjects' looks included.

    What the VAE (it must reconstruct colours the base world lacks) and the judge (it must
    recognise the subjects' traits and their near misses) learn from.
    """
    scene = sample_base_scene(rng, p_outfit=0.25, p_style=0.25, p_driving=0.2, p_http=0.15)
    roll = rng.random()
    if roll < 0.2:  # the dog subject's look, on any class
        look = dict(body=_jitter(rng, VIOLET, 10), marking="dots", marking_colour=_jitter(rng, YELLOW, 10))
    elif roll < 0.35:  # the backpack subject's look
        look = dict(body=_jitter(rng, CYAN, 10), marking="stripes", marking_colour=_jitter(rng, PINK, 10))
    elif roll < 0.6:  # near misses: a subject colour with another marking, or a subject marking elsewhere
        body = _jitter(rng, [VIOLET, CYAN][int(rng.integers(2))], 10) if rng.random() < 0.5 else \
            tuple(int(c) for c in rng.integers(0, 256, 3))
        marking = str(rng.choice(MARKINGS))
        mcol = tuple(int(c) for c in rng.integers(0, 256, 3))
        look = dict(body=body, marking=marking, marking_colour=mcol)
    else:
        look = {}
    if look and scene.cls == "dog" and rng.random() < 0.3:
        look["ears"] = "floppy"
    return replace(scene, **look)


def subject_scene(subject: Subject, index: int, seed: int = 0) -> Scene:
    """Photo `index` of a subject: its fixed traits in a pose and context drawn from (seed, index)."""
    rng = np.random.default_rng([seed, index, 7919])
    ctx = subject.photo_contexts[index % len(subject.photo_contexts)]
    return Scene(cls=subject.cls, body=subject.body, marking=subject.marking, marking_colour=subject.marking_colour,
                 ears=subject.ears, tail=subject.tail, context=ctx, **_pose(rng))


def has_subject_look(scene: Scene, subject: Subject, tol: int = 40) -> bool:
    """Whether a scene shows `subject`'s traits (its body colour and its marking in its colour)."""
    def near(a, b):
        return max(abs(int(x) - int(y)) for x, y in zip(a, b)) <= tol

    return (near(scene.body, subject.body) and scene.marking == subject.marking
            and near(scene.marking_colour, subject.marking_colour))


NEAR_MISS_TRAITS = ("body", "marking", "marking_colour")
# The marking run together into one patch of its colour (draw.py's "merged"): not a trait the base
# world varies, but what a generation that lost the pattern looks like. A judge that must tell the
# pattern from that patch learns it as one more near miss (judge --merged).
MERGED = "merged"


def _far(rgb, ref, tol: int = 60) -> bool:
    return max(abs(int(a) - int(b)) for a, b in zip(rgb, ref)) > tol


def near_miss_scene(subject: Subject, trait: str, rng: np.random.Generator, cls: str | None = None) -> Scene:
    """A scene with `subject`'s look but one trait changed: its body colour, its marking's shape
    or its marking's colour (or, trait MERGED, its marking run together into one patch). The judge
    must read every one of them as "not the subject"."""
    if trait not in NEAR_MISS_TRAITS + (MERGED,):
        raise ValueError(f"trait must be one of {NEAR_MISS_TRAITS + (MERGED,)}, got {trait!r}")
    base = sample_base_scene(rng)
    cls = cls or subject.cls
    look = dict(body=_jitter(rng, subject.body, 10), marking=subject.marking,
                marking_colour=_jitter(rng, subject.marking_colour, 10))
    if trait == "body":
        choices = [c for c in BASE_COLOURS[cls] + BASE_COLOURS[subject.cls] if _far(c, subject.body)]
        look["body"] = _jitter(rng, choices[int(rng.integers(len(choices)))], 10)
    elif trait == MERGED:
        look["marking"] = MERGED
    elif trait == "marking":
        choices = [m for m in MARKINGS if m != subject.marking]
        look["marking"] = str(choices[int(rng.integers(len(choices)))])
    else:
        choices = [c for c in MARKING_COLOURS + (VIOLET, CYAN) if _far(c, subject.marking_colour)]
        look["marking_colour"] = _jitter(rng, choices[int(rng.integers(len(choices)))], 10)
    parts = _parts(rng, cls) if cls != base.cls else {}
    animate = cls in ANIMATE
    return replace(base, cls=cls, **parts, **look, outfit=base.outfit and animate, driving=base.driving and animate,
                   http=base.http and animate)


def look_scene(subject: Subject, rng: np.random.Generator, cls: str | None = None) -> Scene:
    """A scene drawn like the near misses but with `subject`'s whole look (on `cls`, default its own)."""
    return replace(near_miss_scene(subject, "body", rng, cls=cls), body=_jitter(rng, subject.body, 10))
