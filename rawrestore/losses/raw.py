"""RAW-domain loss terms: pure functions on linear RAW plus thin nn.Module wrappers.

Every function takes a prediction and a reference of the same shape, packed ``(B,4|9,h,w)`` or
mosaic ``(B,1,H,W)``, normalised linear RAW, and returns a 0-dim tensor (the mean over every
element) in the input's dtype and on its device. The crosstalk data term works on the
full-resolution mosaic only: give it packed RAW together with the CFA and it unpacks first.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from isp.cfa import unpack
from rawrestore.errors import InputError
from rawrestore.losses.term import BuildContext, LossTerm
from rawrestore.physics.crosstalk import apply_crosstalk, build_kernel, check_kernel_spec

__all__ = [
    "l1",
    "charbonnier",
    "robust",
    "crosstalk_consistency",
    "L1Loss",
    "CharbonnierLoss",
    "RobustLoss",
    "CrosstalkConsistencyLoss",
]

# |alpha - 2| below this is the L2 limit: the general form would need (x/c)^2 / |alpha-2| > float max.
_ALPHA_TWO_SNAP = 1e-12


def _check_pair(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Validate a floating (B,C,H,W) pair of equal shapes. pred, target -> None."""
    for label, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"{name}: {label} must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4:
            raise InputError(f"{name}: {label} must be (B,C,H,W), got shape {tuple(x.shape)}")
    if pred.shape != target.shape:
        raise InputError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error. pred, target (B,C,H,W) linear RAW -> () mean |pred - target|."""
    _check_pair(pred, target, "l1")
    return (pred - target).abs().mean()


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier penalty. pred, target (B,C,H,W) -> () mean sqrt((pred - target)^2 + eps^2), eps in RAW units.

    Not offset by eps: identical inputs give exactly eps. Smooth everywhere for eps > 0.
    """
    _check_pair(pred, target, "charbonnier")
    if not (math.isfinite(eps) and eps > 0):
        raise InputError(f"charbonnier: eps must be a finite number > 0, got {eps}")
    difference = pred - target
    return torch.sqrt(difference * difference + eps * eps).mean()


def robust(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, scale: float = 0.01) -> torch.Tensor:
    """Barron's general robust loss, fixed shape and scale. pred, target (B,C,H,W) -> () mean rho(x, alpha, c).

    With x = pred - target, c = `scale` (RAW units) and z = (x/c)^2 (Barron, CVPR 2019, eq. 1):

        rho = |alpha-2|/alpha * ((z/|alpha-2| + 1)^(alpha/2) - 1)     alpha not in {0, 2, -inf}
        rho = z/2                                                       alpha = 2 (L2)
        rho = log(z/2 + 1)                                              alpha = 0 (Cauchy)
        rho = 1 - exp(-z/2)                                             alpha = -inf (Welsch)

    alpha = 1 is sqrt(z + 1) - 1 (pseudo-Huber), alpha = -2 Geman-McClure 2z/(z + 4). The general
    form is evaluated as |alpha-2|/alpha * expm1(alpha/2 * log1p(z/|alpha-2|)), which has no
    cancellation near alpha = 0 (expm1(u)/alpha with u ~ alpha) nor near alpha = 2 (the ratio
    z/|alpha-2| is large, not cancelling), so alphas within 1e-8 of either limit agree with the
    limit to rounding; |alpha - 2| < 1e-12 is taken as alpha = 2.
    """
    _check_pair(pred, target, "robust")
    if math.isnan(alpha) or alpha == math.inf:
        raise InputError(f"robust: alpha must be a number or -inf, got {alpha}")
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"robust: scale must be a finite number > 0, got {scale}")
    scaled = (pred - target) / scale
    z = scaled * scaled
    if alpha == -math.inf:
        rho = -torch.expm1(-0.5 * z)
    elif alpha == 0.0:
        rho = torch.log1p(0.5 * z)
    elif abs(alpha - 2.0) < _ALPHA_TWO_SNAP:
        rho = 0.5 * z
    else:
        shape = abs(alpha - 2.0)
        rho = (shape / alpha) * torch.expm1(0.5 * alpha * torch.log1p(z / shape))
    return rho.mean()


def crosstalk_consistency(
    pred_mosaic: torch.Tensor,
    aligned_input_mosaic: torch.Tensor,
    kernel: torch.Tensor,
    cfa=None,
    packed: bool = False,
) -> torch.Tensor:
    """Crosstalk data consistency. pred (B,1,H,W) clean RAW, aligned input (B,1,H,W), kernel (P,P,3,3) -> () mean |K*pred - input|.

    The per-site crosstalk kernel K (`rawrestore.physics.crosstalk`, gather form, zero padding)
    is applied to the PREDICTED full-resolution mosaic only; the exposure-aligned dark input is
    the measurement and is used as given, never convolved. With `packed=True` both tensors are
    packed ``(B,4|9,h,w)`` and are first unpacked with `isp.cfa.unpack(…, cfa)`, since crosstalk
    acts between neighbouring photosites of the mosaic, not between packed channels. The kernel's
    site (i % P, j % P) is counted from the mosaic's top-left pixel, like the CFA.
    """
    if packed:
        if cfa is None:
            raise InputError("crosstalk_consistency: packed inputs need the cfa to unpack them; pass cfa=(P,P) or (B,P,P)")
        pred_mosaic = unpack(pred_mosaic, cfa)
        aligned_input_mosaic = unpack(aligned_input_mosaic, cfa)
    _check_pair(pred_mosaic, aligned_input_mosaic, "crosstalk_consistency")
    if pred_mosaic.shape[1] != 1:
        raise InputError(
            f"crosstalk_consistency: expected (B,1,H,W) mosaics, got {tuple(pred_mosaic.shape)}; pass packed=True and the cfa for packed RAW"
        )
    period = kernel.shape[0] if isinstance(kernel, torch.Tensor) and kernel.ndim == 4 else None
    if cfa is not None and period is not None and torch.as_tensor(cfa).shape[-1] != period:
        raise InputError(f"crosstalk_consistency: kernel period {period} does not match the CFA period {torch.as_tensor(cfa).shape[-1]}")
    return (apply_crosstalk(pred_mosaic, kernel) - aligned_input_mosaic).abs().mean()


