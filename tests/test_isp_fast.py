"""isp.fast: the packed-site Bayer paths give the generic path's values and gradients."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import isp
from isp import fast, ops
from isp.fast import render_mosaic
from tests.rawfixtures import BAYER_PHASES, XTRANS, make_meta, smooth_mosaic

PHASES = sorted(BAYER_PHASES)
MATRIX = [[1.9, -0.7, -0.2], [-0.25, 1.6, -0.35], [0.02, -0.6, 1.58]]


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def generic_render(raw, cfa, wb, matrix, gamma="srgb"):
    """`isp.render`'s order composed from the generic ops (masked-convolution demosaic)."""
    batch = raw.shape[0]
    gains = ops.libraw_wb_scale(torch.as_tensor(wb, dtype=raw.dtype).expand(batch, 3))
    balanced = torch.clamp(ops.white_balance(raw, cfa, gains), 0.0, 1.0)
    linear = torch.clamp(ops.apply_matrix(ops.demosaic_bilinear(balanced, cfa), matrix), 0.0, 1.0)
    return ops.apply_curve(linear, gamma)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_packed_demosaic_matches_generic_values_and_gradients(phase, dtype, tol):
    cfa = BAYER_PHASES[phase]
    mosaic = rand(2, 1, 14, 18, dtype=dtype, seed=1).requires_grad_()
    ours, reference = fast.demosaic_bilinear_bayer(mosaic, cfa), ops.demosaic_bilinear(mosaic, cfa)
    assert ours.shape == (2, 3, 14, 18) and ours.dtype == dtype
    assert (ours - reference).abs().max() <= tol
    upstream = rand(2, 3, 14, 18, dtype=dtype, seed=2)
    (grad_ours,) = torch.autograd.grad(ours, mosaic, upstream)
    (grad_reference,) = torch.autograd.grad(reference, mosaic, upstream)
    assert (grad_ours - grad_reference).abs().max() <= tol * 10
    assert grad_ours.abs().sum() > 1.0  # the gradient is not trivially zero


def test_packed_demosaic_gradcheck():
    mosaic = (rand(1, 1, 6, 8, seed=3) * 0.8 + 0.1).requires_grad_()
    assert gradcheck(lambda m: fast.demosaic_bilinear_bayer(m, BAYER_PHASES["GBRG"]), (mosaic,), eps=1e-6, atol=1e-6)


def test_fill_plan_uses_libraw_normalisers():
    plan = fast.bayer_fill_plan(BAYER_PHASES["RGGB"])
    assert plan[0] == (((0, 0, 0),), 1.0)  # R at the R site is measured
    taps, weight = plan[1]  # G at the R site: 4 edge neighbours, 2 * floor(256/8)/256
    assert sorted(taps) == [(1, 0, -1), (1, 0, 0), (2, -1, 0), (2, 0, 0)] and weight == 0.25
    taps, weight = plan[3 * 1 + 0]  # R at the G site of R's row: left and right, 2 * floor(256/4)/256
    assert sorted(taps) == [(0, 0, 0), (0, 0, 1)] and weight == 0.5
    taps, weight = plan[3 * 3 + 0]  # R at the B site: 4 diagonals, 1 * floor(256/4)/256
    assert sorted(taps) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)] and weight == 0.25
    with pytest.raises(isp.InputError, match="Bayer"):
        fast.bayer_fill_plan([[0, 1], [2, 1]])  # greens not on a diagonal


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("packed", [False, True])
def test_render_fast_path_matches_generic(phase, packed):
    """render() takes the packed-site path for a shared Bayer CFA: same values and gradients (raw, wb, matrix)."""
    cfa = BAYER_PHASES[phase]
    raw = (rand(2, 1, 12, 16, dtype=torch.float32, seed=4) * 0.7).requires_grad_()
    wb = torch.tensor([2.1, 1.0, 1.6], requires_grad=True)
    matrix = torch.tensor(MATRIX, requires_grad=True)
    cfas = torch.tensor([cfa, cfa])  # (B,2,2), shared
    inputs = isp.cfa.pack_bayer(raw, cfa) if packed else raw
    ours = isp.render(inputs, cfas, wb, matrix, packed=packed)
    reference = generic_render(raw, cfa, wb, matrix)
    assert ours.shape == (2, 3, 12, 16)
    assert (ours - reference).abs().max() <= 1e-6
    upstream = rand(2, 3, 12, 16, dtype=torch.float32, seed=5)
    grads_ours = torch.autograd.grad(ours, (raw, wb, matrix), upstream)
    grads_reference = torch.autograd.grad(reference, (raw, wb, matrix), upstream)
    for g_ours, g_reference in zip(grads_ours, grads_reference):
        assert torch.allclose(g_ours, g_reference, rtol=1e-5, atol=1e-5)
        assert g_ours.abs().sum() > 0


def test_render_mixed_cfas_fall_back_to_generic():
    raw = rand(2, 1, 8, 8, dtype=torch.float32, seed=6)
    cfas = torch.tensor([BAYER_PHASES["RGGB"], BAYER_PHASES["BGGR"]])
    out = isp.render(raw, cfas, [2.0, 1.0, 1.5], torch.eye(3))
    for i in range(2):
        assert torch.allclose(out[i], generic_render(raw[i : i + 1], cfas[i], [2.0, 1.0, 1.5], torch.eye(3))[0], atol=1e-6)


