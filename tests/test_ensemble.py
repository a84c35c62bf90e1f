"""Test-time self-ensemble over CFA-preserving flips/transposes (rawrestore.ensemble)."""
from __future__ import annotations

import pytest
import torch

import isp
from rawrestore.data import synth
from isp.geometry import cfa_preserving_ops
from rawrestore.ensemble import restore, self_ensemble_apply

BAYERS = [[[0, 1], [1, 2]], [[1, 0], [2, 1]], [[2, 1], [1, 0]], [[1, 2], [0, 1]]]
XTRANS = [list(r) for r in synth.XTRANS_XT2]


def shift_right(t: torch.Tensor) -> torch.Tensor:
    """out[..., j] = t[..., j - 1]: a model that is not flip-equivariant."""
    return torch.cat([t[..., :1], t[..., :-1]], dim=-1)


@pytest.mark.parametrize("cfa", BAYERS + [XTRANS])
def test_identity_and_per_colour_offsets_come_back_exactly(cfa):
    """Each transform is undone exactly, and every colour lands back on its own sites."""
    cfa = torch.tensor(cfa)
    channels = 4 if cfa.shape[0] == 2 else 9
    x = torch.rand(1, channels, 12, 18, dtype=torch.float64)
    assert torch.allclose(self_ensemble_apply(lambda t: t, x, cfa), x, atol=1e-12)
    # a model adding a constant per colour (R 0.1, G 0.2, B 0.3) on the mosaic
    colour_offset = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)

    def add_colour(packed):
        mosaic = isp.cfa.unpack(packed, cfa)
        sites = colour_offset[cfa].repeat(mosaic.shape[-2] // cfa.shape[0], mosaic.shape[-1] // cfa.shape[1])
        return isp.cfa.pack(mosaic + sites, cfa)

    assert torch.allclose(self_ensemble_apply(add_colour, x, cfa), add_colour(x), atol=1e-12)


@pytest.mark.parametrize("cfa", BAYERS)
def test_bayer_uses_all_eight_transforms(cfa):
    """On Bayer all 8 flips/transposes keep the CFA: a one-pixel shift averages to the 4-neighbour mean."""
    cfa = torch.tensor(cfa)
    assert len(cfa_preserving_ops(cfa.numpy())) == 8
    x = torch.rand(2, 4, 8, 10, dtype=torch.float64)
    out = self_ensemble_apply(shift_right, x, cfa)
    neighbours = (x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1]) / 4
    assert torch.allclose(out[..., 1:-1, 1:-1], neighbours, atol=1e-12)


def test_mosaic_layout_and_errors():
    cfa = torch.tensor(BAYERS[0])
    mosaic = torch.rand(1, 1, 8, 12, dtype=torch.float64)
    assert torch.allclose(self_ensemble_apply(lambda t: t * 3, mosaic, cfa, packed=False), mosaic * 3, atol=1e-12)
    with pytest.raises(Exception, match="multiples of the CFA period 2"):
        self_ensemble_apply(lambda t: t, torch.rand(1, 1, 7, 8), cfa, packed=False)


def test_restore_tiles_and_ensembles():
    """restore() without the ensemble is the plain model; with it, the ensemble of the tiled model."""
    cfa = torch.tensor(BAYERS[0])
    x = torch.rand(1, 4, 40, 48)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        assert torch.allclose(restore(conv, x, cfa, tile=0, overlap=0), conv(x))
        both = restore(conv, x, cfa, tile=32, overlap=16, self_ensemble=True)
        assert torch.allclose(both, self_ensemble_apply(conv, x, cfa), atol=1e-5)
        assert not torch.allclose(both, conv(x), atol=1e-3)
