"""How loss terms combine into one scalar: fixed/scheduled weights, uncertainty, learnable softmax.

Pure functions (`scheduled_weight`, `uncertainty_weighted`, `softmax_weighted`) hold the maths;
the modules (`FixedWeighting`, `UncertaintyWeighting`, `SoftmaxWeighting`) share one interface
used by `LossStack`:

    weighting.effective_weights(step) -> {term: float}       the weight each term gets this step
    weighting(values: {term: () tensor}, step) -> () total

The learnable modules hold their parameters (`nn.Parameter`s), so the trainer gives
`weighting.parameters()` to the optimiser and `weighting.state_dict()` goes into checkpoints.
Their configured weights only set the starting point; per-term schedules apply to fixed weighting.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from rawrestore.config.schema import LossTermConfig
from rawrestore.errors import ConfigError, InputError

__all__ = [
    "WEIGHTINGS",
    "scheduled_weight",
    "uncertainty_weighted",
    "softmax_weighted",
    "FixedWeighting",
    "UncertaintyWeighting",
    "SoftmaxWeighting",
]


def scheduled_weight(term: LossTermConfig, step: int, total_steps: int) -> float:
    """Weight of one term at iteration `step` (0-based) of `total_steps`. -> float >= 0.

    progress = step / total_steps, clamped to [0, 1]; then `term.weight_at(progress)`, the one
    definition of the schedule (schema.LossTermConfig): "fixed" -> weight; "linear"/"cosine" ->
    start_weight until ramp_start, a linear or half-cosine ramp 0.5 * (1 - cos(pi t)) to
    end_weight at ramp_end, end_weight after. Weight 0 switches a term off whatever its schedule.
    E.g. 0.02 -> 0.10 over the last 30%: 0.02 at 0% and 70%, 0.06 at 85% (both shapes), 0.10 at 100%.
    A term config may hold a term off for its first steps (`term.weight_at_step`: `loss.gan.warmup`).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise InputError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step must be an integer >= 0, got {step!r}")
    return float(term.weight_at_step(step, total_steps))


