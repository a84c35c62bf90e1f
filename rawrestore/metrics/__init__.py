"""Image-quality metrics: pure per-image functions (`functional`) and the stateful `Evaluator`."""
from rawrestore.metrics.evaluator import METRIC_NAMES, Evaluator, ImageRow, pooled, ratio_group
from rawrestore.metrics.functional import (
    delta_e00,
    lpips,
    psnr,
    quantize_8bit,
    raw_psnr,
    raw_ssim,
    ssim,
)

# Per-image sRGB metrics by config name: (pred, target) -> (B,) float64.
SRGB_METRICS = {
    "psnr": psnr,
    "ssim": ssim,
    "delta_e00": delta_e00,
}

# Per-image packed-RAW metrics by config name (ELD protocol): (pred, target) -> (B,) float64.
RAW_METRICS = {
    "raw_psnr": raw_psnr,
    "raw_ssim": raw_ssim,
}

__all__ = [
    "psnr",
    "ssim",
    "delta_e00",
    "lpips",
    "quantize_8bit",
    "raw_psnr",
    "raw_ssim",
    "Evaluator",
    "ImageRow",
    "ratio_group",
    "pooled",
    "METRIC_NAMES",
    "SRGB_METRICS",
    "RAW_METRICS",
]
