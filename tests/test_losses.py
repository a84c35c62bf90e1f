"""rawrestore.losses: RAW terms vs closed forms, sRGB terms vs outside references, and the LossStack."""
from __future__ import annotations

import logging
import math

import colour
import numpy as np
import pytest
import pytorch_msssim
import torch
import torchvision
from skimage.metrics import structural_similarity

import isp.pipeline
from isp.cfa import pack, unpack
from isp.color import srgb_to_lab
from rawrestore.config.schema import LossConfig
from rawrestore.errors import InputError, WeightsError
from rawrestore.losses import (
    LOSSES,
    LossStack,
    LPIPSLoss,
    PerceptualLoss,
    charbonnier,
    color_angle,
    crosstalk_consistency,
    delta_e00,
    l1,
    laplacian_edge,
    ms_ssim_loss,
    robust,
    ssim_loss,
)
from rawrestore.losses.srgb import MS_SSIM_MIN_SIZE
from rawrestore.metrics import lpips as lpips_metric
from rawrestore.physics.crosstalk import apply_crosstalk, uniform_kernel
from tests.rawfixtures import CAM_TO_SRGB, XTRANS

BAYER = [[0, 1], [1, 2]]
VGG19_FILE = "vgg19-dcbb9e9d.pth"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory):
    """A seeded torchvision VGG-19 (features only) saved as a state dict, and the model itself."""
    torch.manual_seed(0)
    model = torchvision.models.vgg19(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "vgg19_features.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)
    yield path, model.features
    path.unlink()  # 80 MB


@pytest.fixture(autouse=True)
def one_thread():
    """These inputs are tiny: one thread is faster than several fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch):
    """torch.hub (torchvision's weight cache) pointed at an empty folder: no pretrained weights anywhere."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    return tmp_path / "empty_hub"


def loss_config(**weights: float) -> LossConfig:
    """A LossConfig with every term off except the given weights (schedules kept as configured)."""
    config = LossConfig()
    for term in config.terms().values():
        term.weight = 0.0
    for name, weight in weights.items():
        getattr(config, name).weight = weight
    return config


def make_batch(shape=(2, 4, 8, 8), dtype=torch.float32, seed=0, cfa=BAYER, packed=True):
    """pred, batch with target/input in (0.05, 0.35), wb and matrix from the test camera."""
    generator = torch.Generator().manual_seed(seed)
    target = 0.05 + 0.3 * torch.rand(shape, generator=generator, dtype=dtype)
    pred = target + 0.05 * torch.rand(shape, generator=generator, dtype=dtype) + 0.01
    aligned = target + 0.1 * (torch.rand(shape, generator=generator, dtype=dtype) - 0.5)
    batch = {
        "target": target, "input": aligned, "cfa": torch.tensor(cfa), "packed": packed,
        "wb": torch.tensor([2.0, 1.0, 1.5], dtype=dtype), "cam_to_srgb": torch.tensor(CAM_TO_SRGB, dtype=dtype),
    }
    return pred, batch


def render(raw: torch.Tensor, batch: dict, packed: bool = True) -> torch.Tensor:
    """The reference render: unpack, then isp.render with the batch's metadata."""
    mosaic = unpack(raw, batch["cfa"]) if packed else raw
    return isp.pipeline.render(mosaic, batch["cfa"], batch["wb"], batch["cam_to_srgb"])


# ---------------------------------------------------------------------------- RAW terms


def test_l1_and_charbonnier_closed_forms():
    pred = torch.tensor([0.0, 0.003, -0.004, 0.5], dtype=torch.float64).view(1, 1, 2, 2)
    target = torch.zeros_like(pred)
    assert l1(pred, target).item() == pytest.approx((0.003 + 0.004 + 0.5) / 4, rel=1e-12)
    eps = 1e-3
    expected = (math.sqrt(eps**2) + math.sqrt(0.003**2 + eps**2) + math.sqrt(0.004**2 + eps**2) + math.sqrt(0.25 + eps**2)) / 4
    assert charbonnier(pred, target, eps).item() == pytest.approx(expected, rel=1e-12)
    assert charbonnier(target, target, 0.01).item() == pytest.approx(0.01, rel=1e-12)  # not offset by eps
    with pytest.raises(InputError, match="eps"):
        charbonnier(pred, target, 0.0)


ROBUST_CLOSED_FORMS = {
    2.0: lambda z: 0.5 * z,
    0.0: lambda z: np.log(0.5 * z + 1.0),
    1.0: lambda z: np.sqrt(z + 1.0) - 1.0,
    -2.0: lambda z: 2.0 * z / (z + 4.0),
    -math.inf: lambda z: 1.0 - np.exp(-0.5 * z),
}


@pytest.mark.parametrize("alpha", list(ROBUST_CLOSED_FORMS))
def test_robust_closed_forms(alpha):
    x = np.array([0.0, 0.001, -0.02, 0.05, 0.3])
    scale = 0.02
    pred = torch.tensor(x, dtype=torch.float64).view(1, 1, 1, -1)
    expected = ROBUST_CLOSED_FORMS[alpha]((x / scale) ** 2).mean()
    assert robust(pred, torch.zeros_like(pred), alpha, scale).item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("alpha", [0.5, 4.0, -7.0])
def test_robust_general_alpha_matches_barron_eq1(alpha):
    x = np.linspace(-0.2, 0.2, 21)
    scale = 0.05
    z = (x / scale) ** 2
    b = abs(alpha - 2.0)
    expected = (b / alpha * ((z / b + 1.0) ** (alpha / 2.0) - 1.0)).mean()
    pred = torch.tensor(x, dtype=torch.float64).view(1, 1, 1, -1)
    assert robust(pred, torch.zeros_like(pred), alpha, scale).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("limit,offset", [(2.0, 1e-6), (2.0, -1e-6), (2.0, 1e-9), (0.0, 1e-6), (0.0, -1e-6), (0.0, 1e-9)])
def test_robust_near_limits_is_stable(dtype, limit, offset):
    pred = torch.tensor([0.001, -0.01, 0.04, 0.2], dtype=dtype).view(1, 1, 1, -1).requires_grad_()
    target = torch.zeros_like(pred)
    near = robust(pred, target, limit + offset, 0.01)
    (grad_near,) = torch.autograd.grad(near, pred)
    exact = robust(pred, target, limit, 0.01)
    (grad_exact,) = torch.autograd.grad(exact, pred)
    rel = 2e-5 if dtype == torch.float32 else 1e-4  # float64: the true function moves by ~|offset| log(z/|offset|)
    assert near.item() == pytest.approx(exact.item(), rel=rel)
    assert torch.isfinite(grad_near).all()
    torch.testing.assert_close(grad_near, grad_exact, rtol=1e-4, atol=1e-6)


def _site_kernel(period: int, seed: int = 0) -> torch.Tensor:
    """A site-dependent (P,P,3,3) kernel with distinct positive taps (not energy preserving)."""
    generator = torch.Generator().manual_seed(seed)
    kernel = 0.05 * torch.rand(period, period, 3, 3, generator=generator, dtype=torch.float64)
    kernel[:, :, 1, 1] += 0.7
    return kernel


@pytest.mark.parametrize("cfa", [BAYER, XTRANS], ids=["bayer", "xtrans"])
def test_crosstalk_consistency_is_zero_for_the_model(cfa):
    period = len(cfa)
    kernel = _site_kernel(period)
    generator = torch.Generator().manual_seed(1)
    long = torch.rand(2, 1, 12, 12, generator=generator, dtype=torch.float64)
    aligned = apply_crosstalk(long, kernel)
    assert crosstalk_consistency(long, aligned, kernel).item() == pytest.approx(0.0, abs=1e-15)
    packed_long, packed_aligned = pack(long, torch.tensor(cfa)), pack(aligned, torch.tensor(cfa))
    assert crosstalk_consistency(packed_long, packed_aligned, kernel, cfa=torch.tensor(cfa), packed=True).item() == pytest.approx(0.0, abs=1e-15)
    # the aligned input is the measurement: a loss that also convolved it would not be zero here
    assert crosstalk_consistency(long, long, kernel).item() > 1e-3


def test_crosstalk_consistency_hand_computation():
    period, height, width = 2, 6, 6
    kernel = _site_kernel(period, seed=3)
    long = torch.zeros(1, 1, height, width, dtype=torch.float64)
    source = (2, 3)
    long[0, 0, source[0], source[1]] = 1.0
    aligned = torch.zeros_like(long)
    aligned[0, 0, 0, 0] = 0.5
    # y[i, j] = sum_d k[i % P, j % P, d] * x[(i, j) + d]; the delta at m gives y[m - d] = k[(m - d) % P, d]
    expected = torch.zeros(height, width, dtype=torch.float64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            i, j = source[0] - dy, source[1] - dx
            expected[i, j] = kernel[i % period, j % period, dy + 1, dx + 1]
    expected_loss = (expected - aligned[0, 0]).abs().sum().item() / (height * width)
    assert crosstalk_consistency(long, aligned, kernel).item() == pytest.approx(expected_loss, rel=1e-12)


def test_crosstalk_consistency_checks_inputs():
    kernel = uniform_kernel(6, 0.02)
    mosaic = torch.rand(1, 1, 12, 12)
    with pytest.raises(InputError, match="period"):
        crosstalk_consistency(mosaic, mosaic, kernel, cfa=torch.tensor(BAYER))
    with pytest.raises(InputError, match="cfa"):
        crosstalk_consistency(pack(mosaic, torch.tensor(XTRANS)), pack(mosaic, torch.tensor(XTRANS)), kernel, packed=True)
    with pytest.raises(InputError, match=r"\(B,1,H,W\)"):
        crosstalk_consistency(torch.rand(1, 4, 6, 6), torch.rand(1, 4, 6, 6), uniform_kernel(2, 0.02))


# --------------------------------------------------------------------------- sRGB terms


def test_laplacian_edge_on_known_images():
    delta = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    delta[:, :, 2, 2] = 1.0
    # valid 3x3 region of the filtered delta: -4 at the centre, 1 at its four edge neighbours
    assert laplacian_edge(delta, torch.zeros_like(delta)).item() == pytest.approx(8.0 / 9.0, rel=1e-12)
    rows, cols = torch.meshgrid(torch.arange(7, dtype=torch.float64), torch.arange(9, dtype=torch.float64), indexing="ij")
    ramp = (0.125 * rows + 0.0625 * cols).expand(1, 3, 7, 9)
    assert laplacian_edge(ramp, torch.zeros_like(ramp)).item() == pytest.approx(0.0, abs=1e-12)
    quadratic = (0.01 * cols**2).expand(1, 3, 7, 9)  # second difference 0.02 everywhere
    assert laplacian_edge(quadratic, torch.zeros_like(quadratic)).item() == pytest.approx(0.02, rel=1e-9)


def test_color_angle_values_and_gradients():
    def pixels(*rgb):
        return torch.tensor(rgb, dtype=torch.float64).T.reshape(1, 3, 1, len(rgb))

    assert color_angle(pixels((1, 0, 0)), pixels((0, 1, 0))).item() == pytest.approx(math.pi / 2, rel=1e-12)
    assert color_angle(pixels((1, 1, 0)), pixels((1, 0, 0))).item() == pytest.approx(math.pi / 4, rel=1e-12)
    assert color_angle(pixels((0.2, 0.3, 0.4)), pixels((0.4, 0.6, 0.8))).item() == pytest.approx(0.0, abs=1e-12)
    assert color_angle(pixels((1, 0, 0), (0, 0, 0)), pixels((0, 0, 1), (0, 1, 0))).item() == pytest.approx(math.pi / 4, rel=1e-12)
    pred = pixels((0, 0, 0), (0.2, 0.3, 0.4), (1e-9, 0, 0)).requires_grad_()
    target = pixels((0.1, 0.2, 0.3), (0.2, 0.3, 0.4), (0, 0, 0))
    (gradient,) = torch.autograd.grad(color_angle(pred, target), pred)
    assert torch.isfinite(gradient).all()
    generator = torch.Generator().manual_seed(0)
    random_pred = torch.rand(1, 3, 3, 3, generator=generator, dtype=torch.float64).requires_grad_()
    random_target = torch.rand(1, 3, 3, 3, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: color_angle(p, random_target), (random_pred,))


def test_delta_e00_matches_colour_science():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 6, 5, generator=generator, dtype=torch.float64)
    target = torch.rand(2, 3, 6, 5, generator=generator, dtype=torch.float64)
    lab_pred = srgb_to_lab(pred).permute(0, 2, 3, 1).numpy()
    lab_target = srgb_to_lab(target).permute(0, 2, 3, 1).numpy()
    expected = colour.delta_E(lab_pred, lab_target, method="CIE 2000").mean()
    assert delta_e00(pred, target).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_loss_matches_scikit_image():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 24, 20, generator=generator, dtype=torch.float64)
    pred = (target + 0.1 * torch.randn(target.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    reference = structural_similarity(
        pred[0].permute(1, 2, 0).numpy(), target[0].permute(1, 2, 0).numpy(), channel_axis=2, data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    assert ssim_loss(pred, target).item() == pytest.approx(1.0 - reference, rel=1e-6)
    with pytest.raises(InputError, match="11x11"):
        ssim_loss(pred[..., :10, :10], target[..., :10, :10])


def test_ms_ssim_needs_five_scales_or_falls_back():
    generator = torch.Generator().manual_seed(0)
    big = torch.rand(1, 3, MS_SSIM_MIN_SIZE, MS_SSIM_MIN_SIZE + 3, generator=generator)
    other = (big + 0.05 * torch.randn(big.shape, generator=generator)).clamp(0, 1)
    expected = 1.0 - pytorch_msssim.ms_ssim(other, big, data_range=1.0).item()
    assert ms_ssim_loss(other, big).item() == pytest.approx(expected, rel=1e-6)
    small, small_other = big[..., :64, :64], other[..., :64, :64]
    with pytest.raises(InputError, match=f"at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE}"):
        ms_ssim_loss(small_other, small)
    assert ms_ssim_loss(small_other, small, fallback=True).item() == pytest.approx(ssim_loss(small_other, small).item(), rel=1e-7)


def _vgg_reference(features, pred, target, stops, criterion):
    """Hand-built torchvision computation: sum over taps of mean |phi(pred) - phi(target)| (or squared)."""
    total = 0.0
    with torch.no_grad():
        for stop in stops:
            phi_pred = features[:stop]((pred - IMAGENET_MEAN) / IMAGENET_STD)
            phi_target = features[:stop]((target - IMAGENET_MEAN) / IMAGENET_STD)
            difference = phi_pred - phi_target
            total += (difference.abs().mean() if criterion == "l1" else (difference**2).mean()).item()
    return total


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_perceptual_matches_torchvision(vgg19_file, criterion):
    path, reference_features = vgg19_file
    loss = PerceptualLoss.from_pretrained("vgg19", path, criterion=criterion)  # relu3_3 + relu4_3
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=generator)
    pred = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    expected = _vgg_reference(reference_features, pred, target, stops=(16, 25), criterion=criterion)
    assert loss(pred, target).item() == pytest.approx(expected, rel=1e-5)
    assert loss.indices == [15, 24]


def test_perceptual_spectroformer_slice_and_frozen_backbone(vgg19_file):
    path, reference_features = vgg19_file
    loss = PerceptualLoss.from_pretrained("vgg19", path, layers=["features[:35]"])
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 32, 32, generator=generator)
    pred = torch.rand(1, 3, 32, 32, generator=generator)
    # features[:35] ends with conv5_4 before its ReLU; an in-place ReLU must not overwrite the tap
    expected = _vgg_reference(reference_features, pred, target, stops=(35,), criterion="l1")
    relu5_4 = _vgg_reference(reference_features, pred, target, stops=(36,), criterion="l1")
    assert loss(pred, target).item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - relu5_4) > 1e-3 * expected
    assert PerceptualLoss.from_pretrained("vgg19", path, layers=["conv5_4"]).indices == [34]
    assert len(loss.features) == 35
    loss.train()
    assert not loss.features.training and all(not p.requires_grad for p in loss.parameters())
    pred.requires_grad_()
    loss(pred, target).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_lpips_loss_is_the_lpips_package(empty_hub):
    loss = LPIPSLoss.from_pretrained("alex", allow_random=True)
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 64, 64, generator=generator)
    pred = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        direct = loss.net(pred * 2 - 1, target * 2 - 1).mean().item()
        value = loss(pred, target).item()
    assert value == pytest.approx(direct, rel=1e-6)
    assert value == pytest.approx(lpips_metric(pred, target, loss.net).mean().item(), rel=1e-6)


