"""The reference study in the toy world: configs for world runs, and what the judge reads from
a model's pictures (subject-trait rate, prompt fidelity, drift, diversity, memorisation).

One function per question; the benchmark, the tests, the notebook and `evaluate` share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..builtin import TOYWORLD, is_toy_world
from ..config import Config, with_overrides
from .captions import parse_prompt
from .scene import SUBJECTS
from .subjects import subject_dir

# The study's prompts in the world's words ({token} {class} filled per run).
TEST_PROMPTS = ("a {token} {class} in red t-shirts", "a {token} {class} in the style of van gogh",
                "a {token} {class} in the forest", "a {token} {class} driving car")
SUBJECT_PROMPT = "a {token} {class}"
CLASS_PROMPT = "a {class}"


# The world's own recipe, calibrated on build v4 and its scale re-calibrated on build v6 (BENCHMARKS.md
# "Toy world"; calibration runs on photo draws 1-2, training seeds 1-2, sampling seeds 100-111 with
# benchmarks/world_calibrate.py; the held-out figures come from other draws, seeds and identifiers).
# Three changes from v3's:
# - a learned identifier started at the rare token's embedding (pivotal tuning) with the text
#   encoder frozen: the binding lives in one embedding row, so every other prompt's text states are
#   bit-identical to the base model's. With the text encoder's LoRA instead (lr 3e-3) "a sks dog"
#   bound in 1 of 2 runs and "a cat" fell to 0.42.
# - per-photo captions naming each photo's context (data.captions: sidecar): the plain-background
#   photo stops dragging its room/snow into "a sks dog", and "in the forest" gets room.
# - 400 steps (v3's 1600): at 800 every seed drew the same picture (one training photo's layout).
# What stays: 16x the study's UNet rate with LoCon and the loss on the noisier timesteps ([500, 1000)
# on builds v4-v8, [300, 1000) since v10), where the picture's layout and colours are decided; on v4
# at [0, 1000) the subject rate fell to 0.67-0.83 and at
# 2e-3 (UNet) one dog run in four did not bind and the backpack bound at 0.00-0.50.
# LoRA scale 0.7 (build v6, 2026-12-05): calibration on v6 (draws 1-2 x seeds 1-2, each run read at
# both scales) bound the dog equally (0.79 at 0.7 and 1.0) and the backpack better (0.98 vs 0.73),
# with more composition (van Gogh 0.50/0.56, forest 0.31/0.42 for dog/backpack). On build v4 the
# same comparison had split (the dog gained at 0.7, the backpack lost), so v4 kept 1.0. Tried on v4
# and not kept: identifier.init class, identifier.embedding_only_steps 100/200, identifier.lr 1e-3.
# A run that "does not bind" (v4, draw 1, seed 2) draws the subject with its dots merged into one
# yellow patch, in its snow photo's setting every seed, and "a cat" draws that dog: it overfits, and
# the judge rightly rejects the merged dots.
# Build v8 (2026-12-06, a 4x wider UNet) keeps 0.7: its calibration (dog, draws 1-2 x seeds 1-2 on the
# build's step-20404 snapshot, read at 0.5 / 0.7 / 1.0) bound at all three (1.00) and traded van Gogh
# (0.62 / 0.88 / 0.98) and the forest (0.48 / 0.77 / 0.94) against driving (0.90 / 0.83 / 0.38) and
# cats (0.96 / 0.94 / 0.79 of the runs' pictures); 0.7 is the only scale with each above 0.75.
# Batch 4, 300 steps (build v8, 2026-12-06; batch 1 and 400 steps before): calibrated on the runs that did
# not bind (dog draw 7, seeds 30/32/33/34) beside draws 1-2 x seeds 1-2; what was tried and measured is in
# BENCHMARKS.md ("the recipe re-calibrated") and benchmarks/world_v8_batch.jsonl.
# Timesteps [300, 1000) (build v10, 2026-12-07; [500, 1000) before): calibrated on dog and backpack,
# draws 1, 2, 7 x training seeds 3-5, identifiers eha/qur/omf, sampling seeds 100-111 (9 runs each).
# Floor 500 left 2 of 9 dog runs unbound on v10 (draw 7), 400 one; 300 and 200 bound all 9 (every
# timestep too, but cats/toys after a dog run fell to 0.80 and driving to 0.45). 300 keeps the other
# classes (worst 0.94, as at 500; 200: 0.89) and driving (0.63; 500: 0.71, 200: 0.49); van Gogh moves
# from run to run (0.00-1.00 at every floor). BENCHMARKS.md "Toy world, build v10 shipped".
WORLD_RECIPE = {"optim.lr_unet": 5e-3, "lora.conv": True, "loss.timestep_min": 300, "identifier.learned": True,
                "identifier.init": "token", "identifier.lr": 5e-3, "train.batch_size": 4}
WORLD_RECIPE_STEPS = 300
WORLD_RECIPE_SCALE = 0.7
WORLD_RECIPE_TEXT_ENCODER = False  # the identifier's embedding trains; the encoder's weights stay as they are
WORLD_RECIPE_CAPTIONS = True  # each subject photo's caption names its context


def world_recipe_config(subject: str = "dog", photos: int = 5, token: str = "sks", *, output_dir: str | Path = "runs",
                        overrides: dict | None = None, **kw) -> Config:
    """world_config with WORLD_RECIPE: the settings under which DreamBooth visibly binds in the world."""
    kw.setdefault("steps", WORLD_RECIPE_STEPS)
    kw.setdefault("train_text_encoder", WORLD_RECIPE_TEXT_ENCODER)
    kw.setdefault("captions", WORLD_RECIPE_CAPTIONS)
    cfg = world_config(subject, photos, token, output_dir=output_dir, overrides={**WORLD_RECIPE, **(overrides or {})},
                       **kw)
    cfg.sample.lora_scale_unet = cfg.sample.lora_scale_text_encoder = WORLD_RECIPE_SCALE
    return cfg


def run_config(recipe: bool, *args, **kw) -> Config:
    """world_recipe_config (recipe=True) or world_config (the study's settings), same arguments."""
    return (world_recipe_config if recipe else world_config)(*args, **kw)


def world_config(subject: str = "dog", photos: int = 5, token: str = "sks", *, output_dir: str | Path = "runs",
                 steps: int = 400, prior: bool = True, train_text_encoder: bool = False, seed: int = 42,
                 overrides: dict | None = None, draw: int = 0, captions: bool = False) -> Config:
    """A DreamBooth run on a world subject with the study's settings scaled to the world.

    The study's rank 4, lr 3e-4 (UNet) / 1e-4 (text encoder), prior preservation and guidance
    6.4 carry over; steps and class images shrink with the model (a 64 px UNet of 4.2 M parameters).
    """
    if subject not in SUBJECTS:
        raise KeyError(f"unknown world subject {subject!r}; choose one of {sorted(SUBJECTS)}")
    cfg = Config()
    cfg.model.name = TOYWORLD
    cfg.data.instance_dir = str(subject_dir(subject, photos, seed=draw, captions=captions))
    cfg.data.captions = "sidecar" if captions else "none"
    cfg.data.token = token
    cfg.data.class_name = SUBJECTS[subject].cls
    cfg.data.instance_prompt = "a photo of {token} {class}"
    cfg.data.class_prompt = "a photo of a {class}"
    cfg.prior.enabled = prior
    cfg.prior.num_class_images = 50
    cfg.prior.steps = 20
    cfg.prior.guidance = 6.4
    cfg.train.steps = steps
    cfg.train.train_text_encoder = train_text_encoder
    cfg.train.seed = seed
    cfg.train.output_dir = str(output_dir)
    # a checkpoint every 100 steps (about 5 s of world training): a Colab disconnect resumes, and the
    # few small writes cost well under a second of a 20 s run
    cfg.train.checkpoint_every = 100
    where = (f"d{draw}" if draw else "") + ("cap" if captions else "")
    cfg.train.name = f"world-{subject}{photos}{'-' + where if where else ''}-{token}-{'prior' if prior else 'noprior'}-{'te' if train_text_encoder else 'unet'}-{steps}"
    cfg.optim.lr_unet = 3e-4
    cfg.optim.lr_text_encoder = 1e-4
    cfg.sample.steps = 20
    cfg.sample.guidance = 6.4
    cfg.sample.test_prompts = list(TEST_PROMPTS)
    cfg.sample.prompt = SUBJECT_PROMPT
    return with_overrides(cfg, overrides) if overrides else cfg


# ---- sampling and reading --------------------------------------------------------------------

def load_world_pipeline(device: str = "cpu"):
    from ..config import ModelConfig
    from ..models import load_pipeline

    return load_pipeline(ModelConfig(name=TOYWORLD, dtype="float32"), device=device)


def sample_prompts(pipe, prompts: Sequence[str], seeds: Sequence[int], *, scale: float | tuple[float, float] = 0.0,
                   guidance: float = 6.4, steps: int = 20, sampler: str = "dpmsolver++") -> dict[str, list]:
    """{prompt: [image per seed]} with the loaded LoRA at `scale` (unet, text encoder), or the base."""
    from ..sample import ImageSpec, generate

    su, ste = (scale, scale) if isinstance(scale, (int, float)) else scale
    specs = [ImageSpec(prompt=p, seed=int(s), guidance=guidance, steps=steps, sampler=sampler, width=64, height=64,
                       lora_scale_unet=su, lora_scale_text_encoder=ste, model=TOYWORLD)
             for p in prompts for s in seeds]
    images = generate(pipe, specs, batch_size=32, progress=False)
    n = len(seeds)
    return {p: images[i * n:(i + 1) * n] for i, p in enumerate(prompts)}


@dataclass
class PromptReading:
    prompt: str
    n: int
    class_rate: float  # the judge reads the asked class
    asked_rate: float | None  # the asked context/outfit/style/car is there (None: the prompt asks none)
    both_rate: float  # class and asked attribute together
    subject_rate: dict  # {subject: fraction showing that subject's traits}
    subject_and_asked: dict  # {subject: traits AND the asked attribute}
    http_rate: float
    diversity: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def asked_ok(row: dict, asked: dict) -> bool | None:
    """Whether a judged image shows what the prompt asked besides the class (None: nothing asked)."""
    checks = []
    if asked["context"]:
        checks.append(row["context"] == asked["context"])
    for k in ("outfit", "style", "driving"):
        if asked[k]:
            checks.append(bool(row[k]))
    return all(checks) if checks else None


def read_prompt(prompt: str, images: list, judge=None) -> PromptReading:
    from .judge import read_images

    rows = read_images(images, judge)
    asked = parse_prompt(prompt)
    n = len(rows)
    ok_class = [r["class"] == asked["class"] for r in rows]
    ok_asked = [asked_ok(r, asked) for r in rows]
    asked_rate = None if ok_asked[0] is None else float(np.mean(ok_asked))
    both = [c and (a is None or a) for c, a in zip(ok_class, ok_asked)]
    subj = {s: float(np.mean([r[f"subject_{s}"] for r in rows])) for s in SUBJECTS}
    subj_asked = {s: float(np.mean([r[f"subject_{s}"] and (a is None or a) for r, a in zip(rows, ok_asked)]))
                  for s in SUBJECTS}
    return PromptReading(prompt, n, float(np.mean(ok_class)), asked_rate, float(np.mean(both)), subj, subj_asked,
                         float(np.mean([r["http"] for r in rows])), diversity(images))


# ---- pixel measures --------------------------------------------------------------------------

def _small(images) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
                     for im in images]).reshape(len(images), -1)


