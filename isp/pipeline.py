"""The ISP: normalised RAW (mosaic or packed) + metadata -> sRGB, in LibRaw's order."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fast, ops
from .cfa import as_batched_cfa, bayer_site_order, unpack
from .develop import DEMOSAICS, check_exposure_ratio, render_raw
from .errors import InputError
from .meta import CameraMeta
from .rawfile import open_raw, parse_wb

GAMMAS = ops.GAMMAS


def render(
    raw: torch.Tensor,
    cfa,
    wb,
    cam_to_srgb,
    *,
    demosaic: str = "bilinear",
    gamma: str = "srgb",
    packed: bool = False,
) -> torch.Tensor:
    """Render normalised RAW to sRGB. raw (B,1,H,W) mosaic or packed (B,4|9,h,w) in [0,1] -> (B,3,H',W') in [0,1].

    Order (LibRaw's): white balance, clip to [0,1], demosaic, colour matrix, clip, curve.
    The gains are scaled so the smallest is 1, as LibRaw does (`ops.libraw_wb_scale`).
    `cfa` is planning metadata, best kept on the host: a device tensor is read back once.
    Gradients are finite everywhere; at and beyond a clip point see `isp.ops` (clamp semantics).
    """
    batch = raw.shape[0]
    sites = _shared_bayer_sites(raw, cfa, packed) if demosaic == "bilinear" else None
    if sites is not None:
        # Same values as the generic path below, computed on the four packed Bayer sites.
        cfa = as_batched_cfa(cfa, batch, raw.device)
        site_gains = torch.gather(_render_gains(wb, batch, raw), 1, cfa.flatten(1))[..., None, None]
        balanced = torch.clamp(sites * site_gains, 0.0, 1.0)
        rgb = F.pixel_shuffle(fast.demosaic_bayer_sites(balanced, cfa[0]), 2)
    else:
        if packed:
            raw = unpack(raw, cfa)  # per-sample CFA: a batch may mix Bayer phases
        if raw.ndim != 4 or raw.shape[1] != 1:
            raise InputError(f"render needs a (B,1,H,W) mosaic or packed=True, got {tuple(raw.shape)}")
        cfa = as_batched_cfa(cfa, batch, raw.device)
        balanced = torch.clamp(ops.white_balance(raw, cfa, _render_gains(wb, batch, raw)), 0.0, 1.0)
        rgb = ops.demosaic(balanced, cfa, demosaic)
    srgb_linear = torch.clamp(ops.apply_matrix(rgb, cam_to_srgb), 0.0, 1.0)
    return ops.apply_curve(srgb_linear, gamma)


def _shared_bayer_sites(raw: torch.Tensor, cfa, packed: bool) -> torch.Tensor | None:
    """(B,4,h,w) sites in pixel_unshuffle order when the whole batch shares one Bayer CFA, else None."""
    cfa = torch.as_tensor(cfa)
    if raw.ndim != 4 or cfa.ndim not in (2, 3) or cfa.shape[-2:] != (2, 2):
        return None
    if cfa.ndim == 3:
        if cfa.shape[0] != raw.shape[0] or not bool((cfa == cfa[:1]).all()):
            return None
        cfa = cfa[0]
    if packed:
        return raw[:, bayer_site_order(cfa)] if raw.shape[1] == 4 else None
    if raw.shape[1] != 1 or raw.shape[-2] % 2 or raw.shape[-1] % 2:
        return None
    return F.pixel_unshuffle(raw, 2)


def _render_gains(wb, batch: int, like: torch.Tensor) -> torch.Tensor:
    gains = torch.as_tensor(wb, dtype=like.dtype, device=like.device)
    gains = gains.expand(batch, 3) if gains.ndim == 1 else gains
    return ops.libraw_wb_scale(gains)


class ISP(nn.Module):
    """Batched differentiable ISP (see `render`). No learnable parameters; any device."""

    def __init__(self, demosaic: str = "bilinear", gamma: str = "srgb"):
        super().__init__()
        if demosaic not in DEMOSAICS:
            raise InputError(f"unknown demosaic '{demosaic}'; use one of {DEMOSAICS}")
        if gamma not in GAMMAS:
            raise InputError(f"unknown gamma '{gamma}'; use one of {GAMMAS}")
        self.demosaic, self.gamma = demosaic, gamma

    def forward(self, raw: torch.Tensor, cfa, wb, cam_to_srgb, packed: bool = False) -> torch.Tensor:
        return render(raw, cfa, wb, cam_to_srgb, demosaic=self.demosaic, gamma=self.gamma, packed=packed)

    def extra_repr(self) -> str:
        return f"demosaic={self.demosaic}, gamma={self.gamma}"


def select_wb(meta: CameraMeta, wb: str | tuple[float, float, float]) -> list[float]:
    """'camera' (as shot), 'daylight', 'none' or explicit (r, g, b) multipliers, from metadata alone.

    'auto' needs the image itself: `isp.render_file(..., wb="auto")` or `isp.rawfile.libraw_multipliers`.
    """
    if wb == "auto":
        raise InputError("white balance 'auto' needs the image: use isp.render_file(path, wb='auto') "
                         "or isp.rawfile.libraw_multipliers")
    if isinstance(wb, str):
        if wb == "camera":
            return list(meta.wb_as_shot)
        if wb == "daylight":
            return list(meta.wb_daylight)
        if wb == "none":
            return [1.0, 1.0, 1.0]
        wb = parse_wb(wb)
    if len(wb) != 3 or not all(np.isfinite(v) and v > 0 for v in wb):
        raise InputError(f"white balance multipliers must be three positive numbers, got {wb}")
    return [float(v) for v in wb]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for but no CUDA GPU is available; use --device cpu or auto")
    return dev


def render_file(
    path: str | os.PathLike,
    wb: str | tuple[float, float, float] = "camera",
    gamma: str = "srgb",
    demosaic: str = "bilinear",
    device: str = "cpu",
    exposure_ratio: float = 1.0,
    half_size: bool = False,
    flip: bool = True,
    warn=None,
) -> np.ndarray:
    """Render a camera file like rawpy's postprocess. -> float32 (H, W, 3) numpy in [0, 1] ((H, W, 1) if monochrome).

    Any layout LibRaw reads (CFA, full-colour, monochrome), white balance chosen as LibRaw does
    ('camera' falls back to its automatic white balance; 'auto', 'daylight', 'none', (r, g, b)),
    the file's orientation applied unless `flip=False`. See `isp.develop.render_raw`.
    """
    check_exposure_ratio(exposure_ratio)
    dev = resolve_device(device)
    return render_raw(open_raw(path), wb=wb, gamma=gamma, demosaic=demosaic, device=dev, exposure_ratio=exposure_ratio,
                      half_size=half_size, flip=flip, warn=warn)