# -------------------------------------------------------------------------------- stack


def test_registry_is_a_plain_dict_of_modules():
    assert type(LOSSES) is dict
    assert set(LOSSES) == set(LossConfig().terms())
    assert {cls.domain for cls in LOSSES.values()} == {"raw", "mosaic", "srgb"}


def test_missing_weights_fail_when_the_stack_is_built(empty_hub):
    config = LossConfig()  # defaults: perceptual and LPIPS on
    with pytest.raises(WeightsError) as error:
        LossStack(config, total_steps=100, cfa_period=2)
    message = str(error.value)
    assert "\n" not in message and VGG19_FILE in message and "drop_missing_pretrained" in message


def test_drop_missing_pretrained_leaves_terms_out_with_one_line(empty_hub, caplog):
    config = LossConfig(drop_missing_pretrained=True)
    with caplog.at_level(logging.INFO):
        stack = LossStack(config, total_steps=100, cfa_period=2)
    lines = [r for r in caplog.records if r.name == "rawrestore.losses"]
    assert len(lines) == 1 and "perceptual" in lines[0].getMessage() and "lpips" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    assert stack.dropped == ["perceptual", "lpips"]
    assert stack.term_names == ("raw_l1", "crosstalk", "delta_e00", "ssim")
    pred, batch = make_batch(shape=(1, 4, 8, 8))
    total, values = stack(pred, batch, step=0)
    report = stack.report(values, 0, total)
    assert set(report) == {"raw_l1", "raw_l1/weight", "crosstalk", "crosstalk/weight", "delta_e00", "delta_e00/weight",
                           "ssim", "ssim/weight", "total"}


