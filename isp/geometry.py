"""Geometry that keeps a colour filter array: the flips and transposes of a square window that leave its CFA in place.

Liu et al. (CVPR-W 2019, "Bayer pattern unification and Bayer preserving augmentation"): a
flipped or transposed window again starts on the file's CFA if it is read at the right CFA phase
(row, col offset mod P): for RGGB a horizontal flip reads the window one column later.
`cfa_preserving_ops(cfa)` finds these phases for any CFA (all eight transforms have one on Bayer
and on SID's X-Trans). Training crops (`rawrestore.data.dataset`) and the test-time
self-ensemble (`rawrestore.ensemble`) both use them.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["CropOp", "cfa_preserving_ops"]


@dataclass(frozen=True)
class CropOp:
    """A flip/transpose of a square window and the CFA phase (row, col mod P) its source window must start on."""

    transpose: bool
    flip_rows: bool
    flip_cols: bool
    phase: tuple[int, int]

    def apply(self, window: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Transform the last two dims. (..., S, S) -> (..., S, S): transpose first, then the flips (numpy: views)."""
        if isinstance(window, np.ndarray):
            if self.transpose:
                window = np.swapaxes(window, -2, -1)
            axes = tuple(a for a, on in ((-2, self.flip_rows), (-1, self.flip_cols)) if on)
            return np.flip(window, axes) if axes else window
        if self.transpose:
            window = window.transpose(-2, -1)
        dims = [d for d, on in ((-2, self.flip_rows), (-1, self.flip_cols)) if on]
        return window.flip(dims) if dims else window

    def invert(self, window: torch.Tensor) -> torch.Tensor:
        """Undo `apply` on the last two dims: the flips first, then the transpose. (..., S, S) -> (..., S, S)."""
        dims = [d for d, on in ((-2, self.flip_rows), (-1, self.flip_cols)) if on]
        if dims:
            window = window.flip(dims)
        return window.transpose(-2, -1) if self.transpose else window

    @property
    def index(self) -> int:
        """0..7: bits transpose (4), flip rows (2), flip cols (1); 0 is the identity."""
        return 4 * self.transpose + 2 * self.flip_rows + self.flip_cols


def cfa_preserving_ops(cfa: Any) -> list[CropOp]:
    """The flips/transposes that keep a CFA when the window starts at the right phase. cfa (P,P) -> ops, identity first.

    For each of the 8 transforms, the smallest phase (row-major) such that the transformed
    window of a multiple-of-P side starts on `cfa` again; transforms with no such phase are left out.
    """
    return list(_cfa_ops(tuple(map(tuple, np.asarray(cfa, dtype=np.int64).tolist()))))


@functools.lru_cache(maxsize=32)
def _cfa_ops(key: tuple[tuple[int, ...], ...]) -> tuple[CropOp, ...]:
    cfa = np.asarray(key, dtype=np.int64)
    period = cfa.shape[0]
    side = 2 * period
    tiled = torch.from_numpy(np.tile(cfa, (3, 3)))
    ops = []
    for transpose, flip_rows, flip_cols in itertools.product((False, True), repeat=3):
        for py, px in itertools.product(range(period), repeat=2):
            op = CropOp(transpose, flip_rows, flip_cols, (py, px))
            out = op.apply(tiled[py:py + side, px:px + side])
            if np.array_equal(out[:period, :period].numpy(), cfa):
                ops.append(op)
                break
    return tuple(ops)
