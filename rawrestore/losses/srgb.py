"""sRGB-domain loss terms on two renders: pure functions plus thin nn.Module wrappers.

Every function takes the rendered prediction and the rendered target, ``(B,3,H,W)`` encoded
sRGB in [0,1] (what `isp.ISP` returns), and returns a 0-dim tensor in the input's dtype. None of
them renders: `rawrestore.losses.stack.LossStack` renders once and hands the two images to
every term. The network-based terms (VGG perceptual, LPIPS) live in `perceptual.py`.
"""
from __future__ import annotations

import math
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
    "sobel_magnitude",
    "sobel_edge",
    "gaussian_kernel",
    "gaussian_blur",
    "blur_color",
    "SSIM_WINDOW",
    "MS_SSIM_MIN_SIZE",
    "LAPLACIAN_KERNEL",
    "DeltaE00Loss",
    "PSNRLoss",
    "SSIMLoss",
    "MSSSIMLoss",
    "LaplacianEdgeLoss",
    "ColorAngleLoss",
    "SobelEdgeLoss",
    "BlurColorLoss",
]

SSIM_WINDOW = 11  # Gaussian window (sigma 1.5) of Wang et al. 2004, as pytorch_msssim defaults
_MS_SSIM_LEVELS = 5
# pytorch_msssim needs the smaller side > (window - 1) * 2^(levels - 1) for its four 2x poolings.
MS_SSIM_MIN_SIZE = (SSIM_WINDOW - 1) * 2 ** (_MS_SSIM_LEVELS - 1) + 1
LAPLACIAN_KERNEL = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
SOBEL_KERNEL = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))  # d/dx, as scipy.ndimage.sobel(axis=-1)
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


def sobel_magnitude(image: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude per channel, no padding. image (B,C,H,W) -> (B,C,H-2,W-2) sqrt(gx^2 + gy^2).

    gx = [-1,0,1] across columns smoothed [1,2,1] down rows, gy its transpose: scipy.ndimage.sobel's
    kernels. The magnitude has a zero (sub)gradient where both are 0.
    """
    channels = image.shape[1]
    kernel_x = torch.tensor(SOBEL_KERNEL, dtype=image.dtype, device=image.device)
    kernels = torch.stack([kernel_x, kernel_x.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C,1,3,3): gx, gy per channel
    gradients = F.conv2d(image, kernels, groups=channels).unflatten(1, (channels, 2))
    return _safe_sqrt((gradients * gradients).sum(dim=2))


def sobel_edge(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.1, background: float = 0.0) -> torch.Tensor:
    """Edge-masked Sobel loss. pred, target (B,3,H,W) sRGB -> () mean over the valid region of m * |S(pred) - S(target)|.

    S is `sobel_magnitude` per channel; the mask m is 1 where the target's own magnitude exceeds
    `threshold` (its edges) and `background` elsewhere, so flat regions (where noise lives) count
    `background` times as much. The border, where padding would invent edges, is left out.
    """
    _check_renders(pred, target, "sobel_edge")
    if min(pred.shape[-2:]) < 3:
        raise InputError(f"sobel_edge: renders must be at least 3x3 pixels, got {tuple(pred.shape[-2:])}")
    target_magnitude = sobel_magnitude(target)
    mask = torch.where(target_magnitude.detach() > threshold, 1.0, float(background)).to(pred.dtype)
    return (mask * (sobel_magnitude(pred) - target_magnitude).abs()).mean()


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius round(4 sigma), as scipy.ndimage.gaussian_filter's. -> (2r+1,)."""
    radius = int(4.0 * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel, mirrored borders. image (B,C,H,W) -> (B,C,H,W) (scipy's mode='mirror')."""
    channels = image.shape[1]
    kernel = gaussian_kernel(sigma, image.dtype, image.device)
    radius = kernel.numel() // 2
    if min(image.shape[-2:]) <= radius:
        raise InputError(f"gaussian_blur: sigma {sigma} needs images larger than {radius} pixels a side, "
                         f"got {tuple(image.shape[-2:])}; use a larger crop or a smaller sigma")
    rows = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1),
                    groups=channels)
    return F.conv2d(F.pad(rows, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1),
                    groups=channels)


def blur_color(pred: torch.Tensor, target: torch.Tensor, sigma: float = 3.0, criterion: str = "l2") -> torch.Tensor:
    """Blurred colour loss (DPED's colour term). pred, target (B,3,H,W) sRGB -> () mean |G*pred - G*target| ('l1') or squared ('l2').

    G is a Gaussian of `sigma` pixels (`gaussian_blur`): texture and noise are blurred away, colour
    and brightness remain.
    """
    _check_renders(pred, target, "blur_color")
    if criterion not in ("l1", "l2"):
        raise InputError(f"blur_color: criterion must be 'l1' or 'l2', got {criterion!r}")
    if not (math.isfinite(float(sigma)) and sigma > 0):
        raise InputError(f"blur_color: sigma must be a positive number of pixels, got {sigma!r}")
    difference = gaussian_blur(pred, sigma) - gaussian_blur(target, sigma)
    return difference.abs().mean() if criterion == "l1" else (difference * difference).mean()


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


class _OptionsTerm(LossTerm):
    """An sRGB term that is `function(pred, target, **options)`, its options read from the config entry by name."""

    domain: ClassVar[str] = "srgb"
    defaults: ClassVar[dict[str, Any]] = {}

    @staticmethod
    def function(pred: torch.Tensor, target: torch.Tensor, **options: Any) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> _OptionsTerm:
        return cls(**{name: getattr(term, name) for name in cls.defaults})

    def __init__(self, **options: Any):
        super().__init__()
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise InputError(f"{type(self).__name__}: unknown option(s) {unknown}; known: {sorted(self.defaults)}")
        self.options = {**self.defaults, **options}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.function(pred, target, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.options.items())


class SobelEdgeLoss(_OptionsTerm):
    """Module form of `sobel_edge` with its edge `threshold` and `background` weight. (B,3,H,W) x2 -> ()."""

    defaults: ClassVar[dict[str, Any]] = {"threshold": 0.1, "background": 0.0}
    function = staticmethod(sobel_edge)


class BlurColorLoss(_OptionsTerm):
    """Module form of `blur_color` with its `sigma` and `criterion`. (B,3,H,W) x2 -> ()."""

    defaults: ClassVar[dict[str, Any]] = {"sigma": 3.0, "criterion": "l2"}
    function = staticmethod(blur_color)
