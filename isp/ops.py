"""Differentiable ISP operations: pure functions on (B,C,H,W) tensors, per-sample metadata.

Every function runs on the device and dtype of its input. Clips use `torch.clamp`, whose
gradient is 1 inside the range *including the clip points* and 0 outside, so gradients are
always finite; the gradient at a clip point is the one-sided derivative from inside.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .cfa import (
    as_batched_cfa, colour_masks, downsample_packed, pack, pack_bayer, pack_xtrans, tile_sites, unpack, unpack_bayer,
    unpack_xtrans,
)
from .errors import InputError

__all__ = [
    "normalize", "denormalize", "white_balance", "libraw_wb_scale", "demosaic_bilinear", "demosaic_half", "demosaic_malvar",
    "demosaic", "apply_matrix", "apply_curve", "inverse_curve", "mosaic", "pack", "unpack", "pack_bayer",
    "unpack_bayer", "pack_xtrans", "unpack_xtrans", "downsample_packed", "libraw_gamma_params",
]


def _per_sample(value, batch: int, shape: tuple[int, ...], like: torch.Tensor, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.shape == shape:
        value = value.unsqueeze(0)
    if value.ndim != len(shape) + 1 or value.shape[1:] != shape or value.shape[0] not in (1, batch):
        raise InputError(f"{name} must be {shape} or (B,{','.join(map(str, shape))}) with B={batch}, got {tuple(value.shape)}")
    return value.expand(batch, *shape)


def normalize(mosaic: torch.Tensor, black_level, white_level) -> torch.Tensor:
    """Black/white normalisation. mosaic (B,1,H,W) DN, black (P,P) or (B,P,P) per site, white () or (B,) -> (B,1,H,W).

    LibRaw's convention: each site's black is subtracted, and the range is white minus the
    *smallest* black of the period (LibRaw folds the common black into its maximum). Not clipped.
    """
    batch, _, height, width = mosaic.shape
    black = torch.as_tensor(black_level, dtype=mosaic.dtype, device=mosaic.device)
    if black.ndim == 2:
        black = black.unsqueeze(0)
    black = black.expand(batch, -1, -1)
    white = torch.as_tensor(white_level, dtype=mosaic.dtype, device=mosaic.device).reshape(-1).expand(batch)
    span = (white - black.flatten(1).min(dim=1).values).view(batch, 1, 1, 1)
    return (mosaic - tile_sites(black.unsqueeze(1), height, width)) / span


def denormalize(normalised: torch.Tensor, black_level, white_level) -> torch.Tensor:
    """Inverse of normalize. (B,1,H,W) -> DN (B,1,H,W), not rounded."""
    batch, _, height, width = normalised.shape
    black = torch.as_tensor(black_level, dtype=normalised.dtype, device=normalised.device)
    if black.ndim == 2:
        black = black.unsqueeze(0)
    black = black.expand(batch, -1, -1)
    white = torch.as_tensor(white_level, dtype=normalised.dtype, device=normalised.device).reshape(-1).expand(batch)
    span = (white - black.flatten(1).min(dim=1).values).view(batch, 1, 1, 1)
    return normalised * span + tile_sites(black.unsqueeze(1), height, width)


def libraw_wb_scale(gains: torch.Tensor) -> torch.Tensor:
    """LibRaw scales multipliers so the smallest is 1 before clipping. gains (B,3) -> (B,3)."""
    return gains / gains.min(dim=-1, keepdim=True).values


def white_balance(mosaic: torch.Tensor, cfa, gains) -> torch.Tensor:
    """White balance per CFA site. mosaic (B,1,H,W), cfa (P,P)/(B,P,P), gains (3,)/(B,3) -> (B,1,H,W)."""
    batch, _, height, width = mosaic.shape
    cfa = as_batched_cfa(cfa, batch, mosaic.device)
    gains = _per_sample(gains, batch, (3,), mosaic, "gains")
    per_site = torch.gather(gains, 1, cfa.flatten(1)).view(batch, 1, *cfa.shape[1:])
    return mosaic * tile_sites(per_site, height, width)


# LibRaw LINEAR weights: edge neighbours 2, diagonal neighbours 1 (centre excluded).
_LINEAR_KERNEL = ((1.0, 2.0, 1.0), (2.0, 0.0, 2.0), (1.0, 2.0, 1.0))


@functools.lru_cache(maxsize=64)
def _linear_plan(cfa_key: tuple, height: int, width: int, device: str, dtype: torch.dtype):
    """Colour masks and LibRaw's integer-quantised normalisers for one CFA and size (cached)."""
    cfa = torch.tensor(cfa_key, device=device).unsqueeze(0)
    period = cfa.shape[-1]
    masks = colour_masks(cfa, height, width, dtype)  # (1,3,H,W)
    # Neighbour weight sums come from the periodic CFA (as LibRaw computes them), not the image edge.
    site_masks = colour_masks(cfa, 3 * period, 3 * period, torch.float64)
    kernel = torch.tensor(_LINEAR_KERNEL, dtype=torch.float64).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    sums = F.conv2d(site_masks, kernel, groups=3)[..., period - 1 : 2 * period - 1, period - 1 : 2 * period - 1]
    norm = torch.where(sums > 0, torch.floor(256.0 / sums.clamp(min=1.0)) / 256.0, torch.zeros_like(sums))
    norm = tile_sites(norm.to(dtype), height, width).to(device)
    weights = kernel.to(device=device, dtype=dtype)
    return masks, (1.0 - masks) * norm, weights