def diversity(images) -> float:
    """Mean pairwise RMS distance of 16x16 thumbnails (0 = identical pictures): the world's DIV."""
    x = _small(images)
    if len(x) < 2:
        return 0.0
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    return float(d[np.triu_indices(len(x), 1)].mean())


def nearest_training_distance(images, photos) -> list[float]:
    """For each image, the RMS thumbnail distance to its nearest training photo (low = memorised)."""
    x, y = _small(images), _small(photos)
    d = np.sqrt(((x[:, None] - y[None]) ** 2).mean(-1))
    return [float(v) for v in d.min(axis=1)]


# ---- one run, read the study's way -----------------------------------------------------------

def read_run(pipe, lora: str | Path | None, cfg: Config, seeds: Sequence[int], scale: float = 0.6,
             judge=None) -> dict:
    """Subject prompt, the four test prompts and the plain class prompt, judged.

    With `lora` None the base pipeline is read (the "before" column).
    """
    from ..inference import load_lora

    token, cls = cfg.prompt_token, cfg.data.class_name  # <sks> with a learned identifier
    fill = lambda t: t.replace("{token}", token).replace("{class}", cls)  # noqa: E731
    prompts = [fill(SUBJECT_PROMPT)] + [fill(t) for t in TEST_PROMPTS] + [fill(CLASS_PROMPT)]
    if lora is not None:
        load_lora(pipe, lora)
        images = sample_prompts(pipe, prompts, seeds, scale=scale)
    else:
        images = sample_prompts(pipe, prompts, seeds)
    readings = {p: read_prompt(p, ims, judge).as_dict() for p, ims in images.items()}
    if lora is not None:
        pipe.delete_adapters("dreambooth")
    return {"prompts": readings, "images": images}


