"""The `isp` command: render and info, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import numpy as np
import png
import pytest
import rawpy

import isp
from isp.cli import main
from tests.rawfixtures import BAYER_PHASES, make_meta, smooth_mosaic


def read_png(path):
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(r) for r in rows]).reshape(height, width, info["planes"]), info["bitdepth"]


@pytest.fixture()
def dng(tmp_path):
    meta = make_meta(BAYER_PHASES["GBRG"], [[512, 516], [510, 514]], 64, 96, wb=(2.2, 1.0, 1.4), exposure_time=0.04, fnumber=8.0)
    isp.write_dng(tmp_path / "in.dng", smooth_mosaic(meta, seed=9), meta)
    return tmp_path / "in.dng"


def test_render_16bit_png_matches_libraw(dng, tmp_path):
    out = tmp_path / "out.png"
    assert main(["render", str(dng), "-o", str(out), "--wb", "camera", "--gamma", "srgb", "--demosaic", "bilinear", "--bits", "16"]) == 0
    ours, depth = read_png(out)
    assert depth == 16 and ours.shape == (64, 96, 3)
    with rawpy.imread(str(dng)) as raw:
        ref = raw.postprocess(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB,
                              gamma=(2.4, 12.92), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0, user_flip=0)
    diff = (ours.astype(float) - ref.astype(float))[4:-4, 4:-4] / 65535
    assert 10 * np.log10(1 / np.mean(diff**2)) >= 60


def test_render_many_into_folder_and_half_8bit(dng, tmp_path):
    second = tmp_path / "second.dng"
    second.write_bytes(dng.read_bytes())
    outdir = tmp_path / "pngs"
    assert main(["render", str(dng), str(second), "-o", str(outdir), "--demosaic", "half", "--bits", "8"]) == 0
    img, depth = read_png(outdir / "second.png")
    assert depth == 8 and img.shape == (32, 48, 3)
    expected = np.round(isp.render_file(second, demosaic="half") * 255)
    assert np.abs(img.astype(float) - expected).max() <= 1


def test_info_prints_metadata(dng, capsys):
    assert main(["info", str(dng)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cfa"] == "GBRG" and info["black_level"] == [[512, 516], [510, 514]]
    assert info["width"] == 96 and info["height"] == 64 and info["exposure_time"] == 0.04 and info["fnumber"] == 8.0
    assert set(info) >= {"make", "model", "white_level", "wb_as_shot", "wb_daylight", "cam_to_srgb"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "{tmp}/missing.ARW"], "no such file"),
        (["render", "{tmp}/junk.ARW", "-o", "{tmp}/o.png"], "not a RAW file"),
        (["render", "{dng}", "-o", "{tmp}/o.png", "--wb", "1,2"], "white balance"),
        (["render", "{dng}", "-o", "{tmp}/o.png", "--device", "cuda:7"], "device"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_output(dng, tmp_path, args, message):
    (tmp_path / "junk.ARW").write_bytes(b"\x00" * 1000)
    args = [a.format(tmp=tmp_path, dng=dng) for a in args]
    proc = subprocess.run([sys.executable, "-m", "isp", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_bad_exposure_ratio_is_rejected_by_the_parser(dng, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "isp", "render", str(dng), "-o", str(tmp_path / "o.png"), "--exposure-ratio", "-3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "positive" in proc.stderr


def test_info_starts_without_torch(dng):
    """`isp info` reads metadata with rawpy alone: importing torch would cost more than the read itself."""
    code = f"import sys; from isp.cli import main; main(['info', {str(dng)!r}]); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False"
    assert json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])["cfa"] == "GBRG"
