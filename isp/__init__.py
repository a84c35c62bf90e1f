"""isp: a differentiable camera ISP in PyTorch that renders like LibRaw, plus RAW I/O.

Standalone: imports torch, numpy, rawpy, pidng, tifffile and Pillow, nothing of `rawrestore`.
Names are imported on first use (PEP 562), so `isp info` and file reading start without torch.
"""
from __future__ import annotations

import importlib

from .errors import InputError, RawReadError

# public name -> the submodule that defines it
_EXPORTS = {
    "CameraMeta": "meta", "ISP": "pipeline", "RawFile": "rawfile", "open_raw": "rawfile", "read_raw": "io",
    "render": "pipeline", "render_file": "pipeline", "resolve_device": "pipeline", "select_wb": "pipeline",
    "write_dng": "io", "write_image": "outputs",
}
_SUBMODULES = ("cfa", "cli", "color", "develop", "errors", "fast", "geometry", "io", "meta", "ops", "outputs", "pipeline",
               "png", "rawfile", "safeio")

__all__ = ["InputError", "RawReadError", "cfa", "color", "ops", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'isp' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
