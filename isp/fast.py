"""Bayer fast paths: LibRaw LINEAR demosaic on the four packed sub-lattices, and a no-grad file render.

On a Bayer mosaic every output colour on each of the four 2x2 sub-lattices ("sites") is either
the measured value or the mean of 2 or 4 shifted neighbours from one or two other sites, and
LibRaw's normalisers floor(256/sum)/256 are exact there (1/2, 1/4). So the demosaic is a few
shifted adds on quarter-size planes instead of masked full-size convolutions, with the same values
(zero-padded 1-pixel border included) as `ops.demosaic_bilinear` to float rounding.

Sites are numbered s = 2*row + col inside the 2x2 period: `F.pixel_unshuffle(mosaic, 2)` order.
"""
from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["bayer_fill_plan", "demosaic_bayer_sites", "demosaic_bilinear_bayer", "curve_lut", "render_bayer_mosaic"]

_EDGE_WEIGHT, _DIAGONAL_WEIGHT = 2, 1  # LibRaw LINEAR's 3x3 neighbour weights (see ops._LINEAR_KERNEL)


def _cfa_key(cfa) -> tuple[tuple[int, int], tuple[int, int]]:
    cfa = torch.as_tensor(cfa)
    if cfa.ndim == 3:
        cfa = cfa[0]
    if tuple(cfa.shape) != (2, 2) or sorted(cfa.flatten().tolist()) != [0, 1, 1, 2]:
        raise InputError(f"the Bayer fast path needs a 2x2 CFA with one R, two G and one B, got {cfa.tolist()}")
    return tuple(map(tuple, cfa.tolist()))


