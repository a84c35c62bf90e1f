"""What every loss term is: an nn.Module that declares its domain and builds itself from its config entry.

A term's `domain` says what `LossStack` hands it:

    "raw"     (prediction, target) in the layout training uses (packed or mosaic)
    "mosaic"  (predicted mosaic, exposure-aligned dark-input mosaic, cfa=...): consistency with the measurement
    "srgb"    (prediction render, target render), both rendered once per step by the stack's ISP

`from_config(term_config, context)` builds it from its `loss.<name>` entry (the default takes
no arguments); `frozen_backbone` terms load pretrained weights (VGG, LPIPS), which may be
missing: the stack then fails, drops them, or (tests) builds random ones, as configured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from rawrestore.config.schema import LossTermConfig

__all__ = ["LossTerm", "BuildContext", "DOMAINS"]

DOMAINS = ("raw", "mosaic", "srgb")


@dataclass(frozen=True)
class BuildContext:
    """What a term may need beyond its own config entry: the CFA period (None: the first batch's), the
    `loss.crosstalk_kernel` spec, whether a missing pretrained backbone may be random (tests only),
    and the further CFA periods of a run whose sources mix Bayer and X-Trans (`data.sources`)."""

    cfa_period: int | None = None
    crosstalk_kernel: str = "identity"
    allow_random: bool = False
    other_periods: tuple[int, ...] = ()


class LossTerm(nn.Module):
    """Base of the registered loss terms: forward(a, b) -> () tensor, on the inputs its `domain` names."""

    domain: ClassVar[str] = "raw"
    frozen_backbone: ClassVar[bool] = False

    @classmethod
    def from_config(cls, term: LossTermConfig, context: BuildContext) -> "LossTerm":
        """The term for its `loss.<name>` config entry; terms with options override this."""
        return cls()