def summarise(reading: dict, cfg: Config) -> dict:
    """The study's numbers from `read_run`'s output: subject rate, test prompts, drift, diversity."""
    subject = subject_of(cfg)
    fill = lambda t: t.replace("{token}", cfg.prompt_token).replace("{class}", cfg.data.class_name)  # noqa: E731
    p = reading["prompts"]
    return {
        "subject_rate": p[fill(SUBJECT_PROMPT)]["subject_rate"][subject],
        "test_prompts_subject_and_asked": {fill(t): p[fill(t)]["subject_and_asked"][subject] for t in TEST_PROMPTS},
        "test_prompts_asked": {fill(t): p[fill(t)]["asked_rate"] for t in TEST_PROMPTS},
        "drift_subject_rate_in_class_prompt": p[fill(CLASS_PROMPT)]["subject_rate"][subject],
        "class_prompt_class_rate": p[fill(CLASS_PROMPT)]["class_rate"],
        "class_diversity": p[fill(CLASS_PROMPT)]["diversity"],
        "subject_diversity": p[fill(SUBJECT_PROMPT)]["diversity"],
        "http_rate_subject_prompt": p[fill(SUBJECT_PROMPT)]["http_rate"],
    }


# ---- robustness: what a user worries about after a fine-tune --------------------------------------

