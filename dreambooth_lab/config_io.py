"""Reading config values: YAML files, `--set key=value` overrides and nested dicts, checked field by field.

Works on any tree of dataclasses (config.py binds it to ``Config``): every key must be a field
(a typo is named with the closest real key), every value is read by the field's type, and an
unquoted YAML scalar keeps the text it was written as, so that a string field gets ``no`` and not
False. Nothing here knows what the fields mean; config.py and config_sections.py check the values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""


def get(obj: Any, dotted: str) -> Any:
    """The value of a dotted field (`optim.lr_unet`) of a dataclass tree (pure)."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def from_dict(data: dict[str, Any] | None, base: T) -> T:
    """A copy of the tree `base` with the nested dicts' values on top, checking every key and type;
    unknown keys are errors."""
    tree = copy.deepcopy(base)
    fill(tree, data or {}, prefix="")
    return tree


def fill(obj: Any, data: Any, prefix: str) -> None:
    """Set the fields of the dataclass tree `obj` from nested dicts, in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" — did you mean '{prefix}{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            fill(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, coerce(value, hints[key], path))


def coerce(value: Any, hint: Any, path: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are due. A
    `Typed` scalar (an unquoted `no`, `0x10`, `null` …) gives a string field its text as written
    and any other field what YAML reads it as."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, Typed) and value.value is None):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], path)
    if isinstance(value, Typed):
        value = value.text if hint is str else value.value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {plain(value)!r}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads "3e-4" (no dot) as a string; accept it as the number it is
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    value = plain(value)
    raise ConfigError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Typed:
    """An unquoted YAML scalar that YAML 1.1 reads as something other than a string (`no` ->
    False, `0x10` -> 16, `null` -> None, `1.5`), with the text as written. `coerce` decides by
    the field's type: a string field gets `text` (data.token: no is the token "no",
    train.mixed_precision: no is accelerate's "no"), every other field gets `value`."""

    text: str
    value: Any


class _TextKeepingLoader(yaml.SafeLoader):
    """yaml.SafeLoader that returns such scalars as `Typed` (mapping keys stay plain values)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        value = super().construct_object(node, deep=deep)
        if isinstance(node, yaml.ScalarNode) and node.style is None and not isinstance(value, str):
            return Typed(node.value, value)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        return {plain(k): v for k, v in super().construct_mapping(node, deep=deep).items()}


def plain(data: Any) -> Any:
    """`data` with every `Typed` replaced by what YAML reads it as: yaml.safe_load's result (pure)."""
    if isinstance(data, Typed):
        return data.value
    if isinstance(data, dict):
        return {plain(k): plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data


def parse_yaml(text: str, keep_text: bool = False) -> Any:
    """yaml.safe_load, or with keep_text=True the same with `Typed` scalars (for config values:
    from_dict / with_overrides resolve them by the field's type)."""
    return yaml.load(text, Loader=_TextKeepingLoader if keep_text else yaml.SafeLoader)


def read_yaml(path: str | Path, keep_text: bool = False) -> Any:
    """A YAML file's contents; keep_text=True keeps unquoted scalars' text (see `Typed`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return parse_yaml(path.read_text(), keep_text=keep_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def dump_yaml(data: dict[str, Any]) -> str:
    """A config's dict as YAML, fields in their declared order."""
    return yaml.safe_dump(data, sort_keys=False)


def load(path: str | Path, build: Callable[[dict, T | None], T], _seen: tuple = ()) -> T:
    """Read a YAML config into build(data, base). A top-level `extends: other.yaml` (relative to
    this file) is read first and this file's values go on top, so presets can share a base."""
    path = Path(path)
    data = read_yaml(path, keep_text=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = None
    if "extends" in data:
        data = dict(data)
        parent = (path.parent / str(plain(data.pop("extends")))).resolve()
        if parent in _seen:
            raise ConfigError(f"{path}: 'extends' loops back to {parent}")
        base = load(parent, build, _seen + (path.resolve(),))
    try:
        return build(data, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"train.steps": 10} -> {"train": {"steps": 10}} (pure)."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def field_type(tree: Any, dotted: str) -> Any:
    """The type hint of a leaf field of the dataclass tree by its dotted name; None when there is
    no such leaf field."""
    obj = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return None if dataclasses.is_dataclass(getattr(obj, part)) else typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
    return None


def coerce_field(tree: Any, dotted: str, value: Any) -> Any:
    """`value` read as the field `dotted` of the tree reads it (as from_dict would); a ConfigError
    names the field when it does not fit (pure)."""
    hint = field_type(tree, dotted)
    if hint is None:
        raise ConfigError(f"unknown config field '{dotted}'")
    return coerce(value, hint, dotted)


def _takes_text(hint: Any) -> bool:
    return hint is str or typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)


def parse_override(tree: Any, key: str, text: str) -> Any:
    """The value of `--set key=text` for a field of the tree (its defaults give the examples),
    read by the field's type (pure).

    A string field takes the text as typed (`data.token=no`, `data.instance_prompt={token} {class}
    in a garden`, `data.token=@sks`), unquoted when it is written in quotes; `null` or nothing is
    None where the field allows it. Every other field reads the text as YAML (`train.steps=800`,
    `lora.unet_targets=[to_q, to_v]`); text that is not valid YAML is a ConfigError naming the key.
    A key that is no field is left for with_overrides to name."""
    hint, stripped = field_type(tree, key), text.strip()
    try:
        value = parse_yaml(text, keep_text=True)
    except yaml.constructor.ConstructorError as exc:  # a tag such as !!python/object/apply: never built
        raise ConfigError(f"--set {key}={text}: YAML tags such as {_tag(exc)} are not accepted: give a plain "
                          "value") from None
    except yaml.YAMLError as exc:
        if hint is None or _takes_text(hint):
            return stripped
        raise ConfigError(f"--set {key}={text}: not a valid value ({_yaml_problem(exc)}): give "
                          f"{_type_name(hint)}, e.g. {key}={_example(get(tree, key))}") from None
    if hint is None:
        return plain(value)
    if _takes_text(hint):
        if hint is not str and (value is None or isinstance(value, Typed) and value.value is None):
            return None
        quoted = stripped[:1] in ("'", '"') and isinstance(value, str)
        return value if quoted else stripped
    return coerce(value, hint, key)


def _example(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    return json.dumps(default) if isinstance(default, list) else str(default)


def _tag(exc: Exception) -> str:
    m = re.search(r"tag '([^']*)'", str(exc))
    tag = m.group(1).replace("tag:yaml.org,2002:", "!!") if m else "!!…"
    return f"'{tag.split(':')[0] if tag.startswith('!!python') else tag}'"


def _yaml_problem(exc: Exception) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return " ".join(str(problem).split())


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(hint, str(hint))
