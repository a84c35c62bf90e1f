"""isp vs rawpy on the CPU, same run: in-process renders (12 MP Bayer, X-Trans, the real Blackmagic DNG) and `isp render` wall time.

The command rows time whole processes (interpreter start, imports, read, render, PNG write):
`python -m isp render` on one and on ten copies of the Blackmagic DNG against a Python script that
renders the same files with rawpy (LINEAR, sRGB gamma, camera WB) and writes 8-bit PNGs with imageio.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rawpy

import isp
from isp.meta import CameraMeta

HEIGHT, WIDTH = 2832, 4240  # SID Sony frame
XTRANS_WIDTH = 4236  # whole 6x6 periods
XTRANS = [[0, 2, 1, 2, 0, 1], [1, 1, 0, 1, 1, 2], [1, 1, 2, 1, 1, 0], [2, 0, 1, 0, 2, 1], [1, 1, 2, 1, 1, 0], [1, 1, 0, 1, 1, 2]]
MATRIX = [[1.8, -0.6, -0.2], [-0.2, 1.5, -0.3], [0.05, -0.5, 1.45]]
REPO = Path(__file__).resolve().parents[1]
BLACKMAGIC = REPO.parent / "shared" / "realraw" / "blackmagic_pocket4k.dng"
RAWPY_SCRIPT = """
import sys, pathlib, rawpy, imageio.v3 as iio
out = pathlib.Path(sys.argv[1])
for name in sys.argv[2:]:
    with rawpy.imread(name) as raw:
        rgb = raw.postprocess(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True,
                              output_color=rawpy.ColorSpace.sRGB, gamma=(2.4, 12.92), no_auto_bright=True,
                              output_bps=8, adjust_maximum_thr=0.0)
    iio.imwrite(out / (pathlib.Path(name).stem + ".png"), rgb)
"""


def _best_of_interleaved(ours, reference, repeats: int) -> tuple[float, float]:
    """Best wall time of each, alternating the two so that a change in machine load hits both alike."""
    best_ours = best_reference = float("inf")
    for _ in range(repeats):
        for fn, is_ours in ((ours, True), (reference, False)):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if is_ours:
                best_ours = min(best_ours, elapsed)
            else:
                best_reference = min(best_reference, elapsed)
    return best_ours, best_reference


def _compare(path: Path, repeats: int) -> tuple[float, float]:
    def ours():
        isp.render_file(path, gamma="srgb", demosaic="bilinear")

    def reference():
        with rawpy.imread(str(path)) as raw:
            raw.postprocess(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True,
                            output_color=rawpy.ColorSpace.sRGB, gamma=(2.4, 12.92), no_auto_bright=True,
                            output_bps=16, adjust_maximum_thr=0.0, user_flip=0)

    ours()  # warm-up (plan caches, allocator, worker thread)
    return _best_of_interleaved(ours, reference, repeats)


def _command_rows(tmp: Path, repeats: int) -> list[dict]:
    """`isp render` on 1 and 10 files against a rawpy + imageio script writing the same PNGs, whole processes."""
    inputs = []
    for i in range(10):
        inputs.append(tmp / f"bm{i}.dng")
        shutil.copyfile(BLACKMAGIC, inputs[-1])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    for count in (1, 10):
        files = [str(p) for p in inputs[:count]]

        def fresh(name: str) -> Path:
            folder = tmp / name
            shutil.rmtree(folder, ignore_errors=True)
            return folder

        def ours():
            subprocess.run([sys.executable, "-m", "isp", "render", *files, "-o", str(fresh("ours")), "--device", "cpu"],
                           check=True, env=env, capture_output=True)

        def reference():
            folder = fresh("ref")
            folder.mkdir()
            subprocess.run([sys.executable, "-c", RAWPY_SCRIPT, str(folder), *files], check=True, env=env, capture_output=True)

        ours_s, ref_s = _best_of_interleaved(ours, reference, repeats)
        rows.append({"name": f"isp render {count} Blackmagic DNG -> 8-bit PNG (process)", "ours_s": ours_s,
                     "reference_s": ref_s, "ratio": ours_s / ref_s,
                     "note": "reference: python script, rawpy LINEAR + imageio PNG, same files"})
    return rows


def run(repeats: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = [
        ("isp.render_file 12MP bilinear (file -> sRGB float)", "bench.dng",
         CameraMeta("Bench", "12MP", WIDTH, HEIGHT, [[0, 1], [1, 2]], [[512, 512], [512, 512]], 16383.0,
                    [2.1, 1.0, 1.6], [2.0, 1.0, 1.5], MATRIX),
         rng.integers(512, 16383, (HEIGHT, WIDTH), dtype=np.uint16)),
        ("isp.render_file 12MP X-Trans bilinear (file -> sRGB)", "xtrans.dng",
         CameraMeta("Bench", "12MP X-Trans", XTRANS_WIDTH, HEIGHT, XTRANS, np.full((6, 6), 1024.0).tolist(), 16383.0,
                    [1.9, 1.0, 1.7], [2.0, 1.0, 1.5], MATRIX),
         rng.integers(1024, 16383, (HEIGHT, XTRANS_WIDTH), dtype=np.uint16)),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, filename, meta, mosaic in cases:
            path = Path(tmp) / filename
            isp.write_dng(path, mosaic, meta)
            ours_s, ref_s = _compare(path, repeats)
            path.unlink()
            goal = "goal ratio <= 0.5" if filename == "bench.dng" else "no stated goal"
            rows.append({"name": name, "ours_s": ours_s, "reference_s": ref_s, "ratio": ours_s / ref_s,
                         "note": f"reference: rawpy postprocess LINEAR, 16-bit; {goal}"})
        if BLACKMAGIC.is_file():
            ours_s, ref_s = _compare(BLACKMAGIC, repeats)
            rows.append({"name": "isp.render_file Blackmagic Pocket 4K DNG (real, 9 MP)", "ours_s": ours_s,
                         "reference_s": ref_s, "ratio": ours_s / ref_s,
                         "note": "reference: rawpy postprocess LINEAR, 16-bit; goal ratio <= 0.5"})
            rows.extend(_command_rows(Path(tmp), repeats))
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
