"""LossStack: one training step's loss, built from a LossConfig, data flowing one way.

    prediction (packed or mosaic; with model.scales also its coarser packed outputs)
      -> RAW terms vs the target (raw_l1, charbonnier, robust), in the domain given; each coarse
         output vs the target block-averaged to its size (`isp.cfa.downsample_packed`), weighted by its scale
      -> crosstalk consistency on the full-resolution mosaic vs the aligned dark input
      -> render prediction AND target to sRGB once each with one `isp.ISP`
      -> every sRGB term on those two renders (perceptual, lpips, delta_e00, ssim, ms_ssim, edge, color_angle,
         gan; VGG and LPIPS on a step-placed window of them when loss.backbone_window < 1)
      -> weighting (fixed + schedules | uncertainty | softmax) -> total

Only terms that are active (weight non-zero at some point of training) are built and run; an
inactive VGG or LPIPS is never loaded. Pretrained backbones are loaded when the stack is built,
so missing weights fail before any training step (see `LossStack`).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from isp.cfa import downsample_packed, unpack
from isp.pipeline import ISP
from rawrestore.config.schema import LossConfig
from rawrestore.errors import ConfigError, InputError, WeightsError
from rawrestore.losses import LOSSES
from rawrestore.losses.adversarial import AdversarialLoss
from rawrestore.losses.term import DOMAINS, BuildContext
from rawrestore.losses.weighting import WEIGHTINGS, FixedWeighting

__all__ = ["LossStack", "BATCH_KEYS"]

_log = logging.getLogger("rawrestore.losses")

BATCH_KEYS = ("target", "input", "cfa", "wb", "cam_to_srgb")  # plus optional "packed"


def render_window(pred: torch.Tensor, target: torch.Tensor, fraction: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window of both renders, sides `fraction` of the image's, placed by the step alone. (B,3,H,W) -> (B,3,h,w).

    A function of `step` only, so a resumed run sees the same windows; over many steps every
    part of the crop is covered (the loss is a spatial mean, so this is its unbiased estimate
    on windows of that size).
    """
    height, width = pred.shape[-2:]
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    rng = np.random.default_rng(int(step))  # host numbers: placing the window reads nothing from the device
    top = int(rng.integers(height - h + 1))
    left = int(rng.integers(width - w + 1))
    return pred[..., top:top + h, left:left + w], target[..., top:top + h, left:left + w]


