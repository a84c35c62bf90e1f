"""Image-quality metrics as pure functions: one value per image, never pooled over the batch.

sRGB metrics take ``(B,3,H,W)`` encoded sRGB in [0,1]; raw metrics take packed RAW ``(B,C,H,W)``
(C = 4 for Bayer, 9 for X-Trans) normalised to [0,1]. Every function returns a float64 ``(B,)``
tensor on the input's device: per-pixel work runs in the input dtype and spatial means accumulate
in float64, as scikit-image does, so a reported number does not depend on the image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isp.color import delta_e2000, srgb_to_lab
from isp.errors import InputError
from rawrestore.metrics import ciede2000

__all__ = [
    "psnr",
    "ssim",
    "delta_e00",
    "lpips",
    "quantize_8bit",
    "raw_psnr",
    "raw_ssim",
]

# Wang et al. 2004 stability constants, as in scikit-image.
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(pred: torch.Tensor, target: torch.Tensor, name: str, channels: int | None) -> None:
    """Validate a (B,C,H,W) floating prediction/target pair. pred, target -> None."""
    for label, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name}: {label} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name}: {label} must be floating point in [0,1], got {x.dtype}")
        if x.dim() != 4:
            raise InputError(f"{name}: {label} must be (B,C,H,W), got shape {tuple(x.shape)}")
    if pred.shape != target.shape:
        raise InputError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if channels is not None and pred.shape[1] != channels:
        raise InputError(f"{name}: expected {channels} channels, got shape {tuple(pred.shape)}")


def quantize_8bit(image: torch.Tensor) -> torch.Tensor:
    """8-bit quantisation of the evaluation protocol. image (B,C,H,W) in [0,1] -> same shape, clipped, multiples of 1/255."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise InputError("quantize_8bit: expected a floating torch.Tensor in [0,1]")
    return torch.round(image.clamp(0.0, 1.0) * 255.0) / 255.0


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio. pred, target (B,C,H,W) -> (B,) float64 dB; inf for identical images."""
    _check_pair(pred, target, "psnr", channels=None)
    if not data_range > 0:
        raise InputError(f"psnr: data_range must be > 0, got {data_range}")
    squared_error = (pred - target) ** 2
    mse = squared_error.flatten(1).mean(dim=1, dtype=torch.float64)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian taps. size, sigma -> (size,) summing to 1."""
    offsets = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    taps = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return (taps / taps.sum()).to(dtype)


def _filter_valid(image: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable per-channel filter without padding. image (B,C,H,W), taps (K,) -> (B,C,H-K+1,W-K+1)."""
    channels = image.shape[1]
    size = taps.numel()
    rows = taps.view(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = taps.view(1, 1, 1, size).expand(channels, 1, 1, size)
    return F.conv2d(F.conv2d(image, rows, groups=channels), cols, groups=channels)


def _ssim_per_channel(
    pred: torch.Tensor,
    target: torch.Tensor,
    taps: torch.Tensor,
    data_range: float,
    covariance_norm: float,
) -> torch.Tensor:
    """Mean SSIM map per channel over the valid region. pred, target (B,C,H,W) -> (B,C) float64."""
    # Only the valid region is kept: scikit-image crops (K-1)//2 pixels from each border before
    # averaging, which is exactly the set of pixels whose window needs no padding.
    mu_p = _filter_valid(pred, taps)
    mu_t = _filter_valid(target, taps)
    var_p = covariance_norm * (_filter_valid(pred * pred, taps) - mu_p * mu_p)
    var_t = covariance_norm * (_filter_valid(target * target, taps) - mu_t * mu_t)
    cov = covariance_norm * (_filter_valid(pred * target, taps) - mu_p * mu_t)
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    numerator = (2.0 * mu_p * mu_t + c1) * (2.0 * cov + c2)
    denominator = (mu_p * mu_p + mu_t * mu_t + c1) * (var_p + var_t + c2)
    return (numerator / denominator).flatten(2).mean(dim=2, dtype=torch.float64)


def _check_window_fits(pred: torch.Tensor, size: int, name: str) -> None:
    """Reject images smaller than the SSIM window. pred (B,C,H,W) -> None."""
    if pred.shape[-2] < size or pred.shape[-1] < size:
        raise InputError(f"{name}: images must be at least {size}x{size} pixels, got {tuple(pred.shape[-2:])}")


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM, Gaussian 11x11 window, sigma 1.5, channel mean. pred, target (B,C,H,W) -> (B,) float64.

    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=...)``.
    """
    _check_pair(pred, target, "ssim", channels=None)
    sigma = 1.5
    # scikit-image's window: truncate 3.5 sigma -> radius int(3.5 * 1.5 + 0.5) = 5.
    size = 2 * int(3.5 * sigma + 0.5) + 1
    _check_window_fits(pred, size, "ssim")
    taps = _gaussian_window(size, sigma, pred.dtype, pred.device)
    return _ssim_per_channel(pred, target, taps, data_range, covariance_norm=1.0).mean(dim=1)


def delta_e00(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 over pixels. pred, target (B,3,H,W) sRGB in [0,1] -> (B,) float64 dE00.

    On the CPU without gradients: `metrics.ciede2000` (float64, chunked numpy + numba, 25x
    colour-science on a 1 MP pair here); otherwise the differentiable `isp.color` path in the inputs' dtype.
    """
    _check_pair(pred, target, "delta_e00", channels=3)
    needs_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    if pred.device.type == "cpu" and target.device.type == "cpu" and not needs_grad and ciede2000.available():
        means = ciede2000.mean_delta_e00(pred.detach().numpy(), target.detach().numpy())
        return torch.from_numpy(means)
    difference = delta_e2000(srgb_to_lab(pred), srgb_to_lab(target))
    return difference.flatten(1).mean(dim=1, dtype=torch.float64)


def lpips(pred: torch.Tensor, target: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """LPIPS distance. pred, target (B,3,H,W) sRGB in [0,1], net an lpips.LPIPS module -> (B,) float64.

    Build ``net`` with ``rawrestore.pretrained.build_lpips``; inputs are mapped to [-1,1] here.
    """
    _check_pair(pred, target, "lpips", channels=3)
    if not isinstance(net, nn.Module):
        raise InputError(f"lpips: net must be an lpips.LPIPS module, got {type(net).__name__}")
    distance = net(pred * 2.0 - 1.0, target * 2.0 - 1.0)
    return distance.reshape(pred.shape[0], -1).mean(dim=1, dtype=torch.float64)


def raw_psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Raw-domain PSNR (ELD protocol). pred, target (B,C,H,W) packed RAW -> (B,) float64 dB, both clipped to [0,1]."""
    _check_pair(pred, target, "raw_psnr", channels=None)
    return psnr(pred.clamp(0.0, 1.0), target.clamp(0.0, 1.0), data_range=1.0)


def raw_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Raw-domain SSIM (ELD protocol). pred, target (B,C,H,W) packed RAW -> (B,) float64, channel mean.

    ELD scores packed RAW with scikit-image's default SSIM: 7x7 uniform window, sample covariance,
    averaged over channels, on images clipped to [0,1].
    """
    _check_pair(pred, target, "raw_ssim", channels=None)
    size = 7
    _check_window_fits(pred, size, "raw_ssim")
    taps = torch.full((size,), 1.0 / size, dtype=pred.dtype, device=pred.device)
    samples = size * size
    per_channel = _ssim_per_channel(
        pred.clamp(0.0, 1.0),
        target.clamp(0.0, 1.0),
        taps,
        data_range=1.0,
        covariance_norm=samples / (samples - 1.0),
    )
    return per_channel.mean(dim=1)
