"""`rawrestore eval` outputs and numbers, tiled inference, `rawrestore infer` PNG + DNG."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import isp
from rawrestore.cli import main
from rawrestore.config import load_config
from rawrestore.evaluate import classical_denoise, load_model
from rawrestore.metrics import functional
from rawrestore.physics.align import align_exposure
from rawrestore.tiling import blend_window, tile_starts, tiled_apply
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml

REPO = Path(__file__).resolve().parent.parent
GROUPS = {"all", "x100", "x250", "x300"}
METRICS = {"psnr", "ssim", "lpips", "delta_e00", "n"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> tuple[Path, Path, Path]:
    """(config, checkpoint, data root): the shared synthetic set and a width-4 U-Net trained 3 steps with EMA."""
    folder = tmp_path_factory.mktemp("evalrun")
    config = tiny_yaml(folder, data_root, eval_keys="split: test, tile: 0, overlap: 0, classical: wavelet", iterations=3,
                       warmup_iters=0, val_every=0, ckpt_every=0, ema=0.5)
    Trainer(load_config(config), log=lambda _: None, progress=False).fit()
    return config, folder / "run/checkpoints/last.pt", data_root


def read_csv(path: Path, method: str | None = None) -> list[dict[str, str]]:
    """Rows of a per_image.csv (of one method of the internal protocol when `method` is given)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows if method is None else [r for r in rows if r["protocol"] == "internal" and r["method"] == method]


def test_eval_writes_csv_summary_report(trained, tmp_path, capsys):
    config, checkpoint, _ = trained
    out = tmp_path / "eval"
    assert main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--split", "test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^internal\s+all\s+model\s", printed, re.M) and re.search(r"^\s+classical\s", printed, re.M)
    assert f"report: {out / 'report.html'}" in printed

    rows = read_csv(out / "per_image.csv", "model")
    assert list(rows[0]) == ["protocol", "method", "short", "ratio", "psnr", "ssim", "lpips", "delta_e00"]
    assert len(read_csv(out / "per_image.csv")) == 3 * 3  # model, baseline, classical
    assert sorted(float(r["ratio"]) for r in rows) == [100.0, 250.0, 300.0]
    assert all(r["lpips"] == "" for r in rows)  # no LPIPS weights on disk: not measured, never invented

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"model", "baseline", "classical", "protocols", "subset", "pairs", "split", "quantize_8bit"}
    assert summary["protocols"] == {"internal": {m: summary[m] for m in ("model", "baseline", "classical")}}
    assert summary["subset"] == "all" and summary["pairs"] == 3
    for method in (summary[m] for m in ("model", "baseline", "classical")):
        assert set(method) == GROUPS
        for stats in method.values():
            assert set(stats) == METRICS and stats["lpips"] is None
    for metric in ("psnr", "ssim", "delta_e00"):
        mean = math.fsum(float(r[metric]) for r in rows) / len(rows)
        assert summary["model"]["all"][metric] == pytest.approx(mean, rel=1e-12)
        for row in rows:
            group = f"x{round(float(row['ratio']))}"
            assert summary["model"][group][metric] == pytest.approx(float(row[metric]), rel=1e-12)
    assert summary["model"]["all"]["n"] == 3 and summary["classical"]["x300"]["n"] == 1
    # denoising should beat the raw amplified input on this noisy data
    assert summary["classical"]["all"]["psnr"] > summary["baseline"]["all"]["psnr"]

    report = (out / "report.html").read_text()
    pictures = re.findall(r"src='([^']+)'", report)
    assert len(pictures) == 3 * 5 + 1  # 5 pictures per image plus the loss curves
    assert all((out / p).is_file() for p in pictures)
    assert "x250" in report and "classical" in report


