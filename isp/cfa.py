"""CFA geometry: per-pixel colour maps and RAW packing (Bayer 4 channels, X-Trans SID's 9)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

# SID's Fuji packing: for each of the 9 channels, the (row, col) inside the 6x6 period that
# lands at (0,0), (0,1), (1,0), (1,1) of each 2x2 cell of the (H/3, W/3) packed plane.
XTRANS_PACK_SITES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 0), (0, 4), (3, 1), (3, 3)),
    ((0, 2), (0, 5), (3, 2), (3, 5)),
    ((0, 1), (0, 3), (3, 0), (3, 4)),
    ((1, 2), (2, 5), (5, 2), (4, 5)),
    ((2, 2), (1, 5), (4, 2), (5, 5)),
    ((1, 0), (1, 3), (4, 0), (4, 3)),
    ((1, 1), (1, 4), (4, 1), (4, 4)),
    ((2, 0), (2, 3), (5, 0), (5, 3)),
    ((2, 1), (2, 4), (5, 1), (5, 4)),
)


def _xtrans_permutation() -> torch.Tensor:
    """Index into pixel_unshuffle(6)'s 36 channels for packed channel c, sub-position (a, b)."""
    order = []
    for c in range(9):
        for row, col in XTRANS_PACK_SITES[c]:
            order.append(row * 6 + col)
    return torch.tensor(order)


_XTRANS_ORDER = _xtrans_permutation()
_XTRANS_INVERSE = torch.argsort(_XTRANS_ORDER)


def as_batched_cfa(cfa, batch: int, device) -> torch.Tensor:
    """cfa (P,P) or (B,P,P), array or tensor -> (B,P,P) long tensor on device."""
    cfa = torch.as_tensor(cfa, device=device).long()
    if cfa.ndim == 2:
        cfa = cfa.unsqueeze(0).expand(batch, -1, -1)
    if cfa.ndim != 3 or cfa.shape[0] != batch or cfa.shape[1] != cfa.shape[2]:
        raise InputError(f"cfa must be (P,P) or (B,P,P) with B={batch}, got {tuple(cfa.shape)}")
    return cfa


