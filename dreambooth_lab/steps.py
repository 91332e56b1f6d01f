"""Steps to choose from (`train.save_lora_every`): a LoRA file and pictures at chosen steps.

Every N steps, and at the last step, a run writes a usable LoRA file named by its step and, with
`train.step_images` (the default), draws the subject prompt (`sample.prompt`) with each of the
run's `sample.seeds` as `sample` would draw them (its guidance, steps, sampler, negative prompt
and LoRA scales), so the step before the subject overfits can be seen and picked:

    <run>/loras/step-000400.safetensors              diffusers format, the final file's metadata
                                                     plus dreambooth_lab.step (load_lora, export)
    <run>/loras/step-000400_learned_embeds.safetensors   with identifier.learned: its embedding then
    <run>/steps/step-000400/img-00-seed0.png (+ .json)   each picture with its sidecar (regenerate)
    <run>/steps/steps_x_seeds.png (+ .json)          the sheet: rows = steps, columns = seeds

The pictures are made with the training modules themselves (eval mode, no gradients, the LoRA
scaled to sample.lora_scale_* and put back), so nothing else is loaded on the GPU. A step's
picture folder is filled under a hidden temporary name and renamed when complete; a resumed run
keeps every file it has and writes only the steps it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from . import files
from .config import Config
from .runs import CONFIG
from .timing import Timeline

LORAS = "loras"
STEP_IMAGES = "steps"
SHEET = "steps_x_seeds.png"
_LORA = re.compile(r"^step-(\d{6,})\.safetensors$")
_IMAGES = re.compile(r"^step-(\d{6,})$")


def saved_steps(total: int, every: int) -> list[int]:
    """The steps a run saves at: every `every` steps and the last one; none when every is 0 (pure)."""
    if every <= 0:
        return []
    return sorted(set(range(every, total + 1, every)) | {total})


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def lora_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / LORAS / f"{step_name(step)}.safetensors"


def images_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / STEP_IMAGES / step_name(step)


def step_loras(run_dir: str | Path) -> dict[int, Path]:
    """step -> LoRA file of the run's saved steps, ascending (temporaries of a killed write are not listed)."""
    folder = Path(run_dir) / LORAS
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _LORA.match(p.name))} if folder.is_dir() else {}
    return dict(sorted(found.items()))


def step_image_dirs(run_dir: str | Path) -> dict[int, Path]:
    """step -> complete picture folder, ascending (hidden temporaries are not listed)."""
    folder = Path(run_dir) / STEP_IMAGES
    found = ({int(m.group(1)): p for p in folder.iterdir() if p.is_dir() and (m := _IMAGES.match(p.name))}
             if folder.is_dir() else {})
    return dict(sorted(found.items()))


def run_of(lora_file: str | Path) -> Path | None:
    """The run folder a step LoRA file (<run>/loras/step-N.safetensors) belongs to, else None (pure path logic)."""
    p = Path(lora_file)
    if _LORA.match(p.name) and p.parent.name == LORAS and (p.parent.parent / CONFIG).is_file():
        return p.parent.parent
    return None


def step_of(lora_file: str | Path) -> int | None:
    """The step in a step LoRA's file name, else None (pure)."""
    m = _LORA.match(Path(lora_file).name)
    return int(m.group(1)) if m else None


