"""Pixel crosstalk on the full-resolution CFA mosaic: a 3x3 kernel per site of the CFA period.

Convention (gather, or "apply", form). A kernel is a tensor `k` of shape (P, P, 3, 3), P the
CFA period (2 Bayer, 6 X-Trans), indexed from the mosaic's top-left pixel exactly like the CFA
(crop a mosaic by whole periods to keep the phase). Output pixel (i, j) is

    y[i, j] = sum_{dy, dx in -1..1} k[i % P, j % P, dy + 1, dx + 1] * x[i + dy, j + dx]

with ZERO padding: pixels outside the image are 0 (light that would leak in from beyond the
border is absent, light leaking out of the image is lost). `apply_crosstalk_transpose` is the
exact adjoint of this operator for that padding, `<K x, y> == <x, K^T y>` to rounding:

    (K^T y)[m] = sum_{d} k[(m - d) % P, d + 1] * y[m - d]      (2-D indices, d = (dy, dx))

Energy. The gather form says where each OUTPUT pixel reads from; its per-site tap sums
`k.sum((-2, -1))` are the gain on a flat field. Total energy is kept when every INPUT pixel
hands out exactly its charge, i.e. when the scatter sums `site_energy(k)` (the adjoint applied
to ones, per source site) are 1. For a kernel that is the same at every site the two coincide;
for site-dependent kernels they differ, and `energy_preserving` validation checks the scatter
sums. `uniform_kernel(P, alpha)` models each pixel leaking `alpha` of its charge to each of its
four edge neighbours and keeping `1 - 4 alpha`: centre tap `1 - 4 alpha`, edge taps `alpha`,
diagonals 0, the same in both forms, so interior energy is kept exactly. A physically specified
scatter kernel ("a pixel at site s sends fraction S[s, d] to offset d") becomes gather form with
`adjoint_kernel(S)`.

Implementation: after `pixel_unshuffle(P)` each CFA site is a channel, and the per-site 3x3
operator becomes one ordinary 3x3 convolution from P*P to P*P channels (a tap at offset d from
site s reads site (s + d) % P of the block (s + d) // P away). `conv2d` applies it and
`conv_transpose2d` with the same weight is its exact adjoint; no Python loop touches pixels.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rawrestore.errors import ConfigError, InputError

_ENERGY_TOLERANCE = 1e-5


def identity_kernel(period: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """No crosstalk. period P -> (P,P,3,3) with centre tap 1 and all others 0."""
    _check_period(period)
    kernel = torch.zeros(period, period, 3, 3, dtype=dtype)
    kernel[:, :, 1, 1] = 1.0
    return kernel


def uniform_kernel(period: int, alpha: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Leak `alpha` (fraction of charge) to each edge neighbour. -> (P,P,3,3), centre 1 - 4 alpha, edges alpha.

    Energy-preserving in both gather and scatter form; 0 <= alpha <= 0.25 keeps every tap >= 0.
    """
    _check_period(period)
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and 0.0 <= alpha <= 0.25):
        raise ConfigError(f"crosstalk alpha must be a number in [0, 0.25] (fraction leaked to each edge neighbour), got {alpha!r}")
    kernel = torch.zeros(period, period, 3, 3, dtype=dtype)
    kernel[:, :, 1, 1] = 1.0 - 4.0 * alpha
    kernel[:, :, 0, 1] = alpha
    kernel[:, :, 2, 1] = alpha
    kernel[:, :, 1, 0] = alpha
    kernel[:, :, 1, 2] = alpha
    return kernel


def adjoint_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Gather kernel of the adjoint operator. (P,P,3,3) -> (P,P,3,3), k'[t, e] = k[(t + e) % P, -e].

    Also converts a scatter-form kernel into gather form and back (the map is its own inverse).
    """
    _check_kernel_shape(kernel)
    taps = [
        torch.roll(kernel[:, :, 1 - ey, 1 - ex], shifts=(-ey, -ex), dims=(0, 1))
        for ey in (-1, 0, 1)
        for ex in (-1, 0, 1)
    ]
    return torch.stack(taps, dim=-1).reshape(kernel.shape)


def site_energy(kernel: torch.Tensor) -> torch.Tensor:
    """Fraction of an interior pixel's charge that the operator keeps, per source site. (P,P,3,3) -> (P,P)."""
    return adjoint_kernel(kernel).sum(dim=(-2, -1))


