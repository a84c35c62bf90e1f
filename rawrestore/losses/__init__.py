"""The loss stack: RAW terms, sRGB terms on one rendering, and how they are weighted.

`LOSSES` is the registry: LossConfig term name -> module class (each class says its `domain`:
"raw" compares packed-or-mosaic RAW, "mosaic" the full-resolution mosaic, "srgb" two renders).
`LossStack` builds the active terms of a `LossConfig` and runs one step of them.
"""
from __future__ import annotations

from torch import nn

from rawrestore.losses.perceptual import LPIPSLoss, PerceptualLoss, lpips_loss, perceptual
from rawrestore.losses.raw import (
    CharbonnierLoss,
    CrosstalkConsistencyLoss,
    L1Loss,
    RobustLoss,
    charbonnier,
    crosstalk_consistency,
    l1,
    robust,
)
from rawrestore.losses.srgb import (
    ColorAngleLoss,
    DeltaE00Loss,
    LaplacianEdgeLoss,
    MSSSIMLoss,
    PSNRLoss,
    SSIMLoss,
    color_angle,
    delta_e00,
    laplacian_edge,
    ms_ssim_loss,
    neg_psnr,
    ssim_loss,
)
from rawrestore.losses.weighting import (
    WEIGHTINGS,
    FixedWeighting,
    SoftmaxWeighting,
    UncertaintyWeighting,
    scheduled_weight,
    softmax_weighted,
    uncertainty_weighted,
)

# LossConfig term name -> module class; defined before `stack` is imported, which reads it.
LOSSES: dict[str, type[nn.Module]] = {
    "raw_l1": L1Loss,
    "charbonnier": CharbonnierLoss,
    "robust": RobustLoss,
    "crosstalk": CrosstalkConsistencyLoss,
    "perceptual": PerceptualLoss,
    "lpips": LPIPSLoss,
    "delta_e00": DeltaE00Loss,
    "ssim": SSIMLoss,
    "psnr": PSNRLoss,
    "ms_ssim": MSSSIMLoss,
    "edge": LaplacianEdgeLoss,
    "color_angle": ColorAngleLoss,
}

from rawrestore.losses.stack import LossStack  # noqa: E402  (needs LOSSES above)

__all__ = [
    "LOSSES", "WEIGHTINGS", "LossStack",
    "l1", "charbonnier", "robust", "crosstalk_consistency",
    "perceptual", "lpips_loss", "delta_e00", "neg_psnr", "ssim_loss", "ms_ssim_loss", "laplacian_edge", "color_angle",
    "scheduled_weight", "uncertainty_weighted", "softmax_weighted",
    "L1Loss", "CharbonnierLoss", "RobustLoss", "CrosstalkConsistencyLoss", "PerceptualLoss", "LPIPSLoss",
    "DeltaE00Loss", "PSNRLoss", "SSIMLoss", "MSSSIMLoss", "LaplacianEdgeLoss", "ColorAngleLoss",
    "FixedWeighting", "UncertaintyWeighting", "SoftmaxWeighting",
]
