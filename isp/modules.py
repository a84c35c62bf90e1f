"""Thin nn.Module wrappers of the `isp.ops` functions, for composing pipelines."""
from __future__ import annotations

import torch
from torch import nn

from . import ops


class Normalize(nn.Module):
    """(B,1,H,W) DN -> normalised; black (B,P,P), white (B,) given per call."""

    def forward(self, mosaic, black_level, white_level):
        return ops.normalize(mosaic, black_level, white_level)


class WhiteBalance(nn.Module):
    """(B,1,H,W) -> (B,1,H,W) with per-site gains from (B,3) multipliers."""

    def forward(self, mosaic, cfa, gains):
        return ops.white_balance(mosaic, cfa, gains)


class Demosaic(nn.Module):
    """(B,1,H,W) -> (B,3,H,W) ('bilinear', 'malvar') or (B,3,H/P,W/P) ('half')."""

    def __init__(self, method: str = "bilinear"):
        super().__init__()
        self.method = method

    def forward(self, mosaic, cfa):
        return ops.demosaic(mosaic, cfa, self.method)


class ColorMatrix(nn.Module):
    """(B,3,H,W) camera RGB -> (B,3,H,W) through a (B,3,3) matrix."""

    def forward(self, rgb, matrix):
        return ops.apply_matrix(rgb, matrix)


class Curve(nn.Module):
    """Transfer curve 'srgb' | 'bt709' | 'linear' on (B,3,H,W)."""

    def __init__(self, gamma: str = "srgb"):
        super().__init__()
        self.gamma = gamma

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return ops.apply_curve(rgb, self.gamma)
