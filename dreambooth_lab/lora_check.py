"""Is a LoRA file (and the learned identifier beside it) what its pictures will be labelled with?

A LoRA file is read whole before anything is drawn or exported from it: its tensors must be
floating point and finite, every layer must have a down and an up weight of one rank, and (with
the base model at hand) every layer must name a module of that model with the module's shapes.
After diffusers has loaded it, the adapters actually attached are counted against the file's
layers: a file that loads nothing, or only part of itself, never labels a picture. A run trained
with a learned identifier needs its embedding file: missing or damaged, nothing is drawn or
exported. Every refusal is one line (LoraFileError) naming the file and what to do.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

PREFIX = "dreambooth_lab."  # the namespace of this project's keys in a LoRA file's metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's string metadata (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})

# diffusers / peft keys: unet.<module>.lora_A.weight, unet.<module>.lora.down.weight,
# text_encoder.<module>.lora_linear_layer.up.weight, ...
_DIFFUSERS = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(?:lora_(A|B)|lora(?:_linear_layer)?\.(down|up))"
                        r"\.weight$")
# kohya / A1111: lora_unet_<module>.lora_down.weight, lora_te_..., lora_te1_..., lora_te2_...
_KOHYA = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.lora_(down|up)\.weight$")
_KOHYA_PART = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
               "lora_te2": "text_encoder_2"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message is one line naming the file and the fault."""


def _error(message: str):
    return LoraFileError(message)


def layer_of(key: str) -> tuple[str, str, str, bool] | None:
    """(component, module, "down" | "up", diffusers layout) of a LoRA weight key; None for other keys
    (alpha, DoRA magnitudes, metadata tensors) (pure)."""
    m = _DIFFUSERS.match(key)
    if m:
        part, module, ab, downup = m.groups()
        return part, module, "down" if ab == "A" or downup == "down" else "up", True
    m = _KOHYA.match(key)
    if m:
        part, module, downup = m.groups()
        return _KOHYA_PART[part], module, downup, False
    return None