class L1Loss(LossTerm):
    """Module form of `l1`. (B,C,H,W), (B,C,H,W) -> ()."""

    domain: ClassVar[str] = "raw"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l1(pred, target)


class CharbonnierLoss(LossTerm):
    """Module form of `charbonnier` with a fixed eps. (B,C,H,W), (B,C,H,W) -> ()."""

    domain: ClassVar[str] = "raw"

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> CharbonnierLoss:
        return cls(term.eps)

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        if not (math.isfinite(eps) and eps > 0):
            raise InputError(f"charbonnier: eps must be a finite number > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return charbonnier(pred, target, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class RobustLoss(LossTerm):
    """Module form of `robust` with fixed alpha and scale. (B,C,H,W), (B,C,H,W) -> ()."""

    domain: ClassVar[str] = "raw"

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> RobustLoss:
        return cls(term.alpha, term.scale)

    def __init__(self, alpha: float = 1.0, scale: float = 0.01):
        super().__init__()
        if math.isnan(alpha) or alpha == math.inf:
            raise InputError(f"robust: alpha must be a number or -inf, got {alpha}")
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"robust: scale must be a finite number > 0, got {scale}")
        self.alpha, self.scale = float(alpha), float(scale)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return robust(pred, target, self.alpha, self.scale)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, scale={self.scale}"


class CrosstalkConsistencyLoss(LossTerm):
    """Module form of `crosstalk_consistency`. mosaics (B,1,H,W) -> ().

    The (P,P,3,3) kernel is a non-persistent buffer (it comes from the config, not a
    checkpoint). Built from a `spec` without a kernel, it builds the kernel for the CFA period of
    the first `cfa` it is called with; a batch of another period is an InputError. `others`
    holds kernels of further periods, for runs that mix Bayer and X-Trans sources (`data.sources`).
    """

    domain: ClassVar[str] = "mosaic"

    def __init__(self, kernel: torch.Tensor | None = None, spec: str | None = None,
                 others: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.other_periods: tuple[int, ...] = ()
        for other in others:
            if kernel is None or other.ndim != 4 or other.shape[2:] != (3, 3) or other.shape[0] == kernel.shape[0]:
                raise InputError("crosstalk: further kernels need a main kernel and one (P,P,3,3) kernel per other period")
            self.register_buffer(f"kernel_{other.shape[0]}", other.detach().clone(), persistent=False)
            self.other_periods += (int(other.shape[0]),)
        if kernel is None:
            if spec is None:
                raise InputError("CrosstalkConsistencyLoss needs a (P,P,3,3) kernel or a kernel spec")
            check_kernel_spec(spec)
        elif not isinstance(kernel, torch.Tensor) or kernel.ndim != 4 or kernel.shape[2:] != (3, 3) or kernel.shape[0] != kernel.shape[1]:
            raise InputError(f"crosstalk kernel must be a (P,P,3,3) tensor, got {getattr(kernel, 'shape', type(kernel).__name__)}")
        self.spec = spec
        self.register_buffer("kernel", None if kernel is None else kernel.detach().clone(), persistent=False)

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> CrosstalkConsistencyLoss:
        period = context.cfa_period
        spec = context.crosstalk_kernel
        if period is None:
            return cls(spec=spec)
        others = tuple(build_kernel(spec, other) for other in context.other_periods if other != period)
        return cls(build_kernel(spec, period), spec=spec, others=others)

    def forward(self, pred_mosaic: torch.Tensor, aligned_input_mosaic: torch.Tensor, cfa=None, packed: bool = False) -> torch.Tensor:
        if self.kernel is None:
            if cfa is None:
                raise InputError("crosstalk consistency built from a spec needs the batch's cfa to pick its kernel")
            self.kernel = build_kernel(self.spec, int(torch.as_tensor(cfa).shape[-1])).to(pred_mosaic.device)
        elif cfa is not None and torch.as_tensor(cfa).shape[-1] != self.period:
            period = int(torch.as_tensor(cfa).shape[-1])
            if period not in self.other_periods:
                raise InputError(f"crosstalk kernel is for CFA period {self.period} but the batch has period "
                                 f"{period}; one stack per camera")
            kernel = getattr(self, f"kernel_{period}")
            return crosstalk_consistency(pred_mosaic, aligned_input_mosaic, kernel, cfa=cfa, packed=packed)
        return crosstalk_consistency(pred_mosaic, aligned_input_mosaic, self.kernel, cfa=cfa, packed=packed)

    @property
    def period(self) -> int:
        """CFA period P the kernel is built for (2 Bayer, 6 X-Trans)."""
        return int(self.kernel.shape[0])
