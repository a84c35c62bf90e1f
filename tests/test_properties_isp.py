"""Property tests (hypothesis): ISP ops keep shapes and give finite values and gradients for any
finite input in range."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isp
from isp import ops
from tests.rawfixtures import BAYER_PHASES, XTRANS

CFAS = [BAYER_PHASES[k] for k in sorted(BAYER_PHASES)] + [XTRANS]
finite = st.floats(min_value=-0.5, max_value=4.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def mosaics(draw):
    cfa = draw(st.sampled_from(CFAS))
    period = len(cfa)
    h = period * draw(st.integers(1, 4))
    w = period * draw(st.integers(1, 4))
    batch = draw(st.integers(1, 2))
    values = draw(st.lists(finite, min_size=batch * h * w, max_size=batch * h * w))
    return cfa, torch.tensor(values, dtype=torch.float64).view(batch, 1, h, w)


gains = st.tuples(*[st.floats(0.2, 8.0) for _ in range(3)])
matrix_entries = st.lists(st.floats(-3.0, 3.0), min_size=9, max_size=9)


@settings(max_examples=60, deadline=None)
@given(mosaics(), gains, matrix_entries, st.sampled_from(["bilinear", "half"]), st.sampled_from(["srgb", "bt709", "linear"]))
def test_render_finite_values_and_gradients(sample, wb, matrix, demosaic, gamma):
    cfa, raw = sample
    raw = raw.clone().requires_grad_()
    mat = torch.tensor(matrix, dtype=torch.float64).view(3, 3).requires_grad_()
    out = isp.render(raw, cfa, torch.tensor(wb, dtype=torch.float64), mat, demosaic=demosaic, gamma=gamma)
    period = len(cfa)
    expected_hw = raw.shape[-2:] if demosaic == "bilinear" else (raw.shape[-2] // period, raw.shape[-1] // period)
    assert out.shape == (raw.shape[0], 3, *expected_hw)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    out.square().sum().backward()
    assert torch.isfinite(raw.grad).all() and torch.isfinite(mat.grad).all()


@settings(max_examples=60, deadline=None)
@given(mosaics())
def test_pack_unpack_and_mosaic_properties(sample):
    cfa, raw = sample
    assert torch.equal(isp.cfa.unpack(isp.cfa.pack(raw, cfa), cfa), raw) if len(cfa) == 2 or raw.shape[-1] % 6 == 0 else True
    rgb = ops.demosaic_bilinear(raw, cfa)
    assert torch.allclose(ops.mosaic(rgb, cfa), raw)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=64), st.sampled_from(["srgb", "bt709"]))
def test_curve_monotone_and_inverse(values, gamma):
    x = torch.tensor(sorted(values), dtype=torch.float64, requires_grad=True)
    y = ops.apply_curve(x, gamma)
    assert (y.diff() >= 0).all() and y.min() >= 0 and y.max() <= 1 + 1e-12
    assert torch.allclose(ops.inverse_curve(y, gamma), x, atol=1e-10)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
