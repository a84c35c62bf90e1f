"""isp.color against outside references: Sharma et al. 2005, colour-science, closed-form slopes."""
from __future__ import annotations

from pathlib import Path

import colour
import numpy as np
import pytest
import torch

from isp.color import (
    D65_WHITE_XYZ,
    delta_e2000,
    lab_to_xyz,
    linear_srgb_to_xyz,
    linear_to_srgb,
    srgb_to_lab,
    srgb_to_linear,
    xyz_to_lab,
    xyz_to_linear_srgb,
)
from isp.errors import InputError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHARMA_CSV = Path(__file__).parent / "data" / "ciede2000_sharma2005.csv"
# colour-science's XYZ_to_Lab takes the white as xy chromaticity; ours is sRGB(1,1,1) in XYZ.
D65_XY = colour.XYZ_to_xy(np.array(D65_WHITE_XYZ))
LAB_EPSILON = 216.0 / 24389.0
LAB_KAPPA = 24389.0 / 27.0


def _sharma_table() -> np.ndarray:
    """The 34 Sharma pairs. -> (34,7) L1,a1,b1,L2,a2,b2,dE."""
    return np.loadtxt(SHARMA_CSV, delimiter=",", skiprows=1)


def _random_lab(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random CIELAB colours. n -> (n,3) with L in [0,100], a,b in [-128,128]."""
    return np.column_stack([rng.uniform(0, 100, n), rng.uniform(-128, 128, n), rng.uniform(-128, 128, n)])


# --- CIEDE2000 -----------------------------------------------------------------------------------


def test_sharma_table_has_34_pairs():
    assert _sharma_table().shape == (34, 7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_delta_e2000_reproduces_sharma_2005(dtype):
    table = _sharma_table()
    lab1 = torch.tensor(table[:, 0:3], dtype=dtype)
    lab2 = torch.tensor(table[:, 3:6], dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(delta_e2000(lab1, lab2).double().numpy(), table[:, 6], atol=tolerance, rtol=0)
    # The formula is symmetric in its two arguments.
    np.testing.assert_allclose(delta_e2000(lab2, lab1).double().numpy(), table[:, 6], atol=tolerance, rtol=0)


def test_delta_e2000_matches_colour_science_on_random_pairs():
    rng = np.random.default_rng(2005)
    lab1, lab2 = _random_lab(rng, 1000), _random_lab(rng, 1000)
    # Add the hard cases: grey vs colour, grey vs grey, opposite hues, near-identical colours.
    lab1[:20, 1:] = 0.0
    lab2[10:20, 1:] = 0.0
    lab2[20:40] = lab1[20:40] * np.array([1.0, -1.0, -1.0])
    lab2[40:60] = lab1[40:60] + rng.normal(0, 1e-3, (20, 3))
    expected = colour.delta_E(lab1, lab2, method="CIE 2000")
    got = delta_e2000(torch.tensor(lab1), torch.tensor(lab2)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_delta_e2000_parametric_weights_match_colour_science():
    rng = np.random.default_rng(7)
    lab1, lab2 = _random_lab(rng, 200), _random_lab(rng, 200)
    # colour-science exposes kL and kC; kH is fixed to 1 there.
    expected = colour.difference.delta_E_CIE2000(lab1, lab2, textiles=True)  # kL = 2
    got = delta_e2000(torch.tensor(lab1), torch.tensor(lab2), kL=2.0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_delta_e2000_shapes_and_broadcasting():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64) * 50
    reference = torch.tensor([50.0, 10.0, -10.0], dtype=torch.float64).view(1, 3, 1, 1)
    out = delta_e2000(image, reference)
    assert out.shape == (2, 4, 5)
    single = delta_e2000(image[1:2, :, 3:4, 2:3], reference)
    assert single.item() == pytest.approx(out[1, 3, 2].item(), abs=1e-12)
    assert delta_e2000(image[:, :, 0, 0], reference[:, :, 0, 0]).shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_delta_e2000_half_precision_does_not_overflow(dtype):
    table = _sharma_table()
    got = delta_e2000(torch.tensor(table[:, 0:3], dtype=dtype), torch.tensor(table[:, 3:6], dtype=dtype))
    assert got.dtype == dtype
    # Only the rounding of the inputs and output remains (bfloat16 keeps 8 bits of mantissa).
    np.testing.assert_allclose(got.double().numpy(), table[:, 6], rtol=0.05, atol=0.3)


def test_delta_e2000_identical_inputs_are_zero():
    lab = torch.tensor(_random_lab(np.random.default_rng(1), 50))
    assert delta_e2000(lab, lab).abs().max().item() == 0.0


def test_delta_e2000_rejects_bad_input():
    lab = torch.zeros(2, 3)
    with pytest.raises(InputError, match="3 channels"):
        delta_e2000(torch.zeros(2, 4), lab)
    with pytest.raises(InputError, match="floating"):
        delta_e2000(lab.long(), lab)
    with pytest.raises(InputError, match="kH"):
        delta_e2000(lab, lab, kH=0.0)


# --- Conversions vs colour-science -------------------------------------------------------------


def _rgb_samples(rng: np.random.Generator) -> np.ndarray:
    """sRGB test colours. -> (N,3) random, greys, primaries, black, white, the segment thresholds."""
    special = np.array(
        [
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [0.5, 0.5, 0.5],
            [0.001, 0.02, 0.04],
            [0.0405, 0.0404, 0.05],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    return np.concatenate([special, rng.random((1000, 3))])


def test_srgb_to_lab_matches_colour_science():
    rgb = _rgb_samples(np.random.default_rng(3))
    expected = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(rgb), illuminant=D65_XY)
    got = srgb_to_lab(torch.tensor(rgb)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_transfer_functions_match_colour_science():
    values = np.concatenate([np.linspace(0, 1, 1001), [0.0031307, 0.0031309, 0.0404, 0.0405, 1.5]])
    np.testing.assert_allclose(
        srgb_to_linear(torch.tensor(values).view(-1, 1).expand(-1, 3)).numpy()[:, 0],
        colour.models.eotf_sRGB(values),
        atol=1e-12,
        rtol=0,
    )
    np.testing.assert_allclose(
        linear_to_srgb(torch.tensor(values).view(-1, 1).expand(-1, 3)).numpy()[:, 0],
        colour.models.eotf_inverse_sRGB(values),
        atol=1e-12,
        rtol=0,
    )


def test_transfer_thresholds_are_the_iec_constants():
    # IEC 61966-2-1 decodes V <= 0.04045 linearly and encodes L <= 0.0031308 linearly. The two
    # thresholds are not exact images of each other (colour-science derives the decoding one as
    # 12.92 * 0.0031308), so inside (0.0404499, 0.04045] the references legitimately differ by 2e-9.
    edges = torch.tensor([0.04045, 0.0031308], dtype=torch.float64).view(1, 1, 2).expand(1, 3, 2)
    assert srgb_to_linear(edges)[0, 0, 0].item() == 0.04045 / 12.92
    assert linear_to_srgb(edges)[0, 0, 1].item() == 0.0031308 * 12.92
    above = torch.full((1, 3), 0.0404501, dtype=torch.float64)
    assert srgb_to_linear(above)[0, 0].item() == pytest.approx(((0.0404501 + 0.055) / 1.055) ** 2.4, abs=1e-15)


def test_xyz_and_lab_match_colour_science():
    rng = np.random.default_rng(4)
    linear = rng.random((500, 3))
    xyz_expected = colour.sRGB_to_XYZ(linear, apply_cctf_decoding=False)
    np.testing.assert_allclose(linear_srgb_to_xyz(torch.tensor(linear)).numpy(), xyz_expected, atol=1e-12, rtol=0)
    lab = _random_lab(rng, 500)
    np.testing.assert_allclose(
        lab_to_xyz(torch.tensor(lab)).numpy(), colour.Lab_to_XYZ(lab, illuminant=D65_XY), atol=1e-10, rtol=0
    )


def test_round_trips_are_exact():
    rng = np.random.default_rng(5)
    rgb = torch.tensor(_rgb_samples(rng))
    torch.testing.assert_close(linear_to_srgb(srgb_to_linear(rgb)), rgb, atol=1e-12, rtol=0)
    torch.testing.assert_close(xyz_to_linear_srgb(linear_srgb_to_xyz(rgb)), rgb, atol=1e-12, rtol=0)
    xyz = linear_srgb_to_xyz(rgb)
    torch.testing.assert_close(lab_to_xyz(xyz_to_lab(xyz)), xyz, atol=1e-12, rtol=0)


def test_neutral_greys_have_zero_chroma_and_white_is_100():
    greys = torch.linspace(0, 1, 11, dtype=torch.float64).view(-1, 1).expand(-1, 3)
    lab = srgb_to_lab(greys)
    assert lab[:, 1:].abs().max().item() < 1e-12
    assert lab[-1, 0].item() == pytest.approx(100.0, abs=1e-12)
    assert lab[0, 0].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conversions_keep_dtype_device_and_shape(device, dtype):
    rgb = torch.rand(2, 3, 5, 4, dtype=dtype, device=device)
    for function in (srgb_to_linear, linear_to_srgb, linear_srgb_to_xyz, xyz_to_linear_srgb, xyz_to_lab, lab_to_xyz):
        out = function(rgb)
        assert (out.shape, out.dtype, out.device.type) == (rgb.shape, dtype, device)
    lab = srgb_to_lab(rgb)
    difference = delta_e2000(lab, lab.flip(0))
    assert (difference.shape, difference.dtype, difference.device.type) == ((2, 5, 4), dtype, device)
    # Same numbers as the float64 CPU computation.
    expected = delta_e2000(srgb_to_lab(rgb.double().cpu()), srgb_to_lab(rgb.double().cpu().flip(0)))
    tolerance = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(difference.double().cpu(), expected, atol=tolerance, rtol=0)


def test_conversions_reject_bad_shapes():
    with pytest.raises(InputError, match="3 channels"):
        srgb_to_lab(torch.zeros(1, 4, 2, 2))
    with pytest.raises(InputError, match="3 channels"):
        linear_srgb_to_xyz(torch.zeros(3))


# --- Gradients ---------------------------------------------------------------------------------


def _grad_of(function, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of function(*inputs).sum() w.r.t. each input. -> list of tensors."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    function(*leaves).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "lab1, lab2",
    [
        ([50.0, 0.0, 0.0], [60.0, 0.0, 0.0]),  # both achromatic
        ([50.0, 0.0, 0.0], [50.0, 10.0, -5.0]),  # one achromatic
        ([50.0, 20.0, -30.0], [50.0, 20.0, -30.0]),  # identical
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),  # black vs black
        ([50.0, 10.0, 0.0], [50.0, -10.0, 0.0]),  # hue difference exactly 180 degrees
        ([50.0, 0.0, 25.0], [50.0, 0.0, -25.0]),  # 180 degrees across the 90/270 axis
    ],
)
def test_delta_e2000_gradients_are_finite_at_special_cases(lab1, lab2, dtype):
    a, b = torch.tensor([lab1], dtype=dtype), torch.tensor([lab2], dtype=dtype)
    grads = _grad_of(delta_e2000, a, b)
    assert all(torch.isfinite(g).all() for g in grads)


def test_delta_e2000_special_case_values():
    # 180 degrees: same chroma, opposite hue; colour-science gives the reference value.
    lab1, lab2 = np.array([[50.0, 10.0, 0.0]]), np.array([[50.0, -10.0, 0.0]])
    got = delta_e2000(torch.tensor(lab1), torch.tensor(lab2)).item()
    assert got == pytest.approx(float(colour.delta_E(lab1, lab2, method="CIE 2000")[0]), abs=1e-9)
    # A pure lightness step between greys at L = 50 is dL / SL with SL = 1.
    grey_50 = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    grey = delta_e2000(grey_50, grey_50 + torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64)).item()
    assert grey == pytest.approx(3.0 / (1 + 0.015 * 1.5**2 / np.sqrt(20 + 1.5**2)), abs=1e-12)


def test_delta_e2000_gradient_values():
    # Identical inputs: the minimum of a distance, gradient 0 (not NaN).
    lab = torch.tensor([[50.0, 20.0, -30.0]], dtype=torch.float64)
    assert all((g == 0).all() for g in _grad_of(delta_e2000, lab, lab))
    # Pure lightness difference between greys: d dE / d L2 = 1 / SL(L_mean).
    lab1 = torch.tensor([[40.0, 0.0, 0.0]], dtype=torch.float64)
    lab2 = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)
    grad2 = _grad_of(delta_e2000, lab1, lab2)[1]
    # L_mean = 50 at the evaluation point, so SL = 1 and its derivative is 0 there.
    assert grad2[0, 0].item() == pytest.approx(1.0, abs=1e-12)


def test_black_pixels_have_finite_gradients_with_the_linear_slope():
    black = torch.zeros(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    lab = srgb_to_lab(black)
    lab[:, 0].sum().backward()
    assert torch.isfinite(black.grad).all()
    # At black, L = kappa * Y and Y = 0.7152 G_linear + ..., G_linear = G / 12.92.
    expected = LAB_KAPPA * np.array([0.2126, 0.7152, 0.0722]) / 12.92
    np.testing.assert_allclose(black.grad[0, :, 0, 0].numpy(), expected, rtol=1e-12)
    # Through delta_e2000 too: black vs black and black vs a dark grey.
    for other in (torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 0.01)):
        grads = _grad_of(lambda p, t: delta_e2000(srgb_to_lab(p), srgb_to_lab(t)), torch.zeros(1, 3, 1, 1), other)
        assert all(torch.isfinite(g).all() for g in grads)


def test_negative_and_over_range_values_have_finite_gradients():
    x = torch.tensor([[-0.2, 1.3, 0.0]], dtype=torch.float64).view(1, 3, 1, 1)
    for function in (srgb_to_linear, linear_to_srgb, srgb_to_lab, lambda v: xyz_to_lab(v)):
        assert torch.isfinite(_grad_of(function, x)[0]).all()


# Values chosen off every branch threshold, in both segments of each piecewise function.
_GRADCHECK_RGB = torch.tensor(
    [[0.01, 0.3, 0.9], [0.7, 0.002, 0.5]], dtype=torch.float64
).view(2, 3, 1, 1).expand(2, 3, 1, 2).contiguous()


@pytest.mark.parametrize(
    "function",
    [srgb_to_linear, linear_to_srgb, linear_srgb_to_xyz, xyz_to_linear_srgb, xyz_to_lab, srgb_to_lab],
    ids=lambda f: f.__name__,
)
def test_gradcheck_conversions(function):
    assert torch.autograd.gradcheck(function, (_GRADCHECK_RGB.clone().requires_grad_(True),))


def test_gradcheck_lab_to_xyz():
    lab = torch.tensor([[50.0, 20.0, -30.0], [5.0, 40.0, 10.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lab_to_xyz, (lab.requires_grad_(True),))


def test_gradcheck_delta_e2000():
    lab1 = torch.tensor([[50.0, 2.6772, -79.7751], [30.0, 15.0, 10.0], [70.0, -20.0, 5.0]], dtype=torch.float64)
    lab2 = torch.tensor([[52.0, 0.5, -82.7485], [35.0, -5.0, 20.0], [68.0, -25.0, -3.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, y: delta_e2000(x, y, kL=1.5, kC=1.0, kH=0.8),
        (lab1.requires_grad_(True), lab2.requires_grad_(True)),
    )
