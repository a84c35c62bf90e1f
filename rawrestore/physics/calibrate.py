"""Crosstalk calibration: least-squares estimate of the per-site 3x3 kernel from aligned pairs.

Model (the one `rawrestore.losses.crosstalk_consistency` enforces): the exposure-aligned short
exposure A = ratio * short is the long exposure B seen through the crosstalk operator K,

    A[i, j] ~= sum_{dy, dx in -1..1} k[i % P, j % P, dy + 1, dx + 1] * B[i + dy, j + dx]  (+ c[pair, site])

(gather form of `rawrestore.physics.crosstalk`, sites counted from the top-left pixel). Each CFA
site s has its own 9 taps k_s, fitted by least squares over the pixels of that site from the
normal equations G_s k_s = h_s (G_s = sum w x x^T, h_s = sum w x a; x the 3x3 neighbourhood of
B around a pixel, a its value in A), accumulated pair by pair in float64.

Refinements, each a documented choice:
- Offset (`fit_offset`, default on): a constant c per pair and site absorbs what the ratio
  amplifies besides the signal, the short frame's colour bias / black-level error (1 DN at
  ratio 300 is 0.02 of the range), which would otherwise leak into the taps.
- Weights (`reweight`, default on): the noise of A grows with the ratio and the signal (shot
  noise), so pixels are weighted by 1 / variance, the variance estimated from the residuals
  per pair and signal level (`bins` bins of B's centre value, shrunk toward the pair's mean),
  iterated to convergence. The statistics are kept per (pair, bin, site), so no pixel is read
  twice.
- Energy (`energy_preserving`): every source site hands out exactly its charge,
  sum_d k[(t - d) % P, d] = 1 for every site t (`crosstalk.site_energy(k) == 1`), solved jointly
  over the sites through the KKT system of the equality-constrained least squares. The loss
  stack only loads energy-preserving kernels, so the CLI constrains by default.
- Pixels left out: the image border (neighbours outside the image) and any pixel whose 3x3
  neighbourhood in B reaches `saturation` (clipping is not crosstalk).
Noise in the long exposure B biases the taps slightly toward 0 (errors in variables),
negligible for SID's long exposures.

CLI: `rawrestore calibrate-crosstalk --manifest CSV --out K.npy [--root DIR] [--max-pairs N]` reads
each pair with `isp.read_raw`, normalises it (`isp.ops.normalize`, per-site black level) and
aligns the short frame with the manifest's `ratio` column (SID's capped ratio, the alignment the
training data uses), then writes the energy-preserving fit (`--free` for the unconstrained one).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from rawrestore.errors import DataError, InputError

if TYPE_CHECKING:
    from isp.meta import CameraMeta

__all__ = ["CrosstalkNormalEquations", "estimate_crosstalk", "energy_constraints", "configure", "run"]

_TAPS = 9
_CHUNK_PIXELS = 250_000  # pixels per strip while accumulating (the 81 products of a pixel: ~160 MB)
_MIN_RCOND = 1e-12  # smallest eigenvalue / largest of a site's Gram matrix still considered solvable
_SHRINK_PIXELS = 50.0  # a bin's variance is shrunk toward its pair's as if the pair added this many pixels
_MAX_ITERATIONS = 20


def _as_plane(image: Any, name: str) -> torch.Tensor:
    """One mosaic as a float64 CPU plane. (H,W), (1,H,W) or (1,1,H,W) array/tensor -> (H,W)."""
    tensor = torch.as_tensor(image.detach() if isinstance(image, torch.Tensor) else np.asarray(image))
    while tensor.ndim > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise InputError(f"{name} must be one mosaic (H,W) or (1,1,H,W), got shape {tuple(torch.as_tensor(image).shape)}")
    return tensor.to(device="cpu", dtype=torch.float64)


def energy_constraints(period: int) -> torch.Tensor:
    """Rows of sum_d k[(t - d) % P, d] = 1, one per source site t. period P -> (P*P, P*P*9) float64 over taps k.flatten()."""
    rows = torch.zeros(period * period, period * period * _TAPS, dtype=torch.float64)
    for tr in range(period):
        for tc in range(period):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    site = ((tr - dy) % period) * period + (tc - dx) % period
                    rows[tr * period + tc, site * _TAPS + (dy + 1) * 3 + (dx + 1)] = 1.0
    return rows


def _solve_constrained(gram: torch.Tensor, rhs: torch.Tensor, constraints: torch.Tensor) -> torch.Tensor:
    """min k^T G k - 2 h^T k subject to C k = 1. gram (N,N), rhs (N,), constraints (M,N) -> (N,)."""
    unknowns, rows = gram.shape[0], constraints.shape[0]
    kkt = torch.zeros(unknowns + rows, unknowns + rows, dtype=torch.float64)
    kkt[:unknowns, :unknowns] = gram
    kkt[:unknowns, unknowns:] = constraints.T
    kkt[unknowns:, :unknowns] = constraints
    return torch.linalg.solve(kkt, torch.cat([rhs, torch.ones(rows, dtype=torch.float64)]))[:unknowns]


class CrosstalkNormalEquations:
    """Sufficient statistics of A ~= K * B (+ offset), kept per (pair, signal bin, site). period P -> solve() (P,P,3,3).

    Per pair: `gram` (P,P,bins,9,9) sum x x^T, `cross` (P,P,bins,9) sum x a, `sum_x` (P,P,bins,9),
    `sum_a`, `sum_aa`, `count` (P,P,bins); all float64 on the CPU.
    """

    def __init__(self, period: int, saturation: float = 0.98, bins: int = 16):
        if period not in (2, 6):
            raise InputError(f"CFA period must be 2 (Bayer) or 6 (X-Trans), got {period!r}")
        if not (math.isfinite(saturation) and saturation > 0):
            raise InputError(f"saturation must be a positive number (normalised units), got {saturation}")
        if not (isinstance(bins, int) and bins >= 1):
            raise InputError(f"bins must be an integer >= 1, got {bins!r}")
        self.period, self.saturation, self.bins = period, float(saturation), bins
        self._pairs: list[dict[str, torch.Tensor]] = []

    @property
    def pairs(self) -> int:
        """Number of pairs added."""
        return len(self._pairs)

    @property
    def count(self) -> torch.Tensor:
        """Usable pixels per site over all pairs. -> (P,P) int64."""
        if not self._pairs:
            return torch.zeros(self.period, self.period, dtype=torch.int64)
        return sum(p["count"].sum(dim=-1) for p in self._pairs).round().to(torch.int64)

    def add(self, aligned_short: Any, long: Any) -> None:
        """Accumulate one pair. aligned_short, long (H,W) normalised mosaics, same CFA phase (top-left) -> None."""
        a = _as_plane(aligned_short, "aligned short exposure")
        b = _as_plane(long, "long exposure")
        if a.shape != b.shape:
            raise DataError(f"aligned short {tuple(a.shape)} and long {tuple(b.shape)} exposures differ in size")
        period, bins = self.period, self.bins
        height, width = (a.shape[0] // period) * period, (a.shape[1] // period) * period
        if height < 2 * period or width < 2 * period:
            raise DataError(f"mosaic {tuple(a.shape)} is too small to calibrate crosstalk (needs at least {2 * period}x{2 * period})")
        a, b = a[:height, :width], b[:height, :width]
        groups = period * period * bins
        stats = {
            "gram": torch.zeros(groups, _TAPS * _TAPS, dtype=torch.float64),
            "cross": torch.zeros(groups, _TAPS, dtype=torch.float64),
            "sum_x": torch.zeros(groups, _TAPS, dtype=torch.float64),
            "sum_a": torch.zeros(groups, dtype=torch.float64),
            "sum_aa": torch.zeros(groups, dtype=torch.float64),
            "count": torch.zeros(groups, dtype=torch.float64),
        }
        padded = F.pad(b[None, None], (1, 1, 1, 1))[0, 0]
        site_of_col = torch.arange(width) % period
        rows_per_chunk = max(period, (_CHUNK_PIXELS // width) // period * period)
        for r0 in range(0, height, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, height)
            # x[..., (dy+1)*3 + (dx+1)] = B[i + dy, j + dx] (zero outside; those pixels are masked out)
            x = torch.stack(
                [padded[r0 + 1 + dy : r1 + 1 + dy, 1 + dx : width + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
                dim=-1,
            )
            target = a[r0:r1]
            rows = torch.arange(r0, r1).view(-1, 1)
            cols = torch.arange(width).view(1, -1)
            usable = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
            usable &= (x.amax(dim=-1) < self.saturation) & torch.isfinite(target) & torch.isfinite(x).all(dim=-1)
            site = (rows % period) * period + site_of_col.view(1, -1)
            level = torch.clamp((x[..., 4] / self.saturation * bins).floor(), 0, bins - 1).long()
            group = (site * bins + level)[usable]
            xs, values = x[usable], target[usable]
            stats["gram"].index_add_(0, group, (xs.unsqueeze(-1) * xs.unsqueeze(-2)).reshape(-1, _TAPS * _TAPS))
            stats["cross"].index_add_(0, group, xs * values.unsqueeze(-1))
            stats["sum_x"].index_add_(0, group, xs)
            stats["sum_a"].index_add_(0, group, values)
            stats["sum_aa"].index_add_(0, group, values * values)
            stats["count"].index_add_(0, group, torch.ones_like(values))
        shape = (period, period, bins)
        self._pairs.append({
            "gram": stats["gram"].view(*shape, _TAPS, _TAPS), "cross": stats["cross"].view(*shape, _TAPS),
            "sum_x": stats["sum_x"].view(*shape, _TAPS), "sum_a": stats["sum_a"].view(shape),
            "sum_aa": stats["sum_aa"].view(shape), "count": stats["count"].view(shape),
        })

    def _stacked(self) -> dict[str, torch.Tensor]:
        """Per-pair statistics stacked on a leading pair dim. -> {name: (pairs, P, P, bins, ...)}."""
        return {name: torch.stack([p[name] for p in self._pairs]) for name in self._pairs[0]}

    def _normal_equations(self, stats: dict[str, torch.Tensor], weights: torch.Tensor, fit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted normal equations, offsets profiled out per (pair, site). weights (pairs, bins) -> G (P,P,9,9), h (P,P,9)."""
        w = weights[:, None, None, :]
        gram = (w[..., None, None] * stats["gram"]).sum(dim=3)
        cross = (w[..., None] * stats["cross"]).sum(dim=3)
        if fit_offset:
            count = (w * stats["count"]).sum(dim=3).clamp(min=1e-300)
            sum_x = (w[..., None] * stats["sum_x"]).sum(dim=3)
            sum_a = (w * stats["sum_a"]).sum(dim=3)
            gram = gram - sum_x.unsqueeze(-1) * sum_x.unsqueeze(-2) / count[..., None, None]
            cross = cross - sum_x * (sum_a / count).unsqueeze(-1)
        return gram.sum(dim=0), cross.sum(dim=0)

    def _check_determined(self, gram: torch.Tensor, shared: bool) -> None:
        """DataError naming the first CFA site (or the shared kernel) whose taps the data do not determine. gram (P,P,9,9)."""
        count = self.count
        if shared:
            eigenvalues = torch.linalg.eigvalsh(gram.sum(dim=(0, 1)))
            if count.sum() < 10 * _TAPS or eigenvalues[-1] <= 0 or eigenvalues[0] < _MIN_RCOND * eigenvalues[-1]:
                raise DataError(f"{int(count.sum())} usable pixels do not determine the 9 taps; add pairs with textured, unsaturated content")
            return
        eigenvalues = torch.linalg.eigvalsh(gram)
        for r in range(self.period):
            for c in range(self.period):
                top = eigenvalues[r, c, -1].item()
                if count[r, c] < 10 * _TAPS or top <= 0 or eigenvalues[r, c, 0].item() < _MIN_RCOND * top:
                    raise DataError(
                        f"CFA site ({r},{c}): {int(count[r, c])} usable pixels do not determine its 9 taps; "
                        "add more pairs with textured, unsaturated content"
                    )

    def _solve_once(self, gram: torch.Tensor, cross: torch.Tensor, energy_preserving: bool, shared: bool) -> torch.Tensor:
        """Taps from normal equations. gram (P,P,9,9), cross (P,P,9) -> (P,P,9)."""
        period = self.period
        if shared:
            gram, cross = gram.sum(dim=(0, 1)), cross.sum(dim=(0, 1))
            if energy_preserving:  # one kernel at every site: scatter sum = gather sum = sum of taps
                taps = _solve_constrained(gram, cross, torch.ones(1, _TAPS, dtype=torch.float64))
            else:
                taps = torch.linalg.solve(gram, cross)
            return taps.expand(period, period, _TAPS).clone()
        if not energy_preserving:
            return torch.linalg.solve(gram, cross.unsqueeze(-1)).squeeze(-1)
        taps = _solve_constrained(torch.block_diag(*gram.reshape(-1, _TAPS, _TAPS)), cross.reshape(-1), energy_constraints(period))
        return taps.reshape(period, period, _TAPS)

    def _residual_variance(self, stats: dict[str, torch.Tensor], weights: torch.Tensor, taps: torch.Tensor, fit_offset: bool) -> torch.Tensor:
        """Residual variance of A per (pair, bin), shrunk toward the pair's. -> (pairs, bins)."""
        k = taps[None, :, :, None, :]  # (1,P,P,1,9)
        fitted_cross = (k * stats["cross"]).sum(dim=-1)
        fitted_sq = torch.einsum("...i,...ij,...j->...", k.expand_as(stats["cross"]), stats["gram"], k.expand_as(stats["cross"]))
        rss = stats["sum_aa"] - 2.0 * fitted_cross + fitted_sq
        if fit_offset:
            w = weights[:, None, None, :]
            count = (w * stats["count"]).sum(dim=3, keepdim=True).clamp(min=1e-300)
            offset = (w * (stats["sum_a"] - (k * stats["sum_x"]).sum(dim=-1))).sum(dim=3, keepdim=True) / count
            rss = rss - 2.0 * offset * (stats["sum_a"] - (k * stats["sum_x"]).sum(dim=-1)) + offset * offset * stats["count"]
        rss = rss.clamp(min=0.0).sum(dim=(1, 2))  # pooled over sites: (pairs, bins)
        count = stats["count"].sum(dim=(1, 2))
        pair_variance = rss.sum(dim=1, keepdim=True) / count.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (rss + _SHRINK_PIXELS * pair_variance) / (count + _SHRINK_PIXELS)

    def solve(self, energy_preserving: bool = False, fit_offset: bool = True, reweight: bool = True,
              shared: bool = False) -> torch.Tensor:
        """Least-squares kernel. -> (P,P,3,3) float64 gather form; DataError when a site's taps are not determined.

        `shared=True` fits one 3x3 kernel for every site (9 unknowns; for cameras whose crosstalk does
        not depend on the site, or too little data for P*P*9 taps).
        """
        if not self._pairs:
            raise DataError("no pairs were added; give at least one (aligned short, long) pair")
        stats = self._stacked()
        weights = torch.ones(self.pairs, self.bins, dtype=torch.float64)
        gram, cross = self._normal_equations(stats, weights, fit_offset)
        self._check_determined(gram, shared)
        taps = self._solve_once(gram, cross, energy_preserving, shared)
        for _ in range(_MAX_ITERATIONS if reweight else 0):
            variance = self._residual_variance(stats, weights, taps, fit_offset)
            weights = torch.where(stats["count"].sum(dim=(1, 2)) > 0, 1.0 / variance.clamp(min=1e-30), torch.zeros_like(variance))
            weights = weights / weights.max()  # scale-free; keeps the sums well inside float64
            gram, cross = self._normal_equations(stats, weights, fit_offset)
            updated = self._solve_once(gram, cross, energy_preserving, shared)
            change = (updated - taps).abs().max().item()
            taps = updated
            if change < 1e-7:
                break
        return taps.reshape(self.period, self.period, 3, 3)


