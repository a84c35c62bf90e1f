"""LossStack: one training step's loss, built from a LossConfig, data flowing one way.

    prediction (packed or mosaic)
      -> RAW terms vs the target (raw_l1, charbonnier, robust), in the domain given
      -> crosstalk consistency on the full-resolution mosaic vs the aligned dark input
      -> render prediction AND target to sRGB once each with one `isp.ISP`
      -> every sRGB term on those two renders (perceptual, lpips, delta_e00, ssim, ms_ssim, edge, color_angle;
         VGG and LPIPS on a step-placed window of them when loss.backbone_window < 1)
      -> weighting (fixed + schedules | uncertainty | softmax) -> total

Only terms that are active (weight non-zero at some point of training) are built and run; an
inactive VGG or LPIPS is never loaded. Pretrained backbones are loaded when the stack is built,
so missing weights fail before any training step (see `LossStack`).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from isp.cfa import unpack
from isp.pipeline import ISP
from rawrestore.config.schema import LossConfig, LossTermConfig
from rawrestore.errors import ConfigError, InputError, WeightsError
from rawrestore.losses import LOSSES
from rawrestore.losses.perceptual import LPIPSLoss, PerceptualLoss
from rawrestore.losses.raw import CharbonnierLoss, CrosstalkConsistencyLoss, RobustLoss
from rawrestore.losses.srgb import MSSSIMLoss
from rawrestore.losses.weighting import WEIGHTINGS, FixedWeighting
from rawrestore.physics.crosstalk import build_kernel

__all__ = ["LossStack", "BATCH_KEYS"]

_log = logging.getLogger("rawrestore.losses")

BATCH_KEYS = ("target", "input", "cfa", "wb", "cam_to_srgb")  # plus optional "packed"
_PRETRAINED = ("perceptual", "lpips")


def render_window(pred: torch.Tensor, target: torch.Tensor, fraction: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window of both renders, sides `fraction` of the image's, placed by the step alone. (B,3,H,W) -> (B,3,h,w).

    A function of `step` only, so a resumed run sees the same windows; over many steps every
    part of the crop is covered (the loss is a spatial mean, so this is its unbiased estimate
    on windows of that size).
    """
    height, width = pred.shape[-2:]
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    generator = torch.Generator().manual_seed(int(step))
    top = int(torch.randint(height - h + 1, (), generator=generator))
    left = int(torch.randint(width - w + 1, (), generator=generator))
    return pred[..., top:top + h, left:left + w], target[..., top:top + h, left:left + w]


def _build_term(name: str, term: LossTermConfig, allow_random: bool, period: int | None, kernel_spec: str) -> nn.Module | None:
    """One term module from its config entry; None for crosstalk whose CFA period is not known yet."""
    if name == "charbonnier":
        return CharbonnierLoss(term.eps)
    if name == "robust":
        return RobustLoss(term.alpha, term.scale)
    if name == "crosstalk":
        return None if period is None else CrosstalkConsistencyLoss(build_kernel(kernel_spec, period))
    if name == "perceptual":
        return PerceptualLoss.from_pretrained(
            term.arch, term.weights, layers=term.layers, criterion=term.criterion,
            layer_weights=term.layer_weights, allow_random=allow_random,
        )
    if name == "lpips":
        return LPIPSLoss.from_pretrained(term.net, term.weights, allow_random=allow_random)
    if name == "ms_ssim":
        return MSSSIMLoss(fallback=term.fallback)
    return LOSSES[name]()


