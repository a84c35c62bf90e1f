"""Exposure alignment, crosstalk operator and ELD noise model: numbers that change if the code is wrong."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from rawrestore.errors import ConfigError, DataError, InputError
from rawrestore.physics import (
    Crosstalk,
    NoiseParams,
    add_noise,
    adjoint_kernel,
    align_exposure,
    apply_crosstalk,
    apply_crosstalk_transpose,
    available_cameras,
    build_kernel,
    dn_to_normalized,
    exposure_ratio,
    identity_kernel,
    load_kernel,
    load_noise_fit,
    normalized_to_dn,
    sample_noise_params,
    site_energy,
    synthesize_dark,
    tukey_lambda_variance,
    uniform_kernel,
    validate_kernel,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RGGB = [[0, 1], [1, 2]]
XTRANS = [
    [1, 1, 0, 1, 1, 2],
    [1, 1, 2, 1, 1, 0],
    [2, 0, 1, 0, 2, 1],
    [1, 1, 2, 1, 1, 0],
    [1, 1, 0, 1, 1, 2],
    [0, 2, 1, 2, 0, 1],
]
REFERENCE_PARAMS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "eld_noise_params"


def _generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------- exposure alignment


@pytest.mark.parametrize(
    ("short_s", "long_s", "expected"),
    [(0.1, 10.0, 100.0), (0.04, 10.0, 250.0), (0.033, 10.0, 300.0), (0.1, 30.0, 300.0), (0.04, 30.0, 300.0), (1.0, 2.0, 2.0)],
)
def test_exposure_ratio_caps_at_300(short_s, long_s, expected):
    assert exposure_ratio(short_s, long_s) == pytest.approx(expected, rel=1e-12)


def test_exposure_ratio_errors():
    with pytest.raises(DataError, match="short exposure"):
        exposure_ratio(0.0, 10.0)
    with pytest.raises(DataError, match="long exposure"):
        exposure_ratio(0.1, -1.0)
    with pytest.raises(DataError, match="exceeds the cap 300"):
        exposure_ratio(0.033, 10.0, strict=True)
    assert exposure_ratio(0.04, 10.0, strict=True) == pytest.approx(250.0)
    assert exposure_ratio(0.033, 10.0, cap=1000.0) == pytest.approx(10 / 0.033)
    with pytest.raises(InputError, match="cap"):
        exposure_ratio(0.1, 10.0, cap=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_align_exposure_scalar_and_per_sample(device):
    short = torch.full((2, 4, 3, 3), 0.004, device=device)
    assert torch.allclose(align_exposure(short, 100.0), torch.full_like(short, 0.4))
    ratio = torch.tensor([100.0, 300.0])
    aligned = align_exposure(short, ratio)
    assert aligned.device.type == device
    assert aligned[0].max().item() == pytest.approx(0.4)
    assert aligned[1].max().item() == pytest.approx(1.2)
    clipped = align_exposure(short, ratio, clip=True)
    assert clipped[1].max().item() == 1.0 and clipped[0].max().item() == pytest.approx(0.4)
    assert align_exposure(-short, 10.0, clip=True).min().item() == 0.0


def test_align_exposure_errors():
    short = torch.zeros(2, 1, 4, 4)
    with pytest.raises(InputError, match=r"\(B,\) tensor with B=2"):
        align_exposure(short, torch.ones(3))
    with pytest.raises(InputError, match="positive"):
        align_exposure(short, torch.tensor([1.0, 0.0]))
    with pytest.raises(InputError, match="positive"):
        align_exposure(short, -3.0)
    with pytest.raises(InputError, match=r"\(B,C,H,W\)"):
        align_exposure(torch.zeros(4, 4), 2.0)


# ---------------------------------------------------------------- crosstalk


def _reference_crosstalk(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The definition, pixel by pixel, with zero padding."""
    period = kernel.shape[0]
    height, width = x.shape[-2:]
    out = torch.zeros_like(x)
    for i in range(height):
        for j in range(width):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= i + dy < height and 0 <= j + dx < width:
                        out[..., i, j] += kernel[i % period, j % period, dy + 1, dx + 1] * x[..., i + dy, j + dx]
    return out