def estimate_crosstalk(
    pairs: Iterable[tuple[Any, Any]],
    period: int,
    energy_preserving: bool = False,
    *,
    fit_offset: bool = True,
    reweight: bool = True,
    shared: bool = False,
    saturation: float = 0.98,
    bins: int = 16,
) -> torch.Tensor:
    """Per-site crosstalk kernel from (aligned short, long) normalised mosaics (H,W) -> (P,P,3,3) float64 gather form.

    `aligned_short` is ratio * short (`physics.align.align_exposure`, not clipped); see the
    module docstring for the model, the offsets, the weights, the pixels used and the energy
    constraint.
    """
    equations = CrosstalkNormalEquations(period, saturation, bins)
    for aligned_short, long in pairs:
        equations.add(aligned_short, long)
    return equations.solve(energy_preserving, fit_offset=fit_offset, reweight=reweight, shared=shared)


# ------------------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rawrestore calibrate-crosstalk`."""
    parser.description = "Estimate the per-site 3x3 crosstalk kernel K (A_aligned ~= K * B_long) from a manifest of pairs."
    parser.add_argument("--manifest", required=True, help="CSV with columns short,long,ratio (others ignored)")
    parser.add_argument("--out", required=True, help="where to write the kernel, a (P,P,3,3) float32 .npy")
    parser.add_argument("--root", default=None, help="folder the manifest paths are relative to (default: the CSV's folder)")
    parser.add_argument("--max-pairs", type=int, default=None, help="use at most N pairs, in manifest order")
    parser.add_argument("--free", action="store_true",
                        help="do not constrain the kernel to preserve energy (the loss stack only loads energy-preserving kernels)")
    parser.add_argument("--saturation", type=float, default=0.98,
                        help="leave out pixels whose 3x3 neighbourhood in the long exposure reaches this normalised level")


