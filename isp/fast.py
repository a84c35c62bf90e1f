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
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait

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
# No-grad file render. The frame is cut into strips of packed rows whose intermediates stay in
# cache; one GEMM applies demosaic weights, colour matrix and 16-bit scaling; the curve is a table
# lookup written straight into the (H,W,3) output. Strips go to `_WORKERS` threads that each run
# torch single-threaded: no per-op thread barriers, which stall badly when the CPU is shared.

_STRIP_ROWS = 32  # packed rows per strip: ~6 MB of intermediates per worker at 12 MP
_WORKERS = 2
_LUT_MAX_ENTRIES = 8 * 65536  # beyond this (extreme matrices) clamp before the lookup instead
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _worker_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_WORKERS - 1, thread_name_prefix="isp-render")
        return _pool


@functools.lru_cache(maxsize=8)
def curve_lut(gamma: str, below: int = 0, above: int = 0) -> torch.Tensor:
    """Transfer curve on the 16-bit grid. -> float32 (below + 65536 + above,): entry k is curve(clamp((k - below)/65535, 0, 1)).

    LibRaw renders the same way: the linear value is truncated to 16 bits, then looked up. The
    `below`/`above` margins absorb out-of-range colour-matrix outputs, so no clamp pass is needed.
    """
    from .ops import apply_curve  # ops imports this module

    codes = torch.arange(-below, 65536 + above, dtype=torch.float64)
    return apply_curve((codes / 65535.0).clamp(0.0, 1.0), gamma).to(torch.float32)


