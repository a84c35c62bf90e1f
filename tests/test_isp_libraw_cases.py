"""Files with missing or unusual metadata render as rawpy renders them (LibRaw's own rules), and the real camera files."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rawpy
import torch

import isp
from isp.rawfile import libraw_auto_wb, libraw_multipliers, open_raw, read_make_model
from tests.rawfixtures import BAYER_PHASES, XTRANS, make_meta, smooth_mosaic, write_test_dng

REALRAW = Path(__file__).resolve().parents[2] / "shared" / "realraw"
REFERENCE = dict(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB,
                 gamma=(2.4, 12.92), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0, user_flip=0)
BLACK = [512, 530, 505, 521]  # per site, all different: a site/colour mix-up shows


def rawpy_render(path, **overrides) -> np.ndarray:
    with rawpy.imread(str(path)) as raw:
        return raw.postprocess(**{**REFERENCE, **overrides}).astype(np.float64) / 65535.0


def _half_size_in_fresh_process(path, folder) -> np.ndarray:
    """rawpy_render(path, half_size=True) in a new Python process (LibRaw starts from another heap)."""
    out = Path(folder) / "half_ref.npy"
    script = ("import sys, numpy as np, rawpy; sys.path.insert(0, sys.argv[3]);"
              "from tests.test_isp_libraw_cases import rawpy_render;"
              "np.save(sys.argv[2], rawpy_render(sys.argv[1], half_size=True))")
    subprocess.run([sys.executable, "-c", script, str(path), str(out), str(Path(__file__).resolve().parents[1])],
                   check=True, capture_output=True)
    return np.load(out)


def interior_psnr(ours, ref, border=4):
    assert ours.shape == ref.shape
    diff = ours[border:-border, border:-border].astype(np.float64) - ref[border:-border, border:-border]
    return 10 * np.log10(1.0 / max(np.mean(diff**2), 1e-20))


@pytest.fixture(scope="module")
def mosaic():
    meta = make_meta(BAYER_PHASES["GRBG"], 512, 96, 128, white=16383)
    frame = smooth_mosaic(meta, seed=3, fill=1.0)
    frame[:16, :16] = 16383  # saturated blocks: auto white balance must skip them
    return frame


def cfa_dng(tmp_path, mosaic, name="a.dng", **tags):
    return write_test_dng(tmp_path / name, mosaic, cfa=BAYER_PHASES["GRBG"], black=BLACK, white=16383, **tags)


@pytest.mark.parametrize("neutral", [None, (0.0, 1.0, 0.5)], ids=["missing", "zero"])
def test_missing_or_invalid_camera_wb_falls_back_to_libraw_auto_wb(tmp_path, mosaic, neutral):
    path = cfa_dng(tmp_path, mosaic, as_shot_neutral=neutral)
    raw = open_raw(path)
    gains, source = libraw_multipliers(raw, "camera")
    assert source.startswith("auto")
    assert interior_psnr(isp.render_file(path), rawpy_render(path)) >= 60
    # the fallback is LibRaw's statistic, not daylight and not a grey world over all pixels
    assert not np.allclose(gains[:3] / gains[1], raw.pre_mul[:3] / raw.pre_mul[1], rtol=1e-2)
    _, meta = isp.read_raw(path)
    np.testing.assert_allclose(meta.wb_as_shot, gains[:3] / gains[1], rtol=1e-12)


def test_camera_multiplier_rules_of_libraw(tmp_path, mosaic):
    """LibRaw's scale_colors: first multiplier <= 1e-5 (a Canon D30 CRW has -1) -> auto; blue invalid -> daylight."""
    raw = open_raw(cfa_dng(tmp_path, mosaic))
    raw.cam_mul = np.array([-1.0, 1.0, 1.5, 0.0])
    gains, source = libraw_multipliers(raw, "camera")
    auto = libraw_auto_wb(raw)
    assert source.startswith("auto") and np.allclose(gains, auto / auto.min(), rtol=1e-12)
    raw.cam_mul = np.array([2.0, 1.0, 0.0, 0.0])
    gains, source = libraw_multipliers(raw, "camera")
    daylight = np.array([*raw.pre_mul[:3], raw.pre_mul[1]])
    assert source.startswith("daylight") and np.allclose(gains, daylight / daylight.min(), rtol=1e-12)


@pytest.mark.parametrize("phase", ["GRBG", "BGGR"])
def test_wb_auto_matches_use_auto_wb(tmp_path, mosaic, phase):
    path = write_test_dng(tmp_path / "a.dng", mosaic, cfa=BAYER_PHASES[phase], black=BLACK, white=16383)
    ours = isp.render_file(path, wb="auto")
    assert interior_psnr(ours, rawpy_render(path, use_auto_wb=True, use_camera_wb=False)) >= 60
    assert interior_psnr(ours, rawpy_render(path)) < 40  # auto differs from the camera's own multipliers


