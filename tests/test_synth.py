"""The synthetic SID-format dataset: exact file round trip, naming and lists, splits, un-processing, noise statistics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import isp
from rawrestore.cli import main as cli_main
from rawrestore.data import synth
from rawrestore.data.manifest import SPLITS, parse_name, read_sid_list
from rawrestore.errors import InputError
from rawrestore.physics.crosstalk import uniform_kernel
from rawrestore.physics.noise import NoiseParams, sample_noise_params


def _generate(out, camera="sony", scenes=3, seed=0, size=None, **kw):
    written = {}

    def keep(relative, mosaic, meta):
        written[relative] = (mosaic.copy(), meta)

    synth.generate(out, camera, scenes, seed, size, on_file=keep, progress=False, **kw)
    return written


@pytest.fixture(scope="module")
def sony(tmp_path_factory):
    out = tmp_path_factory.mktemp("sony")
    return out, _generate(out, "sony", scenes=3, seed=0, size=96)


def test_round_trip_exact_sony(sony):
    out, written = sony
    assert len(written) == 3 * 4  # 3 scenes x (1 long + 3 short)
    truth = json.loads((out / "truth.json").read_text())
    for relative, (mosaic, meta) in written.items():
        back, read = isp.read_raw(out / relative)
        assert back.dtype == np.uint16 and np.array_equal(back, mosaic), relative
        assert read == meta
        assert truth["files"][relative]["meta"] == read.to_dict()
        assert read.cfa == [[0, 1], [1, 2]] and read.black_level == [[512.0, 512.0], [512.0, 512.0]]
        assert read.white_level == 16383.0 and (read.width, read.height) == (96, 96)
        expected_exposure = 10.0 if "/long/" in relative else parse_name(relative, "test")[2]
        assert read.exposure_time == expected_exposure


def test_round_trip_exact_fuji_xtrans(tmp_path):
    written = _generate(tmp_path, "fuji", scenes=1, seed=3, size=48)
    assert sorted(written) == ["Fuji/long/00001_00_10s.dng", "Fuji/short/00001_00_0.033s.dng",
                               "Fuji/short/00001_00_0.04s.dng", "Fuji/short/00001_00_0.1s.dng"]
    for relative, (mosaic, meta) in written.items():
        back, read = isp.read_raw(tmp_path / relative)
        assert np.array_equal(back, mosaic) and read == meta
        assert read.cfa == [list(r) for r in synth.XTRANS_XT2] and read.is_xtrans
        assert read.black_level == [[1024.0] * 6] * 6
    assert (tmp_path / "Fuji_train_list.txt").read_text().startswith("./Fuji/short/00001_00_0.1s.dng ./Fuji/long/00001_00_10s.dng")


def test_same_seed_same_files_other_seed_different(tmp_path):
    a = _generate(tmp_path / "a", scenes=2, seed=5, size=48)
    b = _generate(tmp_path / "b", scenes=2, seed=5, size=48)
    c = _generate(tmp_path / "c", scenes=2, seed=6, size=48)
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
    assert not any(np.array_equal(a[k][0], c[k][0]) for k in a)


def test_lists_names_ratios_and_splits(sony):
    out, written = sony
    records = {split: read_sid_list(out / f"Sony_{split}_list.txt", split, "sony") for split in SPLITS}
    assert {split: len(r) for split, r in records.items()} == {"train": 3, "val": 3, "test": 3}
    assert [r.scene for r in records["train"]] == [1] * 3
    assert [r.scene for r in records["val"]] == [20001] * 3
    assert [r.scene for r in records["test"]] == [10001] * 3
    for split_records in records.values():
        assert sorted(r.ratio for r in split_records) == [100.0, 250.0, 300.0]
        assert {r.long for r in split_records} == {f"Sony/long/{split_records[0].scene:05d}_00_10s.dng"}
        assert all((r.iso, r.fnumber, r.burst) == (200, 8.0, 0) for r in split_records)
        assert all(r.short in written and r.long in written for r in split_records)
    truth = json.loads((out / "truth.json").read_text())
    short = truth["files"]["Sony/short/00001_00_0.033s.dng"]
    assert short["ratio"] == 300.0 and math.isclose(short["signal_ratio"], 10 / 0.033)
    assert NoiseParams.from_dict(short["noise"]).read_noise == "tukey"
    np.testing.assert_array_equal(np.asarray(truth["crosstalk"]["kernel"]), uniform_kernel(2, 0.02).numpy())


def test_split_counts_and_photographs_do_not_leak():
    assert synth.split_counts(24) == {"train": 17, "val": 2, "test": 5}
    assert synth.split_counts(3) == {"train": 1, "val": 1, "test": 1}
    assert synth.split_counts(1) == {"train": 1, "val": 0, "test": 0}
    ids = synth.scene_ids(24)
    assert [s for _, s in ids][:3] == [1, 2, 3] and ("val", 20001) in ids and ("test", 10005) in ids
    assert all(str(scene).zfill(5)[0] == str(synth.SPLIT_DIGIT[split]) for split, scene in ids)
    train, val, test = (set(synth.PHOTOS_BY_SPLIT[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)


def test_truth_records_photos_by_split(sony):
    out, _ = sony
    truth = json.loads((out / "truth.json").read_text())
    assert truth["format"] == synth.TRUTH_FORMAT == 2  # scripts/demo.sh regenerates data of another format
    for scene_id, scene in truth["scene"].items():
        split = {"0": "train", "1": "test", "2": "val"}[scene_id[0]]
        assert scene["split"] == split and scene["photo"] in synth.PHOTOS_BY_SPLIT[split]
        np.testing.assert_allclose(np.asarray(scene["cam_to_srgb"]).sum(axis=1), 1.0, atol=1e-5)
        assert 1.6 <= scene["wb_as_shot"][0] <= 2.6 and 1.3 <= scene["wb_as_shot"][2] <= 2.2


def test_unprocess_inverts_the_isp_colour_steps():
    rng = np.random.default_rng(0)
    cam_to_srgb, _, wb = synth.random_colour(synth.CAMERA_SPECS["sony"], rng)
    srgb = rng.uniform(0.05, 0.95, (8, 8, 3))
    camera = synth.unprocess(srgb, cam_to_srgb, wb)
    # forward: white balance, matrix, sRGB curve (the ISP's order, no clipping needed in gamut)
    balanced = camera * torch.as_tensor(wb).view(1, 3, 1, 1)
    linear = isp.ops.apply_matrix(balanced, torch.as_tensor(cam_to_srgb))
    back = isp.ops.apply_curve(linear, "srgb")[0].permute(1, 2, 0).numpy()
    in_gamut = (camera >= 0).all(dim=1)[0].numpy()
    assert in_gamut.mean() > 0.5
    np.testing.assert_allclose(back[in_gamut], srgb[in_gamut], atol=1e-9)


def test_long_exposure_is_well_exposed_and_clean(sony):
    out, written = sony
    mosaic, meta = written["Sony/long/00001_00_10s.dng"]
    level = (np.percentile(mosaic, 99.5) - 512) / (16383 - 512)
    assert 0.5 < level <= 1.0


@pytest.mark.parametrize("level", [0.0, 0.05, 0.5])
def test_dark_frame_statistics_match_fixed_model(level):
    params = NoiseParams(system_gain=2.0, read_scale=3.0, row_scale=1.5, read_noise="gaussian",
                         color_bias=(1.0, -2.0, 3.0, 0.5))
    cfa = torch.tensor([[0, 1], [1, 2]])
    signal = torch.full((1, 1, 512, 512), level, dtype=torch.float64)
    ratio = 100.0
    dn = synth.dark_frame(signal, ratio, params, 512.0, 16383.0, cfa, torch.Generator().manual_seed(1)).astype(np.float64)
    clean = level * (16383 - 512) / ratio
    # per site (R, G in R's row, B, G2): mean = clean + bias, variance = K x + read^2 + row^2 + 1/12
    for (row, col), bias in zip([(0, 0), (0, 1), (1, 1), (1, 0)], params.color_bias):
        site = dn[row::2, col::2] - 512
        sigma_mean = math.sqrt(params.row_scale ** 2 / site.shape[0] + params.variance(clean) / site.size)
        assert abs(site.mean() - (clean + bias)) < 4 * sigma_mean
        assert site.var() == pytest.approx(params.variance(clean), rel=0.04)


def test_dark_frame_statistics_match_sampled_eld_model():
    generator = torch.Generator().manual_seed(4)
    params = sample_noise_params("SonyA7S2", generator)
    signal = torch.full((1, 1, 512, 512), 0.3, dtype=torch.float64)
    dn = synth.dark_frame(signal, 250.0, params, 512.0, 16383.0, torch.tensor([[0, 1], [1, 2]]), generator)
    clean = 0.3 * (16383 - 512) / 250.0
    values = dn.astype(np.float64) - 512
    sigma_mean = math.sqrt(params.row_scale ** 2 / values.shape[0] + params.variance(clean) / values.size)
    assert abs(values.mean() - (clean + np.mean(params.color_bias))) < 4 * sigma_mean
    assert values.var() == pytest.approx(params.variance(clean), rel=0.06)


def test_refuses_non_empty_folder_unless_forced(tmp_path, sony):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty.*--force"):
        synth.generate(tmp_path, "sony", 1, 0, 48, progress=False)
    synth.generate(tmp_path, "sony", 1, 0, 48, progress=False, force=True)
    assert (tmp_path / "keep.txt").exists() and (tmp_path / "truth.json").exists()
    synth.generate(tmp_path, "sony", 1, 1, 48, progress=False, force=True)  # replaces its own files
    assert len(list((tmp_path / "Sony" / "short").iterdir())) == 3


def test_bad_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="multiple of the X-Trans 6x6 CFA period.*--size 516"):
        synth.generate(tmp_path / "f", "fuji", 1, 0, 512, progress=False)
    with pytest.raises(InputError, match="--camera"):
        synth.generate(tmp_path / "g", "canon", 1, 0, 64, progress=False)


def test_cli_synth(tmp_path, capsys):
    assert cli_main(["synth", "--out", str(tmp_path / "d"), "--scenes", "1", "--seed", "2", "--size", "48"]) == 0
    assert "1 sony scenes" in capsys.readouterr().out
    assert cli_main(["synth", "--out", str(tmp_path / "d"), "--scenes", "1", "--size", "48"]) == 2
    assert "--force" in capsys.readouterr().err


def test_dead_leaves_cover_the_frame_with_power_law_discs():
    rng = np.random.default_rng(3)
    image, info = synth.dead_leaves(96, rng)
    assert image.shape == (96, 96, 3) and 0.0 <= image.min() and image.max() <= 1.0
    assert info["dead_leaves"]["leaves"] <= 40000
    # flat, gently shaded discs (small steps between neighbours) and many occlusion edges
    dx = np.abs(np.diff(image, axis=1)).max(axis=2)
    assert float((dx < 5e-3).mean()) > 0.1 and float((dx > 0.05).mean()) > 0.2
    # the same rng state gives the same picture
    again, _ = synth.dead_leaves(96, np.random.default_rng(3))
    np.testing.assert_array_equal(image, again)


def test_grey_sources_are_tinted_per_scene_and_colour_photos_untouched():
    rng = np.random.default_rng(0)
    tinted, info = synth.scene_view("brick", 64, rng)
    dark, light = (np.asarray(c) for c in info["duotone"])
    grey = (tinted - dark) / (light - dark)  # the duotone is linear per channel: all channels agree
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-9)
    photo, info = synth.scene_view("coffee", 64, np.random.default_rng(0))
    assert "duotone" not in info and photo.shape == (64, 64, 3)
    view, _ = synth.random_view(synth.load_photo("coffee"), 64, np.random.default_rng(0))
    np.testing.assert_array_equal(photo, view)


def test_force_knows_the_list_files_of_an_older_truth_json(tmp_path):
    """truth.json of older runs has no "lists": a list file is synth's when every path on it is one truth.json records."""
    synth.generate(tmp_path, "sony", 3, 0, 48, progress=False)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth.pop("lists") == ["Sony_train_list.txt", "Sony_val_list.txt", "Sony_test_list.txt"]
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    synth.generate(tmp_path, "sony", 3, 1, 48, progress=False, force=True)  # its own lists: replaced
    truth.pop("lists", None)
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    user_lines = "./Sony/short/00001_00_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8\n"
    (tmp_path / "Sony_val_list.txt").write_text(user_lines)  # the user's list now: never overwritten
    with pytest.raises(InputError, match="holds Sony_val_list.txt that synth did not write"):
        synth.generate(tmp_path, "sony", 3, 2, 48, progress=False, force=True)
    assert (tmp_path / "Sony_val_list.txt").read_text() == user_lines
