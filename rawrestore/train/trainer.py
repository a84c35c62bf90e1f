"""The one Trainer: iteration-based training of a packed-RAW restoration network from an ExperimentConfig.

One optimiser step (`train.accumulate` micro-batches of `train.batch_size` per process):

    batch (dataset: exposure-aligned packed input, packed target, metadata; see `sampling`)
      -> [synthetic dark input from the clean target, when data.synthetic_noise]
      -> model under autocast (off | bf16 | fp16 + GradScaler on CUDA)
      -> LossStack (RAW terms, one render, sRGB terms, weighting) in float32
      -> backward (DDP averages gradients) -> unscale, clip, finite check -> fused Adam/AdamW step
      -> lr schedule (warmup + cosine | SID steps) -> EMA update (see `optim`)
      -> [with loss.gan: one discriminator step on the step's detached renders, its own Adam]

The step never reads a value back to the host: a step whose batch holds NaN/inf or whose loss or
gradient norm is not finite is skipped on the device (the fused optimiser's `found_inf`, the
EMA's skip flag), and the counters of skipped steps live on the device. Values are read once per
logging step (`train.log_every`, the last step, a stop): the log record, the progress bar, and
the check that `train.max_nonfinite` skipped steps in a row stop training with one line. With
fp16, a step the GradScaler skips (overflow) is skipped the same way but does not count as
non-finite in a row: it only lowers the scale.

Data order and sample seeding are functions of the step (`sampling`); together with the
checkpointed RNG, optimiser, EMA, loss-weighting and discriminator states, N steps + resume + N steps equals 2N
steps bit for bit on the CPU. With `data.sources` each step draws its batches from one source
(`sampling.SourceSchedule`) and synthesises with that source's settings; validation reports each
source, and best.pt follows the mean over sources of their PSNR. SIGTERM/SIGINT finish the
current step, write `last.pt` and return. One trainer per output_dir at a time (`runlock`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from rawrestore.config import ExperimentConfig, save_resolved, to_dict
from rawrestore.errors import ConfigError, InputError
from rawrestore.models import build_model_from_config, count_parameters
from rawrestore.train import checkpoint as ckpt
from rawrestore.train import distributed as dist_utils
from rawrestore.train.distributed import DistInfo
from rawrestore.train.optim import (
    AUTOCAST_DTYPES, ModelEMA, build_discriminator_optimizer, build_optimizer, lr_factor, resolve_amp, set_determinism,
)
from rawrestore.train.runlock import RunLock
from rawrestore.train.runlog import (
    LOG_NAME, JsonlLog, TrainingError, open_tensorboard, plot_curves, report_step, truncate_log,
)
from rawrestore.train.sampling import (
    SALT_RESEED, SALT_SYNTHETIC, SourceSchedule, build_loader, mix_seed, worker_death_message,
)
from rawrestore.train.signals import StopRequest
from rawrestore.train.step import StepOutcome, StepState, run_step, synthesize
from rawrestore.train.validation import validate, validate_and_log

__all__ = ["Trainer", "FitResult", "TrainingError"]

CONFIG_NAME = "config.yaml"
_log = logging.getLogger("rawrestore.train")


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
    `log` receives the one-line progress messages (default: the "rawrestore.train" logger);
    `stop` is the StopRequest a CLI installed before building the trainer (default: fit's own).
    """

    def __init__(self, cfg: ExperimentConfig, dist_info: DistInfo | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = True, stop: StopRequest | None = None):
        self.cfg = cfg
        self.dist = dist_info if dist_info is not None else dist_utils.init_distributed(cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self._print = log or _log.info
        self.progress = progress and self.is_main
        self.stop = stop if stop is not None else StopRequest()
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = ckpt.checkpoint_dir(self.output_dir)
        self.lock = RunLock(self.output_dir, report=self.info) if self.is_main else None
        train = cfg.train
        self.amp = resolve_amp(train.amp, self.device)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("config key 'train.amp' fp16 needs a CUDA GPU (GradScaler); use bf16 or off on the CPU")
        set_determinism(train.deterministic, self.device)

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

        # one entry per source (the data section itself without data.sources); a step's source is a function of the step
        self.sources = cfg.data.source_list()
        self.source_names = cfg.data.source_names()
        self.schedule = (SourceSchedule([source.weight for source in self.sources], cfg.seed)
                         if cfg.data.sources is not None else None)

        self.net = build_model_from_config(cfg.model, cfg.data.in_channels).to(self.device)
        if train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.net
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=device_ids)
        if train.compile:
            self.model = torch.compile(self.model)
        self.ema = ModelEMA(self.net, train.ema) if train.ema is not None else None
        self._synthetic_kernels: list[torch.Tensor | None] = []
        for index, source in enumerate(self.sources):
            kernel = None
            if source.synthetic_noise and source.synthetic_crosstalk != "identity":
                from rawrestore.physics.crosstalk import build_kernel

                key = "data.synthetic_crosstalk" if cfg.data.sources is None else f"data.sources[{index}].synthetic_crosstalk"
                try:
                    kernel = build_kernel(source.synthetic_crosstalk, source.cfa_period).to(self.device)
                except InputError as error:  # ConfigError included
                    raise ConfigError(f"config key '{key}': {error}") from None
            self._synthetic_kernels.append(kernel)

        from rawrestore.losses import LossStack

        periods = cfg.data.cfa_periods  # (2, 6) when sources mix CFAs: the crosstalk term keeps a kernel per period
        self.loss = LossStack(cfg.loss, total_steps=train.iterations,
                              cfa_period=periods[0] if len(periods) == 1 else periods,
                              scales=cfg.model.scales).to(self.device)
        self.optimizer = build_optimizer(self.net, self.loss.trainable_parameters(), train, self.device)
        adversary = self.loss.adversary  # loss.gan: its discriminator has an optimiser of its own
        self.d_optimizer = (build_discriminator_optimizer(adversary.discriminator, cfg.loss.gan, self.device)
                            if adversary is not None else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, train))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.autocast_dtype = AUTOCAST_DTYPES.get(self.amp)
        self.loss.backbone_dtype = self.autocast_dtype

        self.step = 0
        self._prepared = False  # resume() ran: lock held, leftovers cleared, log cut to the step
        self.state = StepState(self.device)
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        self._reading: Any = None  # (pid, dataset index) per DataLoader worker, see SeededSamples
        self.val_lpips: nn.Module | None = None
        self.val_lpips_note: str | None = None
        self.param_count = count_parameters(self.net)

    # ------------------------------------------------------------------ helpers

    @property
    def nonfinite_in_row(self) -> int:
        """Skipped non-finite steps in a row (a host read)."""
        return self.state.get(0)

    @property
    def skipped_steps(self) -> int:
        """Skipped steps in all (a host read)."""
        return self.state.get(1)

    def release_process_group(self) -> None:
        """Drop the DistributedDataParallel wrapper, whose reducer holds the process group; call before shutdown().

        A reducer that outlives destroy_process_group is torn down at interpreter exit, where gloo
        aborts the process now and then ("terminate called without an active exception", exit -6).
        """
        self.model = self.net

    def info(self, line: str) -> None:
        """Report one line on rank 0."""
        if self.is_main:
            self._print(line)

    def acquire_lock(self) -> None:
        """Hold output_dir/.lock (rank 0; idempotent): a second trainer on the folder stops with one line."""
        if self.lock is None or self.lock.held:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrainingError(f"cannot write to output_dir {self.output_dir}: {error.strerror or error}; "
                                "set output_dir to a folder that can be created and written") from None
        self.lock.acquire()

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _loader(self, start_step: int) -> Iterator[dict[str, Any]]:
        """Training micro-batches from optimiser step `start_step` on (see StepBatchSampler)."""
        batches, self._reading = build_loader(self.train_set, self.cfg, self.dist, start_step)
        return batches

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors to the device, except the CFA: host metadata isp plans from (it moves what it computes with)."""
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "cfa" else v)
                for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def source_of(self, step: int) -> int:
        """Index into `sources` of the source step `step` draws its batches from (0 without data.sources)."""
        return self.schedule.source(step) if self.schedule is not None else 0

    def _synthesize(self, batch: dict[str, Any], step: int, micro: int) -> None:
        """On-the-fly ELD dark input from the clean target, seeded by (seed, step, micro, rank); see `step.synthesize`."""
        source = self.source_of(step)
        synthesize(batch, self.sources[source], mix_seed(self.cfg.seed, SALT_SYNTHETIC, step, micro, self.dist.rank),
                   self.device, self._synthetic_kernels[source])

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> StepOutcome:
        """One optimiser step (see `step.run_step`); -> its outcome, read with `.record()`."""
        return run_step(self, batches)

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
            "discriminator_optimizer": self.d_optimizer.state_dict() if self.d_optimizer is not None else None,
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
            if self.d_optimizer is not None:
                if state.get("discriminator_optimizer") is None:
                    raise ValueError("it has no discriminator optimizer state (written without loss.gan)")
                self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
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
        self.state.set(0, int(trainer.get("nonfinite_in_row", 0)))
        self.state.set(1, int(trainer.get("skipped_steps", 0)))
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
            seed = mix_seed(self.cfg.seed, SALT_RESEED, self.step, self.dist.rank)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            self.info(f"resume: checkpoint was written by {saved_world} process(es), this run has "
                      f"{self.dist.world_size}; later batches differ from an uninterrupted run")

    def resume(self, spec: str | os.PathLike | None) -> bool:
        """Restore from 'auto' (newest valid checkpoint in output_dir, if any) or a path. -> True when resumed.

        Takes the run lock first. A fresh start (no spec, or 'auto' finding nothing) clears what a
        killed run left: temporary checkpoint files and its log records.
        """
        self.acquire_lock()
        self._prepared = True
        path: str | None = None
        if self.is_main:
            ckpt.clean_temporaries(self.ckpt_dir)
            if spec is not None and str(spec) == "auto":
                found = ckpt.find_resume(self.output_dir, report=self._print)
                path = str(found[0]) if found is not None else None
                if path is None:
                    self._print(f"resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            elif spec is not None:
                path = str(spec)
        path = dist_utils.broadcast_object(path)
        if path is not None:
            state = ckpt.load_checkpoint(path, map_location="cpu")
            self.load_state_dict(state, source=f"checkpoint {path}")
            self.info(f"resume: {path} at step {self.step}")
        if self.is_main:
            truncate_log(self.output_dir / LOG_NAME, self.step)
        return path is not None

    # ----------------------------------------------------------------------- fit

    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to cfg.train.iterations (or `stop_at` steps). -> FitResult; raises TrainingError on repeated non-finite steps."""
        train = self.cfg.train
        end = train.iterations if stop_at is None else min(stop_at, train.iterations)
        if not self._prepared:
            self.resume(None)  # a fresh run: take the lock, clear a killed run's leftovers
        self.acquire_lock()  # again after an earlier fit() of this trainer released it
        try:
            with self.stop.installed():
                return self._fit(end)
        finally:
            self.release_lock()

    def _fit(self, end: int) -> FitResult:
        train = self.cfg.train
        if self.is_main:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                save_resolved(self.cfg, self.output_dir / CONFIG_NAME)
            except OSError as error:
                raise TrainingError(f"cannot write to output_dir {self.output_dir}: {error.strerror or error}; "
                                    "set output_dir to a folder that can be created and written") from None
        scales = self.cfg.model.scales
        coarse = ", ".join(f"1/{2**i}" for i in range(1, len(scales)))
        outputs = f"; RAW terms also at {coarse} (model.scales {scales})" if len(scales) > 1 else ""
        self.info(f"model {self.cfg.model.name}: {self.param_count:,} parameters "
                  f"(in/out {self.cfg.data.in_channels} channels); loss terms: {', '.join(self.loss.term_names)}{outputs}")
        if self.loss.adversary is not None:
            gan = self.cfg.loss.gan
            self.info(f"loss.gan: {gan.kind}{' relativistic' if gan.relativistic else ''}, discriminator "
                      f"{count_parameters(self.loss.adversary.discriminator):,} parameters, lr {gan.lr:g}, "
                      f"from step {gan.warmup}")
        self.info(f"data: {len(self.train_set)} train pairs, {len(self.val_set) if self.val_set is not None else 0} val; "
                  f"device {self.device}, {self.dist.world_size} process(es), amp {self.amp}"
                  + (" (auto)" if train.amp == "auto" else ""))
        if self.cfg.data.sources is not None:
            sizes = getattr(self.train_set, "sizes", [len(self.train_set)])
            total = sum(source.weight for source in self.sources)
            self.info("sources: " + ", ".join(
                f"{name} ({source.camera}, {size} train pairs, {source.weight / total:.0%} of the steps)"
                for name, source, size in zip(self.source_names, self.sources, sizes)))
        last = self.ckpt_dir / ckpt.LAST
        if self.step >= end:
            self.info(f"train: already at step {self.step} of {end}; nothing to do")
            return FitResult(self.step, "done", last if last.is_file() else None, self.best_psnr, self.skipped_steps)
        if dist_utils.any_flag(self.stop.requested):
            self.info(f"train: stopped by {self.stop.name} before the first step; nothing trained"
                      + (f", {last} unchanged" if last.is_file() else ", no checkpoint written"))
            return FitResult(self.step, "signal", last if last.is_file() else None, self.best_psnr, self.skipped_steps)
        log = JsonlLog(self.output_dir / LOG_NAME, self.is_main)
        board = open_tensorboard(self.output_dir) if self.is_main else None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", unit="it", dynamic_ncols=True, mininterval=1.0)
        batches = self._loader(self.step)
        self.model.train()
        reason = "done"
        written: Path | None = None
        started, start_step = time.perf_counter(), self.step
        try:
            while self.step < end:
                tick = time.perf_counter()
                outcome = self._train_step(batches)
                stop = dist_utils.any_flag(self.stop.requested)
                checkpoint_due = train.ckpt_every > 0 and self.step % train.ckpt_every == 0
                if self.step % train.log_every == 0 or self.step == end or stop or checkpoint_due:
                    record = outcome.record()
                    record["time_s"] = round(time.perf_counter() - tick, 4)
                    log.write(record)
                    report_step(record, self.step, bar, board, self.info)
                    if record["peak_nonfinite_in_row"] >= train.max_nonfinite:
                        raise TrainingError(
                            f"{record['peak_nonfinite_in_row']} non-finite steps in a row (last: "
                            f"{record.get('reason', 'see log.jsonl')}) by step {self.step}; lower train.lr, set "
                            "train.grad_clip, or check the data")
                    self.state.set(2, 0)
                elif bar is not None:
                    bar.update(self.step - bar.n)
                due_val = train.val_every > 0 and (self.step % train.val_every == 0 or self.step == end == train.iterations)
                if due_val:
                    self._validate_and_log(log, board, bar)
                if checkpoint_due:
                    written = self.save([ckpt.periodic_name(self.step), ckpt.LAST])
                if stop:
                    if not checkpoint_due:
                        written = self.save([ckpt.LAST])
                    reason = "signal"
                    self.info(f"train: stopped by {self.stop.name} after step {self.step}; checkpoint {written}")
                    break
            if reason != "signal":
                if not (train.ckpt_every > 0 and self.step % train.ckpt_every == 0):
                    written = self.save([ckpt.LAST])
                if self.step < train.iterations:
                    reason = "stop_at"
        except BaseException as error:
            with contextlib.suppress(TrainingError):
                log.write({"event": "end", "step": self.step, "reason": "error", "error": f"{type(error).__name__}: {error}"})
            log.close()
            died = worker_death_message(error, self._reading, getattr(self.train_set, "records", None))
            if died is not None:
                raise TrainingError(died) from None
            raise
        finally:
            if bar is not None:
                bar.close()
            del batches
            if board is not None:
                board.close()
        elapsed = time.perf_counter() - started
        digests = dist_utils.all_gather_objects(dist_utils.weights_digest(self.net))
        log.write({"event": "end", "step": self.step, "reason": reason, "skipped_steps": self.skipped_steps,
                   "elapsed_s": round(elapsed, 3), "weights_sha256_per_rank": digests})
        log.close()
        if self.is_main:
            curves = plot_curves(self.output_dir, self._print)
            rate = (self.step - start_step) / elapsed if elapsed > 0 else float("nan")
            over = " (mean over sources)" if self.cfg.data.sources is not None else ""
            best = (f"; best val PSNR{over} {self.best_psnr:.2f} dB at step {self.best_step}"
                    if self.best_psnr is not None else "")
            self._print(f"train: step {self.step}/{train.iterations} in {elapsed:.1f} s ({rate:.2f} it/s), "
                        f"{self.skipped_steps} skipped; checkpoint {written}{best}" + (f"; curves {curves}" if curves else ""))
        return FitResult(self.step, reason, written, self.best_psnr, self.skipped_steps)

    def _validate_and_log(self, log: JsonlLog, board: Any, bar: Any) -> None:
        """Validate, log the summary, write best.pt when the PSNR improved (`validation.validate_and_log`)."""
        validate_and_log(self, log, board, bar)

    def validate(self) -> dict[str, Any] | None:
        """Metrics on the val split, scored as `rawrestore eval` scores them (`validation.validate`)."""
        return validate(self)
