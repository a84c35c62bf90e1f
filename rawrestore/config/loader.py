"""YAML experiment files -> ExperimentConfig: `base:` composition, dotted overrides, type checks.

A file may name fragments under `base:` (a path or a list, relative to that file); they are
deep-merged in order, then the file's own keys on top; fragments may have their own `base:`.
`key=value` overrides (dotted keys, values parsed by yaml.safe_load) go on top of everything.
Mappings merge key by key; any other value (lists included, so `data.sources`) replaces the one below it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union


import yaml

from rawrestore.config.bounds import check_tree, load_yaml, preview, read_config_text
from rawrestore.config.schema import ExperimentConfig, TrainConfig
from rawrestore.errors import ConfigError

T = TypeVar("T")
BASE_KEY = "base"
_NUMERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


# ------------------------------------------------------------------- type machinery


def _describe(tp: Any) -> str:
    """A short human name for a type annotation: 'int', 'float or null', "one of 'adam', 'adamw'"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_describe(item)}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_describe(tp)}, got {preview(value)} ({type(value).__name__})")


def _unknown_key(key: str, name: str, known: Iterable[str]) -> ConfigError:
    """ConfigError for an unknown key, with the closest known key when one is near."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    parent = key.rpartition(".")[0]
    if close:
        hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    else:
        hint = "known keys here: " + ", ".join(known)
    return ConfigError(f"unknown config key '{key}' ({hint})")


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` and convert it (dicts -> dataclasses, ints -> floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        structured = [o for o in options if typing.get_origin(o) is list or dataclasses.is_dataclass(o)]
        if len(structured) == 1 and isinstance(value, (list, tuple, Mapping)):
            return _coerce(value, structured[0], key)  # the error inside (e.g. a source's unknown key) names its key
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(
            f"config key '{key}' must be one of {', '.join(repr(c) for c in choices)}, got {preview(value)}"
        )
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept such numerals where a float is expected
        if isinstance(value, str) and _NUMERAL.match(value.strip()):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    raise TypeError(f"config schema: unsupported annotation {tp!r} for '{key}'")


def _field_default(cls: type, name: str) -> Any:
    """The default value of field `name` of dataclass `cls` (calling its default_factory)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return f.default
    return dataclasses.MISSING


