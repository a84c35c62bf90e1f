"""Opening camera files as LibRaw sees them: layout, levels, multipliers, matrix, orientation, make/model.

`open_raw` reads any file rawpy renders: a colour-filter-array mosaic (Bayer, X-Trans), a
full-colour image (LibRaw's `RawType.Stack`: linear DNG, scanners, some compacts) or a monochrome
sensor. `libraw_multipliers` chooses white balance multipliers the way LibRaw's `scale_colors`
does, including its automatic white balance. `isp.io.read_raw` (the training data's reader) keeps
refusing everything but CFA mosaics.
"""
from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError, RawReadError

# Linear sRGB (D65) -> XYZ, the constant LibRaw uses to derive cam_to_srgb from cam_xyz.
XYZ_FROM_SRGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
LAYOUTS = ("cfa", "stack", "mono")
AUTO_WB_BLOCK = 8  # LibRaw's automatic white balance sums 8x8 blocks ...
AUTO_WB_MARGIN = 25  # ... and skips a block with any value above maximum - 25
_MIN_MULTIPLIER = 0.00001  # LibRaw treats camera multipliers at or below this as absent


def cam_to_srgb_from_xyz(cam_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LibRaw's cam_xyz_coeff. cam_xyz (3,3) XYZ->camera -> (cam_to_srgb (3,3), daylight wb (3,), g=1)."""
    cam_rgb = cam_xyz @ XYZ_FROM_SRGB
    row_sums = cam_rgb.sum(axis=1, keepdims=True)
    if np.any(np.abs(row_sums) < 1e-12):
        raise InputError("colour matrix has a row that sums to zero; cannot derive cam_to_srgb")
    cam_rgb = cam_rgb / row_sums
    daylight = (1.0 / row_sums[:, 0]) / (1.0 / row_sums[1, 0])
    return np.linalg.inv(cam_rgb), daylight


@dataclass
class RawFile:
    """One camera file as LibRaw decodes it, in sensor orientation.

    layout 'cfa': data (H,W) uint16, `cfa` (P,P) colours 0=R 1=G 2=B, `colour_index` (P,P) LibRaw's
    colour numbers (3 = the second Bayer green, which LibRaw balances on its own), `black` (P,P) per site.
    layout 'stack': data (H,W,3) uint16, `black` (3,) per colour. layout 'mono': data (H,W), `black` (1,).
    `cam_mul` / `pre_mul` are LibRaw's as-shot and daylight multipliers (R, G, B, G2; zeros = absent).
    `cam_to_srgb` None means the file has no colour matrix: LibRaw then outputs raw camera colour.
    `flip` is LibRaw's orientation code (bit 4 transpose, 2 vertical, 1 horizontal), as rawpy's user_flip.
    """

    path: Path
    layout: str
    data: np.ndarray
    black: np.ndarray
    white: float
    cam_mul: np.ndarray
    pre_mul: np.ndarray
    cam_to_srgb: np.ndarray | None
    matrix_source: str
    flip: int
    make: str
    model: str
    cfa: np.ndarray | None = None
    colour_index: np.ndarray | None = None
    unique_model: str = ""
    exposure_time: float | None = None
    iso: float | None = None
    fnumber: float | None = None
    black_floor: float = 0.0  # the black common to all channels, which LibRaw takes off its maximum
    pixel_aspect: float = 1.0  # pixel width / height; LibRaw stretches the output to square pixels

    @property
    def maximum(self) -> float:
        """LibRaw's range after black subtraction: white minus the common black."""
        return self.white - self.black_floor

    def black_subtracted(self) -> np.ndarray:
        """data minus black, clipped at 0, int32: what LibRaw holds after subtract_black."""
        data = self.data.astype(np.int32)
        if self.layout == "cfa":
            period = self.black.shape[0]
            h, w = data.shape
            black = np.tile(self.black, (-(-h // period), -(-w // period)))[:h, :w]
        else:
            black = self.black
        return np.maximum(data - np.rint(black).astype(np.int32), 0)


def _round_exif(value: float) -> float | None:
    value = float(value)
    return float(f"{value:.6g}") if value > 0 and np.isfinite(value) else None


_stderr_lock = threading.Lock()
_stderr_users = 0
_stderr_saved = -1


@contextlib.contextmanager
def libraw_stderr_silenced() -> Iterator[None]:
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


def open_raw(path: str | os.PathLike) -> RawFile:
    """Decode a camera file with LibRaw (rawpy). -> RawFile; RawReadError naming the file and the reason."""
    import rawpy

    path = Path(path)
    if not path.is_file():
        raise RawReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise RawReadError(path, "file is empty")
    try:
        with libraw_stderr_silenced(), rawpy.imread(str(path)) as raw:
            found = _extract(raw, path)
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
    found.make, found.model, found.unique_model = read_make_model(path)
    return found


def _extract(raw, path: Path) -> RawFile:
    import rawpy

    desc = raw.color_desc.decode("ascii", "replace")
    colours = int(raw.num_colors)
    image = raw.raw_image_visible if raw.raw_image is not None else None
    if image is None:
        raise RawReadError(path, "LibRaw found no image data in it")
    per_channel = np.asarray(raw.black_level_per_channel, dtype=np.float64)
    white = float(raw.white_level)
    cfa = colour_index = None
    if colours == 1 and image.ndim == 2:
        layout, data, black = "mono", np.array(image, dtype=np.uint16, copy=True), per_channel[:1]
    elif raw.raw_type == rawpy.RawType.Stack or image.ndim == 3:
        if colours != 3 or image.ndim != 3 or image.shape[2] < 3 or desc[:3] != "RGB":
            raise RawReadError(path, f"full-colour image with {colours} colours '{desc}' (only R, G, B are supported)")
        layout, data, black = "stack", np.array(image[..., :3], dtype=np.uint16, copy=True), per_channel[:3]
    else:
        layout = "cfa"
        data = np.array(image, dtype=np.uint16, copy=True)  # LibRaw frees its buffer on close
        cfa, colour_index, black = _cfa_geometry(raw, desc, colours, data.shape, path)
    if layout != "cfa" and min(data.shape[:2]) < 1:
        raise RawReadError(path, f"image {data.shape} is empty")
    if not white > black.max():
        raise RawReadError(path, f"white level {white} is not above the black level {black.max()}")
    cam_to_srgb = np.asarray(raw.color_matrix, dtype=np.float64)[:3, :3]
    pre_mul = np.asarray(raw.daylight_whitebalance, dtype=np.float64)[:4].copy()
    matrix_source = "file (LibRaw's rgb_cam)"
    if layout == "mono":
        cam_to_srgb, matrix_source = None, "none: monochrome"
    elif not np.any(cam_to_srgb):
        cam_xyz = np.asarray(raw.rgb_xyz_matrix, dtype=np.float64)[:3, :3]
        if np.any(cam_xyz):
            cam_to_srgb, daylight = cam_to_srgb_from_xyz(cam_xyz)
            pre_mul[:3] = daylight
            matrix_source = "camera table (rgb_xyz_matrix)"
        else:
            cam_to_srgb, matrix_source = None, "none: raw camera colour, as LibRaw"
    other = raw.other
    return RawFile(
        path=path, layout=layout, data=data, black=black, white=white,
        cam_mul=np.asarray(raw.camera_whitebalance, dtype=np.float64)[:4].copy(), pre_mul=pre_mul,
        cam_to_srgb=cam_to_srgb, matrix_source=matrix_source, flip=int(raw.sizes.flip) & 7, make="", model="",
        cfa=cfa, colour_index=colour_index, pixel_aspect=float(raw.sizes.pixel_aspect), black_floor=float(black.min() if layout == "cfa" else per_channel[:4].min()),
        exposure_time=_round_exif(other.shutter_speed),
        iso=_round_exif(other.iso_speed), fnumber=_round_exif(other.aperture),
    )


def _cfa_geometry(raw, desc: str, colours: int, shape, path: Path):
    """-> cfa (P,P) RGB colours, LibRaw colour index (P,P), black per site (P,P)."""
    from .meta import validate_cfa

    pattern = raw.raw_pattern
    if pattern is None:
        raise RawReadError(path, "no colour filter pattern")
    if colours != 3 or not set(desc) <= set("RGB"):
        raise RawReadError(path, f"unsupported sensor colours '{desc}' (only R, G, B CFAs are supported)")
    period = pattern.shape[0]
    if pattern.shape != (period, period) or period not in (2, 6):
        raise RawReadError(path, f"CFA period {pattern.shape} is neither Bayer (2x2) nor X-Trans (6x6)")
    if shape[0] < period or shape[1] < period:
        raise RawReadError(path, f"image {shape} is smaller than one CFA period")
    colour_index = np.asarray(raw.raw_colors_visible[:period, :period], dtype=np.int64)
    letters = np.array([ord(c) for c in desc])[colour_index]
    cfa = np.select([letters == ord("R"), letters == ord("G"), letters == ord("B")], [0, 1, 2], -1)
    try:
        cfa = validate_cfa(cfa, str(path))
    except InputError as exc:
        raise RawReadError(path, str(exc).split(": ", 1)[-1]) from None
    black = np.asarray(raw.black_level_per_channel, dtype=np.float64)[colour_index]
    return cfa, colour_index, black


# ---------------------------------------------------------------------------------------------
# White balance, as LibRaw's scale_colors chooses it.

WB_CHOICES = ("camera", "auto", "daylight", "none")


def libraw_auto_wb(raw: RawFile) -> np.ndarray:
    """LibRaw's automatic white balance (`use_auto_wb`). -> pre_mul (4,) per colour index (R, G, B, G2).

    The black-subtracted image is cut into 8x8 blocks from the top-left; a block holding any value
    above maximum - 25 is skipped (near white); per colour, multiplier = count / sum over the other
    blocks. A colour with nothing summed keeps its daylight multiplier, as in LibRaw.
    """
    values = raw.black_subtracted()
    height, width = values.shape[:2]
    hottest = values if values.ndim == 2 else values.max(axis=2)
    rows, cols = -(-height // AUTO_WB_BLOCK), -(-width // AUTO_WB_BLOCK)
    padded = np.zeros((rows * AUTO_WB_BLOCK, cols * AUTO_WB_BLOCK), dtype=np.int32)
    padded[:height, :width] = hottest
    skipped = padded.reshape(rows, AUTO_WB_BLOCK, cols, AUTO_WB_BLOCK).max(axis=(1, 3)) > int(raw.maximum) - AUTO_WB_MARGIN
    used = np.repeat(np.repeat(~skipped, AUTO_WB_BLOCK, axis=0), AUTO_WB_BLOCK, axis=1)[:height, :width]
    sums, counts = np.zeros(4), np.zeros(4)
    if raw.layout == "cfa":
        period = raw.colour_index.shape[0]
        for i in range(period):
            for j in range(period):
                colour, mask = raw.colour_index[i, j], used[i::period, j::period]
                sums[colour] += values[i::period, j::period][mask].sum(dtype=np.float64)
                counts[colour] += mask.sum()
    else:
        planes = values[..., None] if values.ndim == 2 else values
        counts[:] = used.sum()  # LibRaw's image has four channels; the unused ones hold zeros
        for colour in range(planes.shape[2]):
            sums[colour] = planes[..., colour][used].sum(dtype=np.float64)
    pre_mul = raw.pre_mul.copy()
    nonzero = sums > 0
    pre_mul[nonzero] = counts[nonzero] / sums[nonzero]
    return pre_mul


def _camera_usable(cam_mul: np.ndarray) -> str:
    """'ok', 'missing' (LibRaw falls back to auto) or 'invalid' (LibRaw keeps daylight)."""
    if not np.all(np.isfinite(cam_mul)) or cam_mul[0] <= _MIN_MULTIPLIER or cam_mul[1] < 0 or cam_mul[3] < 0:
        return "missing"
    return "ok" if cam_mul[2] > _MIN_MULTIPLIER else "invalid"


def libraw_multipliers(raw: RawFile, wb: str | tuple[float, float, float] = "camera") -> tuple[np.ndarray, str]:
    """White balance as LibRaw applies it. -> gains (4,) per colour index (R, G, B, G2), smallest 1, and their source.

    'camera' = use_camera_wb: the as-shot multipliers; when they are missing or the first is not
    positive, LibRaw's automatic white balance; when only blue is invalid, daylight (LibRaw's rules).
    'auto' = use_auto_wb. 'daylight' = LibRaw's pre_mul. 'none' = all 1. (r, g, b) = user_wb.
    """
    if isinstance(wb, str) and wb not in WB_CHOICES:
        wb = parse_wb(wb)
    if not isinstance(wb, str):
        multipliers, source = np.array([wb[0], wb[1], wb[2], wb[1]], dtype=np.float64), "user"
    elif wb == "none":
        multipliers, source = np.ones(4), "none"
    elif wb == "daylight":
        multipliers, source = raw.pre_mul.copy(), "daylight"
    elif wb == "auto":
        multipliers, source = libraw_auto_wb(raw), "auto"
    else:
        state = _camera_usable(raw.cam_mul)
        if state == "ok":
            multipliers, source = raw.cam_mul.copy(), "camera"
        elif state == "missing":
            multipliers, source = libraw_auto_wb(raw), "auto (camera white balance missing or invalid)"
        else:
            multipliers, source = raw.pre_mul.copy(), "daylight (camera blue multiplier invalid)"
    if multipliers[1] == 0:
        multipliers[1] = 1.0
    if multipliers[3] == 0:
        multipliers[3] = multipliers[1]
    if not np.all(np.isfinite(multipliers)) or np.any(multipliers <= 0):
        multipliers = np.ones(4)  # no usable daylight either (no matrix): LibRaw ends up with unit gains
    return multipliers / multipliers.min(), source


def parse_wb(text: str) -> tuple[float, float, float]:
    """'R,G,B' -> three positive multipliers; InputError otherwise."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise InputError(f"white balance '{text}' is not camera, auto, daylight, none or R,G,B")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"white balance multipliers must be three positive numbers, got {text}")
    return values[0], values[1], values[2]


def rgb_wb(raw: RawFile, wb: str | tuple[float, float, float] = "camera") -> tuple[list[float], str]:
    """The multipliers of `libraw_multipliers` as [r, g, b] with g = 1 (the second green dropped), and their source."""
    gains, source = libraw_multipliers(raw, wb)
    return [float(gains[0] / gains[1]), 1.0, float(gains[2] / gains[1])], source


# ---------------------------------------------------------------------------------------------
# Orientation

def apply_flip(image: np.ndarray, flip: int) -> np.ndarray:
    """Orient an (H,W,...) image as LibRaw's output with this flip code (rawpy's user_flip); a view, not a copy."""
    if flip & 2:
        image = image[::-1]
    if flip & 1:
        image = image[:, ::-1]
    if flip & 4:
        image = image.swapaxes(0, 1)
    return image


# ---------------------------------------------------------------------------------------------
# Make and model: LibRaw knows them but rawpy does not expose them, so they are read from the container.

_TIFF_MAKE, _TIFF_MODEL, _DNG_UNIQUE_MODEL = 271, 272, 50708
_CIFF_MAKE_MODEL = 0x080A
_MAX_HEAD = 1 << 20


def read_make_model(path: str | os.PathLike) -> tuple[str, str, str]:
    """(make, model, unique camera model) from a TIFF-based RAW (DNG, CR2, NEF, ARW, ORF, RW2...), RAF, CRW (CIFF), CR3 or MRW.

    A DNG without Make/Model tags (some cinema cameras write only UniqueCameraModel) gets its make
    from the first word of UniqueCameraModel and its model from the rest. Unknown containers give ''.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAX_HEAD)
            if head[6:14] == b"HEAPCCDR":
                size = fh.seek(0, os.SEEK_END)
                fh.seek(0)
                make, model = _ciff_make_model(fh.read(min(size, 64 << 20)))
                return make, model, ""
    except OSError:
        return "", "", ""
    if head.startswith(b"FUJIFILM"):
        return "Fujifilm", _ascii(head[28:60]), ""
    if head[4:12] == b"ftypcrx ":  # Canon CR3: the TIFF of box CMT1
        at = head.find(b"CMT1")
        head = head[at + 4 :] if at >= 0 else b""
    elif head[:4] == b"\0MRM":  # Minolta MRW: the TIFF of block TTW
        head = _mrw_tiff(head)
    tags = _tiff_ifd0_strings(head)
    make, model, unique = tags.get(_TIFF_MAKE, ""), tags.get(_TIFF_MODEL, ""), tags.get(_DNG_UNIQUE_MODEL, "")
    if unique and not (make or model):
        first, _, rest = unique.partition(" ")
        make, model = first, rest or unique
    return make, model, unique


def _mrw_tiff(head: bytes) -> bytes:
    """Minolta MRW: blocks (4-byte name, big-endian 4-byte length) after an 8-byte header; TTW holds a TIFF."""
    at, end = 8, 8 + int.from_bytes(head[4:8], "big")
    while at + 8 <= min(end, len(head)):
        name, size = head[at : at + 4], int.from_bytes(head[at + 4 : at + 8], "big")
        if name == b"\0TTW":
            return head[at + 8 : at + 8 + size]
        at += 8 + size
    return b""


def _ascii(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def _tiff_ifd0_strings(head: bytes) -> dict[int, str]:
    """ASCII tags Make, Model, UniqueCameraModel of the first IFD of TIFF data (any TIFF-like magic)."""
    if head[:2] not in (b"II", b"MM"):
        return {}
    end = "<" if head[:2] == b"II" else ">"
    found: dict[int, str] = {}
    try:
        (ifd,) = struct.unpack(end + "I", head[4:8])
        (count,) = struct.unpack(end + "H", head[ifd : ifd + 2])
        for i in range(min(count, 1000)):
            entry = head[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind, n = struct.unpack(end + "HHI", entry[:8])
            if tag in (_TIFF_MAKE, _TIFF_MODEL, _DNG_UNIQUE_MODEL) and kind in (1, 2):
                data = entry[8:12] if n <= 4 else head[struct.unpack(end + "I", entry[8:12])[0] :][:n]
                found[tag] = _ascii(data)
    except (struct.error, IndexError):
        pass
    return found


def _ciff_make_model(data: bytes) -> tuple[str, str]:
    """Canon CIFF (CRW): the heap after the header holds records; tag 0x080A is 'make\\0model\\0'."""
    if data[:2] != b"II":
        return "", ""
    try:
        (header,) = struct.unpack("<I", data[2:6])
        return _ciff_heap(data, header, len(data), depth=0) or ("", "")
    except (struct.error, IndexError):
        return "", ""


def _ciff_heap(data: bytes, start: int, end: int, depth: int) -> tuple[str, str] | None:
    if depth > 4 or end - start < 6 or end > len(data):
        return None
    (table,) = struct.unpack("<I", data[end - 4 : end])
    (count,) = struct.unpack("<H", data[start + table : start + table + 2])
    for i in range(min(count, 4096)):
        at = start + table + 2 + 10 * i
        kind, size, offset = struct.unpack("<HII", data[at : at + 10])
        if kind >> 8 in (0x28, 0x30):  # a sub-heap
            found = _ciff_heap(data, start + offset, start + offset + size, depth + 1)
            if found:
                return found
        elif kind == _CIFF_MAKE_MODEL:
            make, _, rest = data[start + offset : start + offset + size].partition(b"\0")
            return make.decode("ascii", "replace").strip(), _ascii(rest)
    return None