def flat(shape) -> tuple[int, ...]:
    """A weight shape with a trailing 1x1 kernel dropped: a 1x1 convolution reads as a linear layer (pure)."""
    shape = tuple(int(s) for s in shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def lora_layers(shapes: dict[str, tuple], path: Path | str = "LoRA file") -> dict[tuple[str, str], dict]:
    """(component, module) -> {"down": shape, "up": shape, "diffusers": bool} of a file's tensor
    shapes; a layer without both weights, or whose two weights disagree on the rank, is refused (pure)."""
    layers: dict[tuple[str, str], dict] = {}
    for key, shape in shapes.items():
        found = layer_of(key)
        if found is None:
            continue
        part, module, which, diffusers = found
        layers.setdefault((part, module), {"diffusers": diffusers})[which] = tuple(shape)
    if not layers:
        example = f" such as {next(iter(shapes))!r}" if shapes else ""
        raise _error(f"{path} holds no LoRA layer this workbench can load ({len(shapes)} tensors{example}; it reads "
                     "diffusers keys unet.<module>.lora_A.weight and kohya keys lora_unet_<module>.lora_down.weight): "
                     "use the pytorch_lora_weights.safetensors a run wrote")
    for (part, module), layer in sorted(layers.items()):
        if "down" not in layer or "up" not in layer:
            missing = "up" if "down" in layer else "down"
            raise _error(f"{path}: layer {part}.{module} has no {missing} weight (the file is damaged or cut): "
                         "use the file the run wrote")
        down, up = layer["down"], layer["up"]
        if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
            raise _error(f"{path}: layer {part}.{module} has a down weight of shape {list(down)} and an up weight of "
                         f"shape {list(up)}, which do not make one rank: the file is damaged")
    return layers


def read_checked(path: Path) -> dict[tuple[str, str], dict]:
    """Read every tensor of a LoRA file: floating point, finite, whole layers; returns its layers."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.dtype not in FLOAT_DTYPES:
                    raise _error(f"{path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, but LoRA weights "
                                 "are float16, bfloat16 or float32 (a quantised or converted file cannot be drawn "
                                 "from): use the file the run wrote")
                if t.numel() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise _error(f"{path}: tensor {key!r} holds {bad} NaN or infinite values of {t.numel()}: the "
                                 "training that wrote it diverged; use an earlier step's LoRA or train again with a "
                                 "lower learning rate")
                shapes[key] = tuple(t.shape)
    except (SafetensorError, OSError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _error(f"{path} cannot be read ({reason}): an interrupted copy cuts it short — copy it again") from None
    return lora_layers(shapes, path)


def _module(component: torch.nn.Module, name: str):
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            m = component.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(m, "base_layer", m)  # a module peft wrapped for an earlier adapter
    return None


def check_fits(path: Path, layers: dict, components: dict[str, torch.nn.Module], model: str) -> None:
    """Every diffusers-layout layer names a linear or convolution module of the base model's
    `components` (unet, text_encoder, text_encoder_2) with that module's shapes; else one line."""
    for (part, module), layer in sorted(layers.items()):
        if not layer["diffusers"]:
            continue
        where = f"{path}: layer {part}.{module}"
        comp = components.get(part)
        base = _module(comp, module) if comp is not None else None
        weight = getattr(base, "weight", None)
        if weight is None or weight.dim() not in (2, 4):
            raise _error(f"{where} is not a layer of {model} ({'no ' + part if comp is None else 'no such module'}): "
                         "the file was trained on another base model; load it on that one")
        w, r = tuple(weight.shape), layer["down"][0]
        want_down, want_up = (r, w[1], *w[2:]), (w[0], r, *(1,) * (len(w) - 2))
        if flat(layer["down"]) != flat(want_down) or flat(layer["up"]) != flat(want_up):
            raise _error(f"{where} has weights of shapes {list(layer['down'])} and {list(layer['up'])}, but that "
                         f"module of {model} takes {list(want_down)} and {list(want_up)}: the file was trained on "
                         "another base model or is damaged")


def attached(pipe, adapter: str) -> dict[str, Counter]:
    """component -> Counter of (down shape, up shape) of the adapter's layers now on the pipeline."""
    out: dict[str, Counter] = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        comp = getattr(pipe, part, None)
        if comp is None:
            continue
        for m in comp.modules():
            a, b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
            if isinstance(a, torch.nn.ModuleDict) and adapter in a and adapter in b:
                out.setdefault(part, Counter())[flat(a[adapter].weight.shape), flat(b[adapter].weight.shape)] += 1
    return out


def check_attached(path: Path, layers: dict, pipe, adapter: str, model: str) -> None:
    """After loading: the adapter sits on as many layers of each component as the file holds, with
    the file's shapes, and its weights are finite; else one line."""
    want: dict[str, Counter] = {}
    for (part, _), layer in layers.items():
        want.setdefault(part, Counter())[flat(layer["down"]), flat(layer["up"])] += 1
    got = attached(pipe, adapter)
    for part in sorted(set(want) | set(got)):
        w, g = want.get(part, Counter()), got.get(part, Counter())
        if w != g:
            n_ok = sum((w & g).values())
            raise _error(f"{path}: {n_ok} of its {sum(w.values())} {part} layers were attached to {model} with the "
                         f"file's shapes ({sum(g.values())} attached in all): the file does not fit this base model; "
                         "nothing was drawn — load it on the model it was trained on")
    for part in got:
        for m in getattr(pipe, part).modules():
            a = getattr(m, "lora_A", None)
            if isinstance(a, torch.nn.ModuleDict) and adapter in a:
                for t in (a[adapter].weight, m.lora_B[adapter].weight):
                    if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
                        raise _error(f"{path}: a {part} layer holds {t.dtype} or non-finite weights after loading: "
                                     "the file is damaged; nothing was drawn")


def base_components(model_name: str, revision: str | None, family: str) -> dict[str, torch.nn.Module]:
    """The base model's UNet and text encoder(s) built from their configs without weights (meta
    device, about a second): what a LoRA file is checked against when no pipeline is loaded."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import pretrained_path

    path, kw = pretrained_path(model_name), ({"revision": revision} if revision else {})
    with init_empty_weights():
        out = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet", **kw)),
               "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(path, subfolder="text_encoder", **kw))}
        if family == "sdxl":
            out["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(path, subfolder="text_encoder_2", **kw))
    return out


# ---- the learned identifier ----------------------------------------------------------------------

def expected_identifier(metadata: dict[str, str]) -> tuple[str, int | None] | None:
    """(placeholder or description, number of vectors) when a LoRA's metadata says it was trained with
    a learned identifier, else None (pure)."""

    ident = metadata.get(PREFIX + "identifier", "")
    vectors = metadata.get(PREFIX + "identifier_vectors")
    if vectors is None and not ident.startswith(("<", "learned")):
        return None
    try:
        n = int(vectors) if vectors is not None else None
    except ValueError:
        n = None
    return ident, n


def checked_embedding(lora: Path, width: int | None = None) -> tuple[Path, str] | None:
    """The learned identifier's file that goes with a LoRA file and its placeholder, checked whole:
    present when the LoRA's metadata says it was trained with one, readable, a floating-point finite
    [vectors, width] table with a placeholder. None for a LoRA without a learned identifier."""
    from safetensors import SafetensorError, safe_open

    from .identifier import EMBEDDING_FILE, KEY, embedding_beside, own_embedding
    from .runs import LORA_FILE

    lora = Path(lora)
    emb = embedding_beside(lora)
    try:
        expected = expected_identifier(read_metadata(lora))
    except (SafetensorError, OSError):
        expected = None
    if emb is None:
        if expected is None:
            return None
        name = lora.parent / EMBEDDING_FILE if lora.name == LORA_FILE else own_embedding(lora)
        raise _error(f"{name} is missing: {lora} was trained with the learned identifier {expected[0]}, whose "
                     "embedding lives in that file (without it the prompt's identifier is plain text); copy it back "
                     "beside the LoRA, or train the run again")
    what = "an interrupted copy cuts it short — copy it again, or train the run again"
    try:
        with safe_open(str(emb), framework="pt") as f:
            placeholder = (f.metadata() or {}).get(PREFIX + "placeholder")
            if KEY not in f.keys():
                raise _error(f"{emb} holds no {KEY!r} tensor: it is not a learned identifier; {what}")
            table = f.get_tensor(KEY)
    except (SafetensorError, OSError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _error(f"{emb} is damaged or not a safetensors file ({reason}; {emb.stat().st_size} bytes): "
                     f"{what}") from None
    if not placeholder:
        raise _error(f"{emb} has no {PREFIX}placeholder in its metadata: it was not written by this workbench; load it "
                     "with pipe.load_textual_inversion(path, token=...)")
    n = expected[1] if expected else None
    if table.dim() != 2 or not table.dtype.is_floating_point or (n is not None and table.shape[0] != n) or (
            width is not None and table.shape[1] != width):
        want = f"[{n if n is not None else 'vectors'}, {width if width is not None else 'width'}]"
        raise _error(f"{emb}: its {KEY!r} is a {str(table.dtype).removeprefix('torch.')} tensor of shape "
                     f"{list(table.shape)}, not the float {want} table {lora.name} was trained with: {what}")
    if not bool(torch.isfinite(table).all()):
        raise _error(f"{emb}: the learned identifier holds NaN or infinite values (the training diverged): train "
                     "the run again with a lower identifier.lr")
    return emb, placeholder
