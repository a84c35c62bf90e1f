"""The one Trainer: iteration-based training of a packed-RAW restoration network from an ExperimentConfig.

One optimiser step (`train.accumulate` micro-batches of `train.batch_size` per process):

    batch (dataset: exposure-aligned packed input, packed target, metadata)
      -> [synthetic dark input from the clean target, when data.synthetic_noise]
      -> model under autocast (off | bf16 | fp16 + GradScaler on CUDA)
      -> LossStack (RAW terms, one render, sRGB terms, weighting) in float32
      -> backward (DDP averages gradients) -> unscale, clip, finite check -> Adam/AdamW step
      -> lr schedule (warmup + cosine | SID steps) -> EMA update

Data order is a pure function of the step. Micro-batch b of this process holds global positions
`(b * world_size + rank) * batch_size + k`; position p is item `perm_e[p mod n]` of epoch
`e = p // n`, with `perm_e` a permutation seeded by (seed, e). Each sample's augmentation RNG is
seeded from (seed, e, index) inside whichever process loads it, so neither the number of
DataLoader workers nor a resume changes what a step sees. Together with the checkpointed RNG,
optimiser, EMA and loss-weighting states, N steps + resume + N steps equals 2N steps bit for bit
on the CPU.

A step whose batch holds NaN/inf or whose loss or gradient norm is not finite is skipped (no
update) and counted; `train.max_nonfinite` such steps in a row stop training with a one-line
error. SIGTERM/SIGINT finish the current step, write `last.pt` and return (exit code 0).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

import isp
from rawrestore.config import ExperimentConfig, save_resolved, to_dict
from rawrestore.errors import ConfigError, DataError, InputError, WeightsError
from rawrestore.models import build_model_from_config, count_parameters
from rawrestore.tiling import tiled_apply
from rawrestore.train import checkpoint as ckpt
from rawrestore.train import distributed as dist_utils
from rawrestore.train.distributed import DistInfo

__all__ = [
    "Trainer", "FitResult", "TrainingError", "StepBatchSampler", "SeededSamples", "ModelEMA", "lr_factor", "resolve_amp",
    "write_loss_curves", "read_log", "mix_seed", "build_lpips_or_none", "LOG_NAME", "CURVES_NAME",
]

LOG_NAME = "log.jsonl"
CURVES_NAME = "loss_curves.png"
CONFIG_NAME = "config.yaml"
_MASK63 = (1 << 63) - 1


class TrainingError(InputError):
    """Training cannot go on (e.g. too many non-finite losses in a row); one line saying why and what to try."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...), stable across processes and Python runs."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


