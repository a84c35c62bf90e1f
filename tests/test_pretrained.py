"""rawrestore.pretrained: offline weights lookup, and LPIPS identical to the lpips package's own."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lpips as lpips_package
import pytest
import torch
import torchvision

from rawrestore.errors import WeightsError
from rawrestore.metrics import lpips as lpips_metric
from rawrestore.pretrained import (
    build_lpips,
    load_alexnet_features,
    load_vgg19_features,
    weights_path,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
VGG19_FILE = "vgg19-dcbb9e9d.pth"


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    """A seeded AlexNet stored twice: full file in a fake torch hub cache, features-only small file."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1234)
    state = torchvision.models.alexnet(weights=None).state_dict()
    hub_dir = root / "hub"
    (hub_dir / "checkpoints").mkdir(parents=True)
    full_file = hub_dir / "checkpoints" / ALEXNET_FILE
    torch.save(state, full_file)
    small_file = root / "alexnet_features.pth"
    torch.save({key: value for key, value in state.items() if key.startswith("features.")}, small_file)
    yield {"hub_dir": hub_dir, "small_file": small_file, "state": state}
    full_file.unlink()  # 233 MB; do not leave it in pytest's retained tmp dirs


@pytest.fixture()
def fake_hub(alexnet_weights, monkeypatch):
    """Point torch.hub (and thus torchvision's weight cache) at the fake cache for one test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(alexnet_weights["hub_dir"]))
    return alexnet_weights


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch):
    """A torch hub directory without any weights."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    return tmp_path / "empty_hub"


def _reference_lpips() -> torch.nn.Module:
    """lpips.LPIPS(net='alex') built by the package itself: torchvision loads the trunk from the hub cache."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips_package.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False)


def _images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches in [0,1]. -> (3,3,64,48) each."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.rand(3, 3, 64, 48, generator=generator)
    return first, (first + 0.2 * torch.randn(first.shape, generator=generator)).clamp(0, 1)


# --- LPIPS identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["explicit_path", "hub_cache"])
def test_build_lpips_is_identical_to_the_package(fake_hub, source):
    reference = _reference_lpips()
    # The reference really carries our seeded trunk (torchvision read the fake cache).
    torch.testing.assert_close(reference.net.slice1[0].weight, fake_hub["state"]["features.0.weight"], atol=0, rtol=0)
    model = build_lpips("alex", weights_path=fake_hub["small_file"] if source == "explicit_path" else None)
    reference_state, state = reference.state_dict(), model.state_dict()
    assert reference_state.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(state[key], reference_state[key], atol=0, rtol=0, msg=key)
    pred, target = _images(0)
    with torch.no_grad():
        expected = reference(pred * 2 - 1, target * 2 - 1).flatten()
        got = model(pred * 2 - 1, target * 2 - 1).flatten()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got.min().item() > 0  # a real distance between different images


def test_build_lpips_is_frozen_and_in_eval_mode(fake_hub):
    model = build_lpips("alex", weights_path=fake_hub["small_file"])
    assert not model.training and all(not module.training for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.parameters())
    # Frozen weights, but the distance still differentiates w.r.t. the images (usable as a loss).
    pred, target = _images(1)
    pred.requires_grad_(True)
    lpips_metric(pred, target, model).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_lpips_metric_on_device(fake_hub, device):
    model = build_lpips("alex", weights_path=fake_hub["small_file"]).to(device)
    pred, target = _images(2)
    with torch.no_grad():
        got = lpips_metric(pred.to(device), target.to(device), model)
        expected = _reference_lpips()(pred, target, normalize=True).flatten().double()
    assert got.device.type == device and got.shape == (3,)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=0)


# --- Backbone loaders --------------------------------------------------------------------------


def test_load_alexnet_features_matches_torchvision(fake_hub):
    features = load_alexnet_features()
    reference = torchvision.models.alexnet(weights=None)
    reference.load_state_dict(fake_hub["state"])
    reference.eval()
    image = torch.rand(2, 3, 67, 67)
    with torch.no_grad():
        torch.testing.assert_close(features(image), reference.features(image), atol=0, rtol=0)
    assert not features.training and not any(p.requires_grad for p in features.parameters())


def test_load_vgg19_features_from_explicit_path(tmp_path, empty_hub):
    generator = torch.Generator().manual_seed(19)
    with torch.device("meta"):
        skeleton = torchvision.models.vgg19(weights=None).features
    state = {f"features.{k}": torch.randn(v.shape, generator=generator) * 0.05 for k, v in skeleton.state_dict().items()}
    path = tmp_path / "vgg19_features.pth"
    torch.save(state, path)
    features = load_vgg19_features(path)
    path.unlink()  # 80 MB; do not leave it in pytest's retained tmp dirs
    assert len(features) == 37  # 16 conv + 16 ReLU + 5 max-pool: VGG-19, not VGG-16
    for key, value in features.state_dict().items():
        torch.testing.assert_close(value, state[f"features.{key}"], atol=0, rtol=0)
    assert not any(p.requires_grad for p in features.parameters())


# --- Missing or wrong weights ------------------------------------------------------------------


@pytest.mark.parametrize(
    "loader, filename",
    [(load_alexnet_features, ALEXNET_FILE), (load_vgg19_features, VGG19_FILE)],
)
def test_missing_cache_file_names_the_file_and_the_fix(empty_hub, loader, filename):
    with pytest.raises(WeightsError) as raised:
        loader()
    message = str(raised.value)
    assert filename in message
    assert str(empty_hub / "checkpoints") in message
    assert "IMAGENET1K_V1" in message and "\n" not in message


def test_missing_explicit_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match="nowhere.pth") as raised:
        load_alexnet_features(missing)
    assert ALEXNET_FILE in str(raised.value)


def test_build_lpips_without_weights_raises(empty_hub):
    with pytest.raises(WeightsError, match=ALEXNET_FILE):
        build_lpips("alex")
    with pytest.raises(WeightsError, match="unknown LPIPS net"):
        build_lpips("resnet")


def test_wrong_or_corrupt_file_is_a_weights_error(fake_hub, tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read") as raised:
        load_alexnet_features(corrupt)
    assert "\n" not in str(raised.value)
    # AlexNet weights are not VGG-19 weights.
    with pytest.raises(WeightsError, match="does not fit torchvision vgg19") as raised:
        load_vgg19_features(fake_hub["small_file"])
    assert "\n" not in str(raised.value)


def test_allow_random_is_explicit_and_warns(empty_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="rawrestore.pretrained"):
        features = load_alexnet_features(allow_random=True)
    assert any("RANDOM alexnet" in record.getMessage() for record in caplog.records)
    assert not any(p.requires_grad for p in features.parameters())
    with caplog.at_level(logging.WARNING, logger="rawrestore.pretrained"):
        model = build_lpips("alex", allow_random=True)
    assert sum("RANDOM" in record.getMessage() for record in caplog.records) == 2
    pred, target = _images(3)
    with torch.no_grad():
        assert lpips_metric(pred, target, model).shape == (3,)


def test_weights_path_prefers_the_explicit_file(fake_hub):
    assert weights_path("alexnet") == Path(fake_hub["hub_dir"]) / "checkpoints" / ALEXNET_FILE
    assert weights_path("alexnet", fake_hub["small_file"]) == fake_hub["small_file"]
