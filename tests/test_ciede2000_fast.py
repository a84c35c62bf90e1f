"""The compiled CIEDE2000 of `rawrestore.metrics.delta_e00` against colour-science, Sharma's table and the torch path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from isp.color import delta_e2000, srgb_to_lab
from rawrestore.metrics import ciede2000, delta_e00

pytestmark = pytest.mark.skipif(not ciede2000.available(), reason="numba is not installed (the torch path is used)")


def _pair(seed: int, shape=(2, 3, 24, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=generator, dtype=torch.float64)
    target = (pred + 0.2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 0.1).clamp(0, 1)
    target[:, :, :2] = pred[:, :, :2].mean(dim=1, keepdim=True)  # greys: achromatic branches
    return pred, target


def test_compiled_path_equals_the_float64_torch_path():
    pred, target = _pair(0)
    expected = delta_e2000(srgb_to_lab(pred), srgb_to_lab(target)).flatten(1).mean(dim=1)
    got = delta_e00(pred, target)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with torch.enable_grad():  # with gradients the torch path runs; same numbers
        grad_path = delta_e00(pred.clone().requires_grad_(), target)
    torch.testing.assert_close(grad_path.detach(), expected, rtol=1e-12, atol=1e-12)


def test_compiled_path_agrees_with_colour_science():
    colour = pytest.importorskip("colour")
    from isp.color import D65_WHITE_XYZ

    pred, target = _pair(1)
    got = delta_e00(pred.float(), target.float())
    illuminant = colour.XYZ_to_xy(np.array(D65_WHITE_XYZ))  # isp.color's white, as tests/test_metrics.py
    for index in range(2):
        a = pred.float().double()[index].permute(1, 2, 0).numpy()
        b = target.float().double()[index].permute(1, 2, 0).numpy()
        lab_a = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(a), illuminant=illuminant)
        lab_b = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(b), illuminant=illuminant)
        expected = np.mean(colour.delta_E(lab_a, lab_b, method="CIE 2000"))
        assert float(got[index]) == pytest.approx(float(expected), abs=1e-6)


def test_sharma_pairs_through_the_kernel():
    """Sharma, Wu & Dalal (2005) table pairs, fed to the kernel's CIEDE2000 through exact Lab -> sRGB inputs."""
    from isp.color import lab_to_xyz, linear_to_srgb, xyz_to_linear_srgb

    lab1 = torch.tensor([[50.0, 2.6772, -79.7751], [50.0, 2.5, 0.0], [60.2574, -34.0099, 36.2677]], dtype=torch.float64)
    lab2 = torch.tensor([[50.0, 0.0, -82.7485], [50.0, 0.0, -2.5], [60.4626, -34.1751, 39.4387]], dtype=torch.float64)
    expected = torch.tensor([2.0425, 4.3065, 1.2644], dtype=torch.float64)

    def srgb(lab: torch.Tensor) -> torch.Tensor:
        return linear_to_srgb(xyz_to_linear_srgb(lab_to_xyz(lab.T.reshape(1, 3, 3, 1))))

    got = torch.from_numpy(np.stack([ciede2000.mean_delta_e00(srgb(lab1)[..., i:i + 1, :].numpy(),
                                                              srgb(lab2)[..., i:i + 1, :].numpy())[0] for i in range(3)]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_per_pixel_values_on_hard_hue_cases():
    """Per pixel (one-pixel images) against the torch path: random pairs, greys, equal hues, near-opposite hues.

    The kernel takes cos/sin of the hue difference and of the mean hue from the hue vectors, not
    from trigonometric calls; these cases sit on the branches of the mean-hue rule.
    """
    from isp.color import lab_to_xyz, linear_to_srgb, xyz_to_linear_srgb

    generator = torch.Generator().manual_seed(3)
    count = 600
    L = 20 + 60 * torch.rand(count, 2, generator=generator, dtype=torch.float64)
    chroma = 25 * torch.rand(count, 2, generator=generator, dtype=torch.float64)
    hue = 2 * torch.pi * torch.rand(count, generator=generator, dtype=torch.float64)
    offset = torch.cat([torch.pi + 1e-3 * torch.randn(200, generator=generator, dtype=torch.float64),  # ~opposite
                        1e-4 * torch.randn(200, generator=generator, dtype=torch.float64),  # ~same hue
                        2 * torch.pi * torch.rand(200, generator=generator, dtype=torch.float64)])
    hues = torch.stack([hue, hue + offset], dim=1)
    L[:400, 1] = L[:400, 0] + 0.01 * torch.randn(400, generator=generator, dtype=torch.float64)  # close pairs
    chroma[:400, 1] = chroma[:400, 0] * (1 + 1e-3 * torch.randn(400, generator=generator, dtype=torch.float64))
    chroma[:50, 0] = 0.0  # one grey
    chroma[50:60] = 0.0  # both grey
    lab = torch.stack([L, chroma * hues.cos(), chroma * hues.sin()], dim=-1)  # (count, 2, 3)
    srgb = linear_to_srgb(xyz_to_linear_srgb(lab_to_xyz(lab.permute(1, 2, 0).reshape(2, 3, count, 1)))).clamp(0, 1)
    pred = srgb[0].permute(1, 0, 2).reshape(count, 3, 1, 1)
    target = srgb[1].permute(1, 0, 2).reshape(count, 3, 1, 1)
    expected = delta_e2000(srgb_to_lab(pred), srgb_to_lab(target)).flatten()
    got = torch.from_numpy(ciede2000.mean_delta_e00(pred.numpy(), target.numpy()))
    assert expected.min() < 1e-3 and expected.max() > 10  # the set spans tiny to large differences
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_mean_does_not_depend_on_chunking(monkeypatch):
    pred, target = _pair(4, shape=(2, 3, 61, 67))
    whole = ciede2000.mean_delta_e00(pred.numpy(), target.numpy())
    monkeypatch.setattr(ciede2000, "CHUNK", 97)  # many chunks, run on the thread pool, uneven last chunk
    chunked = ciede2000.mean_delta_e00(pred.numpy(), target.numpy())
    np.testing.assert_allclose(chunked, whole, rtol=1e-13)
