"""Full-resolution render of a 12-megapixel Bayer file on the CPU: isp vs rawpy's LINEAR postprocess."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import rawpy

import isp
from isp.meta import CameraMeta

HEIGHT, WIDTH = 2832, 4240  # SID Sony frame


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(repeats: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    meta = CameraMeta("Bench", "12MP", WIDTH, HEIGHT, [[0, 1], [1, 2]], [[512, 512], [512, 512]], 16383.0,
                      [2.1, 1.0, 1.6], [2.0, 1.0, 1.5], [[1.8, -0.6, -0.2], [-0.2, 1.5, -0.3], [0.05, -0.5, 1.45]])
    mosaic = rng.integers(512, 16383, (HEIGHT, WIDTH), dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.dng"
        isp.write_dng(path, mosaic, meta)

        def ours():
            isp.render_file(path, gamma="srgb", demosaic="bilinear")

        def reference():
            with rawpy.imread(str(path)) as raw:
                raw.postprocess(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True,
                                output_color=rawpy.ColorSpace.sRGB, gamma=(2.4, 12.92), no_auto_bright=True,
                                output_bps=16, adjust_maximum_thr=0.0, user_flip=0)

        ours()  # warm-up (plan caches, allocator)
        ours_s, ref_s = _best_of(ours, repeats), _best_of(reference, repeats)
    return [{"name": "isp.render_file 12MP bilinear (file -> sRGB float)", "ours_s": ours_s, "reference_s": ref_s,
             "ratio": ours_s / ref_s, "note": "reference: rawpy postprocess LINEAR, 16-bit; goal ratio <= 0.5"}]


if __name__ == "__main__":
    for row in run():
        print(row)
