"""sRGB-domain loss terms on two renders: pure functions plus thin nn.Module wrappers.

Every function takes the rendered prediction and the rendered target, ``(B,3,H,W)`` encoded
sRGB in [0,1] (what `isp.ISP` returns), and returns a 0-dim tensor in the input's dtype. None of
them renders: `rawrestore.losses.stack.LossStack` renders once and hands the two images to
every term. The network-based terms (VGG perceptual, LPIPS) live in `perceptual.py`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import pytorch_msssim
import torch
import torch.nn.functional as F

from isp.color import delta_e2000, srgb_to_lab
from rawrestore.errors import InputError
from rawrestore.losses.term import BuildContext, LossTerm

__all__ = [
    "delta_e00",
    "neg_psnr",
    "ssim_loss",
    "ms_ssim_loss",
    "laplacian",
    "laplacian_edge",
    "color_angle",
    "SSIM_WINDOW",
    "MS_SSIM_MIN_SIZE",
    "LAPLACIAN_KERNEL",
    "DeltaE00Loss",
    "PSNRLoss",
    "SSIMLoss",
    "MSSSIMLoss",
    "LaplacianEdgeLoss",
    "ColorAngleLoss",
]

SSIM_WINDOW = 11  # Gaussian window (sigma 1.5) of Wang et al. 2004, as pytorch_msssim defaults
_MS_SSIM_LEVELS = 5
# pytorch_msssim needs the smaller side > (window - 1) * 2^(levels - 1) for its four 2x poolings.
MS_SSIM_MIN_SIZE = (SSIM_WINDOW - 1) * 2 ** (_MS_SSIM_LEVELS - 1) + 1
LAPLACIAN_KERNEL = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
# Squared norms below this count as a zero vector (sqrt moves by <= 1e-12).
_TINY_SQUARE = 1e-24


def _check_renders(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Validate two floating (B,3,H,W) renders of equal shape. pred, target -> None."""
    for label, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"{name}: {label} must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"{name}: {label} must be (B,3,H,W) sRGB, got shape {tuple(x.shape)}")
    if pred.shape != target.shape:
        raise InputError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")


