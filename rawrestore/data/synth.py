"""The built-in synthetic SID-format dataset: un-processed photographs, crosstalk, ELD noise, DNG files.

`rawrestore synth --out DIR --camera sony|fuji --scenes N --seed S [--size PX]` writes

    DIR/<Sony|Fuji>/long/SSSSS_00_10s.dng          clean long exposure (10 s), one per scene
    DIR/<Sony|Fuji>/short/SSSSS_00_<t>s.dng        dark short exposures, t = 0.1, 0.04, 0.033 s
    DIR/<Sony|Fuji>_{train,val,test}_list.txt      SID-format pair lists
    DIR/truth.json                                 everything that was used, as read back from the files

Each scene is a random view (crop, scale, flip, rotation) of one colour photograph shipped with
scikit-image, turned into a camera RAW by inverting this project's ISP (Brooks et al., CVPR 2019,
"Unprocessing images for learned raw denoising"): inverse sRGB curve, inverse colour matrix,
inverse white balance, CFA sampling. The tone-curve inversion of Brooks et al. is left out on
purpose: `isp.render` applies no tone curve, so rendering a long exposure with its own metadata
gives the photograph back (up to exposure, crosstalk, clipping and 14-bit rounding).

Colour. Each scene gets its own camera: cam_xyz is the base camera's matrix (Sony A7S II or Fuji
X-T2, Adobe's published coefficients as LibRaw ships them) with every entry scaled by a random
factor in [0.92, 1.08]; cam_to_srgb and the daylight multipliers follow from it as LibRaw derives
them (rows of cam_to_srgb sum to 1). As-shot white balance is random, r in [1.6, 2.6], b in
[1.3, 2.2]. Un-processing uses the matrix and gains AS READ BACK from a DNG (rationals), so
the files and truth.json agree exactly.

Sensor. The clean camera-RGB mosaic is scaled so that its 99.5th percentile lands at a random
level in [0.55, 0.9] of the range (the long exposure is well exposed; a few highlights clip),
and a known crosstalk kernel K (`--crosstalk`, default "uniform(0.02)", recorded in truth.json)
acts on the short exposures only. This is the model the crosstalk data-consistency loss and
`calibrate-crosstalk` assume, `align(A) ~ K * B`: the long exposure stands for the clean,
crosstalk-free RAW the network should predict. The long exposure is the clean mosaic, clipped to
[0, 1] and rounded to DN (no noise). A short exposure of t seconds sees K applied to the
unclipped clean mosaic, divided by the physical
ratio 10 / t (100, 250, 303.03; SID's nominal ratios, capped at 300, are 100 / 250 / 300), plus
ELD noise (`rawrestore.physics.noise`): parameters sampled per short frame from the calibration
of `--noise-camera` (default SonyA7S2, also used for Fuji, which has no ELD calibration),
quantisation by rounding to integer DN (the model's quant_step 1 DN), clipped to [0, white].

Content. Besides scikit-image's colour photographs, training scenes use its grey photographs and
textures (camera, brick, grass, gravel), each given a random two-colour (duotone) tint per scene,
and procedural "dead leaves" images (occluding discs with a power-law size distribution, random
colours and shading: the scale-invariant statistics of natural images, Lee, Mumford & Huang
2001; used to train restoration networks by Achddou et al. 2021). Five photographs alone teach a
small network their own brightness and colours; the varied content is what lets the demo model
generalise to unseen photographs.

Splits. Scene ids start with the split digit (0 train, 1 test, 2 val). The photographs are split
too, so no test or validation scene shares a photograph, let alone a crop, with training:
train = astronaut, coffee, rocket, retina, hubble_deep_field, camera, brick, grass, gravel and
dead leaves; val = immunohistochemistry; test = chelsea, motorcycle (left view of stereo_motorcycle). Of N scenes, round(N/5) are test and
round(N/10) val (at least one each for N >= 3), the rest train. Many scenes per photograph come
from different random views. Generation is deterministic for a given (camera, scenes, seed,
size, crosstalk, noise camera) on one machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import isp
from isp.meta import CameraMeta
from isp.safeio import write_bytes
from rawrestore.errors import InputError
from rawrestore.folders import check_folder, make_folders, remove_empty
from rawrestore.memory import available_memory
from rawrestore.physics.align import exposure_ratio
from rawrestore.physics.crosstalk import apply_crosstalk, build_kernel
from rawrestore.physics.noise import DEFAULT_CAMERA, READ_NOISE_KINDS, NoiseParams, add_noise, sample_noise_params

LONG_EXPOSURE_S = 10.0
SHORT_EXPOSURES_S: tuple[float, ...] = (0.1, 0.04, 0.033)
SPLIT_DIGIT: dict[str, int] = {"train": 0, "test": 1, "val": 2}
SPLITS: tuple[str, ...] = ("train", "val", "test")
PHOTOS_BY_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "rocket", "retina", "hubble_deep_field",
              "camera", "brick", "grass", "gravel", "dead_leaves"),
    "val": ("immunohistochemistry",),
    "test": ("chelsea", "motorcycle"),
}
GREY_PHOTOS = frozenset({"camera", "brick", "grass", "gravel"})  # tinted per scene (duotone)
DEAD_LEAVES = "dead_leaves"  # procedural content, drawn per scene
TRUTH_NAME = "truth.json"
TRUTH_FORMAT = 2  # 2: dead leaves and tinted grey sources in training (1: five colour photographs only)
DEFAULT_CROSSTALK = "uniform(0.02)"
EXPOSURE_TARGET = (0.55, 0.9)  # 99.5th percentile of the long exposure, fraction of the range
MATRIX_JITTER = 0.08  # relative perturbation of each cam_xyz entry per scene
WB_RED = (1.6, 2.6)
WB_BLUE = (1.3, 2.2)
MIN_SIZE = 24  # LibRaw reads no RAW under 22 px a side; 24 is a multiple of both CFA periods
BYTES_PER_PIXEL = 400  # peak memory of one scene per RAW pixel (measured about 250: float64 views, 2x dead leaves)

# Fujifilm X-T2 X-Trans pattern (0=R, 1=G, 2=B) as LibRaw reports it for SID's visible area:
# R at (0,0), (0,4), (3,1), (3,3) and B at (0,1), (0,3), (3,0), (3,4), which is what SID's
# 9-channel packing (`isp.cfa.XTRANS_PACK_SITES`) assumes.
XTRANS_XT2: tuple[tuple[int, ...], ...] = (
    (0, 2, 1, 2, 0, 1),
    (1, 1, 0, 1, 1, 2),
    (1, 1, 2, 1, 1, 0),
    (2, 0, 1, 0, 2, 1),
    (1, 1, 2, 1, 1, 0),
    (1, 1, 0, 1, 1, 2),
)
BAYER_RGGB: tuple[tuple[int, ...], ...] = ((0, 1), (1, 2))


@dataclass(frozen=True)
class CameraSpec:
    """A synthetic camera: SID folder name, CFA, levels (DN), base XYZ->camera matrix, default size (px)."""

    folder: str
    make: str
    model: str
    cfa: tuple[tuple[int, ...], ...]
    black_level: float
    white_level: float
    cam_xyz: tuple[float, ...]  # 3x3 row-major, Adobe DNG ColorMatrix (XYZ -> camera), x 1e-4
    default_size: int
    iso: int = 200
    fnumber: float = 8.0

    @property
    def period(self) -> int:
        """CFA period: 2 (Bayer) or 6 (X-Trans)."""
        return len(self.cfa)


# make/model deliberately unknown to LibRaw, so it takes levels and matrices from the DNG tags.
CAMERA_SPECS: dict[str, CameraSpec] = {
    "sony": CameraSpec(
        folder="Sony", make="rawrestore", model="Synthetic Sony A7S II", cfa=BAYER_RGGB,
        black_level=512.0, white_level=16383.0,
        cam_xyz=(5838, -1430, -246, -3497, 11477, 2297, -748, 1885, 5778), default_size=512,
    ),
    "fuji": CameraSpec(
        folder="Fuji", make="rawrestore", model="Synthetic Fuji X-T2", cfa=XTRANS_XT2,
        black_level=1024.0, white_level=16383.0,
        cam_xyz=(11434, -4948, -1210, -3746, 12042, 1903, -666, 1479, 5235), default_size=516,
    ),
}

FileHook = Callable[[str, np.ndarray, CameraMeta], None]


def exposure_label(seconds: float) -> str:
    """SID's exposure spelling in file names: 10 -> '10', 0.1 -> '0.1', 0.033 -> '0.033'."""
    return f"{seconds:g}"