# --------------------------------------------------------------------------- data order


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless, deterministic micro-batches: micro-batch b -> this rank's [(dataset index, sample seed)] * batch_size.

    DistributedSampler-like sharding: global position p = (b * world_size + rank) * batch_size + k
    belongs to epoch p // size and is item p % size of that epoch's seeded permutation. Starting at
    `start_batch` gives exactly the stream a run that went through the earlier batches would see.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, shuffle: bool = True):
        if size < 1:
            raise InputError("the training set is empty; check data.root and the train list")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_batch, self.shuffle = rank, world_size, start_batch, shuffle
        self._perms: OrderedDict[int, list[int]] = OrderedDict()

    def permutation(self, epoch: int) -> list[int]:
        """Dataset order of `epoch` (cached for the last few epochs)."""
        if epoch not in self._perms:
            if self.shuffle:
                generator = torch.Generator().manual_seed(mix_seed(self.seed, 0x5A3D, epoch))
                self._perms[epoch] = torch.randperm(self.size, generator=generator).tolist()
            else:
                self._perms[epoch] = list(range(self.size))
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def batch(self, batch_index: int) -> list[tuple[int, int]]:
        """The (index, sample seed) pairs of micro-batch `batch_index` on this rank."""
        out = []
        for k in range(self.batch_size):
            position = (batch_index * self.world_size + self.rank) * self.batch_size + k
            epoch, offset = divmod(position, self.size)
            index = self.permutation(epoch)[offset]
            out.append((index, mix_seed(self.seed, epoch, index)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch_index = self.start_batch
        while True:
            yield self.batch(batch_index)
            batch_index += 1


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch CPU RNGs for one sample, then put the caller's states back."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also queue CUDA seeding
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


@dataclass(frozen=True)
class _LoadFailure:
    """A sample a DataLoader worker could not load: its one-line message crosses to the main process as data."""

    message: str


def _collate(samples: list[Any]) -> Any:
    """default_collate, or the first _LoadFailure among the samples."""
    failure = next((sample for sample in samples if isinstance(sample, _LoadFailure)), None)
    return failure if failure is not None else default_collate(samples)


class SeededSamples(Dataset):
    """Wraps a dataset so item (index, seed) is `dataset[index]` drawn with every global RNG seeded by `seed`.

    The SID dataset draws its crops from `torch.initial_seed()` (different per worker) and a
    per-process call counter; seeding per sample and resetting that counter makes each draw a
    function of (seed, epoch, index) alone, whichever worker, or none, loads it.

    In a DataLoader worker an InputError becomes a `_LoadFailure` (DataLoader would re-raise it
    with a traceback in its message), and `reading`, a shared int64 array of (pid, index) per
    worker, says which item each worker is loading (index -1 between items), so the pair a
    worker that died was reading can be named.
    """

    def __init__(self, dataset: Dataset, reading: Any = None):
        self.dataset = dataset
        self.reading = reading

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        worker = get_worker_info()
        tracked = worker is not None and self.reading is not None
        if tracked:
            self.reading[2 * worker.id] = os.getpid()
            self.reading[2 * worker.id + 1] = index
        try:
            with _seeded_global_rngs(seed):
                if hasattr(self.dataset, "_calls"):
                    self.dataset._calls = 0  # the SID dataset mixes a per-process call count into its RNG
                return self.dataset[index]
        except InputError as error:
            if worker is None:
                raise
            return _LoadFailure(str(error))
        finally:
            if tracked:
                self.reading[2 * worker.id + 1] = -1


def _worker_init(_: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process finishes its step and checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------ optimisation


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp with "auto" resolved: bf16 where the hardware runs it natively, else fp16 (CUDA) or off."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        try:  # oneDNN's own check: AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than float32
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        return "bf16" if native else "off"
    return "off"


def lr_factor(step: int, cfg_train: Any) -> float:
    """Multiplier of train.lr for optimiser step `step` (0-based): linear warmup, then cosine to 0 or SID steps."""
    warmup = cfg_train.warmup_iters
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg_train.schedule == "cosine":
        span = max(1, cfg_train.iterations - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for milestone in cfg_train.step_milestones if step >= milestone)
    return cfg_train.step_gamma ** passed


class ModelEMA:
    """Exponential moving average of a model's weights; decay warms up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights (buffers are copied)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(source[name].to(value.dtype), 1.0 - decay)
            else:
                value.copy_(source[name])


def build_lpips_or_none(cfg: ExperimentConfig, device: torch.device) -> tuple[nn.Module | None, str]:
    """LPIPS metric network when its weights are on disk. -> (module or None, one-line note)."""
    try:
        from rawrestore.pretrained import build_lpips

        net = build_lpips(cfg.loss.lpips.net, cfg.loss.lpips.weights)
    except (WeightsError, ImportError) as error:
        return None, f"LPIPS reported as null: {str(error).splitlines()[0]}"
    return net.to(device), f"LPIPS ({cfg.loss.lpips.net}) on"


# ---------------------------------------------------------------------------- logging


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _smooth(values: list[float], span: int) -> np.ndarray:
    """Moving average over `span` points (shorter at the start). -> (N,)."""
    data = np.asarray(values, dtype=np.float64)
    if span <= 1 or data.size < 2:
        return data
    cumulative = np.cumsum(np.insert(data, 0, 0.0))
    out = np.empty_like(data)
    for i in range(data.size):
        lo = max(0, i + 1 - span)
        out[i] = (cumulative[i + 1] - cumulative[lo]) / (i + 1 - lo)
    return out


def write_loss_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Plot training curves from a log.jsonl: total and per-term losses, effective weights, lr, val PSNR. -> PNG path or None."""
    records = read_log(log_path)
    steps = [r for r in records if "loss" in r and not r.get("skipped")]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    span = max(1, len(x) // 50)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    ax.plot(x, [r["loss"] for r in steps], color="0.8", lw=0.7)
    ax.plot(x, _smooth([r["loss"] for r in steps], span), color="k", lw=1.5, label="total")
    ax.set_title("total loss (weighted)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax = axes[0, 1]
    names = list(steps[-1].get("terms", {}))
    for name in names:
        values = [r["terms"][name]["value"] for r in steps if name in r.get("terms", {})]
        term_steps = [r["step"] for r in steps if name in r.get("terms", {})]
        ax.plot(term_steps, _smooth(values, span), lw=1.2, label=name)
    ax.set_title("loss terms (raw values)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    if names:
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(x, [r["lr"] for r in steps], color="tab:blue", label="lr")
    ax.set_title("learning rate and term weights")
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    twin = ax.twinx()
    twin.set_ylabel("effective weight")
    for name in names:
        weights = [r["terms"][name]["weight"] for r in steps if name in r.get("terms", {})]
        twin.plot([r["step"] for r in steps if name in r.get("terms", {})], weights, lw=0.8, ls="--", label=f"w {name}")
    if names:
        twin.legend(fontsize=7, loc="center right")
    ax = axes[1, 1]
    val = [r for r in records if "val" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val"]["all"]["psnr"] for r in val], "o-", color="tab:green")
        ax.set_title("validation PSNR (dB, sRGB)")
    else:
        ax.set_title("validation PSNR (none yet)")
    ax.set_xlabel("step")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".tmp-{png_path.name}")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


class _JsonlLog:
    """Append-only JSONL writer (rank 0); each record is flushed so a kill loses at most a torn last line."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.handle = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record, allow_nan=True) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _truncate_log(path: Path, step: int) -> None:
    """Keep only records up to `step` (a resumed run redoes the steps after its checkpoint)."""
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if int(r.get("step", 0)) <= step and r.get("event") != "end"]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- trainer


@dataclass
class FitResult:
    """How fit() ended: the step reached, why it stopped ('done' | 'signal' | 'stop_at') and the checkpoint written."""

    step: int
    reason: str
    checkpoint: Path | None
    best_psnr: float | None
    skipped_steps: int


class Trainer:
    """Trains `cfg.model` on `cfg.data` with `cfg.loss` and `cfg.train`; see the module docstring.

    `Trainer(cfg)` builds data, model, loss, optimiser; `resume('auto' | path)` restores a
    checkpoint; `fit(stop_at=None)` trains to `cfg.train.iterations` (or `stop_at`) and returns a
    FitResult. Under torchrun each process builds its own Trainer; only rank 0 writes files.
    """

    def __init__(self, cfg: ExperimentConfig, dist_info: DistInfo | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = True):
        self.cfg = cfg
        self.dist = dist_info if dist_info is not None else dist_utils.init_distributed(cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self._print = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.progress = progress and self.is_main
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = ckpt.checkpoint_dir(self.output_dir)
        train = cfg.train
        self.amp = resolve_amp(train.amp, self.device)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("config key 'train.amp' fp16 needs a CUDA GPU (GradScaler); use bf16 or off on the CPU")

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)

        from rawrestore.data.dataset import build_datasets

        self.train_set = build_datasets(cfg.data, "train", seed=cfg.seed)
        try:
            self.val_set = build_datasets(cfg.data, "val", seed=cfg.seed, prepare=False) if train.val_every > 0 else None
        except InputError as error:  # no val pairs, or their files are absent: train without validation
            self.val_set = None
            self.info(f"validation off: {error}")
        if self.val_set is not None:
            self.val_set.prepare()  # val pairs that exist must be usable: a bad pair or val_crop fails before training

        self.net = build_model_from_config(cfg.model, cfg.data.in_channels).to(self.device)
        if train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.net
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=device_ids)
        self.ema = ModelEMA(self.net, train.ema) if train.ema is not None else None
        self._synthetic_kernel: torch.Tensor | None = None
        if cfg.data.synthetic_noise and cfg.data.synthetic_crosstalk != "identity":
            from rawrestore.physics.crosstalk import build_kernel

            try:
                kernel = build_kernel(cfg.data.synthetic_crosstalk, cfg.data.cfa_period)
            except InputError as error:  # ConfigError included
                raise ConfigError(f"config key 'data.synthetic_crosstalk': {error}") from None
            self._synthetic_kernel = kernel.to(self.device)

        from rawrestore.losses import LossStack

        self.loss = LossStack(cfg.loss, total_steps=train.iterations, cfa_period=cfg.data.cfa_period).to(self.device)
        loss_parameters = self.loss.trainable_parameters()
        groups: list[dict[str, Any]] = [{"params": [p for p in self.net.parameters() if p.requires_grad]}]
        if loss_parameters:
            groups.append({"params": loss_parameters, "weight_decay": 0.0})
        optimizer_cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_cls(groups, lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, train))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        self.loss.backbone_dtype = self.autocast_dtype

        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        self._stop_signal: int | None = None
        self._reading: Any = None  # (pid, dataset index) per DataLoader worker, see SeededSamples
        self._lpips: nn.Module | None = None
        self._lpips_note: str | None = None
        self.val_render = isp.ISP(demosaic="bilinear", gamma="srgb")
        self.param_count = count_parameters(self.net)

    # ------------------------------------------------------------------ helpers

    def release_process_group(self) -> None:
        """Drop the DistributedDataParallel wrapper, whose reducer holds the process group; call before shutdown().

        A reducer that outlives destroy_process_group is torn down at interpreter exit, where gloo
        aborts the process now and then ("terminate called without an active exception", exit -6).
        """
        self.model = self.net

    def info(self, line: str) -> None:
        """Print one line on rank 0."""
        if self.is_main:
            self._print(line)

    def _loader(self, start_step: int) -> Iterator[dict[str, Any]]:
        """Training micro-batches from optimiser step `start_step` on (see StepBatchSampler)."""
        sampler = StepBatchSampler(
            len(self.train_set), self.cfg.train.batch_size, self.cfg.seed, self.dist.rank, self.dist.world_size,
            start_batch=start_step * self.cfg.train.accumulate,
        )
        workers = self.cfg.data.num_workers
        self._reading = multiprocessing.RawArray("q", [0, -1] * workers) if workers else None
        loader = DataLoader(
            SeededSamples(self.train_set, self._reading), batch_sampler=sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers else None,
            generator=torch.Generator().manual_seed(self.cfg.seed),  # keeps the global torch RNG untouched
            prefetch_factor=2 if workers else None,
        )
        return iter(loader)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _synthesize(self, batch: dict[str, Any], step: int, micro: int) -> None:
        """On-the-fly ELD dark input from the clean target, seeded by (seed, step, micro, rank)."""
        from rawrestore.data.dataset import synthesize_input

        generator = torch.Generator(device=self.device)
        generator.manual_seed(mix_seed(self.cfg.seed, 0xD4, step, micro, self.dist.rank))
        if self.cfg.data.gain_jitter > 0:
            from rawrestore.data.dataset import jitter_gains

            batch["target"] = jitter_gains(batch["target"], batch["cfa"], self.cfg.data.gain_jitter, generator)
        if self.cfg.data.synthetic_ratio is not None:
            low, high = (math.log(v) for v in self.cfg.data.synthetic_ratio)
            draws = torch.rand(batch["target"].shape[0], generator=generator, device=self.device, dtype=torch.float64)
            batch["ratio"] = (low + draws * (high - low)).exp().to(batch["ratio"].dtype)
        batch["input"] = synthesize_input(batch, generator=generator, noise_camera=self.cfg.data.noise_camera,
                                          clip=self.cfg.data.clip_aligned, crosstalk=self._synthetic_kernel)

    # --------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (call on every rank: RNG states are gathered to all)."""
        rng = dist_utils.all_gather_objects(ckpt.rng_state())
        return {
            "format": ckpt.FORMAT,
            "step": self.step,
            "model": self.net.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "loss": self.loss.state_dict(),
            "rng": rng,
            "sampler": {"seed": self.cfg.seed, "micro_batches": self.step * self.cfg.train.accumulate,
                        "batch_size": self.cfg.train.batch_size, "world_size": self.dist.world_size},
            "trainer": {"nonfinite_in_row": self.nonfinite_in_row, "skipped_steps": self.skipped_steps,
                        "best_psnr": self.best_psnr, "best_step": self.best_step,
                        "ema_updates": self.ema.updates if self.ema is not None else 0},
            "config": to_dict(self.cfg),
            "world_size": self.dist.world_size,
            "param_count": self.param_count,
        }

    def save(self, names: list[str]) -> Path:
        """Write the state under checkpoints/<name> for each name (rank 0 writes; all ranks call). -> last.pt if written, else the first."""
        state = self.state_dict()
        paths = [self.ckpt_dir / name for name in names]
        if self.is_main:
            ckpt.save_checkpoint(state, paths)
        dist_utils.barrier()
        return self.ckpt_dir / ckpt.LAST if ckpt.LAST in names else paths[0]

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore a `state_dict()` (strict: the model and loss must match the config)."""
        try:
            self.net.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
            self.loss.load_state_dict(state.get("loss") or {}, strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            first = str(error).strip().splitlines()[0][:200]
            raise ckpt.CheckpointError(
                f"{source} does not fit this config (model {self.cfg.model.name} width {self.cfg.model.width}, "
                f"loss {self.cfg.loss.weighting}): {first}"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        trainer = state.get("trainer") or {}
        self.nonfinite_in_row = int(trainer.get("nonfinite_in_row", 0))
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        self.best_psnr = trainer.get("best_psnr")
        self.best_step = trainer.get("best_step")
        if self.ema is not None:
            self.ema.updates = int(trainer.get("ema_updates", self.step))
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            ckpt.set_rng_state(rng[self.dist.rank])
        else:
            self.info(f"resume: checkpoint has RNG states of {len(rng)} process(es), this run has "
                      f"{self.dist.world_size}; reseeding (the data order still follows the step)")
            random.seed(mix_seed(self.cfg.seed, self.step, self.dist.rank))
            np.random.seed(mix_seed(self.cfg.seed, self.step, self.dist.rank) & 0xFFFFFFFF)
            torch.manual_seed(mix_seed(self.cfg.seed, self.step, self.dist.rank))
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            self.info(f"resume: checkpoint was written by {saved_world} process(es), this run has "
                      f"{self.dist.world_size}; later batches differ from an uninterrupted run")

    def resume(self, spec: str | os.PathLike | None) -> bool:
        """Restore from 'auto' (newest valid checkpoint in output_dir, if any) or a path. -> True when resumed."""
        if spec is None:
            return False
        path: str | None = None
        if self.is_main:
            ckpt.clean_temporaries(self.ckpt_dir)
            if str(spec) == "auto":
                found = ckpt.find_resume(self.output_dir, report=self._print)
                path = str(found[0]) if found is not None else None
                if path is None:
                    self._print(f"resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            else:
                path = str(spec)
        path = dist_utils.broadcast_object(path)
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, map_location="cpu")
        self.load_state_dict(state, source=f"checkpoint {path}")
        self.info(f"resume: {path} at step {self.step}")
        if self.is_main:
            _truncate_log(self.output_dir / LOG_NAME, self.step)
        return True

    # --------------------------------------------------------------- validation

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Metrics on the val split (sharded over ranks, gathered). -> Evaluator summary (+ per-rank counts) or None.

        Scores exactly as `rawrestore eval`'s internal protocol (`rawrestore.protocols`: same
        prediction path, float32, same renderer), so validation and evaluation cannot disagree.
        """
        if self.val_set is None or len(self.val_set) == 0:
            return None
        from rawrestore.metrics import Evaluator
        from rawrestore.protocols import eval_renderer, predict, score_internal

        if self._lpips_note is None:
            self._lpips, self._lpips_note = build_lpips_or_none(self.cfg, self.device)
            self.info(f"validation: {self._lpips_note}")
        model = self._eval_model()
        was_training = model.training
        model.eval()
        evaluator = Evaluator(lpips_net=self._lpips, quantize=self.cfg.eval.quantize_8bit)
        renderer = eval_renderer()
        indices = list(range(self.dist.rank, len(self.val_set), self.dist.world_size))
        with _preserved_rngs():
            for index in indices:
                sample = self.val_set[index]
                pred = predict(model, sample, self.cfg.eval, self.cfg.data.packed, self.device)
                score_internal(evaluator, renderer, pred, sample, self.cfg.data.packed)
        if was_training:
            model.train()
        counts = dist_utils.all_gather_objects(len(indices))
        evaluator.gather()
        summary = evaluator.summary()
        return {"summary": summary, "per_rank": counts}

    # ------------------------------------------------------------------- signals

    def _handle_signal(self, signum: int, _frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self._stop_signal = signum

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ---------------------------------------------------------------------- step

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One optimiser step over `accumulate` micro-batches. -> log record (skipped steps included)."""
        train = self.cfg.train
        step = self.step
        self.optimizer.zero_grad(set_to_none=True)
        reports: list[dict[str, float]] = []
        reason: str | None = None
        local_nonfinite = False
        for micro in range(train.accumulate):
            batch = next(batches)  # always consumed: the data stream follows the step
            if isinstance(batch, _LoadFailure):
                raise DataError(batch.message)
            batch = self._to_device(batch)
            if self.cfg.data.synthetic_noise and "input" not in batch:
                self._synthesize(batch, step, micro)
            finite = bool(torch.isfinite(batch["input"]).all()) and bool(torch.isfinite(batch["target"]).all())
            if dist_utils.any_flag(not finite):
                reason = reason or "batch holds NaN/inf"
                continue
            if reason is not None:
                continue
            last_micro = micro == train.accumulate - 1
            sync = contextlib.nullcontext() if (last_micro or not self.dist.distributed) else self.model.no_sync()
            with sync:
                model_input = batch["input"]
                if train.channels_last:
                    model_input = model_input.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    pred = self.model(model_input)
                total, report = self.loss(pred.float(), batch, step)
                # backward even when non-finite: every DDP rank must take part; the update is dropped below
                self.scaler.scale(total / train.accumulate).backward()
            if not math.isfinite(report["total"]):
                local_nonfinite = True
            reports.append(report)
        if reason is None and dist_utils.any_flag(local_nonfinite):
            reason = "non-finite loss"
        grad_norm: float | None = None
        if reason is None:
            dist_utils.average_gradients(self.loss.trainable_parameters())
            self.scaler.unscale_(self.optimizer)
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            max_norm = train.grad_clip if train.grad_clip is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            grad_norm = float(norm)
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                reason = "non-finite gradient"
        lr = self.optimizer.param_groups[0]["lr"]
        if reason is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.net)
            self.nonfinite_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.skipped_steps += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()" on skipped steps
            self.scheduler.step()
        self.step += 1
        record: dict[str, Any] = {"step": self.step, "lr": lr}
        if reason is not None:
            record.update(skipped=True, reason=reason, nonfinite_in_row=self.nonfinite_in_row)
            return record
        averaged = _average_reports(reports)
        averaged = _all_reduce_report(averaged)
        names = [k for k in averaged if k != "total" and not k.endswith("/weight")]
        record["loss"] = averaged["total"]
        record["terms"] = {n: {"value": averaged[n], "weight": averaged.get(f"{n}/weight")} for n in names}
        record["grad_norm"] = grad_norm
        return record

    # ----------------------------------------------------------------------- fit

    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to cfg.train.iterations (or `stop_at` steps). -> FitResult; raises TrainingError on repeated non-finite steps."""
        train = self.cfg.train
        end = train.iterations if stop_at is None else min(stop_at, train.iterations)
        if self.is_main:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                save_resolved(self.cfg, self.output_dir / CONFIG_NAME)
            except OSError as error:
                raise TrainingError(f"cannot write to output_dir {self.output_dir}: {error.strerror or error}; "
                                    "set output_dir to a folder that can be created and written") from None
        self.info(f"model {self.cfg.model.name}: {self.param_count:,} parameters "
                  f"(in/out {self.cfg.data.in_channels} channels); loss terms: {', '.join(self.loss.term_names)}")
        self.info(f"data: {len(self.train_set)} train pairs, {len(self.val_set) if self.val_set is not None else 0} val; "
                  f"device {self.device}, {self.dist.world_size} process(es), amp {self.amp}"
                  + (" (auto)" if train.amp == "auto" else ""))
        if self.step >= end:
            self.info(f"train: already at step {self.step} of {end}; nothing to do")
            last = self.ckpt_dir / ckpt.LAST
            return FitResult(self.step, "done", last if last.is_file() else None, self.best_psnr, self.skipped_steps)
        log = _JsonlLog(self.output_dir / LOG_NAME, self.is_main)
        board = self._tensorboard()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0)
        batches = self._loader(self.step)
        self.model.train()
        reason = "done"
        written: Path | None = None
        started, start_step = time.perf_counter(), self.step
        try:
            with self._signals():
                while self.step < end:
                    tick = time.perf_counter()
                    record = self._train_step(batches)
                    record["time_s"] = round(time.perf_counter() - tick, 4)
                    log.write(record)
                    if record.get("skipped"):
                        self.info(f"step {self.step}: skipped ({record['reason']}; {self.nonfinite_in_row} in a row, "
                                  f"{self.skipped_steps} in all)")
                        if self.nonfinite_in_row >= train.max_nonfinite:
                            raise TrainingError(
                                f"{self.nonfinite_in_row} non-finite steps in a row (last: {record['reason']}) at step "
                                f"{self.step}; lower train.lr, set train.grad_clip, or check the data"
                            )
                    if bar is not None:
                        bar.update(1)
                        if "loss" in record:
                            postfix = {"loss": f"{record['loss']:.4g}"}
                            postfix.update({n: f"{t['value']:.3g}" for n, t in record["terms"].items()})
                            postfix["lr"] = f"{record['lr']:.2e}"
                            bar.set_postfix(postfix, refresh=False)
                    if board is not None and "loss" in record and self.step % train.log_every == 0:
                        board.add_scalar("train/loss", record["loss"], self.step)
                        board.add_scalar("train/lr", record["lr"], self.step)
                        for name, term in record["terms"].items():
                            board.add_scalar(f"loss/{name}", term["value"], self.step)
                            if term["weight"] is not None:
                                board.add_scalar(f"weight/{name}", term["weight"], self.step)
                    due_val = train.val_every > 0 and (self.step % train.val_every == 0 or self.step == end == train.iterations)
                    if due_val:
                        self._validate_and_log(log, board, bar)
                    if train.ckpt_every > 0 and self.step % train.ckpt_every == 0:
                        written = self.save([ckpt.periodic_name(self.step), ckpt.LAST])
                    stop = dist_utils.any_flag(self._stop_signal is not None)
                    if stop:
                        name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}.get(self._stop_signal, "a signal")
                        if not (train.ckpt_every > 0 and self.step % train.ckpt_every == 0):
                            written = self.save([ckpt.LAST])
                        reason = "signal"
                        self.info(f"train: stopped by {name} after step {self.step}; checkpoint {written}")
                        break
            if reason != "signal":
                if not (train.ckpt_every > 0 and self.step % train.ckpt_every == 0):
                    written = self.save([ckpt.LAST])
                if self.step < train.iterations:
                    reason = "stop_at"
        except BaseException as error:
            log.write({"event": "end", "step": self.step, "reason": "error", "error": f"{type(error).__name__}: {error}"})
            log.close()
            died = self._worker_death(error)
            if died is not None:
                raise died from None
            raise
        finally:
            if bar is not None:
                bar.close()
            del batches
            if board is not None:
                board.close()
        elapsed = time.perf_counter() - started
        digests = dist_utils.all_gather_objects(_weights_digest(self.net))
        log.write({"event": "end", "step": self.step, "reason": reason, "skipped_steps": self.skipped_steps,
                   "elapsed_s": round(elapsed, 3), "weights_sha256_per_rank": digests})
        log.close()
        if self.is_main:
            try:
                curves = write_loss_curves(self.output_dir / LOG_NAME, self.output_dir / CURVES_NAME)
            except Exception as error:  # plotting must never lose a finished run
                curves = None
                self._print(f"train: loss curves not written ({type(error).__name__}: {error})")
            rate = (self.step - start_step) / elapsed if elapsed > 0 else float("nan")
            best = f"; best val PSNR {self.best_psnr:.2f} dB at step {self.best_step}" if self.best_psnr is not None else ""
            self._print(f"train: step {self.step}/{train.iterations} in {elapsed:.1f} s ({rate:.2f} it/s), "
                        f"{self.skipped_steps} skipped; checkpoint {written}{best}"
                        + (f"; curves {curves}" if curves else ""))
        return FitResult(self.step, reason, written, self.best_psnr, self.skipped_steps)

    def _worker_death(self, error: BaseException) -> TrainingError | None:
        """torch's RuntimeError for a DataLoader worker that died -> one line naming the pair it was reading; else None."""
        text = str(error).strip()
        match = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", text)
        if not isinstance(error, RuntimeError) or match is None or self._reading is None:
            return None
        pids = {int(pid) for pid in re.findall(r"\d+", match.group(1))}
        reading = list(self._reading)
        indices = [reading[i + 1] for i in range(0, len(reading), 2) if reading[i] in pids and reading[i + 1] >= 0]
        records = getattr(self.train_set, "records", None)
        names = [f"{records[i].short} / {records[i].long}" if records is not None else f"item {i}" for i in indices]
        where = f"while reading {'; '.join(names)}" if names else "between samples"
        return TrainingError(
            f"{text.splitlines()[0].rstrip('. ')} {where}; rerun with data.num_workers=0 to see the error in this "
            "process, or lower data.num_workers if the machine ran out of memory"
        )

    def _validate_and_log(self, log: _JsonlLog, board: Any, bar: Any) -> None:
        """Validate, log the summary, write best.pt when the PSNR improved."""
        result = self.validate()
        if result is None:
            return
        summary = result["summary"]
        psnr = summary["all"]["psnr"]
        log.write({"step": self.step, "val": summary, "val_images_per_rank": result["per_rank"],
                   "ema": self.ema is not None})
        line = _format_groups(summary)
        if bar is not None:
            bar.write(f"val @ {self.step}: {line}", file=sys.stderr)
        else:
            self.info(f"val @ {self.step}: {line}")
        if board is not None:
            for key in ("psnr", "ssim", "delta_e00", "lpips"):
                if summary["all"].get(key) is not None:
                    board.add_scalar(f"val/{key}", summary["all"][key], self.step)
        if psnr is not None and math.isfinite(psnr) and (self.best_psnr is None or psnr > self.best_psnr):
            self.best_psnr, self.best_step = float(psnr), self.step
            self.save([ckpt.BEST])

    def _tensorboard(self) -> Any:
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._print("train: TensorBoard not installed (pip install tensorboard); logging to log.jsonl only")
            return None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))


# -------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _preserved_rngs() -> Iterator[None]:
    """Run validation without moving any global RNG (so when it runs never changes training)."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _average_reports(reports: list[dict[str, float]]) -> dict[str, float]:
    """Mean of the micro-batch loss reports, key by key."""
    keys = list(reports[0])
    return {key: sum(r[key] for r in reports) / len(reports) for key in keys}


def _all_reduce_report(report: dict[str, float]) -> dict[str, float]:
    """Average a report over ranks (identity in one process)."""
    if not dist_utils.is_distributed():
        return report
    parts = dist_utils.all_gather_objects(report)
    return {key: sum(p[key] for p in parts) / len(parts) for key in report}


def _weights_digest(model: nn.Module) -> str:
    """sha256 over a model's state_dict tensors (names and bytes), to compare ranks."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _format_groups(summary: dict[str, dict[str, Any]]) -> str:
    """'all 25.31 dB / 0.812 / dE 5.2 (n=6) | x100 ...' for one-line progress output."""
    parts = []
    for group, stats in summary.items():
        psnr = stats.get("psnr")
        ssim = stats.get("ssim")
        delta = stats.get("delta_e00")
        text = f"{group} " + (f"{psnr:.2f} dB" if psnr is not None else "- dB")
        text += f" / SSIM {ssim:.3f}" if ssim is not None else ""
        text += f" / dE00 {delta:.2f}" if delta is not None else ""
        parts.append(f"{text} (n={stats.get('n')})")
    return " | ".join(parts)
