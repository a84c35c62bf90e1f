"""Multi-scale supervision (model.scales): exact coarse targets, training-only coarse outputs, the loss by hand, a run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from isp.cfa import XTRANS_PACK_SITES, downsample_packed, pack
from rawrestore.cli import main
from rawrestore.config import load_config
from rawrestore.config.schema import ExperimentConfig, ModelConfig
from rawrestore.errors import ConfigError, InputError
from rawrestore.losses import LossStack, charbonnier, l1
from rawrestore.models import NAFNet, UNet, build_model_from_config
from rawrestore.protocols import predict
from rawrestore.train import checkpoint as ckpt
from rawrestore.train.runlog import read_log, write_loss_curves
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml
from tests.rawfixtures import CAM_TO_SRGB, XTRANS
from tests.test_losses import loss_config
from tests.test_train_step import HostReads

BAYER_GRBG = [[1, 0], [2, 1]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny inputs: one thread is faster than several fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(_: str) -> None:
    """Swallow the trainer's progress lines."""


def dyadic(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """14-bit RAW values k / 2**14 in float32: every block sum of up to 2**8 of them is exact, whatever its order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**14, shape, generator=generator).float() / 2**14


def block_mean(planes: np.ndarray, block: int) -> np.ndarray:
    """numpy reference: (..., h, w) -> (..., h // block, w // block) mean of each block x block cell (the rest cropped)."""
    h, w = planes.shape[-2] // block, planes.shape[-1] // block
    cells = planes[..., : h * block, : w * block].reshape(*planes.shape[:-2], h, block, w, block)
    return cells.mean(axis=(-3, -1))


def make_batch(shape=(2, 4, 16, 12), seed=0, cfa=BAYER_GRBG):
    """pred, batch: packed target/input in (0.05, 0.35), the test camera's wb and matrix."""
    generator = torch.Generator().manual_seed(seed)
    target = 0.05 + 0.3 * torch.rand(shape, generator=generator)
    pred = target + 0.05 * torch.rand(shape, generator=generator) + 0.01
    aligned = target + 0.1 * (torch.rand(shape, generator=generator) - 0.5)
    batch = {"target": target, "input": aligned, "cfa": torch.tensor(cfa), "packed": True,
             "wb": torch.tensor([2.0, 1.0, 1.5]), "cam_to_srgb": torch.tensor(CAM_TO_SRGB)}
    return pred, batch


# ------------------------------------------------------------------------------ coarse targets


@pytest.mark.parametrize("levels", [1, 2])
def test_bayer_coarse_target_is_the_block_mean_of_each_colour_site(levels):
    """Packed Bayer (GRBG) downsampled = numpy's block mean of each CFA site's pixels taken from the mosaic, exactly."""
    mosaic = dyadic((2, 1, 40, 36), seed=1)  # packed 20 x 18: at 1/4 the last row and two columns are cropped
    coarse = downsample_packed(pack(mosaic, BAYER_GRBG), levels)
    assert coarse.shape == (2, 4, 20 >> levels, 18 >> levels) and coarse.dtype == torch.float32
    image = mosaic[:, 0].numpy().astype(np.float64)
    # R, G (R's row), B, G2: the packing's channel order; GRBG puts R at (0,1) and B at (1,0)
    sites = [(0, 1), (0, 0), (1, 0), (1, 1)]
    expected = np.stack([block_mean(image[:, i::2, j::2], 2**levels) for i, j in sites], axis=1)
    assert np.array_equal(coarse.numpy().astype(np.float64), expected)


@pytest.mark.parametrize("levels", [1, 2])
def test_xtrans_coarse_target_is_the_block_mean_of_each_packed_plane(levels):
    """Packed X-Trans (9 planes, one colour each) downsampled = numpy's reshape-mean per plane, exactly."""
    packed = pack(dyadic((1, 1, 54, 42), seed=2), XTRANS)  # (1, 9, 18, 14)
    for plane, sites in enumerate(XTRANS_PACK_SITES):
        assert len({XTRANS[r][c] for r, c in sites}) == 1, plane  # one colour per plane: no colours mixed
    coarse = downsample_packed(packed, levels)
    expected = block_mean(packed.numpy().astype(np.float64), 2**levels)
    assert coarse.shape == (1, 9, 18 >> levels, 14 >> levels)
    assert np.array_equal(coarse.numpy().astype(np.float64), expected)


def test_downsample_packed_on_any_values_and_bad_arguments():
    packed = torch.rand(1, 4, 9, 7, dtype=torch.float64)
    assert downsample_packed(packed, 0) is packed
    np.testing.assert_allclose(downsample_packed(packed, 1).numpy(), block_mean(packed.numpy(), 2), rtol=1e-15)
    with pytest.raises(InputError, match="smaller than one 8x8 block"):
        downsample_packed(packed, 3)
    with pytest.raises(InputError, match="levels must be an integer >= 0"):
        downsample_packed(packed, -1)


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name, channels, residual, noise_map", [
    ("unet", 4, False, False), ("unet", 9, True, False), ("nafnet", 4, True, True), ("nafnet", 9, False, False),
])
def test_models_give_coarse_outputs_while_training_and_one_tensor_in_eval(name, channels, residual, noise_map):
    torch.manual_seed(0)
    config = ModelConfig(name=name, width=4, residual=residual, noise_map=noise_map, nafnet_blocks=[1, 1, 1],
                         nafnet_middle_blocks=1, scales=[1.0, 0.5, 0.25])
    model = build_model_from_config(config, channels)
    x = torch.rand(1, channels, 22, 18)
    outputs = model.train()(x)
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [
        (1, channels, 22, 18), (1, channels, 11, 9), (1, channels, 5, 4)]
    model.eval()
    with torch.no_grad():
        full = model(x)
        sample = {"input": x[0], "cfa": torch.tensor(XTRANS if channels == 9 else BAYER_GRBG)}
        eval_cfg = type("Eval", (), {"tile": 0, "overlap": 0, "self_ensemble": False})()
        predicted = predict(model, sample, eval_cfg, True, torch.device("cpu"))
    assert isinstance(full, torch.Tensor) and torch.equal(full, outputs[0].detach())
    assert torch.equal(predicted, full)


