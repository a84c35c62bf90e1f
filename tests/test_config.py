"""Typed configs: shipped files load, composition order, overrides, errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from rawrestore.config import (
    ExperimentConfig,
    LossTermConfig,
    from_dict,
    load_config,
    save_resolved,
    to_dict,
)
from rawrestore.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS = sorted(CONFIGS.glob("*.yaml"))
FRAGMENTS = sorted(CONFIGS.glob("*/*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in EXPERIMENTS + FRAGMENTS}
    assert {"sid_sony.yaml", "sid_fuji.yaml", "demo.yaml", "data/sid_sony.yaml", "data/sid_fuji.yaml",
            "data/synthetic.yaml", "model/unet.yaml", "model/nafnet.yaml", "losses/full.yaml",
            "losses/raw_l1.yaml", "schedule/sid.yaml", "schedule/cosine.yaml"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS + FRAGMENTS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert path.read_text().startswith("#")  # each file says what it is


def test_shipped_experiments_have_expected_values():
    sony = load_config(CONFIGS / "sid_sony.yaml")
    assert (sony.data.camera, sony.data.in_channels, sony.model.name) == ("sony", 4, "unet")
    assert (sony.train.optimizer, sony.train.lr, sony.train.schedule) == ("adam", 1e-4, "step")
    fuji = load_config(CONFIGS / "sid_fuji.yaml")
    assert (fuji.data.camera, fuji.data.in_channels, fuji.data.crop_size % 6) == ("fuji", 9, 0)
    assert fuji.train.step_milestones == [270000] and fuji.train.lr == 1e-4  # file over fragment
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.data.root == "data/synthetic" and demo.data.camera == "sony"
    assert demo.loss.drop_missing_pretrained and demo.output_dir == "runs/demo"
    assert demo.eval.classical == "wavelet" and demo.train.warmup_iters > 0
    assert set(demo.loss.active_terms()) == {"robust", "crosstalk", "perceptual", "lpips", "delta_e00", "ssim"}
    assert demo.loss.robust.alpha == 2.0  # RAW-L2 in the demo
    # the demo's on-the-fly noise sees the crosstalk its test files carry, and the loss assumes the same K
    assert demo.data.synthetic_noise and demo.data.synthetic_crosstalk == demo.loss.crosstalk_kernel
    assert demo.train.amp == "auto" and demo.data.gain_jitter > 0
    raw_only = load_config(CONFIGS / "losses" / "raw_l1.yaml")
    assert set(raw_only.loss.active_terms()) == {"raw_l1"}


def test_defaults_follow_the_spec():
    loss = ExperimentConfig().loss
    weights = {name: term.weight_at(0.0) for name, term in loss.terms().items()}
    assert weights == {"raw_l1": 1.0, "charbonnier": 0.0, "robust": 0.0, "crosstalk": 0.10, "perceptual": 0.02,
                       "lpips": 0.004, "delta_e00": 0.002, "ssim": 0.05, "psnr": 0.0, "ms_ssim": 0.0, "edge": 0.0,
                       "color_angle": 0.0, "gram": 0.0, "sobel_edge": 0.0, "blur_color": 0.0, "gan": 0.0}
    assert loss.perceptual.layers == ["relu3_3", "relu4_3"] and loss.lpips.net == "alex"
    # staged: LPIPS and CIEDE2000 ramp in with the perceptual term, in the defaults and in losses/full.yaml
    for staged in (loss, load_config(CONFIGS / "sid_sony.yaml").loss):
        for name in ("lpips", "delta_e00"):
            term = getattr(staged, name)
            assert (term.schedule, term.ramp_start, term.ramp_end) == (staged.perceptual.schedule, 0.7, 1.0)
            assert term.weight_at(1.0) == 0.02 and term.weight_at(0.0) < 0.25 * term.weight_at(1.0)
    assert ExperimentConfig().data.resolved_cache_dir == "data/synthetic/.cache"


def test_perceptual_ramp_over_last_30_percent():
    term = ExperimentConfig().loss.perceptual
    values = [term.weight_at(p) for p in (0.0, 0.7, 0.85, 1.0)]
    assert values == pytest.approx([0.02, 0.02, 0.06, 0.10])
    cosine = LossTermConfig(weight=0.0, schedule="cosine", start_weight=0.0, end_weight=1.0)
    assert cosine.weight_at(0.85) == 0.0 and not cosine.active  # weight 0 switches a term off
    cosine = LossTermConfig(weight=1.0, schedule="cosine", start_weight=0.0, end_weight=1.0)
    assert cosine.weight_at(0.85) == pytest.approx(0.5) and cosine.weight_at(0.775) == pytest.approx(0.14644661)
    off = load_config(CONFIGS / "demo.yaml", ["loss.perceptual.weight=0"])
    assert "perceptual" not in off.loss.active_terms()


def test_unknown_key_in_file_names_key_and_suggestion(tmp_path):
    path = write(tmp_path / "exp.yaml", "train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"'train\.iteratons'.*did you mean 'train\.iterations'") as info:
        load_config(path)
    assert str(path.resolve()) in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_fragment_names_the_fragment(tmp_path):
    fragment = write(tmp_path / "frag" / "loss.yaml", "loss:\n  perceptual: {wieght: 1.0}\n")
    path = write(tmp_path / "exp.yaml", "base: frag/loss.yaml\n")
    pattern = r"loss\.yaml: unknown config key 'loss\.perceptual\.wieght'.*'loss\.perceptual\.weight'"
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(fragment.resolve()) in str(info.value)


def test_unknown_top_level_key_without_close_match_lists_keys(tmp_path):
    path = write(tmp_path / "exp.yaml", "zzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz' \(known keys here: data, model, loss"):
        load_config(path)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.iteratons=5", r"override 'train\.iteratons=5': unknown config key 'train\.iteratons'.*"
                              r"did you mean 'train\.iterations'"),
        ("loss.percepual.weight=1", r"unknown config key 'loss\.percepual'.*'loss\.perceptual'"),
        ("train.lr.x=1", r"'train\.lr\.x' does not exist"),
        ("train", r"expected key=value"),
    ],
)
def test_unknown_override_names_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "demo.yaml", [override])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.iterations=abc", r"'train\.iterations' expects int, got 'abc' \(str\)"),
        ("train.iterations=1.5", r"'train\.iterations' expects int, got 1\.5"),
        ("train.lr=fast", r"'train\.lr' expects float, got 'fast'"),
        ("data.augment=3", r"'data\.augment' expects bool, got 3"),
        ("model.nafnet_blocks=[1,x]", r"'model\.nafnet_blocks\[1\]' expects int, got 'x'"),
        ("train.grad_clip=[1]", r"'train\.grad_clip' expects float or null"),
        ("model.name=unett", r"'model\.name' must be one of 'unet', 'nafnet', got 'unett'"),
        ("eval.classical=bm4d", r"'eval\.classical' must be one of"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "demo.yaml", [override])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.lr=-1e-4"], r"'train\.lr' must be a finite number > 0, got -0\.0001"),
        (["train.iterations=0"], r"'train\.iterations' must be >= 1"),
        (["data.crop_size=255"], r"'data\.crop_size' must be a multiple of the sony CFA period 2, got 255"),
        (["data.camera=fuji", "data.crop_size=256"], r"'data\.crop_size' must be a multiple of the fuji CFA period"),
        (["data.val_crop=100", "data.camera=fuji", "data.crop_size=264"], r"'data\.val_crop'"),
        (["eval.tile=64", "eval.overlap=64"], r"'eval\.overlap' must be < tile=64, got 64"),
        (["train.accumulate=0"], r"'train\.accumulate' must be >= 1"),
        (["train.ema=1.0"], r"'train\.ema'"),
        (["train.schedule=step", "train.step_milestones=[500,100]"], r"'train\.step_milestones' must be strictly"),
        (["loss.perceptual.layers=[relu3_3,relu6_1]"], r"'loss\.perceptual\.layers'.*'relu6_1'"),
        (["loss.crosstalk_kernel=uniform(0.02"], r"'loss\.crosstalk_kernel'"),
        (["device=gpu"], r"'device' must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_impossible_values_are_rejected(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "demo.yaml", overrides)


def test_fuji_crop_multiple_of_six_is_accepted():
    config = load_config(CONFIGS / "demo.yaml", ["data.camera=fuji", "data.crop_size=258"])
    assert config.data.cfa_period == 6 and config.data.crop_size == 258


def test_composition_order(tmp_path):
    write(tmp_path / "fragments" / "root.yaml",
          "train: {log_every: 7, val_every: 70}\nloss: {perceptual: {layers: [relu2_2]}}\n")
    write(tmp_path / "fragments" / "a.yaml",
          "base: root.yaml\ntrain: {iterations: 10, lr: 0.5, batch_size: 3, val_every: 71}\n"
          "loss: {perceptual: {weight: 0.3}}\n")
    write(tmp_path / "fragments" / "b.yaml", "train: {iterations: 20, lr: 0.25}\nseed: 1\n")
    path = write(tmp_path / "exp.yaml",
                 "base: [fragments/a.yaml, fragments/b.yaml]\ntrain: {lr: 0.125, batch_size: 4}\nseed: 2\n")
    config = load_config(path, ["train.batch_size=5", "seed=3", "seed=4"])
    assert config.train.log_every == 7  # from the fragment's own base
    assert config.train.val_every == 71  # a fragment beats its base
    assert config.train.iterations == 20  # the later fragment beats the earlier
    assert config.train.lr == 0.125  # the file beats its fragments
    assert config.train.batch_size == 5  # overrides beat the file
    assert config.seed == 4  # the last override wins
    assert config.loss.perceptual.layers == ["relu2_2"] and config.loss.perceptual.weight == 0.3  # deep merge
    assert config.loss.perceptual.end_weight == 0.10  # untouched keys keep their defaults


def test_lists_are_replaced_not_merged(tmp_path):
    write(tmp_path / "a.yaml", "model: {nafnet_blocks: [1, 1, 1, 28]}\n")
    path = write(tmp_path / "exp.yaml", "base: a.yaml\nmodel: {nafnet_blocks: [2, 2]}\n")
    assert load_config(path).model.nafnet_blocks == [2, 2]
    assert load_config(path, ["model.nafnet_blocks=[1,1,2]"]).model.nafnet_blocks == [1, 1, 2]


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="config base cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_values_are_parsed_and_typed():
    config = load_config(
        CONFIGS / "demo.yaml",
        ["train.lr=1e-4", "data.root=/x", "output_dir=2024", "train.grad_clip=null",
         "loss.perceptual={weight: 0.5, criterion: l2}", "data.cache_dir=/tmp/c", "eval.max_images=3"],
    )
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)  # YAML reads '1e-4' as text
    assert config.data.root == "/x" and config.output_dir == "2024"
    assert config.train.grad_clip is None and config.eval.max_images == 3
    assert config.loss.perceptual.weight == 0.5 and config.loss.perceptual.criterion == "l2"
    assert config.loss.perceptual.layers == ["relu3_3", "relu4_3"]  # mapping override merges
    assert config.data.resolved_cache_dir == "/tmp/c"


def test_save_resolved_round_trip(tmp_path):
    config = load_config(
        CONFIGS / "sid_fuji.yaml",
        ["train.lr=3e-5", "model.name=nafnet", "model.nafnet_blocks=[1,1,2]", "train.ema=0.999",
         "data.val_crop=768", "loss.robust.alpha=-2.5", "eval.max_images=4"],
    )
    saved = save_resolved(config, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == config
    assert to_dict(again) == to_dict(config)
    assert "base" not in saved.read_text()
    assert again != load_config(CONFIGS / "sid_fuji.yaml")  # the comparison can fail


def test_from_dict_defaults_and_validation():
    assert from_dict({}) == ExperimentConfig()
    with pytest.raises(ConfigError, match=r"'loss' needs at least one term"):
        from_dict({"loss": {name: {"weight": 0.0} for name in ExperimentConfig().loss.terms()}})


# ------------------------------------------------------------ hostile or careless config files

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))  # 9^9 = 387M values


@pytest.mark.parametrize("content,expected", [
    (ALIAS_BOMB.encode(), "expands to more than 20000 values"),
    (("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "line 1 nested deeper than 32 levels"),
    ("seed: 1\n# caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 13)"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "a binary file, not a YAML config"),
    (b"seed: " + b"7" * 5000 + b"\n", "a value cannot be read (ValueError"),
    (b"# " + b"x" * (1 << 20) + b"\n", "is not a config (at most 1048576)"),
    (b"a: &r [*r]\n", "nested deeper than 32 levels"),  # a list that contains itself
])
def test_hostile_config_files_are_one_short_error(tmp_path, content, expected):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and expected in message
    assert "\n" not in message and len(message) < 300


def test_values_in_messages_are_short_previews(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  iterations: [" + ", ".join(["123456789"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "config key 'train.iterations' expects int, got [123456789, 123456789" in message and len(message) < 300
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "demo.yaml", ["output_dir=" + "x" * 100000, "train.lr=" + "9" * 100000])
    assert len(str(caught.value)) < 300


def test_a_shortened_run_scales_its_schedule_with_one_line(capsys):
    demo = load_config(CONFIGS / "demo.yaml", ["train.iterations=20"])
    assert (demo.train.warmup_iters, demo.train.val_every, demo.train.ckpt_every) == (0, 5, 5)  # 50, 500, 500 x 20/2200
    sony = load_config(CONFIGS / "sid_sony.yaml", ["train.iterations=20"])
    assert sony.train.step_milestones == [10] and (sony.train.val_every, sony.train.ckpt_every) == (1, 2)  # 322000/644000
    fuji = load_config(CONFIGS / "sid_fuji.yaml", ["train.iterations=20"])
    assert fuji.train.step_milestones == [10]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0] == ("config: train.iterations=20 shortens the run from 2200; scaled by 20/2200: "
                                            "warmup_iters 50 -> 0, val_every 500 -> 5, ckpt_every 500 -> 5")
    kept = load_config(CONFIGS / "demo.yaml", ["train.iterations=20", "train.val_every=7"])  # a key given is kept
    assert (kept.train.val_every, kept.train.ckpt_every) == (7, 5)
    assert load_config(CONFIGS / "demo.yaml", ["train.iterations=1000"]).train.val_every == 500  # fits: unchanged
    capsys.readouterr()
    assert load_config(CONFIGS / "demo.yaml", ["train.iterations=1000"]).train.warmup_iters == 50
    assert capsys.readouterr().out == ""


def test_a_short_run_written_in_the_file_is_still_an_error(tmp_path):
    path = write(tmp_path / "short.yaml", "train: {iterations: 20, warmup_iters: 50}\n")
    with pytest.raises(ConfigError, match=r"train.warmup_iters' must be in \[0, iterations=20\), got 50"):
        load_config(path)


@pytest.mark.parametrize("weighting", ["uncertainty", "fixed"])
def test_ms_ssim_on_small_crops_fails_at_the_config_check(weighting):
    overrides = ["loss.ms_ssim.weight=0.1", f"loss.weighting={weighting}", "data.crop_size=256"]
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "demo.yaml", overrides)  # half renders: 128 px, under MS-SSIM's 161
    assert "config key 'data.crop_size' gives 128-pixel renders" in str(caught.value)
    assert "'loss.ms_ssim'" in str(caught.value) and "data.crop_size >= 322" in str(caught.value)
    assert load_config(CONFIGS / "demo.yaml", overrides[:2] + ["data.crop_size=322"]).data.crop_size == 322
    assert load_config(CONFIGS / "demo.yaml", overrides + ["loss.ms_ssim.fallback=true"]).loss.ms_ssim.fallback