class LossStack(nn.Module):
    """The configured loss terms for one step. forward(pred (B,4|9,h,w) packed or (B,1,H,W), batch, step) -> (total (), values).

    `batch` holds `target` (like pred), `input` (the exposure-aligned dark input, like pred),
    `cfa` (P,P) or (B,P,P), `wb` (3,) or (B,3), `cam_to_srgb` (3,3) or (B,3,3) and optionally
    `packed` (bool or a (B,) bool tensor; inferred from pred's channels, 1 = mosaic, if absent).

    Multi-scale supervision (`model.scales`). Built with `scales=(w0, w1, ...)` (more than one),
    the stack takes `pred` as the sequence of the model's outputs (full, 1/2, ..., packed only),
    output i the shape of `downsample_packed(target, i)`. Every "raw"-domain term then runs at each
    scale against that exact block mean of the packed target, and the value the weighting sees is
    `sum_i w_i * term_i`; the "mosaic" and "srgb" terms see the full-resolution output only.
    `scales=(1.0,)` (the default) is the single-output stack, unchanged.

    Building. Every active term is built by its registry entry, `LOSSES[name].from_config(
    config.<name>, context)`, and run on the inputs its `domain` names (`losses.term`).
    `total_steps` is the run length the schedules refer to; `cfa_period` (2 or 6) goes to the
    terms that need it (crosstalk; otherwise they take the first batch's); a tuple such as (2, 6)
    serves a run whose sources mix CFAs (each batch then uses the kernel of its own period). Pretrained weights
    missing -> `WeightsError` right here, naming the file and the fix; with
    `config.drop_missing_pretrained` those terms are left out instead and ONE warning line is
    logged (`stack.dropped` lists them); `allow_random_backbones=True` (tests and benchmarks
    only, not a config key) builds random backbones and logs a loud line.

    Output. `values[name]` is each active term's raw value, a detached () tensor on the
    device: nothing is read back to the host. With more than one scale a RAW term's `values[name]`
    is that weighted sum and `values[name@1]`, `values[name@1/2]`, ... (`stack.scale_names`) its
    unweighted value at each scale. `report(values, step)` turns them into floats (one transfer)
    with each term's effective weight as `name + "/weight"` and the `"total"`.
    Under fixed weighting a term whose scheduled weight is 0 this step is evaluated without a
    graph, for the values only.

    Learnable weightings keep their parameters in `stack.weighting`: give
    `stack.trainable_parameters()` to the optimiser; `stack.state_dict()` holds them, and never
    the frozen backbones (reloaded from their weights files). `stack.render_count` counts ISP
    calls since construction, `stack.renders_last_step` those of the last forward (2 when any
    sRGB term is active: prediction and target); `stack.last_renders` holds that forward's two
    renders, detached (None without sRGB terms).

    The adversarial term (`stack.adversary`, `loss.gan`) owns a discriminator: in the state dict,
    not in `trainable_parameters()`; the training step updates it on `last_renders` with its own
    optimiser (`rawrestore.train.step`).
    """

    def __init__(self, config: LossConfig, total_steps: int, cfa_period: int | tuple[int, ...] | None = None,
                 allow_random_backbones: bool = False, scales: Sequence[float] = (1.0,)):
        super().__init__()
        if not isinstance(config, LossConfig):
            raise ConfigError(f"LossStack needs a LossConfig, got {type(config).__name__}")
        config.validate("loss")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"LossStack: total_steps must be an integer >= 1, got {total_steps!r}")
        periods = tuple(cfa_period) if isinstance(cfa_period, (tuple, list)) else (cfa_period,)
        if not periods or not all(period in (None, 2, 6) for period in periods) or (None in periods and len(periods) > 1):
            raise ConfigError(f"LossStack: cfa_period must be 2 (Bayer), 6 (X-Trans), a tuple of them or None, "
                              f"got {cfa_period!r}")
        cfa_period, other_periods = periods[0], tuple(periods[1:])
        if (isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                           for w in scales)):
            raise ConfigError(f"LossStack: scales must list finite weights > 0 (model.scales), got {scales!r}")
        self.scales = tuple(float(w) for w in scales)
        active = config.active_terms()
        unknown = [name for name in active if name not in LOSSES]
        if unknown:
            raise ConfigError(f"loss terms {unknown} have no implementation; known terms: {sorted(LOSSES)}")
        self.config = config
        self.total_steps = total_steps
        self.dropped: list[str] = []
        self.random_backbones: list[str] = []
        context = BuildContext(cfa_period, config.crosstalk_kernel, other_periods=other_periods)

        built: dict[str, nn.Module] = {}
        missing: list[str] = []
        # Terms with pretrained backbones first, so missing weights fail before anything else is built.
        for name in sorted(active, key=lambda n: not LOSSES[n].frozen_backbone):
            entry, term = LOSSES[name], active[name]
            if entry.domain not in DOMAINS:
                raise ConfigError(f"loss term '{name}' declares domain {entry.domain!r}; expected one of {DOMAINS}")
            try:
                built[name] = entry.from_config(term, context)
            except WeightsError as error:
                if allow_random_backbones:
                    built[name] = entry.from_config(term, BuildContext(cfa_period, config.crosstalk_kernel, True,
                                                                       other_periods))
                    self.random_backbones.append(name)
                elif config.drop_missing_pretrained:
                    self.dropped.append(name)
                    missing.append(str(error))
                else:
                    raise WeightsError(
                        f"loss term '{name}' (weights file: loss.{name}.weights): {error}; "
                        f"or set loss.{name}.weight: 0 / loss.drop_missing_pretrained: true"
                    ) from None
        if self.random_backbones:
            _log.warning(
                "LOSS STACK USES RANDOM %s BACKBONE(S) (allow_random_backbones=True): their values mean nothing; "
                "tests and benchmarks only", "/".join(self.random_backbones).upper(),
            )
        if self.dropped:
            _log.warning(
                "loss terms %s left out: pretrained weights missing (%s); drop_missing_pretrained is set",
                ", ".join(self.dropped), " | ".join(missing),
            )
        self.term_names = tuple(name for name in active if name not in self.dropped)
        if not self.term_names:
            raise ConfigError("loss: every active term was left out for missing pretrained weights; turn on another term")
        self.terms = nn.ModuleDict({name: built[name] for name in self.term_names})
        self.domains = {name: LOSSES[name].domain for name in self.term_names}
        multi = len(self.scales) > 1
        self.scale_labels = tuple("1" if i == 0 else f"1/{2**i}" for i in range(len(self.scales)))
        # value name -> its term, in log order: each term, then its per-scale values (RAW terms, several scales)
        self.value_names: tuple[str, ...] = tuple(
            value
            for name in self.term_names
            for value in (name, *(f"{name}@{label}" for label in self.scale_labels if multi and self.domains[name] == "raw"))
        )
        self.scale_names = tuple(name for name in self.value_names if "@" in name)

        kept = {name: active[name] for name in self.term_names}
        if config.weighting == "fixed":
            self.weighting = FixedWeighting(kept, total_steps)
        elif config.weighting in WEIGHTINGS:
            self.weighting = WEIGHTINGS[config.weighting](self.term_names, {n: t.weight for n, t in kept.items()})
        else:
            raise ConfigError(f"loss.weighting must be one of {sorted(WEIGHTINGS)}, got {config.weighting!r}")
        self.isp = ISP(demosaic=config.render_demosaic, gamma="srgb")
        # Mixed precision for the frozen VGG/LPIPS backbones (set by the trainer from train.amp):
        # they dominate the stack's cost and, being frozen feature extractors, lose nothing in bf16.
        self.backbone_dtype: torch.dtype | None = None
        self.render_count = 0
        self.renders_last_step = 0
        self.last_renders: tuple[torch.Tensor, torch.Tensor] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The learnable weighting parameters (empty for fixed weighting); the backbones are frozen, the discriminator apart."""
        return [p for p in self.weighting.parameters() if p.requires_grad]

    @property
    def adversary(self) -> AdversarialLoss | None:
        """The active adversarial term (`loss.gan`), whose discriminator the training step updates; else None."""
        return next((term for term in self.terms.values() if isinstance(term, AdversarialLoss)), None)

    def render(self, mosaic: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """sRGB render of a mosaic with the batch's metadata. (B,1,H,W) -> (B,3,H',W'); counted in render_count."""
        self.render_count += 1
        self.renders_last_step += 1
        return self.isp(mosaic, batch["cfa"], batch["wb"], batch["cam_to_srgb"], packed=False)

    def weights_now(self, step: int) -> dict[str, float]:
        """{term: effective weight at `step`} (a host read for learnable weightings)."""
        return {name: float(weight) for name, weight in self.weighting.effective_weights(step).items()}

    def report(self, values: Mapping[str, torch.Tensor], step: int, total: torch.Tensor | None = None) -> dict[str, float]:
        """Floats for a log: each term's value and `name/weight`, the per-scale values, and `total` (recomputed when
        not given); one transfer."""
        tensors = [values[name].reshape(()).double() for name in self.value_names]
        if total is not None:
            tensors.append(total.detach().reshape(()).double())
        numbers = torch.stack(tensors).tolist()
        weights = self.weights_now(step)
        out: dict[str, float] = {}
        for index, name in enumerate(self.value_names):
            out[name] = numbers[index]
            if name in weights:
                out[f"{name}/weight"] = weights[name]
        out["total"] = numbers[-1] if total is not None else sum(weights[n] * out[n] for n in self.term_names)
        return out

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], batch: Mapping[str, Any],
                step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise InputError(f"loss batch lacks {missing}; it needs {list(BATCH_KEYS)} (+ optional 'packed')")
        outputs = tuple(pred) if isinstance(pred, (tuple, list)) else (pred,)
        if len(outputs) != len(self.scales):
            raise InputError(f"the model gave {len(outputs)} output(s) but the loss has {len(self.scales)} scale(s) "
                             f"(model.scales {list(self.scales)}); build both from one config")
        pred = outputs[0]
        target, cfa = batch["target"], batch["cfa"]
        if not isinstance(pred, torch.Tensor) or pred.ndim != 4 or pred.shape != target.shape:
            raise InputError(
                f"prediction {tuple(getattr(pred, 'shape', ()))} and target {tuple(getattr(target, 'shape', ()))} must be equal (B,C,H,W)"
            )
        packed = _packed_flag(batch, pred)
        targets = self._scale_targets(outputs, target, packed)
        self.renders_last_step = 0
        self.last_renders = None
        learnable = getattr(self.weighting, "learnable", False)
        weights = None if learnable else self.weighting.effective_weights(step)  # host numbers: fixed schedules only
        values: dict[str, torch.Tensor] = {}

        def run(name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
            module = self.terms[name]
            with torch.set_grad_enabled(torch.is_grad_enabled() and (learnable or weights[name] > 0)):
                if self.backbone_dtype is not None and module.frozen_backbone:
                    with torch.autocast(pred.device.type, dtype=self.backbone_dtype):
                        return module(*args, **kwargs).float()
                return module(*args, **kwargs)

        by_domain = {domain: [n for n in self.term_names if self.domains[n] == domain] for domain in DOMAINS}
        for name in by_domain["raw"]:
            if len(outputs) == 1:
                values[name] = run(name, pred, target)
                continue
            per_scale = [run(name, output, reference) for output, reference in zip(outputs, targets)]
            for label, value in zip(self.scale_labels, per_scale):
                values[f"{name}@{label}"] = value
            values[name] = torch.stack(per_scale) @ per_scale[0].new_tensor(self.scales)
        if by_domain["mosaic"] or by_domain["srgb"]:
            pred_mosaic = unpack(pred, cfa) if packed else pred
            if by_domain["mosaic"]:
                aligned = unpack(batch["input"], cfa) if packed else batch["input"]
                for name in by_domain["mosaic"]:
                    values[name] = run(name, pred_mosaic, aligned, cfa=cfa)
            if by_domain["srgb"]:
                target_mosaic = unpack(target, cfa) if packed else target
                pred_srgb = self.render(pred_mosaic, batch)
                with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
                    target_srgb = self.render(target_mosaic, batch)
                self.last_renders = (pred_srgb.detach(), target_srgb.detach())
                window = self.config.backbone_window
                for name in by_domain["srgb"]:
                    if self.terms[name].frozen_backbone and window < 1.0:
                        values[name] = run(name, *render_window(pred_srgb, target_srgb, window, step))
                    else:
                        values[name] = run(name, pred_srgb, target_srgb)
        total = self.weighting({name: values[name] for name in self.term_names}, step)
        return total, {name: values[name].detach().reshape(()) for name in self.value_names}

    def _scale_targets(self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor, packed: bool) -> list[torch.Tensor]:
        """[target, its 2x2 block mean, its 4x4 block mean, ...], one per output; each output's shape checked against it."""
        if len(outputs) == 1:
            return [target]
        if not packed:
            raise InputError("multi-scale outputs (model.scales) need packed RAW: a block mean of a mosaic mixes colours")
        targets = [target] + [downsample_packed(target, scale) for scale in range(1, len(outputs))]
        for scale, (output, reference) in enumerate(zip(outputs, targets)):
            if not isinstance(output, torch.Tensor) or output.shape != reference.shape:
                raise InputError(f"output at 1/{2**scale} has shape {tuple(getattr(output, 'shape', ()))}, "
                                 f"expected {tuple(reference.shape)} (the target block-averaged to that scale)")
        return targets

    def extra_repr(self) -> str:
        dropped = f", dropped={self.dropped}" if self.dropped else ""
        scales = f", scales={list(self.scales)}" if len(self.scales) > 1 else ""
        return (f"terms={list(self.term_names)}, weighting={self.config.weighting}, total_steps={self.total_steps}"
                f"{scales}{dropped}")


def _packed_flag(batch: Mapping[str, Any], pred: torch.Tensor) -> bool:
    """Whether pred/target/input are packed: batch['packed'] (bool or (B,) bools), else pred has 4 or 9 channels."""
    if "packed" not in batch:
        return pred.shape[1] != 1
    flag = batch["packed"]
    if isinstance(flag, torch.Tensor):
        if flag.numel() == 0 or bool(flag.all()) != bool(flag.any()):
            raise InputError("batch['packed'] mixes packed and mosaic samples; collate one kind per batch")
        flag = bool(flag.all())
    elif isinstance(flag, (list, tuple)):
        if not flag or len(set(map(bool, flag))) != 1:
            raise InputError("batch['packed'] mixes packed and mosaic samples; collate one kind per batch")
        flag = bool(flag[0])
    packed = bool(flag)
    if packed and pred.shape[1] not in (4, 9):
        raise InputError(f"batch says packed but the prediction has {pred.shape[1]} channels (expected 4 Bayer or 9 X-Trans)")
    if not packed and pred.shape[1] != 1:
        raise InputError(f"batch says mosaic but the prediction has {pred.shape[1]} channels (expected 1)")
    return packed
