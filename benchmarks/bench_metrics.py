"""Evaluation metrics on the CPU: CIEDE2000 of a 1-megapixel sRGB pair against colour-science.

Row: `rawrestore.metrics.delta_e00` (the chunked numpy + numba path of `metrics.ciede2000`) vs
colour-science's `sRGB_to_XYZ` -> `XYZ_to_Lab` -> `delta_E(method="CIE 2000")` on the same pair,
in the same run; the note gives both means (they must agree). The kernel's one-time numba
compilation (cached on disk) is excluded by a warm-up call.
"""
from __future__ import annotations

import time

import numpy as np
import torch


def _pair(side: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 3, side, side, generator=generator)
    target = (pred + 0.1 * torch.rand(1, 3, side, side, generator=generator) - 0.05).clamp(0, 1)
    return pred, target


def run(repeats: int = 3) -> list[dict]:
    import colour

    from isp.color import D65_WHITE_XYZ
    from rawrestore.metrics import delta_e00

    illuminant = colour.XYZ_to_xy(np.array(D65_WHITE_XYZ))  # the white isp.color uses, so the means agree

    pred, target = _pair()
    delta_e00(pred[..., :64, :64], target[..., :64, :64])  # compile / load the kernel

    def ours() -> tuple[float, float]:
        start = time.perf_counter()
        value = float(delta_e00(pred, target)[0])
        return time.perf_counter() - start, value

    def reference() -> tuple[float, float]:
        start = time.perf_counter()
        a = pred[0].permute(1, 2, 0).double().numpy()
        b = target[0].permute(1, 2, 0).double().numpy()
        lab_a = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(a), illuminant=illuminant)
        lab_b = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(b), illuminant=illuminant)
        value = float(np.mean(colour.delta_E(lab_a, lab_b, method="CIE 2000")))
        return time.perf_counter() - start, value

    ours_s, ours_value = min(ours() for _ in range(repeats))
    ref_s, ref_value = min(reference() for _ in range(repeats))
    return [{"name": "delta_e00 1MP sRGB pair (chunked numpy + numba)", "ours_s": ours_s, "reference_s": ref_s,
             "ratio": ref_s / ours_s,
             "note": f"ratio = colour-science / ours (speed-up); mean dE00 {ours_value:.6f} vs {ref_value:.6f}"}]


if __name__ == "__main__":
    for row in run():
        print(row)
