"""Several datasets in one run (`data.sources`): config merging and errors, the per-step source draw, a Sony + Fuji run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from rawrestore.config import DataConfig, from_dict, load_config, save_resolved
from rawrestore.errors import ConfigError
from rawrestore.train import checkpoint as ckpt
from rawrestore.train.runlog import read_log
from rawrestore.train.sampling import SourceBatchSampler, SourceSchedule, StepBatchSampler
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml


def quiet(_: str) -> None:
    """Swallow the trainer's progress lines."""


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sources_override(data_root: Path, fuji_root: Path, sony_weight: float = 1.0) -> list[str]:
    """Overrides turning the tiny experiment into Sony (Bayer, packed off) + Fuji (X-Trans, 48-pixel crops, synthetic noise)."""
    return ["data.packed=false", (
        f"data.sources=[{{root: {data_root}, camera: sony, weight: {sony_weight}}}, "
        f"{{root: {fuji_root}, camera: fuji, crop_size: 48, cache_dir: {fuji_root}/.cache, synthetic_noise: true}}]")]


# ----------------------------------------------------------------------------- config


def test_source_keys_default_to_the_data_section_and_win_over_it(tmp_path):
    cfg = from_dict({"data": {"crop_size": 96, "packed": False, "ratio_cap": 250.0, "sources": [
        {"root": "a/Sony", "camera": "sony"},
        {"root": "b", "camera": "fuji", "crop_size": 48, "weight": 3, "name": "my-fuji"},
        {"root": "c", "camera": "sony", "crop_size": 512, "kind": "clean_folder", "synthetic_noise": True,
         "synthetic_ratio": [50, 300]},
    ]}})
    sony, fuji, clean = cfg.data.sources
    assert (sony.crop_size, fuji.crop_size, clean.crop_size) == (96, 48, 512)  # 512 is the default, set on purpose
    assert all(s.ratio_cap == 250.0 and s.packed is False for s in cfg.data.sources)
    assert (sony.weight, fuji.weight) == (1.0, 3.0) and clean.kind == "clean_folder"
    assert cfg.data.source_names() == ["sony-Sony", "my-fuji", "sony-c"]  # a repeated camera adds its root folder
    assert cfg.data.cfa_periods == (2, 6) and cfg.data.in_channels == 1
    with pytest.raises(ConfigError, match="mix Bayer and X-Trans"):
        cfg.data.cfa_period  # noqa: B018 - no one period for the run
    # the resolved file (every source spelled out, the section's keys again) reads back equal
    assert load_config(save_resolved(cfg, tmp_path / "resolved.yaml")) == cfg


def test_without_sources_the_data_section_is_the_one_source():
    data = DataConfig(camera="fuji", crop_size=96)
    (only,) = data.source_list()
    assert (only.camera, only.crop_size, only.weight) == ("fuji", 96, 1.0) and data.source_names() == ["fuji"]
    assert data.cfa_period == 6 and data.in_channels == 9 and data.sources is None


@pytest.mark.parametrize("sources, packed, key", [
    ([{"root": "a"}, {"root": "b", "camera": "fuji", "crop_size": 48}], True, "data.packed"),
    ([{"root": "a", "wieght": 2}], True, r"data.sources\[0\].wieght"),
    ([{"root": "a"}, {"root": "b", "weight": 0}], True, r"data.sources\[1\].weight"),
    ([{"root": "a", "weight": -1.5}], True, r"data.sources\[0\].weight"),
    ([{"root": "a", "name": "x"}, {"root": "b", "name": "x"}], True, r"data.sources\[1\].name"),
    ([{"root": "a/s"}, {"root": "b/s"}], True, r"data.sources\[1\].name"),  # derived names collide
    ([{"root": "a", "name": "two words"}], True, r"data.sources\[0\].name"),
    ([{"root": "a", "packed": False}], True, r"data.sources\[0\].packed"),
    ([{"root": "a", "num_workers": 3}], True, r"data.sources\[0\].num_workers"),
    ([{"root": "b", "camera": "fuji", "crop_size": 64}], False, r"data.sources\[0\].crop_size"),
    ([{"root": "a", "sources": []}], True, r"data.sources\[0\].sources"),
    ([], True, "data.sources"),
    ("sony", True, "data.sources"),
])
def test_bad_sources_are_one_line_config_errors(sources, packed, key):
    with pytest.raises(ConfigError, match=key) as error:
        from_dict({"data": {"packed": packed, "sources": sources}})
    assert "\n" not in str(error.value)


