"""`isp render` outputs: format from the suffix, sRGB tags, and every bad target refused before any work."""
import contextlib
import errno
import io
import os
import subprocess

import numpy as np
import png
import pytest
import tifffile
from PIL import Image, ImageCms

import isp
from isp.cli import main
from isp.outputs import plan_outputs, write_image
from tests.rawfixtures import BAYER_PHASES, make_meta, smooth_mosaic


@pytest.fixture()
def dng(tmp_path):
    meta = make_meta(BAYER_PHASES["RGGB"], 512, 32, 48)
    isp.write_dng(tmp_path / "in.dng", smooth_mosaic(meta, seed=2), meta)
    return tmp_path / "in.dng"


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run_isp(*args):
    """The CLI in this process (a subprocess per case costs seconds of torch import); returns code, stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def test_each_format_holds_the_render_and_says_srgb(dng, tmp_path):
    image = isp.render_file(dng)
    write_image(tmp_path / "a.png", image, 16)
    write_image(tmp_path / "a.tif", image)
    write_image(tmp_path / "a.jpg", image)
    reader = png.Reader(filename=str(tmp_path / "a.png"))
    width, height, rows, info = reader.asDirect()
    pixels = np.vstack([np.asarray(r) for r in rows]).reshape(height, width, 3)
    assert info["bitdepth"] == 16 and np.array_equal(pixels, np.round(image * 65535).astype(np.uint16))
    assert b"sRGB" in [kind for kind, _ in png.Reader(filename=str(tmp_path / "a.png")).chunks()]
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint16 and np.array_equal(page.asarray(), np.round(image * 65535).astype(np.uint16))
        icc = page.tags["InterColorProfile"].value
    assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(bytes(icc))))
    jpeg = Image.open(tmp_path / "a.jpg")
    assert jpeg.mode == "RGB" and ImageCms.getProfileDescription(
        ImageCms.ImageCmsProfile(io.BytesIO(jpeg.info["icc_profile"]))).startswith("sRGB")
    expected = io.BytesIO()  # the same 8-bit pixels through Pillow's encoder decode to the same values
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(expected, format="JPEG", quality=95)
    assert np.array_equal(np.asarray(jpeg), np.asarray(Image.open(expected)))


def test_folder_output_with_format(dng, tmp_path):
    second = tmp_path / "second.dng"
    second.write_bytes(dng.read_bytes())
    proc = run_isp("render", dng, second, "-o", tmp_path / "out", "--format", "tiff")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in.tiff", "second.tiff"]


def test_rendering_over_own_earlier_output_is_allowed(dng, tmp_path):
    (tmp_path / "o.png").write_bytes(b"old render")
    assert run_isp("render", dng, "-o", tmp_path / "o.png").returncode == 0
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bad_case(kind, tmp_path, dng):
    a, b = tmp_path / "a" / "IMG_1.dng", tmp_path / "b" / "IMG_1.RAF"
    for path in (a, b):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(dng.read_bytes())
    out = tmp_path / "out"
    if kind == "collision":
        return [a, b, "-o", out], "would both be written"
    if kind == "same input twice":
        return [a, a, "-o", out], "would both be written"
    if kind == "folder in the way":
        (out / "IMG_1.png").mkdir(parents=True)
        return [a, "-o", out], "is a folder"
    if kind == "fifo":
        out.mkdir()
        os.mkfifo(out / "IMG_1.png")
        return [a, "-o", out], "FIFO"
    if kind == "device node":
        return [a, "-o", "/dev/null"], "device node"
    if kind == "unknown suffix":
        return [a, "-o", tmp_path / "x.gif"], "unknown output format"
    if kind == "jpeg 16-bit":
        return [a, "-o", tmp_path / "x.jpg", "--bits", "16"], "8 bits"
    if kind == "file for a batch":
        return [a, b, "-o", tmp_path / "x.png"], "name a folder"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["collision", "same input twice", "folder in the way", "fifo", "device node",
                                  "unknown suffix", "jpeg 16-bit", "file for a batch"])
def test_bad_output_is_one_line_exit_2_and_nothing_changes(dng, tmp_path, kind):
    args, message = bad_case(kind, tmp_path, dng)
    before = snapshot(tmp_path)
    proc = run_isp("render", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert snapshot(tmp_path) == before


def test_input_as_output_is_refused(dng, tmp_path):
    raw_named_png = tmp_path / "shot.png"  # a RAW file someone named .png: rendering it over itself must fail
    raw_named_png.write_bytes(dng.read_bytes())
    before = snapshot(tmp_path)
    proc = run_isp("render", raw_named_png, "-o", raw_named_png)
    assert proc.returncode == 2 and "inputs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_isp("render", raw_named_png, "-o", tmp_path)  # folder mode: tmp_path/shot.png is the input
    assert proc.returncode == 2 and "inputs" in proc.stderr
    assert snapshot(tmp_path) == before


def test_plan_refuses_before_creating_the_folder(tmp_path):
    with pytest.raises(isp.InputError, match="would both be written"):
        plan_outputs(["a/x.ARW", "b/x.NEF"], tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_full_disk_is_one_line_and_leaves_nothing(dng, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", no_space)
    with pytest.raises(isp.InputError, match="disk full") as info:
        write_image(tmp_path / "o.tiff", isp.render_file(dng))
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["in.dng"]
