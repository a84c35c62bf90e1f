"""One optimiser step, kept on the device: forward, loss, backward, finite checks, update, EMA.

`run_step(trainer, batches)` reads nothing back to the host. Whether the step is skipped is a
bool tensor (`skip`): the fused optimiser takes it as `found_inf`, the EMA as its skip flag, and
the skipped-step counters (`StepState`) are updated with it on the device. The returned
`StepOutcome` holds the step's numbers as tensors; `StepOutcome.record()` reads them all in one
transfer, which the trainer does only on logging steps.

Skip reasons (bits of `StepState.reason`): 1 the batch holds NaN/inf (it is zeroed so every DDP
rank still runs forward and backward), 2 the loss is not finite, 4 the gradient norm is not
finite; with the fp16 GradScaler, bit 4 alone is an overflow: skipped, scale lowered, and the
non-finite-in-a-row counter neither grows nor resets.

With an adversarial term (`loss.gan`, from step `loss.gan.warmup` on) the discriminator takes one
step after the model's, on the detached renders the stack made for each micro-batch
(`LossStack.last_renders`: nothing is rendered again), with its own fused Adam; it is skipped
with the model's step or when its own loss is not finite. Its gradients are averaged over DDP
ranks by hand (`average_gradients`): it is not wrapped in DistributedDataParallel. Its loss and
accuracy join the step's numbers (`gan/d_loss`, `gan/d_acc` in the record).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from rawrestore.errors import DataError
from rawrestore.train import distributed as dist_utils
from rawrestore.train.sampling import LoadFailure

if TYPE_CHECKING:
    from rawrestore.losses.adversarial import AdversarialLoss
    from rawrestore.train.trainer import Trainer

__all__ = ["StepState", "StepOutcome", "run_step", "discriminator_step", "synthesize", "REASONS"]

BATCH_NONFINITE, LOSS_NONFINITE, GRAD_NONFINITE = 1, 2, 4
REASONS = {BATCH_NONFINITE: "batch holds NaN/inf", LOSS_NONFINITE: "non-finite loss", GRAD_NONFINITE: "non-finite gradient"}
_IN_ROW, _SKIPPED, _PEAK, _REASON = range(4)


class StepState:
    """Skipped-step counters on the device: in a row, in all, the peak in a row since last read, the last reason bits."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(4, dtype=torch.int64, device=device)

    def get(self, index: int) -> int:
        return int(self.values[index])

    def set(self, index: int, value: int) -> None:
        self.values[index] = int(value)

    def update(self, skip: torch.Tensor, reason: torch.Tensor, overflow: torch.Tensor) -> None:
        """Count one step: a skip grows the in-a-row run, an fp16 overflow leaves it, an update resets it."""
        in_row = self.values[_IN_ROW]
        counted = skip & ~overflow
        in_row = torch.where(counted, in_row + 1, torch.where(overflow, in_row, torch.zeros_like(in_row)))
        self.values[_IN_ROW] = in_row
        self.values[_SKIPPED] += skip.to(torch.int64)
        self.values[_PEAK] = torch.maximum(self.values[_PEAK], in_row)
        self.values[_REASON] = reason


