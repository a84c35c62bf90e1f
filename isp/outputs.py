"""Image files a render writes: PNG (8/16-bit), TIFF (16-bit, tifffile), JPEG (8-bit), sRGB-tagged, and where they go.

The format follows the output's suffix. Every file goes through `isp.safeio` (new path or regular
file, never an input, atomically). `plan_outputs` decides all targets of a batch before any work
and refuses, in one line, collisions, inputs as outputs, non-regular files and unknown suffixes.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError
from .png import encode_png, to_uint
from .safeio import atomic_output, check_output, write_bytes

FORMATS = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg"}
EXTENSIONS = {"png": ".png", "tiff": ".tiff", "jpeg": ".jpg"}
DEFAULT_BITS = {"png": 8, "tiff": 16, "jpeg": 8}
ALLOWED_BITS = {"png": (8, 16), "tiff": (8, 16), "jpeg": (8,)}
JPEG_QUALITY = 95


def format_of(path: str | os.PathLike) -> str:
    """'png' | 'tiff' | 'jpeg' from the suffix; InputError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unknown output format '{suffix or '(no suffix)'}'; use .png, .tif/.tiff or .jpg/.jpeg")
    return FORMATS[suffix]


def check_bits(fmt: str, bits: int | None) -> int:
    bits = DEFAULT_BITS[fmt] if bits is None else bits
    if bits not in ALLOWED_BITS[fmt]:
        raise InputError(f"{fmt.upper()} is written with {' or '.join(map(str, ALLOWED_BITS[fmt]))} bits, not {bits}; "
                         "change --bits or the output suffix")
    return bits


@functools.lru_cache(maxsize=1)
def srgb_icc_profile() -> bytes:
    """A minimal sRGB ICC profile (littleCMS through Pillow), embedded in TIFF and JPEG outputs."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def write_image(path: str | os.PathLike, image: np.ndarray, bits: int | None = None,
                inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a float (H,W,3) sRGB or (H,W,1) grey image in [0,1], format from the suffix, tagged sRGB. -> path."""
    path = Path(path)
    fmt = format_of(path)
    bits = check_bits(fmt, bits)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise InputError(f"an output image is (H,W,3) or (H,W,1), got {image.shape}")
    pixels = to_uint(image, bits)
    grey = pixels.shape[2] == 1
    if grey:
        pixels = pixels[..., 0]
    inputs = list(inputs)
    if fmt == "png":
        return write_bytes(path, encode_png(pixels), inputs=inputs)
    with atomic_output(path, inputs=inputs) as tmp:
        if fmt == "tiff":
            import tifffile

            tifffile.imwrite(tmp, pixels, photometric="minisblack" if grey else "rgb",
                             iccprofile=None if grey else srgb_icc_profile())
        else:
            from PIL import Image

            extra = {} if grey else {"icc_profile": srgb_icc_profile()}
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=JPEG_QUALITY, **extra)
    return path


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def plan_outputs(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, fmt: str | None = None) -> list[Path]:
    """The file each input renders to; every check before any work, and nothing on disk changed when one fails.

    `output` names a file when it has an image suffix (.png .tif .tiff .jpg .jpeg; one input only),
    else a folder (existing, or without a suffix; created here once all checks pass), where each
    input becomes <stem><extension of fmt, default png>. Two inputs with one stem (a/IMG_1.ARW,
    b/IMG_1.RAF) are refused rather than renamed; so is a target that is an input, a folder, a
    device node, a FIFO or a symlink.
    """
    output = Path(output)
    if fmt is not None and fmt not in EXTENSIONS:
        raise InputError(f"unknown --format '{fmt}'; use one of {sorted(EXTENSIONS)}")
    if os.path.lexists(output) and not output.is_dir():
        check_output(output, inputs)  # an existing non-regular file or an input: says so, before the suffix
    is_folder = output.is_dir() or not output.suffix
    if not is_folder:
        file_format = format_of(output)
        if fmt is not None and fmt != file_format:
            raise InputError(f"-o {output} is a {file_format.upper()} file but --format {fmt} was given; drop one")
        if len(inputs) != 1:
            raise InputError(f"-o {output} names one file but {len(inputs)} inputs were given; name a folder instead")
        targets = [output]
    else:
        targets = [output / (Path(src).stem + EXTENSIONS[fmt or "png"]) for src in inputs]
    seen: dict[str, str] = {}
    for src, target in zip(inputs, targets):
        key = _key(target)
        if key in seen:
            raise InputError(f"{seen[key]} and {src} would both be written to {target}; "
                             "render them into different folders or rename one")
        seen[key] = str(src)
        check_output(target, inputs)
    folder = targets[0].parent
    if os.path.lexists(folder) and not folder.is_dir():
        raise InputError(f"output folder {folder} exists and is not a folder; choose another -o")
    missing = not folder.exists()
    if missing:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        if missing:
            folder.rmdir()
        raise InputError(f"output folder {folder} is not writable; choose another -o")
    return targets
