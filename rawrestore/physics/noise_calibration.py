"""Noise calibration of a camera from dark and flat frames, in the ELD parameter layout.

    rawrestore calibrate-noise --dark DIR --flat DIR --out CAMERA.json [--report DIR]

Inputs. RAW files of one camera (anything `isp.read_raw` reads), grouped by ISO from their
metadata, or by the nearest folder named `iso<N>` above them when the metadata has none (DNGs
written by pidng carry no ISO LibRaw reads). Dark frames: lens capped, two or more per ISO.
Flat frames: pairs of evenly lit frames of equal exposure at two or more exposure levels per ISO;
the frames of one ISO are paired in name order within each exposure time, and the two frames of
a pair must agree in level within 10%.

Measurements per ISO (all in DN; "colour" is ELD's slot R, G, B, G2: on Bayer G is the green in
red's row and G2 the green in blue's row, on X-Trans G2 repeats G). Frames are streamed: each
ISO keeps running sums and a bounded random sample of residuals, never the frames.

- black: the mean of the dark frames per colour; `color_bias` = black - the metadata black.
- row noise: each dark frame minus its per-site means; the variance of its row means holds the
  row noise plus 1/W of the pixel noise, so s_r^2 = Var(row means) - Var(pixel residual) / W.
- read noise: the residual after the per-site and row means. Its Tukey-lambda shape is the
  maximum of the probability-plot correlation (`scipy.stats.ppcc_max`), its scale the slope of
  the probability plot at that shape (`scipy.stats.probplot`); `gauss_sigma` is the Gaussian
  alternative (the residual's standard deviation). The residual holds the quantisation
  (q^2 / 12), which the noise model adds on its own, so both scales are reduced by the factor
  sqrt(1 - q^2 / 12 / Var(residual)).
- quantisation step q: the greatest common divisor of the differences between the DN values
  the dark frames take.
- system gain K (photon transfer): for each flat pair and colour, black subtracted and pixels
  clipped in either frame left out, the variance of the difference (the second frame scaled to
  the first's mean, which removes flicker) over 2 against the pair's mean; K is the slope of the
  line through all pairs and colours of the ISO (weighted least squares, weights 1 / variance),
  `K_per_colour` the slope of each colour alone.

Fits across ISOs, as ELD: log(scale) = slope * log(K) + bias with residual sigma, for the Tukey
scale (G_scale), the Gaussian sigma (g_scale) and the row scale (R_scale); `Kmin`/`Kmax` the
range of K, `G_shape` the lambdas and `color_bias` the per-ISO biases. With one ISO the slopes
are 0. The JSON is read as it is by `data.noise_camera: CAMERA.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from rawrestore.errors import DataError, InputError

_log = logging.getLogger("rawrestore.physics")

__all__ = [
    "COLOUR_SLOTS", "colour_slots", "DarkAccumulator", "FlatAccumulator", "IsoCalibration", "Calibration",
    "calibrate_frames", "calibrate_folders", "fit_log_line", "find_raw_files", "raw_files", "iso_of", "configure", "run",
]

COLOUR_SLOTS: tuple[str, ...] = ("R", "G", "B", "G2")  # ELD's colour order of color_bias
RAW_SUFFIXES = frozenset({
    ".dng", ".arw", ".srf", ".sr2", ".nef", ".nrw", ".cr2", ".cr3", ".crw", ".raf", ".orf", ".rw2", ".pef",
    ".srw", ".3fr", ".iiq", ".erf", ".kdc", ".dcr", ".mrw", ".mos", ".raw", ".rwl", ".x3f", ".gpr",
})
MIN_DARK_FRAMES = 2
MIN_FLAT_PAIRS = 2
PAIR_LEVEL_TOLERANCE = 0.10  # the two frames of a flat pair differ in level by at most this fraction
MIN_LEVEL_SPREAD = 1.5  # the brightest flat pair of an ISO is at least this many times the darkest
MAX_CLIPPED = 0.25  # a flat with more pixels at the white level than this is saturated
MIN_FLAT_SNR = 10.0  # a flat's mean above black must reach this many read-noise sigmas
RESIDUAL_SAMPLE = 200_000  # read-noise residuals kept per ISO for the Tukey-lambda fit
PPCC_BRACKET = (-0.3, 0.3)
PPCC_CURVE = (-0.5, 0.5, 41)  # lambda range and points of the PPCC curve in the report
_ISO_FOLDER = re.compile(r"^iso[_-]?(\d+(?:\.\d+)?)$", re.IGNORECASE)


def colour_slots(cfa: Any) -> np.ndarray:
    """ELD colour slot of each CFA site. cfa (P,P) colour indices 0/1/2 -> (P,P) in 0=R 1=G 2=B 3=G2 (G2 Bayer only)."""
    cfa = np.asarray(cfa, dtype=np.int64)
    slots = cfa.copy()
    if cfa.shape == (2, 2):
        in_blue_row = (cfa == 2).any(axis=1, keepdims=True) & (cfa == 1)
        slots[in_blue_row] = 3
    return slots


def _site_sums(values: np.ndarray, period: int) -> np.ndarray:
    """Sum per CFA site. (H,W) with H, W multiples of P -> (P,P) float64."""
    return _by_site(values, period).sum(axis=(0, 2), dtype=np.float64)


def _by_site(values: np.ndarray, period: int) -> np.ndarray:
    """(H,W) -> the same memory as (H/P, P, W/P, P), so a (P,P) per-site array broadcasts as [None, :, None, :]."""
    height, width = values.shape
    return values.reshape(height // period, period, width // period, period)


def _sample_indices(rng: np.random.Generator, size: int, take: int) -> np.ndarray:
    """`take` random flat indices into `size` pixels (with replacement: the same pixel twice is rare and harmless)."""
    return rng.integers(0, size, min(size, take))


def _per_slot(per_site: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Sum of per-site values over each slot. (P,P) -> (4,)."""
    return np.bincount(slots.ravel(), weights=per_site.ravel(), minlength=4)