@dataclass
class StepOutcome:
    """A finished step's numbers, still on the device. record() -> the log record (one host read)."""

    step: int  # the step number after this step (1-based)
    lr: float
    names: tuple[str, ...]
    values: torch.Tensor  # (N + 2 + E,) float64: term means, total, grad norm, then the `extras`
    state: torch.Tensor  # StepState.values after the step
    weights: Callable[[], dict[str, float]]  # the terms' effective weights, read with the record
    scaler_enabled: bool
    extras: tuple[str, ...] = ()  # record keys of the numbers after the grad norm (the GAN discriminator's)

    def record(self) -> dict[str, Any]:
        """The log record: losses averaged over micro-batches and ranks (all ranks call it together)."""
        values = dist_utils.mean_tensor(self.values)
        numbers = torch.cat([values, self.state.to(values.dtype)]).tolist()
        count, after = len(self.names), len(self.names) + 2 + len(self.extras)
        in_row, skipped, peak, reason = (int(v) for v in numbers[after:])
        record: dict[str, Any] = {"step": self.step, "lr": self.lr}
        if reason:
            names = [text for bit, text in REASONS.items() if reason & bit]
            if reason == GRAD_NONFINITE and self.scaler_enabled:
                names = ["fp16 overflow (GradScaler lowered its scale)"]
            record.update(skipped=True, reason="; ".join(names), nonfinite_in_row=in_row)
        else:
            record["loss"] = numbers[count]
            weights = self.weights()
            record["terms"] = {n: {"value": numbers[i], "weight": weights.get(n)} for i, n in enumerate(self.names)}
            record["grad_norm"] = numbers[count + 1]
            record.update(zip(self.extras, numbers[count + 2:after]))
        record["skipped_steps"] = skipped
        record["peak_nonfinite_in_row"] = peak
        return record


def synthesize(batch: dict[str, Any], data: Any, seed: int, device: torch.device, kernel: torch.Tensor | None) -> None:
    """batch["input"] = an ELD dark input made from the clean target (data.synthetic_noise), drawn from `seed`.

    `data` is the data section of the batch's source (the `data` config, or one of data.sources).
    Per-pixel noise from a device generator, the per-sample noise parameters from a host
    generator (numbers the host needs anyway, so nothing is read back); gain jitter and the
    data.synthetic_ratio draws first, when configured.
    """
    from rawrestore.data.dataset import jitter_gains, synthesize_input

    generator = torch.Generator(device=device).manual_seed(seed)
    if data.gain_jitter > 0:
        batch["target"] = jitter_gains(batch["target"], batch["cfa"], data.gain_jitter, generator)
    if data.synthetic_ratio is not None:
        low, high = (math.log(v) for v in data.synthetic_ratio)
        draws = torch.rand(batch["target"].shape[0], generator=generator, device=device, dtype=torch.float64)
        batch["ratio"] = (low + draws * (high - low)).exp().to(batch["ratio"].dtype)
    batch["input"] = synthesize_input(batch, generator=generator, noise_camera=data.noise_camera, clip=data.clip_aligned,
                                      crosstalk=kernel, param_rng=np.random.default_rng(seed), checked=True)


def _finite_batch(batch: dict[str, Any]) -> torch.Tensor:
    """() bool: input and target hold no NaN/inf; a bad batch is zeroed in place of its values (the step is skipped)."""
    finite = torch.isfinite(batch["input"]).all() & torch.isfinite(batch["target"]).all()
    for key in ("input", "target"):
        batch[key] = torch.where(finite, batch[key], torch.zeros((), dtype=batch[key].dtype, device=batch[key].device))
    return finite


