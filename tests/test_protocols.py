"""Evaluation protocols (sid, raw), subsets and `rawrestore score`, against rawpy + scikit-image computed here."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import rawpy
import torch
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import isp
from isp.png import write_png
from rawrestore.cli import main
from rawrestore.config import load_config, to_dict
from rawrestore.data.manifest import SHIPPED_DIR, load_manifest, select_subset
from rawrestore.models import build_model_from_config
from rawrestore.protocols import SID_POSTPROCESS, libraw_render
from rawrestore.train.checkpoint import save_checkpoint
from tests.rawfixtures import BAYER_PHASES, XTRANS, make_meta, smooth_mosaic

REPO = Path(__file__).resolve().parent.parent
# (short exposure, burst) per scene; long exposures are 10 s. 10034 is one of SID's misaligned scenes.
SONY_PAIRS = [("10003", "00", "0.1"), ("10003", "00", "0.04"), ("10003", "01", "0.04"), ("10034", "00", "0.033")]


def write_tree(root: Path, camera: str, pairs, cfa, size: tuple[int, int]) -> Path:
    """A SID-shaped tree of DNGs named like the camera's RAWs, with the camera's test list. -> root."""
    folder, ext = ("Sony", "ARW") if camera == "sony" else ("Fuji", "RAF")
    height, width = size
    lines = []
    for scene, burst, short_s in pairs:
        meta = make_meta(cfa, 512, height, width, exposure_time=10.0, make="Test", model=f"SID-{folder}")
        long_rel = f"{folder}/long/{scene}_00_10s.{ext}"
        short_rel = f"{folder}/short/{scene}_{burst}_{short_s}s.{ext}"
        long_mosaic = smooth_mosaic(meta, seed=int(scene), noise_dn=5.0, fill=0.5)
        if not (root / long_rel).exists():
            (root / long_rel).parent.mkdir(parents=True, exist_ok=True)
            isp.write_dng(root / long_rel, long_mosaic, meta)
        ratio = min(10.0 / float(short_s), 300.0)
        rng = np.random.default_rng(int(scene) * 100 + int(burst) + int(ratio))
        dark = 512 + (long_mosaic.astype(np.float64) - 512) / ratio + rng.normal(0, 2.0, long_mosaic.shape)
        (root / short_rel).parent.mkdir(parents=True, exist_ok=True)
        isp.write_dng(root / short_rel, np.clip(np.round(dark), 0, 16383).astype(np.uint16),
                      dataclasses.replace(meta, exposure_time=float(short_s)))
        lines.append(f"./{short_rel} ./{long_rel} ISO200 F8")
    (root / f"{folder}_test_list.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def sony(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config, checkpoint, root): the Sony tree and an untrained width-4 U-Net's checkpoint."""
    folder = tmp_path_factory.mktemp("protocols")
    root = write_tree(folder / "SID", "sony", SONY_PAIRS, BAYER_PHASES["RGGB"], (96, 128))
    config = folder / "tiny.yaml"
    config.write_text(f"""
base:
  - {REPO}/configs/data/sid_sony.yaml
  - {REPO}/configs/model/unet.yaml
  - {REPO}/configs/losses/raw_l1.yaml
data: {{root: {root}, num_workers: 0, cache_dir: null, val_crop: null}}
model: {{width: 4}}
eval: {{split: test, tile: 0, overlap: 0, classical: none, quantize_8bit: false}}
output_dir: {folder}/run
device: cpu
""", encoding="utf-8")
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, cfg.data.in_channels)
    checkpoint = folder / "model.pt"
    save_checkpoint({"model": model.state_dict(), "step": 0, "config": to_dict(cfg)}, [checkpoint])
    return config, checkpoint, root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def libraw_reference(path: Path, dn: np.ndarray | None = None) -> np.ndarray:
    """SID's call, written out here: the long file, optionally with other raw pixels. -> (H,W,3) float64."""
    with rawpy.imread(str(path)) as raw:
        if dn is not None:
            raw.raw_image[...] = dn
        return raw.postprocess(use_camera_wb=True, half_size=False, no_auto_bright=True, output_bps=16) / 65535.0