# How else a user asks for the subject; the training caption's own wording is the third.
PHRASINGS = ("a {token} {class}", "a photo of a {token} {class}", "a photo of {token} {class}",
             "a picture of a {token} {class}")
ACCESSORY = "a http {token} {class}"  # the world's `http` is a lime cap: the subject wearing it
PROPERTY_CHANGE = {"dog": "a {token} cat", "backpack": "a {token} vase"}  # the subject's look on another class


def robustness_prompts(cfg: Config) -> dict[str, str]:
    """{role: prompt} for `robustness`: phrasings, the test prompts, every class's own prompt,
    accessorization and property change."""
    from .scene import ANIMATE, CLASSES

    fill = lambda t: t.replace("{token}", cfg.prompt_token).replace("{class}", cfg.data.class_name)  # noqa: E731
    out = {f"phrasing:{t}": fill(t) for t in PHRASINGS}
    out.update({f"test:{t}": fill(t) for t in TEST_PROMPTS})
    out.update({f"class:{c}": f"a {c}" for c in CLASSES})
    if cfg.data.class_name in ANIMATE:
        out["accessory"] = fill(ACCESSORY)
    if (subject := subject_of(cfg)) in PROPERTY_CHANGE:
        out["property_change"] = fill(PROPERTY_CHANGE[subject])
    return out


