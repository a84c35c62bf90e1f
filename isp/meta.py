"""Camera metadata needed to render a RAW mosaic: CFA, levels, white balance, colour matrix."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    import torch

COLOUR_NAMES = "RGB"  # colour index 0, 1, 2 of a CFA site


@dataclass
class CameraMeta:
    """Everything `isp` needs about one RAW frame; all lists are plain Python for JSON.

    `cfa` and `black_level` are indexed by CFA *site* (row, col) of the repeating period
    (2x2 Bayer, 6x6 X-Trans), relative to the top-left of the visible mosaic.
    `wb_as_shot` / `wb_daylight` are multipliers [r, g, b] normalised so that g == 1.
    `cam_to_srgb` maps white-balanced camera RGB to linear sRGB; its rows sum to 1.
    """

    make: str
    model: str
    width: int
    height: int
    cfa: list[list[int]]
    black_level: list[list[float]]
    white_level: float
    wb_as_shot: list[float]
    wb_daylight: list[float]
    cam_to_srgb: list[list[float]]
    exposure_time: float | None = None
    iso: float | None = None
    fnumber: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cfa_period(self) -> int:
        return len(self.cfa)

    @property
    def is_xtrans(self) -> bool:
        return self.cfa_period == 6

    @property
    def cfa_array(self) -> np.ndarray:
        return np.asarray(self.cfa, dtype=np.int64)

    @property
    def black_array(self) -> np.ndarray:
        return np.asarray(self.black_level, dtype=np.float64)

    def cfa_string(self) -> str:
        """'RGGB' for Bayer, the 36 letters row by row for X-Trans."""
        return "".join(COLOUR_NAMES[c] for row in self.cfa for c in row)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CameraMeta":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"camera metadata has unknown field(s) {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CameraMeta":
        return cls.from_dict(json.loads(text))

    def render_tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """What rendering needs, as unbatched tensors: cfa (P,P) long, wb (3,), cam_to_srgb (3,3) (dtype default float32)."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        return {
            "cfa": torch.as_tensor(self.cfa_array, device=device),
            "wb": torch.tensor(self.wb_as_shot, dtype=dtype, device=device),
            "cam_to_srgb": torch.tensor(self.cam_to_srgb, dtype=dtype, device=device),
        }


def validate_cfa(cfa: np.ndarray, source: str = "CFA") -> np.ndarray:
    """Check a (P,P) colour-index pattern is a Bayer (any phase) or X-Trans CFA; returns it as int64."""
    cfa = np.asarray(cfa, dtype=np.int64)
    if cfa.ndim != 2 or cfa.shape[0] != cfa.shape[1] or cfa.shape[0] not in (2, 6):
        raise InputError(f"{source}: CFA period {tuple(cfa.shape)} is neither Bayer (2x2) nor X-Trans (6x6)")
    counts = np.bincount(cfa.ravel(), minlength=3)
    if cfa.min() < 0 or cfa.max() > 2:
        raise InputError(f"{source}: CFA colours must be 0=R, 1=G, 2=B, got {sorted(set(cfa.ravel().tolist()))}")
    if cfa.shape[0] == 2:
        greens_on_diagonal = (cfa[0, 0] == 1 and cfa[1, 1] == 1) or (cfa[0, 1] == 1 and cfa[1, 0] == 1)
        if counts.tolist() != [1, 2, 1] or not greens_on_diagonal:
            raise InputError(f"{source}: 2x2 CFA {cfa.tolist()} is not a Bayer pattern (one R, two diagonal G, one B)")
    elif counts.tolist() != [8, 20, 8]:
        raise InputError(f"{source}: 6x6 CFA has {counts.tolist()} R/G/B sites, X-Trans has 8/20/8")
    return cfa
