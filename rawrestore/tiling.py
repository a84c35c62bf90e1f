"""Tiled inference for frames too large for one forward pass: overlapping tiles, smooth blending.

Tiles are `tile` x `tile` model-input (packed) pixels; neighbours share at least `overlap`
pixels. Each tile's offsets are multiples of `align` (default 16 = the U-Net's four 2x poolings,
so pooling grids line up with the untiled pass; any offset keeps the CFA phase of a packed Bayer
input, X-Trans needs even offsets, both covered by 16; a 1-channel mosaic needs whole CFA periods,
which `ensemble.restore` asks for with align = lcm(16, P)). Inside a shared strip of width V the
outer quarter next to a tile's inner edge gets weight 0 (the pixels whose receptive field ran
into the tile edge), the middle half a raised-cosine ramp, so the weights of two neighbours sum
to 1 and the seam is smooth. A convolutional model whose receptive-field radius r satisfies
r <= V // 4 therefore gives exactly the untiled result; larger fields differ only in the
blended strips.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from rawrestore.errors import InputError

__all__ = ["TILE_ALIGN", "tile_starts", "blend_window", "tiled_apply"]

TILE_ALIGN = 16  # tile offsets in model-input pixels: the U-Net's four 2x poolings


def tile_starts(length: int, tile: int, overlap: int, align: int = TILE_ALIGN) -> list[tuple[int, int]]:
    """Tile spans along one axis. length, tile, overlap, align (pixels) -> [(start, stop), ...] covering [0, length).

    Starts are multiples of `align`; consecutive tiles overlap by >= `overlap`; the last tile ends
    at `length` and may be up to `align - 1` pixels longer than `tile`.
    """
    if tile <= 0 or overlap < 0 or align < 1:
        raise InputError(f"tiling needs tile > 0, overlap >= 0, align >= 1; got tile={tile}, overlap={overlap}, align={align}")
    if overlap >= tile:
        raise InputError(f"tile overlap {overlap} must be smaller than the tile {tile}")
    if length <= tile:
        return [(0, length)]
    stride = ((tile - overlap) // align) * align
    if stride < align:
        raise InputError(
            f"tile {tile} with overlap {overlap} leaves a stride under the alignment {align}; use a larger tile or a smaller overlap"
        )
    spans: list[tuple[int, int]] = []
    start = 0
    while start + tile < length:
        spans.append((start, start + tile))
        start += stride
    last = ((length - tile) // align) * align
    spans.append((max(last, spans[-1][0] + align), length))  # the loop ran at least once: length > tile
    return spans


def _edge_ramp(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Weights over a shared strip of `width` pixels, from the tile's inner edge inwards: 0, raised cosine, 1."""
    margin = width // 4
    ramp_len = width - 2 * margin
    weights = torch.zeros(width, dtype=torch.float64)
    if ramp_len > 0:
        position = (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len
        weights[margin:margin + ramp_len] = torch.sin(0.5 * math.pi * position) ** 2
    weights[margin + ramp_len:] = 1.0
    return weights.to(dtype=dtype, device=device)


def blend_window(spans: list[tuple[int, int]], index: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """1-D weights of tile `index` given all spans of its axis. -> (stop - start,) in [0, 1]; 1 at image borders."""
    start, stop = spans[index]
    weights = torch.ones(stop - start, dtype=dtype, device=device)
    if index > 0:  # shared strip with the previous tile at this tile's start
        shared = spans[index - 1][1] - start
        if shared > 0:
            weights[:shared] = _edge_ramp(shared, dtype, torch.device(device))
    if index + 1 < len(spans):  # shared strip with the next tile at this tile's end
        shared = stop - spans[index + 1][0]
        if shared > 0:
            weights[stop - start - shared:] = torch.minimum(
                weights[stop - start - shared:], _edge_ramp(shared, dtype, torch.device(device)).flip(0)
            )
    return weights


@torch.no_grad()
def tiled_apply(model: Callable[[torch.Tensor], torch.Tensor], packed: torch.Tensor, tile: int, overlap: int,
                align: int = TILE_ALIGN) -> torch.Tensor:
    """Run `model` over overlapping tiles. packed (B,C,H,W) -> (B,C',H,W) blended, on packed's device and dtype.

    `tile` <= 0 or a frame that fits in one tile runs the model once on the whole input. Memory:
    one tile's activations plus two full-size accumulators (output and weights).
    """
    if packed.ndim != 4:
        raise InputError(f"tiled_apply needs a (B,C,H,W) tensor, got shape {tuple(packed.shape)}")
    height, width = packed.shape[-2:]
    if tile <= 0 or (height <= tile and width <= tile):
        return model(packed)
    rows = tile_starts(height, tile, overlap, align)
    cols = tile_starts(width, tile, overlap, align)
    accumulate = torch.promote_types(packed.dtype, torch.float32)  # float32, or float64 for float64 input
    output = torch.zeros(0)
    weight_sum = torch.zeros(1, 1, height, width, dtype=accumulate, device=packed.device)
    for i, (top, bottom) in enumerate(rows):
        row_weights = blend_window(rows, i, accumulate, packed.device)
        for j, (left, right) in enumerate(cols):
            col_weights = blend_window(cols, j, accumulate, packed.device)
            result = model(packed[:, :, top:bottom, left:right])
            if output.numel() == 0:  # output channels are known after the first tile
                output = torch.zeros(packed.shape[0], result.shape[1], height, width, dtype=accumulate,
                                     device=packed.device)
            window = row_weights[:, None] * col_weights[None, :]
            output[:, :, top:bottom, left:right] += result.to(accumulate) * window
            weight_sum[:, :, top:bottom, left:right] += window
    return (output / weight_sum).to(packed.dtype)
