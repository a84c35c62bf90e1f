"""Reading camera RAW files through LibRaw (rawpy) and writing DNGs (pidng)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InputError, RawReadError
from .meta import CameraMeta, validate_cfa
from .rawfile import XYZ_FROM_SRGB, cam_to_srgb_from_xyz, open_raw, rgb_wb
from .safeio import atomic_output

__all__ = ["XYZ_FROM_SRGB", "cam_to_srgb_from_xyz", "read_raw", "write_dng"]

_RATIONAL_DEN = 1_000_000  # DNG (S)RATIONAL denominator used when writing matrices and gains


def read_raw(path: str | os.PathLike) -> tuple[np.ndarray, CameraMeta]:
    """Read a colour-filter-array RAW (what training data needs). -> visible mosaic (H,W) uint16 in DN, CameraMeta.

    Black level is reported per CFA site (LibRaw gives it per colour index R,G,B,G2: mapped here
    through the per-site colour pattern). `wb_as_shot` is the white balance LibRaw's
    `use_camera_wb=True` applies: the camera's, or LibRaw's automatic one where the camera's is
    missing or invalid (`isp.rawfile.libraw_multipliers`). A full-colour or monochrome file, or one
    without a colour matrix, is refused with RawReadError naming the file and the reason.
    """
    raw = open_raw(path)
    if raw.layout != "cfa":
        kind = "already demosaiced (full-colour)" if raw.layout == "stack" else "monochrome"
        raise RawReadError(raw.path, f"{kind} image, not a colour-filter-array mosaic; `isp render` renders it, "
                                     "training data needs a Bayer or X-Trans RAW")
    if raw.cam_to_srgb is None:
        raise RawReadError(raw.path, "file has no colour matrix (neither ColorMatrix nor a known camera); "
                                     "`isp render` renders it in raw camera colour, training data needs one")
    as_shot, _ = rgb_wb(raw, "camera")
    daylight = raw.pre_mul[:3] / raw.pre_mul[1] if raw.pre_mul[1] > 0 and np.all(raw.pre_mul[:3] > 0) else np.ones(3)
    meta = CameraMeta(
        make=raw.make,
        model=raw.model,
        width=int(raw.data.shape[1]),
        height=int(raw.data.shape[0]),
        cfa=raw.cfa.tolist(),
        black_level=raw.black.tolist(),
        white_level=raw.white,
        wb_as_shot=as_shot,
        wb_daylight=[float(v) for v in daylight],
        cam_to_srgb=raw.cam_to_srgb.tolist(),
        exposure_time=raw.exposure_time,
        iso=raw.iso,
        fnumber=raw.fnumber,
    )
    return raw.data, meta


def _rationals(values, signed: bool) -> list[list[int]]:
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        num = int(round(v * _RATIONAL_DEN))
        if not signed and num < 0:
            raise InputError(f"DNG value {v} must not be negative")
        out.append([num, _RATIONAL_DEN])
    return out


def write_dng(path: str | os.PathLike, mosaic: np.ndarray, meta: CameraMeta,
              inputs: Iterable[str | os.PathLike] = ()) -> CameraMeta:
    """Write a mosaic (H,W) uint16 and its metadata as an uncompressed 16-bit DNG; returns the meta as read back.

    The matrix and gains are stored as rationals (1e-6 steps), so the returned meta is what
    `read_raw` gives for this file; the mosaic round-trips exactly. Written atomically, to a new path or a
    regular file that is none of `inputs` (`isp.safeio`).
    """
    from pidng.core import RAW2DNG
    from pidng.defs import CalibrationIlluminant, Orientation, PhotometricInterpretation
    from pidng.dng import DNGTags, Tag, Type

    path = Path(path)
    mosaic = np.asarray(mosaic)
    if mosaic.ndim != 2 or mosaic.dtype != np.uint16:
        raise InputError(f"write_dng needs a 2-D uint16 mosaic, got {mosaic.dtype} {mosaic.shape}")
    if min(mosaic.shape) < 22:
        raise InputError(f"mosaic {mosaic.shape} is too small: LibRaw reads no RAW under 22 pixels a side")
    cfa = validate_cfa(np.asarray(meta.cfa), "write_dng")
    period = cfa.shape[0]
    if mosaic.shape[0] % period or mosaic.shape[1] % period:
        raise InputError(f"mosaic {mosaic.shape} is not a whole number of {period}x{period} CFA periods")
    black = np.asarray(meta.black_level, dtype=np.float64)
    if black.shape != (period, period):
        raise InputError(f"black_level must be per CFA site ({period}x{period}), got {black.shape}")
    cam_to_srgb = np.asarray(meta.cam_to_srgb, dtype=np.float64)
    if cam_to_srgb.shape != (3, 3) or not np.allclose(cam_to_srgb.sum(axis=1), 1.0, atol=1e-6):
        raise InputError("cam_to_srgb must be 3x3 with rows summing to 1 (LibRaw's convention)")
    cam_rgb = np.linalg.inv(cam_to_srgb)
    cam_rgb = cam_rgb / cam_rgb.sum(axis=1, keepdims=True)
    daylight = np.asarray(meta.wb_daylight, dtype=np.float64)
    # LibRaw recovers daylight multipliers as 1 / row sums of cam_xyz @ xyz_rgb: encode them there.
    cam_xyz = np.diag(1.0 / daylight) @ cam_rgb @ np.linalg.inv(XYZ_FROM_SRGB)
    neutral = 1.0 / np.asarray(meta.wb_as_shot, dtype=np.float64)

    height, width = mosaic.shape
    tags = DNGTags()
    tags.set(Tag.ImageWidth, width)
    tags.set(Tag.ImageLength, height)
    tags.set(Tag.TileWidth, width)
    tags.set(Tag.TileLength, height)
    tags.set(Tag.Orientation, Orientation.Horizontal)
    tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    tags.set(Tag.SamplesPerPixel, 1)
    tags.set(Tag.BitsPerSample, 16)
    tags.set(Tag.CFARepeatPatternDim, [period, period])
    tags.set(Tag.CFAPattern, [int(v) for v in cfa.ravel()])
    tags.set(Tag.CFAPlaneColor, [0, 1, 2])
    tags.set(Tag.CFALayout, 1)
    tags.set(Tag.BlackLevelRepeatDim, [period, period])
    tags.set(Tag.BlackLevel, [int(round(v)) for v in black.ravel()])
    tags.set(Tag.WhiteLevel, int(round(meta.white_level)))
    tags.set(Tag.ColorMatrix1, _rationals(cam_xyz, signed=True))
    tags.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    tags.set(Tag.AsShotNeutral, _rationals(neutral, signed=False))
    tags.set(Tag.Make, meta.make or "rawrestore")
    tags.set(Tag.Model, meta.model or "synthetic")
    tags.set(Tag.UniqueCameraModel, f"{meta.make} {meta.model}".strip() or "rawrestore synthetic")
    if meta.exposure_time:
        tags.set(Tag.ExposureTime, _rationals([meta.exposure_time], signed=False))
    if meta.fnumber:
        tags.set(Tag.FNumber, _rationals([meta.fnumber], signed=False))
    if meta.iso:
        tags.set((34855, Type.Short), [int(round(meta.iso))])  # EXIF ISOSpeedRatings

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, inputs=inputs, suffix=".dng") as tmp:
        writer = RAW2DNG()
        writer.options(tags, path=str(path.parent), compress=False)
        writer.convert(np.ascontiguousarray(mosaic), filename=tmp.name)
    return read_raw(path)[1]
