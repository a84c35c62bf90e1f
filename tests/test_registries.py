"""The registries are the only way losses and models are built: a new entry is a class and one line, as the README shows."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import isp
from rawrestore.config.schema import LossConfig, LossTermConfig, ModelConfig
from rawrestore.losses import LOSSES, LossStack, LossTerm
from rawrestore.models import MODELS, ModelSpec, build_model_from_config
from tests.conftest import REPO

CAM_TO_SRGB = [[1.7, -0.5, -0.2], [-0.2, 1.5, -0.3], [0.0, -0.4, 1.4]]


class TotalVariation(LossTerm):
    """Anisotropic total variation of the prediction's render, as in the README's example."""

    domain = "srgb"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pred.diff(dim=-1).abs().mean() + pred.diff(dim=-2).abs().mean()


class Brightness(nn.Module):
    """A one-convolution network taking the registry's keywords plus its own option."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool, gain: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.gain, self.residual = gain, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.conv(x)


@dataclass
class WithTV(LossConfig):
    tv: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=0.5))


def test_no_construction_chain_beside_the_registries():
    found = subprocess.run(["grep", "-rn", r"if name ==\|elif name ==", "rawrestore/losses", "rawrestore/models"],
                           cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == ""  # grep: no match


def test_a_registered_loss_runs_in_its_domain(monkeypatch):
    monkeypatch.setitem(LOSSES, "tv", TotalVariation)
    config = WithTV()
    for name, term in config.terms().items():
        term.weight = 0.0 if name not in ("raw_l1", "tv") else term.weight
        term.end_weight = None
    stack = LossStack(config, total_steps=10, cfa_period=2)
    assert stack.term_names == ("raw_l1", "tv") and stack.domains["tv"] == "srgb"
    generator = torch.Generator().manual_seed(0)
    target = 0.05 + 0.3 * torch.rand(2, 4, 8, 8, generator=generator)
    pred = (target + 0.02).requires_grad_()
    batch = {"target": target, "input": target, "cfa": torch.tensor([[0, 1], [1, 2]]),
             "wb": torch.tensor([2.0, 1.0, 1.5]), "cam_to_srgb": torch.tensor(CAM_TO_SRGB)}
    total, values = stack(pred, batch, step=0)
    render = isp.pipeline.render(isp.cfa.unpack(pred.detach(), batch["cfa"]), batch["cfa"], batch["wb"], batch["cam_to_srgb"])
    expected_tv = render.diff(dim=-1).abs().mean() + render.diff(dim=-2).abs().mean()
    assert float(values["tv"]) == pytest.approx(float(expected_tv), rel=1e-6)
    assert float(total.detach()) == pytest.approx(float((pred.detach() - target).abs().mean()) + 0.5 * float(expected_tv), rel=1e-6)
    total.backward()
    assert torch.isfinite(pred.grad).all() and stack.renders_last_step == 2


def test_a_registered_model_is_built_from_the_config(monkeypatch):
    monkeypatch.setitem(MODELS, "brightness", ModelSpec(Brightness, lambda model: {"gain": model.width_mult}))
    net = build_model_from_config(ModelConfig(name="brightness", width_mult=2.0), in_channels=4)
    assert isinstance(net, Brightness) and net.gain == 2.0 and net.conv.in_channels == net.conv.out_channels == 4
    conditioned = build_model_from_config(ModelConfig(name="brightness", noise_map=True), in_channels=4)
    assert conditioned.net.conv.in_channels == 5 and conditioned(torch.rand(1, 4, 8, 8)).shape == (1, 4, 8, 8)
    from rawrestore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config key 'model.name' must be one of 'unet', 'nafnet', 'brightness'"):
        ModelConfig(name="brightnes").validate()
