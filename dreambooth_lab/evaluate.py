"""Evaluate a run the way the DreamBooth paper does, plus the two failures users see by eye.

For each prompt of the chosen set, `images_per_prompt` images (seeds eval.seed + i) are
generated with the run's LoRA at its sample scales. Then:

- subject fidelity: DINO and CLIP-I, generated vs the real training photos;
- prompt fidelity: CLIP-T, each image vs its prompt with the rare token removed;
- memorisation: every generation's nearest training photo by DINO, flagged above a threshold,
  and a sheet that shows the pairs with their numbers;
- language drift: class-prompt images ("a photo of dog") from the base model (LoRA scale 0, which
  is exactly the base model) and the fine-tuned one with the same seeds; how much closer to the
  subject photos the class images moved (DINO, fine-tuned minus base) and their diversity
  (mean pairwise DINO distance; the paper uses LPIPS for DIV).

Everything lands in <run>/eval/eval-<timestamp>/ (images with sidecars, sheets) and the numbers in
<run>/metrics.json, which the run registry picks up.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from PIL import Image

from . import files
from .builtin import is_toy_world
from .config import EvalConfig, SampleConfig
from .data import ImageSet
from .metrics import (Embedder, mean_pairwise_cosine, mean_pairwise_distance, nearest_rows, paired_cosine,
                      strip_token)
from .prompts import class_kind, prompt_set
from .report import load_run_config
from .runs import EVAL_METRICS
from .sample import ImageSpec, generate, save_with_sidecars
from .viz import dataset_vs_generation, tensor_to_pil

METRICS_FILE = EVAL_METRICS  # <run>/metrics.json: the run folder's names live in runs.py


@dataclass
class EvalResult:
    run: str
    created: str
    settings: dict
    summary: dict
    per_prompt: list[dict] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    folder: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        return cls(**json.loads(text))


def read_result(run_dir: str | Path) -> EvalResult:
    return EvalResult.from_json((Path(run_dir) / METRICS_FILE).read_text())


def real_photos(cfg) -> tuple[list[Image.Image], list[str]]:
    """The training photos as training saw them (upright, centre-cropped at the resolution)."""
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    return ([tensor_to_pil(photos.example(i, center_crop=True, flip=False)) for i in range(len(photos))],
            [p.name for p in photos.paths])


def evaluate_run(run_dir: str | Path, ev: EvalConfig | None = None, *, settings: SampleConfig | None = None,
                 pipe=None, embedder: Embedder | None = None, progress: bool = True) -> EvalResult:
    """Generate the evaluation images of a run, measure them, write metrics.json and the sheets.

    `settings` (LoRA scales, guidance, steps, sampler) default to the run's own sample config.
    """
    from .compare import PipelineCache, base_spec

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    from .inference import find_lora_file

    find_lora_file(run_dir)  # an unfinished run, or a damaged LoRA: one line, before any model loads
    ev = ev or cfg.eval
    # The metric models first: one that cannot be loaded fails before a single image is generated.
    embedder = (embedder or Embedder(ev.dino_model, ev.clip_model, batch_size=ev.batch_size)).load()
    pipe = pipe or PipelineCache().for_run(run_dir, cfg)
    templates = prompt_set(ev.prompt_set, cfg.data.class_name, ev.class_kind)
    first = base_spec(cfg, run_dir, settings=settings)
    specs = [replace(first, prompt=cfg.fill(t), seed=ev.seed + i) for t in templates for i in range(ev.images_per_prompt)]
    images = generate(pipe, specs, batch_size=cfg.sample.batch_size, progress=progress)
    with filled_folder(run_dir / "eval", "eval") as (folder, work):
        result = _measure(run_dir, cfg, ev, embedder, pipe, first, templates, specs, images, folder, work, progress)
    files.write_text(run_dir / METRICS_FILE, result.to_json())  # the latest evaluation, for the registry
    return result


@contextmanager
def filled_folder(parent: Path, name: str):
    """Yield (parent/name-<timestamp>, a hidden work folder beside it): the block writes into the
    work folder, which is renamed into place only when the block succeeds. On an error neither is
    left behind (nor `parent`, when this call created it): no half-filled evaluation folder."""
    created = not parent.exists()
    final = files.new_dir(parent, name)  # reserves the name; stays empty until the rename
    work = parent / f".{final.name}.tmp"  # unique as final's name is; mkdir keeps the umask (mkdtemp: 0700)
    try:
        work.mkdir()
        yield final, work
        os.replace(work, final)  # final is an empty folder: rename(2) replaces it
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for empty in (final, parent) if created else (final,):
            try:
                empty.rmdir()
            except OSError:
                pass
        raise


def _measure(run_dir: Path, cfg, ev: EvalConfig, embedder: Embedder, pipe, first: ImageSpec, templates, specs,
             images, folder: Path, work: Path, progress: bool) -> EvalResult:
    """Save the images and sheets into `work` and measure them; `folder` is where they will be."""
    paths = save_with_sidecars(images, specs, work, "eval")

    real, real_names = real_photos(cfg)
    gen_dino, real_dino = embedder.dino(images), embedder.dino(real)
    gen_clip, real_clip = embedder.clip_image(images), embedder.clip_image(real)
    texts = [strip_token(s.prompt, cfg.data.token) if ev.strip_token else s.prompt for s in specs]
    clip_t = paired_cosine(gen_clip, embedder.clip_text(texts))
    near = nearest_rows(gen_dino, real_dino)
    k = ev.score_scale

    per_image = []
    for i, (spec, path, (j, sim)) in enumerate(zip(specs, paths, near)):
        per_image.append({
            "file": path.name, "prompt": spec.prompt, "clip_t_prompt": texts[i], "seed": spec.seed,
            "dino": mean_pairwise_cosine(gen_dino[i:i + 1], real_dino) * k,
            "clip_i": mean_pairwise_cosine(gen_clip[i:i + 1], real_clip) * k, "clip_t": clip_t[i] * k,
            "nearest_training_image": real_names[j], "nearest_dino": sim,
            "memorised": sim > ev.memorisation_threshold,
        })
    per_prompt = []
    for t in templates:
        rows = [r for r in per_image if r["prompt"] == cfg.fill(t)]
        per_prompt.append({"prompt": cfg.fill(t), **{m: sum(r[m] for r in rows) / len(rows)
                                                     for m in ("dino", "clip_i", "clip_t")}})
    summary = {
        "dino": mean_pairwise_cosine(gen_dino, real_dino) * k,
        "clip_i": mean_pairwise_cosine(gen_clip, real_clip) * k,
        "clip_t": sum(clip_t) / len(clip_t) * k,
        "real_vs_real_dino": (1.0 - mean_pairwise_distance(real_dino)) * k,  # the ceiling: real photos vs each other
        "memorisation_max": max(sim for _, sim in near),
        "memorised": sum(r["memorised"] for r in per_image),
        "images": len(per_image),
    }
    if ev.drift_images > 0:
        summary.update(measure_drift(pipe, cfg, first, ev, embedder, real_dino, work, progress))
    if is_toy_world(cfg.model.name):  # the toy world's judge reads what the pictures show, of its own subjects
        from .world.study import judge_absent_reason, judge_metrics

        absent = judge_absent_reason(cfg)
        summary.update({"judge": absent} if absent else judge_metrics(cfg, [sp.prompt for sp in specs], images))

    _memorisation_sheet(work, images, per_image, real, real_names, ev, run_dir.name)
    result = EvalResult(
        run=str(run_dir.resolve()), created=datetime.now().isoformat(timespec="seconds"),
        settings={**asdict(ev), "class_kind": class_kind(cfg.data.class_name, ev.class_kind),
                  "lora_scale_unet": first.lora_scale_unet, "lora_scale_text_encoder": first.lora_scale_text_encoder,
                  "guidance": first.guidance, "steps": first.steps, "sampler": first.sampler},
        summary=summary, per_prompt=per_prompt, per_image=per_image, folder=str(folder))
    files.write_text(work / METRICS_FILE, result.to_json())
    return result


def measure_drift(pipe, cfg, spec: ImageSpec, ev: EvalConfig, embedder: Embedder, real_dino, folder: Path,
                  progress: bool) -> dict:
    """Class-prompt images from the base model (scale 0) and the fine-tuned one, same seeds."""
    first = replace(spec, prompt=cfg.fill(cfg.data.class_prompt))
    tuned = [replace(first, seed=ev.seed + i) for i in range(ev.drift_images)]
    base = [replace(s, lora_scale_unet=0.0, lora_scale_text_encoder=0.0) for s in tuned]
    images = generate(pipe, base + tuned, batch_size=cfg.sample.batch_size, progress=progress)
    save_with_sidecars(images, base + tuned, folder, "drift")
    emb = embedder.dino(images)
    e_base, e_tuned = emb[: len(base)], emb[len(base):]
    to_subject_base = mean_pairwise_cosine(e_base, real_dino)
    to_subject_tuned = mean_pairwise_cosine(e_tuned, real_dino)
    judged = {}
    if is_toy_world(cfg.model.name):  # drift in the world: the subject's traits in class-prompt images
        from .world.study import judge_absent_reason, judge_drift

        if judge_absent_reason(cfg) is None:  # (only of the world's own subjects)
            judged = judge_drift(cfg, images[: len(base)], images[len(base):])
    return {
        **judged,
        "drift_class_prompt": first.prompt,
        "drift_subject_similarity_base": to_subject_base,
        "drift_subject_similarity_finetuned": to_subject_tuned,
        "drift": to_subject_tuned - to_subject_base,  # > 0: class images moved toward the subject
        "diversity_base": mean_pairwise_distance(e_base),
        "diversity_finetuned": mean_pairwise_distance(e_tuned),
    }


def _memorisation_sheet(folder: Path, images, per_image, real, real_names, ev: EvalConfig, run_name: str) -> Path:
    order = sorted(range(len(per_image)), key=lambda i: -per_image[i]["nearest_dino"])[:12]  # most suspicious first
    pairs = []
    for i in order:
        r = per_image[i]
        flag = "  COPY?" if r["memorised"] else ""
        pairs.append((images[i], f"{r['prompt']} (seed {r['seed']}){flag}", real[real_names.index(r["nearest_training_image"])],
                      r["nearest_training_image"], r["nearest_dino"]))
    return dataset_vs_generation(pairs, folder / "memorisation.png",
                                 title=f"{run_name}: generations nearest to a training photo (DINO)",
                                 params={"threshold": ev.memorisation_threshold, "dino_model": ev.dino_model,
                                         "flagged": sum(r["memorised"] for r in per_image)})


def evaluate_runs(run_dirs, ev: EvalConfig, *, reuse: bool = True, progress: bool = True) -> list[EvalResult]:
    """Evaluate several runs with one set of loaded models; with reuse, a run whose metrics.json
    was made with the same settings is not evaluated again."""
    from .compare import PipelineCache

    embedder, cache, out = Embedder(ev.dino_model, ev.clip_model, batch_size=ev.batch_size), PipelineCache(), []
    for run_dir in map(Path, run_dirs):
        if reuse and (run_dir / METRICS_FILE).is_file():
            old = read_result(run_dir)
            if all(old.settings.get(k) == v for k, v in asdict(ev).items()):
                out.append(old)
                continue
        cfg = load_run_config(run_dir)
        out.append(evaluate_run(run_dir, ev, pipe=cache.for_run(run_dir, cfg), embedder=embedder, progress=progress))
    return out


def written_files(run_dir: str | Path, result: EvalResult) -> list[str]:
    """Every file an evaluation wrote, as lines to print: metrics.json, each sheet by name, and the
    images by kind with their count (each PNG has a .json sidecar beside it)."""
    run_dir = Path(run_dir)
    lines = [f"metrics:      {run_dir / METRICS_FILE}"]
    folder = Path(result.folder) if result.folder else None
    if folder is None or not folder.is_dir():
        return lines
    pngs = sorted(folder.glob("*.png"))
    images = [p for p in pngs if p.with_suffix(".json").is_file() and "-seed" in p.stem]
    kinds: dict[str, list[Path]] = {}
    for p in images:
        kinds.setdefault(p.stem.split("-", 1)[0], []).append(p)
    for p in pngs:
        if p not in images:
            lines.append(f"{p.stem + ':':<13} {p}")
    for kind, found in kinds.items():
        lines.append(f"{kind + ' images:':<13} {len(found)} in {folder} ({found[0].name} ... {found[-1].name}, "
                     "each with a .json sidecar)")
    others = sorted(p for p in folder.iterdir() if p.suffix not in (".png",) and not
                    (p.suffix == ".json" and p.with_suffix(".png") in pngs))
    lines += [f"{'also:':<13} {p}" for p in others]
    return lines