def test_inactive_pretrained_terms_are_never_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a backbone was loaded for a term with weight 0")

    monkeypatch.setattr("rawrestore.pretrained.load_features", refuse)
    monkeypatch.setattr("rawrestore.pretrained.build_lpips", refuse)
    stack = LossStack(loss_config(raw_l1=1.0, ssim=0.05), total_steps=10)
    assert set(stack.terms) == {"raw_l1", "ssim"}


def test_isp_runs_exactly_twice_per_forward(monkeypatch):
    calls = []
    original = isp.pipeline.render

    def counting(raw, *args, **kwargs):
        calls.append(raw.requires_grad)
        return original(raw, *args, **kwargs)

    monkeypatch.setattr(isp.pipeline, "render", counting)
    stack = LossStack(loss_config(raw_l1=1.0, delta_e00=0.02, ssim=0.05, edge=0.1, color_angle=0.1), total_steps=10)
    pred, batch = make_batch(shape=(1, 4, 8, 8))
    pred.requires_grad_()
    stack(pred, batch, step=0)
    assert calls == [True, False]  # the prediction (with a graph), then the target
    assert stack.renders_last_step == 2
    stack(pred, batch, step=1)
    assert len(calls) == 4 and stack.render_count == 4
    raw_only = LossStack(loss_config(raw_l1=1.0, crosstalk=0.1), total_steps=10)
    raw_only(pred, batch, step=0)
    assert raw_only.renders_last_step == 0 and len(calls) == 4