@pytest.mark.parametrize("gamma", ["srgb", "bt709"])
def test_curve_lut_is_the_analytic_curve_on_the_16_bit_grid(gamma):
    lut = fast.curve_lut(gamma, below=4096, above=8192)
    assert lut.dtype == torch.float32 and lut.shape == (4096 + 65536 + 8192,)
    grid = torch.arange(65536, dtype=torch.float64) / 65535
    assert (lut[4096 : 4096 + 65536].double() - ops.apply_curve(grid, gamma)).abs().max() <= 1 / 65535
    assert (lut[4096 : 4096 + 65536].double() - ops.apply_curve(grid, gamma)).abs().max() <= 1e-7  # float32 rounding
    assert torch.all(lut[:4096] == lut[4096]) and lut[4096] == 0 and torch.all(lut[-8192:] == 1)


def _fast_and_generic_linear(mosaic, meta, gamma, exposure_ratio=1.0):
    gains = [g / min(meta.wb_as_shot) for g in meta.wb_as_shot]
    ours = fast.render_mosaic(mosaic, meta.cfa, meta.black_level, meta.white_level, gains, meta.cam_to_srgb,
                                    gamma=gamma, exposure_ratio=exposure_ratio)
    x = ops.normalize(torch.from_numpy(mosaic.astype(np.float64))[None, None], meta.black_level, meta.white_level)
    linear = generic_render(x * exposure_ratio, meta.cfa, meta.wb_as_shot, torch.tensor(meta.cam_to_srgb, dtype=torch.float64),
                            gamma="linear")
    return ours, linear[0].permute(1, 2, 0).numpy()


FILE_CASES = [(BAYER_PHASES[p], 38, 46) for p in PHASES] + [(BAYER_PHASES["GBRG"], 21, 30), (XTRANS, 40, 50)]
FILE_IDS = PHASES + ["bayer-odd", "xtrans"]


@pytest.fixture
def small_strips(monkeypatch):
    """Many strips, a partial last one, and both workers busy on these small frames."""
    monkeypatch.setattr(fast, "_STRIP_ROWS", 4)
    monkeypatch.setattr(fast, "_MOSAIC_STRIP_ROWS", 6)


@pytest.mark.parametrize("cfa, height, width", FILE_CASES, ids=FILE_IDS)
def test_file_render_linear_matches_generic(cfa, height, width, small_strips):
    meta = make_meta(cfa, 512 if len(cfa) == 6 else [[512, 520], [508, 516]], height, width, wb=(2.1, 1.0, 1.6), matrix=MATRIX)
    mosaic = smooth_mosaic(meta, seed=7, fill=1.0)
    threads = torch.get_num_threads()
    ours, linear = _fast_and_generic_linear(mosaic, meta, "linear", exposure_ratio=1.3)
    assert ours.dtype == np.float32 and ours.shape == (height, width, 3)
    assert np.abs(ours - linear).max() <= 1e-6
    assert torch.get_num_threads() == threads  # the workers' single-threaded setting is undone


@pytest.mark.parametrize("gamma", ["srgb", "bt709"])
@pytest.mark.parametrize("matrix", [MATRIX, [[7.0, -4.0, -2.0], [-3.0, 6.5, -2.5], [-2.0, -3.0, 6.0]]], ids=["table", "clamped"])
@pytest.mark.parametrize("cfa", [BAYER_PHASES["GRBG"], XTRANS], ids=["bayer", "xtrans"])
def test_file_render_curve_is_the_curve_of_the_truncated_16_bit_value(cfa, gamma, matrix, small_strips):
    """LibRaw's rendering: out = curve(floor(65535 * linear) / 65535); an extreme matrix takes the clamp-first branch."""
    meta = make_meta(cfa, 600, 42, 54, wb=(1.7, 1.0, 2.3), matrix=matrix)
    mosaic = smooth_mosaic(meta, seed=8, fill=1.0)
    ours, linear = _fast_and_generic_linear(mosaic, meta, gamma)
    expected = ops.apply_curve(torch.from_numpy(np.floor(linear * 65535) / 65535), gamma).numpy()
    # float32 accumulation (~0.005 of a step) can put a value next to a step boundary on the other side
    step = ops.apply_curve(torch.from_numpy(np.minimum(linear + 1 / 65535, 1.0)), gamma).numpy() - expected
    mismatched = np.abs(ours - expected) > 1e-6
    assert mismatched.mean() < 0.02 and np.all(np.abs(ours - expected) <= step + 1e-6)
    assert (linear <= 0).any() and (linear >= 1).any()  # both clip points are exercised


@pytest.mark.parametrize("cfa", [BAYER_PHASES["RGGB"], XTRANS], ids=["bayer", "xtrans"])
def test_render_file_takes_the_fast_path(cfa, tmp_path, monkeypatch):
    meta = make_meta(cfa, 512, 36, 48)
    isp.write_dng(tmp_path / "a.dng", smooth_mosaic(meta, fill=0.8), meta)
    calls = []
    monkeypatch.setattr(fast, "render_mosaic", lambda *a, **k: calls.append(1) or render_mosaic(*a, **k))
    linear = isp.render_file(tmp_path / "a.dng", gamma="linear", exposure_ratio=1.5)
    assert calls == [1]
    mosaic, read_meta = isp.read_raw(tmp_path / "a.dng")
    assert np.abs(linear - _fast_and_generic_linear(mosaic, read_meta, "linear", exposure_ratio=1.5)[1]).max() <= 1e-6


def test_render_mosaic_rejects_bad_inputs():
    with pytest.raises(isp.InputError, match="black_level"):
        fast.render_mosaic(np.zeros((6, 6), np.uint16), XTRANS, [[0, 0], [0, 0]], 16383, [1, 1, 1], np.eye(3))
    with pytest.raises(isp.InputError, match="gamma"):
        fast.render_mosaic(np.zeros((6, 6), np.uint16), BAYER_PHASES["RGGB"], [[0, 0], [0, 0]], 16383, [1, 1, 1], np.eye(3),
                           gamma="pq")
