"""rawrestore.metrics against scikit-image, colour-science, the lpips package and numpy means."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import colour
import lpips as lpips_package
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from isp.color import D65_WHITE_XYZ
from isp.errors import InputError
from rawrestore.metrics import (
    Evaluator,
    delta_e00,
    lpips,
    psnr,
    quantize_8bit,
    ratio_group,
    raw_psnr,
    raw_ssim,
    ssim,
)

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _structured_batch(dtype: torch.dtype, height: int = 48, width: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and predictions of different difficulty. -> pred, target (4,3,H,W) in [0,1]."""
    generator = torch.Generator().manual_seed(11)
    rows = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    cols = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    checker = ((torch.arange(height).view(-1, 1) // 4 + torch.arange(width).view(1, -1) // 4) % 2).float()
    target = torch.stack(
        [
            torch.stack([rows, cols, 1 - rows]),  # smooth ramps
            torch.stack([checker, 1 - checker, 0.5 * checker + 0.25]),  # hard edges
            torch.rand(3, height, width, generator=generator),  # white noise
            torch.full((3, height, width), 0.02) + 0.01 * checker,  # nearly black
        ]
    )
    noise = torch.randn(target.shape, generator=generator) * torch.tensor([0.01, 0.05, 0.1, 0.005]).view(4, 1, 1, 1)
    pred = (target + noise).clamp(0, 1)
    pred[1] = torch.roll(target[1], shifts=1, dims=2)  # a misalignment, not noise
    return pred.to(dtype), target.to(dtype)


def _hwc(image: torch.Tensor) -> np.ndarray:
    """(C,H,W) tensor -> (H,W,C) numpy in the same dtype."""
    return image.permute(1, 2, 0).cpu().numpy()


# --- PSNR / SSIM vs scikit-image ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_psnr_matches_skimage_per_image(dtype):
    pred, target = _structured_batch(dtype)
    got = psnr(pred, target)
    assert got.shape == (4,) and got.dtype == torch.float64
    expected = [peak_signal_noise_ratio(_hwc(target[i]), _hwc(pred[i]), data_range=1.0) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)
    # data_range scales as in scikit-image.
    expected_255 = peak_signal_noise_ratio(_hwc(target[0] * 255), _hwc(pred[0] * 255), data_range=255.0)
    assert psnr(pred[:1] * 255, target[:1] * 255, data_range=255.0).item() == pytest.approx(expected_255, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_matches_skimage_per_image(dtype):
    pred, target = _structured_batch(dtype)
    got = ssim(pred, target)
    assert got.shape == (4,) and got.dtype == torch.float64
    expected = [
        structural_similarity(
            _hwc(target[i]),
            _hwc(pred[i]),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=-1,
        )
        for i in range(4)
    ]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=0)
    # The four images score differently: per-image values, not a pooled batch mean.
    assert len(set(np.round(got.numpy(), 4))) == 4


def test_ssim_smallest_image_and_odd_sizes():
    generator = torch.Generator().manual_seed(3)
    for height, width in ((11, 11), (13, 29)):
        target = torch.rand(2, 3, height, width, generator=generator, dtype=torch.float64)
        pred = (target + 0.1 * torch.randn(target.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
        expected = [
            structural_similarity(
                _hwc(target[i]), _hwc(pred[i]), gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=1.0, channel_axis=-1,
            )
            for i in range(2)
        ]
        np.testing.assert_allclose(ssim(pred, target).numpy(), expected, atol=1e-4, rtol=0)


def test_identical_images():
    _, target = _structured_batch(torch.float64)
    assert torch.isinf(psnr(target, target)).all()
    np.testing.assert_allclose(ssim(target, target).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(delta_e00(target, target).numpy(), 0.0, atol=0)


def test_batch_is_not_pooled():
    pred, target = _structured_batch(torch.float64)
    for metric in (psnr, ssim, delta_e00):
        batch = metric(pred, target)
        single = torch.cat([metric(pred[i : i + 1], target[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(batch, single, atol=1e-12, rtol=0)


def test_metrics_are_differentiable():
    pred, target = _structured_batch(torch.float64, 16, 16)
    pred = pred.clone().requires_grad_(True)
    (ssim(pred, target).sum() + delta_e00(pred, target).sum() - psnr(pred, target).sum()).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


# --- Raw-domain metrics (ELD protocol = scikit-image defaults on packed RAW) ------------------


def test_raw_metrics_match_skimage_defaults_on_clipped_packed_raw():
    generator = torch.Generator().manual_seed(5)
    target = torch.rand(3, 4, 20, 26, generator=generator)
    pred = target + torch.randn(target.shape, generator=generator) * torch.tensor([0.02, 0.1, 0.3]).view(3, 1, 1, 1)
    clipped_pred, clipped_target = pred.clamp(0, 1), target.clamp(0, 1)
    expected_psnr = [
        peak_signal_noise_ratio(_hwc(clipped_target[i]), _hwc(clipped_pred[i]), data_range=1.0) for i in range(3)
    ]
    # ELD calls structural_similarity(Y, X, data_range, multichannel=True): 7x7 uniform, sample covariance.
    expected_ssim = [
        structural_similarity(_hwc(clipped_target[i]), _hwc(clipped_pred[i]), data_range=1.0, channel_axis=-1)
        for i in range(3)
    ]
    np.testing.assert_allclose(raw_psnr(pred, target).numpy(), expected_psnr, atol=1e-6, rtol=0)
    np.testing.assert_allclose(raw_ssim(pred, target).numpy(), expected_ssim, atol=1e-4, rtol=0)
    # X-Trans packs 9 channels; the same functions apply.
    xtrans = torch.rand(1, 9, 12, 12, generator=generator)
    assert raw_ssim(xtrans, xtrans).item() == pytest.approx(1.0, abs=1e-6)


# --- CIEDE2000 mean vs colour-science ----------------------------------------------------------


def test_delta_e00_matches_colour_science():
    pred, target = _structured_batch(torch.float64, 12, 10)
    illuminant = colour.XYZ_to_xy(np.array(D65_WHITE_XYZ))
    expected = []
    for i in range(4):
        lab_pred = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(_hwc(pred[i])), illuminant=illuminant)
        lab_target = colour.XYZ_to_Lab(colour.sRGB_to_XYZ(_hwc(target[i])), illuminant=illuminant)
        expected.append(colour.delta_E(lab_pred, lab_target, method="CIE 2000").mean())
    np.testing.assert_allclose(delta_e00(pred, target).numpy(), expected, atol=1e-6, rtol=0)


# --- LPIPS vs the lpips package ----------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lpips_net() -> torch.nn.Module:
    """lpips package model, calibrated linear layers, seeded random AlexNet trunk."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips_package.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)


def test_lpips_matches_the_package_on_zero_one_inputs(random_lpips_net):
    pred, target = _structured_batch(torch.float32, 64, 64)
    got = lpips(pred, target, random_lpips_net)
    assert got.shape == (4,) and got.dtype == torch.float64
    with torch.no_grad():
        expected = random_lpips_net(pred, target, normalize=True).flatten()
    torch.testing.assert_close(got, expected.double(), atol=1e-6, rtol=0)
    assert lpips(target, target, random_lpips_net).abs().max().item() < 1e-7


# --- Devices, dtypes, validation ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_on_device_match_cpu(device):
    pred, target = _structured_batch(torch.float32, 16, 16)
    for metric in (psnr, ssim, delta_e00, raw_psnr, raw_ssim):
        on_device = metric(pred.to(device), target.to(device))
        assert on_device.device.type == device and on_device.shape == (4,)
        torch.testing.assert_close(on_device.cpu(), metric(pred, target), atol=1e-5, rtol=0)


def test_quantize_8bit_known_values():
    values = torch.tensor([-0.1, 0.0, 0.2, 0.5, 1.0 / 510, 0.999, 1.2]).view(1, 1, 1, -1)
    expected = torch.tensor([0, 0, 51, 128, 0, 255, 255]) / 255.0  # 0.5*255 = 127.5 rounds half to even
    torch.testing.assert_close(quantize_8bit(values).flatten(), expected, atol=0, rtol=0)
    random = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    levels = quantize_8bit(random) * 255
    torch.testing.assert_close(levels, levels.round(), atol=1e-9, rtol=0)
    assert (quantize_8bit(random) - random).abs().max().item() <= 0.5 / 255 + 1e-12


def test_metrics_reject_bad_input():
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(InputError, match="differ in shape"):
        psnr(image, image[:, :, :8])
    with pytest.raises(InputError, match="at least 11x11"):
        ssim(image[:, :, :10], image[:, :, :10])
    with pytest.raises(InputError, match="3 channels"):
        delta_e00(image[:, :2], image[:, :2])
    with pytest.raises(InputError, match=r"\(B,C,H,W\)"):
        psnr(image[0], image[0])
    with pytest.raises(InputError, match="floating"):
        psnr((image * 255).byte(), (image * 255).byte())


# --- Evaluator ---------------------------------------------------------------------------------

_ROWS = [
    # name, ratio, psnr, ssim, lpips, delta_e00
    ("10003_00_0.04s", 250.0, 28.1, 0.80, 0.41, 6.0),
    ("10006_00_0.1s", 100.0, 30.5, 0.86, 0.30, 4.5),
    ("10011_00_0.1s", 99.8, 31.0, 0.88, 0.28, 4.0),
    ("10016_00_0.033s", 300.0, 26.0, 0.75, 0.50, 7.5),
    ("10022_00_0.04s", 250.0, 27.3, 0.79, None, 6.2),
]


def _filled(rows=_ROWS) -> Evaluator:
    evaluator = Evaluator()
    for name, ratio, p, s, lp, de in rows:
        evaluator.add(name, ratio, psnr=p, ssim=s, lpips=lp, delta_e00=de)
    return evaluator


def _numpy_stats(rows) -> dict:
    """Expected group stats by numpy. rows -> {metric: mean or None, n}."""
    array = {key: [row[index] for row in rows] for index, key in enumerate(["psnr", "ssim", "lpips", "delta_e00"], 2)}
    stats = {
        key: (None if any(v is None for v in values) else float(np.mean(np.array(values, dtype=np.float64))))
        for key, values in array.items()
    }
    stats["n"] = len(rows)
    return stats


def _assert_stats_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def test_evaluator_groups_and_means():
    summary = _filled().summary()
    assert list(summary) == ["all", "x100", "x250", "x300"]
    groups = {"x100": _ROWS[1:3], "x250": [_ROWS[0], _ROWS[4]], "x300": [_ROWS[3]]}
    _assert_stats_equal(summary["all"], _numpy_stats(_ROWS))
    for key, rows in groups.items():
        _assert_stats_equal(summary[key], _numpy_stats(rows))
    # One image without LPIPS: no LPIPS number for its groups, never a mean over a subset.
    assert summary["all"]["lpips"] is None and summary["x250"]["lpips"] is None
    assert summary["x100"]["lpips"] == pytest.approx(0.29, abs=1e-12)


def test_ratio_group_rounds():
    assert [ratio_group(r) for r in (100.0, 99.6, 250.0, 249.7, 300)] == ["x100", "x100", "x250", "x250", "x300"]


def test_evaluator_counts_repeated_images_once():
    evaluator = _filled(_ROWS + _ROWS[:2])
    assert len(evaluator) == 5
    _assert_stats_equal(evaluator.summary()["all"], _numpy_stats(_ROWS))


def test_evaluator_without_lpips_reports_none():
    rows = [(name, ratio, p, s, None, de) for name, ratio, p, s, _, de in _ROWS]
    summary = _filled(rows).summary()
    assert all(group["lpips"] is None for group in summary.values())


def test_evaluator_update_scores_quantized_images(random_lpips_net):
    pred, target = _structured_batch(torch.float32, 32, 32)
    evaluator = Evaluator(lpips_net=random_lpips_net)
    rows = evaluator.update(["a", "b", "c", "d"], torch.tensor([100.0, 250.0, 300.0, 100.0]), pred, target)
    q_pred, q_target = quantize_8bit(pred), quantize_8bit(target)
    expected_psnr = [
        peak_signal_noise_ratio(_hwc(q_target[i]).astype(np.float64), _hwc(q_pred[i]).astype(np.float64), data_range=1)
        for i in range(4)
    ]
    np.testing.assert_allclose([row.psnr for row in rows], expected_psnr, atol=1e-4)
    with torch.no_grad():
        expected_lpips = lpips(q_pred, q_target, random_lpips_net).numpy()
    np.testing.assert_allclose([row.lpips for row in rows], expected_lpips, atol=0)
    np.testing.assert_allclose([row.delta_e00 for row in rows], delta_e00(q_pred, q_target).numpy(), atol=0)
    assert evaluator.summary()["x100"]["n"] == 2
    without_lpips = Evaluator().update(["a"], [100.0], pred[:1], target[:1])
    assert without_lpips[0].lpips is None
    with pytest.raises(InputError, match="2 names"):
        Evaluator().update(["a", "b"], [100.0, 100.0], pred, target)


def test_evaluator_rejects_bad_rows():
    evaluator = Evaluator()
    with pytest.raises(InputError, match="ratio"):
        evaluator.add("x", 0.0, 30.0, 0.9)
    with pytest.raises(InputError, match="lpips"):
        evaluator.add("x", 100.0, 30.0, 0.9, lpips="n/a")


def test_evaluator_writes_csv_and_summary(tmp_path):
    evaluator = _filled()
    summary = evaluator.gather().write(tmp_path / "eval")
    with (tmp_path / "eval" / "per_image.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [r["name"] for r in records] == sorted(row[0] for row in _ROWS)
    by_name = {r["name"]: r for r in records}
    assert float(by_name["10011_00_0.1s"]["psnr"]) == 31.0 and by_name["10022_00_0.04s"]["lpips"] == ""
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    assert summary["all"]["n"] == 5


# --- DDP reduction (two gloo processes on this CPU) ---------------------------------------------

# Each rank adds its share of the rows plus one row that a padding DistributedSampler would repeat;
# a plain script keeps the children's imports to torch + rawrestore (spawning this module is slow).
_DDP_WORKER = """
import json, sys
import torch.distributed as dist
from rawrestore.metrics import Evaluator

rank, world_size, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = json.loads(sys.argv[5])
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world_size)
evaluator = Evaluator()
for name, ratio, psnr, ssim, lpips, delta_e00 in rows[rank::world_size] + rows[:1]:
    evaluator.add(name, ratio, psnr, ssim, lpips=lpips, delta_e00=delta_e00)
evaluator.gather()
with open(out_file + str(rank), "w") as handle:
    json.dump({"summary": evaluator.summary(), "names": [row.name for row in evaluator.rows]}, handle)
dist.destroy_process_group()
"""


def test_evaluator_gather_across_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    out_prefix = str(tmp_path / "rank")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", str(tmp_path / "init"), out_prefix, json.dumps(_ROWS)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr.decode()[-2000:]
    single_process = _filled().summary()
    for rank in range(2):
        result = json.loads(Path(out_prefix + str(rank)).read_text())
        assert result["names"] == sorted(row[0] for row in _ROWS)
        for key, stats in single_process.items():
            _assert_stats_equal(result["summary"][key], stats)
