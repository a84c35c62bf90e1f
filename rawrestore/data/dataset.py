"""SID (short, long) RAW pairs as training samples: normalised, exposure-aligned, cropped, CFA-safe augmented.

Every sample comes from one `PairRecord`. Both files are read through the decode cache
(`rawrestore.data.cache`), so a crop copies only its window out of a memory map and a long
exposure shared by several short ones is decoded once. Each window is normalised with its own
file's per-site black level and white level (`isp.ops.normalize`); the short one is multiplied
by the exposure ratio `min(long_s / short_s, ratio_cap)` (`rawrestore.physics.align`), clipped
to [0, 1] when `clip_aligned` (SID); the long one (the target) is clipped to [0, 1].

Crops and augmentation. A crop of S x S RAW pixels (S a multiple of the CFA period P) starts on
a whole CFA period, so it has the file's CFA. Augmentation uses the eight flips / transposes of
the square, each made CFA-preserving as in Liu et al. (CVPR-W 2019, "Bayer pattern unification
and Bayer preserving augmentation"): the window is taken at the CFA phase (row, col offset mod
P) from which the flipped/transposed window again starts on the file's CFA (for RGGB: a
horizontal flip reads the window one column later). `cfa_preserving_ops(cfa)` finds these
phases for any CFA; for SID's X-Trans all eight transforms have one. So the sample's `cfa` is
always the file's CFA, whatever the augmentation.

Sample (a dict; the default collate batches it):
  input        (C,h,w) float32  aligned short exposure; C = 4 (Bayer) / 9 (X-Trans) packed, or 1 mosaic
               (absent with `synthetic_noise`: see `synthesize_input`)
  target       (C,h,w) float32  long exposure in [0, 1]
  cfa          (P,P) int64      colour indices 0=R 1=G 2=B of the crop (= the file's CFA)
  wb           (3,) float32     long exposure's as-shot multipliers, g = 1
  cam_to_srgb  (3,3) float32    long exposure's camera -> linear sRGB matrix
  ratio        () float32       exposure ratio used for the alignment
  black_level  (P,P) float32    long exposure's black level per site of the crop, DN
  white_level  () float32       long exposure's white level, DN
  short_name, long_name  str    file names; scene int; crop (4,) int64 top, left, height, width in
               the file; augment int (index into the 8 transforms, 0 = none)
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

import isp
from isp.geometry import CropOp, cfa_preserving_ops
from isp.meta import CameraMeta
from rawrestore.config.schema import CFA_PERIOD
from rawrestore.data.cache import DecodeCache
from rawrestore.data.manifest import (
    CAMERAS, SHIPPED_DIR, PairRecord, load_manifest, resolve_inside, resolve_sid_list, sid_list_name,
)
from rawrestore.errors import DataError, InputError
from rawrestore.physics.align import SID_RATIO_CAP, align_exposure, exposure_ratio
from rawrestore.physics.crosstalk import apply_crosstalk
from rawrestore.physics.noise import DEFAULT_CAMERA, sample_noise_params, synthesize_dark

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _resolve_path(path: str, root: Path) -> str:
    return path if os.path.isabs(path) else str(resolve_inside(root, path))


class SIDPairDataset(Dataset):
    """(short, long) RAW pairs -> dict samples (see the module docstring). Thread/worker safe; picklable.

    `crop_size` is in RAW pixels (a multiple of 2 for Bayer, 6 for X-Trans). The train split
    draws random crops starting on whole CFA periods, plus CFA-preserving flips/transposes with
    `augment`; other splits take the deterministic centre crop, or with `full_frame` (or
    crop_size None) the whole frame cut to whole CFA periods. `cache_dir` None decodes every file on every read.
    `synthetic_noise=True` leaves the short file unread: samples hold the clean long crop, and
    `synthesize_input(batch)` makes the dark input on the fly.
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        root: str | os.PathLike,
        camera: str,
        crop_size: int | None = 512,
        packed: bool = True,
        augment: bool = True,
        clip_aligned: bool = True,
        cache_dir: str | os.PathLike | None = None,
        split: str = "train",
        full_frame: bool = False,
        seed: int = 0,
        synthetic_noise: bool = False,
        ratio_cap: float = SID_RATIO_CAP,
        cache: DecodeCache | None = None,
    ):
        if camera not in CFA_PERIOD:
            raise DataError(f"camera must be one of {sorted(CFA_PERIOD)}, got {camera!r}")
        self.camera = camera
        self.period = CFA_PERIOD[camera]
        self.root = Path(root).expanduser()
        self.split = split
        self.packed = packed
        self.augment = augment
        self.clip_aligned = clip_aligned
        self.full_frame = full_frame or crop_size is None
        self.random_crops = split == "train" and not self.full_frame
        self.crop_size = None if self.full_frame else int(crop_size)  # type: ignore[arg-type]
        self.seed = int(seed)
        self.synthetic_noise = synthetic_noise
        self.ratio_cap = float(ratio_cap)
        self.cache = cache if cache is not None else DecodeCache(cache_dir)
        if self.crop_size is not None and (self.crop_size <= 0 or self.crop_size % self.period):
            raise DataError(f"crop_size {self.crop_size} must be a positive multiple of the {camera} CFA period {self.period}")
        if not records:
            raise DataError(f"no {split} pairs for {camera} under {self.root}; check data.root and data.manifest")
        resolved = []
        for record in records:
            if record.camera != camera:
                raise DataError(f"pair {record.short} / {record.long} is a {record.camera} pair but data.camera is {camera}")
            resolved.append(dataclasses.replace(record, short=_resolve_path(record.short, self.root),
                                                long=_resolve_path(record.long, self.root)))
        self.records = resolved
        self._check_files_exist()
        self._calls = 0

    def __len__(self) -> int:
        return len(self.records)

    def prepare(self, progress: bool = True) -> int:
        """Decode every file this dataset reads into the cache now, in this process. -> files; 0 without a cache.

        Call it before starting DataLoader workers: they then only memory-map (rawpy, whose
        OpenMP is not fork-safe, never runs in a forked worker), and no sample pays a decode.
        """
        if not self.cache.enabled:
            if self.synthetic_noise:
                self._check_synthetic_pairs()
            return 0
        paths = [p for r in self.records for p in ((r.long,) if self.synthetic_noise else (r.short, r.long))]
        count = self.cache.warm(paths, progress=progress)
        self.check_pairs()
        return count

    def check_pairs(self) -> None:
        """Check every pair now (CFA, equal sizes and cameras, the crop inside the frame); DataError naming the files.

        `prepare` calls it once the metadata is cached, so a bad pair stops a run before its first step.
        """
        for record in self.records:
            long_meta = self.cache.meta(record.long)
            self._check_camera(record.long, long_meta)
            if not self.synthetic_noise:
                self._check_pair(record, self.cache.meta(record.short), long_meta)
            self._check_crop(record.long, long_meta.height, long_meta.width)
        if self.synthetic_noise:
            self._check_synthetic_pairs()

    def _check_synthetic_pairs(self) -> None:
        """With synthetic noise the short files are not decoded, but a pair must still match: sizes from the headers."""
        sizes: dict[str, tuple[int, int]] = {}
        for record in self.records:
            for path in (record.short, record.long):
                if path not in sizes:
                    sizes[path] = _header_size(path)
            if sizes[record.short] != sizes[record.long]:
                raise DataError(_size_mismatch(record, sizes[record.short], sizes[record.long]))

    def _check_files_exist(self) -> None:
        # the short files too with synthetic noise: the list names them, and validation reads them
        needed = [p for r in self.records for p in (r.short, r.long)]
        missing = [p for p in dict.fromkeys(needed) if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{missing[0]}: file named in the {self.split} list is missing{more}; "
                            "check data.root or regenerate the list")

    def _rng(self, index: int) -> np.random.Generator:
        # torch.initial_seed differs per DataLoader worker and epoch; the call count per process
        # varies draws across epochs when there are no workers. Deterministic given the torch seed.
        self._calls += 1
        return np.random.default_rng([self.seed, torch.initial_seed(), index, self._calls])

    def _check_pair(self, record: PairRecord, short: CameraMeta, long: CameraMeta) -> None:
        if (short.width, short.height) != (long.width, long.height):
            raise DataError(_size_mismatch(record, (short.width, short.height), (long.width, long.height)))
        if (short.make, short.model) != (long.make, long.model) or short.cfa != long.cfa:
            raise DataError(f"pair camera mismatch: {record.short} is '{short.make} {short.model}' (CFA {short.cfa_string()}) "
                            f"but {record.long} is '{long.make} {long.model}' (CFA {long.cfa_string()}); fix the list")

    def _check_camera(self, path: str, meta: CameraMeta) -> None:
        if meta.cfa_period != self.period:
            kind = "X-Trans 6x6" if meta.cfa_period == 6 else "Bayer 2x2"
            raise DataError(f"{path}: has a {kind} CFA but data.camera is {self.camera}; set data.camera to match the files")
        if not float(meta.white_level) > float(np.max(meta.black_array)):  # synthesize_input(checked=True) relies on it
            raise DataError(f"{path}: white level {meta.white_level} is not above the black level; the file's metadata is broken")

    def _check_crop(self, path: str, height: int, width: int) -> None:
        size = self.crop_size
        if size is not None and (size > height or size > width):
            key = "data.crop_size" if self.split == "train" else "data.val_crop"
            raise DataError(f"{path}: crop_size {size} ({key}) is larger than the {width}x{height} frame; "
                            f"use a smaller {key}" + ("" if self.split == "train" else " (or null for whole frames)"))

    def _window(self, height: int, width: int, path: str, rng: np.random.Generator | None,
                ops: list[CropOp]) -> tuple[int, int, int, int, CropOp]:
        """top, left, crop height, crop width and transform of this sample's window."""
        period = self.period
        identity = ops[0]
        if self.full_frame:
            return 0, 0, height // period * period, width // period * period, identity
        size = int(self.crop_size)  # type: ignore[arg-type]
        self._check_crop(path, height, width)
        if rng is None:  # evaluation: the deterministic centre crop
            return (height - size) // 2 // period * period, (width - size) // 2 // period * period, size, size, identity
        candidates = ops if self.augment else [identity]
        feasible = [op for op in candidates if op.phase[0] + size <= height and op.phase[1] + size <= width]
        op = feasible[int(rng.integers(len(feasible)))]
        top = op.phase[0] + period * int(rng.integers((height - size - op.phase[0]) // period + 1))
        left = op.phase[1] + period * int(rng.integers((width - size - op.phase[1]) // period + 1))
        return top, left, size, size, op

    def _normalised(self, path: str, meta: CameraMeta, box: tuple[int, int, int, int], op: CropOp) -> tuple[torch.Tensor, np.ndarray]:
        """Window -> (1,1,h,w) float32 transformed and normalised; and the per-site black of the result (P,P) DN."""
        top, left, height, width = box
        period = self.period
        # The window starts at phase (top, left) mod P; after the transform its sites carry these blacks.
        black = np.roll(meta.black_array, (-(top % period), -(left % period)), axis=(0, 1))
        black_after = np.ascontiguousarray(op.apply(np.tile(black, (2, 2)))[:period, :period])
        window = op.apply(self.cache.crop(path, top, left, height, width))
        raw = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)).view(1, 1, height, width)
        white = float(meta.white_level)
        if np.all(black_after == black_after.flat[0]):
            # one black for all sites: isp.ops.normalize's formula, in place (no per-site map to tile)
            level = float(black_after.flat[0])
            return raw.sub_(level).div_(white - level), black_after
        return isp.ops.normalize(raw, torch.from_numpy(black_after.astype(np.float32)), white), black_after

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.draw(index, self._rng(index) if self.random_crops else None)

    def draw(self, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        """Sample `index` with its random crop and transform drawn from `rng` (the trainer's per-sample generator).

        `rng` None, or a split without random crops: the deterministic centre crop or whole frame.
        """
        record = self.records[index]
        try:
            return self._sample(index, record, rng if self.random_crops else None)
        except DataError:
            raise
        except InputError as exc:  # e.g. RawReadError: re-raised as a one-argument DataError so workers can pickle it
            raise DataError(str(exc)) from exc
        except (OSError, ValueError, RuntimeError, IndexError) as exc:
            raise DataError(f"pair {record.short} / {record.long}: {type(exc).__name__}: {exc}") from exc

    def _sample(self, index: int, record: PairRecord, rng: np.random.Generator | None) -> dict[str, Any]:
        long_meta = self.cache.meta(record.long)
        self._check_camera(record.long, long_meta)
        if not self.synthetic_noise:
            short_meta = self.cache.meta(record.short)
            self._check_pair(record, short_meta, long_meta)
        ratio = exposure_ratio(record.short_exposure_s, record.long_exposure_s, cap=self.ratio_cap)
        ops = cfa_preserving_ops(long_meta.cfa)
        top, left, height, width, op = self._window(long_meta.height, long_meta.width, record.long, rng, ops)
        box = (top, left, height, width)
        target, black_after = self._normalised(record.long, long_meta, box, op)
        target = target.clamp_(0.0, 1.0)
        cfa = torch.as_tensor(long_meta.cfa_array)
        sample: dict[str, Any] = {
            "target": self._layout(target, cfa),
            "cfa": cfa,
            "wb": torch.tensor(long_meta.wb_as_shot, dtype=torch.float32),
            "cam_to_srgb": torch.tensor(long_meta.cam_to_srgb, dtype=torch.float32),
            "ratio": torch.tensor(ratio, dtype=torch.float32),
            "black_level": torch.from_numpy(black_after.astype(np.float32)),
            "white_level": torch.tensor(float(long_meta.white_level), dtype=torch.float32),
            "short_name": Path(record.short).name,
            "long_name": Path(record.long).name,
            "scene": int(record.scene),
            "crop": torch.tensor(box, dtype=torch.int64),
            "augment": op.index,
        }
        if not self.synthetic_noise:
            short, _ = self._normalised(record.short, short_meta, box, op)
            aligned = align_exposure(short, ratio, clip=self.clip_aligned)
            sample["input"] = self._layout(aligned, cfa)
        return sample

    def _layout(self, mosaic: torch.Tensor, cfa: torch.Tensor) -> torch.Tensor:
        """(1,1,H,W) -> (C,h,w): packed (4 Bayer / 9 X-Trans) or the mosaic itself (C = 1)."""
        out = isp.cfa.pack(mosaic, cfa) if self.packed else mosaic
        return out[0].contiguous()


def _size_mismatch(record: PairRecord, short: tuple[int, int], long: tuple[int, int]) -> str:
    return (f"pair size mismatch: {record.short} is {short[0]}x{short[1]} but {record.long} is {long[0]}x{long[1]}; "
            "fix the list so both frames come from the same camera")


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) of a RAW file's visible area, from its header alone (nothing is decoded)."""
    import rawpy

    raw = rawpy.RawPy()
    try:
        raw.open_file(str(path))
        return int(raw.sizes.width), int(raw.sizes.height)
    except rawpy.LibRawError as exc:
        raise DataError(f"{path}: not a RAW file LibRaw can read ({type(exc).__name__}); fix the list") from None
    finally:
        raw.close()


def synthesize_input(
    batch: dict[str, Any],
    generator: torch.Generator | None = None,
    noise_camera: str = DEFAULT_CAMERA,
    read_noise: str = "tukey",
    clip: bool = True,
    crosstalk: torch.Tensor | None = None,
    param_rng: np.random.Generator | None = None,
    checked: bool = False,
) -> torch.Tensor:
    """Dark, aligned input from clean targets. batch['target'] (B,C,h,w) packed or (B,1,H,W) -> same shape, float.

    Per sample: ELD parameters drawn from `noise_camera`, the target divided by `ratio` and
    noised in DN with its black/white level (`rawrestore.physics.synthesize_dark`), then
    multiplied by `ratio` (clipped to [0, 1] when `clip`). `crosstalk` (P,P,3,3), when given,
    acts on the clean mosaic first, as it does on the sensor before the noise (the clean target
    stays crosstalk-free, the model the data-consistency loss assumes). Runs on the target's
    device; a generator must live there too. `param_rng` (a numpy Generator) draws the per-sample
    noise parameters on the host instead of `generator`; `checked` skips re-checking values the
    dataset checked (see `synthesize_dark`): together, nothing is read back from the device.
    """
    target = batch["target"]
    cfa = batch["cfa"]  # host or device: isp moves it where it computes with it
    count = target.shape[0]
    packed = target.shape[1] != 1
    mosaic = isp.cfa.unpack(target, cfa) if packed else target  # one call when the batch shares a CFA
    if crosstalk is not None:
        mosaic = apply_crosstalk(mosaic, crosstalk.to(mosaic.device))
    draws = param_rng if param_rng is not None else generator
    params = [sample_noise_params(noise_camera, draws, read_noise=read_noise) for _ in range(count)]
    ratio = batch["ratio"].to(device=target.device, dtype=target.dtype)
    dark = synthesize_dark(mosaic, ratio, params, batch["black_level"].to(target.device),
                           batch["white_level"].to(target.device), cfa, generator, checked=checked)
    aligned = align_exposure(dark, ratio, clip=clip, checked=checked)
    return isp.cfa.pack(aligned, cfa) if packed else aligned


def jitter_gains(target: torch.Tensor, cfa: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Clean frames under other light and exposure. target (B,C,h,w) packed or (B,1,H,W), cfa (B,P,P) -> same shape.

    Per sample, gains for R, G and B drawn log-uniform in [1/(1+amount), 1+amount] multiply the
    sites of that colour, and the result is clipped to [0, 1] like a sensor. Used before
    `synthesize_input`, this widens the colours and brightness a small training set shows the
    network (a grey-world network otherwise darkens scenes whose colour it has not seen).
    """
    if amount <= 0:
        return target
    count = target.shape[0]
    spread = math.log1p(amount)
    log_gains = (torch.rand(count, 3, generator=generator, device=target.device, dtype=torch.float64) * 2 - 1) * spread
    gains = log_gains.exp().to(target.dtype)
    packed = target.shape[1] != 1
    mosaic = isp.cfa.unpack(target, cfa) if packed else target
    mosaic = isp.ops.white_balance(mosaic, cfa, gains).clamp(0.0, 1.0)  # one gain per colour, at every site of it
    return isp.cfa.pack(mosaic, cfa) if packed else mosaic


def dataset_base(root: str | os.PathLike, camera: str) -> Path:
    """The folder list paths are relative to: `root`, or its parent when `root` is the camera folder itself."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise DataError(f"data.root {base} is not a folder; generate data with `rawrestore synth --out {root}` "
                        "or point data.root at the SID download")
    folder = CAMERAS[camera]
    if not (base / folder).is_dir() and base.name == folder:
        return base.parent
    return base


def resolve_records(cfg_data: Any, split: str) -> tuple[list[PairRecord], Path]:
    """Pairs of `split` for a DataConfig and the root they are under.

    manifest "auto": SID's `<Camera>_<split>_list.txt` in the dataset root if present, else the
    shipped `data_manifests/sid_<camera>_<split>.csv`. Otherwise a manifest CSV path (rows of
    other splits are skipped; a ratio above data.ratio_cap is an error naming the row).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    camera = cfg_data.camera
    base = dataset_base(cfg_data.root, camera)
    if cfg_data.manifest == "auto":
        list_path = base / sid_list_name(camera, split)
        if list_path.is_file():
            return resolve_sid_list(list_path, split, camera, base), base
        shipped = SHIPPED_DIR / f"sid_{camera}_{split}.csv"
        return load_manifest(shipped, root=base), base
    records = [r for r in load_manifest(cfg_data.manifest, root=base, ratio_cap=cfg_data.ratio_cap) if r.split == split]
    if not records:
        raise DataError(f"manifest {cfg_data.manifest} has no {split} pairs; use a manifest with that split or manifest: auto")
    return records, base


def build_datasets(cfg_data: Any, split: str, seed: int = 0, prepare: bool = True) -> SIDPairDataset:
    """The dataset of one split from a `DataConfig`.

    train: random `crop_size` crops, augmentation per `augment`, synthetic dark inputs per
    `synthetic_noise`. val/test: deterministic centre `val_crop` crops, or whole frames when
    `val_crop` is null; always the real short exposures. With `prepare`, every file is decoded
    into the cache here (once per file ever; tqdm progress) so loader workers only memory-map.
    `data.kind: clean_folder` builds from a folder of clean files (`rawrestore.data.clean_folder`);
    `data.sources` builds every source and joins them (`rawrestore.data.sources.SourceMix`).
    """
    if getattr(cfg_data, "sources", None) is not None:
        from rawrestore.data.sources import build_sources

        return build_sources(cfg_data, split, seed=seed, prepare=prepare)  # type: ignore[return-value]
    if getattr(cfg_data, "kind", "sid") == "clean_folder":
        from rawrestore.data.clean_folder import build_clean_folder

        return build_clean_folder(cfg_data, split, seed=seed, prepare=prepare)  # type: ignore[return-value]
    records, base = resolve_records(cfg_data, split)
    training = split == "train"
    crop = cfg_data.crop_size if training else cfg_data.val_crop
    dataset = SIDPairDataset(
        records, base, cfg_data.camera,
        crop_size=crop,
        packed=cfg_data.packed,
        augment=training and cfg_data.augment,
        clip_aligned=cfg_data.clip_aligned,
        cache_dir=cfg_data.resolved_cache_dir,
        split=split,
        full_frame=crop is None,
        seed=seed,
        synthetic_noise=training and cfg_data.synthetic_noise,
        ratio_cap=cfg_data.ratio_cap,
    )
    if prepare:
        dataset.prepare()
    return dataset


__all__ = [
    "CropOp", "SIDPairDataset", "build_datasets", "cfa_preserving_ops", "dataset_base", "resolve_records",
    "synthesize_input",
]