def clean_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove what a kill left half-written: hidden temp files in loras/, hidden picture folders in steps/."""
    gone = []
    for sub in (LORAS, STEP_IMAGES):
        folder = Path(run_dir) / sub
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".step-"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    gone.append(p)
    return gone


def missing_step_message(run_dir: Path, step: int) -> str:
    have = list(step_loras(run_dir))
    saved = f"its saved steps: {', '.join(map(str, have))}" if have else \
        "it saved none (train with train.save_lora_every=N to keep a LoRA every N steps)"
    return f"{run_dir} has no LoRA at step {step} ({saved}): pick one of them, or step=None for the final LoRA"


def lora_file(run_dir: str | Path, step: int | None = None) -> Path:
    """The run's final LoRA file (step=None) or the one it saved at `step`, checked (inference.find_lora_file);
    a step the run did not save is a FileNotFoundError naming the steps it did."""
    from .inference import find_lora_file

    if step is None:
        return find_lora_file(run_dir)
    path = lora_path(run_dir, step)
    if not path.is_file():
        raise FileNotFoundError(missing_step_message(Path(run_dir), step))
    return find_lora_file(path)


# ---- pictures with the training modules --------------------------------------------------------------

def _set_lora_scale(module, scale: float) -> None:
    """Scale every LoRA layer of a module (peft's set_scale: scale * alpha / rank), as set_adapters does."""
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", float(scale))


@contextmanager
def inference_pipeline(acc, objective, scheduler_name: str, scales: tuple[float, float, float] | None = None,
                       vae_slicing: bool | None = None):
    """A pipeline around the training modules for pictures mid-run: VAE and text encoders on the
    device, every module in eval mode, the LoRA at `scales` (UNet, text encoder, text encoder 2; None =
    as trained), VAE slicing on or off (None = as it is); afterwards each module's device, train mode,
    LoRA scale and VAE slicing are as before."""
    from .sample import make_scheduler

    dev = acc.device
    unet = acc.unwrap_model(objective.unet)
    tes = [acc.unwrap_model(te) for te in objective.text_encoders]
    vae = objective.vae
    devices = [vae.device] + [te.device for te in tes]
    modes = [(m, m.training) for m in [unet, vae, *tes]]
    slicing = getattr(vae, "use_slicing", False)
    try:
        vae.to(dev)
        for te in tes:
            te.to(dev)
        for m, _ in modes:
            m.eval()
        if scales is not None:
            _set_lora_scale(unet, scales[0])
            for te, scale in zip(tes, scales[1:]):
                _set_lora_scale(te, scale)
        if vae_slicing is not None:
            (vae.enable_slicing if vae_slicing else vae.disable_slicing)()
        pipe = objective.pipeline(make_scheduler(scheduler_name, objective.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            yield pipe
    finally:
        for m in [unet, *tes]:
            _set_lora_scale(m, 1.0)
        (vae.enable_slicing if slicing else vae.disable_slicing)()
        for m, mode in modes:
            m.train(mode)
        vae.to(devices[0])
        for te, d in zip(tes, devices[1:]):
            te.to(d)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def step_specs(cfg: Config, run_dir: Path, step: int) -> list:
    """One ImageSpec per sample seed: the subject prompt as `sample` draws it, with this step's LoRA (pure)."""
    from .sample import run_spec

    s = cfg.sample
    return [run_spec(cfg, s, lora_path(run_dir, step), run_dir, cfg.fill(s.prompt), seed, extra={"step": step})
            for seed in s.seeds]


def draw_step_images(acc, cfg: Config, objective, run_dir: Path, step: int) -> Path:
    """Draw the step's pictures into steps/step-NNNNNN/ (filled under a temporary name, then renamed)."""
    from .sample import generate, save_with_sidecars

    s = cfg.sample
    specs = step_specs(cfg, run_dir, step)
    te = s.lora_scale_text_encoder
    scales = (s.lora_scale_unet, te, te if s.lora_scale_text_encoder_2 is None else s.lora_scale_text_encoder_2)
    with inference_pipeline(acc, objective, s.sampler, scales, s.vae_slicing) as pipe, acc.autocast():
        images = generate(pipe, specs, batch_size=s.batch_size, progress=False)
    target = images_dir(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~files.current_umask())
        save_with_sidecars(images, specs, tmp, "img")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class StepSaver:
    """A training callback: at each saved step, the LoRA file (`write_lora(step, path)`), then the
    pictures; a file or folder the run already has is kept as it is (a resumed run)."""

    def __init__(self, acc, cfg: Config, objective, run_dir: Path, write_lora: Callable[[int, Path], object],
                 clock: Timeline):
        self.acc, self.cfg, self.objective, self.run_dir, self.write_lora = acc, cfg, objective, run_dir, write_lora
        self.clock = clock
        self.wanted = set(saved_steps(cfg.train.steps, cfg.train.save_lora_every))
        clean_temporaries(run_dir)

    def on_step(self, record: dict) -> None:
        step = record["step"]
        if step not in self.wanted:
            return
        target = lora_path(self.run_dir, step)
        if not target.is_file():
            self.write_lora(step, target)
        if self.cfg.train.step_images and not images_dir(self.run_dir, step).is_dir():
            draw_step_images(self.acc, self.cfg, self.objective, self.run_dir, step)

    def close(self) -> None:
        """Once every saved step has its pictures (the run reached its last step, in this call or an
        earlier one), the steps x seeds sheet; a run stopped before then has none yet."""
        if self.cfg.train.step_images and self.wanted <= set(step_image_dirs(self.run_dir)):
            with self.clock.phase("steps_sheet"):
                steps_sheet(self.run_dir)


def steps_sheet(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Rows: the run's saved steps; columns: its seeds; each cell the picture drawn at that step
    (train.save_lora_every with train.step_images). Written to <run>/steps/steps_x_seeds.png (or
    `out`) with its .json layout beside; each cell's sidecar is in steps/step-NNNNNN/."""
    from PIL import Image

    from .runs import load_config
    from .sample import read_sidecar
    from .viz import labeled_grid

    run_dir = Path(run_dir)
    found = step_image_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} has no step pictures ({STEP_IMAGES}/step-NNNNNN/): train with "
                                "train.save_lora_every=N (and train.step_images: true) to draw them every N steps")
    rows = {step: {(sp := read_sidecar(png)).seed: (png, sp) for png in sorted(folder.glob("*.png"))}
            for step, folder in found.items()}
    seeds = list(dict.fromkeys(seed for cells in rows.values() for seed in cells))
    first = next(sp for cells in rows.values() for _, sp in cells.values())
    target = Path(out) if out else run_dir / STEP_IMAGES / SHEET
    grid, names = [], []  # each cell's file, relative to the sheet
    for cells in rows.values():
        grid.append([Image.open(cells[s][0]).convert("RGB") if s in cells else None for s in seeds])
        names.append([os.path.relpath(cells[s][0], target.parent) if s in cells else None for s in seeds])
    params = {"guidance": first.guidance, "sampling_steps": first.steps, "sampler": first.sampler,
              "lora_scale_unet": first.lora_scale_unet, "lora_scale_text_encoder": first.lora_scale_text_encoder}
    if first.lora_scale_text_encoder_2 is not None:
        params["lora_scale_text_encoder_2"] = first.lora_scale_text_encoder_2
    if first.negative_prompt:
        params["negative_prompt"] = first.negative_prompt
    params.update(run=run_dir.name, model=first.model, size=first.width)
    last = load_config(run_dir).train.steps
    labels = [f"step {step}" + ("\n(final)" if step == last else "") for step in rows]
    return labeled_grid(grid, labels, [f"seed {s}" for s in seeds], target,
                        title=f'{run_dir.name}: "{first.prompt}" — steps × seeds', params=params, cell_files=names)
