"""Colour-space conversions and CIEDE2000 as differentiable torch functions.

Every function takes channels on dim 1 (``(B,3,H,W)``, ``(N,3)``, ...), keeps the input's dtype
and device, and has finite gradients everywhere, including black pixels, zero chroma, identical
inputs and hue differences of exactly 180 degrees. The branch guards below select a safe operand
for the branch that is *not* taken, so values are exact and no NaN leaks into the backward pass.

Conventions: sRGB per IEC 61966-2-1 (transfer function and its 4-decimal RGB->XYZ matrix, the
same that colour-science uses); XYZ scaled so that Y of white is 1; CIELAB relative to the white
``linear_srgb_to_xyz(1,1,1)`` so that every neutral sRGB grey has a = b = 0 exactly.
"""
from __future__ import annotations

import math

import torch

from isp.errors import InputError

__all__ = [
    "srgb_to_linear",
    "linear_to_srgb",
    "linear_srgb_to_xyz",
    "xyz_to_linear_srgb",
    "xyz_to_lab",
    "lab_to_xyz",
    "srgb_to_lab",
    "delta_e2000",
    "SRGB_TO_XYZ",
    "XYZ_TO_SRGB",
    "D65_WHITE_XYZ",
]

# IEC 61966-2-1 transfer-function constants.
_SRGB_DECODE_THRESHOLD = 0.04045
_SRGB_ENCODE_THRESHOLD = 0.0031308
_SRGB_SLOPE = 12.92
_SRGB_OFFSET = 0.055
_SRGB_GAMMA = 2.4

# IEC 61966-2-1 linear sRGB -> XYZ (D65); the inverse is the exact float64 inverse of this matrix.
SRGB_TO_XYZ: tuple[tuple[float, float, float], ...] = (
    (0.4124, 0.3576, 0.1805),
    (0.2126, 0.7152, 0.0722),
    (0.0193, 0.1192, 0.9505),
)
XYZ_TO_SRGB: tuple[tuple[float, float, float], ...] = tuple(
    tuple(row) for row in torch.linalg.inv(torch.tensor(SRGB_TO_XYZ, dtype=torch.float64)).tolist()
)
# D65 white as the image of sRGB (1,1,1): (0.9505, 1.0, 1.089).
D65_WHITE_XYZ: tuple[float, float, float] = tuple(sum(row) for row in SRGB_TO_XYZ)  # type: ignore[assignment]

# CIE 1976 constants as exact rationals (CIE 15:2004).
_LAB_EPSILON = 216.0 / 24389.0  # (6/29)^3
_LAB_KAPPA = 24389.0 / 27.0  # (29/3)^3
_LAB_F_THRESHOLD = 6.0 / 29.0  # cube root of _LAB_EPSILON

# Squared magnitudes below this are treated as exactly zero (sqrt changes by <= 1e-12).
_TINY_SQUARE = 1e-24
_POW25_7 = 25.0**7


def _check_channels(x: torch.Tensor, name: str) -> None:
    """Validate a (B,3,...) floating tensor. x any shape with dim 1 of size 3 -> None."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating tensor, got {x.dtype}; convert with .float()")
    if x.dim() < 2 or x.shape[1] != 3:
        raise InputError(f"{name}: expected shape (B,3,...) with 3 channels on dim 1, got {tuple(x.shape)}")


def _apply_matrix3(x: torch.Tensor, matrix: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """3x3 colour matrix on channels. x (B,3,...) -> (B,3,...) same dtype/device."""
    m = torch.tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.einsum("ij,bj...->bi...", m, x)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with zero gradient at 0. x (...) >= 0 -> (...); values below 1e-24 return 0."""
    positive = x > _TINY_SQUARE
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def srgb_to_linear(srgb: torch.Tensor) -> torch.Tensor:
    """sRGB decoding (IEC 61966-2-1). srgb (B,3,...) encoded -> (B,3,...) linear; no clipping."""
    _check_channels(srgb, "srgb_to_linear")
    # The power branch sees only values above the threshold, so negatives never reach pow.
    power_in = torch.clamp(srgb, min=_SRGB_DECODE_THRESHOLD)
    power = ((power_in + _SRGB_OFFSET) / (1.0 + _SRGB_OFFSET)) ** _SRGB_GAMMA
    return torch.where(srgb <= _SRGB_DECODE_THRESHOLD, srgb / _SRGB_SLOPE, power)


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    """sRGB encoding (IEC 61966-2-1). linear (B,3,...) -> (B,3,...) encoded; no clipping."""
    _check_channels(linear, "linear_to_srgb")
    # Clamping keeps x**(1/2.4) away from 0, where its derivative is infinite.
    power_in = torch.clamp(linear, min=_SRGB_ENCODE_THRESHOLD)
    power = (1.0 + _SRGB_OFFSET) * power_in ** (1.0 / _SRGB_GAMMA) - _SRGB_OFFSET
    return torch.where(linear <= _SRGB_ENCODE_THRESHOLD, linear * _SRGB_SLOPE, power)