@functools.lru_cache(maxsize=8)
def _fill_plan(cfa_key: tuple) -> tuple[tuple[tuple[tuple[int, int, int], ...], float], ...]:
    plan = []
    for site in range(4):
        row, col = divmod(site, 2)
        for colour in range(3):
            if cfa_key[row][col] == colour:
                plan.append((((site, 0, 0),), 1.0))
                continue
            taps, weights = [], []
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    y, x = row + dy, col + dx
                    if (dy, dx) != (0, 0) and cfa_key[y % 2][x % 2] == colour:
                        taps.append((2 * (y % 2) + x % 2, y // 2, x // 2))
                        weights.append(_EDGE_WEIGHT if dy == 0 or dx == 0 else _DIAGONAL_WEIGHT)
            if len(set(weights)) != 1:
                raise InputError(f"CFA {cfa_key} is not a Bayer pattern: mixed neighbour weights for colour {colour}")
            norm = math.floor(256 / sum(weights)) / 256  # LibRaw's integer normaliser, exact for Bayer
            plan.append((tuple(taps), weights[0] * norm))
    return tuple(plan)


def bayer_fill_plan(cfa) -> tuple[tuple[tuple[tuple[int, int, int], ...], float], ...]:
    """Per output (site t, colour c), at index 3*t + c: ((source site, packed dy, packed dx), ...) and their common weight.

    A measured colour is its own site with weight 1; a missing one is 2 or 4 neighbours with
    LibRaw's weight (edge 2 or diagonal 1) times its normaliser floor(256/sum)/256, i.e. 1/2 or 1/4.
    """
    return _fill_plan(_cfa_key(cfa))


def demosaic_bayer_sites(sites: torch.Tensor, cfa) -> torch.Tensor:
    """LibRaw LINEAR demosaic on packed sites. sites (B,4,h,w) in pixel_unshuffle order -> (B,12,h,w), channel 4*c + t.

    The channel order is the one `F.pixel_shuffle(., 2)` turns into (B,3,2h,2w). Differentiable.
    """
    if sites.ndim != 4 or sites.shape[1] != 4:
        raise InputError(f"Bayer sites must be (B,4,h,w), got {tuple(sites.shape)}")
    plan = bayer_fill_plan(cfa)
    height, width = sites.shape[-2:]
    padded = F.pad(sites, (1, 1, 1, 1))

    def shifted(site: int, dy: int, dx: int) -> torch.Tensor:
        return padded[:, site, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    planes = [None] * 12
    for index, (taps, weight) in enumerate(plan):
        site, colour = divmod(index, 3)
        if len(taps) == 1:
            planes[4 * colour + site] = sites[:, site]
        else:
            total = shifted(*taps[0])
            for tap in taps[1:]:
                total = total + shifted(*tap)
            planes[4 * colour + site] = total * weight
    return torch.stack(planes, dim=1)


def demosaic_bilinear_bayer(mosaic: torch.Tensor, cfa) -> torch.Tensor:
    """LibRaw LINEAR demosaic of a Bayer mosaic via its sites. mosaic (B,1,H,W) linear, H and W even -> (B,3,H,W).

    Same values and gradients as `ops.demosaic_bilinear` up to float rounding (summation order).
    """
    if mosaic.ndim != 4 or mosaic.shape[1] != 1 or mosaic.shape[-2] % 2 or mosaic.shape[-1] % 2:
        raise InputError(f"the Bayer fast path needs a (B,1,H,W) mosaic with H, W even, got {tuple(mosaic.shape)}")
    return F.pixel_shuffle(demosaic_bayer_sites(F.pixel_unshuffle(mosaic, 2), cfa), 2)


# ---------------------------------------------------------------------------------------------
# No-grad file render: strips of packed rows, kept in cache; one GEMM does demosaic weights,
# colour matrix and 16-bit scaling; the curve is a table lookup written straight into (H,W,3).

_STRIP_ROWS = 32  # packed rows per strip: intermediates of a 12 MP frame stay in the shared L3 cache
_LUT_MAX_ENTRIES = 8 * 65536  # beyond this (extreme matrices) clamp before the lookup instead
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _helper_pool() -> ThreadPoolExecutor:
    """One background thread: `index_select` is single-threaded on the CPU, so the lookup is split in two."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isp-lut")
        return _pool


@functools.lru_cache(maxsize=8)
def curve_lut(gamma: str, below: int = 0, above: int = 0) -> torch.Tensor:
    """Transfer curve on the 16-bit grid. -> float32 (below + 65536 + above,): entry k is curve(clamp((k - below)/65535, 0, 1)).

    LibRaw renders the same way: the linear value is quantised to 16 bits, then looked up. The
    `below`/`above` margins absorb out-of-range colour-matrix outputs, so no clamp pass is needed.
    """
    from .ops import apply_curve  # ops imports this module

    codes = torch.arange(-below, 65536 + above, dtype=torch.float64)
    return apply_curve((codes / 65535.0).clamp(0.0, 1.0), gamma).to(torch.float32)


def _site_scales(cfa_key, black_level, white_level, gains, exposure_ratio) -> tuple[np.ndarray, np.ndarray]:
    """Per-site black (4,) and multiplier (4,): balanced = (DN - black) * multiplier, as normalize * exposure * white_balance."""
    black = np.asarray(black_level, dtype=np.float64).reshape(2, 2)
    span = float(white_level) - black.min()
    colours = [cfa_key[s // 2][s % 2] for s in range(4)]
    scale = np.array([gains[c] for c in colours], dtype=np.float64) * exposure_ratio / span
    return black.reshape(4).astype(np.float32), scale.astype(np.float32)


def render_bayer_mosaic(
    mosaic: np.ndarray,
    cfa,
    black_level,
    white_level: float,
    gains,
    cam_to_srgb,
    gamma: str = "srgb",
    exposure_ratio: float = 1.0,
) -> np.ndarray:
    """No-grad CPU render of a Bayer mosaic like LibRaw. mosaic (H,W) DN, H and W even -> float32 (H,W,3) in [0,1].

    The order of `pipeline.render` (gains already LibRaw-scaled by the caller): black/white
    normalisation and white balance with clip, bilinear demosaic, colour matrix, clip, curve.
    With a curve the clipped linear value is rounded to 16 bits and looked up (`curve_lut`);
    'linear' keeps the float value.
    """
    mosaic = np.asarray(mosaic)
    if mosaic.ndim != 2 or mosaic.shape[0] % 2 or mosaic.shape[1] % 2 or mosaic.shape[0] < 2:
        raise InputError(f"the Bayer fast path needs an (H,W) mosaic with H, W even, got {mosaic.shape}")
    cfa_key = _cfa_key(cfa)
    plan = _fill_plan(cfa_key)
    height, width = mosaic.shape[0] // 2, mosaic.shape[1] // 2  # packed (site) grid
    black, scale = _site_scales(cfa_key, black_level, white_level, [float(g) for g in gains], float(exposure_ratio))
    matrix = torch.as_tensor(cam_to_srgb, dtype=torch.float64).reshape(3, 3)

    # GEMM operand rows: the 4 sites, then the 8 neighbour sums; outputs rows 3*t + c.
    sums = [taps for taps, _ in plan if len(taps) > 1]
    weights = torch.zeros(12, 12, dtype=torch.float64)
    for index, (taps, weight) in enumerate(plan):
        site, colour = divmod(index, 3)
        row = taps[0][0] if len(taps) == 1 else 4 + sums.index(taps)
        weights[3 * site : 3 * site + 3, row] += matrix[:, colour] * weight

    curved = gamma != "linear"
    below = above = 0
    clamp_first = False
    if curved:
        # Matrix outputs of inputs in [0,1] lie in [sum of negative entries, sum of positive ones] per row.
        low = -float(matrix.clamp(max=0).sum(dim=1).min()) * 65535
        high = float(matrix.clamp(min=0).sum(dim=1).max()) * 65535 - 65535
        below, above = 4096 * math.ceil((low + 2) / 4096), 4096 * math.ceil((max(high, 0) + 2) / 4096)
        clamp_first = below + above + 65536 > _LUT_MAX_ENTRIES
        if clamp_first:
            below = above = 0
        lut = curve_lut(gamma, below, above)
        weights = weights * 65535
    weights = weights.to(torch.float32)
    bias = torch.full((12, 1), 0.5 + below, dtype=torch.float32)  # +0.5 then truncation: round to nearest

    out = torch.empty(2 * height, 2 * width, 3, dtype=torch.float32)
    out_sites = out.view(height, 2, width, 2, 3)  # (packed row, site row, packed col, site col, colour)
    strip = min(_STRIP_ROWS, height)
    pitch = width + 2  # a zero column either side; a shift by (dy, dx) is a flat offset dy*pitch + dx
    plane = (strip + 2) * pitch + 3  # plus a halo row above and below and a slack element at each end
    operand = torch.zeros(12, plane, dtype=torch.float32)
    grid = operand[:4, 1 : 1 + (strip + 2) * pitch].view(4, strip + 2, pitch)
    grid_np = grid.numpy().reshape(2, 2, strip + 2, pitch)
    start = 2 + pitch  # flat position of packed pixel (0, 0) of the strip
    black_np = black.reshape(2, 2, 1, 1)
    scale_t = torch.from_numpy(scale).view(4, 1, 1)
    product = torch.empty(12, strip * pitch, dtype=torch.float32)
    codes = torch.empty(strip, 2, width, 2, 3, dtype=torch.int32) if curved else None
    split = torch.get_num_threads() > 1
    pool = _helper_pool() if split and curved else None

    for top in range(0, height, strip):
        rows = min(strip, height - top)
        length = rows * pitch
        # Sites of packed rows top-1 .. top+rows (one halo row each side, zero outside the image).
        first, last = max(top - 1, 0), min(top + rows + 1, height)
        source = mosaic[2 * first : 2 * last].reshape(last - first, 2, width, 2).transpose(1, 3, 0, 2)
        np.subtract(source, black_np, out=grid_np[:, :, first - top + 1 : last - top + 1, 1 : width + 1])
        if first == top:
            grid[:, 0].zero_()
        if last < top + rows + 1:
            grid[:, last - top + 1 : rows + 2].zero_()
        grid[:, : rows + 2].mul_(scale_t).clamp_(0.0, 1.0)

        def shifted(site: int, dy: int, dx: int) -> torch.Tensor:
            offset = start + dy * pitch + dx
            return operand[site, offset : offset + length]

        for index, taps in enumerate(sums):
            total = operand[4 + index, start : start + length]
            torch.add(shifted(*taps[0]), shifted(*taps[1]), out=total)
            for tap in taps[2:]:
                total.add_(shifted(*tap))

        result = product[:, :length]
        block = out_sites[top : top + rows]
        if not curved:
            torch.mm(weights, operand[:, start : start + length], out=result).clamp_(0.0, 1.0)
            block.copy_(result.view(2, 2, 3, rows, pitch)[..., :width].permute(3, 0, 4, 1, 2))
            continue
        torch.addmm(bias, weights, operand[:, start : start + length], out=result)
        if clamp_first:
            result.clamp_(0.0, 65535.5)
        index_codes = codes[:rows]
        index_codes.copy_(result.view(2, 2, 3, rows, pitch)[..., :width].permute(3, 0, 4, 1, 2))  # truncates
        flat_codes, flat_out = index_codes.view(-1), block.view(-1)
        if pool is None:
            torch.index_select(lut, 0, flat_codes, out=flat_out)
        else:
            half = flat_codes.numel() // 2
            pending = pool.submit(torch.index_select, lut, 0, flat_codes[:half], out=flat_out[:half])
            torch.index_select(lut, 0, flat_codes[half:], out=flat_out[half:])
            pending.result()
    return out.numpy()
