"""rawrestore.losses.weighting: schedules at given steps, uncertainty gradients, the softmax drift."""
from __future__ import annotations

import math

import pytest
import torch

from rawrestore.config.schema import LossTermConfig
from rawrestore.errors import InputError
from rawrestore.losses.weighting import (
    WEIGHTINGS,
    FixedWeighting,
    SoftmaxWeighting,
    UncertaintyWeighting,
    scheduled_weight,
    softmax_weighted,
    uncertainty_weighted,
)

TOTAL = 1000


def ramp(schedule: str) -> LossTermConfig:
    """The default perceptual ramp: 0.02 -> 0.10 over the last 30% of iterations."""
    return LossTermConfig(weight=0.02, schedule=schedule, end_weight=0.10, ramp_start=0.7, ramp_end=1.0)


# step: 0%, 70% (ramp start), 77.5% (a quarter in), 85% (half way), 100%, beyond the end
LINEAR = {0: 0.02, 700: 0.02, 775: 0.04, 850: 0.06, 1000: 0.10, 1200: 0.10}
COSINE = {0: 0.02, 700: 0.02, 775: 0.02 + 0.08 * (1 - math.cos(math.pi / 4)) / 2, 850: 0.06, 1000: 0.10, 1200: 0.10}


@pytest.mark.parametrize("schedule,expected", [("linear", LINEAR), ("cosine", COSINE)])
def test_schedules_at_given_steps(schedule, expected):
    term = ramp(schedule)
    for step, weight in expected.items():
        assert scheduled_weight(term, step, TOTAL) == pytest.approx(weight, rel=1e-12, abs=1e-15), step
    assert COSINE[775] == pytest.approx(0.0317157, rel=1e-6)  # slower start than linear's 0.04


