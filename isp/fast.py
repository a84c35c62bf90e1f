"""Fast paths: Bayer demosaic on packed sites (differentiable), and strip-wise no-grad file renders.

On a Bayer mosaic every output colour on each of the four 2x2 sub-lattices ("sites") is either
the measured value or the mean of 2 or 4 shifted neighbours from one or two other sites, and
LibRaw's normalisers floor(256/sum)/256 are exact there (1/2, 1/4). So the demosaic is a few
shifted adds on quarter-size planes instead of masked full-size convolutions, with the same values
(zero-padded 1-pixel border included) as `ops.demosaic_bilinear` to float rounding. `pipeline.render`
uses it when a batch shares one Bayer CFA.

`render_mosaic` is `pipeline.render_file`'s CPU path for bilinear demosaic, any CFA: see there.

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

from . import ops
from .errors import InputError

__all__ = ["bayer_fill_plan", "demosaic_bayer_sites", "demosaic_bilinear_bayer", "curve_lut", "render_mosaic"]

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
# No-grad file render. The frame is cut into strips of rows whose intermediates stay in cache; a
# GEMM applies the colour matrix (and, for Bayer, the demosaic weights) with the 16-bit scaling;
# the curve is a table lookup written straight into the (H,W,3) output. Strips go to `_WORKERS`
# threads that each run torch single-threaded: no per-op thread barriers, which stall badly when
# the CPU is shared with other work.

_STRIP_ROWS = 32  # packed Bayer rows per strip: ~10 MB of intermediates per worker at 12 MP
_MOSAIC_STRIP_ROWS = 48  # full-resolution rows per strip for other CFAs (rounded up to whole periods)
_WORKERS = 2
_LUT_MAX_ENTRIES = 8 * 65536  # beyond this (extreme matrices) clamp before the lookup instead
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_render_lock = threading.Lock()  # one render at a time: it uses every core, and swaps torch's thread count


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
    codes = torch.arange(-below, 65536 + above, dtype=torch.float64)
    return ops.apply_curve((codes / 65535.0).clamp(0.0, 1.0), gamma).to(torch.float32)


class _Strips:
    """One render: constants shared by the workers, and the output stage of a strip."""

    def __init__(self, mosaic: np.ndarray, strip: int, black_level, white_level, site_gains, cam_to_srgb, gamma: str,
                 exposure_ratio: float, black_floor: float):
        self.mosaic = mosaic
        self.strip = strip
        self.strips = itertools.count()  # claimed by the workers in turn (next() is atomic under the GIL)
        self.black, self.span = np.asarray(black_level, dtype=np.float64), float(white_level) - black_floor
        self.site_gains, self.exposure_ratio = site_gains, exposure_ratio
        self.matrix = torch.as_tensor(cam_to_srgb, dtype=torch.float64).reshape(3, 3)
        self.curved = gamma != "linear"
        self.clamp_codes = False
        self.below = 0
        if self.curved:
            # Matrix outputs of inputs in [0,1] lie between each row's sums of negative and positive entries.
            low = -float(self.matrix.clamp(max=0).sum(dim=1).min()) * 65535
            high = float(self.matrix.clamp(min=0).sum(dim=1).max()) * 65535 - 65535
            below, above = 4096 * math.ceil((low + 2) / 4096), 4096 * math.ceil((max(high, 0) + 2) / 4096)
            self.clamp_codes = below + above + 65536 > _LUT_MAX_ENTRIES
            if self.clamp_codes:
                below = above = 0
            self.lut, self.below = curve_lut(gamma, below, above), below
        # numpy puts large arrays on huge pages: far fewer page faults than torch.empty on first write
        self.out = torch.from_numpy(np.empty((*mosaic.shape, 3), dtype=np.float32))

    def gemm_weights(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 weights (scaled to 16-bit codes with a curve) and the bias that offsets codes into the table."""
        if self.curved:
            weights = weights * 65535
        bias = torch.full((weights.shape[0], 1), float(self.below), dtype=torch.float32)
        return weights.to(torch.float32), bias

    def emit(self, result: torch.Tensor, colours: torch.Tensor, block: torch.Tensor, codes: torch.Tensor) -> None:
        """GEMM `result` -> output `block`; `colours` is the view of `result` laid out as `block`, `codes` an int32 buffer like it."""
        if not self.curved:
            result.clamp_(0.0, 1.0)
            block.copy_(colours)
            return
        if self.clamp_codes:
            result.clamp_(0.0, 65535.0)
        codes.copy_(colours)  # float -> int32 truncates, as LibRaw's (int) cast
        torch.index_select(self.lut, 0, codes.view(-1), out=block.view(-1))

    def run(self) -> None:
        raise NotImplementedError


