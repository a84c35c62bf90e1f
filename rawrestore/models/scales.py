"""Multi-scale outputs (`model.scales`): the full-resolution prediction plus coarser ones, while training.

A network built with `scales=n > 1` has a light output head on each of its n - 1 finest
coarser decoder levels. In training mode it returns the tuple (full, 1/2, ..., 1/2**(n-1)) of
packed RAW, output i of shape (B,C,h >> i,w >> i), the shape of `isp.cfa.downsample_packed(
target, i)` that the loss compares it with; in eval mode it returns the full-resolution tensor
alone, so prediction, validation, evaluation and inference are unchanged. `scales=1` is the
single-output network, exactly as before.
"""
from __future__ import annotations

import torch

from isp.cfa import downsample_packed
from rawrestore.errors import ConfigError

__all__ = ["check_scales", "add_input", "crop_to_scale"]


def check_scales(network: str, scales: int, levels: int) -> int:
    """scales (an int) if 1 <= scales <= levels (the network's decoder levels), else a one-line ConfigError."""
    if isinstance(scales, bool) or not isinstance(scales, int) or not 1 <= scales <= levels:
        raise ConfigError(f"{network}: scales must be 1 to {levels} (one output per decoder level), got {scales!r}")
    return scales


def crop_to_scale(out: torch.Tensor, scale: int, height: int, width: int) -> torch.Tensor:
    """A padded level's output cropped to the full size's share. (B,C,H',W') -> (B,C,height >> scale,width >> scale)."""
    return out[..., : height >> scale, : width >> scale]


def add_input(outputs: torch.Tensor | tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Residual connection at every scale: output i + x downsampled like the target (`downsample_packed(x, i)`).

    outputs (B,C,h,w) or the tuple of `scales` outputs; x (B,C,h,w) the (aligned) input.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs + x
    return tuple(out + downsample_packed(x, scale) for scale, out in enumerate(outputs))
