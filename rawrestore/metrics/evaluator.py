"""Stateful evaluation shell: per-image rows, exposure-ratio groups, DDP gathering, CSV/JSON output.

The metric math lives in `rawrestore.metrics.functional`; this module only records one row per
image and averages rows. A metric that was not measured stays ``None`` all the way to the summary.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from isp.errors import InputError
from rawrestore.metrics import functional

__all__ = ["ImageRow", "Evaluator", "ratio_group", "pooled", "METRIC_NAMES"]

METRIC_NAMES: tuple[str, ...] = ("psnr", "ssim", "lpips", "delta_e00")


@dataclass(frozen=True)
class ImageRow:
    """Scores of one evaluated image: PSNR in dB, SSIM, LPIPS and mean CIEDE2000 (None = not measured)."""

    name: str
    ratio: float
    psnr: float
    ssim: float
    lpips: float | None = None
    delta_e00: float | None = None


def ratio_group(ratio: float) -> str:
    """Group key of an exposure ratio. ratio (e.g. 100.0, 249.9) -> "x100", "x250"."""
    return f"x{round(ratio)}"


def _optional_float(value: Any, field: str) -> float | None:
    """A metric value as float or None. value -> float | None."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"Evaluator: {field} must be a number or None, got {value!r}") from None


def _mean_or_none(values: list[float | None]) -> float | None:
    """Mean of measured values. values -> float, or None when any value was not measured."""
    if not values or any(value is None for value in values):
        return None
    return math.fsum(values) / len(values)  # type: ignore[arg-type]


class Evaluator:
    """Accumulates per-image rows and summarises them overall and per exposure-ratio group.

    ``update`` scores a batch of sRGB predictions (8-bit quantised first when ``quantize``);
    ``add`` records scores computed elsewhere. Under DDP call ``gather()`` on every rank before
    ``summary()``/``write()``; rows repeated by a padding DistributedSampler count once.
    """

    def __init__(self, lpips_net: nn.Module | None = None, quantize: bool = True) -> None:
        self.lpips_net = lpips_net
        self.quantize = quantize
        self._rows: list[ImageRow] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def rows(self) -> list[ImageRow]:
        """Recorded rows, each (name, ratio) once, in the order first seen."""
        unique: dict[tuple[str, float], ImageRow] = {}
        for row in self._rows:
            unique.setdefault((row.name, row.ratio), row)
        return list(unique.values())

    def add(
        self,
        name: str,
        ratio: float,
        psnr: float,
        ssim: float,
        lpips: float | None = None,
        delta_e00: float | None = None,
    ) -> ImageRow:
        """Record one image's scores. name, ratio > 0, metric values (None = not measured) -> the row."""
        if not isinstance(name, str) or not name:
            raise InputError(f"Evaluator.add: name must be a non-empty string, got {name!r}")
        ratio_value = _optional_float(ratio, "ratio")
        if ratio_value is None or not math.isfinite(ratio_value) or ratio_value <= 0:
            raise InputError(f"Evaluator.add: ratio of {name} must be a finite number > 0, got {ratio!r}")
        psnr_value = _optional_float(psnr, "psnr")
        ssim_value = _optional_float(ssim, "ssim")
        if psnr_value is None or ssim_value is None:
            raise InputError(f"Evaluator.add: psnr and ssim of {name} are required")
        row = ImageRow(
            name=name,
            ratio=ratio_value,
            psnr=psnr_value,
            ssim=ssim_value,
            lpips=_optional_float(lpips, "lpips"),
            delta_e00=_optional_float(delta_e00, "delta_e00"),
        )
        self._rows.append(row)
        return row

    @torch.no_grad()
    def update(
        self,
        names: Sequence[str],
        ratios: Sequence[float] | torch.Tensor,
        pred: torch.Tensor,
        target: torch.Tensor,
    ) -> list[ImageRow]:
        """Score and record a batch. names (B,), ratios (B,), pred/target (B,3,H,W) sRGB in [0,1] -> B rows."""
        ratio_list = ratios.flatten().tolist() if isinstance(ratios, torch.Tensor) else list(ratios)
        batch = pred.shape[0] if isinstance(pred, torch.Tensor) and pred.dim() > 0 else -1
        if len(names) != batch or len(ratio_list) != batch:
            raise InputError(
                f"Evaluator.update: got {len(names)} names and {len(ratio_list)} ratios for a batch of {batch} images"
            )
        if self.quantize:
            pred, target = functional.quantize_8bit(pred), functional.quantize_8bit(target)
        scores: dict[str, list[float] | None] = {
            "psnr": functional.psnr(pred, target).tolist(),
            "ssim": functional.ssim(pred, target).tolist(),
            "delta_e00": functional.delta_e00(pred, target).tolist(),
            "lpips": None,
        }
        if self.lpips_net is not None:
            scores["lpips"] = functional.lpips(pred.float(), target.float(), self.lpips_net).tolist()  # the net is float32
        return [
            self.add(
                name,
                ratio,
                **{metric: (values[index] if values is not None else None) for metric, values in scores.items()},
            )
            for index, (name, ratio) in enumerate(zip(names, ratio_list))
        ]

    def gather(self) -> "Evaluator":
        """Collect every rank's rows on every rank (no-op without torch.distributed). -> self.

        With NCCL the current CUDA device must be set (``torch.cuda.set_device``) beforehand.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
            gathered: list[list[dict[str, Any]] | None] = [None] * world_size
            torch.distributed.all_gather_object(gathered, [asdict(row) for row in self._rows])
            self._rows = [ImageRow(**row) for part in gathered if part is not None for row in part]
        self._rows = sorted(self.rows, key=lambda row: (row.name, row.ratio))
        return self

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Means per group. -> {"all": {psnr, ssim, lpips, delta_e00, n}, "x100": {...}, ...}.

        A metric is None in a group when any of its images lacks it; groups follow ascending ratio.
        """
        rows = self.rows
        groups: dict[str, list[ImageRow]] = {"all": rows}
        for row in sorted(rows, key=lambda row: row.ratio):
            groups.setdefault(ratio_group(row.ratio), []).append(row)
        result: dict[str, dict[str, float | int | None]] = {}
        for key, members in groups.items():
            stats: dict[str, float | int | None] = {
                metric: _mean_or_none([getattr(row, metric) for row in members]) for metric in METRIC_NAMES
            }
            stats["n"] = len(members)
            result[key] = stats
        return result

    def write_csv(self, path: str | Path) -> Path:
        """Write one row per image. path -> path of per_image-style CSV (name,ratio,psnr,ssim,lpips,delta_e00)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = [field.name for field in fields(ImageRow)]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in self.rows:
                writer.writerow(["" if getattr(row, column) is None else getattr(row, column) for column in columns])
        return path

    def write(self, out_dir: str | Path) -> dict[str, dict[str, float | int | None]]:
        """Write out_dir/per_image.csv and out_dir/summary.json. out_dir -> the summary dict."""
        out_dir = Path(out_dir)
        self.write_csv(out_dir / "per_image.csv")
        summary = self.summary()
        with (out_dir / "summary.json").open("w") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
        return summary


def pooled(evaluators: Mapping[str, Evaluator]) -> Evaluator:
    """Every row of several evaluators in one, each name prefixed `<key>/` (sources may share file names). -> Evaluator."""
    joined = Evaluator(quantize=False)
    for key, evaluator in evaluators.items():
        for row in evaluator.rows:
            joined.add(f"{key}/{row.name}", row.ratio, row.psnr, row.ssim, row.lpips, row.delta_e00)
    return joined
