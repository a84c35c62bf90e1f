"""NAFNet (Chen, Chu, Zhang, Sun, ECCV 2022): a nonlinear-activation-free restorer, packed -> packed."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rawrestore.errors import ConfigError, DataError
from rawrestore.models.scales import add_input, check_scales, crop_to_scale
from rawrestore.models.unet import pad_to_multiple


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels with a per-channel affine. (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W) -> normalised over C at every pixel, then scaled and shifted per channel."""
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        normalised = (x - mean) / torch.sqrt(var + self.eps)
        return normalised * self.weight[:, None, None] + self.bias[:, None, None]


def simple_gate(x: torch.Tensor) -> torch.Tensor:
    """SimpleGate: split channels in two halves and multiply. (B,2C,H,W) -> (B,C,H,W)."""
    first, second = x.chunk(2, dim=1)
    return first * second


class SimpleGate(nn.Module):
    """Module form of `simple_gate`. (B,2C,H,W) -> (B,C,H,W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simple_gate(x)


class NAFBlock(nn.Module):
    """NAFNet block. (B,C,H,W) -> (B,C,H,W).

    Spatial branch: LayerNorm, 1x1 expand, depthwise 3x3, SimpleGate, simplified channel
    attention (global average pool + 1x1, multiplied in), 1x1 project; added with scale `beta`.
    Channel branch: LayerNorm, 1x1 expand, SimpleGate, 1x1 project; added with scale `gamma`.
    `beta` and `gamma` start at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw_channels = channels * dw_expand
        ffn_channels = channels * ffn_expand
        self.norm1 = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, dw_channels, 1)
        self.depthwise = nn.Conv2d(dw_channels, dw_channels, 3, padding=1, groups=dw_channels)
        self.gate = SimpleGate()
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw_channels // 2, dw_channels // 2, 1)
        )
        self.project = nn.Conv2d(dw_channels // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.ffn_expand = nn.Conv2d(channels, ffn_channels, 1)
        self.ffn_project = nn.Conv2d(ffn_channels // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W) -> (B,C,H,W)."""
        spatial = self.gate(self.depthwise(self.expand(self.norm1(x))))
        spatial = self.project(spatial * self.channel_attention(spatial))
        y = x + spatial * self.beta
        channel = self.ffn_project(self.gate(self.ffn_expand(self.norm2(y))))
        return y + channel * self.gamma


class NAFNet(nn.Module):
    """NAFNet encoder/decoder. x (B,C,H,W) packed linear RAW, any H, W -> (B,out_channels,H,W).

    A 3x3 intro conv to `width` channels; per encoder level `enc_blocks[i]` NAFBlocks then a
    2x2 stride-2 conv that doubles the channels; `middle_blocks` NAFBlocks at the bottom; per
    decoder level a 1x1 conv + PixelShuffle(2) that halves the channels, an additive skip and
    `dec_blocks[i]` NAFBlocks; a 3x3 ending conv. `residual=True` adds the (exposure-aligned)
    input to the output. H, W are reflect-padded to a multiple of 2**len(enc_blocks) and the
    output cropped back. Paper defaults (width 32): enc (1, 1, 1, 28), middle 1, dec (1, 1, 1, 1).

    `scales=n > 1` (n <= len(enc_blocks), the decoder levels) adds a 3x3 head (like the ending)
    on the decoder levels at 1/2 ... 1/2**(n-1) and, in training mode only, returns (full, 1/2, ...)
    (`rawrestore.models.scales`); with `residual` each coarse output adds the input block-averaged to its size.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        width: int = 32,
        enc_blocks: Sequence[int] = (1, 1, 1, 28),
        middle_blocks: int = 1,
        dec_blocks: Sequence[int] | None = None,
        residual: bool = False,
        dw_expand: int = 2,
        ffn_expand: int = 2,
        scales: int = 1,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        enc_blocks = list(enc_blocks)
        dec_blocks = [1] * len(enc_blocks) if dec_blocks is None else list(dec_blocks)
        if in_channels < 1 or out_channels < 1 or width < 1:
            raise ConfigError(
                f"NAFNet: in_channels, out_channels and width must be >= 1, "
                f"got {in_channels}, {out_channels}, {width}"
            )
        if residual and out_channels != in_channels:
            raise ConfigError(
                f"NAFNet: residual=True needs out_channels == in_channels, got {out_channels} != {in_channels}"
            )
        if len(dec_blocks) != len(enc_blocks):
            raise ConfigError(
                f"NAFNet: dec_blocks needs one entry per encoder level ({len(enc_blocks)}), got {dec_blocks}"
            )
        if any(n < 0 for n in [*enc_blocks, *dec_blocks, middle_blocks]):
            raise ConfigError("NAFNet: block counts must be >= 0")
        if dw_expand < 2 or ffn_expand < 2 or dw_expand % 2 or ffn_expand % 2:
            # SimpleGate halves the expanded channels, so an odd expansion cannot be split
            raise ConfigError(
                f"NAFNet: dw_expand and ffn_expand must be even and >= 2, got {dw_expand}, {ffn_expand}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.residual = residual
        self.scales = check_scales("NAFNet", scales, len(enc_blocks))

        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for count in enc_blocks:
            self.encoders.append(
                nn.Sequential(*[NAFBlock(channels, dw_expand, ffn_expand) for _ in range(count)])
            )
            self.downs.append(nn.Conv2d(channels, 2 * channels, 2, stride=2))
            channels *= 2
        self.middle = nn.Sequential(*[NAFBlock(channels, dw_expand, ffn_expand) for _ in range(middle_blocks)])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for count in dec_blocks:
            self.ups.append(
                nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, bias=False), nn.PixelShuffle(2))
            )
            channels //= 2
            self.decoders.append(
                nn.Sequential(*[NAFBlock(channels, dw_expand, ffn_expand) for _ in range(count)])
            )
        self.ending = nn.Conv2d(width, out_channels, 3, padding=1)
        # the decoder level at 1/2**scale has width * 2**scale channels
        self.scale_heads = nn.ModuleList(
            nn.Conv2d(width * 2**scale, out_channels, 3, padding=1) for scale in range(1, self.scales)
        )

    @property
    def size_multiple(self) -> int:
        """Spatial size the network works on internally (inputs are padded up to it)."""
        return 2 ** len(self.encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x (B,in_channels,H,W) packed RAW -> (B,out_channels,H,W); training with scales > 1: (full, 1/2, ...)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DataError(
                f"NAFNet expects (B,{self.in_channels},H,W) packed RAW, got shape {tuple(x.shape)}"
            )
        padded, height, width = pad_to_multiple(x, self.size_multiple)
        features = self.intro(padded)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            features = encoder(features)
            skips.append(features)
            features = down(features)
        features = self.middle(features)
        coarse: dict[int, torch.Tensor] = {}
        for index, (up, decoder) in enumerate(zip(self.ups, self.decoders)):
            features = decoder(up(features) + skips.pop())
            scale = len(self.decoders) - 1 - index
            if self.training and 0 < scale < self.scales:
                coarse[scale] = crop_to_scale(self.scale_heads[scale - 1](features), scale, height, width)
        out = self.ending(features)[..., :height, :width]
        outputs = (out, *(coarse[scale] for scale in range(1, self.scales))) if coarse else out
        return add_input(outputs, x) if self.residual else outputs