def tile_sites(per_site: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Repeat a per-site map (B,C,P,P) over the mosaic. -> (B,C,H,W); H, W multiples of P or not."""
    period = per_site.shape[-1]
    reps_h = -(-height // period)
    reps_w = -(-width // period)
    return per_site.repeat(1, 1, reps_h, reps_w)[..., :height, :width]


def colour_masks(cfa: torch.Tensor, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """One-hot colour of every pixel. cfa (B,P,P) -> (B,3,H,W) in {0,1}."""
    onehot = F.one_hot(cfa, 3).permute(0, 3, 1, 2).to(dtype)
    return tile_sites(onehot, height, width)


def _check_mosaic(mosaic: torch.Tensor, period: int) -> None:
    if mosaic.ndim != 4 or mosaic.shape[1] != 1:
        raise InputError(f"mosaic must be (B,1,H,W), got {tuple(mosaic.shape)}")
    if mosaic.shape[-2] % period or mosaic.shape[-1] % period:
        raise InputError(f"mosaic {tuple(mosaic.shape[-2:])} is not a whole number of {period}x{period} CFA periods")


def bayer_sites(cfa: torch.Tensor) -> list[tuple[int, int]]:
    """(row, col) in the 2x2 period of R, G (in R's row), B, G2 (in B's row). cfa (2,2)."""
    cfa = cfa.tolist()
    r = next((i, j) for i in range(2) for j in range(2) if cfa[i][j] == 0)
    b = next((i, j) for i in range(2) for j in range(2) if cfa[i][j] == 2)
    return [r, (r[0], 1 - r[1]), b, (b[0], 1 - b[1])]


def pack_bayer(mosaic: torch.Tensor, cfa) -> torch.Tensor:
    """Pack a Bayer mosaic. (B,1,H,W), cfa (2,2) -> (B,4,H/2,W/2) channels R, G, B, G2 whatever the phase."""
    cfa = torch.as_tensor(cfa)
    if cfa.ndim == 3:
        if not bool((cfa == cfa[:1]).all()):
            return torch.cat([pack_bayer(mosaic[i : i + 1], cfa[i]) for i in range(cfa.shape[0])])
        cfa = cfa[0]
    _check_mosaic(mosaic, 2)
    return torch.cat([mosaic[:, :, i::2, j::2] for i, j in bayer_sites(cfa)], dim=1)


def unpack_bayer(packed: torch.Tensor, cfa) -> torch.Tensor:
    """Exact inverse of pack_bayer. (B,4,h,w), cfa (2,2) -> (B,1,2h,2w)."""
    cfa = torch.as_tensor(cfa)
    if cfa.ndim == 3:
        if not bool((cfa == cfa[:1]).all()):
            return torch.cat([unpack_bayer(packed[i : i + 1], cfa[i]) for i in range(cfa.shape[0])])
        cfa = cfa[0]
    if packed.ndim != 4 or packed.shape[1] != 4:
        raise InputError(f"packed Bayer RAW must be (B,4,h,w), got {tuple(packed.shape)}")
    return F.pixel_shuffle(packed[:, bayer_site_order(cfa)], 2)


def bayer_site_order(cfa) -> list[int]:
    """Packed channel (R, G, B, G2 order) found at each site (0,0), (0,1), (1,0), (1,1): pixel_shuffle's order. cfa (2,2)."""
    sites = bayer_sites(torch.as_tensor(cfa))
    return [sites.index((i, j)) for i in range(2) for j in range(2)]


def pack_xtrans(mosaic: torch.Tensor) -> torch.Tensor:
    """Pack an X-Trans mosaic as SID does. (B,1,H,W), H and W multiples of 6 -> (B,9,H/3,W/3)."""
    _check_mosaic(mosaic, 6)
    batch, _, height, width = mosaic.shape
    sites = F.pixel_unshuffle(mosaic, 6)[:, _XTRANS_ORDER.to(mosaic.device)]  # (B, 36, H/6, W/6)
    sites = sites.view(batch, 9, 4, height // 6, width // 6)
    return F.pixel_shuffle(sites.reshape(batch * 9, 4, height // 6, width // 6), 2).view(batch, 9, height // 3, width // 3)


def unpack_xtrans(packed: torch.Tensor) -> torch.Tensor:
    """Exact inverse of pack_xtrans. (B,9,h,w), h and w even -> (B,1,3h,3w)."""
    if packed.ndim != 4 or packed.shape[1] != 9 or packed.shape[-2] % 2 or packed.shape[-1] % 2:
        raise InputError(f"packed X-Trans RAW must be (B,9,h,w) with h, w even, got {tuple(packed.shape)}")
    batch, _, h, w = packed.shape
    sites = F.pixel_unshuffle(packed.reshape(batch * 9, 1, h, w), 2).view(batch, 36, h // 2, w // 2)
    return F.pixel_shuffle(sites[:, _XTRANS_INVERSE.to(packed.device)], 6)


def downsample_packed(packed: torch.Tensor, levels: int) -> torch.Tensor:
    """Exact 2**levels x 2**levels block mean of packed RAW. (B,C,h,w) -> (B,C,h >> levels,w >> levels).

    Every packed plane holds one colour (Bayer: one CFA site; SID's X-Trans: one colour), so the
    mean never mixes colours: it is the packed RAW of a sensor with 2**levels times coarser
    sites. Sides that are not multiples of 2**levels lose their last rows/columns (crop, not
    ceil: a partial block would average fewer sites than the others). levels 0 -> `packed` itself.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise InputError(f"downsample_packed: levels must be an integer >= 0, got {levels!r}")
    if not isinstance(packed, torch.Tensor) or packed.ndim != 4:
        raise InputError(f"downsample_packed: packed RAW must be a (B,C,h,w) tensor, got {tuple(getattr(packed, 'shape', ()))}")
    if levels == 0:
        return packed
    block = 2**levels
    height, width = packed.shape[-2] // block, packed.shape[-1] // block
    if height == 0 or width == 0:
        raise InputError(f"downsample_packed: {tuple(packed.shape[-2:])} packed RAW is smaller than one {block}x{block} block")
    return F.avg_pool2d(packed[..., : height * block, : width * block], block)


def pack(mosaic: torch.Tensor, cfa) -> torch.Tensor:
    """Pack any supported CFA: Bayer -> 4 channels, X-Trans -> 9. mosaic (B,1,H,W)."""
    period = torch.as_tensor(cfa).shape[-1]
    return pack_bayer(mosaic, cfa) if period == 2 else pack_xtrans(mosaic)


def unpack(packed: torch.Tensor, cfa) -> torch.Tensor:
    """Inverse of pack. -> (B,1,H,W)."""
    period = torch.as_tensor(cfa).shape[-1]
    return unpack_bayer(packed, cfa) if period == 2 else unpack_xtrans(packed)