def linear_srgb_to_xyz(linear: torch.Tensor) -> torch.Tensor:
    """Linear sRGB to CIE XYZ (D65, Y_white = 1). linear (B,3,...) -> (B,3,...) XYZ."""
    _check_channels(linear, "linear_srgb_to_xyz")
    return _apply_matrix3(linear, SRGB_TO_XYZ)


def xyz_to_linear_srgb(xyz: torch.Tensor) -> torch.Tensor:
    """CIE XYZ (D65, Y_white = 1) to linear sRGB. xyz (B,3,...) -> (B,3,...) linear RGB."""
    _check_channels(xyz, "xyz_to_linear_srgb")
    return _apply_matrix3(xyz, XYZ_TO_SRGB)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    """CIE 1976 companding f(t). t (...) relative tristimulus -> (...)."""
    # Cube root only above epsilon: keeps d/dt t^(1/3) finite at t = 0 and negatives real.
    cube_in = torch.clamp(t, min=_LAB_EPSILON)
    return torch.where(t > _LAB_EPSILON, cube_in ** (1.0 / 3.0), (_LAB_KAPPA * t + 16.0) / 116.0)


def _lab_f_inv(f: torch.Tensor) -> torch.Tensor:
    """Inverse of CIE 1976 companding. f (...) -> (...) relative tristimulus."""
    return torch.where(f > _LAB_F_THRESHOLD, f**3, (116.0 * f - 16.0) / _LAB_KAPPA)


