"""Fast CIEDE2000 for evaluation: sRGB -> linear -> XYZ -> Lab -> dE00, in cache-sized chunks on all CPU threads.

The same formulas and constants as `isp.color` (imported from there; Sharma, Wu & Dalal 2005
for CIEDE2000), in float64. For metrics only (no gradient); training uses the differentiable
`isp.color` path. Each chunk of pixels goes through four numpy transcendental passes (the sRGB
power, the Lab cube root, the hue arctan2, the hue-rotation exp: numpy runs them as SIMD loops)
and four loops compiled with numba that hold only arithmetic and square roots, so the compiler
vectorises them. The other trigonometry of CIEDE2000 is done without trigonometric calls:

- cos and sin of the hue difference come from the dot and cross products of the two unit hue
  vectors, and sin(dh'/2) from whichever half-angle formula is well conditioned there;
- cos and sin of the mean hue h' come from those of h1' + h2' (products of the unit vectors),
  halved the same way, with the signs from h' itself (the mean-hue rule decides the quadrant);
  T's four cosines then follow from the multiple-angle identities;
- sin(2 dtheta) (dtheta <= 30 degrees) is its Taylor series to x^17 (error < 1e-16).

Chunks run on a thread pool (the numba loops release the GIL, numpy's loops too). Each chunk's
sum is kept and the chunks are added in order, so the mean does not depend on the thread count.
Without numba, `available()` is False and callers use the torch path (same values).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

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

CHUNK = 1 << 15  # pixels per chunk: the ~10 float64 planes of a chunk stay in a core's L2 cache
_M = np.asarray(SRGB_TO_XYZ, dtype=np.float64) / np.asarray(D65_WHITE_XYZ, dtype=np.float64)[:, None]  # -> XYZ / white
_COS30, _SIN30 = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
_COS6, _SIN6 = math.cos(math.radians(6.0)), math.sin(math.radians(6.0))
_COS63, _SIN63 = math.cos(math.radians(63.0)), math.sin(math.radians(63.0))
_RAD, _DEG = math.pi / 180.0, 180.0 / math.pi
_THRESHOLD, _SLOPE, _EPS, _KAPPA, _P25, _TINY = (_SRGB_DECODE_THRESHOLD, _SRGB_SLOPE, _LAB_EPSILON, _LAB_KAPPA,
                                                 _POW25_7, _TINY_SQUARE)
_S0, _S1, _S2, _S3, _S4, _S5, _S6, _S7, _S8 = ((-1.0) ** k / math.factorial(2 * k + 1) for k in range(9))  # sin's Taylor


def available() -> bool:
    """Whether the compiled path can run (numba is installed)."""
    return numba is not None


def _xyz(x: np.ndarray, lin: np.ndarray, m: np.ndarray, t: np.ndarray) -> None:
    """x (6,n) encoded sRGB, lin its power branch -> t (6,n) XYZ / white (pred rows 0-2, target 3-5)."""
    n = x.shape[1]
    for img in range(2):
        o = 3 * img
        for p in range(n):
            r = x[o, p] / _SLOPE if x[o, p] <= _THRESHOLD else lin[o, p]
            g = x[o + 1, p] / _SLOPE if x[o + 1, p] <= _THRESHOLD else lin[o + 1, p]
            b = x[o + 2, p] / _SLOPE if x[o + 2, p] <= _THRESHOLD else lin[o + 2, p]
            t[o, p] = m[0, 0] * r + m[0, 1] * g + m[0, 2] * b
            t[o + 1, p] = m[1, 0] * r + m[1, 1] * g + m[1, 2] * b
            t[o + 2, p] = m[2, 0] * r + m[2, 1] * g + m[2, 2] * b


def _lab(t: np.ndarray, f: np.ndarray, lab: np.ndarray, ap: np.ndarray) -> None:
    """t (6,n) XYZ / white, f its cube root -> lab[0:2] L*, lab[2:4] b*; ap (2,n) a' = (1 + G) a*."""
    n = t.shape[1]
    for p in range(n):
        fx0 = f[0, p] if t[0, p] > _EPS else (_KAPPA * t[0, p] + 16.0) / 116.0
        fy0 = f[1, p] if t[1, p] > _EPS else (_KAPPA * t[1, p] + 16.0) / 116.0
        fz0 = f[2, p] if t[2, p] > _EPS else (_KAPPA * t[2, p] + 16.0) / 116.0
        fx1 = f[3, p] if t[3, p] > _EPS else (_KAPPA * t[3, p] + 16.0) / 116.0
        fy1 = f[4, p] if t[4, p] > _EPS else (_KAPPA * t[4, p] + 16.0) / 116.0
        fz1 = f[5, p] if t[5, p] > _EPS else (_KAPPA * t[5, p] + 16.0) / 116.0
        a0, b0 = 500.0 * (fx0 - fy0), 200.0 * (fy0 - fz0)
        a1, b1 = 500.0 * (fx1 - fy1), 200.0 * (fy1 - fz1)
        s0, s1 = a0 * a0 + b0 * b0, a1 * a1 + b1 * b1
        c0 = math.sqrt(s0) if s0 > _TINY else 0.0
        c1 = math.sqrt(s1) if s1 > _TINY else 0.0
        cm = (c0 + c1) * 0.5
        c3 = cm * cm * cm
        gg = 0.5 * (1.0 - c3 * math.sqrt(cm) / math.sqrt(c3 * c3 * cm + _P25))
        ap[0, p] = (1.0 + gg) * a0
        ap[1, p] = (1.0 + gg) * a1
        lab[0, p] = 116.0 * fy0 - 16.0
        lab[1, p] = 116.0 * fy1 - 16.0
        lab[2, p] = b0
        lab[3, p] = b1