def delta_e00(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 over pixels. pred, target (B,3,H,W) sRGB in [0,1] -> () dE00 units.

    Through `isp.color.srgb_to_lab` and `isp.color.delta_e2000`, whose gradients are finite at
    identical inputs, black pixels and zero chroma.
    """
    _check_renders(pred, target, "delta_e00")
    return delta_e2000(srgb_to_lab(pred), srgb_to_lab(target)).mean()


PSNR_FLOOR_MSE = 1e-8  # MSE floor of the PSNR term (80 dB): identical images give a finite value and gradient


def neg_psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minus the mean per-image PSNR. pred, target (B,3,H,W) sRGB in [0,1] -> () dB, 10 log10(MSE_i) averaged.

    The mean of per-image PSNR is what evaluation reports; its gradient weights each image by
    1 / MSE_i, so clean, easy images count as much as the noisiest ones (a plain squared error
    is dominated by the noisiest images of the batch). MSE is floored at 1e-8.
    """
    _check_renders(pred, target, "neg_psnr")
    difference = pred - target
    mse = (difference * difference).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(mse + PSNR_FLOOR_MSE)).mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM. pred, target (B,3,H,W) sRGB in [0,1] -> () in [0, 2].

    `pytorch_msssim.ssim` with its defaults (11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03),
    valid region only), data range 1, averaged over channels and batch. Images must be at
    least 11x11 (pytorch_msssim would silently skip the smoothing on a smaller side).
    """
    _check_renders(pred, target, "ssim_loss")
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise InputError(
            f"ssim_loss: renders must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(pred.shape[-2:])}; use a larger crop"
        )
    return 1.0 - pytorch_msssim.ssim(pred, target, data_range=1.0, size_average=True)


def ms_ssim_loss(pred: torch.Tensor, target: torch.Tensor, fallback: bool = False) -> torch.Tensor:
    """1 - MS-SSIM (five scales). pred, target (B,3,H,W) sRGB in [0,1] -> () in [0, 1].

    `pytorch_msssim.ms_ssim` (weights of Wang et al. 2003, data range 1) needs the smaller side
    to be at least MS_SSIM_MIN_SIZE = 161 pixels for its four 2x poolings. A smaller render
    raises InputError naming that minimum, unless `fallback=True`, in which case the
    single-scale `ssim_loss` is returned instead (so small validation crops still train, at the
    price of a term that is not MS-SSIM on those crops).
    """
    _check_renders(pred, target, "ms_ssim_loss")
    if min(pred.shape[-2:]) < MS_SSIM_MIN_SIZE:
        if fallback:
            return ssim_loss(pred, target)
        raise InputError(
            f"ms_ssim_loss: five-scale MS-SSIM needs renders of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} pixels, "
            f"got {tuple(pred.shape[-2:])}; use a larger crop or set fallback to use SSIM on small crops"
        )
    return 1.0 - pytorch_msssim.ms_ssim(pred, target, data_range=1.0, size_average=True)


def laplacian(image: torch.Tensor) -> torch.Tensor:
    """Laplacian [[0,1,0],[1,-4,1],[0,1,0]] per channel, no padding. image (B,C,H,W) -> (B,C,H-2,W-2)."""
    channels = image.shape[1]
    kernel = torch.tensor(LAPLACIAN_KERNEL, dtype=image.dtype, device=image.device)
    return F.conv2d(image, kernel.expand(channels, 1, 3, 3), groups=channels)


def laplacian_edge(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Edge loss. pred, target (B,3,H,W) sRGB -> () mean |lap(pred) - lap(target)| over the valid (H-2)x(W-2) region.

    The Laplacian is filtered per channel without padding, so the image border (where any
    padding would invent edges) does not contribute.
    """
    _check_renders(pred, target, "laplacian_edge")
    if min(pred.shape[-2:]) < 3:
        raise InputError(f"laplacian_edge: renders must be at least 3x3 pixels, got {tuple(pred.shape[-2:])}")
    return (laplacian(pred) - laplacian(target)).abs().mean()


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero gradient at 0. x (...) >= 0 -> (...); values below 1e-24 give 0."""
    positive = x > _TINY_SQUARE
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def color_angle(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean angle between RGB vectors. pred, target (B,3,H,W) -> () radians in [0, pi].

    angle = atan2(|p x t|, p . t), exact for near-parallel vectors (unlike acos of the cosine).
    A pixel where either vector is zero has no defined hue: it contributes angle 0 and no
    gradient. Gradients are finite everywhere (the cusp at exactly parallel vectors gets the
    zero subgradient).
    """
    _check_renders(pred, target, "color_angle")
    dot = (pred * target).sum(dim=1)
    cross = torch.linalg.cross(pred, target, dim=1)
    cross_norm = _safe_sqrt((cross * cross).sum(dim=1))
    defined = ((pred * pred).sum(dim=1) > _TINY_SQUARE) & ((target * target).sum(dim=1) > _TINY_SQUARE)
    # atan2's gradient is 0/0 at the origin: feed it (0, 1) where the angle is undefined.
    angle = torch.atan2(
        torch.where(defined, cross_norm, torch.zeros_like(cross_norm)),
        torch.where(defined, dot, torch.ones_like(dot)),
    )
    return torch.where(defined, angle, torch.zeros_like(angle)).mean()


class DeltaE00Loss(LossTerm):
    """Module form of `delta_e00`. (B,3,H,W), (B,3,H,W) -> ()."""

    domain: ClassVar[str] = "srgb"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return delta_e00(pred, target)


class PSNRLoss(LossTerm):
    """Module form of `neg_psnr` (minus the mean per-image PSNR, dB). (B,3,H,W), (B,3,H,W) -> ()."""

    domain: ClassVar[str] = "srgb"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return neg_psnr(pred, target)


class SSIMLoss(LossTerm):
    """Module form of `ssim_loss` (1 - SSIM). (B,3,H,W), (B,3,H,W) -> ()."""

    domain: ClassVar[str] = "srgb"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ssim_loss(pred, target)


class MSSSIMLoss(LossTerm):
    """Module form of `ms_ssim_loss` (1 - MS-SSIM), with its small-crop `fallback` flag. (B,3,H,W) x2 -> ()."""

    domain: ClassVar[str] = "srgb"

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> MSSSIMLoss:
        return cls(fallback=term.fallback)

    def __init__(self, fallback: bool = False):
        super().__init__()
        self.fallback = bool(fallback)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ms_ssim_loss(pred, target, self.fallback)

    def extra_repr(self) -> str:
        return f"fallback={self.fallback}"


class LaplacianEdgeLoss(LossTerm):
    """Module form of `laplacian_edge`. (B,3,H,W), (B,3,H,W) -> ()."""

    domain: ClassVar[str] = "srgb"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return laplacian_edge(pred, target)


class ColorAngleLoss(LossTerm):
    """Module form of `color_angle` (radians). (B,3,H,W), (B,3,H,W) -> ()."""

    domain: ClassVar[str] = "srgb"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return color_angle(pred, target)