def apply_crosstalk(mosaic: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Apply crosstalk. mosaic (B,C,H,W) (C=1 for a mosaic), kernel (P,P,3,3) -> (B,C,H,W), zero padding.

    Differentiable in both arguments; runs on the mosaic's device and dtype (the kernel is cast).
    """
    _check_inputs(mosaic, kernel)
    blocks, restore = _to_blocks(mosaic, kernel.shape[0])
    return restore(F.conv2d(blocks, _block_weight(kernel, mosaic), padding=1))


def apply_crosstalk_transpose(mosaic: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Adjoint of apply_crosstalk for the same kernel. mosaic (B,C,H,W), kernel (P,P,3,3) -> (B,C,H,W)."""
    _check_inputs(mosaic, kernel)
    blocks, restore = _to_blocks(mosaic, kernel.shape[0])
    return restore(F.conv_transpose2d(blocks, _block_weight(kernel, mosaic), padding=1))


def _to_blocks(mosaic: torch.Tensor, period: int):
    """(B,C,H,W) -> (B*C, P*P, H'/P, W'/P) space-to-depth of the mosaic zero-padded to whole periods, and its inverse."""
    batch, channels, height, width = mosaic.shape
    height_p, width_p = _ceil_to(height, period), _ceil_to(width, period)
    padded = F.pad(mosaic, (0, width_p - width, 0, height_p - height)).reshape(batch * channels, 1, height_p, width_p)

    def restore(blocks: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(blocks, period).reshape(batch, channels, height_p, width_p)[..., :height, :width]

    return F.pixel_unshuffle(padded, period), restore


@functools.lru_cache(maxsize=None)
def _block_taps(period: int) -> tuple[tuple[int, ...], ...]:
    """Where tap (site, dy, dx) lands in the block-space conv weight: (out channel, in channel, ky, kx) lists."""
    out_ch, in_ch, ky, kx = [], [], [], []
    for row in range(period):
        for col in range(period):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    out_ch.append(row * period + col)
                    in_ch.append(((row + dy) % period) * period + (col + dx) % period)
                    ky.append((row + dy) // period + 1)
                    kx.append((col + dx) // period + 1)
    return tuple(out_ch), tuple(in_ch), tuple(ky), tuple(kx)


def _block_weight(kernel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(P,P,3,3) per-site kernel -> (P*P, P*P, 3, 3) conv weight acting on pixel_unshuffle(P) blocks.

    A tap at offset d from site s reads site (s + d) % P of the block (s + d) // P away, so the
    per-site operator is one dense-by-block 3x3 convolution (and its transpose conv the adjoint).
    """
    period = kernel.shape[0]
    index = tuple(torch.tensor(v, device=like.device) for v in _block_taps(period))
    weight = torch.zeros(period * period, period * period, 3, 3, device=like.device, dtype=like.dtype)
    return weight.index_put(index, kernel.to(device=like.device, dtype=like.dtype).reshape(-1))


def validate_kernel(kernel: torch.Tensor | np.ndarray, period: int, energy_preserving: bool = True,
                    source: str = "crosstalk kernel") -> torch.Tensor:
    """Check and broadcast a kernel. (P,P,3,3) or (3,3) array -> (P,P,3,3) float32 tensor; ConfigError if bad."""
    _check_period(period, error=ConfigError)
    array = np.asarray(kernel.detach().cpu() if isinstance(kernel, torch.Tensor) else kernel)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ConfigError(f"{source}: taps must be real numbers, got dtype {array.dtype}")
    if array.shape == (3, 3):
        array = np.broadcast_to(array, (period, period, 3, 3))
    if array.shape != (period, period, 3, 3):
        raise ConfigError(f"{source}: shape must be ({period},{period},3,3) or (3,3) for CFA period {period}, got {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ConfigError(f"{source}: has NaN or infinite taps; every tap must be a finite number")
    if (array < 0).any():
        site = tuple(int(v) for v in np.argwhere(array < 0)[0])
        raise ConfigError(f"{source}: negative tap {array[site]:g} at index {site}; crosstalk taps must be >= 0")
    result = torch.from_numpy(np.ascontiguousarray(array))
    if energy_preserving:
        energy = site_energy(result)
        worst = torch.argmax((energy - 1.0).abs()).item()
        row, col = divmod(worst, period)
        if abs(energy[row, col].item() - 1.0) > _ENERGY_TOLERANCE:
            raise ConfigError(
                f"{source}: not energy preserving: charge leaving site ({row},{col}) sums to "
                f"{energy[row, col].item():.6g}, not 1 (sum over d of k[(s-d)%P, d]); renormalise it or pass energy_preserving=False"
            )
    return result.to(torch.float32)


def load_kernel(path: str | os.PathLike, period: int, energy_preserving: bool = True) -> torch.Tensor:
    """Load a gather-form kernel from `.npy`. (P,P,3,3) or (3,3) array -> (P,P,3,3) float32; ConfigError if bad."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ConfigError(f"crosstalk kernel {path}: expected a .npy file")
    if not path.is_file():
        raise ConfigError(f"crosstalk kernel {path}: file not found; give an existing .npy path, 'identity' or 'uniform(alpha)'")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"crosstalk kernel {path}: not a readable .npy array ({exc})") from None
    return validate_kernel(array, period, energy_preserving=energy_preserving, source=f"crosstalk kernel {path}")


_UNIFORM_SPEC = re.compile(r"^uniform\(\s*([^)]*?)\s*\)$")


def build_kernel(spec: str, period: int, energy_preserving: bool = True) -> torch.Tensor:
    """Kernel from a config string: "identity", "uniform(<alpha>)" or a .npy path. -> (P,P,3,3) float32."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"crosstalk kernel spec must be 'identity', 'uniform(alpha)' or a .npy path, got {spec!r}")
    spec = spec.strip()
    if spec == "identity":
        _check_period(period, error=ConfigError)
        return identity_kernel(period)
    match = _UNIFORM_SPEC.match(spec)
    if match:
        try:
            alpha = float(match.group(1))
        except ValueError:
            raise ConfigError(f"crosstalk kernel spec {spec!r}: alpha must be a number, e.g. 'uniform(0.02)'") from None
        _check_period(period, error=ConfigError)
        return uniform_kernel(period, alpha)
    if spec.startswith("uniform"):
        raise ConfigError(f"crosstalk kernel spec {spec!r} is malformed; write it as 'uniform(0.02)'")
    return load_kernel(spec, period, energy_preserving=energy_preserving)


class Crosstalk(nn.Module):
    """Module form of apply_crosstalk. (B,C,H,W) -> (B,C,H,W); the kernel is a buffer, or a Parameter if learnable."""

    def __init__(self, kernel: torch.Tensor, learnable: bool = False):
        super().__init__()
        _check_kernel_shape(kernel)
        kernel = kernel.detach().clone().to(torch.float32)
        if learnable:
            self.kernel = nn.Parameter(kernel)
        else:
            self.register_buffer("kernel", kernel)

    def forward(self, mosaic: torch.Tensor) -> torch.Tensor:
        """Crosstalk applied. (B,C,H,W) -> (B,C,H,W)."""
        return apply_crosstalk(mosaic, self.kernel)

    def transpose(self, mosaic: torch.Tensor) -> torch.Tensor:
        """Adjoint applied. (B,C,H,W) -> (B,C,H,W)."""
        return apply_crosstalk_transpose(mosaic, self.kernel)


def _ceil_to(size: int, period: int) -> int:
    return -(-size // period) * period


def _check_period(period: int, error: type[InputError] = InputError) -> None:
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise error(f"CFA period must be a positive integer (2 Bayer, 6 X-Trans), got {period!r}")


def _check_kernel_shape(kernel: torch.Tensor) -> None:
    if not isinstance(kernel, torch.Tensor) or kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2:] != (3, 3):
        raise InputError(
            f"crosstalk kernel must be a (P,P,3,3) tensor, got {getattr(kernel, 'shape', type(kernel).__name__)}; "
            "build one with identity_kernel, uniform_kernel or build_kernel"
        )


def _check_inputs(mosaic: torch.Tensor, kernel: torch.Tensor) -> None:
    if not isinstance(mosaic, torch.Tensor) or mosaic.ndim != 4:
        raise InputError(f"mosaic must be a (B,C,H,W) tensor, got {getattr(mosaic, 'shape', type(mosaic).__name__)}")
    _check_kernel_shape(kernel)


__all__ = [
    "identity_kernel",
    "uniform_kernel",
    "adjoint_kernel",
    "site_energy",
    "apply_crosstalk",
    "apply_crosstalk_transpose",
    "validate_kernel",
    "load_kernel",
    "build_kernel",
    "Crosstalk",
]


def check_kernel_spec(spec: str) -> None:
    """Fail now (ConfigError) on a kernel spec that fits neither CFA period: bad spelling, missing file."""
    try:
        build_kernel(spec, 2)
    except ConfigError as bayer_error:
        try:
            build_kernel(spec, 6)
        except ConfigError:
            raise bayer_error from None
