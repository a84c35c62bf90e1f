"""Fast CIEDE2000 for evaluation: sRGB -> linear -> XYZ -> Lab -> dE00 fused per pixel, compiled with numba.

The same formulas and constants as `isp.color` (imported from there; Sharma, Wu & Dalal 2005
for CIEDE2000), evaluated in float64 per pixel in one pass over the image on all CPU threads,
instead of ~150 whole-image tensor operations. For metrics only (no gradient); training uses the
differentiable `isp.color` path. Without numba, `available()` is False and callers use that path.
The per-image mean is summed in fixed chunks, so it does not depend on the thread count.
"""
from __future__ import annotations

import math

import numpy as np

from isp.color import (
    _LAB_EPSILON,
    _LAB_KAPPA,
    _POW25_7,
    _SRGB_DECODE_THRESHOLD,
    _SRGB_GAMMA,
    _SRGB_OFFSET,
    _SRGB_SLOPE,
    _TINY_SQUARE,
    D65_WHITE_XYZ,
    SRGB_TO_XYZ,
)

try:
    import numba
except ImportError:  # optional speed-up: the torch path gives the same values
    numba = None

__all__ = ["available", "mean_delta_e00"]

_CHUNK = 1 << 14
_COS30, _SIN30 = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
_COS6, _SIN6 = math.cos(math.radians(6.0)), math.sin(math.radians(6.0))
_COS63, _SIN63 = math.cos(math.radians(63.0)), math.sin(math.radians(63.0))
_MATRIX = np.asarray(SRGB_TO_XYZ, dtype=np.float64)
_WHITE = np.asarray(D65_WHITE_XYZ, dtype=np.float64)
_CONSTANTS = np.asarray([_SRGB_DECODE_THRESHOLD, _SRGB_SLOPE, _SRGB_OFFSET, _SRGB_GAMMA, _LAB_EPSILON, _LAB_KAPPA,
                         _POW25_7, _TINY_SQUARE], dtype=np.float64)


def available() -> bool:
    """Whether the compiled path can run (numba is installed)."""
    return numba is not None


def _decode(v: float, k: np.ndarray) -> float:
    """sRGB decoding of one value (isp.color.srgb_to_linear)."""
    return v / k[1] if v <= k[0] else ((v + k[2]) / (1.0 + k[2])) ** k[3]


def _lab_f(t: float, k: np.ndarray) -> float:
    """CIE 1976 companding of one value (isp.color._lab_f)."""
    return np.cbrt(t) if t > k[4] else (k[5] * t + 16.0) / 116.0


def _lab(r: float, g: float, b: float, matrix: np.ndarray, white: np.ndarray, k: np.ndarray) -> tuple[float, float, float]:
    """One encoded sRGB pixel -> CIELAB (isp.color.srgb_to_lab)."""
    r, g, b = _decode(r, k), _decode(g, k), _decode(b, k)
    fx = _lab_f((matrix[0, 0] * r + matrix[0, 1] * g + matrix[0, 2] * b) / white[0], k)
    fy = _lab_f((matrix[1, 0] * r + matrix[1, 1] * g + matrix[1, 2] * b) / white[1], k)
    fz = _lab_f((matrix[2, 0] * r + matrix[2, 1] * g + matrix[2, 2] * b) / white[2], k)
    return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)


def _safe_sqrt(x: float, tiny: float) -> float:
    return math.sqrt(x) if x > tiny else 0.0


def _hue(b: float, a: float) -> float:
    if a == 0.0 and b == 0.0:
        return 0.0
    h = math.degrees(math.atan2(b, a))
    return h + 360.0 if h < 0.0 else h