@pytest.mark.parametrize(("period", "height", "width"), [(2, 6, 8), (2, 5, 7), (6, 12, 12), (6, 13, 8)])
def test_crosstalk_matches_definition(period, height, width):
    gen = _generator(0)
    kernel = torch.rand(period, period, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 1, height, width, generator=gen, dtype=torch.float64)
    assert torch.allclose(apply_crosstalk(x, kernel), _reference_crosstalk(x, kernel), atol=1e-12)


@pytest.mark.parametrize(("period", "height", "width"), [(2, 16, 16), (2, 15, 9), (6, 24, 30), (6, 25, 19)])
def test_crosstalk_transpose_is_exact_adjoint(period, height, width):
    gen = _generator(period * 100 + height)
    kernel = torch.rand(period, period, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 1, height, width, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 1, height, width, generator=gen, dtype=torch.float64)
    lhs = (apply_crosstalk(x, kernel) * y).sum().item()
    rhs = (x * apply_crosstalk_transpose(y, kernel)).sum().item()
    assert abs(lhs - rhs) < 1e-10
    # The transpose is the operator of the adjoint kernel, and adjoint_kernel is an involution.
    assert torch.allclose(apply_crosstalk_transpose(y, kernel), apply_crosstalk(y, adjoint_kernel(kernel)), atol=1e-12)
    assert torch.equal(adjoint_kernel(adjoint_kernel(kernel)), kernel)


def test_uniform_kernel_hand_computed_pixel_and_energy():
    alpha = 0.02
    kernel = uniform_kernel(2, alpha, dtype=torch.float64)
    x = torch.arange(1.0, 26.0, dtype=torch.float64).reshape(1, 1, 5, 5) ** 2
    y = apply_crosstalk(x, kernel)
    # pixel (2,2)=169 with neighbours (1,2)=64, (3,2)=324, (2,1)=144, (2,3)=196
    assert y[0, 0, 2, 2].item() == pytest.approx((1 - 4 * alpha) * 169 + alpha * (64 + 324 + 144 + 196), abs=1e-12)
    # corner (0,0)=1: its two outside neighbours are zero padding
    assert y[0, 0, 0, 0].item() == pytest.approx((1 - 4 * alpha) * 1 + alpha * (36 + 4), abs=1e-12)
    # energy: an image whose outer ring is zero loses nothing through the border
    inner = torch.zeros(1, 1, 12, 18, dtype=torch.float64)
    inner[..., 1:-1, 1:-1] = torch.rand(10, 16, generator=_generator(3), dtype=torch.float64)
    assert apply_crosstalk(inner, kernel).sum().item() == pytest.approx(inner.sum().item(), rel=1e-13)
    assert torch.allclose(site_energy(kernel), torch.ones(2, 2, dtype=torch.float64))
    # a full image loses exactly alpha of each border pixel per missing neighbour
    full = torch.ones(1, 1, 4, 6, dtype=torch.float64)
    border_edges = 2 * 4 + 2 * 6  # missing neighbour links around a 4x6 image
    assert apply_crosstalk(full, kernel).sum().item() == pytest.approx(24 - alpha * border_edges, rel=1e-13)


def test_site_dependent_kernel_energy_uses_scatter_sums():
    # Scatter form: a pixel at site s sends S[s, d] of its charge to offset d (each site sums to 1).
    leak = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    leak[:, :, 1, 1] = torch.tensor([[0.9, 0.8], [0.8, 0.7]], dtype=torch.float64)
    for row in range(2):
        for col in range(2):
            share = (1 - leak[row, col, 1, 1]) / 4
            leak[row, col, 0, 1] = leak[row, col, 2, 1] = leak[row, col, 1, 0] = leak[row, col, 1, 2] = share
    gather = adjoint_kernel(leak)
    x = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    x[..., 1:-1, 1:-1] = torch.rand(8, 8, generator=_generator(5), dtype=torch.float64)
    assert apply_crosstalk(x, gather).sum().item() == pytest.approx(x.sum().item(), rel=1e-13)
    assert torch.allclose(site_energy(gather), torch.ones(2, 2, dtype=torch.float64))
    # its gather sums are NOT 1 (flat-field gain differs per site), e.g. the R site reads 0.9 + 4 * 0.05
    assert gather.sum(dim=(-2, -1))[0, 0].item() == pytest.approx(0.9 + 4 * 0.05)
    validate_kernel(gather, 2)
    # read as a gather kernel, the scatter table is not energy preserving: site (0,0) hands out
    # its 0.9 plus 4 x 0.05 gathered by its G neighbours = 1.1
    with pytest.raises(ConfigError, match=r"site \(0,0\) sums to 1.1,"):
        validate_kernel(leak, 2)