def robustness(pipe, lora: str | Path | None, cfg: Config, seeds: Sequence[int], scale: float = WORLD_RECIPE_SCALE,
               judge=None) -> dict:
    """One run read the way a user would worry about it (lora None: the base model), flat:

    subject:<phrasing>     the subject shows, per wording of the subject prompt
    test:<prompt>          subject AND the asked attribute (forest = a context no photo shows)
    test_subject:<prompt>  ... the subject alone; test_asked:<prompt> the asked attribute alone
    class:<c>              "a <c>" draws a <c> (every class: the trained one and the others)
    drift                  "a <class>" shows the subject
    subject_diversity      seed-to-seed difference of "a <tok> <class>" (0 = the same picture every seed)
    class_diversity        ... of "a <class>" (the base model's is the reference)
    accessory              "a http <tok> <class>": subject with the cap
    property_change        "a <tok> cat" (dog) / "a <tok> vase" (backpack): a cat/vase with the subject's look
    """
    from ..inference import load_lora

    roles = robustness_prompts(cfg)
    if lora is not None:
        load_lora(pipe, lora)
    try:
        images = sample_prompts(pipe, list(dict.fromkeys(roles.values())), seeds, scale=scale if lora else 0.0)
    finally:
        if lora is not None:
            pipe.delete_adapters("dreambooth")
    return {"readings": read_robustness(images, cfg, judge), "images": images, "prompts": roles}


def read_robustness(images: dict, cfg: Config, judge=None) -> dict:
    """`robustness`'s readings of pictures already drawn ({prompt: [image per seed]}, every prompt of
    `robustness_prompts(cfg)`): the same pictures read by another judge give that judge's figures."""
    from .judge import read_images

    roles = robustness_prompts(cfg)
    key = f"subject_{subject_of(cfg)}"
    rows = {p: read_images(ims, judge) for p, ims in images.items()}
    rate = lambda flags: float(np.mean(flags))  # noqa: E731
    out = {}
    for role, prompt in roles.items():
        judged, asked = rows[prompt], parse_prompt(prompt)
        kind, _, name = role.partition(":")
        if kind == "phrasing":
            out[f"subject:{name}"] = rate([r[key] for r in judged])
            if name == PHRASINGS[0]:  # how much the pictures differ from seed to seed (0 = one picture)
                out["subject_diversity"] = diversity(images[prompt])
        elif kind == "test":
            out[f"test:{name}"] = rate([r[key] and bool(asked_ok(r, asked)) for r in judged])
            # the two halves apart: which one a failed composition loses
            out[f"test_subject:{name}"] = rate([r[key] for r in judged])
            out[f"test_asked:{name}"] = rate([bool(asked_ok(r, asked)) for r in judged])
        elif kind == "class":
            out[f"class:{name}"] = rate([r["class"] == name for r in judged])
            if name == cfg.data.class_name:
                out["drift"] = rate([r[key] for r in judged])
                out["class_diversity"] = diversity(images[prompt])
        elif role == "accessory":
            out["accessory"] = rate([r[key] and r["http"] for r in judged])
        elif role == "property_change":
            out["property_change"] = rate([r[key] and r["class"] == asked["class"] for r in judged])
    return out


def read_scale(recipe: bool, scale: float | None = None) -> float:
    """The LoRA scale a world run is read at: `scale` if given, else the recipe's (WORLD_RECIPE_SCALE)
    or, for the study's settings (world_config), 0.6."""
    return scale if scale is not None else (WORLD_RECIPE_SCALE if recipe else 0.6)


def table(rows: list[dict], columns=("token", "text_encoder", "subject_rate", "drift_subject_rate_in_class_prompt",
                                     "class_diversity", "seconds")) -> str:
    """A markdown table of study rows (numbers to two decimals)."""
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


# ---- the judge's metrics for `evaluate` ---------------------------------------------------------

