"""Signal-dependent noise level estimated from one noisy RAW frame, and a per-pixel noise map.

Under the ELD model (`rawrestore.physics.noise`) the variance of an exposure-aligned,
normalised reading is affine in its mean:

    Var[x] = a * E[x] + b,    a = K * ratio / span,    b = (ratio / span)^2 * (Var(read) + s_row^2 + 1/12)

(K the system gain in DN per electron, span = white - black in DN). Both coefficients vary a
lot between captures (K over 1.5 decades in ELD's calibration, times the exposure ratio), and a
blind network has to guess them from the picture; `estimate_noise_level` measures them instead.

Method, per image, on the packed channels (each one colour site, so the noise in a channel is
spatially independent; crosstalk mixes neighbouring sites before the noise, as on the sensor):

1. local mean m = 3x3 box mean, residual r = x - m; for independent noise of variance v,
   Var[r] = v * 8/9 where the signal is locally linear;
2. pixels are split into `bins` groups of equal count by m; each group's noise variance is
   (1.4826 * MAD(r))^2 * 9/8 (the median absolute deviation resists edges and texture);
3. a, b by weighted least squares over the groups (weights count / var^2, the inverse variance
   of a variance estimate), then clamped to a >= 0 and b >= `floor`.

`noise_map` turns (a, b) into the per-pixel standard deviation sqrt(a * max(m, 0) + b) on the
packed grid, the extra input channel of noise-conditioned models (`model.noise_map`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rawrestore.errors import InputError

MAD_TO_STD = 1.482602218505602  # 1 / Phi^-1(3/4): MAD of a normal is 0.6745 sigma
BOX_RESIDUAL_GAIN = 8.0 / 9.0  # Var[x - box3x3(x)] / Var[x] for independent noise


def local_mean(packed: torch.Tensor) -> torch.Tensor:
    """3x3 box mean per channel, edge pixels repeated outward. (B,C,h,w) -> (B,C,h,w)."""
    padded = F.pad(packed, (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(padded, 3, stride=1)


@torch.no_grad()
def estimate_noise_level(packed: torch.Tensor, bins: int = 32, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine noise-variance coefficients per image. packed (B,C,h,w), h,w >= 3 -> a (B,), b (B,), float32.

    Var[x] ~ a * mean + b in the input's units (see the module docstring).
    """
    if packed.ndim != 4 or packed.shape[-1] < 3 or packed.shape[-2] < 3:
        raise InputError(f"estimate_noise_level expects (B,C,h,w) with h, w >= 3, got {tuple(packed.shape)}")
    x = packed.detach().float()
    mean = local_mean(x)
    residual = x - mean
    coefficients_a, coefficients_b = [], []
    for m, r in zip(mean.flatten(1), residual.flatten(1)):
        order = torch.argsort(m)
        groups = max(1, min(bins, m.numel() // 64))
        m_bins = m[order].tensor_split(groups)
        r_bins = r[order].tensor_split(groups)
        levels = torch.stack([chunk.mean() for chunk in m_bins])
        variances = torch.stack([
            (MAD_TO_STD * (chunk - chunk.median()).abs().median()) ** 2 / BOX_RESIDUAL_GAIN for chunk in r_bins
        ])
        counts = torch.tensor([chunk.numel() for chunk in r_bins], dtype=x.dtype, device=x.device)
        weights = counts / variances.clamp_min(floor) ** 2
        design = torch.stack([levels, torch.ones_like(levels)], dim=1)
        a, b = _weighted_affine_fit(design, variances, weights)
        if a < 0:  # no signal dependence measurable: a constant variance
            a = torch.zeros_like(a)
            b = (weights * variances).sum() / weights.sum()
        coefficients_a.append(a)
        coefficients_b.append(b.clamp_min(floor))
    return torch.stack(coefficients_a), torch.stack(coefficients_b)


def _weighted_affine_fit(design: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares for values ~ design @ [a, b]; a singular system falls back to b = mean."""
    sqrt_w = weights.sqrt()[:, None]
    solution = torch.linalg.lstsq((design * sqrt_w).double(), (values[:, None] * sqrt_w).double()).solution
    a, b = solution[:, 0].to(values.dtype)
    return a, b


@torch.no_grad()
def noise_map(packed: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel noise standard deviation. packed (B,C,h,w) -> (B,1,h,w) in the input's dtype.

    sqrt(a * max(local mean, 0) + b), averaged over the channels; a, b (B,) are estimated from
    `packed` itself when not given.
    """
    if a is None or b is None:
        a, b = estimate_noise_level(packed)
    mean = local_mean(packed.detach().float()).mean(dim=1, keepdim=True).clamp_min(0.0)
    sigma = (a.view(-1, 1, 1, 1) * mean + b.view(-1, 1, 1, 1)).sqrt()
    return sigma.to(packed.dtype)
