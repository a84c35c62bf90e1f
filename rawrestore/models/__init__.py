"""Restoration networks, packed RAW -> packed RAW. The registry is the dict literal `MODELS`, the only way they are built.

Each entry is a `ModelSpec`: the network class, how its own options follow from the `model:`
config, and how many outputs `model.scales` may ask of it (`rawrestore.models.scales`; 1 for a
network without coarse heads). Every class is called as `cls(in_channels=..., out_channels=...,
residual=..., **spec.options(model_config))`; `build_model_from_config` adds the noise-map channel
and wrapper.
`PatchDiscriminator` (sRGB -> patch logits) is the adversarial loss's network, not a restoration
one, so it is not in the registry (`rawrestore.losses.adversarial` builds it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from rawrestore.errors import ConfigError
from rawrestore.models.conditioned import NoiseConditioned
from rawrestore.models.discriminator import PatchDiscriminator
from rawrestore.models.nafnet import NAFBlock, NAFNet
from rawrestore.models.unet import DECODER_LEVELS, UNet

if TYPE_CHECKING:
    from rawrestore.config.schema import ModelConfig


def _no_options(model: ModelConfig) -> dict[str, Any]:
    return {}


def _one_scale(model: ModelConfig) -> int:
    return 1


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: its class, the keyword options it takes from the `model:` config, and the
    most entries `model.scales` may have for that config (its decoder levels; 1: a single output only)."""

    cls: type[nn.Module]
    options: Callable[[ModelConfig], dict[str, Any]] = _no_options
    max_scales: Callable[[ModelConfig], int] = _one_scale


def _unet_options(model: ModelConfig) -> dict[str, Any]:
    return {"base": model.width, "width_mult": model.width_mult, "scales": len(model.scales)}


def _nafnet_options(model: ModelConfig) -> dict[str, Any]:
    return {"width": round(model.width * model.width_mult), "enc_blocks": model.nafnet_blocks,
            "middle_blocks": model.nafnet_middle_blocks, "dec_blocks": model.nafnet_dec_blocks,
            "scales": len(model.scales)}


MODELS: dict[str, ModelSpec] = {
    "unet": ModelSpec(UNet, _unet_options, lambda model: DECODER_LEVELS),
    "nafnet": ModelSpec(NAFNet, _nafnet_options, lambda model: len(model.nafnet_blocks)),
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate `MODELS[name].cls(**kwargs)`; an unknown name is a ConfigError listing the known ones."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name].cls(**kwargs)


def build_model_from_config(model: ModelConfig, in_channels: int) -> nn.Module:
    """Build the network a `ModelConfig` describes; in_channels is 4 (packed Bayer) or 9 (X-Trans).

    With `model.noise_map` the network gets one more input channel, the measured noise level
    (`NoiseConditioned`), and the residual connection moves to the wrapper.
    """
    extra = 1 if model.noise_map else 0
    if model.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {model.name!r} (known: {', '.join(sorted(MODELS))})")
    spec = MODELS[model.name]
    net = spec.cls(in_channels=in_channels + extra, out_channels=in_channels,
                   residual=model.residual and not model.noise_map, **spec.options(model))
    return NoiseConditioned(net, in_channels, residual=model.residual) if model.noise_map else net


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "MODELS", "ModelSpec", "UNet", "NAFNet", "NAFBlock", "NoiseConditioned", "PatchDiscriminator", "build_model", "build_model_from_config",
    "count_parameters",
]