class LossStack(nn.Module):
    """The configured loss terms for one step. forward(pred (B,4|9,h,w) packed or (B,1,H,W), batch, step) -> (total (), report).

    `batch` holds `target` (like pred), `input` (the exposure-aligned dark input, like pred),
    `cfa` (P,P) or (B,P,P), `wb` (3,) or (B,3), `cam_to_srgb` (3,3) or (B,3,3) and optionally
    `packed` (bool or a (B,) bool tensor; inferred from pred's channels, 1 = mosaic, if absent).

    Building. `total_steps` is the run length the schedules refer to; `cfa_period` (2 or 6)
    builds the crosstalk kernel at once (otherwise at the first step, from the batch's CFA).
    VGG/LPIPS weights missing -> `WeightsError` right here, naming the file and the fix; with
    `config.drop_missing_pretrained` those terms are left out instead and ONE warning line is
    logged (`stack.dropped` lists them); `config.allow_random_backbones` (tests and benchmarks
    only, it takes precedence) builds random backbones and logs a loud line.

    Report: for each active term `report[name]` = its raw value and `report[name + "/weight"]`
    = its effective weight this step, plus `report["total"]`, all floats (one device sync).
    Under fixed weighting a term whose scheduled weight is 0 this step is evaluated without a
    graph, for the report only.

    Learnable weightings keep their parameters in `stack.weighting`: give
    `stack.trainable_parameters()` to the optimiser; `stack.state_dict()` holds them, and never
    the frozen backbones (reloaded from their weights files). `stack.render_count` counts ISP
    calls since construction, `stack.renders_last_step` those of the last forward (2 when any
    sRGB term is active: prediction and target).
    """

    def __init__(self, config: LossConfig, total_steps: int, cfa_period: int | None = None):
        super().__init__()
        if not isinstance(config, LossConfig):
            raise ConfigError(f"LossStack needs a LossConfig, got {type(config).__name__}")
        config.validate("loss")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"LossStack: total_steps must be an integer >= 1, got {total_steps!r}")
        if cfa_period not in (None, 2, 6):
            raise ConfigError(f"LossStack: cfa_period must be 2 (Bayer), 6 (X-Trans) or None, got {cfa_period!r}")
        active = config.active_terms()
        unknown = [name for name in active if name not in LOSSES]
        if unknown:
            raise ConfigError(f"loss terms {unknown} have no implementation; known terms: {sorted(LOSSES)}")
        self.config = config
        self.total_steps = total_steps
        self.crosstalk_spec = config.crosstalk_kernel
        self.dropped: list[str] = []
        self.random_backbones: list[str] = []

        built: dict[str, nn.Module | None] = {}
        missing: list[str] = []
        # Pretrained terms first, so missing weights fail before anything else is built.
        for name in sorted(active, key=lambda n: n not in _PRETRAINED):
            term = active[name]
            if name not in _PRETRAINED:
                built[name] = _build_term(name, term, False, cfa_period, config.crosstalk_kernel)
                continue
            try:
                built[name] = _build_term(name, term, False, cfa_period, config.crosstalk_kernel)
            except WeightsError as error:
                if config.allow_random_backbones:
                    built[name] = _build_term(name, term, True, cfa_period, config.crosstalk_kernel)
                    self.random_backbones.append(name)
                elif config.drop_missing_pretrained:
                    self.dropped.append(name)
                    missing.append(str(error))
                else:
                    raise WeightsError(
                        f"loss term '{name}' (weights file: loss.{name}.weights): {error}; "
                        f"or set loss.{name}.weight: 0 / loss.drop_missing_pretrained: true"
                    ) from None
        if "crosstalk" in active and cfa_period is None:
            _check_kernel_spec(config.crosstalk_kernel)  # the real period comes with the first batch
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
        self.terms = nn.ModuleDict({name: built[name] for name in self.term_names if built.get(name) is not None})
        self.domains = {name: LOSSES[name].domain for name in self.term_names}

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

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The learnable weighting parameters (empty for fixed weighting); the backbones are frozen."""
        return [p for p in self.weighting.parameters() if p.requires_grad]

    def render(self, mosaic: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """sRGB render of a mosaic with the batch's metadata. (B,1,H,W) -> (B,3,H',W'); counted in render_count."""
        self.render_count += 1
        self.renders_last_step += 1
        return self.isp(mosaic, batch["cfa"], batch["wb"], batch["cam_to_srgb"], packed=False)

    def _crosstalk_term(self, cfa: Any, device: torch.device) -> CrosstalkConsistencyLoss:
        """The crosstalk module for the batch's CFA period, built on first use (when cfa_period was not given)."""
        period = int(torch.as_tensor(cfa).shape[-1])
        module = self.terms["crosstalk"] if "crosstalk" in self.terms else None
        if module is None:
            module = CrosstalkConsistencyLoss(build_kernel(self.crosstalk_spec, period)).to(device)
            self.terms["crosstalk"] = module
        if module.period != period:
            raise InputError(f"crosstalk kernel is for CFA period {module.period} but the batch has period {period}; one stack per camera")
        return module

    def forward(self, pred: torch.Tensor, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise InputError(f"loss batch lacks {missing}; it needs {list(BATCH_KEYS)} (+ optional 'packed')")
        target, cfa = batch["target"], batch["cfa"]
        if not isinstance(pred, torch.Tensor) or pred.ndim != 4 or pred.shape != target.shape:
            raise InputError(
                f"prediction {tuple(getattr(pred, 'shape', ()))} and target {tuple(getattr(target, 'shape', ()))} must be equal (B,C,H,W)"
            )
        packed = _packed_flag(batch, pred)
        self.renders_last_step = 0
        learnable = getattr(self.weighting, "learnable", False)
        weights = self.weighting.effective_weights(step)
        values: dict[str, torch.Tensor] = {}

        def run(name: str, *args: Any) -> None:
            module = self._crosstalk_term(cfa, pred.device) if name == "crosstalk" else self.terms[name]
            with torch.set_grad_enabled(torch.is_grad_enabled() and (learnable or weights[name] > 0)):
                if self.backbone_dtype is not None and name in _PRETRAINED:
                    with torch.autocast(pred.device.type, dtype=self.backbone_dtype):
                        values[name] = module(*args).float()
                else:
                    values[name] = module(*args)

        for name in self.term_names:
            if self.domains[name] == "raw":
                run(name, pred, target)
        srgb_terms = [name for name in self.term_names if self.domains[name] == "srgb"]
        if "crosstalk" in self.domains or srgb_terms:
            pred_mosaic = unpack(pred, cfa) if packed else pred
            if "crosstalk" in self.domains:
                aligned = batch["input"]
                run("crosstalk", pred_mosaic, unpack(aligned, cfa) if packed else aligned)
            if srgb_terms:
                target_mosaic = unpack(target, cfa) if packed else target
                pred_srgb = self.render(pred_mosaic, batch)
                with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
                    target_srgb = self.render(target_mosaic, batch)
                window = self.config.backbone_window
                for name in srgb_terms:
                    if name in _PRETRAINED and window < 1.0:
                        run(name, *render_window(pred_srgb, target_srgb, window, step))
                    else:
                        run(name, pred_srgb, target_srgb)
        total = self.weighting({name: values[name] for name in self.term_names}, step)
        numbers = torch.stack([values[name].detach().reshape(()).to(total.dtype) for name in self.term_names] + [total.detach()])
        numbers = numbers.tolist()  # one device sync for the whole report
        report: dict[str, float] = {}
        for index, name in enumerate(self.term_names):
            report[name] = numbers[index]
            report[f"{name}/weight"] = float(weights[name])
        report["total"] = numbers[-1]
        return total, report

    def extra_repr(self) -> str:
        dropped = f", dropped={self.dropped}" if self.dropped else ""
        return f"terms={list(self.term_names)}, weighting={self.config.weighting}, total_steps={self.total_steps}{dropped}"


def _check_kernel_spec(spec: str) -> None:
    """Fail now on a crosstalk kernel spec that fits neither CFA period (bad spelling, missing file)."""
    try:
        build_kernel(spec, 2)
    except ConfigError as bayer_error:
        try:
            build_kernel(spec, 6)
        except ConfigError:
            raise bayer_error from None


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