def _build(cls: type[T], tree: Mapping[str, Any], key: str = "") -> T:
    """Build dataclass `cls` from a nested mapping; missing keys keep the defaults.

    A class with a `resolve_tree(tree)` classmethod rewrites its untyped mapping first
    (`DataConfig`: the section's keys become defaults of each of its `sources`).
    """
    resolve = getattr(cls, "resolve_tree", None)
    if callable(resolve):
        tree = resolve(tree)
    types_by_name = _field_types(cls)
    kwargs = {}
    for name, value in tree.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in types_by_name:
            raise _unknown_key(full, str(name), types_by_name)
        tp = types_by_name[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            # a partial section starts from this field's default (e.g. the perceptual ramp), not the class's
            default = _field_default(cls, name)
            if dataclasses.is_dataclass(default):
                value = deep_merge(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(value, tp, full)
    return cls(**kwargs)


def from_dict(tree: Mapping[str, Any], cls: type[T] = ExperimentConfig) -> T:  # type: ignore[assignment]
    """Nested mapping -> validated config of type `cls`; unknown keys, wrong types, bad values raise."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"a config must be a mapping of keys, got {type(tree).__name__}")
    check_tree(tree, "config")
    config = _build(cls, tree)
    config.validate()  # type: ignore[attr-defined]
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Config dataclass -> nested plain dict (lists, str, int, float, bool, None) for YAML."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------- files and merging


def _check_keys(tree: Mapping[str, Any], cls: type, key: str, source: str) -> None:
    """Raise for keys in `tree` that `cls` does not have, naming the dotted key and the source."""
    types_by_name = _field_types(cls)
    for name, value in tree.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in types_by_name:
            error = _unknown_key(full, str(name), types_by_name)
            raise ConfigError(f"{source}: {error}")
        tp = types_by_name[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            _check_keys(value, tp, full, source)


def deep_merge(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """Merge two nested mappings; `above` wins, mappings merge recursively, lists are replaced."""
    merged = dict(below)
    for name, value in above.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror or error})") from None
    tree = load_yaml(read_config_text(data, str(path)), str(path))
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(tree).__name__}")
    return tree


def load_tree(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged, still untyped mapping of a config file and its `base:` fragments."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"config base cycle: {chain}")
    tree = _read_yaml(path)
    bases = tree.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a path or a list of paths, got {preview(bases)}")
    _check_keys(tree, ExperimentConfig, "", str(path))
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_tree(path.parent / base, (*_stack, path)))
    return deep_merge(merged, tree)


def _override_type(dotted: str, source: str) -> Any:
    """Annotation of the field a dotted key names; unknown segments raise naming the key."""
    cls: Any = ExperimentConfig
    tp: Any = None
    parts = dotted.split(".")
    for depth, name in enumerate(parts):
        full = ".".join(parts[: depth + 1])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{source}: config key '{full}' does not exist ('{'.'.join(parts[:depth])}' "
                              f"is {_describe(tp)}, not a section)")
        types_by_name = _field_types(cls)
        if name not in types_by_name:
            raise ConfigError(f"{source}: {_unknown_key(full, name, types_by_name)}")
        tp = types_by_name[name]
        cls = tp
    return tp


def _accepts_str(tp: Any) -> bool:
    """True when the annotation allows text (str, or a Literal of strings)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts_str(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return any(isinstance(choice, str) for choice in typing.get_args(tp))
    return tp is str


def _accepts_non_str_scalar(tp: Any) -> bool:
    """True when the annotation allows int, float or bool (so a parsed number must stay one)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts_non_str_scalar(arg) for arg in typing.get_args(tp))
    return tp in (int, float, bool)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=2e-4' -> ('train.lr', value); the value is parsed with yaml.safe_load, then typed.

    A key whose field holds text keeps the literal text when YAML would read a number or a
    boolean (`output_dir=2024`, `data.noise_camera=no` stay strings); the full key is checked
    against the schema here so a typo fails before anything is merged.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    source = f"override {preview(text)}"
    if not sep or not key:
        raise ConfigError(f"{source}: expected key=value with a dotted key, e.g. train.iterations=100")
    tp = _override_type(key, source)
    try:
        value = load_yaml(raw, source) if raw.strip() else None
    except ConfigError:
        if not _accepts_str(tp) or len(raw) > 4096:
            raise
        value = raw
    if isinstance(value, (bool, int, float)) and _accepts_str(tp) and not _accepts_non_str_scalar(tp):
        value = raw.strip()
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        _check_keys(value, tp, key, source)
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of `tree` with the dotted key set (merging when both sides are mappings)."""
    head, _, rest = key.partition(".")
    updated = dict(tree)
    if rest:
        child = updated.get(head)
        updated[head] = _set_dotted(dict(child) if isinstance(child, Mapping) else {}, rest, value)
    elif isinstance(value, Mapping) and isinstance(updated.get(head), Mapping):
        updated[head] = deep_merge(updated[head], value)
    else:
        updated[head] = value
    return updated


def apply_overrides(tree: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `key=value` strings in order to an untyped config mapping."""
    updated = dict(tree)
    for text in overrides:
        key, value = parse_override(text)
        updated = _set_dotted(updated, key, value)
    return updated


def _train_value(tree: Mapping[str, Any], name: str) -> Any:
    section = tree.get("train")
    if isinstance(section, Mapping) and name in section:
        return section[name]
    return _field_default(TrainConfig, name)


def _scaled(value: int, scale: float, lowest: int) -> int:
    return max(lowest, int(round(value * scale)))


def fit_schedule(file_tree: Mapping[str, Any], tree: Mapping[str, Any], overridden: Iterable[str] = (),
                 report: Any = print) -> dict[str, Any]:
    """Scale the schedule counts of a run shortened by an override, so a smoke test needs one key.

    When `train.iterations` in `tree` is below the file's and warmup_iters, a step milestone,
    val_every or ckpt_every no longer fits in the run, every one of those four that was not
    overridden itself is multiplied by iterations / the file's iterations (rounded; warm-up
    below the run, milestones inside it, cadences >= 1 unless 0) and one line says so.
    Anything else (wrong types, a short run written in the file) is left for validation.
    """
    tree = dict(tree)
    short, full = _train_value(tree, "iterations"), _train_value(file_tree, "iterations")
    names = ("warmup_iters", "step_milestones", "val_every", "ckpt_every")
    values = {name: _train_value(tree, name) for name in names}
    if not (type(short) is int and type(full) is int and 1 <= short < full):
        return tree
    if not all(type(v) is int for k, v in values.items() if k != "step_milestones") or not (
            isinstance(values["step_milestones"], list) and all(type(m) is int for m in values["step_milestones"])):
        return tree
    fits = (values["warmup_iters"] < short and all(m < short for m in values["step_milestones"])
            and values["val_every"] <= short and values["ckpt_every"] <= short)
    if fits:
        return tree
    scale = short / full
    changed = []
    train = dict(tree.get("train") or {})
    for name in names:
        if f"train.{name}" in overridden:
            continue
        old = values[name]
        if name == "warmup_iters":
            new: Any = min(_scaled(old, scale, 0), short - 1)
        elif name == "step_milestones":
            new = sorted({min(max(_scaled(m, scale, 1), 1), short - 1) for m in old if short > 1})
        else:
            new = 0 if old == 0 else _scaled(old, scale, 1)
        if new != old:
            train[name] = new
            changed.append(f"{name} {preview(old)} -> {preview(new)}")
    tree["train"] = train
    if changed:
        report(f"config: train.iterations={short} shortens the run from {full}; scaled by {short}/{full}: "
               + ", ".join(changed))
    return tree


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (with its `base:` fragments), apply overrides, type-check, validate.

    A run shortened by an override of train.iterations gets its schedule counts scaled (`fit_schedule`).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    overrides = list(overrides)
    file_tree = load_tree(path)
    tree = apply_overrides(file_tree, overrides)
    overridden = {text.partition("=")[0].strip() for text in overrides}
    tree = fit_schedule(file_tree, tree, overridden)
    return from_dict(tree, ExperimentConfig)


def save_resolved(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (no `base:`) that load_config reads back equal."""
    from isp.safeio import write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved experiment config, written by rawrestore; load it with load_config.\n"
    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
    write_bytes(path, (header + text).encode("utf-8"), what="config")
    return path


__all__ = [
    "load_config", "load_tree", "apply_overrides", "parse_override", "deep_merge", "from_dict", "to_dict",
    "save_resolved", "fit_schedule",
]
