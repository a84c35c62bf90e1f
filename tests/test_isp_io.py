"""read_raw / write_dng round trips and the metadata LibRaw reports."""
import json

import numpy as np
import pytest
import rawpy

import isp
from isp.errors import RawReadError
from isp.meta import CameraMeta
from tests.rawfixtures import BAYER_PHASES, XTRANS, make_meta, smooth_mosaic


@pytest.mark.parametrize("phase", sorted(BAYER_PHASES))
def test_bayer_round_trip_exact(tmp_path, phase):
    meta = make_meta(BAYER_PHASES[phase], [[512, 520], [508, 516]], 32, 48, exposure_time=0.1, fnumber=5.6)
    mosaic = smooth_mosaic(meta, seed=1)
    written = isp.write_dng(tmp_path / "a.dng", mosaic, meta)
    back, read = isp.read_raw(tmp_path / "a.dng")
    assert back.dtype == np.uint16 and np.array_equal(back, mosaic)
    assert read == written
    assert read.cfa == BAYER_PHASES[phase]
    assert read.black_level == [[512.0, 520.0], [508.0, 516.0]]
    assert read.white_level == 16383.0
    np.testing.assert_allclose(read.wb_as_shot, [2.1, 1.0, 1.6], rtol=1e-6)
    np.testing.assert_allclose(read.wb_daylight, [2.0, 1.0, 1.5], rtol=1e-4)
    np.testing.assert_allclose(read.cam_to_srgb, meta.cam_to_srgb, atol=5e-5)
    assert (read.make, read.model, read.exposure_time, read.fnumber) == ("Test", "Synthetic", 0.1, 5.6)


def test_black_level_is_per_site_not_per_colour(tmp_path):
    # GRBG: site (0,0) is G, (0,1) R, (1,0) B, (1,1) G2. rawpy orders blacks by colour (R, G, B, G2).
    meta = make_meta(BAYER_PHASES["GRBG"], [[100, 200], [300, 400]], 24, 24)
    isp.write_dng(tmp_path / "b.dng", smooth_mosaic(meta), meta)
    with rawpy.imread(str(tmp_path / "b.dng")) as raw:
        assert list(raw.black_level_per_channel) == [200, 100, 300, 400]
    assert isp.read_raw(tmp_path / "b.dng")[1].black_level == [[100, 200], [300, 400]]


def test_xtrans_round_trip_exact(tmp_path):
    meta = make_meta(XTRANS, 1024, 60, 66)
    mosaic = smooth_mosaic(meta, seed=2)
    isp.write_dng(tmp_path / "x.dng", mosaic, meta)
    back, read = isp.read_raw(tmp_path / "x.dng")
    assert np.array_equal(back, mosaic) and read.cfa == XTRANS and read.is_xtrans


def test_cam_to_srgb_matches_rawpy_color_matrix(tmp_path):
    meta = make_meta(BAYER_PHASES["RGGB"], 512, 24, 24)
    isp.write_dng(tmp_path / "c.dng", smooth_mosaic(meta), meta)
    with rawpy.imread(str(tmp_path / "c.dng")) as raw:
        expected = raw.color_matrix[:, :3]
    np.testing.assert_array_equal(np.asarray(isp.read_raw(tmp_path / "c.dng")[1].cam_to_srgb, dtype=np.float32), expected)


def test_cam_to_srgb_from_xyz_inverts_libraw_derivation():
    from isp.io import XYZ_FROM_SRGB, cam_to_srgb_from_xyz

    matrix = np.asarray(make_meta(BAYER_PHASES["RGGB"], 0, 2, 2).cam_to_srgb)
    daylight = np.array([2.0, 1.0, 1.5])
    cam_rgb = np.linalg.inv(matrix)
    cam_xyz = np.diag(1 / daylight) @ (cam_rgb / cam_rgb.sum(1, keepdims=True)) @ np.linalg.inv(XYZ_FROM_SRGB)
    got, got_daylight = cam_to_srgb_from_xyz(cam_xyz)
    np.testing.assert_allclose(got, matrix, atol=1e-12)
    np.testing.assert_allclose(got_daylight, daylight, atol=1e-12)


def test_meta_json_round_trip():
    meta = make_meta(XTRANS, 1024, 12, 12, exposure_time=0.033, iso=800.0)
    assert CameraMeta.from_json(meta.to_json()) == meta
    with pytest.raises(isp.InputError, match="unknown field"):
        CameraMeta.from_dict({**json.loads(meta.to_json()), "bogus": 1})


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"hello, this is not a raw file" * 10, "not a RAW"), (None, "no such file")],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.ARW"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RawReadError, match=reason) as info:
        isp.read_raw(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_dng_is_reported(tmp_path):
    meta = make_meta(BAYER_PHASES["RGGB"], 512, 64, 64)
    isp.write_dng(tmp_path / "t.dng", smooth_mosaic(meta), meta)
    data = (tmp_path / "t.dng").read_bytes()
    (tmp_path / "t.dng").write_bytes(data[: len(data) // 2])
    with pytest.raises(RawReadError):
        isp.read_raw(tmp_path / "t.dng")


def test_write_dng_validates(tmp_path):
    meta = make_meta(BAYER_PHASES["RGGB"], 512, 4, 4)
    with pytest.raises(isp.InputError, match="uint16"):
        isp.write_dng(tmp_path / "f.dng", np.zeros((24, 24), np.float32), meta)
    with pytest.raises(isp.InputError, match="CFA periods"):
        isp.write_dng(tmp_path / "f.dng", np.zeros((25, 24), np.uint16), meta)
    with pytest.raises(isp.InputError, match="too small"):
        isp.write_dng(tmp_path / "f.dng", np.zeros((16, 16), np.uint16), meta)
    bad = make_meta(BAYER_PHASES["RGGB"], 512, 4, 4, matrix=[[1, 0, 0], [0, 2, 0], [0, 0, 1]])
    with pytest.raises(isp.InputError, match="rows summing to 1"):
        isp.write_dng(tmp_path / "f.dng", np.zeros((24, 24), np.uint16), bad)
    assert not list(tmp_path.iterdir())  # nothing partial left behind