def test_report_holds_each_term_and_its_weight():
    config = loss_config(raw_l1=1.0, charbonnier=0.5, robust=0.25, crosstalk=0.1, delta_e00=0.02, ssim=0.05, edge=0.3,
                         color_angle=0.2)
    stack = LossStack(config, total_steps=100, cfa_period=2)
    pred, batch = make_batch(shape=(2, 4, 8, 8), dtype=torch.float64)
    stack = stack.double()
    total, values = stack(pred, batch, step=10)
    report = stack.report(values, 10, total)
    pred_srgb, target_srgb = render(pred, batch), render(batch["target"], batch)
    kernel = uniform_kernel(2, 0.02).double()  # config kernels are float32, like every kernel build_kernel makes
    expected = {
        "raw_l1": l1(pred, batch["target"]),
        "charbonnier": charbonnier(pred, batch["target"], 1e-3),
        "robust": robust(pred, batch["target"], 1.0, 0.01),
        "crosstalk": crosstalk_consistency(unpack(pred, batch["cfa"]), unpack(batch["input"], batch["cfa"]), kernel),
        "delta_e00": delta_e00(pred_srgb, target_srgb),
        "ssim": ssim_loss(pred_srgb, target_srgb),
        "edge": laplacian_edge(pred_srgb, target_srgb),
        "color_angle": color_angle(pred_srgb, target_srgb),
    }
    weights = {"raw_l1": 1.0, "charbonnier": 0.5, "robust": 0.25, "crosstalk": 0.1, "ssim": 0.05,
               "delta_e00": 0.002,  # the default's staged ramp: 0.002 until 70% of the run
               "edge": 0.3, "color_angle": 0.2}
    for name, value in expected.items():
        assert report[name] == pytest.approx(value.item(), rel=1e-10), name
        assert report[f"{name}/weight"] == weights[name]
    expected_total = sum(weights[n] * v.item() for n, v in expected.items())
    assert report["total"] == pytest.approx(expected_total, rel=1e-10)
    assert total.item() == pytest.approx(expected_total, rel=1e-10)
    assert all(isinstance(v, float) for v in report.values())


