"""Bounds on untrusted config data: YAML text, the trees it expands to, and values shown in messages.

A few hundred bytes of YAML can name one anchor a billion times (an "alias bomb") or nest 3000
levels deep; a pickled config in a checkpoint can share one list the same way. Nothing here ever
walks, copies or prints more than `MAX_NODES` values or `MAX_DEPTH` levels of such a tree:
`load_yaml` refuses the text while composing it, `check_tree` refuses an expanded tree while
counting it, and `preview` turns any value into at most `PREVIEW_CHARS` characters.
"""
from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

import yaml

from rawrestore.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file; the shipped ones are under 3 kB
MAX_DEPTH = 32  # nesting of mappings and lists; a config uses 3
MAX_NODES = 20_000  # values of a tree once every alias is expanded; a resolved config has about 200
PREVIEW_CHARS = 80

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 40
_REPR.maxother = 40
_REPR.maxlong = 40
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 6)


def preview(value: Any) -> str:
    """repr(value) cut to a short preview (at most PREVIEW_CHARS), at a cost bounded whatever the value."""
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 3] + "..."


def check_tree(tree: Any, source: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Raise ConfigError when `tree` (mappings, lists, scalars) expands past max_nodes values or max_depth levels.

    Shared references (YAML aliases, pickle memo) count once per place they appear, as any later
    walk would see them; a cyclic tree therefore always fails. Cost: at most max_nodes steps.
    """
    stack: list[tuple[Any, int]] = [(tree, 1)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise ConfigError(f"{source}: expands to more than {max_nodes} values (YAML aliases or shared "
                              "references repeated?); a config holds a few hundred: write it out plainly")
        if isinstance(value, Mapping):
            children = list(value.keys()) + list(value.values())
        elif isinstance(value, (list, tuple)):
            children = list(value)
        else:
            continue
        if depth >= max_depth and children:
            raise ConfigError(f"{source}: nested deeper than {max_depth} levels; a config needs 3 or 4")
        if len(children) > max_nodes:
            raise ConfigError(f"{source}: holds a mapping or list of {len(children)} entries; a config holds a few hundred")
        stack.extend((child, depth + 1) for child in children)


class _TooDeep(Exception):
    """Raised inside the composer; turned into a ConfigError naming the source."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that stops composing past MAX_DEPTH levels (before Python's recursion limit)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 (yaml's hook)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooDeep(f"line {mark.line + 1}" if mark is not None else "")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with the bounds above. -> the value; ConfigError naming `source` for bad or hostile text."""
    loader = _BoundedLoader(text)
    try:
        value = loader.get_single_data()
    except _TooDeep as where:
        raise ConfigError(f"{source}:{' ' + str(where) if str(where) else ''} nested deeper than {MAX_DEPTH} levels; "
                          "a config needs 3 or 4") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}:{where} is not valid YAML ({str(problem)[:2 * PREVIEW_CHARS]})") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer past Python's digit limit
        raise ConfigError(f"{source}: a value cannot be read ({type(error).__name__}: {preview(str(error))})") from None
    finally:
        loader.dispose()
    check_tree(value, source)
    return value


def read_config_text(data: bytes, source: str) -> str:
    """Bytes of a config file -> its text; ConfigError for oversized, binary or non-UTF-8 content."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(data)} bytes is not a config (at most {MAX_CONFIG_BYTES}); name the YAML file")
    if b"\x00" in data:
        raise ConfigError(f"{source}: a binary file, not a YAML config; name the .yaml file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                          "save the config as UTF-8") from None


__all__ = ["MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_NODES", "PREVIEW_CHARS", "preview", "check_tree", "load_yaml",
           "read_config_text"]