def normalised(path: Path) -> tuple[np.ndarray, float, float]:
    """rawpy's visible mosaic black-subtracted and white-normalised (not clipped), with black and white."""
    with rawpy.imread(str(path)) as raw:
        mosaic = raw.raw_image_visible.astype(np.float64)
        black = np.asarray(raw.black_level_per_channel, dtype=np.float64)[raw.raw_colors_visible]
        white = float(raw.white_level)
    return (mosaic - black) / (white - black.min()), float(black.min()), white


def pack_rggb(mosaic: np.ndarray) -> np.ndarray:
    """ELD's / PMN's packing of an RGGB mosaic: R, G, B, G2 as (h,w,4)."""
    return np.stack([mosaic[0::2, 0::2], mosaic[0::2, 1::2], mosaic[1::2, 1::2], mosaic[1::2, 0::2]], axis=-1)


def srgb_scores(target: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM (Gaussian 11x11, sigma 1.5, population covariance) of two (H,W,3) images, by scikit-image."""
    return (peak_signal_noise_ratio(target, pred, data_range=1.0),
            structural_similarity(target, pred, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False))


def test_libraw_render_in_the_long_container_equals_rendering_a_dng(tmp_path):
    """The shortcut (new pixels in the long file's LibRaw buffer) = writing a DNG with its metadata and rendering it."""
    for cfa, size, name in ((BAYER_PHASES["GRBG"], 64, "long.ARW"), (XTRANS, 516, "long.RAF")):
        meta = make_meta(cfa, 512, size, size, exposure_time=10.0)
        long_path = tmp_path / name
        isp.write_dng(long_path, smooth_mosaic(meta, seed=1), meta)
        other = smooth_mosaic(meta, seed=2, noise_dn=80.0)
        dng = tmp_path / f"other_{size}.dng"
        isp.write_dng(dng, other, meta)  # the metadata the long file carries
        with rawpy.imread(str(dng)) as raw:
            expected = raw.postprocess(**SID_POSTPROCESS) / 65535.0
        shortcut = libraw_render(long_path, other.astype(np.float64))
        assert np.array_equal(shortcut, expected)
        assert np.abs(libraw_render(long_path) - expected).max() > 0.05  # the pixels did change the render
        top, left, height, width = box = (6, 12, size - 18, size - 24)
        inside = other[top:top + height, left:left + width].astype(np.float64)
        assert np.array_equal(libraw_render(long_path, inside, box), _render_with_border(long_path, other, box))


def _render_with_border(long_path: Path, inside: np.ndarray, box) -> np.ndarray:
    """Render of the long file whose box holds `inside`'s pixels (the rest its own), cut to the box."""
    top, left, height, width = box
    with rawpy.imread(str(long_path)) as raw:
        raw.raw_image[top:top + height, left:left + width] = inside[top:top + height, left:left + width]
        image = raw.postprocess(**SID_POSTPROCESS) / 65535.0
    return image[top:top + height, left:left + width]


def test_eval_sid_and_raw_scores_equal_rawpy_and_skimage(sony, tmp_path):
    config, checkpoint, root = sony
    out = tmp_path / "eval"
    assert main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--no-images",
                 "--protocol", "internal,sid,raw"]) == 0
    rows = read_rows(out / "per_image.csv")
    assert list(rows[0]) == ["protocol", "method", "short", "ratio", "psnr", "ssim", "lpips", "delta_e00"]
    by_key = {(r["protocol"], r["method"], r["short"]): r for r in rows}
    assert len(rows) == 3 * 2 * len(SONY_PAIRS)  # internal/sid/raw x model/baseline x pairs (no classical)

    cfg = load_config(config)
    model = build_model_from_config(cfg.model, cfg.data.in_channels)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    for scene, burst, short_s in SONY_PAIRS:
        name = f"{scene}_{burst}_{short_s}s.ARW"
        long_path = root / f"Sony/long/{scene}_00_10s.ARW"
        ratio = min(10.0 / float(short_s), 300.0)
        dark, black, white = normalised(root / "Sony/short" / name)
        scaled = np.clip(dark * ratio, 0.0, 1.0)
        target_raw = np.clip(normalised(long_path)[0], 0.0, 1.0)
        cfa = torch.tensor(BAYER_PHASES["RGGB"])
        with torch.no_grad():  # the model's input layout is isp.cfa.pack's (the model's convention, not the protocol's)
            packed_in = isp.cfa.pack(torch.from_numpy(scaled.astype(np.float32))[None, None], cfa)
            restored_mosaic = isp.cfa.unpack(model(packed_in).clamp(0, 1), cfa)[0, 0].double().numpy()
        target = libraw_reference(long_path)
        for method, pred_mosaic in (("baseline", scaled), ("model", restored_mosaic)):
            dn = np.clip(np.round(pred_mosaic * (white - black) + black), 0, white).astype(np.uint16)
            rendered = libraw_reference(long_path, dn)
            psnr, ssim = srgb_scores(target, rendered)
            row = by_key[("sid", method, name)]
            assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-6)
            assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-6)
            # isp.color's sRGB -> Lab constants differ slightly from scikit-image's (1e-4 relative here)
            delta_e = deltaE_ciede2000(rgb2lab(target), rgb2lab(rendered)).mean()
            assert float(row["delta_e00"]) == pytest.approx(delta_e, rel=1e-4)
            assert float(row["ratio"]) == ratio
            raw_row = by_key[("raw", method, name)]
            expected_raw_psnr = peak_signal_noise_ratio(pack_rggb(target_raw), pack_rggb(pred_mosaic), data_range=1.0)
            expected_raw_ssim = structural_similarity(pack_rggb(target_raw), pack_rggb(pred_mosaic), data_range=1.0,
                                                      channel_axis=2)
            assert float(raw_row["psnr"]) == pytest.approx(expected_raw_psnr, abs=1e-6)
            assert float(raw_row["ssim"]) == pytest.approx(expected_raw_ssim, abs=1e-6)
            assert raw_row["lpips"] == "" and raw_row["delta_e00"] == ""
        # the protocols really differ: SID's render is not our ISP's
        assert abs(float(by_key[("sid", "model", name)]["psnr"]) - float(by_key[("internal", "model", name)]["psnr"])) > 1e-3

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"model", "baseline", "classical", "protocols", "subset", "pairs"}
    assert summary["subset"] == "all" and summary["pairs"] == len(SONY_PAIRS)
    assert set(summary["protocols"]) == {"internal", "sid", "raw"}
    assert summary["protocols"]["internal"]["model"] == summary["model"]
    sid_model = [float(r["psnr"]) for r in rows if r["protocol"] == "sid" and r["method"] == "model"]
    assert summary["protocols"]["sid"]["model"]["all"]["psnr"] == pytest.approx(np.mean(sid_model), abs=1e-9)
    assert summary["protocols"]["sid"]["model"]["x250"]["n"] == 2
    assert summary["protocols"]["raw"]["model"]["all"]["delta_e00"] is None
    report = (out / "report.html").read_text()
    assert "published, not measured here" in report and "28.88" in report and "43.47" in report