def test_eval_baseline_numbers_match_direct_computation(trained, tmp_path):
    """The baseline row of one image = metrics of the rendered, 8-bit, ratio-scaled input vs the rendered target."""
    config, checkpoint, root = trained
    out = tmp_path / "eval"
    main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--classical", "none",
          "--no-images"])
    baseline = {r["short"]: r for r in read_csv(out / "per_image.csv", "baseline")}
    name = "10001_00_0.04s.dng"
    short, meta = isp.read_raw(root / "Sony/short" / name)
    long, long_meta = isp.read_raw(root / "Sony/long/10001_00_10s.dng")
    to_tensor = lambda m: torch.from_numpy(m.astype(np.float32))[None, None]  # noqa: E731
    dark = isp.ops.normalize(to_tensor(short), meta.black_level, meta.white_level)
    scaled = align_exposure(dark, 250.0, clip=True)
    target = isp.ops.normalize(to_tensor(long), long_meta.black_level, long_meta.white_level).clamp(0, 1)
    t = long_meta.render_tensors()
    render = isp.ISP("bilinear", "srgb")
    pred_srgb = functional.quantize_8bit(render(scaled, t["cfa"], t["wb"], t["cam_to_srgb"]))
    target_srgb = functional.quantize_8bit(render(target, t["cfa"], t["wb"], t["cam_to_srgb"]))
    assert float(baseline[name]["psnr"]) == pytest.approx(functional.psnr(pred_srgb, target_srgb).item(), abs=1e-6)
    assert float(baseline[name]["delta_e00"]) == pytest.approx(functional.delta_e00(pred_srgb, target_srgb).item(), abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classical"]["all"] == {"psnr": None, "ssim": None, "lpips": None, "delta_e00": None, "n": 0}


def test_validate_and_eval_give_the_same_numbers(tmp_path):
    """Trainer.validate after training = `rawrestore eval --split val` on the checkpoint it wrote (one scoring path)."""
    from rawrestore.data.synth import generate

    root = generate(tmp_path / "synthetic", "sony", scenes=3, seed=1, size=96, progress=False)
    config = tmp_path / "v.yaml"
    config.write_text(f"""
base:
  - {REPO}/configs/data/synthetic.yaml
  - {REPO}/configs/model/unet.yaml
  - {REPO}/configs/losses/raw_l1.yaml
data: {{root: {root}, crop_size: 64, num_workers: 0, cache_dir: null}}
model: {{width: 4}}
train: {{iterations: 2, batch_size: 2, val_every: 100, ckpt_every: 0, ema: 0.5, amp: bf16, channels_last: false}}
eval: {{tile: 0, overlap: 0, classical: none}}
output_dir: {tmp_path}/run
device: cpu
""", encoding="utf-8")
    trainer = Trainer(load_config(config), log=lambda _: None, progress=False)
    trainer.fit()
    validated = trainer.validate()["summary"]
    out = tmp_path / "eval"
    assert main(["eval", "-c", str(config), "--checkpoint", str(tmp_path / "run/checkpoints/last.pt"), "--split", "val",
                 "--out", str(out), "--no-images"]) == 0
    evaluated = json.loads((out / "summary.json").read_text())["model"]
    assert set(validated) == set(evaluated) and validated["all"]["n"] >= 1
    # identical: same prediction path in float32 (validation no longer runs under the bf16 autocast set here)
    # and the same renderer; with train.channels_last the weights' layout changes float rounding only
    for group, stats in validated.items():
        for metric in ("psnr", "ssim", "delta_e00"):
            assert evaluated[group][metric] == pytest.approx(stats[metric], abs=1e-9)


def test_classical_options():
    torch.manual_seed(0)
    clean = torch.linspace(0.2, 0.6, 64).repeat(4, 64, 1)
    noisy = clean + 0.05 * torch.randn_like(clean)
    denoised = classical_denoise(noisy, "wavelet")
    assert denoised.shape == noisy.shape and denoised.dtype == noisy.dtype
    assert (denoised - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()
    try:
        import bm3d  # noqa: F401
    except ImportError:
        from rawrestore.errors import ConfigError

        with pytest.raises(ConfigError, match="pip install bm3d"):
            classical_denoise(noisy, "bm3d")


# ----------------------------------------------------------------------------- tiling


def test_tile_spans_and_windows():
    for length, tile, overlap in [(100, 32, 8), (2128, 512, 32), (1424, 512, 32), (65, 64, 8), (300, 64, 16)]:
        spans = tile_starts(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(start % 16 == 0 for start, _ in spans)
        assert all(a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:]))
        coverage = torch.zeros(length, dtype=torch.float64)
        for index, (start, stop) in enumerate(spans):
            coverage[start:stop] += blend_window(spans, index, torch.float64)
        assert torch.allclose(coverage, torch.ones_like(coverage))  # a partition of unity: no seams in brightness
    assert tile_starts(50, 64, 8) == [(0, 50)]


def test_tiled_equals_untiled_within_receptive_field():
    """A 4-layer 3x3 conv net (receptive radius 4) tiled with overlap >= 4 * 4 gives the untiled output."""
    torch.manual_seed(0)
    layers = []
    for index in range(4):
        layers += [nn.Conv2d(4 if index == 0 else 8, 8 if index < 3 else 4, 3, padding=1), nn.LeakyReLU(0.2)]
    net = nn.Sequential(*layers).double()
    packed = torch.rand(1, 4, 150, 230, dtype=torch.float64)
    with torch.no_grad():
        whole = net(packed)
    tiled = tiled_apply(net, packed, tile=64, overlap=16)
    assert torch.allclose(tiled, whole, rtol=0, atol=1e-12)
    # too little overlap for the field: the seams differ, so the test above is not vacuous
    tiny = tiled_apply(net, packed, tile=32, overlap=16, align=1)
    assert torch.allclose(tiny, whole, atol=1e-12)
    rough = tiled_apply(net, packed, tile=32, overlap=4, align=1)
    assert (rough - whole).abs().max() > 1e-6


def test_tiled_unet_close_to_untiled(trained):
    """The U-Net's receptive field (~150 px) exceeds the overlap: tiles differ from the whole frame only slightly."""
    config, checkpoint, _ = trained
    model, _, _ = load_model(load_config(config), checkpoint, torch.device("cpu"))
    torch.manual_seed(1)
    packed = torch.rand(1, 4, 160, 600) * 0.5
    with torch.no_grad():
        whole = model(packed)
    tiled = tiled_apply(model, packed, tile=256, overlap=96)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 1e-2 * whole.abs().mean()
    assert torch.equal(tiled_apply(model, packed, tile=0, overlap=0), whole)


# ------------------------------------------------------------------------------ infer


def test_infer_writes_png_and_dng_with_metadata(trained, tmp_path, capsys):
    config, checkpoint, root = trained
    source = root / "Sony/short/10001_00_0.04s.dng"
    png, dng = tmp_path / "out.png", tmp_path / "out.dng"
    assert main(["infer", str(source), "--checkpoint", str(checkpoint), "-o", str(png), "--dng", str(dng),
                 "--tile", "32", "--overlap", "16"]) == 0
    assert "ratio 250 from 10 s / 0.04 s" in capsys.readouterr().out

    from PIL import Image

    picture = np.asarray(Image.open(png))
    assert picture.shape == (128, 128, 3) and picture.dtype == np.uint8

    mosaic_in, meta_in = isp.read_raw(source)
    mosaic_out, meta_out = isp.read_raw(dng)
    assert mosaic_out.shape == mosaic_in.shape and mosaic_out.dtype == np.uint16
    assert meta_out.cfa == meta_in.cfa and meta_out.black_level == meta_in.black_level
    assert meta_out.white_level == meta_in.white_level and meta_out.exposure_time == 10.0
    assert meta_out.make == meta_in.make and meta_out.model == meta_in.model
    np.testing.assert_allclose(meta_out.wb_as_shot, meta_in.wb_as_shot, atol=1e-5)
    np.testing.assert_allclose(meta_out.cam_to_srgb, meta_in.cam_to_srgb, atol=1e-4)

    # the DNG holds the model's tiled output, denormalised to DN
    model, _, _ = load_model(load_config(config), checkpoint, torch.device("cpu"))
    raw = torch.from_numpy(mosaic_in.astype(np.float32))[None, None]
    packed = isp.cfa.pack(align_exposure(isp.ops.normalize(raw, meta_in.black_level, meta_in.white_level), 250.0, clip=True),
                          meta_in.cfa_array)
    restored = isp.cfa.unpack(tiled_apply(model, packed, 32, 16).clamp(0, 1), meta_in.cfa_array)
    expected = torch.round(isp.ops.denormalize(restored, meta_in.black_level, meta_in.white_level))[0, 0].numpy()
    assert np.abs(mosaic_out.astype(np.float64) - expected).max() <= 1.0
    assert mosaic_out.std() > 0


def test_infer_needs_a_ratio(trained, tmp_path, capsys):
    config, checkpoint, root = trained
    mosaic, meta = isp.read_raw(root / "Sony/short/10001_00_0.1s.dng")
    no_exif = tmp_path / "no_exposure.dng"
    isp.write_dng(no_exif, mosaic, dataclasses.replace(meta, exposure_time=None))
    png = tmp_path / "x.png"
    assert main(["infer", str(no_exif), "--checkpoint", str(checkpoint), "-o", str(png)]) == 2
    error = capsys.readouterr().err.strip()
    assert "no exposure time" in error and "--ratio" in error and "\n" not in error
    assert main(["infer", str(no_exif), "--checkpoint", str(checkpoint), "-o", str(png), "--ratio", "100"]) == 0
    assert png.is_file()


def test_eval_and_infer_self_ensemble(trained, tmp_path, capsys):
    """eval.self_ensemble=true scores the CFA-preserving ensemble; infer with the override writes that ensemble."""
    from rawrestore.data.dataset import build_datasets
    from rawrestore.ensemble import self_ensemble_apply

    config, checkpoint, root = trained
    out = tmp_path / "eval"
    assert main(["eval", "-c", str(config), "eval.self_ensemble=true", "--checkpoint", str(checkpoint), "--out", str(out),
                 "--classical", "none", "--no-images"]) == 0
    rows = {r["short"]: r for r in read_csv(out / "per_image.csv", "model")}
    cfg = load_config(config)
    model, _, _ = load_model(cfg, checkpoint, torch.device("cpu"))
    sample = next(s for s in (build_datasets(cfg.data, "test")[i] for i in range(3)) if s["short_name"] == "10001_00_0.1s.dng")
    render = isp.ISP("bilinear", "srgb")

    def srgb(packed):
        return functional.quantize_8bit(render(packed, sample["cfa"], sample["wb"], sample["cam_to_srgb"], packed=True))

    with torch.no_grad():
        ensembled = self_ensemble_apply(model, sample["input"][None], sample["cfa"])
        single = model(sample["input"][None])
    target = srgb(sample["target"][None])
    expected = functional.psnr(srgb(ensembled), target).item()
    assert float(rows["10001_00_0.1s.dng"]["psnr"]) == pytest.approx(expected, abs=1e-6)
    assert abs(functional.psnr(srgb(single), target).item() - expected) > 1e-4  # the ensemble changed the answer
    assert "self-ensemble" in (out / "report.html").read_text()

    source = root / "Sony/short/10001_00_0.1s.dng"
    png = tmp_path / "ens.png"
    dng = tmp_path / "ens.dng"
    assert main(["infer", str(source), "--checkpoint", str(checkpoint), "-o", str(png), "--dng", str(dng), "--tile", "0",
                 "eval.self_ensemble=true"]) == 0
    mosaic_out, meta_out = isp.read_raw(dng)
    restored = isp.cfa.unpack(ensembled.clamp(0, 1), meta_out.cfa_array)
    expected_dn = torch.round(isp.ops.denormalize(restored, meta_out.black_level, meta_out.white_level))[0, 0].numpy()
    assert np.abs(mosaic_out.astype(np.float64) - expected_dn).max() <= 1.0