def test_perceptual_schedule_and_checkpoint_state(vgg19_file):
    path, _ = vgg19_file
    config = loss_config(raw_l1=1.0, perceptual=0.02)  # linear 0.02 -> 0.10 over the last 30%
    config.perceptual.weights = str(path)
    config.weighting = "fixed"
    stack = LossStack(config, total_steps=100, cfa_period=2)
    pred, batch = make_batch(shape=(1, 4, 16, 16))
    weights = [stack.report(stack(pred, batch, step)[1], step)["perceptual/weight"] for step in (0, 70, 85, 100)]
    assert weights == pytest.approx([0.02, 0.02, 0.06, 0.10], rel=1e-12)
    assert stack.state_dict() == {}  # fixed weights; the frozen VGG is reloaded from its file, not checkpointed
    config.weighting = "uncertainty"
    learnt = LossStack(config, total_steps=100, cfa_period=2)
    state = learnt.state_dict()
    assert sorted(state) == ["weighting.log_sigma.perceptual", "weighting.log_sigma.raw_l1"]
    assert len(learnt.trainable_parameters()) == 2
    with torch.no_grad():
        state["weighting.log_sigma.raw_l1"].fill_(0.25)
    fresh = LossStack(config, total_steps=100, cfa_period=2)
    fresh.load_state_dict(state, strict=True)
    assert fresh.weighting.log_sigma["raw_l1"].item() == 0.25
    total, values = fresh(pred, batch, step=0)
    report = fresh.report(values, 0, total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in fresh.trainable_parameters())
    assert report["raw_l1/weight"] == pytest.approx(0.5 * math.exp(-0.5), rel=1e-6)


