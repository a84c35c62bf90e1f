"""Noise level measured from one frame (physics.noise_level) and the noise-conditioned model wrapper."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import isp
from rawrestore.config.loader import from_dict
from rawrestore.models import NoiseConditioned, build_model_from_config
from rawrestore.physics.align import align_exposure
from rawrestore.physics.noise import NoiseParams, synthesize_dark
from rawrestore.physics.noise_level import estimate_noise_level, noise_map

RGGB = torch.tensor([[0, 1], [1, 2]])
BLACK, WHITE = 512.0, 16383.0
SPAN = WHITE - BLACK


def smooth_scene(size: int = 256, seed: int = 0) -> torch.Tensor:
    """A clean normalised mosaic (1,1,S,S): a diagonal ramp 0.02..0.9 with a gentle ripple."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = float(torch.rand((), generator=g)) * 6.28
    return (0.02 + 0.88 * (x + y) / 2 + 0.03 * torch.sin(8 * x + phase))[None, None]


@pytest.mark.parametrize("gain,read,ratio", [(0.5, 3.0, 100.0), (2.0, 1.5, 250.0), (5.0, 6.0, 300.0)])
def test_estimate_recovers_the_eld_variance_line(gain, read, ratio):
    """a = K * ratio / span within 10%; the variance a * m + b within 10% over the frame's levels.

    (b alone is loosely pinned where shot noise dominates even the darkest pixels, and a few
    electrons are far from Gaussian; the dark test checks b.)
    """
    params = NoiseParams(system_gain=gain, read_scale=read, row_scale=0.0, read_noise="gaussian")
    clean = smooth_scene()
    g = torch.Generator().manual_seed(1)
    dark = synthesize_dark(clean, ratio, params, BLACK, WHITE, RGGB, g)
    aligned = align_exposure(dark, ratio, clip=False)
    a, b = estimate_noise_level(isp.cfa.pack(aligned, RGGB))
    a_true = gain * ratio / SPAN
    b_true = (ratio / SPAN) ** 2 * (read ** 2 + 1 / 12)
    assert float(a[0]) == pytest.approx(a_true, rel=0.10)
    for level in (0.1, 0.3, 0.6):
        assert float(a[0] * level + b[0]) == pytest.approx(a_true * level + b_true, rel=0.10)


def test_estimate_reads_the_read_noise_of_a_dark_frame():
    """In a dark frame (signal 0..0.05 after alignment) the intercept b is the read-noise variance, within 15%."""
    params = NoiseParams(system_gain=0.3, read_scale=4.0, row_scale=0.0, read_noise="gaussian")
    clean = smooth_scene() * 0.05
    dark = synthesize_dark(clean, 100.0, params, BLACK, WHITE, RGGB, torch.Generator().manual_seed(5))
    a, b = estimate_noise_level(isp.cfa.pack(align_exposure(dark, 100.0, clip=False), RGGB))
    assert float(b[0]) == pytest.approx((100.0 / SPAN) ** 2 * (16.0 + 1 / 12), rel=0.15)


def test_estimate_is_per_image_and_orders_noise_levels():
    """A batch gets one (a, b) per image; four times the gain reads about four times the slope."""
    clean = smooth_scene().repeat(2, 1, 1, 1)
    low = NoiseParams(system_gain=0.8, read_scale=2.0, row_scale=0.0, read_noise="gaussian")
    high = NoiseParams(system_gain=3.2, read_scale=2.0, row_scale=0.0, read_noise="gaussian")
    dark = synthesize_dark(clean, 100.0, [low, high], BLACK, WHITE, RGGB, torch.Generator().manual_seed(2))
    a, b = estimate_noise_level(isp.cfa.pack(align_exposure(dark, 100.0, clip=False), RGGB))
    assert a.shape == b.shape == (2,)
    assert float(a[1] / a[0]) == pytest.approx(4.0, rel=0.15)


def test_constant_variance_and_clean_frames():
    """Signal-independent noise gives a ~ 0 and b ~ sigma^2; a noise-free ramp gives a tiny level."""
    g = torch.Generator().manual_seed(3)
    ramp = smooth_scene(128)
    packed = isp.cfa.pack(ramp, RGGB)
    noisy = packed + 0.05 * torch.randn(packed.shape, generator=g)
    a, b = estimate_noise_level(noisy)
    assert float(a[0]) < 0.05 * 0.05 * 0.2  # the slope explains little of the variance
    assert math.sqrt(float(b[0]) + float(a[0]) * 0.45) == pytest.approx(0.05, rel=0.1)
    a0, b0 = estimate_noise_level(packed)
    assert float(a0[0]) * 0.9 + float(b0[0]) < 1e-5


def test_noise_map_matches_the_line():
    packed = torch.full((1, 4, 16, 16), 0.25)
    sigma = noise_map(packed, torch.tensor([0.04]), torch.tensor([0.0009]))
    assert sigma.shape == (1, 1, 16, 16)
    assert torch.allclose(sigma, torch.full_like(sigma, math.sqrt(0.04 * 0.25 + 0.0009)))
    with pytest.raises(ValueError, match="h, w >= 3"):
        estimate_noise_level(torch.zeros(1, 4, 2, 8))


class Spy(nn.Module):
    """Returns the first 4 channels and keeps what it was given."""

    def forward(self, x):
        self.seen = x
        return x[:, :4] * 2


def test_conditioned_wrapper_feeds_the_map_and_keeps_the_residual():
    x = isp.cfa.pack(align_exposure(synthesize_dark(
        smooth_scene(64), 100.0, NoiseParams(system_gain=1.0, read_scale=2.0, row_scale=0.0), BLACK, WHITE, RGGB,
        torch.Generator().manual_seed(4)), 100.0), RGGB)
    spy = Spy()
    out = NoiseConditioned(spy, 4)(x)
    assert spy.seen.shape == (1, 5, 32, 32)
    assert torch.equal(spy.seen[:, 4:], noise_map(x))
    assert torch.equal(out, 2 * x)
    assert torch.equal(NoiseConditioned(spy, 4, residual=True)(x), 3 * x)
    with pytest.raises(ValueError, match=r"\(B,4,H,W\)"):
        NoiseConditioned(spy, 4)(x[:, :3])


@pytest.mark.parametrize("name", ["unet", "nafnet"])
def test_config_builds_a_conditioned_model(name):
    cfg = from_dict({"model": {"name": name, "width": 8, "noise_map": True, "residual": True, "nafnet_blocks": [1, 1]}})
    model = build_model_from_config(cfg.model, 4)
    assert isinstance(model, NoiseConditioned) and model.residual and not model.net.residual
    assert model.net.in_channels == 5
    assert model(torch.rand(2, 4, 32, 32)).shape == (2, 4, 32, 32)
