"""The DreamBooth subjects as photo folders (what ``data.instance_dir`` points at).

Rendered deterministically on first use into ``<cache>/world/subjects/<name>-<n>`` — the same
bytes on every machine, so a folder's digest (and a run's identity) never changes.
"""

from __future__ import annotations

from pathlib import Path

from ..cache import build_once, cache_root
from .captions import CONTEXT_WORDS
from .draw import render
from .scene import SUBJECTS, subject_scene

PHOTO_COUNTS = (5, 18)  # the study's 5-photo and 18-photo subjects
WORLD_VERSION = "world-v1"  # bump when the generator's pictures change


def subject_photos(name: str, n: int, seed: int = 0):
    """The first n photos of a subject as PIL images (photo i is the same for every n)."""
    if name not in SUBJECTS:
        raise KeyError(f"unknown world subject {name!r}; choose one of {sorted(SUBJECTS)}")
    return [render(subject_scene(SUBJECTS[name], i, seed)) for i in range(n)]


def photo_caption(name: str, index: int, seed: int = 0) -> str:
    """The sidecar caption of a subject's photo: the instance wording plus the photo's context
    ("a photo of {token} {class} on the beach"), so captions can untangle subject from context."""
    ctx = subject_scene(SUBJECTS[name], index, seed).context
    return "a photo of {token} {class}" + (f" {CONTEXT_WORDS[ctx]}" if ctx in CONTEXT_WORDS else "")


def subject_dir(name: str, n: int = 5, seed: int = 0, root: Path | None = None, captions: bool = False) -> Path:
    """A folder of n PNG photos of world subject `name` (built once, atomically); with captions,
    each photo has its sidecar caption naming its context (data.captions: sidecar)."""
    root = Path(root) if root is not None else cache_root() / "world" / WORLD_VERSION / "subjects"
    folder = root / (f"{name}-{n}-seed{seed}" + ("-captioned" if captions else ""))

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for i, im in enumerate(subject_photos(name, n, seed)):
            im.save(tmp / f"{name}_{i:02d}.png", optimize=False)
            if captions:
                (tmp / f"{name}_{i:02d}.txt").write_text(photo_caption(name, i, seed) + "\n")
        (tmp / "SUBJECT.txt").write_text(f"toy-world subject {name!r}: class {SUBJECTS[name].cls}, {n} photos\n")

    return build_once(folder, build, marker=f"{name}_{n - 1:02d}.png")


def subject_class(name: str) -> str:
    return SUBJECTS[name].cls