def test_a_crosstalk_kernel_file_cannot_serve_two_cfa_periods():
    tree = {"data": {"packed": False, "sources": [{"root": "a"}, {"root": "b", "camera": "fuji", "crop_size": 48}]}}
    from_dict(tree)  # uniform(0.02), the default, builds a kernel per period
    with pytest.raises(ConfigError, match="loss.crosstalk_kernel"):
        from_dict({**tree, "loss": {"crosstalk_kernel": "kernel.npy"}})


# --------------------------------------------------------------------------- sampling


def test_the_source_of_a_step_follows_the_weights_and_the_step_alone():
    schedule = SourceSchedule([3.0, 1.0], seed=7)
    drawn = schedule.sources(40_000)
    assert abs(float((drawn == 0).mean()) - 0.75) < 0.01  # binomial sd 0.002
    assert schedule.steps_before(40_000, 1) == int((drawn == 1).sum())
    fresh = SourceSchedule([3.0, 1.0], seed=7)  # no state: any step, any order, any process
    assert [fresh.source(s) for s in (39_999, 5, 12_345, 0)] == [int(drawn[s]) for s in (39_999, 5, 12_345, 0)]
    other = SourceSchedule([3.0, 1.0], seed=8).sources(1000)
    assert (other != drawn[:1000]).any()  # another seed, another draw
    three = SourceSchedule([1.0, 2.0, 1.0], seed=7).sources(40_000)
    assert all(abs(float((three == k).mean()) - share) < 0.01 for k, share in enumerate((0.25, 0.5, 0.25)))