class _BayerStrips(_Strips):
    """Bayer, H and W even: demosaic on the four packed sites, folded with the matrix into one 12x12 GEMM."""

    def __init__(self, mosaic, cfa_key, *args):
        super().__init__(mosaic, _STRIP_ROWS, *args)
        plan = _fill_plan(cfa_key)
        self.height, self.width = mosaic.shape[0] // 2, mosaic.shape[1] // 2  # packed (site) grid
        self.strip = min(self.strip, self.height)
        scale = self.site_gains.reshape(4) * self.exposure_ratio / self.span
        self.site_black = torch.tensor(self.black.reshape(4), dtype=torch.float32).view(4, 1, 1)
        self.site_scale = torch.tensor(scale, dtype=torch.float32).view(4, 1, 1)  # balanced = (DN - black) * scale

        # GEMM operand rows: the 4 sites, then the 8 neighbour sums; output rows 3*site + colour.
        self.sums = [taps for taps, _ in plan if len(taps) > 1]
        weights = torch.zeros(12, 12, dtype=torch.float64)
        for index, (taps, weight) in enumerate(plan):
            site, colour = divmod(index, 3)
            row = taps[0][0] if len(taps) == 1 else 4 + self.sums.index(taps)
            weights[3 * site : 3 * site + 3, row] += self.matrix[:, colour] * weight
        self.weights, self.bias = self.gemm_weights(weights)
        # Pairs first; a diagonal four is a pair plus the same pair one column over (one add, not three).
        pairs = {frozenset(taps): 4 + i for i, taps in enumerate(self.sums) if len(taps) == 2}
        self.program = []  # (operand row, taps to add, or (pair row, column shift))
        for i, taps in sorted(enumerate(self.sums), key=lambda item: len(item[1])):
            source = next(((row, shift) for pair, row in pairs.items() for shift in (-1, 1)
                           if set(taps) == pair | {(site, dy, dx + shift) for site, dy, dx in pair}), None)
            self.program.append((4 + i, taps, source))

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
            grid[:, first - top + 1 : last - top + 1, 1 : width + 1].sub_(self.site_black)
            grid[:, : rows + 2].mul_(self.site_scale).clamp_(0.0, 1.0)  # the zero columns stay zero
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

            result = torch.addmm(self.bias, self.weights, operand[:, start : start + length], out=product[:, :length])
            colours = result.view(2, 2, 3, rows, pitch)[..., :width].permute(3, 0, 4, 1, 2)  # as out_sites
            self.emit(result, colours, out_sites[top : top + rows], codes[:rows])


