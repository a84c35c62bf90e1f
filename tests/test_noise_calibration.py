"""calibrate-noise: parameters recovered from simulated dark/flat shoots, the ELD JSON layout, the report, errors.

Two generators with known parameters: one written here (Poisson shot noise with gain K,
Tukey-lambda read noise from scipy, Gaussian row noise, 14-bit quantisation, per-colour black
offsets), and the project's own ELD model through `rawrestore synth --calibration-shoot` (DNG
files read back by LibRaw). Tolerances are the issue's: K 3%, read scale 5%, lambda 0.05,
row scale 10%, black 0.5 DN, slopes 0.05.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import isp
from isp.meta import CameraMeta
from rawrestore.cli import main as cli_main
from rawrestore.data.shoot import TRUE_CAMERA, SHOOT_TRUTH, write_calibration_shoot
from rawrestore.physics.noise import load_noise_fit, sample_noise_params, tukey_lambda_variance
from rawrestore.physics.noise_calibration import Frame, calibrate_frames, colour_slots, fit_log_line

BLACK, WHITE = 512.0, 16383.0
BAYER = [[0, 1], [1, 2]]
# per-site colour offsets of the independent camera: R, G (red row) / G2 (blue row), B
SITE_BIAS = np.array([[1.2, 0.4], [-0.3, 0.9]])
BIAS_SLOTS = np.array([1.2, 0.4, 0.9, -0.3])  # R, G, B, G2
TUKEY_LINE = (0.5, 0.6)  # slope, bias of log(scale) against log(K)
ROW_LINE = (0.6, -1.0)
GAINS = {800: 0.6, 1600: 1.2, 3200: 2.4, 6400: 4.8}
LAMBDAS = {800: -0.05, 1600: 0.0, 3200: 0.05, 6400: -0.1}


def _meta(size: int, model: str = "Independent", cfa=BAYER) -> CameraMeta:
    period = len(cfa)
    return CameraMeta(make="test", model=model, width=size, height=size, cfa=cfa,
                      black_level=[[BLACK] * period for _ in range(period)], white_level=WHITE,
                      wb_as_shot=[2.0, 1.0, 1.5], wb_daylight=[2.0, 1.0, 1.5], cam_to_srgb=np.eye(3).tolist())


def _truth(iso: int) -> dict[str, float]:
    log_k = math.log(GAINS[iso])
    return {"K": GAINS[iso], "lam": LAMBDAS[iso], "scale": math.exp(TUKEY_LINE[0] * log_k + TUKEY_LINE[1]),
            "row": math.exp(ROW_LINE[0] * log_k + ROW_LINE[1])}


def independent_frame(rng: np.random.Generator, iso: int, size: int, signal: float | np.ndarray = 0.0,
                      site_bias: np.ndarray = SITE_BIAS) -> np.ndarray:
    """One 14-bit frame: Poisson(signal / K) K + Tukey-lambda read + Gaussian row + colour offset + black, rounded."""
    truth = _truth(iso)
    signal = np.broadcast_to(np.asarray(signal, dtype=np.float64), (size, size))
    shot = rng.poisson(signal / truth["K"]) * truth["K"]
    read = stats.tukeylambda.rvs(truth["lam"], size=(size, size), random_state=rng) * truth["scale"]
    row = rng.normal(0.0, truth["row"], (size, 1))
    period = site_bias.shape[0]
    value = BLACK + np.tile(site_bias, (size // period, size // period)) + shot + read + row
    return np.clip(np.round(value), 0, WHITE).astype(np.uint16)


def _independent_frames(kind: str, size: int = 256, darks: int = 8, levels=(400.0, 1500.0, 5000.0), seed: int = 0):
    rng = np.random.default_rng(seed)
    meta = _meta(size)
    shading = np.linspace(0.8, 1.0, size)[None, :]  # uneven light: the pair difference must cancel it
    for iso in GAINS:
        if kind == "dark":
            for k in range(darks):
                yield Frame(Path(f"dark/iso{iso}/{k}"), independent_frame(rng, iso, size), meta, float(iso))
        else:
            for level in levels:
                for side in "ab":
                    yield Frame(Path(f"flat/iso{iso}/{level}{side}"), independent_frame(rng, iso, size, level * shading),
                                meta, float(iso))


@pytest.fixture(scope="module")
def independent():
    return calibrate_frames(_independent_frames("dark"), _independent_frames("flat"))


def test_independent_generator_per_iso(independent):
    assert [c.iso for c in independent.per_iso] == sorted(GAINS)
    for c in independent.per_iso:
        truth = _truth(int(c.iso))
        assert c.K == pytest.approx(truth["K"], rel=0.03)
        assert all(k == pytest.approx(truth["K"], rel=0.05) for k in c.K_per_colour)
        assert c.tukey_lambda == pytest.approx(truth["lam"], abs=0.05)
        assert c.tukey_scale == pytest.approx(truth["scale"], rel=0.05)
        assert c.row_scale == pytest.approx(truth["row"], rel=0.10)
        np.testing.assert_allclose(np.asarray(c.black) - BLACK, BIAS_SLOTS, atol=0.5)
        np.testing.assert_allclose(c.color_bias, BIAS_SLOTS, atol=0.5)
        assert c.quant_step == 1.0
        gauss = truth["scale"] * math.sqrt(tukey_lambda_variance(truth["lam"]))
        assert c.gauss_sigma == pytest.approx(gauss, rel=0.05)
        assert (c.dark_frames, c.flat_pairs) == (8, 3)


def test_independent_generator_lines(independent):
    lines = independent.lines()
    assert lines["G_scale"]["slope"] == pytest.approx(TUKEY_LINE[0], abs=0.05)
    assert lines["R_scale"]["slope"] == pytest.approx(ROW_LINE[0], abs=0.05)
    gauss = [_truth(i)["scale"] * math.sqrt(tukey_lambda_variance(LAMBDAS[i])) for i in sorted(GAINS)]
    expected = stats.linregress(np.log(sorted(GAINS.values())), np.log(gauss))
    assert lines["g_scale"]["slope"] == pytest.approx(expected.slope, abs=0.05)


def test_fit_log_line_matches_scipy_linregress():
    rng = np.random.default_rng(3)
    gains = np.exp(rng.uniform(-2, 2, 7))
    scales = np.exp(0.7 * np.log(gains) + 0.3 + rng.normal(0, 0.1, 7))
    fit = fit_log_line(gains, scales)
    ref = stats.linregress(np.log(gains), np.log(scales))
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-10)
    assert fit["bias"] == pytest.approx(ref.intercept, rel=1e-10)
    residual = np.log(scales) - (ref.slope * np.log(gains) + ref.intercept)
    assert fit["sigma"] == pytest.approx(math.sqrt(residual @ residual / 5), rel=1e-10)
    assert fit_log_line([2.0], [3.0]) == {"slope": 0.0, "bias": pytest.approx(math.log(3.0)), "sigma": 0.0}


def test_colour_slots_bayer_phases_and_xtrans():
    assert colour_slots([[0, 1], [1, 2]]).tolist() == [[0, 1], [3, 2]]
    assert colour_slots([[1, 0], [2, 1]]).tolist() == [[1, 0], [2, 3]]
    assert colour_slots([[2, 1], [1, 0]]).tolist() == [[2, 3], [1, 0]]
    from rawrestore.data.synth import XTRANS_XT2

    assert sorted(set(colour_slots(XTRANS_XT2).ravel().tolist())) == [0, 1, 2]


def test_independent_generator_xtrans():
    """X-Trans: black per colour (G2 repeats G), K from all 36 sites, the read noise."""
    from rawrestore.data.synth import XTRANS_XT2

    cfa = np.asarray(XTRANS_XT2)
    colour_bias = np.array([1.5, -0.5, 0.8])  # R, G, B
    site_bias = colour_bias[cfa]
    size, isos = 192, (1600, 6400)
    rng = np.random.default_rng(5)
    meta = _meta(size, cfa=cfa.tolist())

    def frames(kind):
        for iso in isos:
            levels = [None] * 6 if kind == "dark" else [level for level in (500.0, 4000.0) for _ in "ab"]
            for k, level in enumerate(levels):
                yield Frame(Path(f"{kind}/iso{iso}/{k}"), independent_frame(rng, iso, size, level or 0.0, site_bias),
                            meta, float(iso))

    result = calibrate_frames(frames("dark"), frames("flat"))
    for c in result.per_iso:
        truth = _truth(int(c.iso))
        assert c.K == pytest.approx(truth["K"], rel=0.03)
        np.testing.assert_allclose(c.color_bias, [1.5, -0.5, 0.8, -0.5], atol=0.5)
        assert c.tukey_lambda == pytest.approx(truth["lam"], abs=0.05)
        assert c.tukey_scale == pytest.approx(truth["scale"], rel=0.05)
        assert c.row_scale == pytest.approx(truth["row"], rel=0.10)


# --------------------------------------------------------------- project model, files, CLI


@pytest.fixture(scope="module")
def shoot(tmp_path_factory):
    out = tmp_path_factory.mktemp("shoot")
    write_calibration_shoot(out / "shoot", size=192, darks=6, progress=False)
    return out


@pytest.fixture(scope="module")
def calibrated(shoot):
    out = shoot / "camera.json"
    code = cli_main(["calibrate-noise", "--dark", str(shoot / "shoot/dark"), "--flat", str(shoot / "shoot/flat"),
                     "--out", str(out), "--report", str(shoot / "report"), "--sample", "100000"])
    assert code == 0
    return json.loads(out.read_text())


def test_project_model_shoot_recovered(shoot, calibrated):
    truth = json.loads((shoot / "shoot" / SHOOT_TRUTH).read_text())["per_iso"]
    assert [p["iso"] for p in calibrated["per_iso"]] == [t["iso"] for t in truth] == [800.0, 1600.0, 3200.0, 6400.0]
    for got, want in zip(calibrated["per_iso"], truth):
        assert got["K"] == pytest.approx(want["system_gain"], rel=0.03)
        assert got["tukey_scale"] == pytest.approx(want["read_scale"], rel=0.05)
        assert got["tukey_lambda"] == pytest.approx(want["tukey_lambda"], abs=0.05)
        assert got["row_scale"] == pytest.approx(want["row_scale"], rel=0.10)
        np.testing.assert_allclose(np.asarray(got["black"]) - 512.0, want["color_bias"], atol=0.5)
        assert got["frames"] == {"dark": 6, "flat_pairs": 3}
    true_camera = json.loads((shoot / "shoot" / TRUE_CAMERA).read_text())
    for key in ("G_scale", "R_scale"):
        assert calibrated["Profile-1"][key]["slope"] == pytest.approx(true_camera["Profile-1"][key]["slope"], abs=0.05)
    assert calibrated["Kmin"] == pytest.approx(true_camera["Kmin"], rel=0.03)
    assert calibrated["Kmax"] == pytest.approx(true_camera["Kmax"], rel=0.03)


def test_calibration_json_is_a_noise_camera(shoot, calibrated):
    path = str(shoot / "camera.json")
    fit = load_noise_fit(path)
    assert fit.k_min == pytest.approx(calibrated["Kmin"]) and fit.k_max == pytest.approx(calibrated["Kmax"])
    assert fit.tukey_lambdas == tuple(calibrated["G_shape"])
    assert fit.profiles["Profile-1"].row_scale.slope == pytest.approx(calibrated["Profile-1"]["R_scale"]["slope"])
    import torch

    params = sample_noise_params(path, torch.Generator().manual_seed(0))
    assert calibrated["Kmin"] <= params.system_gain <= calibrated["Kmax"]
    assert params.tukey_lambda in fit.tukey_lambdas
    assert list(params.color_bias) in [list(row) for row in calibrated["color_bias"]]


def test_report_written(shoot, calibrated):
    report = shoot / "report"
    page = (report / "index.html").read_text()
    for iso in ("800", "1600", "3200", "6400"):
        for prefix in ("ptc", "ppcc", "residual"):
            name = f"{prefix}_iso{iso}.png"
            assert f'src="{name}"' in page
            assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{calibrated['per_iso'][0]['K']:.4g}" in page


# ---------------------------------------------------------------------------- errors


def _write(folder: Path, name: str, mosaic: np.ndarray, meta: CameraMeta) -> None:
    isp.write_dng(folder / name, mosaic, meta)


def _small_shoot(root: Path, size: int = 64, darks: int = 2, levels=(400.0, 2000.0), iso: int = 1600,
                 model: str = "Independent") -> None:
    rng = np.random.default_rng(1)
    meta = _meta(size, model)
    for k in range(darks):
        _write(root / "dark" / f"iso{iso}", f"d{k}.dng", independent_frame(rng, iso, size), meta)
    for level in levels:
        for side in "ab":
            _write(root / "flat" / f"iso{iso}", f"f{level:g}{side}.dng", independent_frame(rng, iso, size, level), meta)


def _calibrate(root: Path, capsys, *extra: str) -> tuple[int, str]:
    code = cli_main(["calibrate-noise", "--dark", str(root / "dark"), "--flat", str(root / "flat"),
                     "--out", str(root / "cam.json"), *extra])
    return code, capsys.readouterr().err


def test_small_shoot_calibrates(tmp_path, capsys):
    _small_shoot(tmp_path)
    code, err = _calibrate(tmp_path, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "cam.json").read_text())
    assert result["per_iso"][0]["K"] == pytest.approx(GAINS[1600], rel=0.15)  # 64x64 frames: a rough K


@pytest.mark.parametrize("problem, expected", [
    ("one_dark", "1 dark frame(s)"),
    ("one_level", "all at one level"),
    ("saturated", "is saturated"),
    ("too_dark", "too dark to measure"),
    ("no_iso", "no ISO in its metadata"),
    ("mixed_size", "shoot every frame at the same size"),
    ("mixed_camera", "calibrate one camera at a time"),
    ("flat_without_dark", "no dark frames at that ISO"),
    ("not_a_pair", "not a pair"),
])
def test_errors_are_one_line(tmp_path, capsys, problem, expected):
    rng = np.random.default_rng(2)
    if problem == "one_dark":
        _small_shoot(tmp_path, darks=1)
    elif problem == "one_level":
        _small_shoot(tmp_path, levels=(1000.0, 1100.0))
    elif problem == "saturated":
        _small_shoot(tmp_path, levels=(400.0, 20000.0))
    elif problem == "too_dark":
        _small_shoot(tmp_path, levels=(3.0, 2000.0))
    elif problem == "no_iso":
        _small_shoot(tmp_path)
        (tmp_path / "dark" / "iso1600").rename(tmp_path / "dark" / "batch1")
    elif problem == "mixed_size":
        _small_shoot(tmp_path)
        _write(tmp_path / "dark" / "iso1600", "d9.dng", independent_frame(rng, 1600, 96), _meta(96))
    elif problem == "mixed_camera":
        _small_shoot(tmp_path)
        _write(tmp_path / "dark" / "iso1600", "d9.dng", independent_frame(rng, 1600, 64), _meta(64, "Other"))
    elif problem == "flat_without_dark":
        _small_shoot(tmp_path)
        (tmp_path / "flat" / "iso1600").rename(tmp_path / "flat" / "iso3200")
    elif problem == "not_a_pair":
        _small_shoot(tmp_path)
        _write(tmp_path / "flat" / "iso1600", "f400b.dng", independent_frame(rng, 1600, 64, 900.0), _meta(64))
    code, err = _calibrate(tmp_path, capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("rawrestore: error:") and expected in line
    assert not (tmp_path / "cam.json").exists()


def test_cli_refuses_bad_paths(tmp_path, capsys):
    _small_shoot(tmp_path)
    code = cli_main(["calibrate-noise", "--dark", str(tmp_path / "drak"), "--flat", str(tmp_path / "flat"),
                     "--out", str(tmp_path / "cam.json")])
    assert code == 2 and "--dark folder" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    code = cli_main(["calibrate-noise", "--dark", str(tmp_path / "dark"), "--flat", str(tmp_path / "flat"),
                     "--out", str(tmp_path / "taken")])
    assert code == 2 and "is a folder" in capsys.readouterr().err
    input_file = next((tmp_path / "dark").rglob("*.dng"))
    before = input_file.read_bytes()
    code = cli_main(["calibrate-noise", "--dark", str(tmp_path / "dark"), "--flat", str(tmp_path / "flat"),
                     "--out", str(input_file)])
    assert code == 2 and "inputs" in capsys.readouterr().err and input_file.read_bytes() == before
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "notes.txt").write_text("mine")
    code, err = _calibrate(tmp_path, capsys, "--report", str(tmp_path / "rep"))
    assert code == 2 and "did not write" in err and (tmp_path / "rep" / "notes.txt").read_text() == "mine"


def test_calibration_shoot_cli(tmp_path, capsys):
    out = tmp_path / "shoot"
    assert cli_main(["synth", "--calibration-shoot", "--out", str(out), "--isos", "800,abc"]) == 2
    assert "--isos" in capsys.readouterr().err and not out.exists()
    assert cli_main(["synth", "--calibration-shoot", "--out", str(out), "--isos", "800", "--size", "48"]) == 0
    darks = sorted((out / "dark" / "iso800").glob("*.dng"))
    flats = sorted((out / "flat" / "iso800").glob("*.dng"))
    assert (len(darks), len(flats)) == (8, 6)
    mosaic, meta = isp.read_raw(flats[-1])
    truth = json.loads((out / SHOOT_TRUTH).read_text())
    level = truth["flat_levels"][-1] * (WHITE - BLACK)  # green, before vignetting
    greens = mosaic[0::2, 1::2].astype(float) - BLACK
    assert float(np.median(greens)) == pytest.approx(level * 0.95, rel=0.05)  # mean vignette over the frame ~0.95
    (out / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert cli_main(["synth", "--calibration-shoot", "--out", str(out), "--isos", "800", "--size", "48"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["synth", "--calibration-shoot", "--out", str(out), "--isos", "800", "--size", "48", "--force"]) == 0
    assert (out / "mine.txt").read_text() == "keep" and len(list((out / "dark" / "iso800").glob("*.dng"))) == 8