def _hues(lab: np.ndarray, ap: np.ndarray, h: np.ndarray, z: np.ndarray) -> None:
    """h[0:2] arctan2 in radians -> h[0:2] hues h' in degrees [0, 360), h[2] the mean hue; lab[4:6] = C'; z = -((h' - 275) / 25)^2."""
    n = lab.shape[1]
    for p in range(n):
        b0, b1, a0, a1 = lab[2, p], lab[3, p], ap[0, p], ap[1, p]
        s0, s1 = a0 * a0 + b0 * b0, a1 * a1 + b1 * b1
        c0 = math.sqrt(s0) if s0 > _TINY else 0.0
        c1 = math.sqrt(s1) if s1 > _TINY else 0.0
        lab[4, p] = c0
        lab[5, p] = c1
        h0 = h[0, p] * _DEG if (a0 != 0.0 or b0 != 0.0) else 0.0
        h1 = h[1, p] * _DEG if (a1 != 0.0 or b1 != 0.0) else 0.0
        h0 = h0 + 360.0 if h0 < 0.0 else h0
        h1 = h1 + 360.0 if h1 < 0.0 else h1
        h[0, p] = h0
        h[1, p] = h1
        hs = h0 + h1
        if c0 * c1 == 0.0:
            hm = hs
        elif abs(h0 - h1) <= 180.0:
            hm = hs * 0.5
        elif hs < 360.0:
            hm = (hs + 360.0) * 0.5
        else:
            hm = (hs - 360.0) * 0.5
        h[2, p] = hm
        q = (hm - 275.0) / 25.0
        z[p] = -(q * q)


def _delta(lab: np.ndarray, ap: np.ndarray, h: np.ndarray, e: np.ndarray, out: np.ndarray) -> None:
    """-> out (n,) dE00 per pixel, from _hues' outputs and e = exp(z)."""
    n = lab.shape[1]
    for p in range(n):
        L0, L1, b0, b1, c0, c1 = lab[0, p], lab[1, p], lab[2, p], lab[3, p], lab[4, p], lab[5, p]
        a0, a1, h0, h1, hm = ap[0, p], ap[1, p], h[0, p], h[1, p], h[2, p]
        product = c0 * c1
        chromatic = product != 0.0
        # unit hue vectors (hue 0 where C' = 0, as the hue convention)
        u0 = a0 / c0 if c0 != 0.0 else 1.0
        v0 = b0 / c0 if c0 != 0.0 else 0.0
        u1 = a1 / c1 if c1 != 0.0 else 1.0
        v1 = b1 / c1 if c1 != 0.0 else 0.0
        dh = h1 - h0
        dh = dh - 360.0 if dh > 180.0 else (dh + 360.0 if dh < -180.0 else dh)
        # cos/sin of dh from the unit vectors; sin(dh/2) from the better-conditioned half-angle formula
        cd = u0 * u1 + v0 * v1
        sd = abs(u0 * v1 - v0 * u1)
        cd = min(1.0, max(-1.0, cd))
        half = sd / math.sqrt(2.0 * (1.0 + cd)) if cd >= 0.0 else math.sqrt(0.5 * (1.0 - cd))
        sign = 1.0 if dh > 0.0 else (-1.0 if dh < 0.0 else 0.0)
        root = math.sqrt(product) if product > _TINY else 0.0
        dHp = 2.0 * root * half * sign if chromatic else 0.0
        # cos/sin of h_mean: h_sum's from the unit vectors, halved with hm's quadrant for the signs
        cs = u0 * u1 - v0 * v1
        ss = u0 * v1 + v0 * u1
        cs = min(1.0, max(-1.0, cs))
        ch = math.sqrt(0.5 * (1.0 + cs))  # |cos(h_sum/2)|
        sh_ = math.sqrt(0.5 * (1.0 - cs))  # |sin(h_sum/2)|
        c_sign = 1.0 if (hm < 90.0 or hm > 270.0) else -1.0
        s_sign = 1.0 if hm < 180.0 else -1.0
        # the larger one from the square root, the smaller one as sin(h_sum) / (2 * larger)
        big_cos = ch >= sh_
        cabs = ch if big_cos else abs(ss) / (2.0 * sh_)
        sabs = abs(ss) / (2.0 * ch) if big_cos else sh_
        cm_, sm_ = c_sign * cabs, s_sign * sabs
        # achromatic: h_mean = h_sum itself
        if not chromatic:
            cm_, sm_ = cs, ss
        c2, s2 = 2.0 * cm_ * cm_ - 1.0, 2.0 * sm_ * cm_
        c3, s3 = cm_ * c2 - sm_ * s2, sm_ * c2 + cm_ * s2
        c4, s4 = c2 * c2 - s2 * s2, 2.0 * s2 * c2
        t = (1.0 - 0.17 * (cm_ * _COS30 + sm_ * _SIN30) + 0.24 * c2 + 0.32 * (c3 * _COS6 - s3 * _SIN6)
             - 0.20 * (c4 * _COS63 + s4 * _SIN63))
        x = 60.0 * e[p] * _RAD  # 2 * d_theta in radians, d_theta = 30 exp(z)
        x2 = x * x
        sin2 = x * (_S0 + x2 * (_S1 + x2 * (_S2 + x2 * (_S3 + x2 * (_S4 + x2 * (_S5 + x2 * (_S6 + x2 * (_S7 + x2 * _S8))))))))
        cpm = (c0 + c1) * 0.5
        cp3 = cpm * cpm * cpm
        rc = 2.0 * cp3 * math.sqrt(cpm) / math.sqrt(cp3 * cp3 * cpm + _P25)
        Lm = (L0 + L1) * 0.5 - 50.0
        lo = Lm * Lm
        sl = 1.0 + 0.015 * lo / math.sqrt(20.0 + lo)
        sc = 1.0 + 0.045 * cpm
        shh = 1.0 + 0.015 * cpm * t
        rt = -sin2 * rc
        lt, ct, ht = (L1 - L0) / sl, (c1 - c0) / sc, dHp / shh
        sq = lt * lt + ct * ct + ht * ht + rt * ct * ht
        out[p] = math.sqrt(sq) if sq > _TINY else 0.0