@pytest.mark.parametrize("subset, expected", [("aligned", 3), ("burst00", 3), ("burst00_aligned", 2)])
def test_eval_subset_recorded(sony, tmp_path, subset, expected):
    config, checkpoint, _ = sony
    out = tmp_path / subset
    assert main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--no-images",
                 "--subset", subset]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subset"] == subset and summary["pairs"] == expected == summary["model"]["all"]["n"]


def test_subset_counts_of_the_shipped_manifests():
    sony = load_manifest(SHIPPED_DIR / "sid_sony_test.csv")
    counts = {subset: len(select_subset(sony, subset)) for subset in ("all", "aligned", "burst00", "burst00_aligned")}
    assert counts == {"all": 598, "aligned": 562, "burst00": 93, "burst00_aligned": 88}
    assert len(select_subset(load_manifest(SHIPPED_DIR / "sid_fuji_test.csv"), "all")) == 524
    burst00 = {(r.short, r.long) for r in load_manifest(SHIPPED_DIR / "sid_sony_test_burst00.csv")}
    assert {(r.short, r.long) for r in select_subset(sony, "burst00")} == burst00


def test_eval_out_errors_leave_nothing(sony, tmp_path, capsys):
    config, checkpoint, _ = sony
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--out", str(a_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert "not a folder" in error and "\n" not in error and a_file.read_text() == "mine"
    assert main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--out", str(a_file / "sub")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    # a failed eval (missing checkpoint) leaves none of the folders it made
    deep = tmp_path / "new" / "deeper" / "eval"
    assert main(["eval", "-c", str(config), "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(deep)]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert not (tmp_path / "new").exists()


def test_score_reproduces_eval_sid_from_infer_pngs(sony, tmp_path):
    """infer's 16-bit PNGs (eval.protocol=[sid]) scored by `rawrestore score` = eval's sid numbers, image by image."""
    config, checkpoint, root = sony
    out = tmp_path / "eval"
    assert main(["eval", "-c", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--no-images",
                 "--protocol", "sid", "eval.quantize_8bit=true", "--no-quantize-8bit"]) == 0
    assert json.loads((out / "summary.json").read_text())["quantize_8bit"] is False
    preds = tmp_path / "preds"
    preds.mkdir()
    for scene, burst, short_s in SONY_PAIRS:
        name = f"{scene}_{burst}_{short_s}s"
        assert main(["infer", str(root / f"Sony/short/{name}.ARW"), "--checkpoint", str(checkpoint), "-c", str(config),
                     "-o", str(preds / f"{name}.png"), "--bits", "16", "--tile", "0", "eval.protocol=[sid]"]) == 0
    scored = tmp_path / "scored"
    assert main(["score", "--protocol", "sid", "--root", str(root), "--camera", "sony", "--pred", str(preds),
                 "--out", str(scored), "--bits", "16"]) == 0
    evaluated = {r["short"]: r for r in read_rows(out / "per_image.csv") if r["method"] == "model"}
    rows = read_rows(scored / "per_image.csv")
    assert len(rows) == len(SONY_PAIRS) and {r["method"] for r in rows} == {"scored"}
    for row in rows:
        for metric in ("psnr", "ssim", "delta_e00"):
            assert float(row[metric]) == pytest.approx(float(evaluated[row["short"]][metric]), abs=1e-9)
    summary = json.loads((scored / "summary.json").read_text())
    eval_summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 4 and summary["pairs"] == 4
    assert summary["protocols"]["sid"]["scored"]["x250"]["psnr"] == pytest.approx(
        eval_summary["protocols"]["sid"]["model"]["x250"]["psnr"], abs=1e-9)


def test_score_names_each_bad_prediction(sony, tmp_path, capsys):
    _, _, root = sony
    preds = tmp_path / "preds"
    preds.mkdir()
    target = libraw_reference(root / "Sony/long/10003_00_10s.ARW")
    good = np.clip(target + np.random.default_rng(3).normal(0, 0.01, target.shape), 0, 1)
    import tifffile

    tifffile.imwrite(preds / "10003_00_0.1s.tif", np.round(good * 65535).astype(np.uint16))  # good, a 16-bit TIFF
    write_png(preds / "10003_00_0.04s.png", target[:-2], bits=16)  # wrong size
    write_png(preds / "10003_01_0.04s.png", target, bits=8)  # 8-bit where 16 is declared
    (preds / "10034_00_0.033s.png").write_bytes(b"not an image")
    out = tmp_path / "scored"
    assert main(["score", "--protocol", "sid", "--root", str(root), "--camera", "sony", "--pred", str(preds),
                 "--out", str(out), "--bits", "16"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("rawrestore score:")]
    assert len(lines) == 3
    assert any("wrong size" in line and "10003_00_0.04s.png" in line for line in lines)
    assert any("wrong depth" in line and "10003_01_0.04s.png" in line for line in lines)
    assert any("unreadable" in line and "10034_00_0.033s.png" in line for line in lines)
    assert "1 of 4 predictions scored" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 1 and summary["unscored"] == 3
    psnr, _ = srgb_scores(target, np.round(good * 65535) / 65535)
    assert summary["protocols"]["sid"]["scored"]["all"]["psnr"] == pytest.approx(psnr, abs=1e-6)

    # a folder with none of the predictions, or a root without the camera's files: one line, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    for camera, pred_dir, needle in (("sony", empty, "holds none of the 4 predictions"), ("fuji", preds, "Fuji/long")):
        assert main(["score", "--protocol", "sid", "--root", str(root), "--camera", camera, "--pred", str(pred_dir),
                     "--out", str(tmp_path / "never")]) == 2
        error = capsys.readouterr().err.strip()
        assert needle in error and "\n" not in error and not (tmp_path / "never").exists()

    (preds / "10003_00_0.1s.tif").unlink()  # now missing
    assert main(["score", "--protocol", "sid", "--root", str(root), "--camera", "sony", "--pred", str(preds),
                 "--out", str(tmp_path / "again")]) == 2
    assert any("missing" in line and "10003_00_0.1s" in line for line in capsys.readouterr().err.splitlines())


def test_score_raw_npy(sony, tmp_path):
    _, _, root = sony
    preds = tmp_path / "npy"
    preds.mkdir()
    expected = {}
    for scene, burst, short_s in SONY_PAIRS:
        name = f"{scene}_{burst}_{short_s}s"
        target = pack_rggb(np.clip(normalised(root / f"Sony/long/{scene}_00_10s.ARW")[0], 0, 1))
        pred = np.clip(target + np.random.default_rng(int(scene) + int(burst)).normal(0, 0.01, target.shape), 0, 1)
        np.save(preds / f"{name}.npy", pred.astype(np.float32) if burst == "00" else np.moveaxis(pred, -1, 0))
        pred = pred.astype(np.float32).astype(np.float64) if burst == "00" else pred
        expected[f"{name}.ARW"] = (peak_signal_noise_ratio(target, pred, data_range=1.0),
                                   structural_similarity(target, pred, data_range=1.0, channel_axis=2))
    out = tmp_path / "scored"
    assert main(["score", "--protocol", "raw", "--root", str(root), "--camera", "sony", "--pred", str(preds),
                 "--out", str(out), "--subset", "burst00"]) == 0
    rows = read_rows(out / "per_image.csv")
    assert len(rows) == 3 and {r["protocol"] for r in rows} == {"raw"}
    for row in rows:
        assert float(row["psnr"]) == pytest.approx(expected[row["short"]][0], abs=1e-6)
        assert float(row["ssim"]) == pytest.approx(expected[row["short"]][1], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subset"] == "burst00" and summary["pairs"] == 3


def test_score_fuji_sid_uses_libraw_xtrans_demosaic(tmp_path):
    """Fuji (X-Trans, 516 px: LibRaw's default X-Trans demosaic needs >= 512) scored under sid."""
    root = write_tree(tmp_path / "SID", "fuji", [("10019", "00", "0.1")], XTRANS, (516, 516))
    target = libraw_reference(root / "Fuji/long/10019_00_10s.RAF")
    noisy = np.clip(target + np.random.default_rng(0).normal(0, 0.02, target.shape), 0, 1)
    preds = tmp_path / "preds"
    preds.mkdir()
    write_png(preds / "10019_00_0.1s.png", noisy, bits=8)
    out = tmp_path / "scored"
    assert main(["score", "--protocol", "sid", "--root", str(root), "--camera", "fuji", "--pred", str(preds),
                 "--out", str(out), "--quantize-8bit"]) == 0
    quantised = lambda image: np.round(np.clip(image, 0, 1) * 255) / 255  # noqa: E731
    psnr, ssim = srgb_scores(quantised(target), np.round(noisy * 255) / 255)
    row = read_rows(out / "per_image.csv")[0]
    assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-6) and float(row["ssim"]) == pytest.approx(ssim, abs=1e-6)
    assert "26.61" in (out / "report.html").read_text()