def split_counts(scenes: int) -> dict[str, int]:
    """Scenes per split for N scenes: test round(N/5), val round(N/10), at least 1 each when N >= 3."""
    if scenes < 1:
        raise InputError(f"--scenes must be >= 1, got {scenes}")
    test = max(1, round(scenes / 5)) if scenes >= 2 else 0
    val = max(1, round(scenes / 10)) if scenes >= 3 else 0
    return {"train": scenes - test - val, "val": val, "test": test}


def scene_ids(scenes: int) -> list[tuple[str, int]]:
    """(split, scene id) of every scene, train first: ids 00001.., 20001.. (val), 10001.. (test)."""
    out = []
    for split, count in split_counts(scenes).items():
        out.extend((split, SPLIT_DIGIT[split] * 10000 + k + 1) for k in range(count))
    return out


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One of scikit-image's colour photographs as float64 sRGB in [0, 1]. -> (H,W,3)."""
    from skimage import data

    if name == "motorcycle":
        image = data.stereo_motorcycle()[0]
    elif name in GREY_PHOTOS:
        image = np.repeat(np.asarray(getattr(data, name)())[..., None], 3, axis=2)
    elif name in {n for names in PHOTOS_BY_SPLIT.values() for n in names} - {DEAD_LEAVES}:
        image = getattr(data, name)()
    else:
        raise InputError(f"unknown photograph {name!r}; use one of {sorted(n for v in PHOTOS_BY_SPLIT.values() for n in v)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise InputError(f"scikit-image photograph {name!r} is not a colour image (shape {image.shape})")
    return image[..., :3].astype(np.float64) / 255.0


def random_view(photo: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Random square view of a photograph. photo (H,W,3) in [0,1] -> (S,S,3), info (source box, scale, rot90, flip).

    Zoom (output px per source px) is log-uniform in [max(fit, 0.5), 1.3 max(fit, 1)], where
    `fit` just covers the crop with the shorter side; then a random quarter turn and mirror.
    """
    from skimage.transform import resize

    height, width = photo.shape[:2]
    fit = size / min(height, width)  # scale at which the shorter side just covers the crop
    low, high = max(fit, 0.5), max(fit, 1.0) * 1.3
    scale = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    side = min(size / scale, height, width)  # source pixels covered by the crop
    top = float(rng.uniform(0, height - side))
    left = float(rng.uniform(0, width - side))
    y0, x0 = int(top), int(left)
    y1, x1 = min(height, int(math.ceil(top + side))), min(width, int(math.ceil(left + side)))
    view = resize(photo[y0:y1, x0:x1], (size, size), order=1, anti_aliasing=side > size, mode="reflect")
    rotations = int(rng.integers(4))
    flip = bool(rng.integers(2))
    view = np.rot90(view, rotations)
    if flip:
        view = view[:, ::-1]
    info = {"box": [y0, x0, y1 - y0, x1 - x0], "scale": size / side, "rot90": rotations, "flip": flip}
    return np.clip(np.ascontiguousarray(view), 0.0, 1.0), info


def duotone(grey: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Tint a grey view with two random colours. grey (S,S,3) equal channels in [0,1] -> (S,S,3), info.

    Black maps to a dark colour, white to a light one, linearly in between (sRGB values).
    """
    dark = rng.uniform(0.0, 0.25, 3)
    light = rng.uniform(0.55, 1.0, 3)
    level = grey[..., :1]
    return np.clip(dark + (light - dark) * level, 0.0, 1.0), {"duotone": [dark.tolist(), light.tolist()]}


def dead_leaves(size: int, rng: np.random.Generator, max_leaves: int = 40000, supersample: int = 2) -> tuple[np.ndarray, dict[str, Any]]:
    """A dead-leaves image. -> (S,S,3) sRGB in [0,1], info.

    Discs fall one after another and each shows only where no earlier one lies (front to back,
    until the frame is covered or `max_leaves` have fallen; a last uniform colour fills any
    gap). Radii have density proportional to r^-3 between 1.5 px and a quarter of the side,
    centres are uniform, colours random (partly desaturated) with a random linear shading across
    each disc. Drawn `supersample` times larger and box-averaged down, so edges are
    anti-aliased as optics would leave them.
    """
    side = size * supersample
    image = np.zeros((side, side, 3))
    covered = np.zeros((side, side), dtype=bool)
    r_min, r_max = 1.5 * supersample, side / 4.0
    fallen = 0
    while fallen < max_leaves and not covered.all():
        count = 2000
        u = rng.uniform(0.0, 1.0, count)
        radii = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5  # inverse CDF of p(r) ~ r^-3
        centres = rng.uniform(0.0, side, (count, 2))
        grey = rng.uniform(0.0, 1.0, (count, 1))
        colours = grey + rng.uniform(0.2, 1.0, (count, 1)) * (rng.uniform(0.0, 1.0, (count, 3)) - grey)
        colours = colours ** 1.6  # darker on average, as scenes are
        shading = rng.uniform(-0.4, 0.4, (count, 2))
        for radius, (cy, cx), colour, (gy, gx) in zip(radii, centres, colours, shading):
            y0, y1 = max(0, int(cy - radius)), min(side, int(cy + radius) + 1)
            x0, x1 = max(0, int(cx - radius)), min(side, int(cx + radius) + 1)
            dy = (np.arange(y0, y1) - cy)[:, None] / radius
            dx = (np.arange(x0, x1) - cx)[None, :] / radius
            free = (dy * dy + dx * dx <= 1.0) & ~covered[y0:y1, x0:x1]
            if free.any():
                shade = np.clip(1.0 + gy * dy + gx * dx, 0.0, 2.0)[..., None]
                patch = image[y0:y1, x0:x1]
                patch[free] = np.clip(colour * shade, 0.0, 1.0)[free]
                covered[y0:y1, x0:x1] |= free
        fallen += count
    image[~covered] = rng.uniform(0.0, 1.0, 3)
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return image, {"dead_leaves": {"leaves": fallen, "supersample": supersample}}


def scene_view(name: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """The sRGB content of one scene. -> (S,S,3) in [0,1], info (how it was made)."""
    if name == DEAD_LEAVES:
        return dead_leaves(size, rng)
    view, info = random_view(load_photo(name), size, rng)
    if name in GREY_PHOTOS:
        view, tint = duotone(view, rng)
        info.update(tint)
    return view, info


def random_colour(spec: CameraSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plausible per-scene camera. -> cam_to_srgb (3,3) rows sum 1, daylight (3,), as-shot wb (3,), g = 1."""
    from isp.io import cam_to_srgb_from_xyz

    base = np.asarray(spec.cam_xyz, dtype=np.float64).reshape(3, 3) / 10000.0
    cam_xyz = base * (1.0 + rng.uniform(-MATRIX_JITTER, MATRIX_JITTER, (3, 3)))
    cam_to_srgb, daylight = cam_to_srgb_from_xyz(cam_xyz)
    wb = np.array([rng.uniform(*WB_RED), 1.0, rng.uniform(*WB_BLUE)])
    return cam_to_srgb, daylight, wb


def unprocess(srgb: np.ndarray, cam_to_srgb, wb_as_shot) -> torch.Tensor:
    """Invert the ISP's colour steps. srgb (H,W,3) in [0,1] -> (1,3,H,W) float64 linear camera RGB >= 0.

    Inverse sRGB curve, inverse colour matrix (rows of its inverse also sum to 1, so grey stays
    grey), inverse white balance (divide by the as-shot gains, g = 1).
    """
    encoded = torch.from_numpy(np.ascontiguousarray(srgb.transpose(2, 0, 1))).unsqueeze(0).to(torch.float64)
    linear = isp.ops.inverse_curve(encoded.clamp(0.0, 1.0), "srgb")
    srgb_to_cam = torch.linalg.inv(torch.as_tensor(cam_to_srgb, dtype=torch.float64))
    camera = isp.ops.apply_matrix(linear, srgb_to_cam).clamp_min(0.0)
    gains = torch.as_tensor(wb_as_shot, dtype=torch.float64)
    return camera / gains.view(1, 3, 1, 1)


def long_frame(signal: torch.Tensor, black_level: float, white_level: float) -> np.ndarray:
    """Clean long exposure. signal (1,1,H,W) normalised -> (H,W) uint16 DN, clipped to [0,1] and rounded."""
    span = white_level - black_level
    dn = torch.round(signal.clamp(0.0, 1.0) * span) + black_level
    return dn[0, 0].numpy().astype(np.uint16)


def dark_frame(
    signal: torch.Tensor,
    signal_ratio: float,
    params: NoiseParams,
    black_level: float,
    white_level: float,
    cfa,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Noisy short exposure. signal (1,1,H,W) normalised long-exposure signal -> (H,W) uint16 DN.

    Mean `signal * (white - black) / signal_ratio + colour bias` DN above black, ELD noise of
    `params`; its quantisation is the rounding to integer DN (so the variance is
    `params.variance(x)` with quant_step 1), then clipped to the sensor range [0, white].
    """
    span = white_level - black_level
    # float32 resolves 1e-3 DN at the white level: ample before rounding to integers, twice as fast
    clean_dn = signal.clamp_min(0.0).to(torch.float32) * span / signal_ratio
    noisy = add_noise(clean_dn, replace(params, quant_step=0.0), cfa, generator)
    dn = torch.round(noisy + black_level).clamp(0.0, white_level)
    return dn[0, 0].numpy().astype(np.uint16)


def _camera_meta(spec: CameraSpec, size: int, cam_to_srgb, daylight, wb, exposure: float) -> CameraMeta:
    period = spec.period
    return CameraMeta(
        make=spec.make, model=spec.model, width=size, height=size, cfa=[list(r) for r in spec.cfa],
        black_level=[[spec.black_level] * period for _ in range(period)], white_level=spec.white_level,
        wb_as_shot=[float(v) for v in wb], wb_daylight=[float(v) for v in daylight],
        cam_to_srgb=np.asarray(cam_to_srgb, dtype=np.float64).tolist(), exposure_time=exposure,
        iso=float(spec.iso), fnumber=spec.fnumber,
    )


def _as_read_back(meta: CameraMeta, scratch: Path) -> CameraMeta:
    """The metadata a DNG with `meta` reads back as (matrix and gains pass through rationals and float32)."""
    side = MIN_SIZE
    tiny = replace(meta, width=side, height=side)
    probe = isp.write_dng(scratch / "probe.dng", np.full((side, side), int(meta.white_level) // 2, np.uint16), tiny)
    return replace(probe, width=meta.width, height=meta.height)


@dataclass
class Scene:
    """One synthesised scene, in memory: normalised clean signal (1,1,H,W) and its metadata as read back."""

    split: str
    scene: int
    photo: str
    view: dict[str, Any]
    exposure_scale: float
    latent: torch.Tensor  # clean, crosstalk-free: what the long exposure records
    signal: torch.Tensor  # K * latent: what the short exposures see
    meta: CameraMeta


def make_scene(spec: CameraSpec, split: str, scene: int, photo: str, size: int, kernel: torch.Tensor,
               rng: np.random.Generator, scratch: Path) -> Scene:
    """Un-process one random view of `photo` into a normalised mosaic, with and without crosstalk. (1,1,S,S) float64."""
    view, info = scene_view(photo, size, rng)
    cam_to_srgb, daylight, wb = random_colour(spec, rng)
    meta = _as_read_back(_camera_meta(spec, size, cam_to_srgb, daylight, wb, LONG_EXPOSURE_S), scratch)
    camera_rgb = unprocess(view, meta.cam_to_srgb, meta.wb_as_shot)
    mosaic = isp.ops.mosaic(camera_rgb, torch.as_tensor(meta.cfa_array))
    level = float(torch.quantile(mosaic.flatten()[:: max(1, mosaic.numel() // 65536)], 0.995))
    target = rng.uniform(*EXPOSURE_TARGET)
    exposure_scale = float(np.clip(target / max(level, 1e-4), 0.25, 8.0))
    latent = mosaic * exposure_scale
    signal = apply_crosstalk(latent, kernel.to(torch.float64))
    return Scene(split, scene, photo, info, exposure_scale, latent, signal, meta)


def _relative(camera_folder: str, kind: str, scene: int, burst: int, exposure: float) -> str:
    return f"{camera_folder}/{kind}/{scene:05d}_{burst:02d}_{exposure_label(exposure)}s.dng"


def _planned(spec: CameraSpec, scenes: int) -> list[str]:
    """Every path (relative to --out) a run writes, truth.json last."""
    files = []
    for _, scene in scene_ids(scenes):
        files.append(_relative(spec.folder, "long", scene, 0, LONG_EXPOSURE_S))
        files.extend(_relative(spec.folder, "short", scene, 0, exposure) for exposure in SHORT_EXPOSURES_S)
    return files + [_list_name(spec, split) for split in SPLITS] + [TRUTH_NAME]


def _list_name(spec: CameraSpec, split: str) -> str:
    return f"{spec.folder}_{split}_list.txt"


def _owned(out: Path) -> set[str]:
    """Paths (relative to `out`) a previous synth wrote there, as its truth.json records them; empty without one.

    Newer runs name the list files they wrote under "lists"; older ones did not, so a list file
    counts as theirs only when every path on it is one of the files truth.json records.
    """
    from rawrestore.data.manifest import resolve_inside

    truth_path = out / TRUTH_NAME
    if not truth_path.is_file() or truth_path.is_symlink():
        return set()
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        files = {str(rel) for rel in truth["files"]}
        camera = CAMERA_SPECS[truth["camera"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"--out {out}: {TRUTH_NAME} is not one synth wrote (unreadable or foreign), so --force "
                         "cannot tell which files are synth's: choose an empty folder") from None
    owned = set()
    for rel in files:
        try:
            resolve_inside(out, rel)  # a hand-edited truth.json cannot point outside --out
        except InputError:
            continue
        owned.add(rel)
    lists = truth.get("lists")
    for split in SPLITS:
        name = _list_name(camera, split)
        if isinstance(lists, list):
            if name in lists:
                owned.add(name)
        elif (out / name).is_file():
            named = {p.removeprefix("./") for line in (out / name).read_text(encoding="utf-8", errors="replace").split("\n")
                     for p in line.split()[:2]}
            if named <= files:
                owned.add(name)
    return owned | {TRUTH_NAME}


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _prepare_out(out: Path, spec: CameraSpec, scenes: int, force: bool) -> list[Path]:
    """Check --out before any work; with --force remove what a previous synth wrote. -> folders created (to undo)."""
    check_folder(out, "--out")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    planned = _planned(spec, scenes)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out {out} is not empty; pass --force to replace the synthetic data in it, or choose an empty folder")
        owned = _owned(out)
        foreign = [rel for rel in planned if (os.path.lexists(out / rel)) and not (rel in owned and _is_file(out / rel))]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise InputError(f"--out {out} holds {foreign[0]}{more} that synth did not write (not in its {TRUTH_NAME}); "
                             "--force replaces only synth's own files: choose an empty folder")
        # remove only what the previous run recorded; truth.json last, so an interrupted removal can be redone
        for rel in sorted(owned - {TRUTH_NAME}) + [TRUTH_NAME]:
            if _is_file(out / rel):
                (out / rel).unlink()
        remove_empty([out / spec.folder / "long", out / spec.folder / "short", out / spec.folder])
    return make_folders([out / spec.folder / "long", out / spec.folder / "short"], "--out")


def _check_size(camera: str, size: int | None) -> tuple[CameraSpec, int]:
    if camera not in CAMERA_SPECS:
        raise InputError(f"--camera must be one of {sorted(CAMERA_SPECS)}, got {camera!r}")
    spec = CAMERA_SPECS[camera]
    size = spec.default_size if size is None else int(size)
    period = spec.period
    if size < MIN_SIZE or size % period:
        kind = "X-Trans 6x6" if period == 6 else "Bayer 2x2"
        suggestion = max(MIN_SIZE, -(-size // period) * period)
        raise InputError(f"--size {size} must be a multiple of the {kind} CFA period and >= {MIN_SIZE}; try --size {suggestion}")
    available = available_memory()
    needed = BYTES_PER_PIXEL * size * size
    if available is not None and needed > available:
        largest = int(math.sqrt(available / BYTES_PER_PIXEL)) // period * period
        raise InputError(f"--size {size} needs about {needed / 2**30:.1f} GiB of memory per scene, {available / 2**30:.1f} GiB "
                         f"is available; use --size {max(MIN_SIZE, largest)} or less")
    return spec, size


def generate(
    out: str | os.PathLike,
    camera: str = "sony",
    scenes: int = 24,
    seed: int = 0,
    size: int | None = None,
    *,
    force: bool = False,
    crosstalk: str = DEFAULT_CROSSTALK,
    noise_camera: str = DEFAULT_CAMERA,
    read_noise: str = "tukey",
    on_file: FileHook | None = None,
    progress: bool = True,
) -> Path:
    """Write the synthetic SID-format dataset into `out` (see the module docstring). -> `out` as a Path.

    `size` is the side of every square frame in RAW pixels (default 512 Sony, 516 Fuji; a multiple
    of the CFA period). `on_file(relative_path, mosaic uint16 (H,W), meta_as_read)` is called for
    every file written (tests keep the arrays this way). Refuses a non-empty `out` unless `force`;
    `force` removes only the files a previous run recorded in truth.json, and refuses when anything
    else sits where this run would write. A failed run removes what it wrote and the folders it made.
    """
    spec, size = _check_size(camera, size)
    if read_noise not in READ_NOISE_KINDS:
        raise InputError(f"--read-noise must be one of {READ_NOISE_KINDS}, got {read_noise!r}")
    kernel = build_kernel(crosstalk, spec.period)
    sample_noise_params(noise_camera)  # fail on an unknown noise camera before writing anything
    out = Path(out)
    created = _prepare_out(out, spec, scenes, force)
    written: list[Path] = []
    try:
        _write_dataset(out, spec, camera, scenes, seed, size, kernel, crosstalk, noise_camera, read_noise, on_file,
                       progress, written)
    except BaseException:  # a failed or interrupted run leaves nothing of its own behind
        for path in written:
            if _is_file(path):
                path.unlink()
        remove_empty(created)
        raise
    return out


def _write_dataset(out: Path, spec: CameraSpec, camera: str, scenes: int, seed: int, size: int, kernel: torch.Tensor,
                   crosstalk: str, noise_camera: str, read_noise: str, on_file: FileHook | None, progress: bool,
                   written: list[Path]) -> None:
    """Write every file of the dataset into the prepared `out`; each path goes into `written` before it is written."""
    from tqdm import tqdm

    cfa = torch.as_tensor(spec.cfa)
    lists: dict[str, list[str]] = {split: [] for split in SPLITS}
    truth_scenes: dict[str, Any] = {}
    truth_files: dict[str, Any] = {}
    photo_orders = {split: np.random.default_rng([seed, 7, SPLIT_DIGIT[split]]).permutation(len(photos))
                    for split, photos in PHOTOS_BY_SPLIT.items()}
    plan = scene_ids(scenes)
    with tempfile.TemporaryDirectory(prefix=".synth-", dir=out) as scratch_dir:
        scratch = Path(scratch_dir)
        for split, scene in tqdm(plan, desc=f"synth {camera}", unit="scene", disable=None if progress else True, file=sys.stderr):
            rng = np.random.default_rng([seed, scene])
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            photos = PHOTOS_BY_SPLIT[split]
            number = scene % 10000 - 1
            photo = photos[photo_orders[split][number % len(photos)]]
            made = make_scene(spec, split, scene, photo, size, kernel, rng, scratch)

            long_rel = _relative(spec.folder, "long", scene, 0, LONG_EXPOSURE_S)
            long_mosaic = long_frame(made.latent, spec.black_level, spec.white_level)
            written.append(out / long_rel)
            long_meta = isp.write_dng(out / long_rel, long_mosaic, replace(made.meta, exposure_time=LONG_EXPOSURE_S))
            truth_files[long_rel] = {"meta": long_meta.to_dict()}
            if on_file is not None:
                on_file(long_rel, long_mosaic, long_meta)

            shorts = []
            for exposure in SHORT_EXPOSURES_S:
                short_rel = _relative(spec.folder, "short", scene, 0, exposure)
                params = sample_noise_params(noise_camera, generator, read_noise=read_noise)
                signal_ratio = LONG_EXPOSURE_S / exposure
                short_mosaic = dark_frame(made.signal, signal_ratio, params, spec.black_level, spec.white_level, cfa, generator)
                written.append(out / short_rel)
                short_meta = isp.write_dng(out / short_rel, short_mosaic, replace(made.meta, exposure_time=exposure))
                ratio = exposure_ratio(exposure, LONG_EXPOSURE_S)
                truth_files[short_rel] = {
                    "meta": short_meta.to_dict(), "noise": params.to_dict(), "noise_camera": noise_camera,
                    "ratio": ratio, "signal_ratio": signal_ratio, "long": long_rel,
                }
                shorts.append(short_rel)
                lists[split].append(f"./{short_rel} ./{long_rel} ISO{spec.iso} F{spec.fnumber:g}")
                if on_file is not None:
                    on_file(short_rel, short_mosaic, short_meta)
            truth_scenes[f"{scene:05d}"] = {
                "split": split, "photo": photo, "view": made.view, "exposure_scale": made.exposure_scale,
                "wb_as_shot": made.meta.wb_as_shot, "wb_daylight": made.meta.wb_daylight,
                "cam_to_srgb": made.meta.cam_to_srgb, "long": long_rel, "shorts": shorts,
            }

    for split in SPLITS:
        written.append(out / _list_name(spec, split))
        write_bytes(out / _list_name(spec, split), "".join(line + "\n" for line in lists[split]).encode("utf-8"), what="--out")
    truth = {
        "format": TRUTH_FORMAT,
        "camera": camera,
        "seed": seed,
        "size": size,
        "scenes": scenes,
        "cfa": [list(r) for r in spec.cfa],
        "black_level": spec.black_level,
        "white_level": spec.white_level,
        "long_exposure_s": LONG_EXPOSURE_S,
        "short_exposures_s": list(SHORT_EXPOSURES_S),
        "photos_by_split": {k: list(v) for k, v in PHOTOS_BY_SPLIT.items()},
        "crosstalk": {"spec": crosstalk, "form": "gather (P,P,3,3), rawrestore.physics.crosstalk", "kernel": kernel.tolist()},
        "noise": {"camera": noise_camera, "read_noise": read_noise,
                  "quantisation": "rounding to integer DN (quant_step 1 DN in the model)"},
        "scene": truth_scenes,
        "files": truth_files,
        "lists": [_list_name(spec, split) for split in SPLITS],
    }
    # Written last: its presence marks a complete dataset (and what a later --force may remove).
    written.append(out / TRUTH_NAME)
    write_bytes(out / TRUTH_NAME, json.dumps(truth, indent=1).encode("utf-8"), what="--out")


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore synth`."""
    parser.description = (
        "Generate a small SID-format dataset (DNG long/short pairs, list files, truth.json) by un-processing "
        "scikit-image's colour photographs and adding crosstalk and ELD sensor noise."
    )
    parser.add_argument("--out", required=True, help="folder to write (must be empty unless --force)")
    parser.add_argument("--camera", choices=sorted(CAMERA_SPECS), default="sony", help="Sony-like Bayer or Fuji-like X-Trans")
    parser.add_argument("--scenes", type=int, default=24, help="number of scenes (3 short exposures each); default 24")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    parser.add_argument("--size", type=int, default=None, help="frame side in RAW pixels (default 512 Sony, 516 Fuji)")
    parser.add_argument("--crosstalk", default=DEFAULT_CROSSTALK, help="crosstalk kernel: identity, uniform(<leak>) or a .npy path")
    parser.add_argument("--noise-camera", default=DEFAULT_CAMERA, help="ELD noise calibration to sample from (default SonyA7S2)")
    parser.add_argument("--read-noise", choices=READ_NOISE_KINDS, default="tukey", help="read-noise distribution")
    parser.add_argument("--force", action="store_true", help="replace a previous synthetic dataset in --out")
    parser.add_argument("--calibration-shoot", action="store_true",
                        help="write dark and flat frames of a simulated camera for calibrate-noise instead (rawrestore.data.shoot)")
    parser.add_argument("--isos", default="800,1600,3200,6400", help="with --calibration-shoot: the ISOs to shoot")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset; prints where it went and the pair counts."""
    if args.calibration_shoot:
        from rawrestore.data.shoot import run_shoot

        return run_shoot(args)
    out = generate(args.out, args.camera, args.scenes, args.seed, args.size, force=args.force,
                   crosstalk=args.crosstalk, noise_camera=args.noise_camera, read_noise=args.read_noise)
    spec = CAMERA_SPECS[args.camera]
    counts = {split: len((out / f"{spec.folder}_{split}_list.txt").read_text(encoding="utf-8").splitlines()) for split in SPLITS}
    print(f"synth: {args.scenes} {args.camera} scenes -> {out} "
          f"(pairs: train {counts['train']}, val {counts['val']}, test {counts['test']}; truth in {out / TRUTH_NAME})")
    return 0


__all__ = [
    "CAMERA_SPECS", "CameraSpec", "TRUTH_FORMAT", "LONG_EXPOSURE_S", "SHORT_EXPOSURES_S", "PHOTOS_BY_SPLIT", "XTRANS_XT2",
    "split_counts", "scene_ids", "load_photo", "random_view", "duotone", "dead_leaves", "scene_view", "random_colour", "unprocess", "long_frame",
    "dark_frame", "make_scene", "generate", "configure", "run",
]
