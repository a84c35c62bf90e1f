"""Physics-based sensor noise (ELD, Wei et al., CVPR 2020) for synthesising dark RAW frames.

Units. The model works in raw digital numbers (DN) ABOVE the black level, before
normalisation: a clean mosaic `x >= 0` in DN is the expected sensor reading minus the black
level, e.g. `x = normalised * (white_level - black_level)` (`normalized_to_dn`). The calibrated
parameters shipped in `eld_params/` are in these units for each camera's own raw scale (14-bit
Sony A7S2: white 16383, black 512). The system gain K is in DN per photo-electron.

Model (per pixel, all terms independent):

    y = K * Poisson(x / K)        photon shot noise (x / K electrons, K DN each)
      + N_read                    read noise: Tukey-lambda(lambda, scale s_TL), or N(0, s_g^2)
      + N_row                     row noise: one N(0, s_r^2) draw per image row, shared by the row
      + N_q                       quantisation: U(-q/2, q/2) with q = 1 DN
      + b[site]                   colour bias: a constant DN offset per CFA colour

so `E[y] = x + b` and `Var[y] = K x + Var(N_read) + s_r^2 + q^2 / 12`, where
Var(N(0, s_g^2)) = s_g^2 and Var(Tukey-lambda) = s_TL^2 * 2/lambda^2 * (1/(1 + 2 lambda)
- Gamma(lambda + 1)^2 / Gamma(2 lambda + 2)) for lambda != 0 (finite for lambda > -1/2), and
s_TL^2 * pi^2 / 3 (the logistic) at lambda = 0. Tukey-lambda samples come from its quantile
function Q(p) = (p^lambda - (1 - p)^lambda) / lambda applied to uniform p; Gaussian read noise
uses the normal quantile of the same uniform draw.

Colour bias. ELD calibrates four offsets per row of `color_bias`, in SID's Bayer packing order
(R, G, B, G2). On a Bayer CFA (any phase) G is the green in red's row and G2 the green in
blue's row; on X-Trans every green gets the mean of G and G2.

Calibrated sampling (`sample_noise_params`), as in ELD: log K ~ U(log Kmin, log Kmax); for each
of the Tukey scale (G_scale), Gaussian scale (g_scale) and row scale (R_scale),
log(scale) ~ N(slope * log K + bias, sigma^2) with its own standard-normal draw; lambda is
drawn uniformly from G_shape and the colour-bias row uniformly from color_bias.

`synthesize_dark` builds a SID-style short exposure from a clean long one: the clean
normalised frame is put in DN, divided by the exposure ratio, noised, clipped to the sensor's
range [0, white_level] in absolute DN and normalised back. Same seed of the torch.Generator
-> same noise (for a given device).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Sequence

import numpy as np
import torch

from rawrestore.errors import ConfigError, DataError, InputError

ReadNoise = Literal["tukey", "gaussian"]
READ_NOISE_KINDS: tuple[str, ...] = ("tukey", "gaussian")
DEFAULT_CAMERA = "SonyA7S2"
DEFAULT_PROFILE = "Profile-1"
_PARAMS_PACKAGE = "rawrestore.physics"
_PARAMS_DIR = "eld_params"


def tukey_lambda_variance(lam: float) -> float:
    """Variance of the unit-scale Tukey-lambda distribution (dimensionless); inf for lam <= -1/2."""
    if lam <= -0.5:
        return math.inf
    if abs(lam) < 1e-6:
        return math.pi ** 2 / 3.0  # logistic limit; the closed form cancels catastrophically here
    return 2.0 / lam ** 2 * (1.0 / (1.0 + 2.0 * lam) - math.exp(2.0 * math.lgamma(lam + 1.0) - math.lgamma(2.0 * lam + 2.0)))


@dataclass(frozen=True)
class NoiseParams:
    """Noise of one capture, every scale in DN above black; system_gain K in DN per electron.

    `read_scale` is the Tukey-lambda scale (ELD's G_scale) when `read_noise == "tukey"` and the
    Gaussian standard deviation (g_scale) when `read_noise == "gaussian"`; `tukey_lambda` is
    ignored for Gaussian read noise. `color_bias` is (R, G, B, G2) in DN; `quant_step` is the
    quantisation step in DN (0 disables quantisation noise).
    """

    system_gain: float
    read_scale: float
    row_scale: float
    read_noise: ReadNoise = "tukey"
    tukey_lambda: float = 0.0
    color_bias: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    quant_step: float = 1.0

    def __post_init__(self) -> None:
        if self.read_noise not in READ_NOISE_KINDS:
            raise ConfigError(f"noise read_noise must be one of {READ_NOISE_KINDS}, got {self.read_noise!r}")
        _require_real("system_gain", self.system_gain, positive=True)
        for name in ("read_scale", "row_scale", "quant_step"):
            _require_real(name, getattr(self, name), positive=False)
        _require_real("tukey_lambda", self.tukey_lambda, positive=False, allow_negative=True)
        bias = tuple(self.color_bias)
        if len(bias) != 4:
            raise ConfigError(f"noise color_bias must have 4 values (R, G, B, G2) in DN, got {len(bias)}")
        for value in bias:
            _require_real("color_bias", value, positive=False, allow_negative=True)
        object.__setattr__(self, "color_bias", tuple(float(v) for v in bias))

    def read_variance(self) -> float:
        """Variance of the read noise in DN^2."""
        if self.read_noise == "gaussian":
            return self.read_scale ** 2
        return self.read_scale ** 2 * tukey_lambda_variance(self.tukey_lambda)

    def variance(self, signal_dn: float | torch.Tensor) -> float | torch.Tensor:
        """Model variance in DN^2 of a pixel whose clean signal is `signal_dn` DN above black."""
        return self.system_gain * signal_dn + self.read_variance() + self.row_scale ** 2 + self.quant_step ** 2 / 12.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML friendly) with the field names as keys."""
        out = dataclasses.asdict(self)
        out["color_bias"] = list(self.color_bias)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NoiseParams":
        """Fixed parameters from a config mapping; an unknown key raises ConfigError naming it."""
        if not isinstance(values, dict):
            raise ConfigError(f"noise parameters must be a mapping of field names to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown noise parameter {unknown[0]!r}; valid keys are {sorted(known)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ConfigError(f"noise parameter {missing[0]!r} is missing; fixed noise needs {sorted(required)}")
        kwargs = dict(values)
        if "color_bias" in kwargs:
            if not isinstance(kwargs["color_bias"], (list, tuple)):
                raise ConfigError("noise color_bias must be a list of 4 numbers (R, G, B, G2) in DN")
            kwargs["color_bias"] = tuple(kwargs["color_bias"])
        return cls(**kwargs)


@dataclass(frozen=True)
class LogLinearFit:
    """log(scale) ~ N(slope * log(K) + bias, sigma^2); scale in DN, K in DN per electron."""

    slope: float
    bias: float
    sigma: float


@dataclass(frozen=True)
class NoiseProfile:
    """One ELD calibration profile: the three scale fits."""

    tukey_scale: LogLinearFit  # ELD's G_scale
    gaussian_scale: LogLinearFit  # ELD's g_scale
    row_scale: LogLinearFit  # ELD's R_scale


@dataclass(frozen=True)
class CameraNoiseFit:
    """ELD calibration of one camera: gain range (DN per electron), Tukey shapes, colour biases (DN), profiles."""

    camera: str
    k_min: float
    k_max: float
    tukey_lambdas: tuple[float, ...]
    color_biases: tuple[tuple[float, float, float, float], ...]
    profiles: dict[str, NoiseProfile] = field(default_factory=dict)


def available_cameras() -> list[str]:
    """Names of the cameras with shipped ELD calibrations (e.g. 'SonyA7S2')."""
    folder = resources.files(_PARAMS_PACKAGE) / _PARAMS_DIR
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_noise_fit(camera: str = DEFAULT_CAMERA) -> CameraNoiseFit:
    """ELD calibration of `camera` as a typed record: a shipped name, or a path to a `.json` in the same layout.

    A path is what `rawrestore calibrate-noise --out CAMERA.json` writes. ConfigError for an
    unknown name or a missing file; DataError for a malformed one.
    """
    if camera.endswith(".json") or os.sep in camera or "/" in camera:
        path = os.path.abspath(os.path.expanduser(camera))
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            raise ConfigError(f"noise calibration file {camera} not found; write one with `rawrestore calibrate-noise "
                              f"--out {camera}` or name a shipped camera {available_cameras()}") from None
        return _load_fit_file(path, stamp)
    return _load_shipped_fit(camera)


@functools.lru_cache(maxsize=None)
def _load_shipped_fit(camera: str) -> CameraNoiseFit:
    cameras = available_cameras()
    if camera not in cameras:
        raise ConfigError(f"no ELD noise calibration for camera {camera!r}; choose one of {cameras} or give a path to a .json")
    resource = resources.files(_PARAMS_PACKAGE) / _PARAMS_DIR / f"{camera}.json"
    raw = json.loads(resource.read_text(encoding="utf-8"))
    return _parse_fit(camera, raw)


@functools.lru_cache(maxsize=16)
def _load_fit_file(path: str, stamp: int) -> CameraNoiseFit:
    """A calibration file; `stamp` (its mtime) keys the cache, so a rewritten file is read again."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"noise calibration {path} cannot be read as JSON ({type(exc).__name__}); "
                        "write it again with `rawrestore calibrate-noise`") from None
    if not isinstance(raw, dict):
        raise DataError(f"noise calibration {path} must be a JSON object in the layout of rawrestore/physics/eld_params")
    return _parse_fit(os.path.basename(path), raw)


def _parse_fit(camera: str, raw: dict[str, Any]) -> CameraNoiseFit:
    where = f"ELD noise calibration {camera if camera.endswith('.json') else camera + '.json'}"
    try:
        profiles = {
            name: NoiseProfile(
                tukey_scale=LogLinearFit(**{k: float(v) for k, v in body["G_scale"].items()}),
                gaussian_scale=LogLinearFit(**{k: float(v) for k, v in body["g_scale"].items()}),
                row_scale=LogLinearFit(**{k: float(v) for k, v in body["R_scale"].items()}),
            )
            for name, body in raw.items()
            if name.startswith("Profile-")
        }
        biases = tuple(tuple(float(v) for v in row) for row in raw["color_bias"])
        fit = CameraNoiseFit(
            camera=camera,
            k_min=float(raw["Kmin"]),
            k_max=float(raw["Kmax"]),
            tukey_lambdas=tuple(float(v) for v in raw["G_shape"]),
            color_biases=biases,  # type: ignore[arg-type]
            profiles=profiles,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where} is malformed ({type(exc).__name__}: {exc}); restore it from the reference copy") from None
    if not profiles or not fit.tukey_lambdas or not biases or any(len(row) != 4 for row in biases):
        raise DataError(f"{where} needs a Profile-*, a non-empty G_shape and color_bias rows of 4 values")
    if not 0 < fit.k_min <= fit.k_max:
        raise DataError(f"{where} has an invalid gain range Kmin={fit.k_min}, Kmax={fit.k_max}")
    return fit


def sample_noise_params(
    camera: str = DEFAULT_CAMERA,
    generator: torch.Generator | np.random.Generator | None = None,
    read_noise: ReadNoise = "tukey",
    profile: str = DEFAULT_PROFILE,
) -> NoiseParams:
    """Draw one capture's noise from the ELD calibration of `camera`. -> NoiseParams (DN units).

    The same generator state gives the same K, scales, lambda and colour bias whichever
    `read_noise` is asked for (every draw is made either way). A numpy Generator draws on the
    host (no device tensor is read back: what a training step uses).
    """
    if read_noise not in READ_NOISE_KINDS:
        raise ConfigError(f"read_noise must be one of {READ_NOISE_KINDS}, got {read_noise!r}")
    fit = load_noise_fit(camera)
    if profile not in fit.profiles:
        raise ConfigError(f"camera {camera!r} has no noise profile {profile!r}; choose one of {sorted(fit.profiles)}")
    fits = fit.profiles[profile]
    if isinstance(generator, np.random.Generator):
        uniform_k = float(generator.random())
        z_tukey, z_gauss, z_row = (float(z) for z in generator.standard_normal(3))
        lam_index = int(generator.integers(len(fit.tukey_lambdas)))
        bias_index = int(generator.integers(len(fit.color_biases)))
    else:
        device = generator.device if generator is not None else torch.device("cpu")
        uniform_k = torch.rand((), generator=generator, device=device, dtype=torch.float64).item()
        z_tukey, z_gauss, z_row = torch.randn(3, generator=generator, device=device, dtype=torch.float64).tolist()
        lam_index = int(torch.randint(len(fit.tukey_lambdas), (), generator=generator, device=device).item())
        bias_index = int(torch.randint(len(fit.color_biases), (), generator=generator, device=device).item())

    log_k = math.log(fit.k_min) + uniform_k * (math.log(fit.k_max) - math.log(fit.k_min))

    def draw(line: LogLinearFit, z: float) -> float:
        return math.exp(line.slope * log_k + line.bias + line.sigma * z)

    if read_noise == "tukey":
        read_scale = draw(fits.tukey_scale, z_tukey)
    else:
        read_scale = draw(fits.gaussian_scale, z_gauss)
    return NoiseParams(
        system_gain=math.exp(log_k),
        read_scale=read_scale,
        row_scale=draw(fits.row_scale, z_row),
        read_noise=read_noise,
        tukey_lambda=fit.tukey_lambdas[lam_index],
        color_bias=fit.color_biases[bias_index],
    )


def add_noise(
    clean_dn: torch.Tensor,
    params: NoiseParams | Sequence[NoiseParams],
    cfa: Any,
    generator: torch.Generator | None = None,
    checked: bool = False,
) -> torch.Tensor:
    """Noisy reading. clean_dn (B,1,H,W) DN above black (negatives read as 0) -> (B,1,H,W) DN, unclipped.

    `params` is one NoiseParams for the whole batch or a sequence of B; `cfa` is (P,P) or
    (B,P,P) colour indices 0=R, 1=G, 2=B. Noise is drawn on the data's device, so a generator
    must live on that device too.
    """
    _check_mosaic(clean_dn, "clean_dn")
    batch, _, height, width = clean_dn.shape
    plist = _as_param_list(params, batch)
    _check_generator(generator, clean_dn.device)
    device = clean_dn.device
    work = clean_dn.dtype if clean_dn.dtype in (torch.float32, torch.float64) else torch.float32

    def per_sample(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=work).reshape(batch, 1, 1, 1)

    gain = per_sample([p.system_gain for p in plist])
    read_scale = per_sample([p.read_scale for p in plist])
    row_scale = per_sample([p.row_scale for p in plist])
    quant_step = per_sample([p.quant_step for p in plist])
    is_gaussian = [p.read_noise == "gaussian" for p in plist]

    clean = clean_dn.to(work).clamp_min(0.0)
    shot = torch.poisson(clean / gain, generator=generator) * gain
    read = _read_noise(clean.shape, per_sample([p.tukey_lambda for p in plist]), is_gaussian, generator, device, work)
    row = torch.randn((batch, 1, height, 1), generator=generator, device=device, dtype=work)
    quant = torch.rand(clean.shape, generator=generator, device=device, dtype=work) - 0.5
    bias = _tile_sites(_bias_per_site(plist, cfa, batch, device, work, checked), height, width)
    noisy = shot + read * read_scale + row * row_scale + quant * quant_step + bias
    return noisy.to(clean_dn.dtype)


def synthesize_dark(
    clean_long: torch.Tensor,
    ratio: float | torch.Tensor,
    params: NoiseParams | Sequence[NoiseParams],
    black_level: Any,
    white_level: Any,
    cfa: Any,
    generator: torch.Generator | None = None,
    checked: bool = False,
) -> torch.Tensor:
    """Synthetic short exposure. clean_long (B,1,H,W) normalised, ratio float or (B,) -> (B,1,H,W) normalised.

    The clean frame (negatives read as 0) is put in DN above black, divided by `ratio`, noised
    with `add_noise`, clipped to the sensor's [0, white_level] absolute DN and normalised back,
    so values lie in [-black / (white - black), 1]: like a real short exposure normalised the
    same way. `black_level` is a number, (P,P) per CFA site or (B,P,P); `white_level` a number
    or (B,). Multiply by the ratio (align_exposure) to compare with the long exposure.
    `checked=True`: the caller vouches for the values (positive finite ratios, white above
    black, CFA indices 0..2: the dataset checked them per file), so they are not read back
    from the device to check them again (shapes are always checked).
    """
    _check_mosaic(clean_long, "clean_long")
    batch, _, height, width = clean_long.shape
    device, dtype = clean_long.device, clean_long.dtype
    black = _site_map(black_level, "black_level", batch, height, width, device, dtype)
    white = _site_map(white_level, "white_level", batch, height, width, device, dtype)
    span = white - black
    if not checked and not bool((span > 0).all()):
        raise InputError("white_level must be above black_level at every CFA site; check the camera metadata")
    scale = _ratio_tensor(ratio, batch, device, dtype, checked)
    clean_dn = clean_long.clamp_min(0.0) * span / scale
    noisy_dn = add_noise(clean_dn, params, cfa, generator, checked)
    noisy_dn = torch.minimum(torch.maximum(noisy_dn, -black), span)
    return noisy_dn / span


def normalized_to_dn(normalized: torch.Tensor, black_level: Any, white_level: Any) -> torch.Tensor:
    """DN above black. normalised (B,1,H,W) in [0,1] -> (B,1,H,W) DN = normalised * (white - black) per site."""
    _check_mosaic(normalized, "normalized")
    batch, _, height, width = normalized.shape
    black = _site_map(black_level, "black_level", batch, height, width, normalized.device, normalized.dtype)
    white = _site_map(white_level, "white_level", batch, height, width, normalized.device, normalized.dtype)
    return normalized * (white - black)


def dn_to_normalized(dn: torch.Tensor, black_level: Any, white_level: Any) -> torch.Tensor:
    """Normalised. DN above black (B,1,H,W) -> (B,1,H,W) = dn / (white - black) per site, unclipped."""
    _check_mosaic(dn, "dn")
    batch, _, height, width = dn.shape
    black = _site_map(black_level, "black_level", batch, height, width, dn.device, dn.dtype)
    white = _site_map(white_level, "white_level", batch, height, width, dn.device, dn.dtype)
    return dn / (white - black)


def _read_noise(shape: torch.Size, lam: torch.Tensor, is_gaussian: list[bool], generator: torch.Generator | None,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit-scale read noise (B,1,H,W) by the inverse CDF of one uniform draw per pixel."""
    # torch.rand gives multiples of 2^-(mantissa+1); fold to the lower half and offset by half a
    # step so p lies in (0, 1/2) exactly, never 0, and use the distributions' symmetry Q(1-p) = -Q(p).
    step = torch.finfo(dtype).eps / 2.0
    uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    upper = uniform >= 0.5
    p = torch.where(upper, 1.0 - step - uniform, uniform) + 0.5 * step
    p = p.clamp_min(0.5 * step)
    log_p, log_q = torch.log(p), torch.log1p(-p)
    lower_tail = None
    if not all(is_gaussian):
        safe_lam = torch.where(lam == 0, torch.ones_like(lam), lam)
        tukey = (torch.expm1(safe_lam * log_p) - torch.expm1(safe_lam * log_q)) / safe_lam
        lower_tail = torch.where(lam == 0, log_p - log_q, tukey)
    if any(is_gaussian):
        gaussian = torch.special.ndtri(p)
        if lower_tail is None:
            lower_tail = gaussian
        else:
            mask = torch.tensor(is_gaussian, device=device).reshape(-1, 1, 1, 1)
            lower_tail = torch.where(mask, gaussian, lower_tail)
    return torch.where(upper, -lower_tail, lower_tail)


def _bias_per_site(plist: list[NoiseParams], cfa: Any, batch: int, device: torch.device, dtype: torch.dtype,
                   checked: bool = False) -> torch.Tensor:
    """Colour bias of each CFA site. -> (B,1,P,P) DN."""
    try:
        cfa_t = torch.as_tensor(cfa, device=device).long()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"cfa must be a (P,P) or (B,P,P) array of colour indices 0/1/2, got {type(cfa).__name__}") from None
    if cfa_t.ndim == 2:
        cfa_t = cfa_t.unsqueeze(0).expand(batch, -1, -1)
    if cfa_t.ndim != 3 or cfa_t.shape[0] != batch or cfa_t.shape[1] != cfa_t.shape[2] or cfa_t.shape[1] not in (2, 6):
        raise InputError(f"cfa must be (P,P) or (B,P,P) with B={batch} and P 2 (Bayer) or 6 (X-Trans), got {tuple(cfa_t.shape)}")
    if not checked and bool(((cfa_t < 0) | (cfa_t > 2)).any()):
        raise InputError("cfa entries must be colour indices 0=R, 1=G, 2=B")
    table = torch.tensor([p.color_bias for p in plist], device=device, dtype=dtype)  # (B, 4): R, G, B, G2
    red, green, blue, green2 = (table[:, i].reshape(batch, 1, 1) for i in range(4))
    if cfa_t.shape[1] == 2:
        in_red_row = (cfa_t == 0).any(dim=-1, keepdim=True).expand_as(cfa_t)
        green_bias = torch.where(in_red_row, green, green2)
    else:
        green_bias = ((green + green2) / 2).expand(batch, *cfa_t.shape[1:])
    bias = torch.where(cfa_t == 0, red, torch.where(cfa_t == 2, blue, green_bias))
    return bias.unsqueeze(1)


def _tile_sites(per_site: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B,C,P,P) -> (B,C,H,W), repeated from the top-left pixel."""
    period = per_site.shape[-1]
    return per_site.repeat(1, 1, -(-height // period), -(-width // period))[..., :height, :width]


def _site_map(value: Any, name: str, batch: int, height: int, width: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """Number, (B,), (P,P) or (B,P,P) -> tensor broadcastable to (B,1,H,W)."""
    try:
        tensor = torch.as_tensor(value, device=device, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name} must be a number, (B,), (P,P) or (B,P,P) of DN values, got {type(value).__name__}") from None
    if tensor.ndim == 0:
        return tensor.reshape(1, 1, 1, 1)
    if tensor.ndim == 1 and tensor.shape[0] in (1, batch):
        return tensor.reshape(-1, 1, 1, 1)
    if tensor.ndim == 2 and tensor.shape[0] == tensor.shape[1]:
        return _tile_sites(tensor.reshape(1, 1, *tensor.shape), height, width)
    if tensor.ndim == 3 and tensor.shape[0] == batch and tensor.shape[1] == tensor.shape[2]:
        return _tile_sites(tensor.unsqueeze(1), height, width)
    raise InputError(f"{name} must be a number, (B,), (P,P) or (B,P,P) with B={batch}, got shape {tuple(tensor.shape)}")


def _ratio_tensor(ratio: float | torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
                  checked: bool = False) -> torch.Tensor:
    tensor = torch.as_tensor(ratio, device=device, dtype=dtype).reshape(-1)
    if tensor.shape[0] not in (1, batch):
        raise InputError(f"ratio must be a number or a (B,) tensor with B={batch}, got shape {tuple(tensor.shape)}")
    if not checked and not bool(((tensor > 0) & torch.isfinite(tensor)).all()):
        raise InputError("exposure ratio must be positive and finite; compute it with exposure_ratio()")
    return tensor.reshape(-1, 1, 1, 1)


def _as_param_list(params: NoiseParams | Sequence[NoiseParams], batch: int) -> list[NoiseParams]:
    if isinstance(params, NoiseParams):
        return [params] * batch
    plist = list(params)
    if len(plist) != batch or not all(isinstance(p, NoiseParams) for p in plist):
        raise InputError(f"params must be one NoiseParams or a sequence of {batch} (one per batch item), got {len(plist)} items")
    return plist


def _check_mosaic(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tensor.shape[1] != 1:
        raise InputError(f"{name} must be a (B,1,H,W) mosaic tensor, got {getattr(tensor, 'shape', type(tensor).__name__)}")
    if not tensor.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {tensor.dtype}; convert with .float()")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise InputError(
            f"generator is on {generator.device} but the data is on {device}; "
            f"create it with torch.Generator(device='{device.type}')"
        )


def _require_real(name: str, value: Any, positive: bool, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"noise {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"noise {name} must be > 0, got {value}")
    if not positive and not allow_negative and value < 0:
        raise ConfigError(f"noise {name} must be >= 0, got {value}")


__all__ = [
    "READ_NOISE_KINDS",
    "DEFAULT_CAMERA",
    "NoiseParams",
    "LogLinearFit",
    "NoiseProfile",
    "CameraNoiseFit",
    "tukey_lambda_variance",
    "available_cameras",
    "load_noise_fit",
    "sample_noise_params",
    "add_noise",
    "synthesize_dark",
    "normalized_to_dn",
    "dn_to_normalized",
]
