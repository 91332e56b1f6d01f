"""Look at a finished run: its pipeline with the LoRA loaded, seed grid, test-prompt suite,
dataset-versus-generation sheet.

Each call writes into a new folder ``<run>/samples/samples-<timestamp>/``: every image with its
JSON sidecar, and the sheets as PNGs with their parameters written under the pictures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from . import config as config_mod
from .config import SampleConfig
from . import files
from .data import ImageSet
from .metrics import nearest
from .viz import dataset_vs_generation, image_grid, tensor_to_pil
from .runs import LORA_FILE, SAMPLES
from .runs import load_config as load_run_config  # re-exported: cli, export, evaluate and notebooks use this name
from .inference import load_lora
from .sample import apply_vae_options, generate, read_sidecar, run_spec, save_with_sidecars


def load_run_pipeline(run_dir: str | Path, device=None, step: int | None = None):
    """Base pipeline of a run with its LoRA loaded (reuse it across calls: loading is the slow part);
    `step`: the LoRA the run saved at that step (train.save_lora_every) instead of the final one."""
    from .models import load_pipeline
    from .steps import lora_file

    cfg = load_run_config(run_dir)
    lora = lora_file(run_dir, step)  # a missing or damaged LoRA is reported before the slow model load
    from .lora_check import checked_embedding, read_checked

    read_checked(lora)  # and so are non-finite or non-float weights, and a missing or damaged identifier
    checked_embedding(lora)
    pipe = load_pipeline(cfg.model, device=device)
    apply_vae_options(pipe, cfg.sample.vae_slicing, cfg.sample.vae_tiling)
    load_lora(pipe, lora)
    return pipe


open_run = load_run_pipeline  # the old name (main.ipynb, export.py, README): not runs.open_run, which picks a folder


@dataclass
class Samples:
    folder: Path
    images: list[Path]
    seed_grid: Path
    prompt_suite: Path


def sample_run(run_dir: str | Path, *, pipe=None, seeds: list[int] | None = None, prompt: str | None = None,
               test_prompts: list[str] | None = None, lora_scale_unet: float | None = None,
               lora_scale_text_encoder: float | None = None, lora_scale_text_encoder_2: float | None = None,
               guidance: float | None = None,
               steps: int | None = None, settings: SampleConfig | None = None, progress: bool = True) -> Samples:
    """Seed grid of the base prompt and the test prompts × the same seeds.

    Values left as None come from `settings` (e.g. the notebook's current form) or else from the
    run's own config.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    given = dict(seeds=None if seeds is None else list(seeds), prompt=prompt or None, test_prompts=test_prompts,
                 lora_scale_unet=lora_scale_unet, lora_scale_text_encoder=lora_scale_text_encoder,
                 lora_scale_text_encoder_2=lora_scale_text_encoder_2,
                 guidance=guidance, steps=steps)  # None = keep; 0 is a value (and refused), not "unset"
    s = config_mod.validate_sample(replace(settings or cfg.sample, **{k: v for k, v in given.items() if v is not None}))
    seeds = list(s.seeds)
    prompts = [s.prompt] + list(s.test_prompts)
    specs = [run_spec(cfg, s, run_dir / LORA_FILE, run_dir, cfg.fill(p), seed) for p in prompts for seed in seeds]
    pipe = pipe or load_run_pipeline(run_dir)
    images = generate(pipe, specs, batch_size=s.batch_size, progress=progress)
    shown = ("negative_prompt", "guidance", "steps", "sampler", "lora_scale_unet", "lora_scale_text_encoder",
             "lora_scale_text_encoder_2")  # the picture settings written beside the grid, in this order
    params = {k: getattr(s, k) for k in shown if not (k == "lora_scale_text_encoder_2" and s.lora_scale_text_encoder_2 is None)}
    params.update(run=run_dir.name, model=cfg.model.name, size=cfg.resolution)
    n = len(seeds)
    # Written into a hidden folder that gets its samples-<timestamp> name only when complete: a
    # full disk (or a kill) never leaves a half-filled samples folder for compare to use.
    try:
        with files.Building(run_dir / SAMPLES, "samples") as b:
            paths = save_with_sidecars(images, specs, b.tmp, "img")
            grid = _sheet(b.tmp / SEED_GRID, images[:n], specs[:n], f'"{specs[0].prompt}" × {n} seeds', params, n)
            suite = _sheet(b.tmp / PROMPT_SUITE, images, specs, "test prompts × seeds (rows: prompts)", params, n)
    except files.DiskFull as exc:
        raise exc.again(folder=run_dir / SAMPLES, hint="free space there, then sample again (nothing of this "
                        "sample was kept)") from None
    return Samples(b.path, [b.final(p) for p in paths], b.final(grid), b.final(suite))


SEED_GRID, PROMPT_SUITE = "seed_grid.png", "prompt_suite.png"  # the suite is written last: it marks a whole folder


def _sheet(path: Path, images, specs, title: str, params: dict, ncols: int) -> Path:
    return image_grid(images, [f"{sp.prompt}\nseed {sp.seed}" for sp in specs], path, title=title,
                      params=params, ncols=ncols)


def is_complete_samples(folder: Path) -> bool:
    """A samples folder that `sample` finished (its last file, the prompt suite, is there); folders
    left half-filled by an older version on a full disk lack it."""
    return folder.is_dir() and not folder.name.startswith(".") and (folder / PROMPT_SUITE).is_file()


def latest_samples(run_dir: str | Path) -> Path:
    """The newest complete samples folder of a run (half-filled ones are never used)."""
    folders = sorted(p for p in (Path(run_dir) / SAMPLES).glob("samples-*") if is_complete_samples(p))
    if not folders:
        raise FileNotFoundError(f"{run_dir} has no samples yet: run `sample` first")
    return folders[-1]


def compare_run(run_dir: str | Path, samples_folder: str | Path | None = None) -> Path:
    """Each generated image beside its most similar training photo, with the similarity."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    folder = Path(samples_folder) if samples_folder else latest_samples(run_dir)
    if samples_folder and folder.is_dir() and not is_complete_samples(folder):
        raise FileNotFoundError(f"{folder} is not a complete samples folder (no {PROMPT_SUITE}: `sample` did not "
                                "finish, e.g. on a full disk): delete it and run `sample` again, or pick another")
    generated = sorted(folder.glob("img-*.png"))
    if not generated:
        raise FileNotFoundError(f"{folder} holds no generated images (img-*.png)")
    train = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    train_pils = [tensor_to_pil(train.example(i, center_crop=True, flip=False)) for i in range(len(train))]
    gen_pils = [Image.open(p).convert("RGB") for p in generated]
    pairs = []
    for path, im, (j, score) in zip(generated, gen_pils, nearest(gen_pils, train_pils)):
        spec = read_sidecar(path)
        pairs.append((im, f"{spec.prompt} (seed {spec.seed})", train_pils[j], train.paths[j].name, score))
    params = {"run": run_dir.name, "similarity": "pixel cosine 32x32", "dataset": cfg.data.instance_dir,
              "max_similarity": max(p[4] for p in pairs)}
    return dataset_vs_generation(pairs, folder / "compare.png", title="generation vs nearest training photo",
                                 params=params)