@pytest.mark.parametrize("cls, options", [(UNet, {"base": 4}), (NAFNet, {"width": 4, "enc_blocks": [1, 1]})])
def test_residual_coarse_output_adds_the_block_mean_of_the_input(cls, options):
    """With zeroed heads a residual network returns its input at every scale, block-averaged like the target."""
    model = cls(4, residual=True, scales=2, **options)
    for head in (model.head if cls is UNet else model.ending, *model.scale_heads):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    x = torch.rand(2, 4, 14, 10)
    full, half = model.train()(x)
    assert torch.equal(full, x) and torch.equal(half, downsample_packed(x, 1))


def test_one_scale_is_the_network_as_before():
    """scales=1 (model.scales [1.0]) builds no heads: same weights under the same seed, a plain tensor while training."""
    torch.manual_seed(5)
    before = UNet(4, base=4)
    torch.manual_seed(5)
    built = build_model_from_config(ModelConfig(width=4, scales=[1.0]), 4)
    assert before.state_dict().keys() == built.state_dict().keys()
    assert all(torch.equal(before.state_dict()[k], built.state_dict()[k]) for k in before.state_dict())
    x = torch.rand(1, 4, 16, 16)
    assert isinstance(built.train()(x), torch.Tensor) and torch.equal(built(x), before.train()(x))


def test_scales_are_limited_to_the_decoder_levels():
    with pytest.raises(ConfigError, match=r"UNet: scales must be 1 to 4"):
        UNet(4, base=4, scales=5)
    with pytest.raises(ConfigError, match=r"NAFNet: scales must be 1 to 2"):
        NAFNet(4, width=4, enc_blocks=[1, 1], scales=3)


# -------------------------------------------------------------------------------------- loss


def test_stack_with_scales_one_gives_exactly_the_loss_as_before():
    pred, batch = make_batch()
    config = loss_config(raw_l1=1.0, robust=0.3, crosstalk=0.1, ssim=0.05)
    total, values = LossStack(config, total_steps=10, cfa_period=2)(pred, batch, 3)
    for stack_pred in (pred, [pred], (pred,)):
        again, again_values = LossStack(config, total_steps=10, cfa_period=2, scales=[1.0])(stack_pred, batch, 3)
        assert torch.equal(again, total) and again_values.keys() == values.keys()
        assert all(torch.equal(again_values[k], values[k]) for k in values)