if numba is not None:
    _compile = numba.njit(nogil=True, cache=True, error_model="numpy")
    _xyz, _lab, _hues, _delta = _compile(_xyz), _compile(_lab), _compile(_hues), _compile(_delta)


def _chunk_sum(x: np.ndarray) -> float:
    """x (6,n) float64 encoded sRGB, pred in rows 0-2 and target in 3-5 -> the sum of dE00 over the n pixels."""
    n = x.shape[1]
    lin = (x + _SRGB_OFFSET) * (1.0 / (1.0 + _SRGB_OFFSET))
    with np.errstate(invalid="ignore"):  # values below the threshold take the linear branch in _xyz
        np.power(lin, _SRGB_GAMMA, out=lin)
    xyz = np.empty_like(x)
    _xyz(x, lin, _M, xyz)
    root = np.cbrt(xyz, out=lin)
    lab, a_prime = np.empty_like(x), np.empty((2, n))
    _lab(xyz, root, lab, a_prime)
    hues = np.empty((3, n))
    np.arctan2(lab[2:4], a_prime, out=hues[:2])
    rotation = np.empty(n)
    _hues(lab, a_prime, hues, rotation)
    np.exp(rotation, out=rotation)
    delta = xyz[0]
    _delta(lab, a_prime, hues, rotation, delta)
    return float(delta.sum())


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                       else (os.cpu_count() or 1)), thread_name_prefix="ciede2000")
        return _pool


def mean_delta_e00(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean CIEDE2000 per image. pred, target (B,3,H,W) encoded sRGB (float32/64 arrays) -> (B,) float64."""
    if numba is None:
        raise RuntimeError("the compiled CIEDE2000 needs numba (pip install numba)")
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"mean_delta_e00 takes two (B,3,H,W) arrays of one shape, got {pred.shape} and {target.shape}")
    batch = pred.shape[0]
    flat_pred, flat_target = pred.reshape(batch, 3, -1), target.reshape(batch, 3, -1)
    count = flat_pred.shape[2]
    jobs = [(image, start) for image in range(batch) for start in range(0, count, CHUNK)]

    def run(job: tuple[int, int]) -> float:
        image, start = job
        stop = min(count, start + CHUNK)
        x = np.empty((6, stop - start))
        x[:3] = flat_pred[image, :, start:stop]
        x[3:] = flat_target[image, :, start:stop]
        return _chunk_sum(x)

    sums = list(_executor().map(run, jobs)) if len(jobs) > 1 else [run(job) for job in jobs]
    means = np.zeros(batch)
    for (image, _), value in zip(jobs, sums):
        means[image] += value
    return means / max(count, 1)
