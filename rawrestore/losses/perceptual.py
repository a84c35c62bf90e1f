"""Network-based sRGB loss terms: VGG feature (perceptual) loss, Gram-matrix style loss and LPIPS, on two renders.

Both take ``(B,3,H,W)`` encoded sRGB in [0,1] and return a 0-dim tensor. Their backbones are
frozen and kept in eval mode whatever `.train()` is called with; they are loaded offline through
`rawrestore.pretrained` (a missing weights file is a `WeightsError` naming the file).

VGG layer names follow the usual convention: `conv<block>_<n>` / `relu<block>_<n>` for the n-th
convolution of a block and its ReLU, `pool<block>` for the block's max-pool (blocks 1-5). VGG-19
has 2, 2, 4, 4, 4 convolutions per block (relu3_3 = features[15], relu4_3 = features[24],
relu5_4 = features[35]); VGG-16 has 2, 2, 3, 3, 3. A name `features[:N]` taps the output of
torchvision's ``features[:N]``: Spectroformer's (and ESRGAN's) VGG-19 ``features[:35]`` ends with
conv5_4 BEFORE its ReLU (index 34), so `"features[:35]"` is the same tap as `"conv5_4"`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

from rawrestore import pretrained
from rawrestore.errors import ConfigError, InputError, WeightsError
from rawrestore.losses.term import BuildContext, LossTerm

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_LAYERS",
    "vgg_layer_names",
    "layer_indices",
    "resolve_layers",
    "perceptual",
    "gram_matrix",
    "gram_loss",
    "GramLoss",
    "lpips_loss",
    "PerceptualLoss",
    "LPIPSLoss",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LAYERS = ("relu3_3", "relu4_3")
_SLICE_NAME = re.compile(r"^features\[:(\d+)\]$")


def vgg_layer_names(features: nn.Sequential) -> dict[str, int]:
    """Names of a torchvision VGG ``features`` stack. features -> {'conv1_1': 0, 'relu1_1': 1, ..., 'pool5': 36}."""
    names: dict[str, int] = {}
    block, conv = 1, 0
    for index, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            conv += 1
            names[f"conv{block}_{conv}"] = index
        elif isinstance(layer, nn.ReLU):
            names[f"relu{block}_{conv}"] = index
        elif isinstance(layer, nn.MaxPool2d):
            names[f"pool{block}"] = index
            block, conv = block + 1, 0
    return names


def layer_indices(features: nn.Sequential, layers: Sequence[str]) -> list[int]:
    """Index into ``features`` of each named layer, in the order given. names like 'relu3_3' or 'features[:35]' -> indices."""
    if isinstance(layers, str) or len(layers) == 0:
        raise ConfigError(f"perceptual layers must be a non-empty list of VGG layer names, got {layers!r}")
    names = vgg_layer_names(features)
    indices = []
    for name in layers:
        match = _SLICE_NAME.match(str(name).replace(" ", ""))
        if match:
            stop = int(match.group(1))
            if not 1 <= stop <= len(features):
                raise ConfigError(f"perceptual layer {name!r}: N must be in 1..{len(features)} for this backbone")
            indices.append(stop - 1)
        elif name in names:
            indices.append(names[name])
        else:
            raise ConfigError(
                f"perceptual layer {name!r} is not a layer of this VGG; use names like 'relu3_3', 'conv5_4', 'pool4' or 'features[:35]'"
            )
    return indices


def resolve_layers(features: nn.Sequential, layers: Sequence[str]) -> list[int]:
    """Indices into ``features`` of the tapped layers. names like 'relu3_3' or 'features[:35]' -> sorted unique indices."""
    return sorted(set(layer_indices(features, layers)))


def _weights_by_index(indices: Sequence[int], layer_weights: Sequence[float] | None, who: str) -> dict[int, float]:
    """{tapped index: weight}, each weight staying with the layer it was listed with (a layer listed twice sums)."""
    weights = [1.0] * len(indices) if layer_weights is None else [float(w) for w in layer_weights]
    if len(weights) != len(indices):
        raise InputError(f"{who}: {len(weights)} layer weights for {len(indices)} layers")
    by_index: dict[int, float] = {}
    for index, weight in zip(indices, weights):
        by_index[index] = by_index.get(index, 0.0) + weight
    return by_index


def _normalised_taps(pred: torch.Tensor, target: torch.Tensor, features: nn.Sequential, indices: Sequence[int],
                     who: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """VGG activations of both renders at sorted `indices` (ImageNet-normalised inputs; the target's without a graph)."""
    for label, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"{who}: {label} must be a (B,3,H,W) sRGB tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if pred.shape != target.shape:
        raise InputError(f"{who}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    mean = torch.tensor(IMAGENET_MEAN, dtype=pred.dtype, device=pred.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pred.dtype, device=pred.device).view(1, 3, 1, 1)
    pred_taps = _taps((pred - mean) / std, features, indices)
    with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
        target_taps = _taps((target - mean) / std, features, indices)
    return pred_taps, target_taps


def _weighted_layer_sum(pred: torch.Tensor, target: torch.Tensor, features: nn.Sequential, indices: Sequence[int],
                        criterion: str, layer_weights: Sequence[float] | None, transform, who: str) -> torch.Tensor:
    """sum_l w_l * mean criterion(T(phi_l(pred)), T(phi_l(target))), T = `transform` or identity. -> ()."""
    if criterion not in ("l1", "l2"):
        raise InputError(f"{who}: criterion must be 'l1' or 'l2', got {criterion!r}")
    by_index = _weights_by_index(indices, layer_weights, who)
    taps = sorted(by_index)
    pred_taps, target_taps = _normalised_taps(pred, target, features, taps, who)
    total = pred.new_zeros(())
    for index, p, t in zip(taps, pred_taps, target_taps):
        difference = (p - t) if transform is None else (transform(p) - transform(t))
        total = total + by_index[index] * (difference.abs().mean() if criterion == "l1" else (difference * difference).mean())
    return total


def _taps(image: torch.Tensor, features: nn.Sequential, indices: Sequence[int]) -> list[torch.Tensor]:
    """Activations of `features` at `indices`. image (B,3,H,W) ImageNet-normalised -> list of (B,C_l,H_l,W_l)."""
    wanted = set(indices)
    out = []
    x = image
    for index, layer in enumerate(features):
        x = layer(x)
        if index in wanted:
            out.append(x)
            if len(out) == len(wanted):
                break
    return out


def perceptual(
    pred: torch.Tensor,
    target: torch.Tensor,
    features: nn.Sequential,
    indices: Sequence[int],
    criterion: Literal["l1", "l2"] = "l1",
    layer_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """VGG feature loss. pred, target (B,3,H,W) sRGB in [0,1] -> () sum over layers of w_l * mean criterion(phi_l(pred), phi_l(target)).

    Inputs are normalised with the ImageNet mean/std before `features` (a torchvision VGG
    ``features`` stack whose ReLUs must not be in-place when a conv output is tapped; the
    `PerceptualLoss` module sees to that). 'l1' is the mean absolute difference, 'l2' the mean
    squared difference. `indices` may come in any order (a config's); `layer_weights[i]`, default
    1, is the weight of `indices[i]`. The target's features are computed without a graph unless
    the target itself requires grad.
    """
    return _weighted_layer_sum(pred, target, features, indices, criterion, layer_weights, None, "perceptual")


def _frozen_copy(features: nn.Sequential, last_index: int) -> nn.Sequential:
    """``features[:last_index + 1]`` sharing the layers, with out-of-place ReLUs. -> frozen nn.Sequential in eval mode."""
    # In-place ReLUs would overwrite a tapped conv output (e.g. conv5_4) before the loss reads it.
    layers = [nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer for layer in list(features)[: last_index + 1]]
    trunk = nn.Sequential(*layers)
    trunk.requires_grad_(False)
    return trunk.eval()


def _exclude_from_checkpoints(module: nn.Module) -> None:
    """Keep a frozen backbone out of state_dict(); loading a state without it keeps the current tensors."""

    def drop(owner: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        if not getattr(owner, "_state_with_backbone", False):
            for key in [key for key in state if key.startswith(prefix)]:
                del state[key]

    def restore(owner: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        owner._state_with_backbone = True
        try:
            current = owner.state_dict(prefix=prefix, keep_vars=True)
        finally:
            owner._state_with_backbone = False
        for key, tensor in current.items():
            state.setdefault(key, tensor.detach())

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(restore)


class _VGGFeatureTerm(LossTerm):
    """A loss on frozen VGG activations at named layers, each with its own weight. (B,3,H,W) x2 sRGB in [0,1] -> ().

    `features` is a torchvision VGG ``features`` stack (build it with `from_pretrained`); only the
    layers up to the deepest tap are kept. The trunk is frozen and stays in eval mode. Its
    parameters are not part of `LossStack` checkpoints (they are reloaded from the weights file).
    `layer_weights[i]` (default 1) belongs to `layers[i]`, whatever VGG's own order.
    """

    domain: ClassVar[str] = "srgb"
    frozen_backbone: ClassVar[bool] = True
    who: ClassVar[str] = "vgg"

    def __init__(
        self,
        features: nn.Sequential,
        layers: Sequence[str] = DEFAULT_LAYERS,
        criterion: Literal["l1", "l2"] = "l1",
        layer_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if criterion not in ("l1", "l2"):
            raise ConfigError(f"{self.who} criterion must be 'l1' or 'l2', got {criterion!r}")
        self.layer_indices = layer_indices(features, layers)
        self.indices = sorted(set(self.layer_indices))
        if layer_weights is not None and len(layer_weights) != len(self.layer_indices):
            raise ConfigError(f"{self.who}: {len(layer_weights)} layer weights for the {len(self.layer_indices)} layers {list(layers)}")
        self.layers = tuple(layers)
        self.criterion = criterion
        self.layer_weights = None if layer_weights is None else tuple(float(w) for w in layer_weights)
        self.features = _frozen_copy(features, max(self.indices))
        _exclude_from_checkpoints(self)

    @classmethod
    def from_pretrained(
        cls,
        arch: str = "vgg19",
        weights_path: str | Path | None = None,
        layers: Sequence[str] = DEFAULT_LAYERS,
        criterion: Literal["l1", "l2"] = "l1",
        layer_weights: Sequence[float] | None = None,
        allow_random: bool = False,
    ):
        """Load the ImageNet `arch` ('vgg19' or 'vgg16') offline via rawrestore.pretrained. -> the term; WeightsError if missing."""
        if arch not in ("vgg19", "vgg16"):
            raise ConfigError(f"{cls.who} backbone must be 'vgg19' or 'vgg16', got {arch!r}")
        try:
            features = pretrained.load_features(arch, weights_path, allow_random=allow_random)
        except WeightsError as error:  # the message names the perceptual term's key; this term has its own
            raise WeightsError(str(error).replace("loss.perceptual.weights", f"loss.{cls.who}.weights")) from None
        return cls(features, layers=layers, criterion=criterion, layer_weights=layer_weights)

    @classmethod
    def from_config(cls, term: Any, context: BuildContext):
        layers, layer_weights = term.tapped_layers()
        return cls.from_pretrained(term.arch, term.weights, layers=layers, criterion=term.criterion,
                                   layer_weights=layer_weights, allow_random=context.allow_random)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # the backbone is a fixed measuring device
        return self

    def extra_repr(self) -> str:
        weights = "" if self.layer_weights is None else f", layer_weights={list(self.layer_weights)}"
        return f"layers={list(self.layers)}, indices={self.indices}, criterion={self.criterion}{weights}"


class PerceptualLoss(_VGGFeatureTerm):
    """VGG perceptual loss (see `perceptual`) on frozen VGG layers. (B,3,H,W), (B,3,H,W) sRGB in [0,1] -> ()."""

    who: ClassVar[str] = "perceptual"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return perceptual(pred, target, self.features, self.layer_indices, self.criterion, self.layer_weights)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of activations, normalised by their size. features (B,C,H,W) -> (B,C,C) = F F^T / (C H W), F = (B,C,HW)."""
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def gram_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    features: nn.Sequential,
    indices: Sequence[int],
    criterion: Literal["l1", "l2"] = "l1",
    layer_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Gram-matrix style loss. pred, target (B,3,H,W) sRGB in [0,1] -> () sum_l w_l * mean criterion(G(phi_l(pred)), G(phi_l(target))).

    G is `gram_matrix` (channel correlations: texture and colour statistics without their
    layout, Gatys et al. 2016). Layers, weights and inputs as in `perceptual`.
    """
    return _weighted_layer_sum(pred, target, features, indices, criterion, layer_weights, gram_matrix, "gram_loss")


class GramLoss(_VGGFeatureTerm):
    """Gram-matrix style loss (see `gram_loss`) on frozen VGG layers. (B,3,H,W), (B,3,H,W) sRGB in [0,1] -> ()."""

    who: ClassVar[str] = "gram"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gram_loss(pred, target, self.features, self.layer_indices, self.criterion, self.layer_weights)


def lpips_loss(pred: torch.Tensor, target: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """Mean LPIPS. pred, target (B,3,H,W) sRGB in [0,1], net an lpips.LPIPS -> () (inputs mapped to [-1,1])."""
    for label, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"lpips_loss: {label} must be a (B,3,H,W) sRGB tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if pred.shape != target.shape:
        raise InputError(f"lpips_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    return net(pred * 2.0 - 1.0, target * 2.0 - 1.0).mean()


class LPIPSLoss(LossTerm):
    """LPIPS v0.1 as a loss (see `lpips_loss`). (B,3,H,W), (B,3,H,W) sRGB in [0,1] -> ().

    `net` is an `lpips.LPIPS` built by `rawrestore.pretrained.build_lpips` (`from_pretrained`);
    frozen, kept in eval mode, left out of `LossStack` checkpoints.
    """

    domain: ClassVar[str] = "srgb"
    frozen_backbone: ClassVar[bool] = True

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise InputError(f"LPIPSLoss needs an lpips.LPIPS module, got {type(net).__name__}")
        net.requires_grad_(False)
        self.net = net.eval()
        _exclude_from_checkpoints(self)

    @classmethod
    def from_pretrained(cls, net: str = "alex", weights_path: str | Path | None = None, allow_random: bool = False) -> LPIPSLoss:
        """LPIPS with the offline `net` trunk ('alex', 'vgg', 'squeeze'). -> LPIPSLoss; WeightsError if missing."""
        return cls(pretrained.build_lpips(net, weights_path, allow_random=allow_random))

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> LPIPSLoss:
        return cls.from_pretrained(term.net, term.weights, allow_random=context.allow_random)

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lpips_loss(pred, target, self.net)
