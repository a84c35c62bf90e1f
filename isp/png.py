"""PNG writing for 8- and 16-bit RGB (Pillow cannot write 16-bit RGB), atomically."""
from __future__ import annotations

import os
import struct
import zlib
from typing import Iterable

import numpy as np

from .errors import InputError
from .safeio import write_bytes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# sRGB chunk (rendering intent 0, perceptual) with the gAMA and cHRM values the PNG spec pairs with it.
_SRGB_CHUNKS = (
    (b"sRGB", b"\x00"),
    (b"gAMA", struct.pack(">I", 45455)),
    (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)),
)


def encode_png(image: np.ndarray, srgb: bool = True) -> bytes:
    """(H,W,3) or (H,W) uint8/uint16 -> PNG bytes (no filtering, zlib level 6), tagged sRGB unless `srgb=False`."""
    if image.dtype not in (np.uint8, np.uint16) or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise InputError(f"PNG needs (H,W) or (H,W,3) uint8/uint16, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    depth = 8 if image.dtype == np.uint8 else 16
    colour_type = 2 if image.ndim == 3 else 0
    rows = np.ascontiguousarray(image.astype(">u2") if depth == 16 else image).reshape(height, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    tags = b"".join(_chunk(kind, data) for kind, data in _SRGB_CHUNKS) if srgb else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + tags + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def to_uint(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Float image in [0,1] -> uint8 or uint16 (rounded)."""
    if bits not in (8, 16):
        raise InputError(f"bits must be 8 or 16, got {bits}")
    scale = 255 if bits == 8 else 65535
    return np.round(np.clip(rgb, 0, 1) * scale).astype(np.uint8 if bits == 8 else np.uint16)


def write_png(path: str | os.PathLike, image: np.ndarray, bits: int | None = None,
              inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write a PNG atomically to a new path or a regular file that is none of `inputs`. Float input needs `bits`."""
    if image.dtype.kind == "f":
        image = to_uint(image, bits or 8)
    data = encode_png(image)
    write_bytes(path, data, inputs=inputs)
