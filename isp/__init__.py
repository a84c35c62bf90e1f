"""isp: a differentiable camera ISP in PyTorch that renders like LibRaw, plus RAW I/O.

Standalone: imports torch, numpy, rawpy and pidng, nothing of `rawrestore`.
"""
from . import cfa, color, ops
from .errors import InputError, RawReadError
from .io import read_raw, write_dng
from .meta import CameraMeta
from .pipeline import ISP, render, render_file, resolve_device, select_wb

__all__ = [
    "CameraMeta", "ISP", "InputError", "RawReadError", "cfa", "color", "ops", "read_raw", "render", "render_file",
    "resolve_device", "select_wb", "write_dng",
]
