"""Test-time self-ensemble over the flips and transposes that keep the colour filter array.

A restoration network trained with CFA-preserving flip/transpose augmentation
(`isp.geometry.cfa_preserving_ops`) should give the same answer on a flipped frame,
flipped back; in practice its errors differ between orientations, and averaging the restored
frames over them lowers the error (the self-ensemble of Lim et al., EDSR, 2017; done on the
mosaic here, as in Liu et al.'s Bayer-preserving augmentation, 2019, so no colour lands on
another colour's site).

For each transform: the mosaic, padded by one CFA period on every side with copies of its own
edge periods (so the colours stay on their sites), is cut at the transform's CFA phase, flipped
/ transposed (it now starts on the original CFA), packed, restored, unpacked, transformed back
and cropped to the original frame. The results are averaged on the mosaic and packed again.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

import isp
from isp.geometry import CropOp, cfa_preserving_ops
from rawrestore.errors import InputError
from rawrestore.tiling import TILE_ALIGN, tiled_apply

__all__ = ["self_ensemble_apply", "restore"]


def _pad_periodic(mosaic: torch.Tensor, period: int) -> torch.Tensor:
    """(B,1,H,W) -> (B,1,H+2P,W+2P): each side gets a copy of the frame's own edge period."""
    rows = torch.cat([mosaic[..., :period, :], mosaic, mosaic[..., -period:, :]], dim=-2)
    return torch.cat([rows[..., :period], rows, rows[..., -period:]], dim=-1)


def self_ensemble_apply(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cfa: torch.Tensor,
    packed: bool = True,
    ops: list[CropOp] | None = None,
) -> torch.Tensor:
    """Average of `model` over CFA-preserving flips/transposes. x (B,C,h,w) packed (or (B,1,H,W) mosaic) -> same shape.

    `cfa` (P,P) is shared by the batch; `ops` defaults to every transform that keeps it
    (8 on Bayer). `model` maps a packed (or mosaic) frame to one of the same layout.
    """
    cfa = torch.as_tensor(cfa)
    period = int(cfa.shape[-1])
    ops = cfa_preserving_ops(cfa.cpu().numpy()) if ops is None else ops
    if not ops:
        raise InputError("self-ensemble needs at least one CFA-preserving transform")
    mosaic = isp.cfa.unpack(x, cfa) if packed else x
    height, width = mosaic.shape[-2:]
    if height % period or width % period:
        raise InputError(f"self-ensemble needs a frame whose sides are multiples of the CFA period {period}, got {height}x{width}")
    padded = _pad_periodic(mosaic, period)
    total = torch.zeros_like(mosaic, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    for op in ops:
        py, px = op.phase
        window = op.apply(padded[..., py:py + height + period, px:px + width + period])
        window_in = isp.cfa.pack(window.contiguous(), cfa) if packed else window.contiguous()
        out = model(window_in)
        out = op.invert(isp.cfa.unpack(out, cfa) if packed else out)
        total += out[..., period - py:period - py + height, period - px:period - px + width].to(total.dtype)
    mean = (total / len(ops)).to(x.dtype)
    return isp.cfa.pack(mean, cfa) if packed else mean


def restore(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cfa: torch.Tensor, tile: int, overlap: int,
            self_ensemble: bool = False, packed: bool = True) -> torch.Tensor:
    """The model on a whole frame: tiled (`tile` 0: one pass), optionally self-ensembled. x (1,C,h,w) -> same shape.

    Mosaic tiles (`packed` false) start on whole CFA periods too, so every tile shows the network
    the CFA phase it trained on (16 px steps keep Bayer's; X-Trans needs steps of 48 = lcm(16, 6)).
    """
    align = TILE_ALIGN if packed else math.lcm(TILE_ALIGN, int(torch.as_tensor(cfa).shape[-1]))

    def one_pass(frame: torch.Tensor) -> torch.Tensor:
        return tiled_apply(model, frame, tile, overlap, align)

    return self_ensemble_apply(one_pass, x, cfa, packed=packed) if self_ensemble else one_pass(x)