def test_total_is_full_terms_plus_weighted_coarse_raw_terms_by_hand():
    """scales [1, 0.5]: each RAW term -> term(full, target) + 0.5 term(half, 2x2 mean of target); crosstalk, SSIM on full."""
    pred, batch = make_batch()
    half = downsample_packed(pred, 1) + 0.02 * torch.rand(2, 4, 8, 6, generator=torch.Generator().manual_seed(9))
    config = loss_config(raw_l1=1.0, charbonnier=0.4, crosstalk=0.1, ssim=0.05)
    stack = LossStack(config, total_steps=10, cfa_period=2, scales=[1.0, 0.5])
    total, values = stack((pred, half), batch, 3)
    single_total, single = LossStack(config, total_steps=10, cfa_period=2)(pred, batch, 3)

    target_half = downsample_packed(batch["target"], 1)
    eps = config.charbonnier.eps
    by_hand = {"raw_l1": l1(pred, batch["target"]) + 0.5 * l1(half, target_half),
               "charbonnier": charbonnier(pred, batch["target"], eps) + 0.5 * charbonnier(half, target_half, eps)}
    expected_total = (single_total + (by_hand["raw_l1"] - single["raw_l1"])
                      + 0.4 * (by_hand["charbonnier"] - single["charbonnier"]))
    assert float(total) == pytest.approx(float(expected_total), rel=1e-6)
    assert float(total) != pytest.approx(float(single_total), rel=1e-3)  # the coarse terms count
    for name in ("raw_l1", "charbonnier"):
        assert float(values[name]) == pytest.approx(float(by_hand[name]), rel=1e-6)
        assert torch.equal(values[f"{name}@1"], single[name])
    assert float(values["raw_l1@1/2"]) == pytest.approx(float(l1(half, target_half)), rel=1e-6)
    for name in ("crosstalk", "ssim"):  # full resolution only
        assert torch.equal(values[name], single[name])
    assert list(values) == ["raw_l1", "raw_l1@1", "raw_l1@1/2", "charbonnier", "charbonnier@1", "charbonnier@1/2",
                            "crosstalk", "ssim"]
    report = stack.report(values, 3, total)
    assert report["raw_l1@1/2"] == pytest.approx(float(values["raw_l1@1/2"])) and "raw_l1@1/2/weight" not in report


def test_stack_refuses_outputs_that_do_not_fit_its_scales():
    pred, batch = make_batch()
    stack = LossStack(loss_config(raw_l1=1.0), total_steps=10, scales=[1.0, 0.5])
    with pytest.raises(InputError, match=r"gave 1 output\(s\) but the loss has 2 scale"):
        stack(pred, batch, 0)
    with pytest.raises(InputError, match=r"output at 1/2 has shape \(2, 4, 8, 7\), expected \(2, 4, 8, 6\)"):
        stack((pred, torch.rand(2, 4, 8, 7)), batch, 0)
    with pytest.raises(ConfigError, match="scales must list finite weights > 0"):
        LossStack(loss_config(raw_l1=1.0), total_steps=10, scales=[1.0, 0.0])


def test_finite_gradients_reach_the_coarse_heads():
    torch.manual_seed(1)
    model = build_model_from_config(ModelConfig(name="nafnet", width=4, residual=True, nafnet_blocks=[1, 1],
                                                scales=[1.0, 0.5]), 4).train()
    _, batch = make_batch(shape=(2, 4, 16, 12))
    stack = LossStack(loss_config(robust=1.0), total_steps=10, scales=[1.0, 0.5])
    total, values = stack(model(batch["input"]), batch, 0)
    total.backward()
    grads = [p.grad for p in model.scale_heads.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)
    assert set(values) == {"robust", "robust@1", "robust@1/2"}


# ------------------------------------------------------------------------------------ config


