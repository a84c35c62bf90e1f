"""Typed experiment configuration: nested dataclasses with defaults and value checks.

Types (int, float, Literal choices, lists, None) are enforced by `rawrestore.config.loader`
from the annotations; the `validate(key)` methods here check the values that a type cannot
express (ranges, CFA multiples, cross-field rules). Every error is a one-line
`ConfigError` that names the full dotted key. Relative paths are relative to the working
directory the command runs in, not to the config file.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from rawrestore.config.bounds import preview
from rawrestore.errors import ConfigError

CFA_PERIOD = {"sony": 2, "fuji": 6}  # Bayer 2x2, X-Trans 6x6
SID_RATIO_CAP = 300.0  # SID clamps exposure ratios above 300 (its test set's largest)
# VGG layer names a perceptual loss can tap (VGG16: blocks 3-5 have three convs; VGG19: four)
VGG16_LAYERS = frozenset(
    f"{kind}{block}_{index}"
    for kind in ("conv", "relu")
    for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for index in range(1, count + 1)
)
VGG19_LAYERS = frozenset(
    f"{kind}{block}_{index}"
    for kind in ("conv", "relu")
    for block, count in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
    for index in range(1, count + 1)
) | {f"pool{b}" for b in range(1, 6)}
_FEATURES_SLICE = re.compile(r"^features\[:(\d+)\]$")
_UNIFORM_KERNEL = re.compile(r"^uniform\(\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\)$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _require(condition: bool, key: str, message: str, value: object) -> None:
    """Raise ConfigError('<key> <message>, got <value>') unless condition holds."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}, got {preview(value)}")


def _validate_children(config: object, key: str) -> None:
    """Call validate() on every dataclass-valued field, with the dotted key of that field."""
    for f in fields(config):
        child = getattr(config, f.name)
        if is_dataclass(child):
            child.validate(f"{key}.{f.name}" if key else f.name)


# ----------------------------------------------------------------------------- data