def uncertainty_weighted(values: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Kendall, Gal & Cipolla (CVPR 2018) homoscedastic-uncertainty weighting. values (N,), log_sigma (N,) -> ().

    total = sum_i 0.5 * exp(-2 s_i) * L_i + s_i,  with s_i = log sigma_i,

    the negative log-likelihood of a Gaussian with variance sigma_i^2 for a squared-error L_i
    (constants dropped). Term i gets the effective weight 0.5 * exp(-2 s_i) = 1 / (2 sigma_i^2);
    d total / d s_i = 1 - exp(-2 s_i) L_i, zero at s_i = 0.5 log L_i, so the learnt weight settles
    at 1 / (2 L_i). The + s_i regulariser keeps sigma from growing without bound. Learning log
    sigma rather than sigma keeps the weight positive and the optimisation unconstrained.
    """
    if values.shape != log_sigma.shape or values.ndim != 1:
        raise InputError(f"uncertainty_weighted: values {tuple(values.shape)} and log_sigma {tuple(log_sigma.shape)} must both be (N,)")
    return (0.5 * torch.exp(-2.0 * log_sigma) * values + log_sigma).sum()


def softmax_weighted(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Learnable softmax weights (Spectroformer's WeightedLoss). values (N,), logits (N,) -> () sum softmax(logits)_i L_i.

    FLAW: the weights and the terms are minimised together, and
    d total / d logit_j = p_j (L_j - sum_i p_i L_i), negative only for terms below the weighted
    mean. Gradient descent therefore moves the weight onto whichever term is currently the
    SMALLEST (whatever its scale or importance), and the total falls by ignoring the larger terms
    rather than by improving the image; in the limit one term carries all the weight. Use it only
    to reproduce Spectroformer; `tests/test_weighting.py` demonstrates the drift.
    """
    if values.shape != logits.shape or values.ndim != 1:
        raise InputError(f"softmax_weighted: values {tuple(values.shape)} and logits {tuple(logits.shape)} must both be (N,)")
    return (torch.softmax(logits, dim=0) * values).sum()


def _stack_values(values: Mapping[str, torch.Tensor], names: Sequence[str], who: str) -> torch.Tensor:
    """Term values in the module's order. {name: () tensor} -> (N,) tensor."""
    missing = [name for name in names if name not in values]
    if missing:
        raise InputError(f"{who}: no value for term(s) {missing}; got {sorted(values)}")
    return torch.stack([values[name].reshape(()) for name in names])


def _check_names(names: Sequence[str], who: str) -> tuple[str, ...]:
    names = tuple(names)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{who}: needs distinct term names, got {list(names)}")
    return names


class FixedWeighting(nn.Module):
    """Configured weights with per-term schedules; no parameters. values {term: ()} , step -> () sum w_i(step) L_i."""

    learnable = False

    def __init__(self, terms: Mapping[str, LossTermConfig], total_steps: int):
        super().__init__()
        self.terms = dict(terms)
        _check_names(list(self.terms), "fixed weighting")
        scheduled_weight(next(iter(self.terms.values())), 0, total_steps)  # validates total_steps
        self.total_steps = total_steps
        self.names = tuple(self.terms)

    def effective_weights(self, step: int) -> dict[str, float]:
        """{term: scheduled weight at `step`}."""
        return {name: scheduled_weight(term, step, self.total_steps) for name, term in self.terms.items()}

    def forward(self, values: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        weights = self.effective_weights(step)
        stacked = _stack_values(values, self.names, "fixed weighting")
        return (stacked * stacked.new_tensor([weights[name] for name in self.names])).sum()


class UncertaintyWeighting(nn.Module):
    """Learnt log sigma per term (see `uncertainty_weighted`). values {term: ()}, step -> () total.

    `log_sigma[name]` starts at -0.5 * log(2 w) for the configured weight w, so the first step
    weighs the terms exactly as fixed weighting would (w = 0.5 exp(-2 s)); schedules are ignored.
    """

    learnable = True

    def __init__(self, names: Sequence[str], initial_weights: Mapping[str, float] | None = None):
        super().__init__()
        self.names = _check_names(names, "uncertainty weighting")
        initial = {name: 0.5 for name in self.names} if initial_weights is None else dict(initial_weights)
        start = {}
        for name in self.names:
            weight = float(initial.get(name, 0.5))
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"uncertainty weighting: initial weight of {name!r} must be > 0, got {weight}")
            start[name] = nn.Parameter(torch.tensor(-0.5 * math.log(2.0 * weight)))
        self.log_sigma = nn.ParameterDict(start)

    def effective_weights(self, step: int) -> dict[str, float]:
        """{term: 0.5 exp(-2 log_sigma)} (the data-term weight; the + log_sigma regulariser is extra)."""
        log_sigma = torch.stack([self.log_sigma[name].detach() for name in self.names])
        return dict(zip(self.names, (0.5 * torch.exp(-2.0 * log_sigma)).tolist()))

    def forward(self, values: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        stacked = _stack_values(values, self.names, "uncertainty weighting")
        log_sigma = torch.stack([self.log_sigma[name] for name in self.names]).to(stacked.dtype)
        return uncertainty_weighted(stacked, log_sigma)


class SoftmaxWeighting(nn.Module):
    """Learnable softmax weights (see `softmax_weighted` and its FLAW). values {term: ()}, step -> () total.

    `logits[name]` start at log(w) for the configured weights, so softmax starts at w / sum(w);
    uniform when no weights are given. Schedules are ignored. The weight drifts toward the
    smallest term during training: a reproduction option, not a recommended one.
    """

    learnable = True

    def __init__(self, names: Sequence[str], initial_weights: Mapping[str, float] | None = None):
        super().__init__()
        self.names = _check_names(names, "softmax weighting")
        initial = {name: 1.0 for name in self.names} if initial_weights is None else dict(initial_weights)
        start = {}
        for name in self.names:
            weight = float(initial.get(name, 1.0))
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"softmax weighting: initial weight of {name!r} must be > 0, got {weight}")
            start[name] = nn.Parameter(torch.tensor(math.log(weight)))
        self.logits = nn.ParameterDict(start)

    def probabilities(self) -> torch.Tensor:
        """softmax(logits) in `names` order. -> (N,)."""
        return torch.softmax(torch.stack([self.logits[name] for name in self.names]), dim=0)

    def effective_weights(self, step: int) -> dict[str, float]:
        """{term: softmax(logits)[term]}."""
        return dict(zip(self.names, self.probabilities().detach().tolist()))

    def forward(self, values: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        stacked = _stack_values(values, self.names, "softmax weighting")
        logits = torch.stack([self.logits[name] for name in self.names]).to(stacked.dtype)
        return softmax_weighted(stacked, logits)


# LossConfig.weighting -> module
WEIGHTINGS: dict[str, type[nn.Module]] = {
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "softmax": SoftmaxWeighting,
}
