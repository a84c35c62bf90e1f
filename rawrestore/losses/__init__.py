"""The loss stack: RAW terms, sRGB terms on one rendering, and how they are weighted.

`LOSSES` is the registry and the only way terms are built: LossConfig term name -> a `LossTerm`
class that builds itself from its config entry (`from_config`) and declares its `domain`
("raw": prediction vs target as trained, "mosaic": predicted mosaic vs the dark input's,
"srgb": the two renders); see `losses.term`. `LossStack` builds the active terms of a
`LossConfig` through it and runs one step of them. `gan` (`losses.adversarial`) also owns a
discriminator that the training step updates with its own optimiser.
"""
from __future__ import annotations

from rawrestore.losses.adversarial import AdversarialLoss, discriminator_accuracy, discriminator_loss, generator_loss
from rawrestore.losses.perceptual import GramLoss, LPIPSLoss, PerceptualLoss, gram_loss, lpips_loss, perceptual
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
    BlurColorLoss,
    ColorAngleLoss,
    DeltaE00Loss,
    LaplacianEdgeLoss,
    MSSSIMLoss,
    PSNRLoss,
    SobelEdgeLoss,
    SSIMLoss,
    blur_color,
    color_angle,
    delta_e00,
    laplacian_edge,
    ms_ssim_loss,
    neg_psnr,
    sobel_edge,
    ssim_loss,
)
from rawrestore.losses.term import BuildContext, LossTerm
from rawrestore.losses.weighting import (
    WEIGHTINGS,
    FixedWeighting,
    SoftmaxWeighting,
    UncertaintyWeighting,
    scheduled_weight,
    softmax_weighted,
    uncertainty_weighted,
)

# LossConfig term name -> LossTerm class; defined before `stack` is imported, which reads it.
LOSSES: dict[str, type[LossTerm]] = {
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
    "gram": GramLoss,
    "sobel_edge": SobelEdgeLoss,
    "blur_color": BlurColorLoss,
    "gan": AdversarialLoss,
}

from rawrestore.losses.stack import LossStack  # noqa: E402  (needs LOSSES above)

__all__ = [
    "LOSSES", "WEIGHTINGS", "LossStack", "LossTerm", "BuildContext",
    "l1", "charbonnier", "robust", "crosstalk_consistency",
    "perceptual", "lpips_loss", "delta_e00", "neg_psnr", "ssim_loss", "ms_ssim_loss", "laplacian_edge", "color_angle",
    "gram_loss", "sobel_edge", "blur_color", "generator_loss", "discriminator_loss", "discriminator_accuracy",
    "scheduled_weight", "uncertainty_weighted", "softmax_weighted",
    "L1Loss", "CharbonnierLoss", "RobustLoss", "CrosstalkConsistencyLoss", "PerceptualLoss", "LPIPSLoss",
    "DeltaE00Loss", "PSNRLoss", "SSIMLoss", "MSSSIMLoss", "LaplacianEdgeLoss", "ColorAngleLoss",
    "GramLoss", "SobelEdgeLoss", "BlurColorLoss", "AdversarialLoss",
    "FixedWeighting", "UncertaintyWeighting", "SoftmaxWeighting",
]
