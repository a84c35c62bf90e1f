"""train.schedule onecycle against torch's OneCycleLR, and cudnn.benchmark against train.deterministic."""
from __future__ import annotations

import pytest
import torch

from rawrestore.config.schema import TrainConfig
from rawrestore.errors import ConfigError
from rawrestore.train.optim import lr_factor, set_determinism


def _lambda_lrs(train: TrainConfig, steps: int) -> list[float]:
    """The learning rate the trainer's LambdaLR(lr_factor) gives at each of `steps` optimiser steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train))
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("iterations, pct_start, div, final_div", [(1000, 0.3, 25.0, 1e4), (97, 0.45, 10.0, 100.0)])
def test_onecycle_equals_torch_onecyclelr(iterations, pct_start, div, final_div):
    train = TrainConfig(iterations=iterations, lr=2e-3, schedule="onecycle", onecycle_pct_start=pct_start,
                        onecycle_div_factor=div, onecycle_final_div_factor=final_div)
    train.validate()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=iterations,
                                                    pct_start=pct_start, div_factor=div, final_div_factor=final_div,
                                                    anneal_strategy="cos", cycle_momentum=False)
    expected = []
    for _ in range(iterations):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    ours = _lambda_lrs(train, iterations)
    peak = round(pct_start * iterations) - 1
    for step in (0, 1, peak // 2, peak, peak + 1, (peak + iterations) // 2, iterations - 1):
        assert ours[step] == pytest.approx(expected[step], rel=1e-12, abs=1e-18), step
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-15
    assert ours[0] == pytest.approx(train.lr / div) and train.lr * 0.999 < max(ours) <= train.lr
    assert lr_factor(iterations + 5, train) == lr_factor(iterations - 1, train)  # the scheduler's last step


def test_onecycle_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.warmup_iters"):
        TrainConfig(iterations=100, schedule="onecycle", warmup_iters=10).validate()
    with pytest.raises(ConfigError, match="train.onecycle_pct_start"):
        TrainConfig(iterations=100, schedule="onecycle", onecycle_pct_start=1.0).validate()
    with pytest.raises(ConfigError, match="train.onecycle_div_factor"):
        TrainConfig(iterations=100, schedule="onecycle", onecycle_div_factor=0.5).validate()


def test_cudnn_benchmark_on_cuda_unless_deterministic():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    try:
        set_determinism(False, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is True  # fixed crop shapes: the autotuner's search is paid once
        set_determinism(False, torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        set_determinism(True, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])