@dataclass
class DataSectionConfig:
    """The keys of one data section: dataset, cropping, on-the-fly synthesis. Sizes are RAW (mosaic) pixels, before packing."""

    kind: Literal["sid", "clean_folder"] = "sid"  # clean_folder: root holds clean RAW files only (rawrestore.data.clean_folder)
    root: str = "data/synthetic"
    camera: Literal["sony", "fuji"] = "sony"
    manifest: str = "auto"  # "auto": built/found under root; otherwise a manifest file path
    cache_dir: str | None = None  # None -> <root>/.cache
    crop_size: int = 512  # a multiple of the CFA period (2 Bayer, 6 X-Trans)
    packed: bool = True
    clip_aligned: bool = True  # clip exposure-aligned input to [0, 1] like SID
    augment: bool = True
    num_workers: int = 2
    synthetic_noise: bool = False  # synthesise dark inputs from long exposures with a noise model
    noise_camera: str = "SonyA7S2"
    synthetic_crosstalk: str = "identity"  # kernel applied to the clean frame before synthetic noise (as the sensor does)
    gain_jitter: float = 0.0  # with synthetic_noise: R, G, B gains log-uniform in [1/(1+x), 1+x] on the clean frame
    synthetic_ratio: list[float] | None = None  # with synthetic_noise: [lo, hi], ratio log-uniform per sample (None: the pair's)
    val_crop: int | None = None  # None: validate on whole images
    ratio_cap: float = SID_RATIO_CAP  # exposure ratios above this are clamped
    val_share: float = 0.1  # kind clean_folder: fraction of the files held out for val/test

    @property
    def cfa_period(self) -> int:
        """2 for the Bayer Sony A7S II, 6 for the X-Trans Fuji X-T2."""
        return CFA_PERIOD[self.camera]

    @property
    def in_channels(self) -> int:
        """Channels the model sees: 4 (packed Bayer), 9 (packed X-Trans) or 1 (mosaic)."""
        if not self.packed:
            return 1
        return 4 if self.camera == "sony" else 9

    @property
    def resolved_cache_dir(self) -> str:
        """cache_dir, or <root>/.cache when it is None."""
        return self.cache_dir if self.cache_dir is not None else f"{self.root.rstrip('/')}/.cache"

    def validate(self, key: str = "data") -> None:
        """Check values: crops are positive multiples of the CFA period, counts non-negative."""
        period = self.cfa_period
        _require(self.root != "", f"{key}.root", "must be a non-empty path", self.root)
        _require(self.manifest != "", f"{key}.manifest", "must be 'auto' or a path", self.manifest)
        for name in ("crop_size", "val_crop"):
            size = getattr(self, name)
            if size is None:
                continue
            _require(size > 0, f"{key}.{name}", "must be > 0", size)
            _require(
                size % period == 0, f"{key}.{name}",
                f"must be a multiple of the {self.camera} CFA period {period}", size,
            )
        _require(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0", self.num_workers)
        _require(self.noise_camera != "", f"{key}.noise_camera", "must name a noise profile", self.noise_camera)
        _require(self.ratio_cap >= 1.0, f"{key}.ratio_cap", "must be >= 1", self.ratio_cap)
        _require(0.0 <= self.gain_jitter <= 3.0, f"{key}.gain_jitter", "must be in [0, 3]", self.gain_jitter)
        _require(0.0 <= self.val_share < 1.0, f"{key}.val_share", "must be in [0, 1)", self.val_share)
        if self.kind == "clean_folder":
            _require(self.synthetic_noise, f"{key}.synthetic_noise",
                     "must be true with data.kind clean_folder (the dark inputs are synthesised from the clean files)",
                     self.synthetic_noise)
            _require(self.synthetic_ratio is not None, f"{key}.synthetic_ratio",
                     "must be [lo, hi] with data.kind clean_folder (the exposure ratios to synthesise)", self.synthetic_ratio)
        if self.synthetic_ratio is not None:
            _require(len(self.synthetic_ratio) == 2 and 1.0 <= self.synthetic_ratio[0] <= self.synthetic_ratio[1],
                     f"{key}.synthetic_ratio", "must be [lo, hi] with 1 <= lo <= hi, or null", self.synthetic_ratio)


@dataclass
class SourceConfig(DataSectionConfig):
    """One entry of `data.sources`: a whole data section (unset keys come from `data`), its sampling weight and name."""

    weight: float = 1.0  # share of the training steps drawn from this source: weight / sum of the weights
    name: str | None = None  # in reports and summary.json; None: the camera, or camera-<root folder> when cameras repeat

    def validate(self, key: str = "data.sources[0]") -> None:
        """Check the data section, a finite weight > 0 and a name usable in file names."""
        super().validate(key)
        _require(math.isfinite(self.weight) and self.weight > 0, f"{key}.weight", "must be a finite number > 0",
                 self.weight)
        if self.name is not None:
            _require(bool(_SOURCE_NAME.match(self.name)), f"{key}.name",
                     "must be letters, digits, '.', '_' or '-' (it names files and summary keys)", self.name)


@dataclass
class DataConfig(DataSectionConfig):
    """The run's data: one section, or several in `sources` (each batch drawn from one of them, by weight).

    With `sources`, every key set here is a default of each source and a source's own keys win
    (`resolve_tree`, applied by the loader before typing); `packed` and `num_workers` are the run's
    (one model layout, one loader) and may not differ per source. Without it the section is the
    one source, exactly as before sources existed.
    """

    sources: list[SourceConfig] | None = None  # several datasets in one run; see README "Mixing data sources"

    @classmethod
    def resolve_tree(cls, tree: Mapping[str, Any]) -> dict[str, Any]:
        """Untyped section -> the same with the section's other keys under each source's own (a source's keys win)."""
        resolved = dict(tree)
        sources = tree.get("sources")
        if isinstance(sources, (list, tuple)):
            shared = {name: value for name, value in tree.items() if name != "sources"}
            resolved["sources"] = [{**shared, **source} if isinstance(source, Mapping) else source for source in sources]
        return resolved

    def source_list(self) -> list[SourceConfig]:
        """The sources of the run: `sources`, or this section as the one source (weight 1)."""
        if self.sources:
            return list(self.sources)
        own = {f.name: getattr(self, f.name) for f in fields(DataSectionConfig)}
        return [SourceConfig(**own, weight=1.0, name=None)]

    def source_names(self) -> list[str]:
        """One name per source: its `name`, else its camera, else camera-<root folder> when a camera repeats."""
        sources = self.source_list()
        cameras = [source.camera for source in sources]
        names = []
        for source in sources:
            if source.name is not None:
                names.append(source.name)
            elif cameras.count(source.camera) == 1:
                names.append(source.camera)
            else:
                folder = re.sub(r"[^A-Za-z0-9._-]", "_", Path(source.root.rstrip("/")).name) or "root"
                names.append(f"{source.camera}-{folder}")
        return names

    @property
    def cfa_periods(self) -> tuple[int, ...]:
        """The CFA periods of the sources, ascending, each once: (2,), (6,) or (2, 6)."""
        return tuple(sorted({source.cfa_period for source in self.source_list()}))

    @property
    def cfa_period(self) -> int:
        """The CFA period of every source (2 Bayer, 6 X-Trans); ConfigError when sources mix them (ask each source)."""
        periods = self.cfa_periods
        if len(periods) > 1:
            raise ConfigError("data.sources mix Bayer and X-Trans sources: there is no one CFA period; "
                              "use each source's cfa_period")
        return periods[0]

    @property
    def in_channels(self) -> int:
        """Channels the model sees: 4 (packed Bayer), 9 (packed X-Trans) or 1 (mosaic); the same for every source."""
        return self.source_list()[0].in_channels

    def validate(self, key: str = "data") -> None:
        """Check the section, or with `sources` each source, unique names, and one model layout for all of them."""
        if self.sources is None:
            super().validate(key)
            return
        _require(len(self.sources) >= 1, f"{key}.sources", "must list at least one data section, or be null",
                 self.sources)
        for index, source in enumerate(self.sources):
            source.validate(f"{key}.sources[{index}]")
            for name in ("packed", "num_workers"):
                _require(getattr(source, name) == getattr(self, name), f"{key}.sources[{index}].{name}",
                         f"must equal {key}.{name} (one model layout and one loader per run); set it in {key} only",
                         getattr(source, name))
        names = self.source_names()
        for index, name in enumerate(names):
            _require(names.index(name) == index, f"{key}.sources[{index}].name",
                     f"must be unique ('{name}' is also source {names.index(name)}); give each source its own name",
                     name)
        if len(self.cfa_periods) > 1 and self.packed:
            raise ConfigError(
                f"config key '{key}.packed' is true but {key}.sources mix Bayer (4 packed channels) and X-Trans (9): "
                f"one network cannot take both; set {key}.packed: false to train every source on the 1-channel mosaic")


# ---------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Network choice and size; in/out channels follow from the data (4 Bayer, 9 X-Trans)."""

    name: str = "unet"  # a key of rawrestore.models.MODELS (the registry is the only list of networks)
    width: int = 32  # channels of the first level (SID U-Net: 32-64-128-256-512)
    width_mult: float = 1.0  # scales `width`, for quick size sweeps
    residual: bool = False  # predict a correction added to the aligned input
    noise_map: bool = False  # one more input channel: the noise level measured from the input (physics.noise_level)
    nafnet_blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 28])  # encoder, per level
    nafnet_middle_blocks: int = 1
    nafnet_dec_blocks: list[int] | None = None  # None: one block per level
    # RAW-loss weight of the output at 1/2**i of the packed resolution; [1.0]: one output, [1.0, 0.5]: dual output
    scales: list[float] = field(default_factory=lambda: [1.0])

    def validate(self, key: str = "model") -> None:
        """Check values: a registered network, positive width, block lists of matching length and non-negative counts,
        scale weights > 0, no more of them than the network has decoder levels."""
        from rawrestore.models import MODELS  # the registry, not a copy of its names

        names = ", ".join(repr(name) for name in MODELS)
        _require(self.name in MODELS, f"{key}.name", f"must be one of {names}", self.name)
        _require(self.width >= 1, f"{key}.width", "must be >= 1", self.width)
        _require(self.width_mult > 0, f"{key}.width_mult", "must be > 0", self.width_mult)
        _require(round(self.width * self.width_mult) >= 1, f"{key}.width_mult",
                 "times width must give at least one channel", self.width_mult)
        _require(len(self.nafnet_blocks) >= 1, f"{key}.nafnet_blocks", "needs at least one level",
                 self.nafnet_blocks)
        _require(all(n >= 0 for n in self.nafnet_blocks), f"{key}.nafnet_blocks",
                 "must hold counts >= 0", self.nafnet_blocks)
        _require(self.nafnet_middle_blocks >= 0, f"{key}.nafnet_middle_blocks", "must be >= 0",
                 self.nafnet_middle_blocks)
        if self.nafnet_dec_blocks is not None:
            _require(len(self.nafnet_dec_blocks) == len(self.nafnet_blocks), f"{key}.nafnet_dec_blocks",
                     f"must have one entry per encoder level ({len(self.nafnet_blocks)})",
                     self.nafnet_dec_blocks)
            _require(all(n >= 0 for n in self.nafnet_dec_blocks), f"{key}.nafnet_dec_blocks",
                     "must hold counts >= 0", self.nafnet_dec_blocks)
        _require(len(self.scales) >= 1 and all(math.isfinite(w) and w > 0 for w in self.scales), f"{key}.scales",
                 "must list finite weights > 0, the first for the full resolution", self.scales)
        levels = MODELS[self.name].max_scales(self)
        _require(len(self.scales) <= levels, f"{key}.scales",
                 f"may have at most {levels} entries for {self.name} (one per decoder level)", self.scales)