def test_config_scales_checks_name_the_key_and_the_limit():
    ModelConfig(scales=[1.0, 0.5, 0.25, 0.125]).validate()
    with pytest.raises(ConfigError, match=r"'model.scales' may have at most 4 entries for unet"):
        ModelConfig(scales=[1.0] * 5).validate()
    with pytest.raises(ConfigError, match=r"'model.scales' may have at most 2 entries for nafnet"):
        ModelConfig(name="nafnet", nafnet_blocks=[1, 1], scales=[1.0, 0.5, 0.25]).validate()
    with pytest.raises(ConfigError, match=r"'model.scales' must list finite weights > 0"):
        ModelConfig(scales=[1.0, 0.0]).validate()
    with pytest.raises(ConfigError, match=r"'model.scales' must list finite weights > 0"):
        ModelConfig(scales=[]).validate()
    mosaic = ExperimentConfig()
    mosaic.data.packed, mosaic.model.scales = False, [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"'model.scales' needs data.packed: true"):
        mosaic.validate()
    small = ExperimentConfig()
    small.data.crop_size, small.model.scales = 4, [1.0, 0.5, 0.25]
    with pytest.raises(ConfigError, match=r"coarsest output below one pixel for data.crop_size 4"):
        small.validate()


# ------------------------------------------------------------------------------ training run


def dual_yaml(folder: Path, data_root: Path, **train: object) -> Path:
    """The shared tiny experiment with model.scales [1.0, 0.5] in the file itself (eval reads the same file)."""
    path = tiny_yaml(folder, data_root, **train)
    text = path.read_text(encoding="utf-8").replace("model: {width: 4}", "model: {width: 4, scales: [1.0, 0.5]}")
    path.write_text(text, encoding="utf-8")
    return path


def test_no_host_reads_in_a_dual_output_step(tmp_path, data_root):
    cfg = load_config(dual_yaml(tmp_path, data_root), ["loss.ssim.weight=0.05", "train.val_every=0", "train.ckpt_every=0"])
    trainer = Trainer(cfg, log=quiet, progress=False)
    batches = trainer._loader(0)
    trainer.model.train()
    trainer._train_step(batches)
    prepared = [next(batches)]
    with HostReads({batch["cfa"].untyped_storage().data_ptr() for batch in prepared}) as reads:
        outcome = trainer._train_step(iter(prepared))
    assert sum(reads.calls.values()) == 0, dict(reads.calls)
    record = outcome.record()
    assert set(record["terms"]) == {"raw_l1", "raw_l1@1", "raw_l1@1/2", "ssim"}
    terms = record["terms"]
    assert terms["raw_l1"]["value"] == pytest.approx(terms["raw_l1@1"]["value"] + 0.5 * terms["raw_l1@1/2"]["value"])
    assert terms["raw_l1@1/2"]["weight"] is None and terms["raw_l1"]["weight"] == 1.0


def test_dual_output_run_trains_checkpoints_resumes_and_evaluates(tmp_path, data_root):
    config = dual_yaml(tmp_path, data_root, val_every=0, ckpt_every=3, ema=0.5)
    first = Trainer(load_config(config), log=quiet, progress=False)
    initial_heads = {k: v.clone() for k, v in first.net.state_dict().items() if k.startswith("scale_heads.")}
    assert set(initial_heads) == {"scale_heads.0.weight", "scale_heads.0.bias"}
    assert first.fit(stop_at=3).step == 3
    second = Trainer(load_config(config), log=quiet, progress=False)
    assert second.resume("auto") and second.step == 3
    assert second.fit().step == 6

    state = ckpt.load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert not torch.equal(state["model"]["scale_heads.0.weight"], initial_heads["scale_heads.0.weight"])
    records = [r for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        terms = record["terms"]
        assert math.isfinite(record["loss"]) and set(terms) == {"raw_l1", "raw_l1@1", "raw_l1@1/2"}
        assert record["loss"] == pytest.approx(terms["raw_l1@1"]["value"] + 0.5 * terms["raw_l1@1/2"]["value"], rel=1e-6)

    # the per-scale values, which have no weight, plot beside the terms (a plotting failure would raise here)
    assert write_loss_curves(tmp_path / "run/log.jsonl", tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "eval"
    assert main(["eval", "-c", str(config), "--checkpoint", str(tmp_path / "run/checkpoints/last.pt"),
                 "--split", "test", "--classical", "none", "--no-images", "--out", str(out)]) == 0
    model = json.loads((out / "summary.json").read_text())["model"]["all"]
    assert model["n"] == 3 and math.isfinite(model["psnr"])