def test_auto_wb_statistic_skips_near_white_blocks_and_balances_second_green(tmp_path):
    """LibRaw: 8x8 blocks; one value above maximum - 25 drops the whole block; G and G2 get their own count / sum."""
    height, width = 32, 32
    frame = np.full((height, width), 1000, dtype=np.uint16)
    frame[0::2, 1::2] = 3000  # R of GRBG
    frame[1::2, 0::2] = 1500  # B
    frame[1::2, 1::2] = 1200  # G2
    frame[8:16, 8:16] = 2000
    frame[8, 8] = 16383  # above maximum - 25 after black: this block is skipped
    path = write_test_dng(tmp_path / "w.dng", frame, cfa=BAYER_PHASES["GRBG"], black=512, white=16383, as_shot_neutral=None)
    pre_mul = libraw_auto_wb(open_raw(path))
    np.testing.assert_allclose(pre_mul, 1.0 / np.array([3000 - 512, 1000 - 512, 1500 - 512, 1200 - 512]), rtol=1e-12)
    assert interior_psnr(isp.render_file(path, wb="auto"), rawpy_render(path, use_auto_wb=True, use_camera_wb=False)) >= 60


def test_no_colour_matrix_renders_raw_colour_with_one_warning(tmp_path, mosaic):
    path = cfa_dng(tmp_path, mosaic, color_matrix=None)
    warnings = []
    ours = isp.render_file(path, warn=warnings.append)
    assert len(warnings) == 1 and "no colour matrix" in warnings[0] and str(path) in warnings[0]
    assert interior_psnr(ours, rawpy_render(path)) >= 60
    with pytest.raises(isp.RawReadError, match="no colour matrix"):
        isp.read_raw(path)  # training data needs a matrix


@pytest.mark.parametrize("neutral", [(0.5, 1.0, 0.625), None], ids=["as-shot", "auto"])
def test_linear_dng_is_rendered_without_demosaic(tmp_path, neutral):
    meta = make_meta(BAYER_PHASES["RGGB"], 0, 64, 80, white=16383)
    planes = np.stack([smooth_mosaic(meta, seed=s, fill=0.95) for s in (1, 2, 3)], axis=-1)
    path = write_test_dng(tmp_path / "lin.dng", planes, black=(100, 140, 120), white=16383, as_shot_neutral=neutral)
    assert open_raw(path).layout == "stack"
    assert interior_psnr(isp.render_file(path), rawpy_render(path)) >= 50
    with pytest.raises(isp.RawReadError, match="demosaiced"):
        isp.read_raw(path)


@pytest.mark.parametrize("neutral", [(0.5, 1.0, 0.625), None], ids=["as-shot", "auto"])
def test_monochrome_renders_grey_as_libraw(tmp_path, mosaic, neutral):
    path = write_test_dng(tmp_path / "mono.dng", mosaic, black=300, white=16383, as_shot_neutral=neutral)
    ours = isp.render_file(path)
    ref = rawpy_render(path)
    assert ours.shape == ref.shape == (96, 128, 1)
    assert interior_psnr(ours, ref) >= 60  # with as-shot multipliers LibRaw scales grey by r / min: so do we


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_rawpy_default_flip(tmp_path, mosaic, orientation):
    path = cfa_dng(tmp_path, mosaic, orientation=orientation)
    with rawpy.imread(str(path)) as raw:
        ref = raw.postprocess(**{k: v for k, v in REFERENCE.items() if k != "user_flip"}).astype(np.float64) / 65535
    ours = isp.render_file(path)
    assert ours.shape == ref.shape and interior_psnr(ours, ref) >= 60
    assert isp.render_file(path, flip=False).shape == (96, 128, 3)


@pytest.mark.parametrize("cfa, size", [(BAYER_PHASES["BGGR"], (64, 96)), (BAYER_PHASES["GBRG"], (63, 95)), (XTRANS, (96, 132))],
                         ids=["bayer", "bayer-odd", "xtrans"])
