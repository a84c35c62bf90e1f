"""Reading camera RAW files through LibRaw (rawpy) and writing DNGs (pidng)."""
from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import InputError, RawReadError
from .meta import CameraMeta, validate_cfa
from .safeio import atomic_output

# Linear sRGB (D65) -> XYZ, the constant LibRaw uses to derive cam_to_srgb from cam_xyz.
XYZ_FROM_SRGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RATIONAL_DEN = 1_000_000  # DNG (S)RATIONAL denominator used when writing matrices and gains


def cam_to_srgb_from_xyz(cam_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LibRaw's cam_xyz_coeff. cam_xyz (3,3) XYZ->camera -> (cam_to_srgb (3,3), daylight wb (3,), g=1)."""
    cam_rgb = cam_xyz @ XYZ_FROM_SRGB
    row_sums = cam_rgb.sum(axis=1, keepdims=True)
    if np.any(np.abs(row_sums) < 1e-12):
        raise InputError("colour matrix has a row that sums to zero; cannot derive cam_to_srgb")
    cam_rgb = cam_rgb / row_sums
    daylight = (1.0 / row_sums[:, 0]) / (1.0 / row_sums[1, 0])
    return np.linalg.inv(cam_rgb), daylight


def _normalised_wb(mul, source: str) -> list[float]:
    mul = np.asarray(mul[:3], dtype=np.float64)
    if not np.all(np.isfinite(mul)) or mul[1] <= 0 or np.any(mul <= 0):
        return [1.0, 1.0, 1.0]
    return [float(v) for v in mul / mul[1]]


def _tiff_make_model(head: bytes) -> tuple[str, str]:
    """Make and Model from the first IFD of a TIFF-based RAW (DNG, ARW, NEF, CR2...) or a RAF header."""
    if head.startswith(b"FUJIFILM"):
        model = head[28:60].split(b"\0", 1)[0].decode("ascii", "replace").strip()
        return "Fujifilm", model
    if head[:2] not in (b"II", b"MM"):
        return "", ""
    end = "<" if head[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", head[4:8])
        (count,) = struct.unpack(end + "H", head[ifd : ifd + 2])
        found: dict[int, str] = {}
        for i in range(count):
            entry = head[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(end + "HHI", entry[:8])
            if tag in (271, 272) and typ == 2:
                data = entry[8:12] if n <= 4 else head[struct.unpack(end + "I", entry[8:12])[0]:][:n]
                found[tag] = data.split(b"\0", 1)[0].decode("ascii", "replace").strip()
        return found.get(271, ""), found.get(272, "")
    except (struct.error, IndexError):
        return "", ""


def _round_exif(value: float) -> float | None:
    value = float(value)
    return float(f"{value:.6g}") if value > 0 and np.isfinite(value) else None


_stderr_lock = threading.Lock()
_stderr_users = 0
_stderr_saved = -1


@contextlib.contextmanager
def _libraw_stderr_silenced() -> Iterator[None]:
    """Point fd 2 at the null device while LibRaw runs (reference-counted across threads).

    LibRaw prints "<file>: Unexpected end of file" to the C stderr itself for a truncated file;
    the RawReadError raised afterwards already says that in the one line a CLI prints.
    """
    global _stderr_users, _stderr_saved
    with _stderr_lock:
        if _stderr_users == 0:
            try:
                sys.stderr.flush()
            except (AttributeError, OSError, ValueError):
                pass
            null = -1
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                _stderr_saved = os.dup(2)
                os.dup2(null, 2)
            except OSError:  # no fd 2 (a daemon) or no null device: leave stderr alone
                if _stderr_saved >= 0:
                    os.close(_stderr_saved)
                _stderr_saved = -1
            finally:
                if null >= 0:
                    os.close(null)
        _stderr_users += 1
    try:
        yield
    finally:
        with _stderr_lock:
            _stderr_users -= 1
            if _stderr_users == 0 and _stderr_saved >= 0:
                os.dup2(_stderr_saved, 2)
                os.close(_stderr_saved)
                _stderr_saved = -1


def read_raw(path: str | os.PathLike) -> tuple[np.ndarray, CameraMeta]:
    """Read a camera RAW. -> visible mosaic (H,W) uint16 in DN, CameraMeta.

    Black level is reported per CFA site (LibRaw gives it per colour index R,G,B,G2: mapped here
    through the per-site colour pattern). Raises RawReadError naming the file and the reason.
    """
    import rawpy

    path = Path(path)
    if not path.is_file():
        raise RawReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise RawReadError(path, "file is empty")
    try:
        with _libraw_stderr_silenced(), rawpy.imread(str(path)) as raw:
            return _extract(raw, path)
    except RawReadError:
        raise
    except rawpy.LibRawFileUnsupportedError:
        raise RawReadError(path, "not a RAW file LibRaw can read (unsupported format or camera)") from None
    except (rawpy.LibRawIOError, rawpy.LibRawDataError, rawpy.LibRawTooBigError) as exc:
        raise RawReadError(path, f"truncated or corrupt RAW data ({type(exc).__name__})") from None
    except rawpy.LibRawError as exc:
        raise RawReadError(path, f"LibRaw could not decode it ({type(exc).__name__}: {exc})") from None
    except (MemoryError, OverflowError, ValueError) as exc:
        raise RawReadError(path, f"corrupt RAW metadata ({type(exc).__name__})") from None


def _extract(raw, path: Path) -> tuple[np.ndarray, CameraMeta]:
    pattern = raw.raw_pattern
    if pattern is None or raw.raw_image is None or np.ndim(raw.raw_image) != 2:
        raise RawReadError(path, "not a colour-filter-array RAW (monochrome, Foveon or an already demosaiced linear DNG)")
    desc = raw.color_desc.decode("ascii", "replace")
    if raw.num_colors != 3 or not set(desc) <= set("RGB"):
        raise RawReadError(path, f"unsupported sensor colours '{desc}' (only R, G, B CFAs are supported)")
    mosaic = np.array(raw.raw_image_visible, dtype=np.uint16, copy=True)  # LibRaw frees its buffer on close
    period = pattern.shape[0]
    if pattern.shape != (period, period) or period not in (2, 6):
        raise RawReadError(path, f"CFA period {pattern.shape} is neither Bayer (2x2) nor X-Trans (6x6)")
    if mosaic.shape[0] < period or mosaic.shape[1] < period:
        raise RawReadError(path, f"image {mosaic.shape} is smaller than one CFA period")
    colour_index = np.asarray(raw.raw_colors_visible[:period, :period], dtype=np.int64)
    letters = np.array([ord(c) for c in desc])
    cfa_letters = letters[colour_index]
    cfa = np.select([cfa_letters == ord("R"), cfa_letters == ord("G"), cfa_letters == ord("B")], [0, 1, 2], -1)
    try:
        cfa = validate_cfa(cfa, str(path))
    except InputError as exc:
        raise RawReadError(path, str(exc).split(": ", 1)[-1]) from None
    black_per_colour = np.asarray(raw.black_level_per_channel, dtype=np.float64)
    black = black_per_colour[colour_index]
    white = float(raw.white_level)
    if not white > black.max():
        raise RawReadError(path, f"white level {white} is not above the black level {black.max()}")
    cam_to_srgb = np.asarray(raw.color_matrix, dtype=np.float64)[:3, :3]
    daylight = _normalised_wb(raw.daylight_whitebalance, "daylight")
    if not np.any(cam_to_srgb):
        cam_xyz = np.asarray(raw.rgb_xyz_matrix, dtype=np.float64)[:3, :3]
        if not np.any(cam_xyz):
            raise RawReadError(path, "file has no colour matrix (neither ColorMatrix nor a known camera)")
        cam_to_srgb, daylight_arr = cam_to_srgb_from_xyz(cam_xyz)
        daylight = [float(v) for v in daylight_arr]
    as_shot = _normalised_wb(raw.camera_whitebalance, "as shot")
    if as_shot == [1.0, 1.0, 1.0] and not np.all(np.asarray(raw.camera_whitebalance[:3]) > 0):
        as_shot = list(daylight)
    with open(path, "rb") as fh:
        make, model = _tiff_make_model(fh.read(1 << 16))
    other = raw.other
    meta = CameraMeta(
        make=make,
        model=model,
        width=int(mosaic.shape[1]),
        height=int(mosaic.shape[0]),
        cfa=cfa.tolist(),
        black_level=black.tolist(),
        white_level=white,
        wb_as_shot=as_shot,
        wb_daylight=list(daylight),
        cam_to_srgb=cam_to_srgb.tolist(),
        exposure_time=_round_exif(other.shutter_speed),
        iso=_round_exif(other.iso_speed),
        fnumber=_round_exif(other.aperture),
    )
    return mosaic, meta


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