class _StripRender:
    """Shared constants of one render; `run` is the per-thread loop over the strips it claims."""

    def __init__(self, mosaic: np.ndarray, cfa_key, black_level, white_level, gains, cam_to_srgb, gamma, exposure_ratio):
        plan = _fill_plan(cfa_key)
        self.mosaic = mosaic
        self.height, self.width = mosaic.shape[0] // 2, mosaic.shape[1] // 2  # packed (site) grid
        black = np.asarray(black_level, dtype=np.float64).reshape(4)
        colours = [cfa_key[site // 2][site % 2] for site in range(4)]
        span = float(white_level) - black.min()
        scale = np.array([gains[c] for c in colours]) * exposure_ratio / span
        self.black = torch.tensor(black, dtype=torch.float32).view(4, 1, 1)
        self.scale = torch.tensor(scale, dtype=torch.float32).view(4, 1, 1)  # balanced = (DN - black) * scale

        # GEMM operand rows: the 4 sites, then the 8 neighbour sums; output rows 3*site + colour.
        self.sums = [taps for taps, _ in plan if len(taps) > 1]
        # Pairs first; a diagonal four is a pair plus the same pair one column over (one add, not three).
        pairs = {frozenset(taps): 4 + i for i, taps in enumerate(self.sums) if len(taps) == 2}
        self.program = []  # (operand row, taps to add, or (pair row, column shift))
        for i, taps in sorted(enumerate(self.sums), key=lambda item: len(item[1])):
            source = next(((row, shift) for pair, row in pairs.items() for shift in (-1, 1)
                           if set(taps) == pair | {(site, dy, dx + shift) for site, dy, dx in pair}), None)
            self.program.append((4 + i, taps, source))
        matrix = torch.as_tensor(cam_to_srgb, dtype=torch.float64).reshape(3, 3)
        weights = torch.zeros(12, 12, dtype=torch.float64)
        for index, (taps, weight) in enumerate(plan):
            site, colour = divmod(index, 3)
            row = taps[0][0] if len(taps) == 1 else 4 + self.sums.index(taps)
            weights[3 * site : 3 * site + 3, row] += matrix[:, colour] * weight
        self.curved = gamma != "linear"
        self.clamp_codes = False
        below = 0
        if self.curved:
            # Matrix outputs of inputs in [0,1] lie between each row's sums of negative and positive entries.
            low = -float(matrix.clamp(max=0).sum(dim=1).min()) * 65535
            high = float(matrix.clamp(min=0).sum(dim=1).max()) * 65535 - 65535
            below, above = 4096 * math.ceil((low + 2) / 4096), 4096 * math.ceil((max(high, 0) + 2) / 4096)
            self.clamp_codes = below + above + 65536 > _LUT_MAX_ENTRIES
            if self.clamp_codes:
                below = above = 0
            self.lut = curve_lut(gamma, below, above)
            weights = weights * 65535
        self.weights = weights.to(torch.float32)
        self.bias = torch.full((12, 1), float(below), dtype=torch.float32)
        # numpy allocates large arrays on huge pages: far fewer page faults than torch.empty on first write
        self.out = torch.from_numpy(np.empty((2 * self.height, 2 * self.width, 3), dtype=np.float32))
        self.strips = itertools.count()  # claimed by the workers in turn (next() is atomic under the GIL)
        self.strip = min(_STRIP_ROWS, self.height)

    def run(self) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP setting; the caller restores the global one
        strip, width = self.strip, self.width
        pitch = width + 2  # a zero column either side; a shift by (dy, dx) is the flat offset dy*pitch + dx
        start = 2 + pitch  # flat position of the strip's packed pixel (0, 0)
        operand = torch.from_numpy(np.zeros((12, (strip + 2) * pitch + 4), dtype=np.float32))  # halo rows, end slack
        grid = operand[:4, 1 : 1 + (strip + 2) * pitch].view(4, strip + 2, pitch)
        grid_np = grid.numpy().reshape(2, 2, strip + 2, pitch)
        product = torch.from_numpy(np.empty((12, strip * pitch), dtype=np.float32))
        codes = torch.from_numpy(np.empty((strip, 2, width, 2, 3), dtype=np.int32))
        out_sites = self.out.view(self.height, 2, width, 2, 3)  # (packed row, site row, packed col, site col, colour)

        while (top := next(self.strips) * strip) < self.height:
            rows = min(strip, self.height - top)
            length = rows * pitch
            # Sites of packed rows top-1 .. top+rows (a halo row each side, zero outside the image).
            first, last = max(top - 1, 0), min(top + rows + 1, self.height)
            source = self.mosaic[2 * first : 2 * last].reshape(last - first, 2, width, 2).transpose(1, 3, 0, 2)
            np.copyto(grid_np[:, :, first - top + 1 : last - top + 1, 1 : width + 1], source, casting="unsafe")
            # (DN - black) * scale, clipped; the zero columns stay zero
            grid[:, first - top + 1 : last - top + 1, 1 : width + 1].sub_(self.black)
            grid[:, : rows + 2].mul_(self.scale).clamp_(0.0, 1.0)
            if first == top:
                grid[:, 0].zero_()
            if last < top + rows + 1:
                grid[:, last - top + 1 : rows + 2].zero_()

            for row, taps, source in self.program:
                if source is not None:
                    pair, shift = source
                    torch.add(operand[pair, start : start + length], operand[pair, start + shift :][:length],
                              out=operand[row, start : start + length])
                    continue
                low, count = (start - 1, length + 2) if len(taps) == 2 else (start, length)  # pairs: a column more
                total = operand[row, low : low + count]
                (site, dy, dx), (site2, dy2, dx2) = taps[:2]
                torch.add(operand[site, low + dy * pitch + dx :][:count], operand[site2, low + dy2 * pitch + dx2 :][:count],
                          out=total)
                for site, dy, dx in taps[2:]:
                    total.add_(operand[site, low + dy * pitch + dx :][:count])

            result = product[:, :length]
            colours = result.view(2, 2, 3, rows, pitch)[..., :width].permute(3, 0, 4, 1, 2)  # as out_sites
            block = out_sites[top : top + rows]
            if not self.curved:
                torch.mm(self.weights, operand[:, start : start + length], out=result).clamp_(0.0, 1.0)
                block.copy_(colours)
                continue
            torch.addmm(self.bias, self.weights, operand[:, start : start + length], out=result)
            if self.clamp_codes:
                result.clamp_(0.0, 65535.0)
            codes[:rows].copy_(colours)  # float -> int32 truncates, as LibRaw's (int) cast
            torch.index_select(self.lut, 0, codes[:rows].view(-1), out=block.view(-1))


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
    normalisation and white balance with clip, bilinear demosaic, colour matrix, clip, curve. With
    'linear' the values are render's to float rounding. With a curve ('srgb', 'bt709') the clipped
    linear value is truncated to 16 bits and looked up (`curve_lut`), as LibRaw does (its
    convert_to_rgb casts with (int)); that matches LibRaw ~2 dB closer than rounding would.
    """
    mosaic = np.asarray(mosaic)
    if mosaic.ndim != 2 or mosaic.shape[0] % 2 or mosaic.shape[1] % 2 or mosaic.shape[0] < 2:
        raise InputError(f"the Bayer fast path needs an (H,W) mosaic with H, W even, got {mosaic.shape}")
    if gamma not in ("srgb", "bt709", "linear"):
        raise InputError(f"unknown gamma '{gamma}'; use srgb, bt709 or linear")
    job = _StripRender(mosaic, _cfa_key(cfa), black_level, white_level, [float(g) for g in gains], cam_to_srgb,
                       gamma, float(exposure_ratio))
    threads = torch.get_num_threads()
    helpers = [_worker_pool().submit(job.run) for _ in range(min(_WORKERS, threads) - 1)]
    try:
        job.run()
    finally:
        wait(helpers)
        torch.set_num_threads(threads)
    for helper in helpers:
        helper.result()  # re-raises a worker's exception
    return job.out.numpy()
