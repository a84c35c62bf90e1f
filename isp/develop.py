"""Rendering whole camera files like LibRaw's dcraw_process + rawpy's postprocess, any layout.

Order (LibRaw's): black subtraction, white balance (per colour index, second green included) with
clip, demosaic (CFA only), colour matrix with clip (none for raw-colour and monochrome files),
transfer curve on the 16-bit grid, orientation. `render_raw` takes an opened `RawFile`;
`isp.pipeline.render_file` opens one and calls it.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from . import fast, ops
from .cfa import tile_sites
from .errors import InputError
from .rawfile import RawFile, apply_flip, libraw_multipliers

DEMOSAICS = ("bilinear", "malvar", "half")
MAX_EXPOSURE_RATIO = 1e6  # beyond this every non-black pixel clips; a larger value is a typo


def check_exposure_ratio(exposure_ratio: float) -> float:
    if not (math.isfinite(exposure_ratio) and 0 < exposure_ratio <= MAX_EXPOSURE_RATIO):
        raise InputError(f"exposure ratio must be a number in (0, {MAX_EXPOSURE_RATIO:g}], got {exposure_ratio:g}")
    return float(exposure_ratio)


def render_raw(
    raw: RawFile,
    wb: str | tuple[float, float, float] = "camera",
    gamma: str = "srgb",
    demosaic: str = "bilinear",
    device: torch.device | str = "cpu",
    exposure_ratio: float = 1.0,
    half_size: bool = False,
    flip: bool = True,
    warn=None,
) -> np.ndarray:
    """Render like rawpy.postprocess. -> float32 (H', W', 3) in [0,1], or (H', W', 1) for a monochrome file.

    `half_size` is rawpy's half_size=True (one pixel per 2x2 block); `flip` applies the file's
    orientation as rawpy's default user_flip does. `warn(line)` is called once for a file without a
    colour matrix (default: print to stderr).
    """
    exposure_ratio = check_exposure_ratio(exposure_ratio)
    if demosaic not in DEMOSAICS:
        raise InputError(f"unknown demosaic '{demosaic}'; use one of {DEMOSAICS}")
    if gamma not in ops.GAMMAS:
        raise InputError(f"unknown gamma '{gamma}'; use one of {ops.GAMMAS}")
    half_size = half_size or demosaic == "half"
    device = torch.device(device)
    stretch = abs(raw.pixel_aspect - 1.0) > 1e-6 and math.isfinite(raw.pixel_aspect) and raw.pixel_aspect > 0
    final_gamma, gamma = gamma, ("linear" if stretch else gamma)  # LibRaw stretches 16-bit linear values, then curves
    gains, _ = libraw_multipliers(raw, wb)
    if raw.cam_to_srgb is None and raw.layout != "mono":
        (warn or _stderr)(f"isp: warning: {raw.path}: no colour matrix; output is raw camera colour, as LibRaw's")
    matrix = np.eye(3) if raw.cam_to_srgb is None else raw.cam_to_srgb
    if raw.layout == "cfa" and half_size:
        image = _render_half(raw, gains, matrix, gamma, exposure_ratio)
    elif raw.layout == "cfa" and demosaic == "bilinear" and device.type == "cpu":
        site_gains = gains[raw.colour_index]
        image = fast.render_mosaic(raw.data, raw.cfa, raw.black, raw.white, site_gains, matrix, gamma=gamma,
                                   exposure_ratio=exposure_ratio, black_floor=raw.black_floor)
    elif raw.layout == "cfa":
        image = _render_cfa_torch(raw, gains, matrix, gamma, demosaic, device, exposure_ratio)
    else:
        image = _render_planes(raw, gains, matrix, gamma, exposure_ratio)
    if stretch:
        image = libraw_stretch(image, raw.pixel_aspect, final_gamma)
    return np.ascontiguousarray(apply_flip(image, raw.flip)) if flip else image


def libraw_stretch(linear: np.ndarray, pixel_aspect: float, gamma: str) -> np.ndarray:
    """Stretch to square pixels as rawpy's LibRaw does, then the curve. linear (H,W,C) in [0,1] -> (H',W',C) float32.

    Aspect < 1 gives height / aspect rows, > 1 width * aspect columns (rounded). Each new line is
    the source line at the position stepped by the aspect, truncated: rawpy (LibRaw 0.22) repeats
    lines rather than mixing neighbours (measured in tests/test_isp_libraw_cases.py), so we do too.
    """
    codes = np.floor(linear.astype(np.float64) * 65535.0 + 1e-6)
    axis, step = (0, pixel_aspect) if pixel_aspect < 1 else (1, 1.0 / pixel_aspect)
    size = codes.shape[axis]
    count = int(size / pixel_aspect + 0.5) if pixel_aspect < 1 else int(size * pixel_aspect + 0.5)
    position = np.concatenate([[0.0], np.cumsum(np.full(count - 1, step))])  # LibRaw accumulates the step
    stretched = np.take(codes, np.minimum(position.astype(np.int64), size - 1), axis)
    if gamma == "linear":
        return (stretched / 65535.0).astype(np.float32)
    return fast.curve_lut(gamma).numpy()[np.clip(stretched, 0, 65535).astype(np.int64)]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _balanced(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(values * scale, 0.0, 1.0)


def _finish(camera_rgb: torch.Tensor, matrix, gamma: str, colour: bool) -> np.ndarray:
    """(N,C,H,W) balanced camera values -> (H,W,C) float32: matrix and clip (colour), curve on 16-bit codes as LibRaw."""
    if colour:
        camera_rgb = torch.clamp(ops.apply_matrix(camera_rgb, torch.as_tensor(matrix, dtype=camera_rgb.dtype)), 0.0, 1.0)
    if gamma != "linear":
        codes = (camera_rgb.to(torch.float64) * 65535.0 + 1e-6).to(torch.int64)  # LibRaw truncates to 16 bits, then looks up
        camera_rgb = fast.curve_lut(gamma)[codes.cpu()]
    return camera_rgb[0].permute(1, 2, 0).to(torch.float32).cpu().numpy()


def _render_planes(raw: RawFile, gains: np.ndarray, matrix, gamma: str, exposure_ratio: float) -> np.ndarray:
    """Full-colour ('stack') and monochrome files: no demosaic; mono keeps one channel and no matrix."""
    values = torch.from_numpy(raw.black_subtracted().astype(np.float32))
    planes = values.unsqueeze(-1) if values.ndim == 2 else values
    channels = planes.shape[-1]
    scale = torch.tensor(gains[:channels] * exposure_ratio / (raw.white - raw.black_floor), dtype=torch.float32)
    balanced = _balanced(planes, scale).permute(2, 0, 1).unsqueeze(0)
    return _finish(balanced, matrix, gamma, colour=raw.layout != "mono")


def _render_cfa_torch(raw: RawFile, gains, matrix, gamma: str, demosaic: str, device: torch.device,
                      exposure_ratio: float) -> np.ndarray:
    """CFA through the differentiable ops (any demosaic, any device), no grad."""
    period = raw.cfa.shape[0]
    with torch.no_grad():
        values = torch.from_numpy(raw.black_subtracted().astype(np.float32)).to(device)[None, None]
        site_scale = torch.tensor(gains[raw.colour_index] * exposure_ratio / (raw.white - raw.black_floor),
                                  dtype=torch.float32, device=device).view(1, 1, period, period)
        balanced = _balanced(values, tile_sites(site_scale, *values.shape[-2:]))
        rgb = ops.demosaic(balanced, torch.as_tensor(raw.cfa, device=device), demosaic)
        return _finish(rgb, matrix, gamma, colour=True)


def _render_half(raw: RawFile, gains, matrix, gamma: str, exposure_ratio: float) -> np.ndarray:
    """rawpy's half_size=True: one pixel per 2x2 block (LibRaw's `shrink`), no interpolation.

    Bayer: each block holds every colour once; the two greens are averaged (LibRaw's mix_green).
    X-Trans: a 2x2 block lacks red or blue at some positions; as LibRaw, a colour seen twice in a
    block keeps the last one in raster order, and a missing red or blue is the mean of its left
    and right neighbours on every third column (LibRaw's pre_interpolate for half-size X-Trans).
    """
    values = raw.black_subtracted().astype(np.float64)
    height, width = values.shape
    period = raw.cfa.shape[0]
    rows, cols = np.arange(height) % period, np.arange(width) % period
    scale = gains[raw.colour_index] * exposure_ratio / (raw.white - raw.black_floor)
    # LibRaw scales to 16-bit integers here (truncating); the truncation is kept for X-Trans' integer halving.
    balanced = np.minimum(np.floor(values * scale[np.ix_(rows, cols)] * 65535.0), 65535.0)
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    image = np.zeros((half_h, half_w, 4))
    index = raw.colour_index[np.ix_(rows, cols)]
    for dy in (0, 1):
        for dx in (0, 1):
            block = balanced[dy::2, dx::2]
            colour = index[dy::2, dx::2]
            target = image[: block.shape[0], : block.shape[1]]
            for c in range(4):
                np.copyto(target[..., c], block, where=colour == c)
    if period == 2:
        image[..., 1] = np.floor((image[..., 1] + image[..., 3]) / 2)
    else:
        _fill_xtrans_half(image)
    rgb = torch.from_numpy(image[..., :3] / 65535.0).permute(2, 0, 1).unsqueeze(0)
    return _finish(rgb, matrix, gamma, colour=True)


def _fill_xtrans_half(image: np.ndarray) -> None:
    """LibRaw's half-size X-Trans fill, in place on (h, w, 4) 16-bit values.

    The first block, in rows 0-2 and columns 1-3, that holds neither red nor blue fixes the phase;
    from there, on every third row, every third column takes red and blue as the integer mean of its
    left and right neighbours. Without such a block LibRaw starts at row 3, column 1.
    """
    height, width = image.shape[:2]
    start_row, start_col = 3, 1
    found = [(row, col) for row in range(min(3, height)) for col in range(1, min(4, width))
             if image[row, col, 0] == 0 and image[row, col, 2] == 0]
    if found:
        start_row, start_col = found[0]
    cols = np.arange(start_col, width - 1, 3)
    for row in range(start_row, height, 3):
        for c in (0, 2):
            image[row, cols, c] = np.floor((image[row, cols - 1, c] + image[row, cols + 1, c]) / 2)
