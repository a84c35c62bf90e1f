"""Optimisation helpers of the trainer: AMP choice, the optimiser, learning-rate schedules, EMA of the weights.

Everything a step does here stays on the device: the optimiser is Adam/AdamW with `fused=True`
where the device supports it, whose `found_inf` flag skips an update on the device (no host
read), and the EMA takes the same flag, so a skipped step neither moves nor counts in the average.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["set_determinism", "resolve_amp", "cpu_flags", "lr_factor", "onecycle_factor", "build_optimizer",
           "build_discriminator_optimizer", "ModelEMA", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the OS reports (Linux /proc/cpuinfo); empty where there is no such file."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp with "auto" resolved: bf16 where the hardware runs it natively, else fp16 (CUDA) or off.

    On the CPU, bf16 is native with AVX512-BF16 or AMX (the CPU's own flags); elsewhere oneDNN
    emulates it and it is slower than float32, so "auto" is off.
    """
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_flags() & set(_CPU_BF16_FLAGS) else "off"
    return "off"


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """train.deterministic: deterministic kernels everywhere (cuDNN, cuBLAS workspace), no cuDNN autotuning.

    Off: cuDNN picks the fastest convolution per shape on CUDA (`cudnn.benchmark`): training crops have
    one shape per run (data.crop_size), so the search is paid once. On: no search, deterministic kernels.
    """
    if not deterministic:
        torch.backends.cudnn.benchmark = device.type == "cuda"
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs a fixed workspace
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def onecycle_factor(step: int, iterations: int, pct_start: float, div_factor: float, final_div_factor: float) -> float:
    """torch's OneCycleLR (cosine, two phases) at `step` over max_lr; steps past the run keep the last value."""
    step = min(step, iterations - 1)
    initial = 1.0 / div_factor
    peak_step = float(pct_start * iterations) - 1  # where OneCycleLR's first phase ends
    if step <= peak_step:
        progress, start, end = step / peak_step, initial, 1.0
    else:
        progress, start, end = (step - peak_step) / (iterations - 1 - peak_step), 1.0, initial / final_div_factor
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1)


def lr_factor(step: int, cfg_train: Any) -> float:
    """Multiplier of train.lr for optimiser step `step` (0-based): linear warmup, then cosine to 0, SID steps or OneCycle."""
    if cfg_train.schedule == "onecycle":
        return onecycle_factor(step, cfg_train.iterations, cfg_train.onecycle_pct_start, cfg_train.onecycle_div_factor,
                               cfg_train.onecycle_final_div_factor)
    warmup = cfg_train.warmup_iters
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg_train.schedule == "cosine":
        span = max(1, cfg_train.iterations - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for milestone in cfg_train.step_milestones if step >= milestone)
    return cfg_train.step_gamma ** passed


def build_optimizer(net: nn.Module, extra: list[nn.Parameter], cfg_train: Any, device: torch.device) -> torch.optim.Optimizer:
    """Adam/AdamW over the network's parameters (+ `extra`, e.g. learnable loss weights, without weight decay).

    Fused on every device type torch has a fused kernel for (CPU, CUDA): it takes a `found_inf`
    flag tensor and skips the update on the device.
    """
    groups: list[dict[str, Any]] = [{"params": [p for p in net.parameters() if p.requires_grad]}]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    optimizer_cls = torch.optim.AdamW if cfg_train.optimizer == "adamw" else torch.optim.Adam
    fused = device.type in ("cpu", "cuda")
    return optimizer_cls(groups, lr=cfg_train.lr, weight_decay=cfg_train.weight_decay, fused=fused)


def build_discriminator_optimizer(discriminator: nn.Module, term: Any, device: torch.device) -> torch.optim.Optimizer:
    """Adam over a GAN discriminator's parameters with `loss.gan.lr` (constant) and `loss.gan.betas`; fused like the model's."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(discriminator.parameters(), lr=term.lr, betas=tuple(term.betas), fused=fused)


class ModelEMA:
    """Exponential moving average of a model's weights; decay warms up as min(decay, (1 + n) / (10 + n)).

    `n` (`updates`) counts the updates that happened; it lives on the device with the weights,
    so `update(model, skip)` with a skip flag tensor needs no host read.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(iter(self.module.state_dict().values())).device if self.module.state_dict() else torch.device("cpu")
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def updates(self) -> int:
        """Updates so far (a host read: for checkpoints and logs, not inside a step)."""
        return int(self._updates)

    @updates.setter
    def updates(self, value: int) -> None:
        self._updates.fill_(int(value))

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the average towards `model`'s current weights (buffers are copied); nothing moves where `skip` is true."""
        keep = None if skip is None else ~skip.to(torch.bool)
        if keep is None:
            self._updates += 1
        else:
            self._updates += keep.to(torch.int64)
        count = self._updates.to(torch.float64)
        decay = torch.clamp((1 + count) / (10 + count), max=self.decay)
        weight = 1.0 - decay
        if keep is not None:
            weight = weight * keep
        source = model.state_dict()
        weights: dict[torch.dtype, torch.Tensor] = {}
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                if value.dtype not in weights:
                    weights[value.dtype] = weight.to(value.dtype)
                value.lerp_(source[name].to(value.dtype), weights[value.dtype])
            elif keep is None:
                value.copy_(source[name])
            else:
                value.copy_(torch.where(keep, source[name], value))