# ----------------------------------------------------------------------------- loss


@dataclass
class LossTermConfig:
    """One loss term's weight over training; `weight: 0` turns the term off whatever the schedule.

    schedule "fixed": `weight` throughout. "linear"/"cosine": `start_weight` (None -> weight)
    until the `ramp_start` fraction of iterations, then ramps to `end_weight` (None -> weight)
    by `ramp_end`, and stays there (a ramp from zero: weight 0.1, start_weight 0).
    """

    weight: float = 0.0
    schedule: Literal["fixed", "linear", "cosine"] = "fixed"
    start_weight: float | None = None
    end_weight: float | None = None
    ramp_start: float = 0.7
    ramp_end: float = 1.0

    def weight_at_step(self, step: int, total_steps: int) -> float:
        """Weight at optimiser step `step` (0-based) of `total_steps`: `weight_at` of the clamped progress."""
        return self.weight_at(min(step / total_steps, 1.0))

    def weight_at(self, progress: float) -> float:
        """Weight at `progress` = iteration / total iterations, in [0, 1]."""
        if self.schedule == "fixed" or self.weight == 0.0:
            return self.weight
        start = self.weight if self.start_weight is None else self.start_weight
        end = self.weight if self.end_weight is None else self.end_weight
        if progress <= self.ramp_start:
            return start if progress < self.ramp_end else end
        if progress >= self.ramp_end:
            return end
        t = (progress - self.ramp_start) / (self.ramp_end - self.ramp_start)
        if self.schedule == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        return start + (end - start) * t

    @property
    def active(self) -> bool:
        """True when the weight is non-zero at some point of training."""
        return any(w != 0.0 for w in (self.weight_at(0.0), self.weight_at(1.0)))

    def validate(self, key: str) -> None:
        """Check values: weights >= 0, 0 <= ramp_start <= ramp_end <= 1."""
        for name in ("weight", "start_weight", "end_weight"):
            value = getattr(self, name)
            if value is not None:
                _require(value >= 0.0 and math.isfinite(value), f"{key}.{name}", "must be finite and >= 0",
                         value)
        _require(0.0 <= self.ramp_start <= 1.0, f"{key}.ramp_start", "must be in [0, 1]", self.ramp_start)
        _require(self.ramp_start <= self.ramp_end <= 1.0, f"{key}.ramp_end", "must be in [ramp_start, 1]",
                 self.ramp_end)