def demosaic_bilinear(mosaic: torch.Tensor, cfa) -> torch.Tensor:
    """LibRaw LINEAR demosaic, any CFA. mosaic (B,1,H,W) linear -> (B,3,H,W) linear camera RGB.

    Each missing colour is the 3x3 neighbourhood average of that colour, edge neighbours weighted
    2 and diagonal 1, normalised as LibRaw does (by floor(256/sum)/256); measured sites are kept.
    At the 1-pixel image border the zero-padded neighbours are missing (LibRaw differs there).
    """
    batch, _, height, width = mosaic.shape
    cfa = as_batched_cfa(cfa, batch, mosaic.device)
    if not bool((cfa == cfa[:1]).all()):
        return torch.cat([demosaic_bilinear(mosaic[i : i + 1], cfa[i]) for i in range(batch)])
    key = tuple(map(tuple, cfa[0].tolist()))
    masks, fill_norm, kernel = _linear_plan(key, height, width, str(mosaic.device), mosaic.dtype)
    planes = mosaic * masks
    neighbours = F.conv2d(F.pad(planes, (1, 1, 1, 1)), kernel, groups=3)
    return planes + neighbours * fill_norm


def demosaic_half(mosaic: torch.Tensor, cfa) -> torch.Tensor:
    """Half-size demosaic: one RGB pixel per CFA period (mean of each colour's sites). (B,1,H,W) -> (B,3,H/P,W/P)."""
    batch = mosaic.shape[0]
    cfa = as_batched_cfa(cfa, batch, mosaic.device)
    period = cfa.shape[-1]
    if mosaic.shape[-2] % period or mosaic.shape[-1] % period:
        raise InputError(f"half demosaic needs H, W multiples of {period}, got {tuple(mosaic.shape[-2:])}")
    onehot = F.one_hot(cfa.flatten(1), 3).to(mosaic.dtype)  # (B, P*P, 3)
    weights = onehot / onehot.sum(dim=1, keepdim=True)
    sites = F.pixel_unshuffle(mosaic, period)  # (B, P*P, h, w)
    return torch.einsum("bshw,bsc->bchw", sites, weights)


