"""isp renders like LibRaw (rawpy) with the same settings."""
import numpy as np
import pytest
import rawpy

import isp
from tests.rawfixtures import BAYER_PHASES, XTRANS, make_meta, smooth_mosaic

BORDER = 4
LIBRAW_GAMMA = {"srgb": (2.4, 12.92), "bt709": (2.222, 4.5)}


def libraw_render(path, gamma):
    with rawpy.imread(str(path)) as raw:
        out = raw.postprocess(
            demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB,
            gamma=LIBRAW_GAMMA[gamma], no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0, user_flip=0,
        )
    return out.astype(np.float64) / 65535.0


def interior_psnr(ours, ref):
    b = BORDER
    mse = np.mean((ours[b:-b, b:-b].astype(np.float64) - ref[b:-b, b:-b]) ** 2)
    return 10 * np.log10(1.0 / mse)


CASES = [
    ("RGGB", [[512, 520], [508, 516]], (2.1, 1.0, 1.6)),
    ("GRBG", [[600, 500], [550, 530]], (1.7, 1.0, 2.3)),
    ("GBRG", [[100, 140], [120, 90]], (2.6, 1.0, 1.2)),
    ("BGGR", [[2047, 2050], [2049, 2046]], (0.8, 1.0, 1.9)),  # a gain below green: LibRaw rescales
]


@pytest.mark.parametrize("gamma", ["srgb", "bt709"])
@pytest.mark.parametrize("phase, black, wb", CASES)
def test_bayer_matches_libraw(tmp_path, phase, black, wb, gamma):
    matrix = [[1.9, -0.7, -0.2], [-0.25, 1.6, -0.35], [0.02, -0.6, 1.58]]
    meta = make_meta(BAYER_PHASES[phase], black, 96, 128, wb=wb, matrix=matrix)
    isp.write_dng(tmp_path / "a.dng", smooth_mosaic(meta, seed=3, fill=1.0), meta)  # some pixels clip
    ours = isp.render_file(tmp_path / "a.dng", wb="camera", gamma=gamma, demosaic="bilinear")
    assert ours.dtype == np.float32 and ours.shape == (96, 128, 3)
    assert interior_psnr(ours, libraw_render(tmp_path / "a.dng", gamma)) >= 60.0


@pytest.mark.parametrize("gamma", ["srgb", "bt709"])
def test_xtrans_matches_libraw(tmp_path, gamma):
    meta = make_meta(XTRANS, 1024, 516, 522, wb=(1.9, 1.0, 1.7))
    isp.write_dng(tmp_path / "x.dng", smooth_mosaic(meta, seed=4), meta)
    ours = isp.render_file(tmp_path / "x.dng", gamma=gamma)
    assert interior_psnr(ours, libraw_render(tmp_path / "x.dng", gamma)) >= 50.0


def test_xtrans_uses_libraw_quantised_normalisers(tmp_path):
    """LibRaw normalises X-Trans neighbour sums by floor(256/sum)/256; exact 1/sum would miss by ~0.4%."""
    meta = make_meta(XTRANS, 1024, 132, 132)
    isp.write_dng(tmp_path / "x.dng", smooth_mosaic(meta, seed=5), meta)
    ours = isp.render_file(tmp_path / "x.dng", gamma="linear")
    with rawpy.imread(str(tmp_path / "x.dng")) as raw:
        ref = raw.postprocess(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True, gamma=(1, 1),
                              no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0, user_flip=0) / 65535.0
    assert np.abs(ours[4:-4, 4:-4] - ref[4:-4, 4:-4]).max() < 2e-4


def test_wb_options(tmp_path):
    meta = make_meta(BAYER_PHASES["RGGB"], 512, 32, 32, wb=(2.0, 1.0, 1.5))
    isp.write_dng(tmp_path / "a.dng", smooth_mosaic(meta, fill=0.3), meta)
    camera = isp.render_file(tmp_path / "a.dng", wb="camera", gamma="linear")
    explicit = isp.render_file(tmp_path / "a.dng", wb=(2.0, 1.0, 1.5), gamma="linear")
    np.testing.assert_allclose(camera, explicit, atol=1e-6)
    none = isp.render_file(tmp_path / "a.dng", wb="none", gamma="linear")
    assert abs(none.mean() - camera.mean()) > 1e-3
    with pytest.raises(isp.InputError, match="white balance"):
        isp.render_file(tmp_path / "a.dng", wb="purple")


def test_exposure_ratio_brightens_linearly(tmp_path):
    meta = make_meta(BAYER_PHASES["RGGB"], 512, 32, 32)
    isp.write_dng(tmp_path / "a.dng", smooth_mosaic(meta, fill=0.01, noise_dn=0), meta)
    base = isp.render_file(tmp_path / "a.dng", gamma="linear")
    bright = isp.render_file(tmp_path / "a.dng", gamma="linear", exposure_ratio=20)
    interior = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(bright[interior], np.clip(base[interior] * 20, 0, 1), atol=1e-5)


@pytest.mark.parametrize("demosaic", ["bilinear", "malvar"])
@pytest.mark.parametrize("packed", [False, True])
def test_mixed_cfa_batch_renders_each_sample_with_its_own_cfa(demosaic, packed):
    """A batch mixing Bayer phases renders like each sample alone (packed used to take sample 0's CFA)."""
    import torch

    from isp.cfa import pack
    from tests.rawfixtures import CAM_TO_SRGB

    phases = ["RGGB", "BGGR", "GRBG", "BGGR"]
    cfa = torch.tensor([BAYER_PHASES[p] for p in phases])
    mosaic = torch.rand(len(phases), 1, 12, 16, generator=torch.Generator().manual_seed(0))
    wb = torch.tensor([[2.0, 1.0, 1.5], [1.6, 1.0, 2.2], [2.4, 1.0, 1.1], [1.9, 1.0, 1.7]])
    matrix = torch.tensor(CAM_TO_SRGB)
    raw = torch.cat([pack(mosaic[i:i + 1], cfa[i]) for i in range(len(phases))]) if packed else mosaic
    batch = isp.pipeline.render(raw, cfa, wb, matrix, demosaic=demosaic, packed=packed)
    alone = torch.cat([isp.pipeline.render(mosaic[i:i + 1], cfa[i], wb[i], matrix, demosaic=demosaic)
                       for i in range(len(phases))])
    assert float((batch - alone).abs().max()) < 1e-6
    # the bug this guards against: sample 0's CFA for all would differ by far more
    wrong = isp.pipeline.render(mosaic, cfa[:1].expand_as(cfa), wb, matrix, demosaic=demosaic)
    assert float((wrong - alone).abs().max()) > 0.1
