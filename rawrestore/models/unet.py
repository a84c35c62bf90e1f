"""SID U-Net (Chen et al., CVPR 2018), packed RAW -> packed RAW instead of SID's RAW -> sRGB."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rawrestore.errors import ConfigError, DataError
from rawrestore.models.scales import add_input, check_scales, crop_to_scale

NUM_LEVELS = 5  # 32-64-128-256-512: four 2x poolings, so inputs are padded to a multiple of 16
DECODER_LEVELS = NUM_LEVELS - 1  # full, 1/2, 1/4, 1/8: the most outputs `scales` may ask for


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Pad (B,C,H,W) on the bottom/right to multiples of `multiple` -> (padded, H, W) for cropping.

    Reflect padding keeps the padded border statistically like the image (no black frame that
    the network would learn to restore); when a side is too small to reflect, replicate is used.
    """
    height, width = x.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, height, width
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), height, width


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by LeakyReLU. (B,in,H,W) -> (B,out,H,W)."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.2):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(negative_slope),
        )
        self.out_channels = out_channels


class UNet(nn.Module):
    """SID U-Net. x (B,C,H,W) packed linear RAW, any H, W -> (B,out_channels,H,W) packed RAW.

    Five levels of two 3x3 conv + LeakyReLU(0.2), 2x2 max-pool down, 2x2 transposed-conv up and
    concatenation with the skip, a final 1x1 conv. Level widths are `c, 2c, 4c, 8c, 16c` with
    `c = round(base * width_mult)` (SID: 32-64-128-256-512). `in_channels` is 4 for packed Bayer,
    9 for packed X-Trans. With `residual=True` the input (already exposure-aligned) is added to
    the output, so the network predicts a correction. H and W need not be multiples of 16: the
    input is reflect-padded and the output cropped back.

    `scales=n > 1` adds a 1x1 head (like the final one) on the decoder levels at 1/2 ... 1/2**(n-1)
    and, in training mode only, returns (full, 1/2, ...) (`rawrestore.models.scales`); with
    `residual` each coarse output adds the input block-averaged to its size.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        base: int = 32,
        width_mult: float = 1.0,
        residual: bool = False,
        negative_slope: float = 0.2,
        scales: int = 1,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(
                f"UNet: in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}"
            )
        if residual and out_channels != in_channels:
            raise ConfigError(
                f"UNet: residual=True needs out_channels == in_channels, got {out_channels} != {in_channels}"
            )
        first = round(base * width_mult)
        if first < 1:
            raise ConfigError(f"UNet: base * width_mult must give >= 1 channel, got {base} * {width_mult}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.residual = residual
        self.scales = check_scales("UNet", scales, DECODER_LEVELS)
        self.widths: tuple[int, ...] = tuple(first * 2**level for level in range(NUM_LEVELS))

        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in self.widths:
            self.encoder.append(DoubleConv(previous, width, negative_slope))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(self.widths[:-1]):
            self.upsample.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            self.decoder.append(DoubleConv(2 * width, width, negative_slope))
            previous = width
        self.head = nn.Conv2d(previous, out_channels, 1)
        # the decoder level at 1/2**scale has widths[scale] channels
        self.scale_heads = nn.ModuleList(nn.Conv2d(self.widths[scale], out_channels, 1) for scale in range(1, self.scales))
        self.reset_parameters(negative_slope)

    @property
    def size_multiple(self) -> int:
        """Spatial size the network works on internally (inputs are padded up to it)."""
        return 2 ** (NUM_LEVELS - 1)

    def reset_parameters(self, negative_slope: float = 0.2) -> None:
        """He init for the LeakyReLU convs, zero biases; deterministic under torch.manual_seed."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, a=negative_slope, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x (B,in_channels,H,W) packed RAW -> (B,out_channels,H,W); training with scales > 1: (full, 1/2, ...)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DataError(
                f"UNet expects (B,{self.in_channels},H,W) packed RAW, got shape {tuple(x.shape)}"
            )
        padded, height, width = pad_to_multiple(x, self.size_multiple)
        skips = []
        features = padded
        for level, block in enumerate(self.encoder):
            if level > 0:
                features = self.pool(features)
            features = block(features)
            skips.append(features)
        skips.pop()  # the bottleneck has no skip partner
        coarse: dict[int, torch.Tensor] = {}
        for index, (upsample, block) in enumerate(zip(self.upsample, self.decoder)):
            features = block(torch.cat([upsample(features), skips.pop()], dim=1))
            scale = len(self.decoder) - 1 - index
            if self.training and 0 < scale < self.scales:
                coarse[scale] = crop_to_scale(self.scale_heads[scale - 1](features), scale, height, width)
        out = self.head(features)[..., :height, :width]
        outputs = (out, *(coarse[scale] for scale in range(1, self.scales))) if coarse else out
        return add_input(outputs, x) if self.residual else outputs