def _de00(L1: float, a1: float, b1: float, L2: float, a2: float, b2: float, k: np.ndarray) -> float:
    """CIEDE2000 of two Lab pixels (isp.color._delta_e2000 with kL = kC = kH = 1)."""
    pow25_7, tiny = k[6], k[7]
    c1 = _safe_sqrt(a1 * a1 + b1 * b1, tiny)
    c2 = _safe_sqrt(a2 * a2 + b2 * b2, tiny)
    c_mean = (c1 + c2) / 2.0
    c3 = c_mean * c_mean * c_mean  # C^3.5 = C^3 sqrt(C) and C^7 = (C^3)^2 C: products instead of pow calls
    g = 0.5 * (1.0 - c3 * math.sqrt(c_mean) / math.sqrt(c3 * c3 * c_mean + pow25_7))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p = _safe_sqrt(a1p * a1p + b1 * b1, tiny)
    c2p = _safe_sqrt(a2p * a2p + b2 * b2, tiny)
    h1p, h2p = _hue(b1, a1p), _hue(b2, a2p)
    dLp = L2 - L1
    dCp = c2p - c1p
    product = c1p * c2p
    achromatic = product == 0.0
    dh = h2p - h1p
    if dh > 180.0:
        dh -= 360.0
    elif dh < -180.0:
        dh += 360.0
    if achromatic:
        dh = 0.0
    dHp = 2.0 * _safe_sqrt(product, tiny) * math.sin(math.radians(dh) / 2.0)
    L_mean = (L1 + L2) / 2.0
    cp_mean = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    if achromatic:
        h_mean = h_sum
    elif abs(h1p - h2p) <= 180.0:
        h_mean = h_sum / 2.0
    elif h_sum < 360.0:
        h_mean = (h_sum + 360.0) / 2.0
    else:
        h_mean = (h_sum - 360.0) / 2.0
    hr = math.radians(h_mean)
    # T's four cosines from one cos/sin pair (multiple-angle identities): the same value, a quarter of the calls.
    c, s = math.cos(hr), math.sin(hr)
    c2, s2 = 2.0 * c * c - 1.0, 2.0 * s * c
    c3, s3 = c * c2 - s * s2, s * c2 + c * s2
    c4, s4 = c2 * c2 - s2 * s2, 2.0 * s2 * c2
    t = (1.0 - 0.17 * (c * _COS30 + s * _SIN30) + 0.24 * c2 + 0.32 * (c3 * _COS6 - s3 * _SIN6)
         - 0.20 * (c4 * _COS63 + s4 * _SIN63))
    d_theta = 30.0 * math.exp(-(((h_mean - 275.0) / 25.0) ** 2))
    cp3 = cp_mean * cp_mean * cp_mean
    rc = 2.0 * cp3 * math.sqrt(cp_mean) / math.sqrt(cp3 * cp3 * cp_mean + pow25_7)
    L_offset_sq = (L_mean - 50.0) ** 2
    sl = 1.0 + 0.015 * L_offset_sq / math.sqrt(20.0 + L_offset_sq)
    sc = 1.0 + 0.045 * cp_mean
    sh = 1.0 + 0.015 * cp_mean * t
    rt = -math.sin(math.radians(2.0 * d_theta)) * rc
    lt, ct, ht = dLp / sl, dCp / sc, dHp / sh
    return _safe_sqrt(lt * lt + ct * ct + ht * ht + rt * ct * ht, tiny)


def _chunk_sums(pred: np.ndarray, target: np.ndarray, matrix: np.ndarray, white: np.ndarray, k: np.ndarray,
                chunk: int) -> np.ndarray:
    """pred, target (B,3,N) sRGB -> (B, ceil(N/chunk)) float64 sums of dE00 per chunk of pixels."""
    batch, _, count = pred.shape
    chunks = (count + chunk - 1) // chunk
    sums = np.zeros((batch, chunks), dtype=np.float64)
    for job in numba.prange(batch * chunks):
        image, part = job // chunks, job % chunks
        total = 0.0
        for p in range(part * chunk, min(count, (part + 1) * chunk)):
            L1, a1, b1 = _lab(float(pred[image, 0, p]), float(pred[image, 1, p]), float(pred[image, 2, p]), matrix, white, k)
            L2, a2, b2 = _lab(float(target[image, 0, p]), float(target[image, 1, p]), float(target[image, 2, p]),
                              matrix, white, k)
            total += _de00(L1, a1, b1, L2, a2, b2, k)
        sums[image, part] = total
    return sums


if numba is not None:
    _decode = numba.njit(cache=True)(_decode)
    _lab_f = numba.njit(cache=True)(_lab_f)
    _lab = numba.njit(cache=True)(_lab)
    _safe_sqrt = numba.njit(cache=True)(_safe_sqrt)
    _hue = numba.njit(cache=True)(_hue)
    _de00 = numba.njit(cache=True)(_de00)
    _chunk_sums = numba.njit(parallel=True, cache=True)(_chunk_sums)


def mean_delta_e00(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean CIEDE2000 per image. pred, target (B,3,H,W) encoded sRGB (float32/64 arrays) -> (B,) float64."""
    if numba is None:
        raise RuntimeError("the compiled CIEDE2000 needs numba (pip install numba)")
    batch = pred.shape[0]
    flat_pred = np.ascontiguousarray(pred.reshape(batch, 3, -1))
    flat_target = np.ascontiguousarray(target.reshape(batch, 3, -1))
    sums = _chunk_sums(flat_pred, flat_target, _MATRIX, _WHITE, _CONSTANTS, _CHUNK)
    return sums.sum(axis=1) / flat_pred.shape[2]