# Malvar, He and Cutler (ICASSP 2004), gradient-corrected bilinear interpolation: 5x5 kernels (x1/8).
# Sources: 0 measured value, 1 green at a red/blue site, 2 and 3 red/blue at a green site whose
# row (2) or column (3) holds that colour, 4 red at blue / blue at red.
_MALVAR_KERNELS = (
    ((0, 0, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, 8, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
    ((0, 0, -1, 0, 0), (0, 0, 2, 0, 0), (-1, 2, 4, 2, -1), (0, 0, 2, 0, 0), (0, 0, -1, 0, 0)),
    ((0, 0, 0.5, 0, 0), (0, -1, 0, -1, 0), (-1, 4, 5, 4, -1), (0, -1, 0, -1, 0), (0, 0, 0.5, 0, 0)),
    ((0, 0, -1, 0, 0), (0, -1, 4, -1, 0), (0.5, 0, 5, 0, 0.5), (0, -1, 4, -1, 0), (0, 0, -1, 0, 0)),
    ((0, 0, -1.5, 0, 0), (0, 2, 0, 2, 0), (-1.5, 0, 6, 0, -1.5), (0, 2, 0, 2, 0), (0, 0, -1.5, 0, 0)),
)


def _malvar_source(cfa: list[list[int]], row: int, col: int, colour: int) -> int:
    """Which Malvar kernel gives `colour` at Bayer site (row, col)."""
    here = cfa[row][col]
    if here == colour:
        return 0
    if colour == 1:
        return 1
    if here != 1:
        return 4
    return 2 if cfa[row][1 - col] == colour else 3


def demosaic_malvar(mosaic: torch.Tensor, cfa) -> torch.Tensor:
    """Malvar-He-Cutler demosaic, Bayer. mosaic (B,1,H,W) linear, H and W even -> (B,3,H,W) linear camera RGB.

    Each missing colour is the bilinear estimate corrected by the Laplacian of the measured colour
    (5x5 kernels of the paper). The image is mirror-padded by 2 ('reflect'); values can leave [0,1]
    at edges (no clip here: the pipeline clips after the colour matrix). Differentiable.
    """
    batch, _, height, width = mosaic.shape
    cfa = as_batched_cfa(cfa, batch, mosaic.device)
    if cfa.shape[-1] != 2 or height % 2 or width % 2 or min(height, width) < 4:
        raise InputError(f"malvar demosaic needs a Bayer CFA and even H, W >= 4, got CFA {tuple(cfa.shape[-2:])}, "
                         f"image {(height, width)}; use bilinear")
    kernels = torch.tensor(_MALVAR_KERNELS, dtype=mosaic.dtype, device=mosaic.device).unsqueeze(1) / 8
    sources = F.conv2d(F.pad(mosaic, (2, 2, 2, 2), mode="reflect"), kernels)  # (B,5,H,W)
    choice = torch.zeros(batch, 3, 5, 4, dtype=mosaic.dtype, device=mosaic.device)
    for b, pattern in enumerate(cfa.tolist()):
        for site in range(4):
            for colour in range(3):
                choice[b, colour, _malvar_source(pattern, site // 2, site % 2, colour), site] = 1
    sites = F.pixel_unshuffle(sources, 2).view(batch, 5, 4, height // 2, width // 2)
    picked = torch.einsum("bksyx,bcks->bcsyx", sites, choice).reshape(batch, 12, height // 2, width // 2)
    return F.pixel_shuffle(picked, 2)


DEMOSAIC_METHODS = {"bilinear": demosaic_bilinear, "malvar": demosaic_malvar, "half": demosaic_half}


def demosaic(mosaic: torch.Tensor, cfa, method: str = "bilinear") -> torch.Tensor:
    """Dispatch on `DEMOSAIC_METHODS`: 'bilinear' (LibRaw LINEAR), 'malvar' (Bayer) or 'half'. (B,1,H,W) -> (B,3,H',W')."""
    if method not in DEMOSAIC_METHODS:
        raise InputError(f"unknown demosaic '{method}'; use one of {sorted(DEMOSAIC_METHODS)}")
    return DEMOSAIC_METHODS[method](mosaic, cfa)


def mosaic(rgb: torch.Tensor, cfa) -> torch.Tensor:
    """Sample an RGB image through a CFA (inverse of demosaic at measured sites). (B,3,H,W) -> (B,1,H,W)."""
    batch, _, height, width = rgb.shape
    cfa = as_batched_cfa(cfa, batch, rgb.device)
    return (rgb * colour_masks(cfa, height, width, rgb.dtype)).sum(dim=1, keepdim=True)


def apply_matrix(rgb: torch.Tensor, matrix) -> torch.Tensor:
    """Per-pixel 3x3 colour matrix. rgb (B,3,H,W), matrix (3,3)/(B,3,3) -> (B,3,H,W)."""
    matrix = _per_sample(matrix, rgb.shape[0], (3, 3), rgb, "matrix")
    return torch.einsum("bij,bjhw->bihw", matrix, rgb)


@functools.lru_cache(maxsize=16)
def libraw_gamma_params(power: float, toe_slope: float) -> tuple[float, float, float, float]:
    """LibRaw/dcraw gamma_curve constants for (power, toe slope), e.g. (2.222, 4.5) or (2.4, 12.92).

    Returns (exponent g0 = 1/power, toe slope g1, linear-domain threshold g3, offset g4) of
    out = x*g1 for x < g3 else (1+g4) * x**g0 - g4: the curve is continuous with a continuous slope.
    """
    g0, g1 = 1.0 / power, toe_slope
    bounds = [0.0, 1.0] if g1 >= 1 else [1.0, 0.0]
    g2 = 0.0
    for _ in range(48):  # bisection for the breakpoint, as dcraw does
        g2 = (bounds[0] + bounds[1]) / 2
        bounds[int((math.pow(g2 / g1, -g0) - 1) / g0 - 1 / g2 > -1)] = g2
    g3 = g2 / g1
    g4 = g2 * (1 / g0 - 1)
    return g0, g1, g3, g4


_CURVES = {"srgb": (2.4, 12.92), "bt709": (2.222, 4.5)}
GAMMAS = ("srgb", "bt709", "linear")


def apply_curve(rgb: torch.Tensor, gamma: str = "srgb") -> torch.Tensor:
    """Transfer curve on linear values in [0,1]: 'srgb', 'bt709' (rawpy's default (2.222, 4.5)) or 'linear'.

    The power branch is evaluated on max(x, threshold), so its gradient stays finite at 0.
    """
    if gamma == "linear":
        return rgb
    if gamma not in _CURVES:
        raise InputError(f"unknown gamma '{gamma}'; use srgb, bt709 or linear")
    g0, g1, g3, g4 = libraw_gamma_params(*_CURVES[gamma])
    power = (1 + g4) * torch.clamp(rgb, min=g3).pow(g0) - g4
    return torch.where(rgb < g3, rgb * g1, power)


def inverse_curve(encoded: torch.Tensor, gamma: str = "srgb") -> torch.Tensor:
    """Inverse of apply_curve: encoded values in [0,1] -> linear."""
    if gamma == "linear":
        return encoded
    if gamma not in _CURVES:
        raise InputError(f"unknown gamma '{gamma}'; use srgb, bt709 or linear")
    g0, g1, g3, g4 = libraw_gamma_params(*_CURVES[gamma])
    threshold = g3 * g1
    power = ((torch.clamp(encoded, min=threshold) + g4) / (1 + g4)).pow(1 / g0)
    return torch.where(encoded < threshold, encoded / g1, power)
