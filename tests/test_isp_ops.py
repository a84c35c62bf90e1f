"""isp.ops and isp.cfa: shapes, dtypes, devices, exact inverses, gradients."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import isp
from isp import cfa as cfa_mod
from isp import ops
from tests.rawfixtures import BAYER_PHASES, XTRANS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL_CFAS = [BAYER_PHASES[k] for k in sorted(BAYER_PHASES)] + [XTRANS]


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfa", ALL_CFAS, ids=["BGGR", "GBRG", "GRBG", "RGGB", "XTRANS"])
def test_pack_unpack_exact(cfa, device):
    x = rand(2, 1, 24, 36, dtype=torch.float32, device=device)
    packed = isp.cfa.pack(x, cfa)
    assert packed.shape == ((2, 4, 12, 18) if len(cfa) == 2 else (2, 9, 8, 12))
    assert packed.device == x.device and packed.dtype == x.dtype
    assert torch.equal(isp.cfa.unpack(packed, cfa), x)


@pytest.mark.parametrize("phase", sorted(BAYER_PHASES))
def test_bayer_pack_is_r_g_b_g2_whatever_the_phase(phase):
    cfa = torch.tensor(BAYER_PHASES[phase])
    colours = cfa_mod.colour_masks(cfa[None], 8, 8).argmax(1, keepdim=True).double()  # colour index per pixel
    packed = isp.cfa.pack_bayer(colours, cfa)
    assert packed[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0, 1.0]
    # G is in R's row, G2 in B's row
    row_of = lambda ch: [i for i in range(2) for j in range(2) if packed is not None and cfa_mod.bayer_sites(cfa)[ch] == (i, j)][0]
    assert row_of(1) == row_of(0) and row_of(3) == row_of(2)


def test_xtrans_pack_matches_sid_layout():
    """SID's Fuji pack_raw: channel 0 takes sites (0,0),(0,4),(3,1),(3,3); channel 5 rows 1::3, cols 0::3."""
    x = torch.arange(12 * 18, dtype=torch.float64).view(1, 1, 12, 18)
    packed = isp.cfa.pack_xtrans(x)
    im = x[0, 0]
    assert torch.equal(packed[0, 0, 0::2, 0::2], im[0::6, 0::6]) and torch.equal(packed[0, 0, 1::2, 1::2], im[3::6, 3::6])
    assert torch.equal(packed[0, 5], im[1::3, 0::3]) and torch.equal(packed[0, 8], im[2::3, 1::3])
    # for the X-T2 phase SID assumes: channels 0, 3 are R; 2, 4 are B; 1, 5-8 are G
    colours = cfa_mod.colour_masks(torch.tensor(XTRANS)[None], 12, 18).argmax(1, keepdim=True).double()
    per_channel = [set(ch.unique().tolist()) for ch in isp.cfa.pack_xtrans(colours)[0]]
    assert per_channel == [{0.0}, {1.0}, {2.0}, {0.0}, {2.0}, {1.0}, {1.0}, {1.0}, {1.0}]


@pytest.mark.parametrize("cfa", ALL_CFAS, ids=["BGGR", "GBRG", "GRBG", "RGGB", "XTRANS"])
def test_bilinear_keeps_measured_sites_and_fills_constants(cfa):
    x = rand(1, 1, 24, 24, seed=1)
    rgb = ops.demosaic_bilinear(x, cfa)
    assert rgb.shape == (1, 3, 24, 24)
    assert torch.allclose(ops.mosaic(rgb, cfa), x)
    flat = ops.mosaic(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 24, 24), cfa)
    inner = ops.demosaic_bilinear(flat, cfa)[..., 1:-1, 1:-1]
    expected = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64).view(1, 3, 1, 1)
    # LibRaw's integer normaliser floor(256/sum)/256 makes X-Trans fills up to 1/86 low, Bayer exact
    tol = 1e-12 if len(cfa) == 2 else 0.8 / 86 + 1e-9
    assert (inner - expected).abs().max() <= tol


def test_half_demosaic_averages_each_colour_in_the_period():
    x = rand(1, 1, 12, 12, seed=2)
    half = ops.demosaic_half(x, XTRANS)
    assert half.shape == (1, 3, 2, 2)
    block = x[0, 0, 6:12, 0:6]
    pattern = torch.tensor(XTRANS)
    for c in range(3):
        assert torch.isclose(half[0, c, 1, 0], block[pattern == c].mean())
    bayer = ops.demosaic_half(x, BAYER_PHASES["GRBG"])
    assert torch.isclose(bayer[0, 0, 0, 0], x[0, 0, 0, 1]) and torch.isclose(bayer[0, 1, 0, 0], (x[0, 0, 0, 0] + x[0, 0, 1, 1]) / 2)


@pytest.mark.parametrize("gamma", ["srgb", "bt709", "linear"])
def test_curve_inverse(gamma):
    x = torch.linspace(0, 1, 2001, dtype=torch.float64)
    assert torch.allclose(ops.inverse_curve(ops.apply_curve(x, gamma), gamma), x, atol=1e-12)


def test_srgb_curve_close_to_iec_and_bt709_to_rec709():
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    iec = torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.pow(1 / 2.4) - 0.055)
    assert (ops.apply_curve(x, "srgb") - iec).abs().max() < 2e-4
    rec = torch.where(x < 0.018, 4.5 * x, 1.099 * x.pow(0.45) - 0.099)
    assert (ops.apply_curve(x, "bt709") - rec).abs().max() < 2e-3