def test_fixed_and_switched_off_terms():
    assert scheduled_weight(LossTermConfig(weight=0.05), 0, TOTAL) == 0.05
    assert scheduled_weight(LossTermConfig(weight=0.05), 999, TOTAL) == 0.05
    switched_off = LossTermConfig(weight=0.0, schedule="linear", end_weight=0.1)
    assert scheduled_weight(switched_off, 900, TOTAL) == 0.0
    from_zero = LossTermConfig(weight=0.1, schedule="linear", start_weight=0.0, ramp_start=0.0, ramp_end=0.5)
    assert [scheduled_weight(from_zero, s, TOTAL) for s in (0, 250, 500, 900)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


@pytest.mark.parametrize("step,total", [(-1, 10), (0, 0), (1.5, 10), (True, 10)])
def test_schedule_rejects_bad_steps(step, total):
    with pytest.raises(InputError):
        scheduled_weight(ramp("linear"), step, total)


def test_fixed_weighting_total_and_weights():
    weighting = FixedWeighting({"raw_l1": LossTermConfig(weight=1.0), "perceptual": ramp("linear")}, TOTAL)
    values = {"raw_l1": torch.tensor(0.3), "perceptual": torch.tensor(2.0)}
    assert weighting(values, 850).item() == pytest.approx(0.3 + 0.06 * 2.0, rel=1e-6)
    assert weighting.effective_weights(0) == pytest.approx({"raw_l1": 1.0, "perceptual": 0.02})
    assert list(weighting.parameters()) == []
    with pytest.raises(InputError, match="perceptual"):
        weighting({"raw_l1": torch.tensor(0.3)}, 0)


def test_uncertainty_weighting_gradients():
    weighting = UncertaintyWeighting(["a", "b"], {"a": 1.0, "b": 0.02})
    # starts where fixed weighting is: 0.5 exp(-2 s) = w
    assert weighting.effective_weights(0) == pytest.approx({"a": 1.0, "b": 0.02}, rel=1e-6)
    values = {"a": torch.tensor(3.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    total = weighting(values, 0)
    s_a, s_b = -0.5 * math.log(2.0), -0.5 * math.log(0.04)
    assert total.item() == pytest.approx(1.0 * 3.0 + s_a + 0.02 * 0.5 + s_b, rel=1e-6)
    total.backward()
    # d/ds (0.5 e^{-2s} L + s) = 1 - e^{-2s} L;  d/dL = 0.5 e^{-2s}
    assert weighting.log_sigma["a"].grad.item() == pytest.approx(1.0 - 2.0 * 3.0, rel=1e-6)
    assert weighting.log_sigma["b"].grad.item() == pytest.approx(1.0 - 0.04 * 0.5, rel=1e-6)
    assert values["a"].grad.item() == pytest.approx(1.0, rel=1e-6)
    assert values["b"].grad.item() == pytest.approx(0.02, rel=1e-6)
    # stationary where exp(2 s) = L: the learnt weight settles at 1 / (2 L)
    log_sigma = torch.tensor([0.5 * math.log(3.0), 0.5 * math.log(0.5)], requires_grad=True)
    uncertainty_weighted(torch.tensor([3.0, 0.5]), log_sigma).backward()
    assert log_sigma.grad.abs().max().item() < 1e-6


def test_uncertainty_weights_converge_to_inverse_loss():
    weighting = UncertaintyWeighting(["a", "b"], {"a": 1.0, "b": 1.0})
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    values = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    for _ in range(600):
        optimizer.zero_grad()
        weighting(values, 0).backward()
        optimizer.step()
    assert weighting.effective_weights(0) == pytest.approx({"a": 1 / 8.0, "b": 2.0}, rel=1e-3)


def test_softmax_gradient_formula():
    logits = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    values = torch.tensor([1.0, 0.2, 0.5])
    softmax_weighted(values, logits).backward()
    p = torch.softmax(logits.detach(), dim=0)
    expected = p * (values - (p * values).sum())  # negative only for terms below the weighted mean
    torch.testing.assert_close(logits.grad, expected)
    weighting = SoftmaxWeighting(["a", "b"], {"a": 3.0, "b": 1.0})
    assert weighting.effective_weights(0) == pytest.approx({"a": 0.75, "b": 0.25}, rel=1e-6)


def test_softmax_weights_drift_to_the_smallest_term():
    """Spectroformer-style learnable softmax weights: the weight leaves the term that matters."""
    # Fit y = 2 x + noise. The data term cannot fall below the noise (~1); a small regulariser
    # (~0.05) can. Trained jointly, the softmax moves the weight onto the regulariser, and the
    # fit that the data term asked for is undone.
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 256)
    y = 2.0 * x + torch.randn(256, generator=generator)
    least_squares = ((x * y).sum() / (x * x).sum()).item()

    def terms(slope):
        return {"data": ((slope * x - y) ** 2).mean(), "regulariser": 0.01 * slope.abs() + 0.05}

    slope = torch.zeros((), requires_grad=True)
    weighting = SoftmaxWeighting(["data", "regulariser"])
    optimizer = torch.optim.SGD([slope, *weighting.parameters()], lr=0.5)
    history = []
    for _ in range(300):
        optimizer.zero_grad()
        weighting(terms(slope), 0).backward()
        optimizer.step()
        history.append(weighting.effective_weights(0)["regulariser"])
    assert history[0] > 0.6  # one step: the smaller term already holds more than its even share
    assert history[-1] > 0.99  # ...and in the end nearly all of it
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:]))
    assert abs(slope.item() - least_squares) > 0.5  # the data term stopped being fitted

    fixed_slope = torch.zeros((), requires_grad=True)  # fixed, equal weights on the same problem
    optimizer = torch.optim.SGD([fixed_slope], lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        sum(0.5 * value for value in terms(fixed_slope).values()).backward()
        optimizer.step()
    assert abs(fixed_slope.item() - least_squares) < 0.05


def test_registry():
    assert type(WEIGHTINGS) is dict
    assert WEIGHTINGS == {"fixed": FixedWeighting, "uncertainty": UncertaintyWeighting, "softmax": SoftmaxWeighting}