def world_subject(cfg: Config) -> str | None:
    """The world subject whose photos a run trained on (subjects.subject_dir: its SUBJECT.txt, or a
    folder named <subject>-<n>-seed<seed>); None for any other photos, which the judge cannot read."""
    import re

    folder = Path(cfg.data.instance_dir).expanduser()
    try:
        text = (folder / "SUBJECT.txt").read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    if (m := re.match(r"toy-world subject '([^']+)'", text)) and m.group(1) in SUBJECTS:
        return m.group(1)
    for name in SUBJECTS:
        if re.fullmatch(rf"{re.escape(name)}-\d+-seed\d+(-captioned)?", folder.name):
            return name
    return None


def subject_of(cfg: Config) -> str:
    """The world subject a run is about: the one whose photos it trained on, else by class (the
    studies' runs; evaluate judges only runs with world_subject)."""
    found = world_subject(cfg)
    if found is not None:
        return found
    folder = Path(cfg.data.instance_dir).name
    for name, sub in SUBJECTS.items():
        if folder.startswith(f"{name}-"):
            return name
    return next((n for n, s in SUBJECTS.items() if s.cls == cfg.data.class_name), next(iter(SUBJECTS)))


def judge_absent_reason(cfg: Config) -> str | None:
    """Why `evaluate` reports no judge metrics for a run, in words; None when it judges them (pure
    but for reading the photo folder's SUBJECT.txt)."""
    if not is_toy_world(cfg.model.name):
        return None
    if world_subject(cfg) is None:
        return (f"not judged: {cfg.data.instance_dir} is not a toy-world subject's photo folder (made by "
                "world.subjects.subject_dir), and the judge reads only the world's subjects")
    return None


def judge_metrics(cfg: Config, prompts: Sequence[str], images: Sequence, judge=None) -> dict:
    """Subject fidelity (traits present) and prompt fidelity (class + asked attribute), judged."""
    from .judge import read_images

    rows = read_images(list(images), judge)
    subject = subject_of(cfg)
    asked = [parse_prompt(p) for p in prompts]
    ok = [asked_ok(r, a) for r, a in zip(rows, asked)]
    cls_ok = [r["class"] == a["class"] for r, a in zip(rows, asked)]
    prompt_ok = [c and (o is None or o) for c, o in zip(cls_ok, ok)]
    return {
        "judge_subject": subject,
        "judge_subject_fidelity": float(np.mean([r[f"subject_{subject}"] for r in rows])),
        "judge_prompt_fidelity": float(np.mean(prompt_ok)),
        "judge_subject_and_prompt": float(np.mean([r[f"subject_{subject}"] and p for r, p in zip(rows, prompt_ok)])),
    }


def judge_drift(cfg: Config, base_images: Sequence, tuned_images: Sequence, judge=None) -> dict:
    """Language drift in the world: the subject's traits in class-prompt images, base vs fine-tuned."""
    from .judge import read_images

    subject = subject_of(cfg)
    rate = lambda ims: float(np.mean([r[f"subject_{subject}"] for r in read_images(list(ims), judge)]))  # noqa: E731
    return {"judge_drift_subject_rate_base": rate(base_images), "judge_drift_subject_rate_finetuned": rate(tuned_images),
            "judge_diversity_base": diversity(base_images), "judge_diversity_finetuned": diversity(tuned_images)}


def vae_ceiling(pipe, subject: str, photos: int, judge=None, draw: int = 0, vae=None) -> float:
    """The judge's subject-trait rate on the subject's own photos (photo draw `draw`) after a round
    trip through the pipeline's VAE (or `vae`): the most any generation (all of which the VAE
    decodes) can score, however well DreamBooth works."""
    from .judge import read_images, round_trip, to_batch, to_images
    from .subjects import subject_photos

    x = to_batch(subject_photos(subject, photos, draw))
    decoded = to_images(round_trip(x, vae if vae is not None else pipe.vae, batch=len(x)))
    return float(np.mean([row[f"subject_{subject}"] for row in read_images(decoded, judge)]))
