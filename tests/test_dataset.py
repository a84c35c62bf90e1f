"""SIDPairDataset and the decode cache: CFA-preserving crops, alignment, cache behaviour, errors."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import rawpy
import torch
from torch.utils.data import DataLoader

import isp
from rawrestore.physics.noise import sample_noise_params
from rawrestore.config.schema import DataConfig
from rawrestore.data import synth
from rawrestore.data.cache import DecodeCache, entry_key, source_signature
from rawrestore.data.dataset import SIDPairDataset, build_datasets, cfa_preserving_ops, synthesize_input
from rawrestore.data.manifest import PairRecord, write_manifest
from rawrestore.errors import DataError
from tests.rawfixtures import make_meta, smooth_mosaic

RGGB = [[0, 1], [1, 2]]
XTRANS = [list(r) for r in synth.XTRANS_XT2]


def record(short: str, long: str, camera: str = "sony", split: str = "train", scene: int = 1) -> PairRecord:
    short_s = float(short.rsplit("_", 1)[1][:-5])
    return PairRecord(split=split, scene=scene, burst=0, short=short, long=long, short_exposure_s=short_s,
                      long_exposure_s=10.0, ratio=min(10.0 / short_s, 300.0), iso=200, fnumber=8.0,
                      camera=camera, misaligned=False)


def coded_pair(root, cfa, size, black=512, folder="Sony", camera="sony"):
    """Long exposure coding each pixel's colour (black + 1000 (c + 1)), short coding its position (black + row*W + col)."""
    period = len(cfa)
    meta = make_meta(cfa, black, size, size)
    colours = np.tile(np.asarray(cfa), (size // period, size // period))
    long_mosaic = (black + 1000 * (colours + 1)).astype(np.uint16)
    short_mosaic = (black + np.arange(size * size).reshape(size, size)).astype(np.uint16)
    long_rel, short_rel = f"{folder}/long/00001_00_10s.dng", f"{folder}/short/00001_00_0.1s.dng"
    isp.write_dng(root / long_rel, long_mosaic, meta)
    isp.write_dng(root / short_rel, short_mosaic, meta)
    return [record(short_rel, long_rel, camera)], short_mosaic


@pytest.fixture(scope="module")
def sony_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("sony_set")
    synth.generate(root, "sony", scenes=3, seed=0, size=64, progress=False)
    return root


@pytest.mark.parametrize("cfa,size,crop", [(RGGB, 40, 16), ([[1, 0], [2, 1]], 40, 16), (XTRANS, 60, 24)])
def test_every_augmentation_keeps_the_cfa_phase(tmp_path, cfa, size, crop):
    period = len(cfa)
    records, positions = coded_pair(tmp_path, cfa, size, folder="Fuji" if period == 6 else "Sony",
                                    camera="fuji" if period == 6 else "sony")
    ds = SIDPairDataset(records, tmp_path, "fuji" if period == 6 else "sony", crop_size=crop, packed=False,
                        augment=True, clip_aligned=False, cache_dir=tmp_path / "cache", seed=1)
    assert len(cfa_preserving_ops(cfa)) == 8
    ops = {op.index: op for op in cfa_preserving_ops(cfa)}
    seen = set()
    for _ in range(160):
        sample = ds[0]
        seen.add(sample["augment"])
        assert sample["cfa"].tolist() == cfa
        # colour of every pixel of the augmented crop, read from the colour-coded long exposure
        colours = np.rint(sample["target"][0].numpy() * (16383 - 512) / 1000).astype(int) - 1
        assert np.array_equal(colours, np.tile(np.asarray(cfa), (crop // period, crop // period)))
        # the short exposure holds positions: the crop is the flipped/transposed source window
        top, left, height, width = sample["crop"].tolist()
        assert (top % period, left % period) == ops[sample["augment"]].phase
        got = np.rint(sample["input"][0].numpy() / 100.0 * (16383 - 512)).astype(int)
        window = positions[top:top + height, left:left + width].astype(int) - 512
        code = sample["augment"]
        expected = window.T if code & 4 else window
        expected = expected[::-1] if code & 2 else expected
        expected = expected[:, ::-1] if code & 1 else expected
        assert np.array_equal(got, expected)
    assert seen == set(range(8))


@pytest.mark.parametrize("augment", [False, True])
def test_train_crop_offsets_are_whole_periods_without_flips(tmp_path, augment):
    records, _ = coded_pair(tmp_path, XTRANS, 72, folder="Fuji", camera="fuji")
    ds = SIDPairDataset(records, tmp_path, "fuji", crop_size=24, packed=True, augment=augment, cache_dir=None)
    offsets = set()
    for _ in range(40):
        sample = ds[0]
        top, left = sample["crop"][:2].tolist()
        if sample["augment"] == 0:
            assert top % 6 == 0 and left % 6 == 0
        offsets.add((top, left))
        assert sample["input"].shape == sample["target"].shape == (9, 8, 8)
    assert len(offsets) > 5  # random, not the centre crop


def test_sample_values_match_independent_decode(sony_set):
    cfg = DataConfig(root=str(sony_set), camera="sony", crop_size=32, val_crop=32)
    ds = build_datasets(cfg, "val")
    sample = ds[1]
    short, short_meta = isp.read_raw(sony_set / "Sony/short" / sample["short_name"])
    long, long_meta = isp.read_raw(sony_set / "Sony/long" / sample["long_name"])
    top, left, h, w = sample["crop"].tolist()
    assert (top, left, h, w) == (16, 16, 32, 32)  # centre of 64, a whole number of periods
    ratio = float(sample["ratio"])
    assert ratio == {"0.1": 100.0, "0.04": 250.0, "0.033": 300.0}[sample["short_name"].split("_")[2][:-5]]
    short_n = (short[top:top + h, left:left + w].astype(np.float64) - 512) / (16383 - 512)
    long_n = (long[top:top + h, left:left + w].astype(np.float64) - 512) / (16383 - 512)
    expected_in = np.clip(short_n * ratio, 0, 1)
    unpacked_in = isp.cfa.unpack(sample["input"][None], sample["cfa"])[0, 0].numpy()
    unpacked_target = isp.cfa.unpack(sample["target"][None], sample["cfa"])[0, 0].numpy()
    np.testing.assert_allclose(unpacked_in, expected_in, atol=1e-6)
    np.testing.assert_allclose(unpacked_target, np.clip(long_n, 0, 1), atol=1e-6)
    assert sample["input"][0, 0, 0] == pytest.approx(expected_in[0, 0], abs=1e-6)  # channel 0 is R at (0,0)
    np.testing.assert_allclose(sample["wb"].numpy(), long_meta.wb_as_shot, rtol=1e-6)
    np.testing.assert_allclose(sample["cam_to_srgb"].numpy(), long_meta.cam_to_srgb, rtol=1e-6)
    assert sample["black_level"].tolist() == [[512.0, 512.0], [512.0, 512.0]] and float(sample["white_level"]) == 16383.0
    assert sample["scene"] == 20001 and sample["input"].dtype == torch.float32


def test_full_frame_validation_and_loader_batches(sony_set):
    cfg = DataConfig(root=str(sony_set), camera="sony", crop_size=32, val_crop=None)
    val = build_datasets(cfg, "test")
    assert val.full_frame and val[0]["input"].shape == (4, 32, 32)
    train = build_datasets(cfg, "train")
    batch = next(iter(DataLoader(train, batch_size=3, num_workers=2)))
    assert batch["input"].shape == (3, 4, 16, 16) and batch["cfa"].shape == (3, 2, 2)
    assert batch["ratio"].dtype == torch.float32 and sorted(batch["ratio"].tolist()) == [100.0, 250.0, 300.0]
    assert len(batch["short_name"]) == 3


def test_same_torch_seed_same_crops(sony_set):
    cfg = DataConfig(root=str(sony_set), camera="sony", crop_size=16)

    def crops():
        torch.manual_seed(3)
        ds = build_datasets(cfg, "train", seed=5)
        samples = [ds[i % 3] for i in range(9)]
        return [tuple(s["crop"].tolist()) + (s["augment"],) for s in samples]

    first = crops()
    assert first == crops() and len(set(first)) > 3


def test_build_datasets_finds_lists_camera_folder_and_csv(sony_set, tmp_path):
    by_root = build_datasets(DataConfig(root=str(sony_set), crop_size=16), "train")
    by_camera_folder = build_datasets(DataConfig(root=str(sony_set / "Sony"), crop_size=16), "train")
    assert [r.short for r in by_root.records] == [r.short for r in by_camera_folder.records]
    csv = write_manifest(by_root.records, tmp_path / "m.csv", root=sony_set)
    by_csv = build_datasets(DataConfig(root=str(sony_set), manifest=str(csv), crop_size=16), "train")
    assert [r.short for r in by_csv.records] == [r.short for r in by_root.records]
    with pytest.raises(DataError, match="no val pairs"):
        build_datasets(DataConfig(root=str(sony_set), manifest=str(csv), crop_size=16), "val")


def test_shipped_manifest_names_missing_files(tmp_path):
    (tmp_path / "Sony").mkdir()
    with pytest.raises(DataError, match=r"00001_00_0\.04s\.ARW.*missing.*more"):
        build_datasets(DataConfig(root=str(tmp_path), crop_size=16), "train")


def test_synthetic_noise_skips_short_files_and_makes_plausible_inputs(sony_set, tmp_path):
    records = [record("Sony/short/00001_00_0.1s.dng", "Sony/long/00001_00_10s.dng")]
    for rel in (records[0].short, records[0].long):  # the short file must exist (its header is checked), never decoded
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(sony_set / rel, tmp_path / rel)
    ds = SIDPairDataset(records, tmp_path, "sony", crop_size=64, augment=False, synthetic_noise=True,
                        cache_dir=tmp_path / "cache")
    ds.prepare(progress=False)
    batch = next(iter(DataLoader(ds, batch_size=1)))
    assert "input" not in batch and ds.cache.decodes == 1  # only the long exposure was decoded
    dark = synthesize_input(batch, torch.Generator().manual_seed(0), clip=False)
    assert dark.shape == batch["target"].shape
    # the real short exposure of this scene and the synthetic one agree on average brightness once
    # each one's black-level error (ELD colour bias, up to 4 DN: x100 makes it 0.03) is taken out
    real = SIDPairDataset(records, sony_set, "sony", crop_size=64, augment=False, clip_aligned=False)[0]["input"]
    span = 16383.0 - 512.0
    truth = json.loads((sony_set / "truth.json").read_text())["files"]["Sony/short/00001_00_0.1s.dng"]["noise"]
    real_bias = float(np.mean(truth["color_bias"])) * 100 / span
    synthetic_bias = float(np.mean(sample_noise_params("SonyA7S2", torch.Generator().manual_seed(0)).color_bias)) * 100 / span
    # what is left (row noise and heavy-tailed read noise of one 64-pixel frame) is under 0.7 DN: 0.004 here
    assert float(dark.mean()) - synthetic_bias == pytest.approx(float(real.mean()) - real_bias, abs=0.004)
    assert float((dark - batch["target"]).std()) > 0.01  # noise was added


def test_cache_second_read_skips_rawpy_and_shared_long_decoded_once(sony_set, tmp_path, monkeypatch):
    calls = []
    real_imread = rawpy.imread
    monkeypatch.setattr(rawpy, "imread", lambda path, *a, **k: calls.append(path) or real_imread(path, *a, **k))
    cfg = DataConfig(root=str(sony_set), camera="sony", crop_size=16, val_crop=16, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(cfg, "val", prepare=False)  # one scene: 3 shorts sharing one long; centre crops
    samples = [first[i] for i in range(3)]
    assert len(calls) == 4 and sum("/long/" in str(c) for c in calls) == 1
    assert first.cache.decodes == 4
    second = build_datasets(cfg, "val")  # a new cache object, as in a new process; prepare finds all cached
    again = [second[i] for i in range(3)]
    assert len(calls) == 4 and second.cache.decodes == 0
    for a, b in zip(samples, again):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
        assert a["short_name"] == b["short_name"]
    third = build_datasets(cfg, "train")  # prepare decodes the train scene's 4 files up front, once
    assert len(calls) == 8 and third.cache.decodes == 4
    [third[i] for i in range(3)]
    assert len(calls) == 8


def test_cache_mmap_crop_equals_full_decode_and_is_memory_mapped(sony_set, tmp_path):
    path = sony_set / "Sony/long/00001_00_10s.dng"
    cache = DecodeCache(tmp_path / "c")
    mosaic, meta = cache.load(path)
    assert isinstance(mosaic, np.memmap) and not mosaic.flags.writeable
    full, full_meta = isp.read_raw(path)
    assert meta == full_meta
    np.testing.assert_array_equal(cache.crop(path, 6, 10, 20, 30), full[6:26, 10:40])
    fresh = DecodeCache(tmp_path / "c")
    np.testing.assert_array_equal(fresh.load(path)[0], full)
    assert fresh.decodes == 0
    with pytest.raises(DataError, match="leaves the 64x64 frame"):
        cache.crop(path, 60, 0, 8, 8)


@pytest.mark.parametrize("damage", ["truncate_npy", "garbage_json", "wrong_shape"])
def test_cache_rebuilds_corrupt_entries(sony_set, tmp_path, damage):
    path = sony_set / "Sony/short/00001_00_0.1s.dng"
    DecodeCache(tmp_path).load(path)
    key = entry_key(source_signature(path))
    npy, js = tmp_path / f"{key}.npy", tmp_path / f"{key}.json"
    if damage == "truncate_npy":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "garbage_json":
        js.write_text("{not json")
    else:
        np.save(npy, np.zeros((8, 8), np.uint16))
    cache = DecodeCache(tmp_path)
    mosaic, _ = cache.load(path)
    assert cache.decodes == 1 and cache.rebuilds == 1
    np.testing.assert_array_equal(mosaic, isp.read_raw(path)[0])


def test_cache_key_changes_when_the_file_changes(sony_set, tmp_path):
    path = tmp_path / "x.dng"
    path.write_bytes((sony_set / "Sony/long/00001_00_10s.dng").read_bytes())
    before = entry_key(source_signature(path))
    os.utime(path, ns=(1, 1))
    assert entry_key(source_signature(path)) != before


def _race(path, cache_dir, barrier, results):
    barrier.wait()
    cache = DecodeCache(cache_dir)
    mosaic, _ = cache.load(path)
    results.put((cache.decodes, int(mosaic.astype(np.int64).sum())))


def test_racing_workers_decode_once(sony_set, tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    path = str(sony_set / "Sony/long/20001_00_10s.dng")
    workers = [ctx.Process(target=_race, args=(path, tmp_path, barrier, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sum(d for d, _ in got) == 1 and len({s for _, s in got}) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _pair_files(root, short_meta, long_meta):
    isp.write_dng(root / "Sony/short/00001_00_0.1s.dng", smooth_mosaic(short_meta), short_meta)
    isp.write_dng(root / "Sony/long/00001_00_10s.dng", smooth_mosaic(long_meta), long_meta)
    return [record("Sony/short/00001_00_0.1s.dng", "Sony/long/00001_00_10s.dng")]


def test_size_mismatch_names_both_files(tmp_path):
    records = _pair_files(tmp_path, make_meta(RGGB, 512, 48, 48), make_meta(RGGB, 512, 48, 64))
    ds = SIDPairDataset(records, tmp_path, "sony", crop_size=16)
    with pytest.raises(DataError, match=r"size mismatch: .*00001_00_0\.1s\.dng is 48x48 but .*00001_00_10s\.dng is 64x48"):
        ds[0]


def test_camera_mismatch_names_both_files(tmp_path):
    records = _pair_files(tmp_path, make_meta(RGGB, 512, 48, 48, model="A"), make_meta(RGGB, 512, 48, 48, model="B"))
    with pytest.raises(DataError, match=r"camera mismatch: .*0\.1s\.dng is 'Test A'.*10s\.dng is 'Test B'"):
        SIDPairDataset(records, tmp_path, "sony", crop_size=16)[0]


def test_xtrans_file_under_sony_config_is_rejected(tmp_path):
    records, _ = coded_pair(tmp_path, XTRANS, 48)
    with pytest.raises(DataError, match="X-Trans 6x6 CFA but data.camera is sony"):
        SIDPairDataset(records, tmp_path, "sony", crop_size=16)[0]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"Sony/short/00001_00_0\.1s\.dng: file named in the train list is missing"):
        SIDPairDataset([record("Sony/short/00001_00_0.1s.dng", "Sony/long/00001_00_10s.dng")], tmp_path, "sony")


def test_worker_error_names_the_corrupt_file(tmp_path):
    records = _pair_files(tmp_path, make_meta(RGGB, 512, 48, 48), make_meta(RGGB, 512, 48, 48))
    (tmp_path / "Sony/short/00001_00_0.1s.dng").write_bytes(b"II*\0garbage" * 10)
    ds = SIDPairDataset(records, tmp_path, "sony", crop_size=16, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"00001_00_0\.1s\.dng"):
        next(iter(DataLoader(ds, batch_size=1, num_workers=1)))


def test_bad_crop_size_is_a_data_error(tmp_path):
    records, _ = coded_pair(tmp_path, RGGB, 40)
    with pytest.raises(DataError, match="multiple of the fuji CFA period 6"):
        SIDPairDataset(records, tmp_path, "fuji", crop_size=16)
    with pytest.raises(DataError, match="larger than the 40x40 frame"):
        SIDPairDataset(records, tmp_path, "sony", crop_size=48)[0]


def test_synthetic_crosstalk_acts_before_the_noise(sony_set, tmp_path):
    from rawrestore.physics.crosstalk import apply_crosstalk, uniform_kernel

    records = [record("Sony/short/00001_00_0.1s.dng", "Sony/long/00001_00_10s.dng")]
    ds = SIDPairDataset(records, sony_set, "sony", crop_size=None, augment=False, synthetic_noise=True,
                        cache_dir=tmp_path / "cache")
    batch = next(iter(DataLoader(ds, batch_size=1)))
    # flat colour patches (R 0.8, G 0.2, B 0.6) at ratio 1: the noise averages out, crosstalk does not
    batch["target"] = torch.tensor([0.8, 0.2, 0.6, 0.2]).view(1, 4, 1, 1).expand(1, 4, 48, 48).contiguous()
    batch["ratio"] = torch.ones(1)
    kernel = uniform_kernel(2, 0.05)
    plain = synthesize_input(batch, torch.Generator().manual_seed(0), clip=False)
    leaked = synthesize_input(batch, torch.Generator().manual_seed(0), clip=False, crosstalk=kernel)
    mosaic = isp.cfa.unpack(batch["target"], batch["cfa"][0])
    expected = isp.cfa.pack(apply_crosstalk(mosaic, kernel), batch["cfa"][0])
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the zero-padded border
    np.testing.assert_allclose(leaked[inner].mean(dim=(0, 2, 3)).numpy(), expected[inner].mean(dim=(0, 2, 3)).numpy(), atol=1.5e-3)
    np.testing.assert_allclose(plain[inner].mean(dim=(0, 2, 3)).numpy(), [0.8, 0.2, 0.6, 0.2], atol=1.5e-3)
    assert float((expected - batch["target"])[inner].mean(dim=(0, 2, 3)).abs().min()) > 0.01  # the checks have teeth


@pytest.mark.parametrize("packed", [True, False])
def test_gain_jitter_scales_each_colour_once_within_bounds(packed):
    from rawrestore.data.dataset import jitter_gains

    cfa = torch.tensor([[[0, 1], [1, 2]]] * 8)
    flat = torch.full((8, 4, 6, 6), 0.3) if packed else torch.full((8, 1, 12, 12), 0.3)
    out = jitter_gains(flat, cfa, 0.5, torch.Generator().manual_seed(1))
    mosaic = torch.cat([isp.cfa.unpack(out[i:i + 1], cfa[i]) for i in range(8)]) if packed else out
    gains = mosaic[:, 0, :2, :2] / 0.3  # (B,2,2): R, G / G, B
    assert torch.allclose(mosaic, gains.repeat(1, 6, 6)[:, None] * 0.3)  # one gain per site, everywhere
    assert torch.allclose(gains[:, 0, 1], gains[:, 1, 0])  # both greens share the G gain
    assert float(gains.min()) >= 1 / 1.5 - 1e-6 and float(gains.max()) <= 1.5 + 1e-6
    assert float(gains.std()) > 0.05  # gains do vary
    again = jitter_gains(flat, cfa, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(jitter_gains(flat, cfa, 0.0), flat)
    bright = jitter_gains(torch.full_like(flat, 0.9), cfa, 2.0, torch.Generator().manual_seed(2))
    assert float(bright.max()) == 1.0  # clipped like a sensor