def test_half_size_matches_rawpy(tmp_path, cfa, size):
    meta = make_meta(cfa, 0, *size, white=16383)
    path = write_test_dng(tmp_path / "h.dng", smooth_mosaic(meta, seed=6, fill=0.95), cfa=cfa, black=BLACK[0], white=16383)
    ours = isp.render_file(path, half_size=True)
    ref = rawpy_render(path, half_size=True)
    assert ours.shape == ref.shape == ((size[0] + 1) // 2, (size[1] + 1) // 2, 3)
    best = interior_psnr(ours, ref, border=2)
    # LibRaw's half-size X-Trans fill reads part of its image buffer before writing it: what it finds
    # there depends on the process (measured 35-72 dB against us) or is zero (108 dB). Ours is LibRaw's
    # result on a zeroed buffer, which about one fresh process in three reproduces.
    for _ in range(30 if len(cfa) == 6 else 0):
        if best >= 60:
            break
        best = max(best, interior_psnr(ours, _half_size_in_fresh_process(path, tmp_path), border=2))
    assert best >= 60


@pytest.mark.parametrize("scale, half_size", [((1.0, 2.0), False), ((1.5, 1.0), False), ((1.0, 2.0), True)],
                         ids=["taller", "wider", "taller-half"])
def test_non_square_pixels_are_stretched_as_libraw(tmp_path, mosaic, scale, half_size):
    path = cfa_dng(tmp_path, mosaic, default_scale=scale)
    ours, ref = isp.render_file(path, half_size=half_size), rawpy_render(path, half_size=half_size)
    assert ours.shape == ref.shape != (96 // (1 + half_size), 128 // (1 + half_size), 3)
    assert interior_psnr(ours, ref) >= 60


def test_make_model_from_unique_camera_model_ciff_and_mrw(tmp_path, mosaic):
    path = cfa_dng(tmp_path, mosaic, make=None, model=None, unique_model="Blackmagic Pocket Cinema Camera 4K")
    assert read_make_model(path) == ("Blackmagic", "Pocket Cinema Camera 4K", "Blackmagic Pocket Cinema Camera 4K")
    # A Canon CIFF heap: header, a sub-heap holding the make/model record (0x080A), tables at each heap's end.
    record = b"Canon\0Canon EOS D30\0"
    sub = record + (1).to_bytes(2, "little") + (0x080A).to_bytes(2, "little") + len(record).to_bytes(4, "little") \
        + (0).to_bytes(4, "little") + len(record).to_bytes(4, "little")
    root = sub + (1).to_bytes(2, "little") + (0x300A).to_bytes(2, "little") + len(sub).to_bytes(4, "little") \
        + (0).to_bytes(4, "little") + len(sub).to_bytes(4, "little")
    crw = tmp_path / "a.crw"
    crw.write_bytes(b"II" + (26).to_bytes(4, "little") + b"HEAPCCDR" + bytes(12) + root)
    assert read_make_model(crw)[:2] == ("Canon", "Canon EOS D30")
    # Minolta MRW: a TIFF (Make, Model in IFD0) inside the TTW block
    tiff = bytearray(b"II*\0" + (8).to_bytes(4, "little") + (2).to_bytes(2, "little"))
    strings = [b"Minolta\0", b"DiMAGE A1\0"]
    data_at = 8 + 2 + 2 * 12 + 4
    for tag, text in zip((271, 272), strings):
        tiff += tag.to_bytes(2, "little") + (2).to_bytes(2, "little") + len(text).to_bytes(4, "little") \
            + data_at.to_bytes(4, "little")
        data_at += len(text)
    tiff += bytes(4) + b"".join(strings)
    blocks = b"\0PRD" + (8).to_bytes(4, "big") + bytes(8) + b"\0TTW" + len(tiff).to_bytes(4, "big") + bytes(tiff)
    mrw = tmp_path / "a.mrw"
    mrw.write_bytes(b"\0MRM" + len(blocks).to_bytes(4, "big") + blocks)
    assert read_make_model(mrw)[:2] == ("Minolta", "DiMAGE A1")


def test_blackmagic_dng_matches_libraw():
    path = REALRAW / "blackmagic_pocket4k.dng"
    raw = open_raw(path)
    assert (raw.make, raw.model, raw.layout) == ("Blackmagic", "Pocket Cinema Camera 4K", "cfa")
    assert interior_psnr(isp.render_file(path), rawpy_render(path)) >= 60


def test_linear_phone_dng_matches_libraw():
    path = REALRAW / "lg_g4_sample_1mp.dng"
    raw = open_raw(path)
    assert raw.layout == "stack" and raw.make and raw.model
    assert interior_psnr(isp.render_file(path), rawpy_render(path)) >= 50


def test_info_reports_wb_and_matrix_sources(tmp_path, mosaic, capsys):
    import json

    from isp.cli import main

    path = cfa_dng(tmp_path, mosaic, as_shot_neutral=None, color_matrix=None, make=None, model=None, unique_model="Acme Z 9")
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    gains, _ = libraw_multipliers(open_raw(path), "auto")
    assert info["wb_source"].startswith("auto") and np.allclose(info["wb_as_shot"], gains[:3] / gains[1], atol=1e-6)
    assert info["cam_to_srgb"] is None and info["matrix_source"].startswith("none")
    assert (info["make"], info["model"], info["layout"]) == ("Acme", "Z 9", "colour filter array")
    assert main(["info", str(REALRAW / "lg_g4_sample_1mp.dng")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("full colour") and info["make"] and info["model"] and info["wb_source"] == "camera"


def test_device_path_matches_the_cpu_strip_renderer(tmp_path, mosaic):
    """`--device cuda` renders through the differentiable ops; here the same code runs on the CPU."""
    from isp.develop import _render_cfa_torch

    raw = open_raw(cfa_dng(tmp_path, mosaic, as_shot_neutral=None))
    gains, _ = libraw_multipliers(raw, "camera")
    device_path = _render_cfa_torch(raw, gains, raw.cam_to_srgb, "srgb", "bilinear", torch.device("cpu"), 1.0)
    if torch.cuda.is_available():
        device_path = _render_cfa_torch(raw, gains, raw.cam_to_srgb, "srgb", "bilinear", torch.device("cuda"), 1.0)
    assert interior_psnr(device_path, isp.render_file(raw.path, device="cpu")) >= 70
    assert interior_psnr(device_path, rawpy_render(raw.path)) >= 60
