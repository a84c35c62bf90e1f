"""Training from clean RAW files alone: `data.kind: clean_folder`.

`data.root` is a folder of well-exposed RAW files of one camera (anything `isp.read_raw` reads,
found recursively by suffix; no pairs, no lists). Every file is a clean target; the dark input
is synthesised from it with the noise model of `data.noise_camera` (a shipped ELD camera or the
JSON `rawrestore calibrate-noise` writes), at an exposure ratio drawn from
`data.synthetic_ratio` [lo, hi]. So `data.synthetic_noise` must be true and
`data.synthetic_ratio` set.

Splits. The files, sorted by path, are split once: `data.val_share` of them (evenly spaced
through the sorted list, at least one when there are two files or more) are held out; `train`
is the rest, `val` and `test` are the held-out files. Adding files to the folder can move others
between the splits; keep a separate folder for a fixed test set.

Samples are those of `SIDPairDataset` in `synthetic_noise` mode (the same crops, CFA-preserving
augmentation, decode cache, Bayer and X-Trans), built from records whose short and long file are
the same clean file. Training samples carry no `input`: the trainer synthesises it every step,
as for `data.synthetic_noise` on SID data. Held-out samples carry an `input` synthesised here
with a fixed noise seed (from the experiment seed and the sample index) and one of three fixed
ratios, lo, sqrt(lo hi) and hi in turn, so validation and evaluation see the same dark inputs
every time, grouped by ratio.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from rawrestore.data.dataset import SIDPairDataset, synthesize_input
from rawrestore.data.manifest import PairRecord
from rawrestore.errors import ConfigError, DataError, InputError
from rawrestore.physics.noise import load_noise_fit
from rawrestore.physics.noise_calibration import find_raw_files

__all__ = ["KIND", "clean_files", "split_files", "validation_ratios", "HeldOutDark", "build_clean_folder"]

KIND = "clean_folder"
_LONG_EXPOSURE_S = 10.0  # nominal: only the ratio matters, the records' exposures make the ratio
_NOISE_SEED = 0x5EED


def clean_files(root: str | os.PathLike) -> list[Path]:
    """The RAW files under `root`, recursively, sorted; DataError when the folder is missing or holds none."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root {root} is not a folder; point it at a folder of well-exposed RAW files of your camera")
    files = find_raw_files(base)
    if not files:
        raise DataError(f"data.root {root} holds no RAW files (looked for .dng, .arw, .nef, .cr2, .raf, ...); "
                        "point it at a folder of well-exposed RAW files of your camera")
    return files


def split_files(files: list[Path], val_share: float) -> dict[str, list[Path]]:
    """Sorted files -> {'train', 'val', 'test'}: round(share * N) held out, evenly spaced (>= 1 when N >= 2 and share > 0)."""
    count = len(files)
    held = 0 if val_share <= 0 or count < 2 else min(count - 1, max(1, round(val_share * count)))
    picks = {int((k + 0.5) * count / held) for k in range(held)} if held else set()
    held_out = [f for i, f in enumerate(files) if i in picks]
    train = [f for i, f in enumerate(files) if i not in picks]
    return {"train": train, "val": held_out, "test": held_out}


def validation_ratios(ratio_range: list[float]) -> tuple[float, float, float]:
    """The three fixed ratios of held-out samples: lo, the geometric middle (rounded to an integer above 10), hi."""
    low, high = float(ratio_range[0]), float(ratio_range[1])
    middle = math.sqrt(low * high)
    return low, float(round(middle)) if middle >= 10 else middle, high


def _records(files: list[Path], split: str, camera: str, ratio: float) -> list[PairRecord]:
    return [PairRecord(split=split, scene=index, burst=0, short=str(path), long=str(path),
                       short_exposure_s=_LONG_EXPOSURE_S / ratio, long_exposure_s=_LONG_EXPOSURE_S, ratio=ratio,
                       iso=0, fnumber=0.0, camera=camera, misaligned=False)
            for index, path in enumerate(files)]


class HeldOutDark(Dataset):
    """Held-out clean files with a dark `input` synthesised at a fixed seed and ratio per index (see the module docstring)."""

    def __init__(self, clean: SIDPairDataset, ratios: tuple[float, ...], noise_camera: str, clip_aligned: bool,
                 crosstalk: torch.Tensor | None, seed: int):
        self.clean = clean
        self.ratios = ratios
        self.noise_camera = noise_camera
        self.clip_aligned = clip_aligned
        self.crosstalk = crosstalk
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def records(self) -> list[PairRecord]:
        """The held-out files as records (eval selects its subset through them)."""
        return self.clean.records

    @records.setter
    def records(self, records: list[PairRecord]) -> None:
        self.clean.records = records

    def prepare(self, progress: bool = True) -> int:
        """Decode the held-out files into the cache now (see SIDPairDataset.prepare)."""
        return self.clean.prepare(progress)

    def check_pairs(self) -> None:
        self.clean.check_pairs()

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.clean[index]
        ratio = self.ratios[index % len(self.ratios)]
        sample["ratio"] = torch.tensor(ratio, dtype=torch.float32)
        batch = {key: (value[None] if isinstance(value, torch.Tensor) else value) for key, value in sample.items()}
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + _NOISE_SEED + index)
        sample["input"] = synthesize_input(batch, generator=generator, noise_camera=self.noise_camera,
                                           clip=self.clip_aligned, crosstalk=self.crosstalk)[0]
        return sample


def build_clean_folder(cfg_data: Any, split: str, seed: int = 0, prepare: bool = True) -> SIDPairDataset | HeldOutDark:
    """The dataset of one split for `data.kind: clean_folder` (the counterpart of `build_datasets`)."""
    if not cfg_data.synthetic_noise or cfg_data.synthetic_ratio is None:
        raise ConfigError("data.kind clean_folder needs data.synthetic_noise: true and data.synthetic_ratio: [lo, hi] "
                          "(the clean files are the targets; the dark inputs are synthesised)")
    try:
        load_noise_fit(cfg_data.noise_camera)  # a missing or malformed calibration fails here, not at the first step
    except InputError as error:
        raise ConfigError(f"config key 'data.noise_camera': {error}") from None
    files = split_files(clean_files(cfg_data.root), cfg_data.val_share)[split]
    if not files:
        raise DataError(f"data.root {cfg_data.root} leaves no {split} files (data.val_share {cfg_data.val_share}); "
                        "add files or change data.val_share")
    ratios = validation_ratios(cfg_data.synthetic_ratio)
    training = split == "train"
    crop = cfg_data.crop_size if training else cfg_data.val_crop
    clean = SIDPairDataset(
        _records(files, split, cfg_data.camera, ratios[1]), cfg_data.root, cfg_data.camera,
        crop_size=crop, packed=cfg_data.packed, augment=training and cfg_data.augment, clip_aligned=cfg_data.clip_aligned,
        cache_dir=cfg_data.resolved_cache_dir, split=split, full_frame=crop is None, seed=seed, synthetic_noise=True,
        ratio_cap=max(cfg_data.ratio_cap, ratios[2]),
    )
    dataset: SIDPairDataset | HeldOutDark = clean
    if not training:
        kernel = None
        if cfg_data.synthetic_crosstalk != "identity":
            from rawrestore.physics.crosstalk import build_kernel

            kernel = build_kernel(cfg_data.synthetic_crosstalk, cfg_data.cfa_period)
        dataset = HeldOutDark(clean, ratios, cfg_data.noise_camera, cfg_data.clip_aligned, kernel, seed)
    if prepare:
        dataset.prepare()
    return dataset
