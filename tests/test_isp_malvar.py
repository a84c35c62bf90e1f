"""Malvar-He-Cutler demosaic: agreement with colour-demosaicing, gradients, and its use in the ISP and the loss config."""
import numpy as np
import pytest
import rawpy
import torch
from colour_demosaicing import demosaicing_CFA_Bayer_Malvar2004, mosaicing_CFA_Bayer
from skimage import data
from torch.autograd import gradcheck

import isp
from isp import ops
from tests.rawfixtures import BAYER_PHASES, make_meta, smooth_mosaic

BORDER = 4
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # colour-demosaicing on new SciPy


@pytest.mark.parametrize("phase", sorted(BAYER_PHASES))
def test_malvar_matches_colour_demosaicing(phase):
    image = data.astronaut()[100:196, 150:278].astype(np.float64) / 255.0
    mosaic = mosaicing_CFA_Bayer(image, phase)
    reference = demosaicing_CFA_Bayer_Malvar2004(mosaic, phase)
    ours = ops.demosaic_malvar(torch.from_numpy(mosaic)[None, None], BAYER_PHASES[phase])[0].permute(1, 2, 0).numpy()
    diff = (ours - reference)[BORDER:-BORDER, BORDER:-BORDER]
    assert 10 * np.log10(1.0 / np.mean(diff**2)) >= 50
    # and it is a better demosaic than bilinear on a real photograph
    bilinear = ops.demosaic_bilinear(torch.from_numpy(mosaic)[None, None], BAYER_PHASES[phase])[0].permute(1, 2, 0).numpy()
    interior = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    assert np.mean((ours - image)[interior] ** 2) < 0.8 * np.mean((bilinear - image)[interior] ** 2)


def test_malvar_gradcheck_and_batch_of_phases():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    cfa = torch.tensor([BAYER_PHASES["RGGB"], BAYER_PHASES["GBRG"]])
    assert gradcheck(lambda a: ops.demosaic_malvar(a, cfa), (x,), eps=1e-6, atol=1e-5)
    out = ops.demosaic_malvar(x, cfa)
    assert out.shape == (2, 3, 4, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out[1:], ops.demosaic_malvar(x[1:], BAYER_PHASES["GBRG"]))


def test_malvar_refuses_xtrans_with_one_line():
    with pytest.raises(isp.InputError, match="Bayer"):
        ops.demosaic_malvar(torch.rand(1, 1, 12, 12), [[0, 1, 2, 1, 1, 1]] * 6)


def test_render_file_with_malvar_is_close_to_libraw_linear(tmp_path):
    """Same pipeline, other demosaic: on a smooth scene it stays near LibRaw's LINEAR render."""
    meta = make_meta(BAYER_PHASES["GRBG"], 512, 64, 96)
    isp.write_dng(tmp_path / "a.dng", smooth_mosaic(meta, seed=1, noise_dn=0, fill=0.4), meta)  # no clipping
    ours = isp.render_file(tmp_path / "a.dng", demosaic="malvar")
    with rawpy.imread(str(tmp_path / "a.dng")) as raw:
        ref = raw.postprocess(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True, gamma=(2.4, 12.92),
                              no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0, user_flip=0) / 65535.0
    diff = (ours - ref)[BORDER:-BORDER, BORDER:-BORDER]
    assert 30 <= 10 * np.log10(1.0 / np.mean(diff**2)) < 50  # near (the same pipeline), and a different demosaic


def test_loss_config_accepts_malvar():
    from rawrestore.config.schema import LossConfig, LpipsTermConfig, PerceptualTermConfig
    from rawrestore.losses.stack import LossStack

    config = LossConfig(perceptual=PerceptualTermConfig(weight=0.0), lpips=LpipsTermConfig(weight=0.0), render_demosaic="malvar")
    stack = LossStack(config, total_steps=10, cfa_period=2)
    assert stack.isp.demosaic == "malvar"
    mosaic = torch.rand(1, 1, 8, 8)
    rendered = stack.isp(mosaic, BAYER_PHASES["RGGB"], torch.ones(3), torch.eye(3))
    expected = ops.apply_curve(ops.demosaic_malvar(mosaic, BAYER_PHASES["RGGB"]).clamp(0, 1), "srgb")
    torch.testing.assert_close(rendered, expected)
