"""Noise-conditioned restoration: the network sees the input and its measured noise level."""
from __future__ import annotations

import torch
from torch import nn

from rawrestore.errors import DataError
from rawrestore.models.scales import add_input
from rawrestore.physics.noise_level import noise_map


class NoiseConditioned(nn.Module):
    """Wrap a packed-RAW network with one extra input channel, the input's noise map.

    x (B,C,h,w) aligned packed RAW -> net(cat[x, sigma(x)]) (B,C,h,w) (+ x when `residual`), where
    sigma is the per-pixel noise standard deviation measured from x itself
    (`rawrestore.physics.noise_level`), so it needs no metadata and works the same on training
    crops, evaluation frames and inference tiles. `net` takes C + 1 channels and returns C; a net
    returning multi-scale outputs (training, `model.scales`) gets x added at each scale, block-averaged.
    """

    def __init__(self, net: nn.Module, in_channels: int, residual: bool = False):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.residual = residual

    @property
    def size_multiple(self) -> int:
        """The wrapped network's internal size multiple."""
        return int(getattr(self.net, "size_multiple", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x (B,in_channels,h,w) -> (B,in_channels,h,w), or the net's tuple of scales while training."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DataError(f"NoiseConditioned expects (B,{self.in_channels},H,W) packed RAW, got shape {tuple(x.shape)}")
        out = self.net(torch.cat([x, noise_map(x)], dim=1))
        return add_input(out, x) if self.residual else out
