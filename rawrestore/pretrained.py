"""Offline loading of pretrained ImageNet backbones (VGG, AlexNet) and of the LPIPS metric.

Nothing here downloads. Weights come from an explicit path or from torchvision's cache
(``torch.hub.get_dir()/checkpoints/``) under torchvision's standard file names; a missing file is a
`WeightsError` that names the file and how to provide it. Random backbones exist only behind the
test-only ``allow_random=True`` switch, which logs a warning.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

from rawrestore.errors import WeightsError

__all__ = [
    "BACKBONES",
    "weights_path",
    "load_features",
    "load_vgg19_features",
    "load_vgg16_features",
    "load_alexnet_features",
    "build_lpips",
    "build_lpips_or_none",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """A torchvision classifier whose ``.features`` we use, and its IMAGENET1K_V1 file name."""

    build: Callable[..., nn.Module]
    filename: str


BACKBONES: dict[str, Backbone] = {
    "vgg19": Backbone(torchvision.models.vgg19, "vgg19-dcbb9e9d.pth"),
    "vgg16": Backbone(torchvision.models.vgg16, "vgg16-397923af.pth"),
    "alexnet": Backbone(torchvision.models.alexnet, "alexnet-owt-7be5be79.pth"),
    "squeezenet1_1": Backbone(torchvision.models.squeezenet1_1, "squeezenet1_1-b8a52dc0.pth"),
}

# lpips' trunk names -> torchvision architectures.
_LPIPS_TRUNKS: dict[str, str] = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _backbone(arch: str) -> Backbone:
    """Look up a supported architecture. arch name -> Backbone."""
    if arch not in BACKBONES:
        raise WeightsError(f"unknown backbone {arch!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[arch]


def weights_path(arch: str, path: str | Path | None = None) -> Path:
    """Resolve a backbone weights file. arch name, optional explicit path -> existing file path.

    Raises `WeightsError` naming the expected file when it is absent.
    """
    backbone = _backbone(arch)
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise WeightsError(
                f"{arch} weights not found at {explicit}; point the path at torchvision's "
                f"IMAGENET1K_V1 file {backbone.filename}"
            )
        return explicit
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / backbone.filename
    if not cached.is_file():
        raise WeightsError(
            f"{arch} weights not found: copy {backbone.filename} into {cache_dir} or pass its path "
            f"explicitly ({'loss.lpips.weights' if arch == 'alexnet' else 'loss.perceptual.weights'}=PATH); "
            f"it is torchvision's IMAGENET1K_V1 file"
        )
    return cached


def _first_line(error: BaseException) -> str:
    """An exception message squeezed onto one line. error -> "Type: first two non-empty lines"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = " ".join(lines[:2]) if lines else ""
    return f"{type(error).__name__}: {detail}"


def _read_features_state(arch: str, path: Path) -> dict[str, torch.Tensor]:
    """Read the ``features.*`` tensors of a torchvision checkpoint. path -> state dict without the prefix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-tensor pickles
        raise WeightsError(f"{path}: cannot be read as a {arch} state_dict ({_first_line(error)})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a {arch} state_dict, got {type(state).__name__}")
    prefix = "features."
    features = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not features:
        raise WeightsError(f"{path}: no 'features.*' keys; expected torchvision's {arch} state_dict")
    return features


def load_features(
    arch: str,
    path: str | Path | None = None,
    allow_random: bool = False,
) -> nn.Module:
    """Pretrained ``.features`` of a torchvision backbone. arch, path -> frozen nn.Module in eval mode (CPU).

    ``allow_random=True`` (tests only) returns randomly initialised features, with a warning, when
    no weights file is found.
    """
    backbone = _backbone(arch)
    try:
        resolved = weights_path(arch, path)
    except WeightsError as missing:
        if not allow_random:
            raise
        _log.warning("using RANDOM %s weights (allow_random=True, test only): %s", arch, missing)
        features = backbone.build(weights=None).features
    else:
        state = _read_features_state(arch, resolved)
        # Build on the meta device: the classifier's ~100M parameters are never allocated.
        with torch.device("meta"):
            skeleton = backbone.build(weights=None).features
        features = skeleton.to_empty(device="cpu")
        try:
            features.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"{resolved}: does not fit torchvision {arch} features ({_first_line(error)})") from None
    features.eval()
    features.requires_grad_(False)
    return features


def load_vgg19_features(path: str | Path | None = None, allow_random: bool = False) -> nn.Module:
    """Pretrained VGG-19 ``features`` (torchvision IMAGENET1K_V1). path -> frozen nn.Sequential, eval mode."""
    return load_features("vgg19", path, allow_random)


def load_vgg16_features(path: str | Path | None = None, allow_random: bool = False) -> nn.Module:
    """Pretrained VGG-16 ``features`` (torchvision IMAGENET1K_V1). path -> frozen nn.Sequential, eval mode."""
    return load_features("vgg16", path, allow_random)


def load_alexnet_features(path: str | Path | None = None, allow_random: bool = False) -> nn.Module:
    """Pretrained AlexNet ``features`` (torchvision IMAGENET1K_V1). path -> frozen nn.Sequential, eval mode."""
    return load_features("alexnet", path, allow_random)


def build_lpips(
    net: str = "alex",
    weights_path: str | Path | None = None,
    allow_random: bool = False,
) -> nn.Module:
    """LPIPS v0.1 with an offline backbone. net in {alex, vgg, squeeze} -> frozen lpips.LPIPS, eval mode.

    The linear calibration layers ship inside the lpips package; the ImageNet trunk is loaded from
    ``weights_path`` or torchvision's cache, so the module equals ``lpips.LPIPS(net=net)``.
    Call it on inputs in [-1,1] (or use `rawrestore.metrics.lpips`, which maps [0,1] for you).
    """
    import lpips as lpips_package

    if net not in _LPIPS_TRUNKS:
        raise WeightsError(f"unknown LPIPS net {net!r}; expected one of {sorted(_LPIPS_TRUNKS)}")
    features = load_features(_LPIPS_TRUNKS[net], weights_path, allow_random)
    with warnings.catch_warnings():
        # lpips calls torchvision with the deprecated pretrained= argument.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_package.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    # lpips splits torchvision's features into slices whose children keep their original index
    # as their name ("slice2.3.weight" is features[3].weight), so the state maps key by key.
    features_state = features.state_dict()
    trunk_state = {}
    for key in model.net.state_dict():
        _, index_and_param = key.split(".", 1)
        trunk_state[key] = features_state[index_and_param]
    model.net.load_state_dict(trunk_state, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def build_lpips_or_none(cfg: Any, device: torch.device) -> tuple[nn.Module | None, str]:
    """The LPIPS metric network of an ExperimentConfig (`cfg.loss.lpips.net`, `.weights`) when its weights are on disk.

    -> (module on `device`, or None; one-line note saying which).
    """
    net, weights = cfg.loss.lpips.net, cfg.loss.lpips.weights
    try:
        model = build_lpips(net, weights)
    except (WeightsError, ImportError) as error:
        return None, f"LPIPS reported as null: {str(error).splitlines()[0]}"
    return model.to(device), f"LPIPS ({net}) on"
