"""Unsupported sensors: each is one clear error naming the file and the reason (isp and the CLI)."""
import subprocess
import sys

import numpy as np
import pytest
from pidng.core import RAW2DNG
from pidng.defs import PhotometricInterpretation
from pidng.dng import DNGTags, Tag

import isp


def write_raw_dng(path, data, photometric, cfa=None, samples=1):
    height, width = data.shape[:2]
    tags = DNGTags()
    tags.set(Tag.ImageWidth, width)
    tags.set(Tag.ImageLength, height)
    tags.set(Tag.TileWidth, width)
    tags.set(Tag.TileLength, height)
    tags.set(Tag.PhotometricInterpretation, photometric)
    tags.set(Tag.SamplesPerPixel, samples)
    tags.set(Tag.BitsPerSample, 16 if samples == 1 else [16] * samples)
    if cfa is not None:
        period = int(np.sqrt(len(cfa)))
        tags.set(Tag.CFARepeatPatternDim, [period, period])
        tags.set(Tag.CFAPattern, cfa)
        tags.set(Tag.CFAPlaneColor, [0, 1, 2])
    tags.set(Tag.BlackLevel, [0])
    tags.set(Tag.WhiteLevel, 65535)
    tags.set(Tag.ColorMatrix1, [[10000, 10000], [0, 1], [0, 1], [0, 1], [10000, 10000], [0, 1], [0, 1], [0, 1], [10000, 10000]])
    tags.set(Tag.AsShotNeutral, [[1, 2], [1, 1], [2, 3]])
    tags.set(Tag.Make, "Test")
    tags.set(Tag.Model, "Odd")
    writer = RAW2DNG()
    writer.options(tags, path=str(path.parent), compress=False)
    writer.convert(np.ascontiguousarray(data), filename=path.name)


@pytest.fixture()
def odd_files(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    mono = tmp_path / "mono.dng"
    write_raw_dng(mono, rng.integers(0, 4000, (32, 32), dtype=np.uint16), PhotometricInterpretation.BlackIsZero)
    files["monochrome"] = mono
    linear = tmp_path / "linear.dng"
    write_raw_dng(linear, rng.integers(0, 4000, (32, 32, 3), dtype=np.uint16), PhotometricInterpretation.Linear_Raw, samples=3)
    files["linear"] = linear
    odd_cfa = tmp_path / "oddcfa.dng"  # a 2x2 pattern with two reds: neither Bayer nor X-Trans
    write_raw_dng(odd_cfa, rng.integers(0, 4000, (32, 32), dtype=np.uint16), PhotometricInterpretation.Color_Filter_Array, cfa=[0, 0, 1, 2])
    files["oddcfa"] = odd_cfa
    return files


@pytest.mark.parametrize("kind", ["monochrome", "linear", "oddcfa"])
def test_training_reader_refuses_what_it_cannot_pack_in_one_line(odd_files, kind):
    """read_raw (the dataset's reader) stays CFA-only; `isp render` renders a linear DNG as LibRaw does.

    LibRaw itself refuses this BlackIsZero monochrome DNG and the two-red CFA, so `isp render` does too."""
    path = odd_files[kind]
    with pytest.raises(isp.RawReadError) as info:
        isp.read_raw(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert any(word in message for word in ("monochrome", "demosaiced", "Bayer", "not a", "colours", "CFA"))
    proc = subprocess.run([sys.executable, "-m", "isp", "render", str(path), "-o", str(path.with_suffix(".png"))],
                          capture_output=True, text=True)
    if kind != "linear":
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not path.with_suffix(".png").exists()
    else:
        assert proc.returncode == 0 and path.with_suffix(".png").stat().st_size > 0


def test_unwritable_output_folder(tmp_path):
    from tests.rawfixtures import BAYER_PHASES, make_meta, smooth_mosaic

    meta = make_meta(BAYER_PHASES["RGGB"], 512, 32, 32)
    isp.write_dng(tmp_path / "a.dng", smooth_mosaic(meta), meta)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # unwritable even for root
    proc = subprocess.run([sys.executable, "-m", "isp", "render", str(tmp_path / "a.dng"), "-o", str(blocker / "sub" / "o.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot create output folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