def test_xtrans_packed_prediction():
    stack = LossStack(loss_config(raw_l1=1.0, crosstalk=0.1, ssim=0.05), total_steps=10)  # period from the batch
    pred, batch = make_batch(shape=(1, 9, 8, 8), cfa=XTRANS)
    total, values = stack(pred, batch, step=0)
    report = stack.report(values, 0, total)
    cfa = batch["cfa"]
    expected = crosstalk_consistency(unpack(pred, cfa), unpack(batch["input"], cfa), uniform_kernel(6, 0.02))
    assert report["crosstalk"] == pytest.approx(expected.item(), rel=1e-6)
    assert stack.terms["crosstalk"].period == 6
    with pytest.raises(InputError, match="period"):
        stack(*make_batch(shape=(1, 4, 12, 12)), step=1)


def test_stack_validates_the_batch():
    stack = LossStack(loss_config(raw_l1=1.0), total_steps=10)
    pred, batch = make_batch()
    del batch["wb"]
    with pytest.raises(InputError, match="wb"):
        stack(pred, batch, step=0)
    pred, batch = make_batch()
    with pytest.raises(InputError, match="equal"):
        stack(pred[:, :, :4], batch, step=0)


def test_gradcheck_whole_stack(empty_hub):
    config = loss_config(raw_l1=1.0, charbonnier=0.5, robust=0.3, crosstalk=0.1, perceptual=0.02, delta_e00=0.02,
                         ssim=0.05, edge=0.1, color_angle=0.1)
    config.perceptual.layers = ["relu1_2", "conv1_2"]  # a tiny trunk (two convolutions) keeps the full check fast
    stack = LossStack(config, total_steps=100, cfa_period=2, allow_random_backbones=True).double()
    assert stack.random_backbones == ["perceptual"]
    pred, batch = make_batch(shape=(1, 4, 6, 6), dtype=torch.float64, seed=3)  # 12x12 mosaic, 12x12 renders
    pred.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: stack(p, batch, step=90)[0], (pred,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_finite_gradients_at_zero_inputs(empty_hub):
    config = LossConfig()  # every default term, LPIPS and VGG included (random trunks below)
    config.edge.weight = config.color_angle.weight = config.charbonnier.weight = config.robust.weight = 0.1
    stack = LossStack(config, total_steps=10, cfa_period=2, allow_random_backbones=True)
    zeros = torch.zeros(1, 4, 32, 32)
    for target in (zeros, torch.full_like(zeros, 0.2)):
        pred = torch.zeros_like(zeros, requires_grad=True)
        batch = make_batch(shape=zeros.shape)[1] | {"target": target, "input": torch.zeros_like(zeros)}
        total, values = stack(pred, batch, step=5)
        report = stack.report(values, 5, total)
        total.backward()
        assert math.isfinite(report["total"]) and torch.isfinite(pred.grad).all()


def test_backbones_in_bf16_agree_with_float32(empty_hub):
    config = loss_config(raw_l1=1.0, perceptual=0.02, lpips=0.02)
    config.perceptual.layers = ["relu1_2", "relu2_2"]
    stack = LossStack(config, total_steps=10, cfa_period=2, allow_random_backbones=True)
    pred, batch = make_batch(shape=(2, 4, 32, 32), seed=5)
    full, values = stack(pred, batch, step=5)
    report_full = stack.report(values, 5, full)
    stack.backbone_dtype = torch.bfloat16
    pred_amp = pred.detach().clone().requires_grad_()
    mixed, values = stack(pred_amp, batch, step=5)
    report_mixed = stack.report(values, 5, mixed)
    assert mixed.dtype == torch.float32
    for name in ("perceptual", "lpips"):
        assert report_mixed[name] == pytest.approx(report_full[name], rel=0.03)
        assert report_mixed[name] != report_full[name]  # bf16 really ran
    assert report_mixed["raw_l1"] == report_full["raw_l1"]  # the RAW terms stay in float32
    mixed.backward()
    assert torch.isfinite(pred_amp.grad).all() and float(pred_amp.grad.abs().sum()) > 0


def test_psnr_term_is_minus_the_mean_per_image_psnr_of_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    from rawrestore.losses import neg_psnr

    generator = torch.Generator().manual_seed(4)
    target = torch.rand(3, 3, 16, 16, generator=generator, dtype=torch.float64)
    noise = torch.tensor([0.01, 0.05, 0.2], dtype=torch.float64).view(3, 1, 1, 1)
    pred = (target + noise * torch.randn(target.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    reference = [peak_signal_noise_ratio(t.numpy(), p.numpy(), data_range=1.0) for p, t in zip(pred, target)]
    value = neg_psnr(pred, target)
    assert value.item() == pytest.approx(-float(np.mean(reference)), abs=5e-4)  # the 1e-8 MSE floor moves it by < 2e-4 dB
    # each image's gradient is its squared-error gradient scaled by 1/MSE: the clean image is not drowned out
    pred.requires_grad_()
    neg_psnr(pred, target).backward()
    mse = ((pred - target) ** 2).flatten(1).mean(dim=1).detach()
    for i in range(3):
        expected = 10 / math.log(10) / 3 * 2 * (pred[i] - target[i]).detach() / (pred[i].numel() * (mse[i] + 1e-8))
        torch.testing.assert_close(pred.grad[i], expected, rtol=1e-6, atol=1e-9)
    identical = torch.zeros(1, 3, 8, 8, requires_grad=True)
    out = neg_psnr(identical, identical.detach())
    out.backward()
    assert out.item() == pytest.approx(-80.0) and torch.isfinite(identical.grad).all()


def test_backbone_window_puts_vgg_and_lpips_on_a_step_placed_window(empty_hub):
    """loss.backbone_window < 1: VGG and LPIPS see the same window of both renders, placed by the step; the rest all of it."""
    from rawrestore.config.loader import from_dict
    from rawrestore.errors import ConfigError
    from rawrestore.losses.stack import render_window

    config = loss_config(raw_l1=1.0, perceptual=0.02, lpips=0.02, ssim=0.05)
    config.perceptual.layers = ["relu1_2", "relu2_2"]
    config.backbone_window = 0.5
    stack = LossStack(config, total_steps=10, cfa_period=2, allow_random_backbones=True)
    pred, batch = make_batch(shape=(2, 4, 32, 32), seed=6)
    _, values = stack(pred, batch, step=7)
    report = stack.report(values, 7, _)
    pred_srgb = stack.render(unpack(pred, batch["cfa"]), batch)
    target_srgb = stack.render(unpack(batch["target"], batch["cfa"]), batch)
    a, b = render_window(pred_srgb, target_srgb, 0.5, step=7)
    assert a.shape == b.shape == (2, 3, 32, 32)  # half of the 64x64 renders' sides
    for name in ("perceptual", "lpips"):
        assert report[name] == pytest.approx(float(stack.terms[name](a, b)), rel=1e-6)
    assert report["ssim"] == pytest.approx(float(stack.terms["ssim"](pred_srgb, target_srgb)), rel=1e-6)
    # same window for both renders, fixed by the step (a resumed run sees the same), moving between steps
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8)
    first, second = render_window(x, x + 100, 0.5, step=3)
    assert torch.equal(second - first, torch.full_like(first, 100.0))
    assert torch.equal(render_window(x, x, 0.5, 3)[0], first)
    corners = {float(render_window(x, x, 0.5, step)[0][0, 0, 0, 0]) for step in range(40)}
    assert len(corners) > 5
    with pytest.raises(ConfigError, match="loss.backbone_window"):
        from_dict({"loss": {"backbone_window": 0.0}})


@pytest.mark.parametrize("packed", [True, False])
def test_stack_renders_a_mixed_cfa_batch_per_sample(packed):
    """RGGB and BGGR samples in one batch: the sRGB terms see each sample rendered with its own CFA."""
    cfa = torch.tensor([[[0, 1], [1, 2]], [[2, 1], [1, 0]]])
    pred, batch = make_batch(shape=(2, 4, 8, 8), seed=7, packed=packed)
    pred_mosaic = torch.cat([unpack(pred[i:i + 1], cfa[i]) for i in range(2)])
    target_mosaic = torch.cat([unpack(batch["target"][i:i + 1], cfa[i]) for i in range(2)])
    if not packed:
        pred, batch["target"], batch["input"] = pred_mosaic, target_mosaic, target_mosaic
    batch["cfa"] = cfa
    stack = LossStack(loss_config(delta_e00=1.0), total_steps=10)
    _, values = stack(pred, batch, step=0)
    renders = [isp.pipeline.render(m[i:i + 1], cfa[i], batch["wb"], batch["cam_to_srgb"])
               for m in (pred_mosaic, target_mosaic) for i in range(2)]
    expected = delta_e00(torch.cat(renders[:2]), torch.cat(renders[2:]))
    assert values["delta_e00"].item() == pytest.approx(expected.item(), rel=1e-6)
