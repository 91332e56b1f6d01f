"""A finished run's LoRA in a pipeline, and pictures made again from their sidecars.

``load_lora`` checks a LoRA file whole (``find_lora_file``, ``lora_check``) before it attaches it
as the ``sample.ADAPTER`` adapter. Every PNG that ``sample.save_with_sidecars`` writes has a JSON
sidecar holding everything needed to make it again: ``regenerate(sidecar)``.
"""

from __future__ import annotations

from contextlib import contextmanager, suppress
from pathlib import Path

from . import identifier, lora_check
from .config import ModelConfig
from .lora_check import LoraFileError  # noqa: F401 (raised by the checks; inference.LoraFileError is its public name)
from .runs import CONFIG, LORA_FILE, read_summary  # inference.LORA_FILE re-exported: the run-folder layout lives in runs.py
from .sample import ADAPTER, ImageSpec, generate, read_sidecar


def find_lora_file(path: str | Path) -> Path:
    """The LoRA file of a run folder, or the file itself, checked before anything is loaded.

    It must exist, end in .safetensors (pickle files can run code), be a complete safetensors
    file (an interrupted copy cuts the data short) and hold LoRA tensors (diffusers or kohya
    keys). Raises FileNotFoundError or LoraFileError with a one-line message.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / LORA_FILE).is_file():
            what = unfinished_reason(path) if (path / CONFIG).is_file() else "not a run folder"
            raise LoraFileError(f"{path} holds no {LORA_FILE} ({what}): pass a finished run folder or a LoRA "
                                ".safetensors file")
        path = path / LORA_FILE
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist: pass a run folder or its {LORA_FILE}")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are loaded (a {path.suffix or 'suffix-less'} "
                            "file may be a pickle, which can run code): use the run's .safetensors file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraFileError(f"{path} is damaged or not a safetensors file ({reason}; {path.stat().st_size} bytes): "
                            "an interrupted copy or download cuts it short — copy it again") from exc
    if not any("lora" in k.lower() for k in keys):
        example = f" such as {keys[0]!r}" if keys else ""
        raise LoraFileError(f"{path} holds no LoRA tensors ({len(keys)} tensors{example}): it is not a LoRA file")
    return path


def unfinished_reason(run: Path) -> str:
    """Why a run folder has no LoRA yet and how to get one, in the CLI's words."""
    summary = read_summary(run) or {}
    if summary.get("status") == "failed":
        return (f"the run failed at step {summary.get('failed_at_step', '?')}: go on from its last checkpoint with "
                f"`train --resume {run} --allow-change` and the fix its error named, or train it again")
    return f"the run has not finished: finish it with `train --resume {run}`"


def load_lora(pipe, lora_path: str | Path) -> None:
    """Load a LoRA file (diffusers or kohya layout, safetensors only) into pipe as the 'dreambooth'
    adapter; `lora_path` is the file or a run folder.

    The file is checked whole first (floating-point finite weights, whole layers that fit this base
    model's modules, the learned identifier's file when it was trained with one) and the adapters
    attached are counted against it afterwards (lora_check): a file that loads nothing, or part of
    itself, raises LoraFileError in one line and leaves no adapter behind."""
    path = find_lora_file(lora_path)
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    model = f"the base model {name}" if name else "this base model"
    layers = lora_check.read_checked(path)
    embedding = lora_check.checked_embedding(path, width=pipe.text_encoder.get_input_embeddings().weight.shape[1])
    components = {k: getattr(pipe, k, None) for k in ("unet", "text_encoder", "text_encoder_2")}
    lora_check.check_fits(path, layers, {k: v for k, v in components.items() if v is not None}, model)
    if ADAPTER in (pipe.get_list_adapters().get("unet") or []):
        pipe.delete_adapters(ADAPTER)
    try:
        with _quiet_missing_text_encoder_keys():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=ADAPTER)
        lora_check.check_attached(path, layers, pipe, ADAPTER, model)
    except (LoraFileError, ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        _drop_adapter(pipe)
        if isinstance(exc, LoraFileError):  # the checks' own message
            raise
        raise LoraFileError(f"{path} does not fit this base model ({_reason(exc)}): load it on the model it was "
                            "trained on") from exc
    if embedding is not None:
        identifier.load_into(pipe, embedding[0], embedding[1])


def _drop_adapter(pipe) -> None:
    """Remove a half-loaded adapter so the pipeline draws nothing under the LoRA's name."""
    with suppress(ValueError, RuntimeError, KeyError, AttributeError):
        if ADAPTER in {a for names in pipe.get_list_adapters().values() for a in names}:
            pipe.delete_adapters(ADAPTER)


def _reason(exc: BaseException) -> str:
    """The informative part of a library error: its first line, and the next one when the first only
    introduces it ('Error(s) in loading state_dict for X:') (pure)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


@contextmanager
def _quiet_missing_text_encoder_keys():
    """A LoRA trained with the text encoder frozen has no text-encoder keys, and diffusers says so
    on every load ("No LoRA keys associated to CLIPTextModel ..."): expected here, so dropped.
    Every other message of the load still shows."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")

    handlers = logging.getLogger("diffusers").handlers
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def has_text_encoder_lora(pipe, component: str = "text_encoder") -> bool:
    """Is the LoRA loaded on the text encoder (component="text_encoder_2": SDXL's second)?"""
    return ADAPTER in (pipe.get_list_adapters().get(component) or [])


def pipeline_for(spec: ImageSpec, device=None):
    """Load the base model of a spec and, when it names one, its LoRA."""
    from .models import load_pipeline

    pipe = load_pipeline(ModelConfig(name=spec.model), device=device)
    if spec.lora:
        load_lora(pipe, spec.lora)
    return pipe


def regenerate(sidecar: str | Path, pipe=None, device=None):
    """Make the image described by a sidecar again (same sidecar => same image)."""
    spec = read_sidecar(sidecar)
    pipe = pipe or pipeline_for(spec, device=device)
    return generate(pipe, [spec], batch_size=1, progress=False)[0]
