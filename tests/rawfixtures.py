"""Small synthetic RAW files for tests: written with pidng through isp.write_dng."""
from __future__ import annotations

import numpy as np

from isp.meta import CameraMeta

BAYER_PHASES = {"RGGB": [[0, 1], [1, 2]], "GRBG": [[1, 0], [2, 1]], "GBRG": [[1, 2], [0, 1]], "BGGR": [[2, 1], [1, 0]]}
# The X-Trans phase SID's Fuji packing assumes (its channel 0 is R, 2 is B, 5-8 are G).
XTRANS = [[0, 2, 1, 2, 0, 1], [1, 1, 0, 1, 1, 2], [1, 1, 2, 1, 1, 0], [2, 0, 1, 0, 2, 1], [1, 1, 2, 1, 1, 0], [1, 1, 0, 1, 1, 2]]
CAM_TO_SRGB = [[1.8, -0.6, -0.2], [-0.2, 1.5, -0.3], [0.05, -0.5, 1.45]]


def make_meta(cfa, black, height, width, white=16383, wb=(2.1, 1.0, 1.6), matrix=CAM_TO_SRGB, **kw) -> CameraMeta:
    period = len(cfa)
    black = np.broadcast_to(np.asarray(black, dtype=float), (period, period)).tolist()
    return CameraMeta(
        make=kw.pop("make", "Test"), model=kw.pop("model", "Synthetic"), width=width, height=height, cfa=cfa,
        black_level=black, white_level=float(white), wb_as_shot=list(wb), wb_daylight=kw.pop("wb_daylight", [2.0, 1.0, 1.5]),
        cam_to_srgb=[list(r) for r in matrix], **kw,
    )


def smooth_mosaic(meta: CameraMeta, seed: int = 0, noise_dn: float = 40.0, fill: float = 0.9) -> np.ndarray:
    """A smooth random scene with some noise, black per site, values up to `fill` of the range (uint16)."""
    rng = np.random.default_rng(seed)
    h, w = meta.height, meta.width
    coarse = rng.random((h // 8 + 2, w // 8 + 2))
    # bilinear upsampling of a coarse random field: smooth content with edges at all scales
    ys = np.linspace(0, coarse.shape[0] - 1.001, h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c = coarse
    img = (c[y0][:, x0] * (1 - fy) * (1 - fx) + c[y0 + 1][:, x0] * fy * (1 - fx)
           + c[y0][:, x0 + 1] * (1 - fy) * fx + c[y0 + 1][:, x0 + 1] * fy * fx)
    period = meta.cfa_period
    black = np.tile(np.asarray(meta.black_level), (h // period + 1, w // period + 1))[:h, :w]
    span = meta.white_level - black.min()
    dn = black + img * span * fill + rng.normal(0, noise_dn, (h, w))
    return np.clip(np.round(dn), 0, meta.white_level).astype(np.uint16)