def test_normalize_round_trip_and_libraw_span():
    black = torch.tensor([[500.0, 510.0], [490.0, 520.0]])
    dn = torch.full((1, 1, 4, 4), 10000.0, dtype=torch.float64)
    norm = ops.normalize(dn, black, 16383)
    assert torch.isclose(norm[0, 0, 0, 1], torch.tensor((10000 - 510) / (16383 - 490), dtype=torch.float64))
    assert torch.allclose(ops.denormalize(norm, black, 16383), dn)


def test_white_balance_per_site():
    x = torch.ones(2, 1, 2, 2)
    out = ops.white_balance(x, torch.tensor([BAYER_PHASES["RGGB"], BAYER_PHASES["BGGR"]]), torch.tensor([[2.0, 1.0, 3.0], [4.0, 1.0, 5.0]]))
    assert out[0, 0].tolist() == [[2, 1], [1, 3]] and out[1, 0].tolist() == [[5, 1], [1, 4]]


@pytest.mark.parametrize("device", DEVICES)
def test_batched_render_equals_single_renders(device):
    raws = rand(3, 1, 24, 24, dtype=torch.float32, device=device, seed=3) * 0.6
    cfas = torch.tensor([BAYER_PHASES["RGGB"], BAYER_PHASES["GBRG"], BAYER_PHASES["BGGR"]], device=device)
    wb = torch.tensor([[2.0, 1.0, 1.5], [1.5, 1.0, 2.5], [1.0, 1.0, 1.0]], device=device)
    mats = torch.eye(3, device=device).repeat(3, 1, 1) * 1.2 - 0.1 * torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(0)).to(device)
    out = isp.ISP()(raws, cfas, wb, mats)
    assert out.shape == (3, 3, 24, 24) and out.device.type == device and out.dtype == torch.float32
    for i in range(3):
        assert torch.allclose(out[i : i + 1], isp.ISP()(raws[i : i + 1], cfas[i], wb[i], mats[i]), atol=1e-6)


def test_packed_render_equals_mosaic_render():
    raw = rand(2, 1, 24, 24, dtype=torch.float32, seed=4)
    wb, mat = torch.tensor([2.0, 1.0, 1.5]), torch.eye(3)
    for cfa in (BAYER_PHASES["GRBG"], XTRANS):
        packed = isp.cfa.pack(raw, cfa)
        assert torch.equal(isp.ISP("half")(packed, cfa, wb, mat, packed=True), isp.ISP("half")(raw, cfa, wb, mat))


def _gradcheck(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cfa", [BAYER_PHASES["GRBG"], XTRANS], ids=["bayer", "xtrans"])
def test_gradcheck_every_op(cfa):
    size = 6 if len(cfa) == 6 else 4
    x = (rand(1, 1, size, size, seed=5) * 0.8 + 0.1).requires_grad_()
    gains = torch.tensor([1.3, 1.0, 1.7], dtype=torch.float64, requires_grad=True)
    mat = (torch.eye(3, dtype=torch.float64) + 0.1 * rand(3, 3, seed=6)).requires_grad_()
    rgb = (rand(1, 3, size, size, seed=7) * 0.8 + 0.1).requires_grad_()
    _gradcheck(lambda a: ops.normalize(a, torch.full((len(cfa), len(cfa)), 0.05, dtype=torch.float64), 1.0), x)
    _gradcheck(lambda a, g: ops.white_balance(a, cfa, g), x, gains)
    _gradcheck(lambda a: ops.demosaic_bilinear(a, cfa), x)
    _gradcheck(lambda a: ops.demosaic_half(a, cfa), x)
    _gradcheck(lambda a, m: ops.apply_matrix(a, m), rgb, mat)
    _gradcheck(lambda a: ops.mosaic(a, cfa), rgb)
    _gradcheck(lambda a: isp.cfa.pack(a, cfa), x)
    for gamma in ("srgb", "bt709"):
        _gradcheck(lambda a: ops.apply_curve(a, gamma), rgb)
        _gradcheck(lambda a: ops.inverse_curve(a, gamma), rgb)
    # the whole ISP, inputs kept away from the clip points (where finite differences are one-sided)
    _gradcheck(lambda a, m: isp.render(a * 0.4, cfa, gains.detach(), m), x, mat)


def test_gradients_finite_at_zero_and_clip_points():
    cfa = BAYER_PHASES["RGGB"]
    x = torch.tensor([0.0, 1.0, 1e-12, 2.0, -0.5, 0.5, 0.999999, 1.5] * 2, dtype=torch.float64).view(1, 1, 4, 4).requires_grad_()
    out = isp.render(x, cfa, torch.tensor([2.0, 1.0, 1.5], dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 0, 0, 1] == 0 or torch.isfinite(x.grad[0, 0, 0, 1])
    zero = torch.zeros(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    ops.apply_curve(zero, "srgb").sum().backward()
    assert torch.allclose(zero.grad, torch.full_like(zero, 12.92))


def test_bad_inputs_raise_input_error():
    with pytest.raises(isp.InputError, match="neither Bayer"):
        isp.meta.validate_cfa(np.zeros((3, 3), int))
    with pytest.raises(isp.InputError, match="not a Bayer"):
        isp.meta.validate_cfa(np.array([[0, 0], [1, 2]]))
    with pytest.raises(isp.InputError, match="CFA periods"):
        isp.cfa.pack(torch.zeros(1, 1, 5, 4), BAYER_PHASES["RGGB"])
    with pytest.raises(isp.InputError, match="unknown demosaic"):
        isp.ISP(demosaic="ahd")