def _fill_g2(values: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """X-Trans has no G2 slot: repeat G there."""
    values = np.array(values, dtype=np.float64)
    if not (slots == 3).any():
        values[3] = values[1]
    return values


class DarkAccumulator:
    """Running statistics of the dark frames of one ISO; `add` one (H,W) frame at a time."""

    def __init__(self, cfa: Any, sample_size: int = RESIDUAL_SAMPLE, seed: int = 0):
        self.cfa = np.asarray(cfa, dtype=np.int64)
        self.period = self.cfa.shape[0]
        self.slots = colour_slots(self.cfa)
        self.sample_size = int(sample_size)
        self.rng = np.random.default_rng(seed)
        self.frames = 0
        self.width = 0
        self.site_mean_sum = np.zeros((self.period, self.period))
        self.row_sq_sum = 0.0
        self.row_dof = 0
        self.residual_sq_sum = 0.0
        self.residual_dof = 0
        self.quant_gcd = 0
        self._sample = np.empty(0)
        self._keys = np.empty(0)

    def add(self, mosaic: np.ndarray) -> None:
        """Accumulate one dark frame (H,W) in DN (cut to whole CFA periods)."""
        period = self.period
        height, width = (s // period * period for s in mosaic.shape)
        raw = np.asarray(mosaic)[:height, :width]
        frame = raw.astype(np.float64)
        site_mean = _site_sums(frame, period) / (height * width / period ** 2)
        _by_site(frame, period)[...] -= site_mean[None, :, None, :]
        rows = frame.mean(axis=1)
        frame -= rows[:, None]
        self.frames += 1
        self.width = width
        self.site_mean_sum += site_mean
        self.row_sq_sum += float(np.dot(rows, rows))
        self.row_dof += height - 1
        self.residual_sq_sum += float(np.einsum("ij,ij->", frame, frame))
        self.residual_dof += height * width - period * period - height
        picks = _sample_indices(self.rng, frame.size, self.sample_size)
        self._keep(frame.ravel()[picks])
        levels = np.unique(raw.ravel()[picks])
        if levels.size > 1:
            self.quant_gcd = int(np.gcd.reduce(np.append(np.diff(levels.astype(np.int64)), self.quant_gcd)))

    def _keep(self, values: np.ndarray) -> None:
        """Uniform random sample of every residual offered so far (smallest random keys win)."""
        keys = self.rng.random(values.size)
        self._sample = np.concatenate([self._sample, values])
        self._keys = np.concatenate([self._keys, keys])
        if self._sample.size > self.sample_size:
            keep = np.argpartition(self._keys, self.sample_size)[: self.sample_size]
            self._sample, self._keys = self._sample[keep], self._keys[keep]

    @property
    def sample(self) -> np.ndarray:
        """Read-noise residuals (row and site means removed), DN; at most `sample_size`."""
        return self._sample

    def black_per_site(self) -> np.ndarray:
        """Mean dark level per CFA site. -> (P,P) DN."""
        return self.site_mean_sum / max(self.frames, 1)

    def black_per_slot(self) -> np.ndarray:
        """Mean dark level per ELD colour (R, G, B, G2). -> (4,) DN."""
        counts = np.bincount(self.slots.ravel(), minlength=4)
        sums = _per_slot(self.black_per_site(), self.slots)
        return _fill_g2(np.divide(sums, counts, out=np.zeros(4), where=counts > 0), self.slots)

    def residual_variance(self) -> float:
        """Pixel read-noise variance, quantisation included, DN^2 (corrected for the row mean taken out)."""
        variance = self.residual_sq_sum / max(self.residual_dof, 1)
        return variance * self.width / max(self.width - 1, 1)

    def row_scale(self) -> float:
        """Row-noise standard deviation, DN: Var(row means) less the pixel noise's share 1/W."""
        row_variance = self.row_sq_sum / max(self.row_dof, 1)
        return math.sqrt(max(row_variance - self.residual_variance() / self.width, 0.0))

    @property
    def quant_step(self) -> float:
        return float(max(self.quant_gcd, 1))


@dataclass
class FlatPair:
    """Photon-transfer points of one flat pair: per colour slot the mean above black and the noise variance, DN."""

    names: tuple[str, str]
    mean: np.ndarray  # (4,)
    variance: np.ndarray  # (4,)
    pixels: np.ndarray  # (4,) pixels used per slot
    clipped: float  # fraction of pixels left out as clipped


class FlatAccumulator:
    """Photon-transfer points of the flat pairs of one ISO; `add_pair` two (H,W) frames at a time."""

    def __init__(self, cfa: Any, black_per_site: np.ndarray, white_level: float, read_sigma: float):
        self.cfa = np.asarray(cfa, dtype=np.int64)
        self.period = self.cfa.shape[0]
        self.slots = colour_slots(self.cfa)
        self.black = np.asarray(black_per_site, dtype=np.float64)
        self.white = float(white_level)
        self.read_sigma = float(read_sigma)
        self.pairs: list[FlatPair] = []

    def add_pair(self, first: np.ndarray, second: np.ndarray, names: tuple[str, str]) -> FlatPair:
        """Measure one pair of flats of equal exposure; DataError when saturated, too dark or not a pair."""
        period = self.period
        height, width = (s // period * period for s in first.shape)
        a = np.asarray(first)[:height, :width]
        b = np.asarray(second)[:height, :width]
        valid = (a < self.white) & (b < self.white)
        clipped = 1.0 - float(valid.mean())
        if clipped > MAX_CLIPPED:
            raise DataError(f"flat pair {names[0]} / {names[1]} is saturated ({100 * clipped:.0f}% of pixels at the white "
                            f"level {self.white:g}); shoot the flats darker, below about 3/4 of the range")
        count = _per_slot(_site_sums(valid, period), self.slots)
        above_a, above_b = a.astype(np.float64), b.astype(np.float64)
        for above in (above_a, above_b):  # black subtracted, clipped pixels set to 0 so plain sums are masked sums
            _by_site(above, period)[...] -= self.black[None, :, None, :]
            above[~valid] = 0.0
        mean_a = _per_slot(_site_sums(above_a, period), self.slots) / np.maximum(count, 1)
        mean_b = _per_slot(_site_sums(above_b, period), self.slots) / np.maximum(count, 1)
        used = count > 0
        level_a, level_b = float(mean_a[used].mean()), float(mean_b[used].mean())
        level = 0.5 * (level_a + level_b)
        if level < MIN_FLAT_SNR * self.read_sigma:
            raise DataError(f"flat pair {names[0]} / {names[1]} is too dark to measure ({level:.1f} DN above black, read "
                            f"noise {self.read_sigma:.2f} DN); expose the flats to a tenth of the range or more")
        if abs(level_a - level_b) > PAIR_LEVEL_TOLERANCE * level:
            raise DataError(f"flats {names[0]} and {names[1]} differ in level by {100 * abs(level_a - level_b) / level:.0f}% "
                            "and are not a pair; give each pair the same exposure time, or name the two frames so they "
                            "sort next to each other")
        gain = np.divide(mean_a, mean_b, out=np.ones(4), where=mean_b > 0)
        _by_site(above_b, period)[...] *= gain[self.slots][None, :, None, :]
        diff = np.subtract(above_a, above_b, out=above_a)  # the first frame minus the second scaled to its level
        del above_b
        diff_sum = _per_slot(_site_sums(diff, period), self.slots)
        diff_sq = _per_slot(np.einsum("iajb,iajb->ab", _by_site(diff, period), _by_site(diff, period)), self.slots)
        diff_mean = diff_sum / np.maximum(count, 1)
        variance = (diff_sq - count * diff_mean ** 2) / np.maximum(count - 1, 1) / (1.0 + gain ** 2)
        pair = FlatPair(names, _fill_g2(0.5 * (mean_a + mean_b), self.slots), _fill_g2(variance, self.slots),
                        _fill_g2(count, self.slots), clipped)
        self.pairs.append(pair)
        return pair

    def points(self, slot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) of every pair, of one slot or of all slots with pixels. -> two (N,) arrays, DN and DN^2."""
        slots = [slot] if slot is not None else [s for s in range(4) if (self.slots == s).any()]
        means = np.array([p.mean[s] for p in self.pairs for s in slots])
        variances = np.array([p.variance[s] for p in self.pairs for s in slots])
        return means, variances

    def fit(self, slot: int | None = None) -> tuple[float, float]:
        """Photon-transfer line variance = K * mean + c. -> (K in DN per electron, c in DN^2)."""
        means, variances = self.points(slot)
        slope, intercept = np.polyfit(means, variances, 1, w=1.0 / np.maximum(variances, 1e-12))
        return float(slope), float(intercept)


@dataclass
class IsoCalibration:
    """Everything measured at one ISO (DN, DN per electron) plus what the report draws."""

    iso: float
    K: float
    K_per_colour: list[float]
    photon_transfer_intercept: float
    black: list[float]
    color_bias: list[float]
    row_scale: float
    tukey_lambda: float
    tukey_scale: float
    gauss_sigma: float
    quant_step: float
    dark_frames: int
    flat_pairs: int
    flats: FlatAccumulator = field(repr=False)
    residuals: np.ndarray = field(repr=False)
    ppcc_curve: tuple[np.ndarray, np.ndarray] = field(repr=False)
    ppcc_max: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The `per_iso` entry of the calibration JSON."""
        return {
            "iso": self.iso, "K": self.K, "K_per_colour": self.K_per_colour,
            "black": self.black, "color_bias": self.color_bias, "row_scale": self.row_scale,
            "tukey_lambda": self.tukey_lambda, "tukey_scale": self.tukey_scale, "gauss_sigma": self.gauss_sigma,
            "quant_step": self.quant_step, "ppcc": self.ppcc_max,
            "photon_transfer_intercept": self.photon_transfer_intercept,
            "frames": {"dark": self.dark_frames, "flat_pairs": self.flat_pairs},
        }


def fit_log_line(gains: Iterable[float], scales: Iterable[float]) -> dict[str, float]:
    """ELD's line log(scale) = slope * log(K) + bias, sigma the residual spread. -> {'slope', 'bias', 'sigma'}.

    Scales of 0 (no row noise measured) are floored at 1e-3 DN so the logarithm exists. Fewer
    than two distinct K: slope 0 and the mean log scale; sigma uses n - 2 degrees of freedom.
    """
    log_k = np.log(np.asarray(list(gains), dtype=np.float64))
    log_s = np.log(np.maximum(np.asarray(list(scales), dtype=np.float64), 1e-3))
    if log_k.size < 2 or np.ptp(log_k) < 1e-9:
        return {"slope": 0.0, "bias": float(log_s.mean()), "sigma": 0.0}
    slope, bias = np.polyfit(log_k, log_s, 1)
    residual = log_s - (slope * log_k + bias)
    sigma = math.sqrt(float(residual @ residual) / (log_k.size - 2)) if log_k.size > 2 else 0.0
    return {"slope": float(slope), "bias": float(bias), "sigma": sigma}


def _read_noise_fit(dark: DarkAccumulator) -> tuple[float, float, float, float, tuple[np.ndarray, np.ndarray]]:
    """Tukey lambda, Tukey scale, Gaussian sigma and the PPCC at lambda (+ the PPCC curve) from the residuals."""
    from scipy import stats

    sample = dark.sample
    variance = dark.residual_variance()
    quant_variance = dark.quant_step ** 2 / 12.0
    shrink = math.sqrt(max(variance - quant_variance, 0.0) / variance) if variance > 0 else 0.0
    if variance <= 0 or np.ptp(sample) == 0:
        return 0.0, 0.0, 0.0, 1.0, (np.zeros(0), np.zeros(0))
    lam = float(stats.ppcc_max(sample, brack=PPCC_BRACKET, dist="tukeylambda"))
    _, (slope, _, r_value) = stats.probplot(sample, sparams=(lam,), dist="tukeylambda")
    low, high, points = PPCC_CURVE
    curve = stats.ppcc_plot(sample[: min(sample.size, 50_000)], low, high, dist="tukeylambda", N=points)
    return lam, float(slope) * shrink, math.sqrt(max(variance - quant_variance, 0.0)), float(r_value), curve


@dataclass
class Calibration:
    """Calibration of one camera: per-ISO results and the camera's metadata."""

    per_iso: list[IsoCalibration]
    make: str
    model: str
    cfa: list[list[int]]
    width: int
    height: int
    black_level: list[list[float]]
    white_level: float

    def lines(self) -> dict[str, dict[str, float]]:
        """ELD's three fits across ISOs: G_scale (Tukey), g_scale (Gaussian), R_scale (row)."""
        gains = [c.K for c in self.per_iso]
        return {
            "G_scale": fit_log_line(gains, [c.tukey_scale for c in self.per_iso]),
            "g_scale": fit_log_line(gains, [c.gauss_sigma for c in self.per_iso]),
            "R_scale": fit_log_line(gains, [c.row_scale for c in self.per_iso]),
        }

    def to_json_dict(self) -> dict[str, Any]:
        """The calibration file: ELD's layout (Kmin, Kmax, G_shape, Profile-1, color_bias) plus per_iso and camera."""
        gains = [c.K for c in self.per_iso]
        return {
            "Kmin": min(gains),
            "Kmax": max(gains),
            "G_shape": [c.tukey_lambda for c in self.per_iso],
            "Profile-1": self.lines(),
            "color_bias": [c.color_bias for c in self.per_iso],
            "per_iso": [c.to_dict() for c in self.per_iso],
            "camera": {"make": self.make, "model": self.model, "cfa": self.cfa, "width": self.width, "height": self.height,
                       "black_level": self.black_level, "white_level": self.white_level},
            "units": "DN above the metadata black level; K in DN per electron",
            "source": "rawrestore calibrate-noise",
        }


# ------------------------------------------------------------------------------ files


def find_raw_files(root: Path) -> list[Path]:
    """RAW files under the folder `root`, recursively by file suffix, hidden files and folders left out; sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in RAW_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def raw_files(folder: str | os.PathLike, what: str) -> list[Path]:
    """RAW files under `folder` (see find_raw_files); InputError when the folder is missing or holds none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"{what} folder {folder} does not exist or is not a folder; check the path")
    found = find_raw_files(root)
    if not found:
        raise InputError(f"{what} folder {folder} holds no RAW files (looked for {', '.join(sorted(RAW_SUFFIXES)[:6])}, ...)")
    return found


def iso_of(path: Path, meta_iso: float | None, root: Path) -> float:
    """ISO of a frame: its metadata, else the nearest folder named iso<N> between `root` and the file."""
    if meta_iso:
        return float(meta_iso)
    for parent in path.relative_to(root).parents:
        match = _ISO_FOLDER.match(parent.name)
        if match:
            return float(match.group(1))
    raise DataError(f"{path}: no ISO in its metadata and no folder named iso<N> above it; "
                    f"put the frames of each ISO in a subfolder such as {root}/iso800/")


@dataclass(frozen=True)
class Frame:
    """One RAW frame as read: mosaic (H,W) uint16, its metadata, ISO and path."""

    path: Path
    mosaic: np.ndarray
    meta: Any
    iso: float


def _frames(paths: list[Path], root: Path, desc: str, progress: bool) -> Iterator[Frame]:
    """Read frames one at a time (tqdm progress); only the frame being used is in memory."""
    import isp
    from tqdm import tqdm

    for path in tqdm(paths, desc=desc, unit="frame", disable=None if progress else True, file=sys.stderr):
        mosaic, meta = isp.read_raw(path)
        yield Frame(path, mosaic, meta, iso_of(path, meta.iso, root))


class _SameCamera:
    """Every frame must match the first one's camera, CFA, size and levels."""

    def __init__(self) -> None:
        self.first: Frame | None = None

    def check(self, frame: Frame) -> None:
        if self.first is None:
            self.first = frame
            return
        ref, meta = self.first.meta, frame.meta
        if (meta.make, meta.model) != (ref.make, ref.model) or meta.cfa != ref.cfa:
            raise DataError(f"{frame.path} is from '{meta.make} {meta.model}' (CFA {meta.cfa_string()}) but "
                            f"{self.first.path} is from '{ref.make} {ref.model}' (CFA {ref.cfa_string()}); "
                            "calibrate one camera at a time")
        if (meta.width, meta.height) != (ref.width, ref.height):
            raise DataError(f"{frame.path} is {meta.width}x{meta.height} but {self.first.path} is {ref.width}x{ref.height}; "
                            "shoot every frame at the same size (one RAW format)")
        if meta.white_level != ref.white_level or meta.black_level != ref.black_level:
            raise DataError(f"{frame.path} has black/white levels {meta.black_level}/{meta.white_level:g} but {self.first.path} "
                            f"has {ref.black_level}/{ref.white_level:g}; calibrate one camera mode at a time")


def calibrate_frames(darks: Iterable[Frame], flats: Iterable[Frame], sample_size: int = RESIDUAL_SAMPLE,
                     seed: int = 0) -> Calibration:
    """Calibrate from streams of dark and flat frames (see the module docstring). -> Calibration.

    Darks are consumed first (the flats need each ISO's black level); flats are paired in the
    order they come within each (ISO, exposure time), holding at most one unpaired frame per key.
    """
    same = _SameCamera()
    dark_stats: dict[float, DarkAccumulator] = {}
    for frame in darks:
        same.check(frame)
        if frame.iso not in dark_stats:
            dark_stats[frame.iso] = DarkAccumulator(frame.meta.cfa, sample_size, seed=int(seed * 1_000_003 + frame.iso))
        dark_stats[frame.iso].add(frame.mosaic)
    if not dark_stats:
        raise DataError("no dark frames; shoot several frames per ISO with the lens capped")
    for iso, stats_ in sorted(dark_stats.items()):
        if stats_.frames < MIN_DARK_FRAMES:
            raise DataError(f"ISO {iso:g} has {stats_.frames} dark frame(s); shoot at least {MIN_DARK_FRAMES} "
                            "(ten is better) with the lens capped")

    flat_stats: dict[float, FlatAccumulator] = {}
    pending: dict[tuple[float, float | None], Frame] = {}
    for frame in flats:
        same.check(frame)
        if frame.iso not in dark_stats:
            raise DataError(f"flat {frame.path} is at ISO {frame.iso:g} but there are no dark frames at that ISO "
                            f"(darks at {', '.join(f'{i:g}' for i in sorted(dark_stats))}); shoot darks at every flat ISO")
        key = (frame.iso, frame.meta.exposure_time)
        if key not in pending:
            pending[key] = frame
            continue
        first = pending.pop(key)
        if frame.iso not in flat_stats:
            dark = dark_stats[frame.iso]
            flat_stats[frame.iso] = FlatAccumulator(frame.meta.cfa, dark.black_per_site(), frame.meta.white_level,
                                                    math.sqrt(dark.residual_variance()))
        flat_stats[frame.iso].add_pair(first.mosaic, frame.mosaic, (str(first.path), str(frame.path)))

    ref = same.first.meta  # type: ignore[union-attr]
    results = []
    for iso in sorted(dark_stats):
        dark = dark_stats[iso]
        flat = flat_stats.get(iso)
        pairs = len(flat.pairs) if flat is not None else 0
        if pairs < MIN_FLAT_PAIRS:
            raise DataError(f"ISO {iso:g} has {pairs} flat pair(s); shoot at least {MIN_FLAT_PAIRS} pairs of equal exposure "
                            "at two or more exposure levels")
        levels = [float(np.mean(p.mean)) for p in flat.pairs]  # type: ignore[union-attr]
        if max(levels) < MIN_LEVEL_SPREAD * min(levels):
            raise DataError(f"the flats of ISO {iso:g} are all at one level ({min(levels):.0f}-{max(levels):.0f} DN above "
                            f"black); shoot pairs at two or more exposures, the brightest {MIN_LEVEL_SPREAD:g}x the darkest or more")
        gain, intercept = flat.fit()  # type: ignore[union-attr]
        if not gain > 0:
            raise DataError(f"ISO {iso:g}: the photon-transfer fit gives no positive gain (K = {gain:.4g}); "
                            "check that the flats are evenly lit and not clipped")
        per_colour = _fill_g2([flat.fit(s)[0] if (flat.slots == s).any() else 0.0 for s in range(4)], flat.slots)  # type: ignore[union-attr]
        lam, tukey_scale, gauss_sigma, r_value, curve = _read_noise_fit(dark)
        black = dark.black_per_slot()
        nominal = _fill_g2(_per_slot(np.asarray(ref.black_level, dtype=np.float64), dark.slots)
                           / np.maximum(np.bincount(dark.slots.ravel(), minlength=4), 1), dark.slots)
        results.append(IsoCalibration(
            iso=iso, K=gain, K_per_colour=[float(v) for v in per_colour], photon_transfer_intercept=intercept,
            black=[float(v) for v in black], color_bias=[float(v) for v in black - nominal],
            row_scale=dark.row_scale(), tukey_lambda=lam, tukey_scale=tukey_scale, gauss_sigma=gauss_sigma,
            quant_step=dark.quant_step, dark_frames=dark.frames, flat_pairs=pairs,
            flats=flat, residuals=dark.sample, ppcc_curve=curve, ppcc_max=r_value,  # type: ignore[arg-type]
        ))
    unpaired = sorted(str(f.path) for f in pending.values())
    if unpaired:
        _log.warning("calibrate-noise: %d flat frame(s) without a partner left out, e.g. %s", len(unpaired), unpaired[0])
    return Calibration(results, ref.make, ref.model, ref.cfa, ref.width, ref.height, ref.black_level, float(ref.white_level))


def calibrate_folders(dark: str | os.PathLike, flat: str | os.PathLike, sample_size: int = RESIDUAL_SAMPLE,
                      progress: bool = True) -> Calibration:
    """Calibrate from a folder of dark frames and one of flat frames. -> Calibration."""
    dark_root, flat_root = Path(dark).expanduser(), Path(flat).expanduser()
    dark_files, flat_files = raw_files(dark_root, "--dark"), raw_files(flat_root, "--flat")
    return calibrate_frames(_frames(dark_files, dark_root, "dark frames", progress),
                            _frames(flat_files, flat_root, "flat frames", progress), sample_size)


# -------------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore calibrate-noise`."""
    parser.description = ("Calibrate a camera's noise (system gain, black level, row noise, Tukey-lambda read noise) "
                          "from dark frames and pairs of flat frames, per ISO, into an ELD-layout JSON for "
                          "data.noise_camera.")
    parser.add_argument("--dark", required=True, help="folder of dark frames (lens capped), several per ISO")
    parser.add_argument("--flat", required=True, help="folder of flat-frame pairs, two or more exposure levels per ISO")
    parser.add_argument("--out", required=True, help="calibration JSON to write (use it as data.noise_camera)")
    parser.add_argument("--report", default=None, help="folder for an HTML report with the fits (created if missing)")
    parser.add_argument("--sample", type=int, default=RESIDUAL_SAMPLE,
                        help=f"read-noise residuals kept per ISO for the Tukey-lambda fit (default {RESIDUAL_SAMPLE})")


def run(args: argparse.Namespace) -> int:
    """Calibrate, write the JSON (and the report); prints one line per ISO."""
    from isp.safeio import check_output, write_bytes

    if args.sample < 1000:
        raise InputError(f"--sample must be at least 1000 residuals, got {args.sample}")
    inputs = [str(p) for root in (args.dark, args.flat) if Path(root).is_dir() for p in Path(root).rglob("*")]
    out = check_output(args.out, inputs, what="--out")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    report_dir = None
    if args.report is not None:
        from rawrestore.physics.noise_report import check_report_dir

        report_dir = check_report_dir(args.report)
    calibration = calibrate_folders(args.dark, args.flat, args.sample)
    text = json.dumps(calibration.to_json_dict(), indent=1)
    write_bytes(out, text.encode("utf-8"), inputs, what="--out")
    for c in calibration.per_iso:
        print(f"calibrate-noise: ISO {c.iso:g}: K {c.K:.4g} DN/e-, Tukey lambda {c.tukey_lambda:+.3f} scale {c.tukey_scale:.3f} DN, "
              f"Gaussian {c.gauss_sigma:.3f} DN, row {c.row_scale:.3f} DN, black {' '.join(f'{b:.1f}' for b in c.black)} "
              f"({c.dark_frames} darks, {c.flat_pairs} flat pairs)")
    print(f"calibrate-noise: wrote {out} (use it as data.noise_camera: {out})")
    if report_dir is not None:
        from rawrestore.physics.noise_report import write_report

        page = write_report(calibration, report_dir)
        print(f"calibrate-noise: report {page}")
    return 0