def test_crosstalk_gradcheck_and_dtype():
    gen = _generator(7)
    x = torch.randn(1, 1, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    kernel = torch.rand(2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(apply_crosstalk, (x, kernel))
    assert torch.autograd.gradcheck(apply_crosstalk_transpose, (x, kernel))
    half = apply_crosstalk(torch.rand(2, 1, 7, 9), uniform_kernel(6, 0.01, dtype=torch.float64))
    assert half.dtype == torch.float32 and half.shape == (2, 1, 7, 9)


@pytest.mark.parametrize("device", DEVICES)
def test_identity_kernel_and_module(device):
    x = torch.rand(2, 1, 12, 12, device=device)
    assert torch.equal(apply_crosstalk(x, identity_kernel(6)), x)
    module = Crosstalk(uniform_kernel(2, 0.05), learnable=True).to(device)
    y = module(x)
    assert y.device.type == device
    y.sum().backward()
    assert module.kernel.grad is not None and module.kernel.grad.shape == (2, 2, 3, 3)
    assert torch.allclose(module.transpose(x), apply_crosstalk_transpose(x, module.kernel.detach()))


def test_load_and_build_kernel(tmp_path):
    good = np.zeros((3, 3))
    good[1, 1], good[0, 1], good[2, 1] = 0.9, 0.05, 0.05
    np.save(tmp_path / "k33.npy", good)
    kernel = load_kernel(tmp_path / "k33.npy", 6)
    assert kernel.shape == (6, 6, 3, 3) and kernel.dtype == torch.float32
    assert kernel[4, 5, 0, 1].item() == pytest.approx(0.05)
    assert torch.equal(build_kernel(str(tmp_path / "k33.npy"), 6), kernel)
    assert torch.equal(build_kernel("identity", 2), identity_kernel(2))
    assert build_kernel(" uniform(0.02) ", 2)[1, 0, 1, 1].item() == pytest.approx(0.92)

    np.save(tmp_path / "shape.npy", np.zeros((2, 2, 3, 3)))
    with pytest.raises(ConfigError, match=r"shape must be \(6,6,3,3\) or \(3,3\)"):
        load_kernel(tmp_path / "shape.npy", 6)
    negative = good.copy()
    negative[0, 0] = -0.01
    np.save(tmp_path / "neg.npy", negative)
    with pytest.raises(ConfigError, match="negative tap"):
        load_kernel(tmp_path / "neg.npy", 2)
    np.save(tmp_path / "sum.npy", good * 1.1)
    with pytest.raises(ConfigError, match="not energy preserving.*1.1"):
        load_kernel(tmp_path / "sum.npy", 2)
    assert load_kernel(tmp_path / "sum.npy", 2, energy_preserving=False)[0, 0, 1, 1].item() == pytest.approx(0.99)
    nan = good.copy()
    nan[2, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ConfigError, match="NaN"):
        load_kernel(tmp_path / "nan.npy", 2)
    with pytest.raises(ConfigError, match="file not found"):
        load_kernel(tmp_path / "missing.npy", 2)
    with pytest.raises(ConfigError, match="alpha must be a number"):
        build_kernel("uniform(abc)", 2)
    with pytest.raises(ConfigError, match=r"\[0, 0.25\]"):
        build_kernel("uniform(0.3)", 2)
    with pytest.raises(ConfigError, match="malformed"):
        build_kernel("uniform 0.02", 2)
    with pytest.raises(ConfigError, match="period"):
        build_kernel("identity", 0)


# ---------------------------------------------------------------- noise model


@pytest.mark.parametrize("lam", [-0.14, -0.05, 0.0, 0.05, 0.13, 0.5])
def test_tukey_lambda_variance_matches_scipy(lam):
    assert tukey_lambda_variance(lam) == pytest.approx(float(scipy.stats.tukeylambda.var(lam)), rel=1e-9)


def _flat_stats(params: NoiseParams, level: float, seed: int, shape=(4, 1, 256, 512)):
    clean = torch.full(shape, level, dtype=torch.float64)
    noisy = add_noise(clean, params, RGGB, _generator(seed))
    bias = torch.tensor([[params.color_bias[0], params.color_bias[1]], [params.color_bias[3], params.color_bias[2]]],
                        dtype=torch.float64).repeat(shape[2] // 2, shape[3] // 2)
    residual = noisy - bias
    # standard error of the mean: row noise is shared by a row, the rest is per pixel
    rows = shape[0] * shape[2]
    std_err = math.sqrt(params.row_scale ** 2 / rows + (params.variance(level) - params.row_scale ** 2) / residual.numel())
    return residual.mean().item(), residual.var().item(), std_err


@pytest.mark.parametrize("level", [0.0, 4.0, 50.0, 600.0, 8000.0])
def test_gaussian_noise_mean_and_variance_match_model(level):
    params = NoiseParams(system_gain=2.5, read_scale=3.0, row_scale=1.2, read_noise="gaussian", color_bias=(1.5, -0.5, 2.0, 0.25))
    mean, variance, std_err = _flat_stats(params, level, seed=int(level) + 1)
    expected = 2.5 * level + 9.0 + 1.44 + 1.0 / 12.0
    assert params.variance(level) == pytest.approx(expected)
    assert abs(mean - level) < 5 * std_err
    assert variance == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize(("lam", "level"), [(-0.14, 0.0), (-0.14, 200.0), (0.12, 20.0), (0.0, 100.0)])
def test_tukey_noise_mean_and_variance_match_model(lam, level):
    params = NoiseParams(system_gain=0.8, read_scale=2.0, row_scale=0.7, read_noise="tukey", tukey_lambda=lam)
    mean, variance, std_err = _flat_stats(params, level, seed=17)
    expected = 0.8 * level + 4.0 * float(scipy.stats.tukeylambda.var(lam)) + 0.49 + 1.0 / 12.0
    assert params.variance(level) == pytest.approx(expected, rel=1e-9)
    assert abs(mean - level) < 5 * std_err
    assert variance == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize(("kind", "lam"), [("tukey", -0.14), ("tukey", 0.0), ("tukey", 0.11), ("gaussian", 0.0)])
def test_read_noise_distribution_matches_scipy(kind, lam):
    # zero signal -> zero shot noise; no row or quantisation noise: pure read noise
    params = NoiseParams(system_gain=1.0, read_scale=2.5, row_scale=0.0, read_noise=kind, tukey_lambda=lam, quant_step=0.0)
    samples = add_noise(torch.zeros(1, 1, 512, 512), params, RGGB, _generator(21)).flatten().double().numpy()
    reference = scipy.stats.tukeylambda(lam, scale=2.5) if kind == "tukey" else scipy.stats.norm(scale=2.5)
    assert scipy.stats.kstest(samples, reference.cdf).statistic < 0.005  # 1% critical value is 0.0032


def test_row_noise_is_one_draw_per_row():
    params = NoiseParams(system_gain=1.0, read_scale=0.0, row_scale=3.0, quant_step=0.0)
    noisy = add_noise(torch.zeros(8, 1, 128, 64), params, RGGB, _generator(4))
    assert torch.equal(noisy, noisy[..., :1].expand_as(noisy))
    assert noisy[..., 0].std().item() == pytest.approx(3.0, rel=0.08)


def test_shot_noise_is_scaled_poisson():
    params = NoiseParams(system_gain=4.0, read_scale=0.0, row_scale=0.0, quant_step=0.0)
    noisy = add_noise(torch.full((1, 1, 64, 64), 10.0), params, RGGB, _generator(8))
    # K * Poisson(x / K): every value a multiple of K
    assert torch.equal(noisy / 4.0, torch.round(noisy / 4.0))


@pytest.mark.parametrize(
    ("cfa", "expected"),
    [
        (RGGB, [[1.0, 2.0], [4.0, 3.0]]),  # R G / G2 B
        ([[1, 2], [0, 1]], [[4.0, 3.0], [1.0, 2.0]]),  # GBRG: G2 B / R G
        ([[2, 1], [1, 0]], [[3.0, 4.0], [2.0, 1.0]]),  # BGGR: B G2 / G R
    ],
)
def test_color_bias_per_cfa_site(cfa, expected):
    params = NoiseParams(system_gain=1.0, read_scale=0.0, row_scale=0.0, quant_step=0.0, color_bias=(1.0, 2.0, 3.0, 4.0))
    noisy = add_noise(torch.zeros(1, 1, 4, 6), params, cfa)
    assert torch.equal(noisy[0, 0, :2, :2], torch.tensor(expected))
    assert torch.equal(noisy[0, 0, 2:, 4:], torch.tensor(expected))


def test_color_bias_xtrans_green_is_mean_of_greens():
    params = NoiseParams(system_gain=1.0, read_scale=0.0, row_scale=0.0, quant_step=0.0, color_bias=(1.0, 2.0, 3.0, 4.0))
    noisy = add_noise(torch.zeros(1, 1, 6, 12), params, XTRANS)[0, 0]
    cfa = torch.tensor(XTRANS).repeat(1, 2)
    assert torch.equal(noisy, torch.tensor([1.0, 3.0, 3.0])[cfa])


def test_noise_is_reproducible_and_per_sample_params():
    params = [sample_noise_params(generator=_generator(s)) for s in (1, 2)]
    clean = torch.full((2, 1, 32, 32), 100.0)
    first = add_noise(clean, params, RGGB, _generator(9))
    assert torch.equal(first, add_noise(clean, params, RGGB, _generator(9)))
    assert not torch.equal(first, add_noise(clean, params, RGGB, _generator(10)))
    assert sample_noise_params(generator=_generator(1)) == params[0]
    # sample 1 got sample 1's bias: with everything else off the output is its bias map
    quiet = [NoiseParams(system_gain=1.0, read_scale=0.0, row_scale=0.0, quant_step=0.0, color_bias=p.color_bias) for p in params]
    biased = add_noise(torch.zeros(2, 1, 2, 2), quiet, RGGB)
    assert biased[1, 0, 0, 0].item() == pytest.approx(params[1].color_bias[0])
    with pytest.raises(InputError, match="sequence of 2"):
        add_noise(clean, params[:1], RGGB)


@pytest.mark.parametrize("read_noise", ["tukey", "gaussian"])
def test_calibrated_sampler_reproduces_eld_fit(read_noise):
    fit = load_noise_fit("SonyA7S2")
    gen = _generator(123)
    samples = [sample_noise_params("SonyA7S2", gen, read_noise=read_noise) for _ in range(3000)]
    log_k = np.log([p.system_gain for p in samples])
    lo, hi = math.log(fit.k_min), math.log(fit.k_max)
    assert lo <= log_k.min() and log_k.max() <= hi
    assert log_k.mean() == pytest.approx((lo + hi) / 2, abs=4 * (hi - lo) / math.sqrt(12 * 3000))
    assert log_k.std() == pytest.approx((hi - lo) / math.sqrt(12), rel=0.05)
    profile = fit.profiles["Profile-1"]
    read_fit = profile.tukey_scale if read_noise == "tukey" else profile.gaussian_scale
    for line, scales in ((read_fit, [p.read_scale for p in samples]), (profile.row_scale, [p.row_scale for p in samples])):
        residual = np.log(scales) - line.slope * log_k - line.bias
        assert abs(residual.mean()) < 4 * line.sigma / math.sqrt(len(samples))
        assert residual.std() == pytest.approx(line.sigma, rel=0.05)
    assert {p.tukey_lambda for p in samples} <= set(fit.tukey_lambdas)
    assert {p.color_bias for p in samples} <= set(fit.color_biases)
    assert len({p.color_bias for p in samples}) == len(set(fit.color_biases))
    assert all(p.read_noise == read_noise for p in samples)


def test_shipped_noise_fits_are_eld_json():
    assert available_cameras() == ["CanonEOS5D4", "CanonEOS700D", "CanonEOS70D", "NikonD850", "SonyA7S2"]
    fit = load_noise_fit("SonyA7S2")
    assert (fit.k_min, fit.k_max) == pytest.approx((0.09391607086816033, 6.010628535562261))
    assert fit.profiles["Profile-1"].tukey_scale.slope == pytest.approx(0.46210495986526035)
    assert len(fit.tukey_lambdas) == 18 and len(fit.color_biases) == 18
    assert sorted(load_noise_fit("NikonD850").profiles) == ["Profile-1", "Profile-2"]


def test_shipped_noise_fits_equal_the_eld_reference():
    """The shipped JSON files are ELD's, byte for byte in value; skipped (with the reason shown) without the reference."""
    if not REFERENCE_PARAMS.is_dir():
        pytest.skip(f"reference folder {REFERENCE_PARAMS} is absent: the shipped ELD noise fits are not compared")
    shipped = Path(__file__).resolve().parents[1] / "rawrestore" / "physics" / "eld_params"
    references = sorted(REFERENCE_PARAMS.glob("*.json"))
    assert [p.name for p in references] == sorted(p.name for p in shipped.glob("*.json"))  # never an empty loop
    for path in references:
        assert json.loads((shipped / path.name).read_text()) == json.loads(path.read_text()), path.name


def test_noise_config_errors():
    with pytest.raises(ConfigError, match="no ELD noise calibration for camera 'Sony'"):
        sample_noise_params("Sony")
    with pytest.raises(ConfigError, match="no noise profile 'Profile-2'"):
        sample_noise_params("SonyA7S2", profile="Profile-2")
    with pytest.raises(ConfigError, match="read_noise"):
        sample_noise_params(read_noise="poisson")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="system_gain must be > 0"):
        NoiseParams(system_gain=0.0, read_scale=1.0, row_scale=1.0)
    with pytest.raises(ConfigError, match="read_scale must be >= 0"):
        NoiseParams(system_gain=1.0, read_scale=-1.0, row_scale=1.0)
    with pytest.raises(ConfigError, match="unknown noise parameter 'gain'"):
        NoiseParams.from_dict({"gain": 1.0, "read_scale": 1.0, "row_scale": 1.0})
    with pytest.raises(ConfigError, match="'row_scale' is missing"):
        NoiseParams.from_dict({"system_gain": 1.0, "read_scale": 1.0})
    fixed = NoiseParams(system_gain=2.0, read_scale=1.0, row_scale=0.5, tukey_lambda=-0.1, color_bias=(1, 2, 3, 4))
    assert NoiseParams.from_dict(fixed.to_dict()) == fixed
    with pytest.raises(InputError, match=r"\(B,1,H,W\)"):
        add_noise(torch.zeros(1, 3, 4, 4), fixed, RGGB)
    with pytest.raises(InputError, match="cfa"):
        add_noise(torch.zeros(1, 1, 4, 4), fixed, [[0, 1, 2]])


def test_synthesize_dark_level_noise_and_clipping():
    black, white = 512.0, 16383.0
    span = white - black
    params = NoiseParams(system_gain=1.5, read_scale=2.0, row_scale=0.5, read_noise="gaussian", color_bias=(0.0, 0.0, 0.0, 0.0))
    clean = torch.full((2, 1, 256, 256), 0.5, dtype=torch.float64)
    dark = synthesize_dark(clean, 100.0, params, black, white, RGGB, _generator(2))
    level = 0.5 * span / 100
    assert dark.shape == clean.shape and dark.dtype == torch.float64
    assert dark.mean().item() * span == pytest.approx(level, abs=0.1)
    assert (dark * span).var().item() == pytest.approx(params.variance(level), rel=0.03)
    # per-sample ratios: the x300 sample is three times darker
    both = synthesize_dark(clean, torch.tensor([100.0, 300.0]), params, black, white, RGGB, _generator(2))
    assert both[1].mean().item() * span == pytest.approx(level / 3, abs=0.1)
    # clipping: saturated long at ratio 1 never exceeds 1; pure darkness never goes below absolute 0 DN
    bright = synthesize_dark(torch.ones(1, 1, 64, 64), 1.0, params, black, white, RGGB, _generator(3))
    assert bright.max().item() == 1.0 and (bright == 1.0).float().mean().item() > 0.4
    noisy_params = NoiseParams(system_gain=1.0, read_scale=400.0, row_scale=0.0, read_noise="gaussian")
    dark0 = synthesize_dark(torch.zeros(1, 1, 64, 64), 1.0, noisy_params, black, white, RGGB, _generator(3))
    assert dark0.min().item() == pytest.approx(-black / span)


def test_per_site_black_level_round_trip():
    black = [[512.0, 520.0], [500.0, 510.0]]
    x = torch.rand(2, 1, 4, 6, generator=_generator(1), dtype=torch.float64)
    dn = normalized_to_dn(x, black, 16383.0)
    assert dn[0, 0, 1, 0].item() == pytest.approx(x[0, 0, 1, 0].item() * (16383.0 - 500.0))
    assert dn[1, 0, 2, 3].item() == pytest.approx(x[1, 0, 2, 3].item() * (16383.0 - 520.0))
    assert torch.allclose(dn_to_normalized(dn, black, 16383.0), x)
    with pytest.raises(InputError, match="white_level must be above black_level"):
        synthesize_dark(x, 10.0, NoiseParams(1.0, 1.0, 1.0), 600.0, 500.0, RGGB)
