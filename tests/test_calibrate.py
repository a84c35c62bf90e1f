"""rawrestore.physics.calibrate: per-site crosstalk kernels recovered from aligned (short, long) pairs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import isp
from rawrestore.cli import main as rawrestore_main
from rawrestore.errors import DataError
from rawrestore.physics.calibrate import CrosstalkNormalEquations, energy_constraints, estimate_crosstalk
from rawrestore.physics.crosstalk import adjoint_kernel, apply_crosstalk, load_kernel, site_energy, uniform_kernel
from rawrestore.physics.noise import sample_noise_params, synthesize_dark
from tests.rawfixtures import XTRANS, make_meta

BAYER = [[0, 1], [1, 2]]
BLACK, WHITE = 512.0, 16383.0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def site_kernel(period: int, seed: int = 0) -> torch.Tensor:
    """A site-dependent, energy-preserving gather kernel: each site scatters up to 3% to each neighbour."""
    generator = torch.Generator().manual_seed(seed)
    scatter = 0.03 * torch.rand(period, period, 3, 3, generator=generator, dtype=torch.float64)
    scatter[:, :, 1, 1] = 0.0
    scatter[:, :, 1, 1] = 1.0 - scatter.sum(dim=(-2, -1))
    return adjoint_kernel(scatter)


def textured(size: int, generator: torch.Generator) -> torch.Tensor:
    """A long exposure whose neighbours are independent (the most informative scene). -> (1,1,S,S) in [0.05, 0.9]."""
    return 0.05 + 0.85 * torch.rand(1, 1, size, size, generator=generator, dtype=torch.float64)


def test_energy_constraints_are_the_site_energy():
    for period in (2, 6):
        kernel = torch.rand(period, period, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(energy_constraints(period) @ kernel.flatten(), site_energy(kernel).flatten())
        assert site_energy(site_kernel(period)).sub(1.0).abs().max().item() < 1e-12


@pytest.mark.parametrize("cfa", [BAYER, XTRANS], ids=["bayer", "xtrans"])
def test_noiseless_pairs_give_the_kernel_exactly(cfa):
    period = len(cfa)
    kernel = site_kernel(period, seed=1)
    kernel[0, 0, 1, 1] += 0.05  # not energy preserving: the free fit must not care
    generator = torch.Generator().manual_seed(0)
    longs = [textured(60, generator) for _ in range(2)]
    offsets = torch.linspace(-0.02, 0.03, period * period, dtype=torch.float64).view(1, 1, period, period)
    pairs = [(apply_crosstalk(long, kernel) + offsets.repeat(1, 1, 60 // period, 60 // period), long) for long in longs]
    estimate = estimate_crosstalk(pairs, period)
    assert (estimate - kernel).abs().max().item() < 1e-9
    # the per-(pair, site) offset is what the ratio amplifies besides the signal; without it the taps absorb it
    biased = estimate_crosstalk(pairs, period, fit_offset=False, reweight=False)
    assert (biased - kernel).abs().max().item() > 1e-3


def test_energy_preserving_fit_of_an_energy_preserving_kernel():
    kernel = site_kernel(6, seed=2)
    generator = torch.Generator().manual_seed(0)
    longs = [textured(72, generator) for _ in range(2)]
    estimate = estimate_crosstalk([(apply_crosstalk(long, kernel), long) for long in longs], 6, energy_preserving=True)
    assert (estimate - kernel).abs().max().item() < 1e-9
    assert (site_energy(estimate) - 1.0).abs().max().item() < 1e-12


@pytest.mark.parametrize("cfa,size", [(BAYER, 256), (XTRANS, 384)], ids=["bayer", "xtrans"])
@pytest.mark.parametrize("energy_preserving", [False, True])
def test_recovers_kernel_under_eld_noise(cfa, size, energy_preserving):
    period = len(cfa)
    kernel = site_kernel(period, seed=3)
    generator = torch.Generator().manual_seed(4)
    pairs = []
    for ratio in (20.0, 50.0, 100.0, 20.0):
        long = textured(size, generator)
        params = sample_noise_params("SonyA7S2", generator)
        short = synthesize_dark(apply_crosstalk(long, kernel), ratio, params, BLACK, WHITE, cfa, generator)
        pairs.append((short * ratio, long))
    estimate = estimate_crosstalk(pairs, period, energy_preserving=energy_preserving)
    assert (estimate - kernel).abs().max().item() <= 5e-3
    # the plain least squares of the same data (no offsets, no weights) is measurably worse
    plain = estimate_crosstalk(pairs, period, energy_preserving=energy_preserving, fit_offset=False, reweight=False)
    assert (plain - kernel).abs().max().item() > (estimate - kernel).abs().max().item()


def test_saturated_neighbourhoods_are_left_out():
    kernel = uniform_kernel(2, 0.03, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    scene = 0.05 + torch.rand(1, 1, 96, 96, generator=generator, dtype=torch.float64)  # 5% above the clip point
    aligned = apply_crosstalk(scene, kernel)  # the dark frame is far below clipping
    long = scene.clamp(max=1.0)  # the long exposure clips
    estimate = estimate_crosstalk([(aligned, long)], 2, saturation=0.98)
    assert (estimate - kernel).abs().max().item() < 1e-9
    clipped_in = estimate_crosstalk([(aligned, long)], 2, saturation=10.0, reweight=False)
    assert (clipped_in - kernel).abs().max().item() > 1e-3


def test_shared_kernel_is_one_kernel_for_every_site():
    kernel = uniform_kernel(6, 0.02, dtype=torch.float64)
    generator = torch.Generator().manual_seed(6)
    long = textured(48, generator)
    estimate = estimate_crosstalk([(apply_crosstalk(long, kernel), long)], 6, shared=True, energy_preserving=True)
    assert (estimate - kernel).abs().max().item() < 1e-9


def test_undetermined_sites_are_a_data_error():
    with pytest.raises(DataError, match="site"):
        estimate_crosstalk([(torch.full((64, 64), 0.3), torch.full((64, 64), 0.3))], 2)  # flat: taps not separable
    with pytest.raises(DataError, match="site"):
        estimate_crosstalk([(torch.rand(8, 8), torch.rand(8, 8))], 2)  # too few pixels per site
    with pytest.raises(DataError, match="no pairs"):
        CrosstalkNormalEquations(2).solve()
    with pytest.raises(DataError, match="differ"):
        estimate_crosstalk([(torch.rand(16, 16), torch.rand(16, 18))], 2)


def _write_pairs(root, kernel, ratios, size=64, seed=0):
    """Long and short DNGs of textured scenes (short = crosstalk / ratio, rounded to DN) and a manifest CSV."""
    generator = torch.Generator().manual_seed(seed)
    meta = make_meta(BAYER, BLACK, size, size, white=WHITE)
    span = WHITE - BLACK
    rows = []
    for index, ratio in enumerate(ratios):
        long = textured(size, generator)
        short = apply_crosstalk(long, kernel) / ratio
        long_dn = torch.round(long * span + BLACK)[0, 0].numpy().astype(np.uint16)
        short_dn = torch.round(short * span + BLACK)[0, 0].numpy().astype(np.uint16)
        (root / "long").mkdir(exist_ok=True)
        (root / "short").mkdir(exist_ok=True)
        isp.write_dng(root / f"long/{index}.dng", long_dn, meta)
        isp.write_dng(root / f"short/{index}.dng", short_dn, meta)
        rows.append({"split": "train", "short": f"short/{index}.dng", "long": f"long/{index}.dng", "ratio": ratio})
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["split", "short", "long", "ratio"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "pairs.csv"


def test_cli_writes_a_kernel_the_loss_stack_can_load(tmp_path, capsys):
    kernel = site_kernel(2, seed=7)
    manifest = _write_pairs(tmp_path, kernel, ratios=(2.0, 4.0, 2.0))
    out = tmp_path / "kernels" / "K.npy"
    assert rawrestore_main(["calibrate-crosstalk", "--manifest", str(manifest), "--out", str(out)]) == 0
    estimate = np.load(out)
    assert estimate.shape == (2, 2, 3, 3) and estimate.dtype == np.float32
    assert np.abs(estimate - kernel.numpy()).max() <= 5e-3  # 14-bit rounding of the short frames is the only noise
    assert "3 pairs" in capsys.readouterr().out
    load_kernel(out, 2)  # energy preserving by default, so the crosstalk loss accepts it
    # --max-pairs and --root (paths relative to another folder than the CSV's)
    moved = tmp_path / "elsewhere.csv"
    moved.write_text(manifest.read_text())
    assert rawrestore_main(["calibrate-crosstalk", "--manifest", str(moved), "--root", str(tmp_path), "--out", str(out),
                            "--max-pairs", "1", "--free"]) == 0
    assert "from 1 pairs" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("short,long\na.dng,b.dng\n")
    assert rawrestore_main(["calibrate-crosstalk", "--manifest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "K.npy")]) == 2
    error = capsys.readouterr().err
    assert "ratio" in error and error.count("\n") == 1
    assert rawrestore_main(["calibrate-crosstalk", "--manifest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "K.txt")]) == 2
    assert ".npy" in capsys.readouterr().err


@pytest.mark.slow
def test_recovers_the_synthetic_dataset_kernel(tmp_path):
    from rawrestore.data.synth import generate

    # 14 scenes at 512 px (42 pairs): the smallest built-in set that pins every tap to 5e-3
    root = generate(tmp_path / "synth", "sony", scenes=14, seed=0, size=512, progress=False)
    truth = json.loads((root / "truth.json").read_text())
    rows = [{"short": name, "long": entry["long"], "ratio": entry["ratio"]} for name, entry in truth["files"].items() if "long" in entry]
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["short", "long", "ratio"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "K.npy"
    assert rawrestore_main(["calibrate-crosstalk", "--manifest", str(root / "pairs.csv"), "--out", str(out)]) == 0
    truth_kernel = np.asarray(truth["crosstalk"]["kernel"])
    estimate = np.load(out)
    assert np.abs(estimate - truth_kernel).max() <= 5e-3