def xyz_to_lab(xyz: torch.Tensor) -> torch.Tensor:
    """CIE XYZ to CIELAB (white D65_WHITE_XYZ). xyz (B,3,...) Y_white = 1 -> (B,3,...) L in [0,100], a, b."""
    _check_channels(xyz, "xyz_to_lab")
    x, y, z = xyz.unbind(dim=1)
    fx = _lab_f(x / D65_WHITE_XYZ[0])
    fy = _lab_f(y / D65_WHITE_XYZ[1])
    fz = _lab_f(z / D65_WHITE_XYZ[2])
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def lab_to_xyz(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB to CIE XYZ (white D65_WHITE_XYZ). lab (B,3,...) -> (B,3,...) XYZ with Y_white = 1."""
    _check_channels(lab, "lab_to_xyz")
    lightness, a, b = lab.unbind(dim=1)
    fy = (lightness + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    return torch.stack(
        (
            D65_WHITE_XYZ[0] * _lab_f_inv(fx),
            D65_WHITE_XYZ[1] * _lab_f_inv(fy),
            D65_WHITE_XYZ[2] * _lab_f_inv(fz),
        ),
        dim=1,
    )


def srgb_to_lab(srgb: torch.Tensor) -> torch.Tensor:
    """Encoded sRGB to CIELAB (D65). srgb (B,3,...) in [0,1] -> (B,3,...) L in [0,100], a, b."""
    return xyz_to_lab(linear_srgb_to_xyz(srgb_to_linear(srgb)))


def _hue_degrees(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Hue angle atan2(b, a) in [0, 360). b, a (...) -> (...) degrees; 0 where a = b = 0."""
    achromatic = (a == 0) & (b == 0)
    # atan2's gradient is 0/0 at the origin; feed it (0, 1) there and report hue 0.
    safe_b = torch.where(achromatic, torch.zeros_like(b), b)
    safe_a = torch.where(achromatic, torch.ones_like(a), a)
    hue = torch.rad2deg(torch.atan2(safe_b, safe_a))
    hue = torch.where(hue < 0, hue + 360.0, hue)
    return torch.where(achromatic, torch.zeros_like(hue), hue)


def delta_e2000(
    lab1: torch.Tensor,
    lab2: torch.Tensor,
    kL: float = 1.0,
    kC: float = 1.0,
    kH: float = 1.0,
) -> torch.Tensor:
    """CIEDE2000 colour difference (Sharma et al. 2005). lab1, lab2 (B,3,...) CIELAB -> (B,...) dE00.

    The inputs broadcast against each other; the result drops the channel dim. kL, kC, kH are the
    parametric weights (1 for reference conditions).
    """
    _check_channels(lab1, "delta_e2000 lab1")
    _check_channels(lab2, "delta_e2000 lab2")
    for name, weight in (("kL", kL), ("kC", kC), ("kH", kH)):
        if not weight > 0:
            raise InputError(f"delta_e2000: {name} must be > 0, got {weight}")
    out_dtype = torch.promote_types(lab1.dtype, lab2.dtype)
    if out_dtype in (torch.float16, torch.bfloat16):
        # 25^7 and C^7 overflow half precision; compute in float32 and hand back the input dtype.
        return _delta_e2000(lab1.float(), lab2.float(), kL, kC, kH).to(out_dtype)
    return _delta_e2000(lab1, lab2, kL, kC, kH)


def _delta_e2000(lab1: torch.Tensor, lab2: torch.Tensor, kL: float, kC: float, kH: float) -> torch.Tensor:
    """CIEDE2000 core, validated inputs. lab1, lab2 (B,3,...) CIELAB -> (B,...) dE00."""
    L1, a1, b1 = lab1.unbind(dim=1)
    L2, a2, b2 = lab2.unbind(dim=1)

    # Step 1: a' rescaled by the chroma-dependent G; C' and h'.
    c1 = _safe_sqrt(a1 * a1 + b1 * b1)
    c2 = _safe_sqrt(a2 * a2 + b2 * b2)
    c_mean = (c1 + c2) / 2.0
    # sqrt(C^7/(C^7+25^7)) written as C^3.5/sqrt(...) so its derivative at C = 0 is 0, not NaN.
    c_mean_7 = c_mean**7
    g = 0.5 * (1.0 - c_mean**3.5 / torch.sqrt(c_mean_7 + _POW25_7))
    a1p = (1.0 + g) * a1
    a2p = (1.0 + g) * a2
    c1p = _safe_sqrt(a1p * a1p + b1 * b1)
    c2p = _safe_sqrt(a2p * a2p + b2 * b2)
    h1p = _hue_degrees(b1, a1p)
    h2p = _hue_degrees(b2, a2p)

    # Step 2: differences.
    dLp = L2 - L1
    dCp = c2p - c1p
    chroma_product = c1p * c2p
    achromatic = chroma_product == 0
    dh = h2p - h1p
    dh = torch.where(dh > 180.0, dh - 360.0, torch.where(dh < -180.0, dh + 360.0, dh))
    dh = torch.where(achromatic, torch.zeros_like(dh), dh)
    dHp = 2.0 * _safe_sqrt(chroma_product) * torch.sin(torch.deg2rad(dh) / 2.0)

    # Step 3: means and weighting functions.
    L_mean = (L1 + L2) / 2.0
    cp_mean = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    h_mean = torch.where(
        (h1p - h2p).abs() <= 180.0,
        h_sum / 2.0,
        torch.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0),
    )
    h_mean = torch.where(achromatic, h_sum, h_mean)
    h_mean_rad = torch.deg2rad(h_mean)
    t = (
        1.0
        - 0.17 * torch.cos(h_mean_rad - math.radians(30.0))
        + 0.24 * torch.cos(2.0 * h_mean_rad)
        + 0.32 * torch.cos(3.0 * h_mean_rad + math.radians(6.0))
        - 0.20 * torch.cos(4.0 * h_mean_rad - math.radians(63.0))
    )
    d_theta = 30.0 * torch.exp(-(((h_mean - 275.0) / 25.0) ** 2))
    rc = 2.0 * cp_mean**3.5 / torch.sqrt(cp_mean**7 + _POW25_7)
    L_offset_sq = (L_mean - 50.0) ** 2
    sl = 1.0 + 0.015 * L_offset_sq / torch.sqrt(20.0 + L_offset_sq)
    sc = 1.0 + 0.045 * cp_mean
    sh = 1.0 + 0.015 * cp_mean * t
    rt = -torch.sin(torch.deg2rad(2.0 * d_theta)) * rc

    lightness_term = dLp / (kL * sl)
    chroma_term = dCp / (kC * sc)
    hue_term = dHp / (kH * sh)
    squared = lightness_term**2 + chroma_term**2 + hue_term**2 + rt * chroma_term * hue_term
    return _safe_sqrt(squared)
