"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, Isola et al. 2017) for the adversarial loss on sRGB renders.

sRGB (B,3,H,W) in [0,1] -> logits (B,1,h,w), one per overlapping patch: `n_layers` stride-2 4x4
convolutions (the first without normalisation), one stride-1 4x4 convolution, then a 4x4
convolution to one channel; LeakyReLU 0.2 between them, channels `width * min(2^i, 8)`. With
`n_layers` 3 every logit sees a 70x70 patch (`receptive_field`). `norm` "instance" is pix2pix's
affine-free InstanceNorm (no running statistics, so no state but the weights); `spectral_norm`
wraps every convolution in torch's spectral-norm parametrisation (Miyato et al. 2018), whose
power-iteration vectors are buffers in the state dict. Not in `MODELS`: it is no restoration
network; `rawrestore.losses.adversarial` builds it.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rawrestore.errors import ConfigError, InputError

__all__ = ["PatchDiscriminator", "receptive_field", "min_input_size", "patch_grid"]

_KERNEL, _PADDING = 4, 1
MAX_WIDTH_MULT = 8  # channels stop doubling at 8x the first layer's, as pix2pix


def _strides(n_layers: int) -> list[int]:
    """Strides of the convolutions, first to last: n_layers x 2, then 1 (features) and 1 (logits)."""
    return [2] * n_layers + [1, 1]


def receptive_field(n_layers: int) -> int:
    """Side in pixels of the input patch one logit sees. 3 -> 70 (pix2pix's 70x70 PatchGAN), 1 -> 16."""
    field = 1
    for stride in reversed(_strides(n_layers)):
        field = (field - 1) * stride + _KERNEL
    return field


def patch_grid(size: int, n_layers: int) -> int:
    """Logits along a side of `size` input pixels (each 4x4 convolution pads by 1). 64, 3 -> 6."""
    for stride in _strides(n_layers):
        size = (size + 2 * _PADDING - _KERNEL) // stride + 1
    return size


def min_input_size(n_layers: int) -> int:
    """Smallest input side that still gives one logit (and instance-normalised maps of >= 2 pixels). 3 -> 24."""
    size = 1
    while patch_grid(size, n_layers) < 1:
        size += 1
    return size


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator. sRGB (B,3,H,W) in [0,1] -> (B,1,h,w) logits, h = patch_grid(H, n_layers)."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3,
                 norm: Literal["instance", "none"] = "instance", spectral_norm: bool = False):
        super().__init__()
        if width < 1 or n_layers < 1:
            raise ConfigError(f"PatchDiscriminator: width and n_layers must be >= 1, got {width}, {n_layers}")
        if norm not in ("instance", "none"):
            raise ConfigError(f"PatchDiscriminator: norm must be 'instance' or 'none', got {norm!r}")
        self.n_layers = n_layers
        bias = norm == "none"  # a bias before an affine-free instance norm is cancelled by it

        def conv(cin: int, cout: int, stride: int, with_bias: bool) -> nn.Module:
            layer = nn.Conv2d(cin, cout, _KERNEL, stride=stride, padding=_PADDING, bias=with_bias)
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        def normalised(channels: int) -> list[nn.Module]:
            return [nn.InstanceNorm2d(channels)] if norm == "instance" else []

        layers: list[nn.Module] = [conv(in_channels, width, 2, True), nn.LeakyReLU(0.2)]
        channels = width
        for index in range(1, n_layers + 1):
            out = width * min(2 ** index, MAX_WIDTH_MULT)
            stride = 2 if index < n_layers else 1
            layers += [conv(channels, out, stride, bias), *normalised(out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(conv(channels, 1, 1, True))
        self.body = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Side of the input patch one logit sees."""
        return receptive_field(self.n_layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise InputError(f"PatchDiscriminator: expected a (B,C,H,W) image, got {getattr(image, 'shape', type(image).__name__)}")
        smallest = min_input_size(self.n_layers)
        if min(image.shape[-2:]) < smallest:
            raise InputError(f"PatchDiscriminator: a {tuple(image.shape[-2:])} render is smaller than the {smallest} pixels "
                             f"{self.n_layers} layers need; use a larger data.crop_size or fewer loss.gan.n_layers")
        return self.body(image * 2.0 - 1.0)  # [0, 1] -> [-1, 1], pix2pix's input range