def _read_rows(manifest: Path, max_pairs: int | None) -> list[dict[str, str]]:
    """Rows of a manifest CSV that has at least short, long, ratio. -> list of dicts."""
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} not found; build one with `rawrestore manifest` or `rawrestore synth`")
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        lacking = [c for c in ("short", "long", "ratio") if c not in (reader.fieldnames or [])]
        if lacking:
            raise DataError(f"manifest {manifest}: missing column(s) {lacking}; it needs short,long,ratio")
        rows = [row for row in reader if any((value or "").strip() for value in row.values())]
    if max_pairs is not None:
        rows = rows[:max_pairs]
    if not rows:
        raise DataError(f"manifest {manifest}: no pairs to calibrate from")
    return rows


def _load_normalised(path: Path) -> tuple[torch.Tensor, CameraMeta]:
    """A RAW file as a normalised float64 mosaic. path -> ((H,W) tensor, CameraMeta)."""
    from isp import ops, read_raw

    mosaic, meta = read_raw(path)
    plane = torch.from_numpy(mosaic.astype(np.float64))[None, None]
    return ops.normalize(plane, meta.black_level, meta.white_level)[0, 0], meta


def run(args: argparse.Namespace) -> int:
    """Fit the kernel over the manifest's pairs and write it to --out. -> exit code 0."""
    from isp.safeio import check_output, write_bytes
    from rawrestore.data.manifest import resolve_inside  # the one dataset-root rule
    from rawrestore.folders import check_folder, new_folders
    from rawrestore.physics.align import align_exposure
    from rawrestore.physics.crosstalk import site_energy

    manifest = Path(args.manifest)
    out = Path(args.out)
    if out.suffix != ".npy":
        raise InputError(f"--out {out}: the kernel is written as .npy; give a path ending in .npy")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise InputError(f"--max-pairs must be >= 1, got {args.max_pairs}")
    root = Path(args.root) if args.root is not None else manifest.resolve().parent
    check_folder(out.parent, "--out")
    check_output(out, [manifest], "--out")
    rows = _read_rows(manifest, args.max_pairs)
    inputs: list[Path] = [manifest]
    equations: CrosstalkNormalEquations | None = None
    cfa = None
    cached_long: tuple[Path, torch.Tensor] | None = None  # consecutive rows often share the long exposure
    for number, row in enumerate(rows, start=2):
        where = f"{manifest}:{number}"
        try:
            ratio = float(row["ratio"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: ratio {row['ratio']!r} is not a number") from None
        if not (math.isfinite(ratio) and ratio > 0):
            raise DataError(f"{where}: ratio must be a positive number, got {ratio}")
        if not (row.get("short") or "").strip() or not (row.get("long") or "").strip():
            raise DataError(f"{where}: empty short or long path")
        try:  # the dataset-root rule of every manifest reader: no absolute paths, no `..` out of the root
            short_path, long_path = (resolve_inside(root, row[c].strip()) for c in ("short", "long"))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        inputs.extend((short_path, long_path))
        short, meta = _load_normalised(short_path)
        if cached_long is None or cached_long[0] != long_path:
            long_plane, long_meta = _load_normalised(long_path)
            if long_meta.cfa != meta.cfa:
                raise DataError(f"{where}: short and long exposures have different CFAs")
            cached_long = (long_path, long_plane)
        if equations is None:
            equations = CrosstalkNormalEquations(meta.cfa_period, args.saturation)
            cfa = meta.cfa
        elif meta.cfa != cfa:
            raise DataError(f"{where}: CFA {meta.cfa} differs from the first pair's {cfa}; calibrate one camera at a time")
        aligned = align_exposure(short[None, None], ratio)[0, 0]
        equations.add(aligned, cached_long[1])
    kernel = equations.solve(energy_preserving=not args.free)
    buffer = io.BytesIO()
    np.save(buffer, kernel.to(torch.float32).numpy())
    with new_folders([out.parent], "--out"):
        write_bytes(out, buffer.getvalue(), inputs, "--out")
    energy = site_energy(kernel)
    print(
        f"crosstalk kernel ({equations.period}x{equations.period} sites x 3x3) from {equations.pairs} pairs, "
        f">= {int(equations.count.min())} pixels per site: centre taps {kernel[..., 1, 1].min().item():.4f}.."
        f"{kernel[..., 1, 1].max().item():.4f}, site energy {energy.min().item():.4f}..{energy.max().item():.4f} -> {out}"
    )
    return 0
