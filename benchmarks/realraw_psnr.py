"""PSNR of `isp.render_file` against rawpy on the real camera files in ../shared/realraw (4-pixel border excluded).

    python benchmarks/realraw_psnr.py [FILE ...]     # default: every file in ../shared/realraw
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rawpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import isp  # noqa: E402

REALRAW = Path(__file__).resolve().parents[2] / "shared" / "realraw"
REFERENCE = dict(demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR, use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB,
                 gamma=(2.4, 12.92), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0, user_flip=0)
# (label, isp.render_file keywords, rawpy overrides, border)
CASES = (
    ("camera WB", {}, {}, 4),
    ("--wb auto", {"wb": "auto"}, {"use_auto_wb": True, "use_camera_wb": False}, 4),
    ("--half-size", {"half_size": True}, {"half_size": True}, 2),
)


def psnr(ours: np.ndarray, ref: np.ndarray, border: int) -> float:
    diff = (ours.astype(np.float64) - ref)[border:-border, border:-border]
    return float(10 * np.log10(1.0 / max(np.mean(diff**2), 1e-20)))


def main(paths: list[str]) -> int:
    files = [Path(p) for p in paths] or sorted(p for p in REALRAW.iterdir() if p.suffix.lower() != ".md")
    print("| file | layout | " + " | ".join(label for label, *_ in CASES) + " |")
    print("|---|---|" + "---:|" * len(CASES))
    for path in files:
        scores = []
        for _, ours_kw, ref_kw, border in CASES:
            with rawpy.imread(str(path)) as raw:
                ref = raw.postprocess(**{**REFERENCE, **ref_kw}).astype(np.float64) / 65535.0
            scores.append(psnr(isp.render_file(path, flip=False, **ours_kw), ref, border))
        layout = isp.open_raw(path).layout
        print(f"| {path.name} | {layout} | " + " | ".join(f"{s:.1f} dB" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
