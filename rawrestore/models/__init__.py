"""Restoration networks, packed RAW -> packed RAW. The registry is the dict literal `MODELS`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from rawrestore.errors import ConfigError
from rawrestore.models.conditioned import NoiseConditioned
from rawrestore.models.nafnet import NAFBlock, NAFNet
from rawrestore.models.unet import UNet

if TYPE_CHECKING:
    from rawrestore.config.schema import ModelConfig

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "nafnet": NAFNet}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate `MODELS[name](**kwargs)`; an unknown name is a ConfigError listing the known ones."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name](**kwargs)


def build_model_from_config(model: ModelConfig, in_channels: int) -> nn.Module:
    """Build the network a `ModelConfig` describes; in_channels is 4 (packed Bayer) or 9 (X-Trans).

    With `model.noise_map` the network gets one more input channel, the measured noise level
    (`NoiseConditioned`), and the residual connection moves to the wrapper.
    """
    extra = 1 if model.noise_map else 0
    residual = model.residual and not model.noise_map
    if model.name == "unet":
        net = build_model(
            "unet", in_channels=in_channels + extra, out_channels=in_channels, base=model.width,
            width_mult=model.width_mult, residual=residual,
        )
    elif model.name == "nafnet":
        net = build_model(
            "nafnet", in_channels=in_channels + extra, out_channels=in_channels,
            width=round(model.width * model.width_mult), enc_blocks=model.nafnet_blocks,
            middle_blocks=model.nafnet_middle_blocks, dec_blocks=model.nafnet_dec_blocks, residual=residual,
        )
    else:  # a model registered in MODELS by the user: out_channels only when it must differ from in_channels
        net = build_model(model.name, in_channels=in_channels + extra, **({"out_channels": in_channels} if extra else {}))
    return NoiseConditioned(net, in_channels, residual=model.residual) if model.noise_map else net


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "MODELS", "UNet", "NAFNet", "NAFBlock", "NoiseConditioned", "build_model", "build_model_from_config", "count_parameters",
]