@dataclass
class CharbonnierTermConfig(LossTermConfig):
    """Charbonnier sqrt(d^2 + eps^2) on packed RAW."""

    eps: float = 1e-3

    def validate(self, key: str) -> None:
        """Check values: eps > 0 plus the common term checks."""
        super().validate(key)
        _require(self.eps > 0, f"{key}.eps", "must be > 0", self.eps)


@dataclass
class RobustTermConfig(LossTermConfig):
    """Barron's general robust loss on packed RAW; alpha 2 = L2, 1 ~ Charbonnier, 0 = Cauchy."""

    alpha: float = 1.0
    scale: float = 0.01

    def validate(self, key: str) -> None:
        """Check values: finite alpha, scale > 0 plus the common term checks."""
        super().validate(key)
        _require(math.isfinite(self.alpha), f"{key}.alpha", "must be finite", self.alpha)
        _require(self.scale > 0, f"{key}.scale", "must be > 0", self.scale)


# loss.perceptual.preset -> (layers, layer_weights); S3Net's multi-layer VGG-19 weighting
PERCEPTUAL_PRESETS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "s3net": (("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)),
}


@dataclass
class VGGTermConfig(LossTermConfig):
    """A loss on VGG activations of the rendered sRGB; `weights` is a local torchvision state dict of `arch`.

    `layers` are names like 'relu3_3' / 'conv5_4' / 'pool4', or 'features[:35]' (Spectroformer's
    tap: the output of torchvision's features[:35], i.e. conv5_4 of VGG19 before its ReLU);
    `layer_weights[i]` (default 1) weighs `layers[i]`.
    """

    arch: Literal["vgg19", "vgg16"] = "vgg19"
    layers: list[str] = field(default_factory=lambda: ["relu3_3", "relu4_3"])
    layer_weights: list[float] | None = None
    criterion: Literal["l1", "l2"] = "l1"
    weights: str | None = None  # None: torchvision's cache (torch.hub.get_dir()/checkpoints)

    def tapped_layers(self) -> tuple[list[str], list[float] | None]:
        """The (layers, layer_weights) the term uses."""
        return list(self.layers), None if self.layer_weights is None else list(self.layer_weights)

    def validate(self, key: str) -> None:
        """Check values: at least one layer name of `arch`, one weight per layer, plus the common term checks."""
        super().validate(key)
        known = VGG19_LAYERS if self.arch == "vgg19" else VGG16_LAYERS | {f"pool{b}" for b in range(1, 6)}
        layers, layer_weights = self.tapped_layers()
        _require(len(layers) > 0, f"{key}.layers", f"needs at least one {self.arch} layer", layers)
        for layer in layers:
            _require(layer in known or bool(_FEATURES_SLICE.match(layer)), f"{key}.layers",
                     f"must name {self.arch} layers like 'relu3_3', 'conv5_4', 'pool4' or 'features[:35]'", layer)
        if layer_weights is not None:
            _require(len(layer_weights) == len(layers), f"{key}.layer_weights", "needs one weight per layer", layer_weights)
            _require(all(math.isfinite(w) and w >= 0 for w in layer_weights), f"{key}.layer_weights",
                     "must be finite and >= 0", layer_weights)


@dataclass
class PerceptualTermConfig(VGGTermConfig):
    """VGG feature loss on rendered sRGB (see VGGTermConfig); `preset: s3net` sets layers and layer_weights
    (relu1_1 ... relu5_1 weighted 1/32, 1/16, 1/8, 1/4, 1, as S3Net) and leaves `layers`/`layer_weights` unset."""

    preset: Literal["none", "s3net"] = "none"

    def tapped_layers(self) -> tuple[list[str], list[float] | None]:
        """The (layers, layer_weights) of the preset, or as configured when `preset` is 'none'."""
        if self.preset == "none":
            return super().tapped_layers()
        layers, layer_weights = PERCEPTUAL_PRESETS[self.preset]
        return list(layers), list(layer_weights)

    def validate(self, key: str) -> None:
        """Check values: a preset leaves `layers` at its default and `layer_weights` unset; then the VGG checks."""
        if self.preset != "none":
            _require(self.layers == VGGTermConfig().layers and self.layer_weights is None, f"{key}.preset",
                     f"sets layers and layer_weights itself; remove {key}.layers/{key}.layer_weights or the preset",
                     self.preset)
        super().validate(key)


@dataclass
class GramTermConfig(VGGTermConfig):
    """Gram-matrix style loss on VGG activations of the rendered sRGB (see VGGTermConfig), Gatys' relu*_1 layers by default."""

    layers: list[str] = field(default_factory=lambda: ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"])


@dataclass
class SobelEdgeTermConfig(LossTermConfig):
    """L1 of Sobel gradient magnitudes on rendered sRGB, weighted 1 where the target's magnitude exceeds
    `threshold` and `background` elsewhere."""

    threshold: float = 0.1
    background: float = 0.0

    def validate(self, key: str) -> None:
        """Check values: threshold >= 0, background in [0, 1], plus the common term checks."""
        super().validate(key)
        _require(math.isfinite(self.threshold) and self.threshold >= 0, f"{key}.threshold", "must be finite and >= 0",
                 self.threshold)
        _require(0.0 <= self.background <= 1.0, f"{key}.background", "must be in [0, 1]", self.background)


@dataclass
class BlurColorTermConfig(LossTermConfig):
    """L1 or L2 between Gaussian-blurred renders (colour without texture); `sigma` in pixels, kernel radius 4 sigma."""

    sigma: float = 3.0
    criterion: Literal["l1", "l2"] = "l2"

    def validate(self, key: str) -> None:
        """Check values: 0 < sigma <= 64 plus the common term checks."""
        super().validate(key)
        _require(math.isfinite(self.sigma) and 0 < self.sigma <= 64, f"{key}.sigma", "must be in (0, 64] pixels",
                 self.sigma)


@dataclass
class GanTermConfig(LossTermConfig):
    """Adversarial loss on the prediction's render against a PatchGAN discriminator with its own Adam optimiser.

    `kind`: vanilla (BCE), lsgan (least squares) or hinge; `relativistic`: the relativistic
    average form (RaGAN, as ESRGAN). `warmup` steps: neither the generator term counts (its
    weight is 0, its value still logged) nor the discriminator trains. The discriminator:
    `width` channels in its first layer, `n_layers` stride-2 layers (3: 70x70 patches), `norm`,
    `spectral_norm`; its optimiser: `lr` (constant), `betas`. Needs loss.weighting fixed.
    """

    kind: Literal["vanilla", "lsgan", "hinge"] = "vanilla"
    relativistic: bool = False
    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    warmup: int = 0
    width: int = 64
    n_layers: int = 3
    norm: Literal["instance", "none"] = "instance"
    spectral_norm: bool = False

    def weight_at_step(self, step: int, total_steps: int) -> float:
        """0 during the first `warmup` steps, then the scheduled weight."""
        return 0.0 if step < self.warmup else super().weight_at_step(step, total_steps)

    def validate(self, key: str) -> None:
        """Check values: lr > 0, two betas in [0, 1), warmup >= 0, 1 <= n_layers <= 6, width >= 1, plus the common checks."""
        super().validate(key)
        _require(math.isfinite(self.lr) and self.lr > 0, f"{key}.lr", "must be a finite number > 0", self.lr)
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{key}.betas",
                 "must be two numbers in [0, 1) (Adam's beta1, beta2)", self.betas)
        _require(self.warmup >= 0, f"{key}.warmup", "must be >= 0 steps", self.warmup)
        _require(self.width >= 1, f"{key}.width", "must be >= 1", self.width)
        _require(1 <= self.n_layers <= 6, f"{key}.n_layers", "must be in [1, 6]", self.n_layers)


@dataclass
class MSSSIMTermConfig(LossTermConfig):
    """1 - MS-SSIM on rendered sRGB; renders under 161 px a side fail unless `fallback` (then 1 - SSIM)."""

    fallback: bool = False


@dataclass
class LpipsTermConfig(LossTermConfig):
    """LPIPS on rendered sRGB; `weights` is a local file for the backbone + linear heads."""

    net: Literal["alex", "vgg", "squeeze"] = "alex"
    weights: str | None = None


@dataclass
class LossConfig:
    """The loss stack: one entry per term, how terms are weighted, and how sRGB is rendered.

    Defaults (staged: RAW terms first, the perceptual stage ramps in over the last 30% of
    iterations): RAW-L1 1.0, crosstalk consistency 0.10, SSIM 0.05, VGG perceptual 0.02 -> 0.10,
    LPIPS 0.004 -> 0.02 and CIEDE2000 0.002 -> 0.02 (linear ramps); the rest off. At step 1 an
    untrained net's CIEDE2000 is ~35 units: at a fixed 0.02 it was two thirds of the total.
    """

    raw_l1: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=1.0))
    charbonnier: CharbonnierTermConfig = field(default_factory=CharbonnierTermConfig)
    robust: RobustTermConfig = field(default_factory=RobustTermConfig)
    crosstalk: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=0.10))
    perceptual: PerceptualTermConfig = field(
        default_factory=lambda: PerceptualTermConfig(
            weight=0.02, schedule="linear", end_weight=0.10, ramp_start=0.7, ramp_end=1.0
        )
    )
    lpips: LpipsTermConfig = field(
        default_factory=lambda: LpipsTermConfig(
            weight=0.02, schedule="linear", start_weight=0.004, end_weight=0.02, ramp_start=0.7, ramp_end=1.0
        )
    )
    delta_e00: LossTermConfig = field(
        default_factory=lambda: LossTermConfig(
            weight=0.02, schedule="linear", start_weight=0.002, end_weight=0.02, ramp_start=0.7, ramp_end=1.0
        )
    )
    ssim: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=0.05))
    psnr: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=0.0))  # minus mean per-image sRGB PSNR, dB
    ms_ssim: MSSSIMTermConfig = field(default_factory=lambda: MSSSIMTermConfig(weight=0.0))
    edge: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=0.0))
    color_angle: LossTermConfig = field(default_factory=lambda: LossTermConfig(weight=0.0))
    gram: GramTermConfig = field(default_factory=GramTermConfig)
    sobel_edge: SobelEdgeTermConfig = field(default_factory=SobelEdgeTermConfig)
    blur_color: BlurColorTermConfig = field(default_factory=BlurColorTermConfig)
    gan: GanTermConfig = field(default_factory=GanTermConfig)
    weighting: Literal["fixed", "uncertainty", "softmax"] = "fixed"
    crosstalk_kernel: str = "uniform(0.02)"  # "identity" | "uniform(<leak>)" | path to a kernel file
    render_demosaic: Literal["bilinear", "malvar", "half"] = "bilinear"
    backbone_window: float = 1.0  # side of the render window VGG and LPIPS see, a fraction (placed anew each step); 1: all
    drop_missing_pretrained: bool = False  # leave out VGG/LPIPS (one printed line) if weights are missing

    def terms(self) -> dict[str, LossTermConfig]:
        """All term entries by name, in the order they are declared."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), LossTermConfig)}

    def active_terms(self) -> dict[str, LossTermConfig]:
        """Term entries whose weight is non-zero at some point of training."""
        return {name: term for name, term in self.terms().items() if term.active}

    @property
    def crosstalk_leak(self) -> float | None:
        """The leak of a "uniform(x)" crosstalk kernel, 0.0 for "identity", None for a path."""
        if self.crosstalk_kernel == "identity":
            return 0.0
        match = _UNIFORM_KERNEL.match(self.crosstalk_kernel)
        return float(match.group(1)) if match else None

    def validate(self, key: str = "loss") -> None:
        """Check every term, the crosstalk kernel spelling, and that some term is on."""
        _validate_children(self, key)
        _require(0.0 < self.backbone_window <= 1.0, f"{key}.backbone_window", "must be in (0, 1]", self.backbone_window)
        kernel = self.crosstalk_kernel.strip()
        _require(kernel != "", f"{key}.crosstalk_kernel", "must be 'identity', 'uniform(x)' or a path", kernel)
        if kernel.startswith("uniform"):
            leak = self.crosstalk_leak
            _require(leak is not None and leak < 0.25, f"{key}.crosstalk_kernel",
                     "must read 'uniform(x)' with a leak 0 <= x < 0.25", kernel)
        _require(bool(self.active_terms()), key, "needs at least one term with a weight > 0",
                 {name: term.weight for name, term in self.terms().items()})
        # a learnt weight would trade the adversarial term against its own discriminator (hinge's is unbounded below)
        _require(not self.gan.active or self.weighting == "fixed", f"{key}.weighting",
                 f"must be 'fixed' while {key}.gan.weight > 0", self.weighting)


# ---------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """Optimiser, learning-rate schedule and loop cadence; all counts are in iterations."""

    iterations: int = 100_000
    batch_size: int = 1
    lr: float = 1e-4
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step", "onecycle"] = "cosine"
    warmup_iters: int = 0
    step_milestones: list[int] = field(default_factory=list)  # schedule "step": multiply lr by step_gamma
    step_gamma: float = 0.1
    # schedule "onecycle" (torch's OneCycleLR, cosine, lr = its max_lr): lr/div_factor rises to lr over the
    # first onecycle_pct_start of the run, then falls to lr/(div_factor*final_div_factor)
    onecycle_pct_start: float = 0.3
    onecycle_div_factor: float = 25.0
    onecycle_final_div_factor: float = 1.0e4
    amp: Literal["off", "bf16", "fp16", "auto"] = "off"  # auto: bf16 where native (AVX512-BF16/AMX CPUs, recent GPUs), fp16 on older GPUs, else off
    channels_last: bool = True  # NHWC activations: faster convolutions on CPUs and tensor-core GPUs
    grad_clip: float | None = None  # max global grad norm
    accumulate: int = 1  # micro-batches per optimiser step
    ema: float | None = None  # decay of an exponential moving average of the weights
    val_every: int = 1000  # 0: never
    ckpt_every: int = 1000  # 0: only at the end
    log_every: int = 50  # steps between log records: the only steps whose numbers are read back from the device
    compile: bool = False  # torch.compile the model (first steps compile; pays off on long runs)
    deterministic: bool = False  # deterministic kernels (cuDNN/cuBLAS): bit-repeatable on a GPU, slower
    max_nonfinite: int = 10  # consecutive non-finite losses before training stops

    def validate(self, key: str = "train") -> None:
        """Check values: positive counts and lr, milestones increasing inside the run, 0 < ema < 1."""
        _require(self.iterations >= 1, f"{key}.iterations", "must be >= 1", self.iterations)
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        _require(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", "must be a finite number > 0", self.lr)
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.warmup_iters < self.iterations, f"{key}.warmup_iters",
                 f"must be in [0, iterations={self.iterations})", self.warmup_iters)
        milestones = self.step_milestones
        _require(all(0 < m < self.iterations for m in milestones), f"{key}.step_milestones",
                 f"must lie in (0, iterations={self.iterations})", milestones)
        _require(all(a < b for a, b in zip(milestones, milestones[1:])), f"{key}.step_milestones",
                 "must be strictly increasing", milestones)
        _require(0 < self.step_gamma <= 1, f"{key}.step_gamma", "must be in (0, 1]", self.step_gamma)
        if self.schedule == "onecycle":
            _require(self.warmup_iters == 0, f"{key}.warmup_iters",
                     "must be 0 with schedule onecycle (its first onecycle_pct_start of the run is the warm-up)",
                     self.warmup_iters)
            _require(0 < self.onecycle_pct_start < 1, f"{key}.onecycle_pct_start", "must be in (0, 1)",
                     self.onecycle_pct_start)
            _require(self.iterations * self.onecycle_pct_start >= 2 and self.iterations * (1 - self.onecycle_pct_start) >= 2,
                     f"{key}.iterations", "must give each onecycle phase at least 2 steps", self.iterations)
        for name in ("onecycle_div_factor", "onecycle_final_div_factor"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 1, f"{key}.{name}", "must be a finite number >= 1", value)
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null", self.grad_clip)
        _require(self.accumulate >= 1, f"{key}.accumulate", "must be >= 1", self.accumulate)
        if self.ema is not None:
            _require(0 < self.ema < 1, f"{key}.ema", "must be a decay in (0, 1) or null", self.ema)
        for name in ("val_every", "ckpt_every"):
            _require(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0 (0 disables)", getattr(self, name))
        _require(self.log_every >= 1, f"{key}.log_every", "must be >= 1", self.log_every)
        _require(self.max_nonfinite >= 1, f"{key}.max_nonfinite", "must be >= 1", self.max_nonfinite)


# ----------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    """Evaluation split, tiled inference and the classical baseline."""

    split: Literal["train", "val", "test"] = "test"
    tile: int = 512  # model-input pixels per tile side; 0: whole images
    overlap: int = 32  # pixels two neighbouring tiles share (blended)
    classical: Literal["wavelet", "bm3d", "none"] = "wavelet"
    max_images: int | None = None
    quantize_8bit: bool = True  # round sRGB to 8 bits before metrics, as SID's published numbers did
    self_ensemble: bool = False  # average the model over the CFA-preserving flips/transposes (8x the model time)
    # scoring protocols (rawrestore.protocols): internal (our ISP), sid (LibRaw as SID), raw (ELD/PMN packed RAW)
    protocol: list[Literal["internal", "sid", "raw"]] = field(default_factory=lambda: ["internal"])
    subset: Literal["all", "aligned", "burst00", "burst00_aligned"] = "all"  # pairs scored (data.manifest.SUBSETS)

    def validate(self, key: str = "eval") -> None:
        """Check values: tile >= 0, 0 <= overlap < tile when tiling, max_images >= 1."""
        _require(self.tile >= 0, f"{key}.tile", "must be >= 0 (0: no tiling)", self.tile)
        _require(self.overlap >= 0, f"{key}.overlap", "must be >= 0", self.overlap)
        if self.tile > 0:
            _require(self.overlap < self.tile, f"{key}.overlap", f"must be < tile={self.tile}", self.overlap)
        if self.max_images is not None:
            _require(self.max_images >= 1, f"{key}.max_images", "must be >= 1 or null", self.max_images)
        _require(len(self.protocol) >= 1 and len(set(self.protocol)) == len(self.protocol), f"{key}.protocol",
                 "must list internal, sid and/or raw, each once", self.protocol)


# ----------------------------------------------------------------------- experiment


@dataclass
class ExperimentConfig:
    """A whole experiment: data, model, loss, training, evaluation, where to write, on what."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/exp"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0

    def validate(self, key: str = "") -> None:
        """Check every section and the top-level values; raises ConfigError naming the key."""
        _validate_children(self, key)
        prefix = f"{key}." if key else ""
        _require(self.output_dir != "", f"{prefix}output_dir", "must be a non-empty path", self.output_dir)
        _require(bool(_DEVICE.match(self.device)), f"{prefix}device", "must be auto, cpu, cuda or cuda:N",
                 self.device)
        _require(self.seed >= 0, f"{prefix}seed", "must be >= 0", self.seed)
        self._check_ms_ssim_crop(prefix)
        _require(len(self.model.scales) == 1 or self.data.packed, f"{prefix}model.scales",
                 "needs data.packed: true (the coarse targets are block means of the packed colour planes)",
                 self.model.scales)
        packed_side = self.data.crop_size // (3 if 6 in self.data.cfa_periods else 2)
        _require(packed_side >> (len(self.model.scales) - 1) >= 1, f"{prefix}model.scales",
                 f"has a coarsest output below one pixel for data.crop_size {self.data.crop_size}; use fewer entries",
                 self.model.scales)
        self._check_gan(prefix)
        self._check_mixed_crosstalk(prefix)

    def _check_gan(self, prefix: str) -> None:
        """An adversarial term must start inside the run and its discriminator fit the training renders."""
        from rawrestore.models.discriminator import min_input_size  # lazy: models import this module

        term = self.loss.gan
        if not term.active:
            return
        _require(term.warmup < self.train.iterations, f"{prefix}loss.gan.warmup",
                 f"must be < train.iterations={self.train.iterations} (the term would never start)", term.warmup)
        period = max(self.data.cfa_periods)  # the smallest renders when sources mix CFAs
        side = self.data.crop_size // period if self.loss.render_demosaic == "half" else self.data.crop_size
        needed = min_input_size(term.n_layers)
        _require(side >= needed, f"{prefix}data.crop_size",
                 f"gives {side}-pixel renders (loss.render_demosaic={self.loss.render_demosaic}); the {term.n_layers}-layer "
                 f"discriminator of '{prefix}loss.gan' needs {needed}: raise it or lower loss.gan.n_layers",
                 self.data.crop_size)

    def _check_ms_ssim_crop(self, prefix: str) -> None:
        """Five-scale MS-SSIM needs renders of 161 px a side: check the training crop now, not at step 0."""
        from rawrestore.losses.srgb import MS_SSIM_MIN_SIZE  # lazy: the loss package imports this module

        term = self.loss.ms_ssim
        if not term.active or term.fallback:
            return
        half = self.loss.render_demosaic == "half"
        sources = self.data.sources
        for index, source in enumerate(self.data.source_list()):
            key = f"{prefix}data.sources[{index}].crop_size" if sources else f"{prefix}data.crop_size"
            period = source.cfa_period
            side = source.crop_size // period if half else source.crop_size
            if side < MS_SSIM_MIN_SIZE:
                needed = MS_SSIM_MIN_SIZE * period if half else MS_SSIM_MIN_SIZE
                needed = -(-needed // period) * period
                raise ConfigError(
                    f"config key '{key}' gives {side}-pixel renders "
                    f"(loss.render_demosaic={self.loss.render_demosaic}), too small for the five scales of "
                    f"'{prefix}loss.ms_ssim' (weighting {self.loss.weighting}), which need {MS_SSIM_MIN_SIZE}; "
                    f"use data.crop_size >= {needed} or loss.ms_ssim.fallback: true, got {source.crop_size}")

    def _check_mixed_crosstalk(self, prefix: str) -> None:
        """A crosstalk kernel file is for one CFA period: sources that mix periods need uniform(x) or identity."""
        if (len(self.data.cfa_periods) > 1 and self.loss.crosstalk.active
                and self.loss.crosstalk_kernel.strip() != "identity" and self.loss.crosstalk_leak is None):
            raise ConfigError(
                f"config key '{prefix}loss.crosstalk_kernel' names a kernel file, which holds one CFA period, but "
                f"data.sources mix Bayer and X-Trans; use 'uniform(x)' or 'identity', or loss.crosstalk.weight: 0, "
                f"got {preview(self.loss.crosstalk_kernel)}")


__all__ = [
    "CFA_PERIOD", "VGG16_LAYERS", "DataSectionConfig", "SourceConfig", "DataConfig", "ModelConfig", "LossTermConfig", "CharbonnierTermConfig",
    "RobustTermConfig", "VGGTermConfig", "PerceptualTermConfig", "GramTermConfig", "SobelEdgeTermConfig",
    "BlurColorTermConfig", "GanTermConfig", "PERCEPTUAL_PRESETS", "MSSSIMTermConfig", "VGG19_LAYERS", "LpipsTermConfig", "LossConfig", "TrainConfig",
    "EvalConfig", "ExperimentConfig",
]
