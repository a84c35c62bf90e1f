"""isp: a differentiable camera ISP in PyTorch that renders like LibRaw, plus RAW I/O.

Standalone: imports torch, numpy, rawpy, pidng, tifffile and Pillow, nothing of `rawrestore`.
"""
from . import cfa, color, ops
from .errors import InputError, RawReadError
from .io import read_raw, write_dng
from .meta import CameraMeta
from .outputs import write_image
from .pipeline import ISP, render, render_file, resolve_device, select_wb
from .rawfile import RawFile, open_raw

__all__ = [
    "CameraMeta", "ISP", "InputError", "RawFile", "RawReadError", "cfa", "color", "open_raw", "ops", "read_raw", "render",
    "render_file", "resolve_device", "select_wb", "write_dng", "write_image",
]
