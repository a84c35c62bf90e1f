"""Demosaic quality: PSNR against the true image for isp's bilinear and malvar and LibRaw's AHD and LINEAR.

Each colour photograph shipped inside scikit-image is mosaicked in all four Bayer phases; the
mosaic's 8-bit values (scaled to 16 bits) are demosaiced as they are (no white balance, no
matrix, no curve). LibRaw renders a DNG of the same mosaic (rawpy, raw colour, gamma 1). PSNR is
over the interior (4-pixel border excluded), averaged over the phases, in dB.

    python benchmarks/demosaic_table.py            # prints a Markdown table
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import rawpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isp import ops, write_dng  # noqa: E402
from isp.meta import CameraMeta  # noqa: E402

PHASES = {"RGGB": [[0, 1], [1, 2]], "GRBG": [[1, 0], [2, 1]], "GBRG": [[1, 2], [0, 1]], "BGGR": [[2, 1], [1, 0]]}
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
BORDER = 4
LIBRAW = {"LibRaw AHD": rawpy.DemosaicAlgorithm.AHD, "LibRaw LINEAR": rawpy.DemosaicAlgorithm.LINEAR}


def photographs():
    from skimage import data

    for name in IMAGES:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image
        height, width = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
        yield name, image[:height, :width, :3].astype(np.float64) / 255.0


def psnr(ours: np.ndarray, truth: np.ndarray) -> float:
    diff = (ours - truth)[BORDER:-BORDER, BORDER:-BORDER]
    return float(10 * np.log10(1.0 / np.mean(diff**2)))


def demosaiced(truth: np.ndarray, cfa, folder: Path) -> dict[str, np.ndarray]:
    rgb = torch.from_numpy(truth).permute(2, 0, 1)[None]
    mosaic = ops.mosaic(rgb, cfa)
    out = {name: ops.demosaic(mosaic, cfa, name).clamp(0, 1)[0].permute(1, 2, 0).numpy()
           for name in ("bilinear", "malvar")}
    height, width = truth.shape[:2]
    meta = CameraMeta(make="skimage", model="mosaic", width=width, height=height, cfa=cfa,
                      black_level=[[0.0, 0.0], [0.0, 0.0]], white_level=65535.0, wb_as_shot=[1.0, 1.0, 1.0],
                      wb_daylight=[1.0, 1.0, 1.0], cam_to_srgb=np.eye(3).tolist())
    dng = folder / "mosaic.dng"
    write_dng(dng, np.round(mosaic[0, 0].numpy() * 65535).astype(np.uint16), meta)
    for name, algorithm in LIBRAW.items():
        with rawpy.imread(str(dng)) as raw:
            out[name] = raw.postprocess(demosaic_algorithm=algorithm, use_camera_wb=True, output_color=rawpy.ColorSpace.raw,
                                        gamma=(1, 1), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0,
                                        user_flip=0).astype(np.float64) / 65535.0
    dng.unlink()
    return out


def main() -> int:
    warnings.filterwarnings("ignore")
    methods = ["bilinear", "malvar", *LIBRAW]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, truth in photographs():
            scores = {m: [] for m in methods}
            for cfa in PHASES.values():
                for method, image in demosaiced(truth, cfa, Path(tmp)).items():
                    scores[method].append(psnr(image, truth))
            rows.append((f"{name} {truth.shape[1]}x{truth.shape[0]}", [np.mean(scores[m]) for m in methods]))
            print(f"{name}: " + ", ".join(f"{m} {v:.2f}" for m, v in zip(methods, rows[-1][1])), file=sys.stderr)
    print("| image | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    means = np.mean([values for _, values in rows], axis=0)
    print("| **mean** | " + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