@functools.lru_cache(maxsize=4)
def _strip_maps(cfa_key: tuple, strip: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour masks (3, strip+2, width+2) on a strip's padded grid and LibRaw normalisers (3, strip, width+2) on its outputs.

    The grid's first row is at CFA phase period-1 (the halo row above a strip) and its first
    column is the zero column; an output row holds pixels 0..width-1, then two spare positions.
    """
    period = len(cfa_key)
    masks, fill_norm, _ = ops._linear_plan(cfa_key, strip + 2 + period, width, "cpu", torch.float32)
    rows = slice(period - 1, period + strip + 1)
    return F.pad(masks[0, :, rows], (1, 1)).contiguous(), F.pad(fill_norm[0, :, rows][:, 1:-1], (0, 2)).contiguous()


class _MosaicStrips(_Strips):
    """Any CFA, any size: full-resolution planes; the 3x3 neighbour sums are separable ([1,2,1] twice)."""

    def __init__(self, mosaic, cfa_key, *args):
        period = len(cfa_key)
        super().__init__(mosaic, period * math.ceil(_MOSAIC_STRIP_ROWS / period), *args)
        self.height, self.width = mosaic.shape
        self.strip = min(self.strip, self.height)
        # Per-pixel maps for a strip and its halo rows: strips start on whole periods, so the halo row
        # above is always at phase period - 1 and one set of maps serves every strip.
        self.masks, self.fill_norm = _strip_maps(cfa_key, self.strip, self.width)
        phase = np.arange(-1, self.strip + 1) % period
        scale = self.site_gains * self.exposure_ratio / self.span
        columns = np.arange(self.width) % period
        self.black_map = torch.from_numpy(np.ascontiguousarray(self.black[phase][:, columns], dtype=np.float32))
        self.scale_map = torch.from_numpy(np.ascontiguousarray(scale[phase][:, columns], dtype=np.float32))
        self.weights, self.bias = self.gemm_weights(self.matrix)

    def run(self) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP setting; the caller restores the global one
        strip, width = self.strip, self.width
        pitch = width + 2
        start = 2 + pitch  # flat position of the strip's pixel (0, 0)
        plane = (strip + 2) * pitch + 4
        grid_flat = torch.from_numpy(np.zeros(plane, dtype=np.float32))
        grid = grid_flat[1 : 1 + (strip + 2) * pitch].view(strip + 2, pitch)
        grid_np = grid.numpy()
        planes = torch.from_numpy(np.zeros((3, plane), dtype=np.float32))
        vertical = torch.from_numpy(np.zeros((3, strip * pitch + 2), dtype=np.float32))
        neighbours = torch.from_numpy(np.empty((3, strip * pitch), dtype=np.float32))
        camera = torch.from_numpy(np.empty((3, strip * pitch), dtype=np.float32))
        product = torch.from_numpy(np.empty((3, strip * pitch), dtype=np.float32))
        codes = torch.from_numpy(np.empty((strip, width, 3), dtype=np.int32))

        while (top := next(self.strips) * strip) < self.height:
            rows = min(strip, self.height - top)
            length = rows * pitch
            first, last = max(top - 1, 0), min(top + rows + 1, self.height)
            valid = slice(first - top + 1, last - top + 1)
            np.copyto(grid_np[valid, 1 : width + 1], self.mosaic[first:last], casting="unsafe")
            grid[valid, 1 : width + 1].sub_(self.black_map[valid]).mul_(self.scale_map[valid]).clamp_(0.0, 1.0)
            if first == top:
                grid[0].zero_()
            if last < top + rows + 1:
                grid[last - top + 1 : rows + 2].zero_()

            span = (rows + 2) * pitch
            torch.mul(grid.reshape(1, -1)[:, : span], self.masks.view(3, -1)[:, :span], out=planes[:, 1 : 1 + span])
            # [1,2,1] down the columns, over the strip's rows and one element either side ...
            low, count = start - 1, length + 2
            up, mid, down = (planes[:, low + k * pitch :][:, :count] for k in (-1, 0, 1))
            column = vertical[:, :count]
            torch.add(up, down, out=column).add_(mid, alpha=2.0)
            # ... then along the rows; the centre weight lands on the colour's own sites, where it is unused
            total = neighbours[:, :length]
            torch.add(column[:, :length], column[:, 2 : 2 + length], out=total).add_(column[:, 1 : 1 + length], alpha=2.0)
            rgb = torch.addcmul(planes[:, start : start + length], total, self.fill_norm.view(3, -1)[:, :length],
                                out=camera[:, :length])
            result = torch.addmm(self.bias, self.weights, rgb, out=product[:, :length])
            colours = result.view(3, rows, pitch)[:, :, :width].permute(1, 2, 0)
            self.emit(result, colours, self.out[top : top + rows], codes[:rows])


def render_mosaic(
    mosaic: np.ndarray,
    cfa,
    black_level,
    white_level: float,
    gains,
    cam_to_srgb,
    gamma: str = "srgb",
    exposure_ratio: float = 1.0,
    black_floor: float | None = None,
) -> np.ndarray:
    """No-grad CPU render of a CFA mosaic like LibRaw. mosaic (H,W) DN, black per site (P,P) -> float32 (H,W,3) in [0,1].

    `gains` are per colour (3,) or per CFA site (P,P) (LibRaw balances the second Bayer green on
    its own); `black_floor` is the black LibRaw takes off the white level (default: the smallest).
    The order of `pipeline.render` with bilinear demosaic (gains already LibRaw-scaled by the
    caller): black/white normalisation and white balance with clip, demosaic, colour matrix, clip,
    curve. With 'linear' the values are render's to float rounding. With a curve ('srgb', 'bt709')
    the clipped linear value is truncated to 16 bits and looked up (`curve_lut`), as LibRaw does
    (its convert_to_rgb casts with (int)); that matches LibRaw ~2 dB closer than rounding would.
    Bayer with H and W even runs on packed sites; X-Trans and odd sizes on full-resolution planes.
    Strips run on up to two threads with torch single-threaded in each; torch's thread count is
    restored afterwards (other threads that start torch work meanwhile may see 1).
    """
    mosaic = np.asarray(mosaic)
    cfa = np.asarray(cfa, dtype=np.int64)
    period = cfa.shape[0] if cfa.ndim == 2 else 0
    if cfa.shape != (period, period) or period not in (2, 6):
        raise InputError(f"CFA must be (2,2) Bayer or (6,6) X-Trans, got shape {cfa.shape}")
    if mosaic.ndim != 2 or min(mosaic.shape) < 2:
        raise InputError(f"mosaic must be (H,W) with H, W >= 2, got {mosaic.shape}")
    if gamma not in ("srgb", "bt709", "linear"):
        raise InputError(f"unknown gamma '{gamma}'; use srgb, bt709 or linear")
    if np.asarray(black_level).shape != (period, period):
        raise InputError(f"black_level must be per CFA site {(period, period)}, got {np.asarray(black_level).shape}")
    cfa_key = tuple(map(tuple, cfa.tolist()))
    gains = np.asarray(gains, dtype=np.float64)
    site_gains = gains[cfa] if gains.shape == (3,) else gains
    if site_gains.shape != (period, period):
        raise InputError(f"gains must be per colour (3,) or per CFA site {(period, period)}, got {gains.shape}")
    floor = float(np.min(black_level)) if black_floor is None else float(black_floor)
    args = (black_level, white_level, site_gains, cam_to_srgb, gamma, float(exposure_ratio), floor)
    if period == 2 and mosaic.shape[0] % 2 == 0 and mosaic.shape[1] % 2 == 0:
        job: _Strips = _BayerStrips(mosaic, _cfa_key(cfa_key), *args)
    else:
        job = _MosaicStrips(mosaic, cfa_key, *args)
    with _render_lock:
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
