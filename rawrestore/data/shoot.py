"""A simulated calibration shoot: dark and flat frames of a camera whose noise is known.

    rawrestore synth --calibration-shoot --out DIR [--camera sony|fuji] [--noise-camera NAME|CAMERA.json]
                     [--read-noise tukey|gaussian] [--isos 800,1600,3200,6400] [--size PX] [--seed S]

writes what a user photographs before `rawrestore calibrate-noise`:

    DIR/dark/iso<N>/dark_<k>.dng              DARK_FRAMES lens-capped frames per ISO
    DIR/flat/iso<N>/flat_<level>_<a|b>.dng    a pair of flats at each of FLAT_LEVELS per ISO
    DIR/true_camera.json                      the simulated camera in ELD's layout (data.noise_camera)
    DIR/shoot_truth.json                      the noise parameters of every ISO (NoiseParams fields)

The camera. ISOs are spread log-uniformly over the gain range [Kmin, Kmax] of `noise_camera`
(lowest ISO -> Kmin, highest -> Kmax, K proportional to ISO in between as on a real sensor);
at each K the read (Tukey or Gaussian), and row scales are the profile's fitted lines without
their scatter, the Tukey lambda is the median of G_shape and the colour bias the first row of
color_bias. `true_camera.json` holds exactly these lines (sigma 0) over that gain range, so a
calibration of the shoot can be compared with it, and training can use either.

The frames. Flats are an even field at a fraction of the range (FLAT_LEVELS, of the green
channel; red and blue respond FLAT_COLOUR times as much) with a mild vignette (FLAT_VIGNETTE at
the corners), noised with the project's ELD model (`rawrestore.data.synth.dark_frame`:
shot, read, row noise and colour bias, rounded to integer DN and clipped). Darks are the same
with no light. The ISO goes into the folder name (LibRaw reads no ISO from pidng's DNGs) and the
DNG's EXIF. Deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import isp
from isp.safeio import write_bytes
from rawrestore.errors import InputError
from rawrestore.physics.noise import DEFAULT_PROFILE, NoiseParams, load_noise_fit, tukey_lambda_variance

__all__ = ["DARK_FRAMES", "FLAT_LEVELS", "DEFAULT_ISOS", "GAUSSIAN_LAMBDA", "shoot_params", "true_camera", "write_calibration_shoot",
           "parse_isos", "run_shoot"]

DEFAULT_ISOS: tuple[float, ...] = (800.0, 1600.0, 3200.0, 6400.0)
DARK_FRAMES = 8
FLAT_LEVELS: tuple[float, ...] = (0.03, 0.12, 0.4)  # of the range (white - black), green channel
FLAT_COLOUR = (0.55, 1.0, 0.75)  # R, G, B response to the flat light, relative to green
FLAT_VIGNETTE = 0.85  # relative illumination at the corners
FLAT_EXPOSURE_S = 0.01  # exposure of the lowest flat level; the others scale with the level
GAUSSIAN_LAMBDA = 0.1349  # the Tukey-lambda shape closest to the normal distribution (Joiner & Rosenblatt 1971)
SHOOT_TRUTH = "shoot_truth.json"
TRUE_CAMERA = "true_camera.json"


def _gains(camera: str, isos: Sequence[float]) -> list[float]:
    fit = load_noise_fit(camera)
    low, high = math.log(min(isos)), math.log(max(isos))
    span = high - low
    return [math.exp(math.log(fit.k_min) + (math.log(fit.k_max) - math.log(fit.k_min)) * ((math.log(i) - low) / span if span else 0.0))
            for i in isos]


def shoot_params(camera: str, isos: Sequence[float], read_noise: str = "tukey") -> dict[float, NoiseParams]:
    """Noise of the simulated camera at each ISO (see the module docstring). -> {iso: NoiseParams}, DN units."""
    fit = load_noise_fit(camera)
    profile = fit.profiles[DEFAULT_PROFILE]
    lam = float(np.median(fit.tukey_lambdas))
    params = {}
    for iso, gain in zip(isos, _gains(camera, isos)):
        line = profile.tukey_scale if read_noise == "tukey" else profile.gaussian_scale
        params[float(iso)] = NoiseParams(
            system_gain=gain, read_scale=math.exp(line.slope * math.log(gain) + line.bias),
            row_scale=math.exp(profile.row_scale.slope * math.log(gain) + profile.row_scale.bias),
            read_noise=read_noise, tukey_lambda=lam, color_bias=fit.color_biases[0],
        )
    return params


def true_camera(camera: str, isos: Sequence[float], read_noise: str = "tukey") -> dict[str, Any]:
    """The simulated camera in ELD's layout: the source profile's lines with sigma 0 over the shoot's gain range.

    With Gaussian read noise, G_shape is GAUSSIAN_LAMBDA and G_scale the Gaussian line shifted so
    the Tukey variance equals the Gaussian one: training draws Tukey read noise, and this is the
    Tukey-lambda distribution closest to the normal.
    """
    fit = load_noise_fit(camera)
    profile = fit.profiles[DEFAULT_PROFILE]
    gains = _gains(camera, isos)

    def line(value: Any, shift: float = 0.0) -> dict[str, float]:
        return {"slope": value.slope, "bias": value.bias + shift, "sigma": 0.0}

    lam, tukey = float(np.median(fit.tukey_lambdas)), line(profile.tukey_scale)
    if read_noise == "gaussian":
        lam = GAUSSIAN_LAMBDA
        tukey = line(profile.gaussian_scale, -0.5 * math.log(tukey_lambda_variance(GAUSSIAN_LAMBDA)))
    return {
        "Kmin": min(gains), "Kmax": max(gains), "G_shape": [lam],
        "Profile-1": {"G_scale": tukey, "g_scale": line(profile.gaussian_scale), "R_scale": line(profile.row_scale)},
        "color_bias": [list(fit.color_biases[0])],
        "source": f"rawrestore synth --calibration-shoot from {camera}",
    }


def _flat_signal(cfa: np.ndarray, size: int, level: float) -> torch.Tensor:
    """Even flat field with a mild vignette. -> (1,1,S,S) float64, normalised (fraction of the range)."""
    axis = np.linspace(-1.0, 1.0, size)
    radius2 = (axis[:, None] ** 2 + axis[None, :] ** 2) / 2.0
    shading = 1.0 - (1.0 - FLAT_VIGNETTE) * radius2
    colour = np.asarray(FLAT_COLOUR)[np.tile(cfa, (size // cfa.shape[0], size // cfa.shape[0]))]
    return torch.from_numpy(level * shading * colour).view(1, 1, size, size)


def parse_isos(text: str) -> list[float]:
    """'800,1600' -> [800.0, 1600.0]; InputError naming the bad value."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--isos must be comma-separated numbers such as 800,1600,3200,6400, got {part!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"--isos values must be positive, got {part!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise InputError(f"--isos lists an ISO twice: {text}")
    return sorted(values)


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out {out} is not empty; pass --force to replace a previous shoot in it, or choose an empty folder")
        for name in ("dark", "flat"):  # only what a previous shoot wrote
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in (SHOOT_TRUTH, TRUE_CAMERA):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_calibration_shoot(
    out: str | os.PathLike,
    camera: str = "sony",
    noise_camera: str = "SonyA7S2",
    isos: Sequence[float] = DEFAULT_ISOS,
    size: int | None = None,
    read_noise: str = "tukey",
    seed: int = 0,
    darks: int = DARK_FRAMES,
    flat_levels: Sequence[float] = FLAT_LEVELS,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the shoot into `out` (see the module docstring). -> `out`. Refuses a non-empty `out` unless `force`."""
    from tqdm import tqdm

    from rawrestore.data.synth import CAMERA_SPECS, _camera_meta, _check_size, dark_frame, random_colour

    spec, size = _check_size(camera, size)
    if darks < 1:
        raise InputError(f"darks must be >= 1, got {darks}")
    params = shoot_params(noise_camera, isos, read_noise)
    out = Path(out)
    _prepare(out, force)
    cfa = np.asarray(spec.cfa, dtype=np.int64)
    cam_to_srgb, daylight, wb = random_colour(CAMERA_SPECS[camera], np.random.default_rng([seed, 11]))
    generator = torch.Generator().manual_seed(seed)
    jobs = [(iso, "dark", None, k) for iso in params for k in range(darks)]
    jobs += [(iso, "flat", level, side) for iso in params for level in flat_levels for side in "ab"]
    for iso, kind, level, index in tqdm(jobs, desc="calibration shoot", unit="frame", disable=None if progress else True,
                                        file=sys.stderr):
        exposure = 1.0 if level is None else FLAT_EXPOSURE_S * level / min(flat_levels)
        meta = replace(_camera_meta(spec, size, cam_to_srgb, daylight, wb, exposure), iso=iso)
        signal = torch.zeros(1, 1, size, size, dtype=torch.float64) if level is None else _flat_signal(cfa, size, level)
        mosaic = dark_frame(signal, 1.0, params[iso], spec.black_level, spec.white_level, cfa, generator)
        name = f"dark_{index:02d}.dng" if level is None else f"flat_{level:g}_{index}.dng"
        isp.write_dng(out / kind / f"iso{iso:g}" / name, mosaic, meta)
    truth = {"camera": camera, "noise_camera": noise_camera, "read_noise": read_noise, "size": size, "seed": seed,
             "black_level": spec.black_level, "white_level": spec.white_level, "flat_levels": list(flat_levels),
             "per_iso": [{"iso": iso, **p.to_dict()} for iso, p in params.items()]}
    write_bytes(out / SHOOT_TRUTH, json.dumps(truth, indent=1).encode("utf-8"))
    write_bytes(out / TRUE_CAMERA, json.dumps(true_camera(noise_camera, isos, read_noise), indent=1).encode("utf-8"))
    return out


def run_shoot(args: argparse.Namespace) -> int:
    """`rawrestore synth --calibration-shoot`: write the shoot, print what to run next."""
    isos = parse_isos(args.isos)
    out = write_calibration_shoot(args.out, args.camera, args.noise_camera, isos, args.size, args.read_noise, args.seed,
                                  force=args.force)
    print(f"synth: calibration shoot of {len(isos)} ISOs ({', '.join(f'{i:g}' for i in isos)}) -> {out}; "
          f"true parameters in {out / TRUE_CAMERA}")
    print(f"next: rawrestore calibrate-noise --dark {out / 'dark'} --flat {out / 'flat'} --out camera.json --report report")
    return 0