def run_step(trainer: "Trainer", batches: Iterator[Any]) -> StepOutcome:
    """One optimiser step over `train.accumulate` micro-batches; nothing is read back to the host."""
    train = trainer.cfg.train
    step = trainer.step
    device = trainer.device
    trainer.optimizer.zero_grad(set_to_none=True)
    finite = torch.ones((), dtype=torch.bool, device=device)
    totals: list[torch.Tensor] = []
    terms: list[dict[str, torch.Tensor]] = []
    adversary = trainer.loss.adversary
    renders: list[tuple[torch.Tensor, torch.Tensor]] = []  # each micro-batch's renders, for the discriminator
    for micro in range(train.accumulate):
        batch = next(batches)  # always consumed: the data stream follows the step
        if isinstance(batch, LoadFailure):
            raise DataError(batch.message)
        batch = trainer._to_device(batch)
        if "input" not in batch:  # a synthetic-noise source: the dataset left the dark input to the step
            trainer._synthesize(batch, step, micro)
        finite = finite & _finite_batch(batch)
        last_micro = micro == train.accumulate - 1
        sync = contextlib.nullcontext() if (last_micro or not trainer.dist.distributed) else trainer.model.no_sync()
        with sync:
            model_input = batch["input"]
            if train.channels_last:
                model_input = model_input.contiguous(memory_format=torch.channels_last)
            with trainer._autocast():
                pred = trainer.model(model_input)
            # a model with model.scales returns (full, 1/2, ...) while training
            pred = tuple(p.float() for p in pred) if isinstance(pred, (tuple, list)) else pred.float()
            total, values = trainer.loss(pred, batch, step)
            # backward even when non-finite: every DDP rank must take part; the update is dropped on the device
            trainer.scaler.scale(total / train.accumulate).backward()
        totals.append(total.detach())
        terms.append(values)
        if adversary is not None:
            renders.append(trainer.loss.last_renders)
    totals_t = torch.stack(totals)
    loss_finite = torch.isfinite(totals_t).all()
    dist_utils.average_gradients(trainer.loss.trainable_parameters())
    if trainer.scaler.is_enabled():
        trainer.scaler.unscale_(trainer.optimizer)
    grads = [p.grad for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    if train.grad_clip is not None and grads:
        torch.nn.utils.clip_grads_with_norm_(
            [p for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None],
            train.grad_clip, norm)
    grad_finite = torch.isfinite(norm)
    reason = ((~finite).to(torch.int64) * 1 + (~loss_finite & finite).to(torch.int64) * 2
              + (~grad_finite & finite & loss_finite).to(torch.int64) * 4)
    reason = dist_utils.max_tensor(reason)  # every rank skips together
    skip = reason > 0
    overflow = (reason == GRAD_NONFINITE) if trainer.scaler.is_enabled() else torch.zeros_like(skip)
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.optimizer.found_inf = skip.to(torch.float32)  # the fused kernel skips the update (and its step count)
    trainer.optimizer.step()
    if trainer.scaler.is_enabled():
        trainer.scaler.update()
    if trainer.ema is not None:
        trainer.ema.update(trainer.net, skip)
    extras: dict[str, torch.Tensor] = {}
    if adversary is not None and step >= trainer.cfg.loss.gan.warmup:
        extras = discriminator_step(adversary, trainer.d_optimizer, renders, skip)
    trainer.state.update(skip, reason, overflow)
    trainer.scheduler.step()
    trainer.step += 1
    names = tuple(terms[0])
    means = [torch.stack([t[name] for t in terms]).mean() for name in names]
    numbers = torch.stack([v.to(torch.float64) for v in (*means, totals_t.mean(), norm, *extras.values())])
    return StepOutcome(trainer.step, lr, names, numbers, trainer.state.values.clone(),
                       lambda: trainer.loss.weights_now(step), trainer.scaler.is_enabled(), tuple(extras))


def discriminator_step(adversary: "AdversarialLoss", optimizer: torch.optim.Optimizer,
                       renders: list[tuple[torch.Tensor, torch.Tensor]], skip: torch.Tensor) -> dict[str, torch.Tensor]:
    """One update of the GAN discriminator on a step's detached (pred, target) renders; nothing read to the host.

    Skipped on the device (the fused optimiser's `found_inf`) with the model's step (`skip`) or
    when its loss is not finite on any rank. -> {"gan/d_loss": (), "gan/d_acc": ()}.
    """
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy = adversary.discriminator_backward(renders)
    dist_utils.average_gradients([p for p in adversary.discriminator.parameters() if p.requires_grad])
    bad = dist_utils.max_tensor((skip | ~torch.isfinite(loss)).to(torch.int64))  # every rank skips together
    optimizer.found_inf = bad.to(torch.float32)
    optimizer.step()
    return {"gan/d_loss": loss, "gan/d_acc": accuracy}