def test_every_micro_batch_of_a_step_comes_from_its_source_on_every_rank():
    sizes, offsets = [3, 5], [0, 3]
    ranks = [SourceBatchSampler(sizes, offsets, [1.0, 1.0], 2, seed=4, rank=r, world_size=2, accumulate=2) for r in (0, 1)]
    schedule = SourceSchedule([1.0, 1.0], seed=4)
    for batch_index in range(40):
        source = schedule.source(batch_index // 2)
        indices = [key.index for sampler in ranks for key in sampler.batch(batch_index)]
        assert all(offsets[source] <= index < offsets[source] + sizes[source] for index in indices)
    # inside a source the micro-batches it was given walk its permutation: each item once per epoch
    single = SourceBatchSampler(sizes, offsets, [1.0, 1.0], 1, seed=4)
    fuji_like = [single.batch(b)[0].index for b in range(60) if schedule.source(b) == 1]
    assert len(fuji_like) >= 10 and sorted(fuji_like[:5]) == sorted(fuji_like[5:10]) == [3, 4, 5, 6, 7]
    # starting later gives the stream an uninterrupted sampler gives there
    later = SourceBatchSampler(sizes, offsets, [1.0, 1.0], 2, seed=4, rank=1, world_size=2, accumulate=2, start_batch=17)
    assert next(iter(later)) == ranks[1].batch(17)


def test_one_source_walks_the_plain_sampler_stream():
    mixed = SourceBatchSampler([5], [0], [2.0], 2, seed=9, accumulate=3)
    plain = StepBatchSampler(5, 2, seed=9, accumulate=3)
    assert [mixed.batch(b) for b in range(30)] == [plain.batch(b) for b in range(30)]


def test_mosaic_tiles_start_on_whole_xtrans_periods():
    """Mixed CFAs train on the 1-channel mosaic: a tiled X-Trans frame must show every tile the trained CFA phase."""
    from rawrestore.ensemble import restore
    from tests.rawfixtures import XTRANS

    def phase_model(mosaic: torch.Tensor) -> torch.Tensor:  # pointwise, but tells the 6x6 phases apart
        rows = torch.arange(mosaic.shape[-2])[:, None] % 6
        cols = torch.arange(mosaic.shape[-1])[None, :] % 6
        return mosaic * (1.0 + rows * 6 + cols)

    frame = torch.rand(1, 1, 150, 150, generator=torch.Generator().manual_seed(0))
    whole = phase_model(frame)
    tiled = restore(phase_model, frame, torch.as_tensor(XTRANS), tile=64, overlap=8, packed=False)
    assert torch.allclose(tiled, whole, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------ a run


def test_sony_and_fuji_train_evaluate_per_source_and_resume_exactly(tmp_path, data_root, fuji_root):
    """4 steps straight == 2 steps + resume + 2 steps; both sources trained, validated and evaluated apart."""
    from rawrestore.evaluate import evaluate

    config = tiny_yaml(tmp_path, data_root, iterations=4, val_every=4, ckpt_every=2, batch_size=1)
    overrides = sources_override(data_root, fuji_root) + ["loss.crosstalk.weight=0.1", "train.ema=0.9"]
    straight = Trainer(load_config(config, overrides + [f"output_dir={tmp_path}/a"]), log=quiet, progress=False)
    assert {straight.source_of(step) for step in range(4)} == {0, 1}  # seed 3: both sources within the 4 steps
    assert straight.loss.terms["crosstalk"].other_periods == (6,)  # a kernel for X-Trans beside the Bayer one
    assert straight.fit().step == 4

    # the split run loads with two DataLoader workers: which source and items a step gets must not depend on them
    split_cfg = load_config(config, overrides + [f"output_dir={tmp_path}/b", "data.num_workers=2"])
    assert Trainer(split_cfg, log=quiet, progress=False).fit(stop_at=2).step == 2
    second = Trainer(split_cfg, log=quiet, progress=False)
    assert second.resume("auto") and second.step == 2 and second.fit().step == 4

    a = ckpt.load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    b = ckpt.load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not states_equal(Trainer(split_cfg, log=quiet, progress=False).net.state_dict(), a["model"])

    (val,) = [r for r in read_log(tmp_path / "b/log.jsonl") if "val" in r]
    parts = val["val_sources"]
    assert list(parts) == ["sony", "fuji"] and val["val"]["all"]["n"] == parts["sony"]["all"]["n"] + parts["fuji"]["all"]["n"]
    psnrs = [parts[name]["all"]["psnr"] for name in parts]
    assert all(math.isfinite(p) for p in psnrs) and val["val_select_psnr"] == pytest.approx(sum(psnrs) / 2)
    assert second.best_psnr == pytest.approx(val["val_select_psnr"])  # best.pt follows the mean over sources

    summary = evaluate(split_cfg, tmp_path / "b/checkpoints/last.pt", tmp_path / "eval", classical="none", images=False,
                       log=quiet)
    assert list(summary["sources"]) == ["sony", "fuji"]
    for name, camera in (("sony", "sony"), ("fuji", "fuji")):
        part = summary["sources"][name]
        assert part["camera"] == camera and part["pairs"] == 3 and list(part["model"]) == ["all", "x100", "x250", "x300"]
        assert all(math.isfinite(part["model"][group]["psnr"]) for group in part["model"])
    assert summary["model"]["all"]["n"] == 6
    on_disk = json.loads((tmp_path / "eval/summary.json").read_text())
    assert on_disk["sources"]["fuji"]["model"]["all"]["psnr"] == summary["sources"]["fuji"]["model"]["all"]["psnr"]
    with open(tmp_path / "eval/per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["source"] for row in rows} == {"sony", "fuji"} and len(rows) == 2 * 3 * 2  # sources x images x (model, baseline)
    validated = evaluate(split_cfg, tmp_path / "b/checkpoints/last.pt", tmp_path / "eval_val", split="val",
                         classical="none", images=False, log=quiet)
    final = Trainer(split_cfg, log=quiet, progress=False)
    final.resume("auto")
    again = final.validate()  # eval and validation share one scoring path: the same val images, the same numbers
    for name in ("sony", "fuji"):  # train.channels_last (the trainer's weight layout) changes float rounding only
        assert validated["sources"][name]["model"]["all"]["psnr"] == pytest.approx(again["sources"][name]["all"]["psnr"],
                                                                                  abs=1e-4)


def test_a_one_entry_source_list_trains_like_the_plain_section(tmp_path, data_root):
    """No behaviour change: the same section as `data` or as data.sources[0] gives bit-identical weights."""
    config = tiny_yaml(tmp_path, data_root, iterations=3, val_every=0, ckpt_every=0)
    noise = ["data.synthetic_noise=true", "data.gain_jitter=0.5", "data.synthetic_crosstalk=uniform(0.02)",
             "train.accumulate=2"]
    plain = Trainer(load_config(config, noise + [f"output_dir={tmp_path}/plain"]), log=quiet, progress=False)
    listed = Trainer(load_config(config, noise + [f"output_dir={tmp_path}/listed", f"data.sources=[{{root: {data_root}}}]"]),
                     log=quiet, progress=False)
    assert plain.schedule is None and listed.schedule is not None
    plain.fit()
    listed.fit()
    assert states_equal(plain.net.state_dict(), listed.net.state_dict())
