"""Exposure alignment: scale a short exposure by the exposure ratio (SID's amplification).

SID multiplies the black-level-normalised short exposure by `ratio = min(long_s / short_s, 300)`
before the network sees it. The dataset and the losses both use these two functions so the
ratio is computed and applied in exactly one way.
"""
from __future__ import annotations

import math
import numbers

import torch

from rawrestore.config.schema import SID_RATIO_CAP
from rawrestore.errors import DataError, InputError



def exposure_ratio(short_s: float, long_s: float, cap: float = SID_RATIO_CAP, strict: bool = False) -> float:
    """Exposure ratio (dimensionless) of two exposure times in seconds: min(long_s / short_s, cap).

    With `strict=True` a ratio above `cap` raises DataError instead of being capped. Zero,
    negative or non-finite exposure times raise DataError; a non-positive cap raises InputError.
    """
    if not (isinstance(cap, numbers.Real) and math.isfinite(cap) and cap > 0):
        raise InputError(f"exposure ratio cap must be a positive finite number, got {cap}")
    for name, value in (("short", short_s), ("long", long_s)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise DataError(f"{name} exposure must be a positive number of seconds, got {value!r}; check the file name or EXIF")
    ratio = float(long_s) / float(short_s)
    if ratio > cap:
        if strict:
            raise DataError(
                f"exposure ratio {ratio:g} ({long_s}s / {short_s}s) exceeds the cap {cap:g}; "
                "raise the cap or pass strict=False to clamp it as SID does"
            )
        return float(cap)
    return ratio


def align_exposure(short: torch.Tensor, ratio: float | torch.Tensor, clip: bool = False, checked: bool = False) -> torch.Tensor:
    """Amplified short exposure. short (B,C,H,W) normalised, ratio float or (B,) -> (B,C,H,W) short * ratio.

    With `clip=True` the result is clamped to [0, 1] (SID's `np.minimum(x * ratio, 1)` after its
    `max(raw - black, 0)`); differentiable either way (clamp has zero gradient where it clips).
    `checked=True`: the caller vouches that tensor ratios are positive and finite (not read back to check).
    """
    if not isinstance(short, torch.Tensor) or short.ndim != 4:
        raise InputError(f"short exposure must be a (B,C,H,W) tensor, got {getattr(short, 'shape', type(short).__name__)}")
    if isinstance(ratio, torch.Tensor):
        if ratio.ndim == 0:
            ratio = ratio.reshape(1)
        if ratio.ndim != 1 or ratio.shape[0] not in (1, short.shape[0]):
            raise InputError(f"ratio must be a float or a (B,) tensor with B={short.shape[0]}, got shape {tuple(ratio.shape)}")
        if not checked and (bool((ratio <= 0).any()) or not bool(torch.isfinite(ratio).all())):
            raise InputError("exposure ratios must be positive and finite; compute them with exposure_ratio()")
        scale = ratio.to(device=short.device, dtype=short.dtype).reshape(-1, 1, 1, 1)
    else:
        if not (isinstance(ratio, numbers.Real) and math.isfinite(ratio) and ratio > 0):
            raise InputError(f"exposure ratio must be a positive finite number, got {ratio!r}")
        scale = float(ratio)
    aligned = short * scale
    return aligned.clamp(0.0, 1.0) if clip else aligned


__all__ = ["SID_RATIO_CAP", "exposure_ratio", "align_exposure"]
