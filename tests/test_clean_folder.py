"""data.kind clean_folder: splits, samples, held-out dark inputs with the calibrated noise, Bayer and X-Trans, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

import isp
from isp.meta import CameraMeta
from rawrestore.cli import main as cli_main
from rawrestore.config import from_dict
from rawrestore.data.clean_folder import split_files, validation_ratios
from rawrestore.data.dataset import build_datasets
from rawrestore.data.synth import BAYER_RGGB, XTRANS_XT2
from rawrestore.errors import ConfigError, DataError
from rawrestore.physics.noise import NoiseParams

SIZE = 96  # a multiple of both CFA periods
BLACK, WHITE = 512.0, 16383.0
LEVEL = 0.5  # normalised level of the clean files
CAMERA = {"K": 2.0, "lam": 0.1, "tukey": 4.0, "row": 1.5, "bias": [1.0, -1.0, 2.0, 0.5]}


def _camera_json(path) -> str:
    """A calibration file with one fixed noise: Kmin = Kmax, sigma 0, one lambda, one colour-bias row."""
    log_k = math.log(CAMERA["K"])
    line = lambda value: {"slope": 0.0, "bias": math.log(value), "sigma": 0.0}  # noqa: E731
    body = {"Kmin": CAMERA["K"], "Kmax": CAMERA["K"], "G_shape": [CAMERA["lam"]],
            "Profile-1": {"G_scale": line(CAMERA["tukey"]), "g_scale": line(3.0), "R_scale": line(CAMERA["row"])},
            "color_bias": [CAMERA["bias"]], "note": f"log K {log_k}"}
    path.write_text(json.dumps(body))
    return str(path)


def _folder(root, cfa, count=6):
    period = len(cfa)
    meta = CameraMeta(make="test", model="Clean", width=SIZE, height=SIZE, cfa=[list(r) for r in cfa],
                      black_level=[[BLACK] * period for _ in range(period)], white_level=WHITE,
                      wb_as_shot=[2.0, 1.0, 1.5], wb_daylight=[2.0, 1.0, 1.5], cam_to_srgb=np.eye(3).tolist())
    rng = np.random.default_rng(0)
    for k in range(count):
        mosaic = BLACK + (WHITE - BLACK) * LEVEL * (1 + 0.05 * rng.uniform(-1, 1, (SIZE, SIZE)))
        isp.write_dng(root / "shots" / f"img_{k:02d}.dng", np.round(mosaic).astype(np.uint16), meta)
    return root / "shots"


def _data_cfg(root, camera, noise_camera, tmp_path, **extra):
    data = {"kind": "clean_folder", "root": str(root), "camera": camera, "crop_size": 48, "val_crop": None,
            "num_workers": 0, "synthetic_noise": True, "synthetic_ratio": [50.0, 200.0], "noise_camera": noise_camera,
            "clip_aligned": False, "cache_dir": str(tmp_path / "cache"), "val_share": 0.5, **extra}
    return from_dict({"data": data}).data


def test_split_files_disjoint_and_even():
    files = [f"f{k}" for k in range(10)]
    splits = split_files(files, 0.2)
    assert splits["val"] == splits["test"] == ["f2", "f7"]
    assert sorted(splits["train"] + splits["val"]) == sorted(files)
    assert split_files(["a"], 0.5) == {"train": ["a"], "val": [], "test": []}
    assert len(split_files(files, 0.01)["val"]) == 1  # at least one held out
    assert validation_ratios([100.0, 300.0]) == (100.0, 173.0, 300.0)


@pytest.mark.parametrize("camera, cfa, channels", [("sony", BAYER_RGGB, 4), ("fuji", XTRANS_XT2, 9)])
def test_clean_folder_samples_and_noise(tmp_path, camera, cfa, channels):
    root = _folder(tmp_path, cfa)
    cfg = _data_cfg(root, camera, _camera_json(tmp_path / "camera.json"), tmp_path)
    train = build_datasets(cfg, "train", seed=0)
    val = build_datasets(cfg, "val", seed=0)
    assert len(train) == 3 and len(val) == 3
    train_names = {train[i]["long_name"] for i in range(len(train))}
    val_names = {val[i]["long_name"] for i in range(len(val))}
    assert not train_names & val_names and len(train_names | val_names) == 6
    sample = train[0]
    assert "input" not in sample and sample["target"].shape == (channels, 48 // int(math.sqrt(channels)), 48 // int(math.sqrt(channels)))
    assert float(sample["target"].mean()) == pytest.approx(LEVEL, abs=0.01)

    assert [float(val[i]["ratio"]) for i in range(3)] == [50.0, 100.0, 200.0]
    first, again = val[1], val[1]
    torch.testing.assert_close(first["input"], again["input"], rtol=0, atol=0)  # fixed noise seed
    span, ratio = WHITE - BLACK, float(first["ratio"])
    clean_dn = first["target"].double() * span / ratio
    dark_dn = first["input"].double() * span / ratio  # clip_aligned false: input = ratio * dark
    noise = dark_dn - clean_dn
    params = NoiseParams(system_gain=CAMERA["K"], read_scale=CAMERA["tukey"], row_scale=CAMERA["row"],
                         tukey_lambda=CAMERA["lam"], color_bias=tuple(CAMERA["bias"]))
    expected = float(params.variance(clean_dn).mean())
    assert float(noise.var()) == pytest.approx(expected, rel=0.06)
    assert expected > 1.2 * (CAMERA["K"] * float(clean_dn.mean()))  # read and row noise are a visible part of it


def test_clean_folder_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.synthetic_ratio"):
        from_dict({"data": {"kind": "clean_folder", "synthetic_noise": True}})
    with pytest.raises(ConfigError, match="data.synthetic_noise"):
        from_dict({"data": {"kind": "clean_folder", "synthetic_ratio": [100, 300]}})
    with pytest.raises(ConfigError, match="data.kind"):
        from_dict({"data": {"kind": "pairs"}})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no RAW files"):
        build_datasets(_data_cfg(empty, "sony", "SonyA7S2", tmp_path), "train")
    root = _folder(tmp_path, BAYER_RGGB, count=2)
    with pytest.raises(DataError, match="X-Trans|Bayer"):
        build_datasets(_data_cfg(root, "fuji", "SonyA7S2", tmp_path), "train")
    with pytest.raises(ConfigError, match="not found"):
        build_datasets(_data_cfg(root, "sony", str(tmp_path / "missing.json"), tmp_path), "val")


@pytest.mark.slow
def test_shoot_calibrate_train_infer(tmp_path, capsys):
    """The whole path of the README: shoot -> calibrate-noise -> train on clean files -> infer a dark file."""
    shoot = tmp_path / "shoot"
    assert cli_main(["synth", "--calibration-shoot", "--out", str(shoot), "--size", "96", "--isos", "800,3200"]) == 0
    camera = tmp_path / "camera.json"
    assert cli_main(["calibrate-noise", "--dark", str(shoot / "dark"), "--flat", str(shoot / "flat"),
                     "--out", str(camera), "--sample", "20000"]) == 0
    root = _folder(tmp_path, BAYER_RGGB, count=4)
    config = {
        "data": {"kind": "clean_folder", "root": str(root), "camera": "sony", "crop_size": 48, "val_crop": 48,
                 "num_workers": 0, "synthetic_noise": True, "synthetic_ratio": [100.0, 300.0],
                 "noise_camera": str(camera), "cache_dir": str(tmp_path / "cache"), "val_share": 0.25},
        "model": {"width": 4},
        "loss": {"crosstalk": {"weight": 0.0}, "perceptual": {"weight": 0.0}, "lpips": {"weight": 0.0},
                 "delta_e00": {"weight": 0.0}, "ssim": {"weight": 0.0}},
        "train": {"iterations": 3, "batch_size": 2, "val_every": 3, "ckpt_every": 0, "log_every": 1},
        "eval": {"tile": 0, "overlap": 0},
        "output_dir": str(tmp_path / "run"), "device": "cpu",
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["train", "-c", str(tmp_path / "exp.yaml"), "--no-progress"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [row["val"] for row in log if "val" in row]
    assert len(val) == 1 and val[0]["all"]["n"] == 1 and math.isfinite(val[0]["all"]["psnr"])  # the one held-out file
    assert list(val[0]) == ["all", "x100"]  # held-out file 0 gets the lowest ratio of [100, 300]
    dark = tmp_path / "dark.dng"
    clean, meta = isp.read_raw(next(root.glob("*.dng")))
    dark_mosaic = np.round(BLACK + (clean.astype(np.float64) - BLACK) / 100.0).astype(np.uint16)
    isp.write_dng(dark, dark_mosaic, meta)
    out_png = tmp_path / "out.png"
    assert cli_main(["infer", str(dark), "--checkpoint", str(tmp_path / "run/checkpoints/last.pt"), "--ratio", "100",
                     "-o", str(out_png)]) == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
