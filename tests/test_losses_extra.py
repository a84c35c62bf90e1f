"""Issue 16 loss terms: layer-weight order, the S3Net preset, Gram, Sobel-edge and blurred-colour losses.

Values are checked against independent computations (explicit matrix products in numpy,
scipy.ndimage.sobel, scipy.ndimage.gaussian_filter); VGG weights are not available here, so the
VGG terms run on a tiny random backbone with VGG's layout (conv/ReLU blocks ending in max-pools).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from rawrestore.config import load_config
from rawrestore.config.schema import PERCEPTUAL_PRESETS, LossConfig
from rawrestore.errors import ConfigError, WeightsError
from rawrestore.losses import LOSSES, GramLoss, LossStack, PerceptualLoss, blur_color, gram_loss, perceptual, sobel_edge
from rawrestore.losses.perceptual import IMAGENET_MEAN, IMAGENET_STD, layer_indices
from tests.test_losses import loss_config, make_batch, render

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def tiny_vgg(seed: int = 0) -> nn.Sequential:
    """A VGG-shaped features stack: blocks of (conv, ReLU) x n and a max-pool, 3 -> 4 -> 6 -> 8 channels."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 3
    for width, convs in ((4, 2), (6, 2), (8, 1)):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers).double()


def numpy_features(features: nn.Sequential, image: torch.Tensor, index: int) -> np.ndarray:
    """Activations after features[index] of the ImageNet-normalised image, float64 numpy (B,C,H,W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(1, 3, 1, 1)
    x = (image - mean) / std
    with torch.no_grad():
        for layer in list(features)[: index + 1]:
            x = nn.functional.relu(x) if isinstance(layer, nn.ReLU) else layer(x)
    return x.numpy()


def renders(seed: int, size: int = 16, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, size, size, generator=generator, dtype=torch.float64)
    pred = (target + 0.15 * torch.randn(target.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return pred, target


# ------------------------------------------------------------------------- layer weight order


def test_layer_weights_follow_the_configured_order():
    features = tiny_vgg()
    pred, target = renders(0)
    deep, shallow = layer_indices(features, ["relu2_1", "relu1_2"])
    assert deep > shallow  # listed deepest first: VGG's own order is the reverse
    only_deep = float(np.abs(numpy_features(features, pred, deep) - numpy_features(features, target, deep)).mean())
    only_shallow = float(np.abs(numpy_features(features, pred, shallow) - numpy_features(features, target, shallow)).mean())
    assert abs(only_deep - only_shallow) > 0.01 * only_deep
    for layers, layer_weights, expected in (
        (["relu2_1", "relu1_2"], [1.0, 0.0], only_deep),
        (["relu1_2", "relu2_1"], [0.0, 1.0], only_deep),
        (["relu2_1", "relu1_2"], [0.25, 2.0], 0.25 * only_deep + 2.0 * only_shallow),
        (["relu1_2", "relu2_1"], [2.0, 0.25], 0.25 * only_deep + 2.0 * only_shallow),
    ):
        loss = PerceptualLoss(features, layers=layers, layer_weights=layer_weights)
        assert loss(pred, target).item() == pytest.approx(expected, rel=1e-10)
        assert perceptual(pred, target, features, layer_indices(features, layers), "l1", layer_weights).item() == \
            pytest.approx(expected, rel=1e-10)


def test_s3net_preset_sets_relu_x_1_with_s3net_weights():
    assert PERCEPTUAL_PRESETS["s3net"] == (("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
                                           (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0))
    config = load_config(CONFIGS_DIR / "demo.yaml", ["loss.perceptual.preset=s3net", "loss.perceptual.weight=0.1"])
    assert config.loss.perceptual.tapped_layers() == (["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"],
                                                       [0.03125, 0.0625, 0.125, 0.25, 1.0])
    stack = LossStack(config.loss, total_steps=10, cfa_period=2, allow_random_backbones=True)
    term = stack.terms["perceptual"]
    assert term.indices == [1, 6, 11, 20, 29]  # VGG-19's relu1_1 ... relu5_1
    assert term.layer_weights == (0.03125, 0.0625, 0.125, 0.25, 1.0)
    with pytest.raises(ConfigError, match="loss.perceptual.preset"):
        load_config(CONFIGS_DIR / "demo.yaml", ["loss.perceptual.preset=s3net", "loss.perceptual.layer_weights=[1, 2]"])
    with pytest.raises(ConfigError, match="loss.perceptual.preset"):
        load_config(CONFIGS_DIR / "demo.yaml", ["loss.perceptual.preset=s3nett"])


# ------------------------------------------------------------------------------------- Gram


def test_gram_loss_is_the_explicit_matrix_product():
    features = tiny_vgg(1)
    pred, target = renders(1)
    layers, layer_weights = ["relu2_2", "relu1_1", "relu3_1"], [0.5, 2.0, 1.5]
    expected = 0.0
    for index, weight in zip(layer_indices(features, layers), layer_weights):
        grams = []
        for image in (pred, target):
            phi = numpy_features(features, image, index)
            b, c, h, w = phi.shape
            flat = phi.reshape(b, c, h * w)
            grams.append(np.matmul(flat, flat.transpose(0, 2, 1)) / (c * h * w))
        expected += weight * np.abs(grams[0] - grams[1]).mean()
    loss = GramLoss(features, layers=layers, layer_weights=layer_weights)
    assert loss(pred, target).item() == pytest.approx(expected, rel=1e-10)
    squared = gram_loss(pred, target, loss.features, loss.layer_indices, "l2", layer_weights).item()
    assert squared != pytest.approx(expected, rel=1e-3)  # the criterion matters
    assert loss(target, target).item() == 0.0


# ------------------------------------------------------------------------------ Sobel, blur


def test_sobel_edge_matches_scipy_sobel_with_the_target_edge_mask():
    pred, target = renders(2, size=20)
    threshold, background = 0.8, 0.25

    def magnitude(image: np.ndarray) -> np.ndarray:
        return np.hypot(ndimage.sobel(image, axis=-1), ndimage.sobel(image, axis=-2))[..., 1:-1, 1:-1]

    mag_pred = np.stack([[magnitude(channel) for channel in image] for image in pred.numpy()])
    mag_target = np.stack([[magnitude(channel) for channel in image] for image in target.numpy()])
    mask = np.where(mag_target > threshold, 1.0, background)
    assert 0.2 < (mask == 1).mean() < 0.8  # both kinds of pixel are present
    expected = (mask * np.abs(mag_pred - mag_target)).mean()
    assert sobel_edge(pred, target, threshold, background).item() == pytest.approx(expected, rel=1e-10)
    unmasked = np.abs(mag_pred - mag_target).mean()
    assert sobel_edge(pred, target, threshold, 1.0).item() == pytest.approx(unmasked, rel=1e-10)


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_blur_color_matches_scipy_gaussian_filter(criterion):
    pred, target = renders(3, size=24)
    sigma = 2.5
    blur = [ndimage.gaussian_filter(image.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=4.0)
            for image in (pred, target)]
    difference = blur[0] - blur[1]
    expected = np.abs(difference).mean() if criterion == "l1" else (difference**2).mean()
    assert blur_color(pred, target, sigma, criterion).item() == pytest.approx(expected, rel=1e-10)
    sharp = np.abs(pred.numpy() - target.numpy()).mean()
    assert blur_color(pred, target, sigma, "l1").item() < 0.5 * sharp  # the blur really removes the noise


def test_gradients_of_the_new_terms_are_right_and_finite():
    features = tiny_vgg(2)
    pred, target = renders(4, size=8, batch=1)
    pred.requires_grad_()
    checks = {
        "gram": lambda p: gram_loss(p, target, features, layer_indices(features, ["relu1_2", "relu2_1"]), "l2", [1.0, 3.0]),
        "sobel_edge": lambda p: sobel_edge(p, target, 0.5, 0.2),
        "blur_color": lambda p: blur_color(p, target, 1.0, "l2"),
    }
    for name, function in checks.items():
        assert torch.autograd.gradcheck(function, (pred,), eps=1e-6, atol=1e-7, rtol=1e-4), name
    flat = torch.full((1, 3, 8, 8), 0.3, dtype=torch.float64, requires_grad=True)  # zero gradients: sqrt at 0
    for name, function in checks.items():
        function(flat).backward()
        assert torch.isfinite(flat.grad).all(), name


def test_stack_runs_the_new_terms_on_its_two_renders():
    config = loss_config(raw_l1=1.0, sobel_edge=0.5, blur_color=2.0, gram=0.1)
    config.sobel_edge.threshold, config.blur_color.sigma, config.blur_color.criterion = 0.3, 1.5, "l1"
    config.gram.layers, config.gram.layer_weights = ["relu1_2", "relu1_1"], [1.0, 0.5]
    assert LossConfig().gram.weight == LossConfig().sobel_edge.weight == LossConfig().blur_color.weight == 0.0
    assert {"gram", "sobel_edge", "blur_color"} <= set(LOSSES)
    stack = LossStack(config, total_steps=10, cfa_period=2, allow_random_backbones=True)
    assert stack.random_backbones == ["gram"]
    pred, batch = make_batch(shape=(2, 4, 12, 12), seed=11)
    total, values = stack(pred, batch, step=0)
    pred_srgb, target_srgb = render(pred, batch), render(batch["target"], batch)
    gram = stack.terms["gram"]
    expected = {
        "sobel_edge": sobel_edge(pred_srgb, target_srgb, 0.3, 0.0),
        "blur_color": blur_color(pred_srgb, target_srgb, 1.5, "l1"),
        "gram": gram_loss(pred_srgb, target_srgb, gram.features, gram.layer_indices, "l1", [1.0, 0.5]),
    }
    for name, value in expected.items():
        assert values[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert gram.layer_indices == [3, 1]
    weighted = values["raw_l1"] + 0.5 * values["sobel_edge"] + 2.0 * values["blur_color"] + 0.1 * values["gram"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_missing_vgg_weights_name_the_gram_key(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    with pytest.raises(WeightsError, match=r"loss\.gram\.weights=PATH"):
        GramLoss.from_pretrained("vgg19")
