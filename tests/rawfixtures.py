"""Small synthetic RAW files for tests: written with pidng through isp.write_dng."""
from __future__ import annotations

from pathlib import Path

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


def write_test_dng(path, data: np.ndarray, *, cfa=None, black=0, white=65535, as_shot_neutral=(0.5, 1.0, 0.625),
                   color_matrix=((0.9, -0.25, -0.1), (-0.35, 1.2, 0.1), (-0.05, 0.15, 0.65)), orientation: int = 1,
                   make: str | None = "Test", model: str | None = "Synthetic", unique_model: str | None = None,
                   default_scale: tuple[float, float] | None = None):
    """Write a 16-bit uncompressed DNG with pidng, tags optional: the cases `isp.write_dng` never writes.

    data (H,W) with `cfa` (2,2)/(6,6) -> CFA DNG; (H,W) without `cfa` -> monochrome LinearRaw;
    (H,W,3) -> LinearRaw (already demosaiced). `as_shot_neutral`/`color_matrix` None -> tag left out;
    any values (negative, zero) are written as given. `black` is one value or one per sample.
    """
    from pidng.core import RAW2DNG
    from pidng.defs import CalibrationIlluminant, PhotometricInterpretation
    from pidng.dng import DNGTags, Tag, Type

    data = np.ascontiguousarray(data, dtype=np.uint16)
    height, width = data.shape[:2]
    samples = 1 if data.ndim == 2 else data.shape[2]
    tags = DNGTags()
    for tag, value in ((Tag.ImageWidth, width), (Tag.ImageLength, height), (Tag.TileWidth, width), (Tag.TileLength, height),
                       (Tag.Orientation, orientation), (Tag.SamplesPerPixel, samples), (Tag.BitsPerSample, [16] * samples),
                       (Tag.WhiteLevel, [int(white)] * samples)):
        tags.set(tag, value)
    if cfa is not None:
        cfa = np.asarray(cfa)
        tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
        tags.set(Tag.CFARepeatPatternDim, list(cfa.shape))
        tags.set(Tag.CFAPattern, [int(v) for v in cfa.ravel()])
        tags.set(Tag.CFAPlaneColor, [0, 1, 2])
        tags.set(Tag.CFALayout, 1)
    else:
        tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Linear_Raw)
    black = np.atleast_1d(np.asarray(black, dtype=np.int64))
    tags.set(Tag.BlackLevel, [int(v) for v in black])
    if black.size > 1 and cfa is None:
        tags.set(Tag.BlackLevelRepeatDim, [1, 1])
    if color_matrix is not None:
        tags.set(Tag.ColorMatrix1, [[int(round(v * 10000)), 10000] for v in np.ravel(color_matrix)])
        tags.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    if as_shot_neutral is not None:
        tags.set(Tag.AsShotNeutral, [[int(round(v * 10000)), 10000] for v in as_shot_neutral])
    if make is not None:
        tags.set(Tag.Make, make)
    if model is not None:
        tags.set(Tag.Model, model)
    if unique_model is not None:
        tags.set(Tag.UniqueCameraModel, unique_model)
    if default_scale is not None:  # DNG DefaultScale (horizontal, vertical): non-square pixels
        tags.set((50718, Type.Rational), [[int(round(v * 10000)), 10000] for v in default_scale])
    writer = RAW2DNG()
    writer.options(tags, path=str(Path(path).parent), compress=False)
    writer.convert(data, filename=Path(path).name)
    return Path(path)
