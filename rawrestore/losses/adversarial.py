"""Adversarial loss on the sRGB renders: GAN objectives as pure functions, and the term that owns its discriminator.

Logits come from `rawrestore.models.PatchDiscriminator`, one per patch; every mean below is
over batch and patches, and the discriminator's loss is the mean of its real and fake halves
(pix2pix halves the discriminator's objective).

    kind      discriminator (real logits r, fake f)            generator (fake f)
    vanilla   0.5 [softplus(-r) + softplus(f)]  (BCE real->1, fake->0)   softplus(-f)  (BCE fake->1)
    lsgan     0.5 [(r - 1)^2 + f^2]                          (f - 1)^2
    hinge     0.5 [relu(1 - r) + relu(1 + f)]                 -f

Relativistic average (`relativistic`; Jolicoeur-Martineau 2018, ESRGAN's RaGAN): with
r~ = r - mean(f) and f~ = f - mean(r) the discriminator judges r~ real and f~ fake, and the
generator, which then also sees the real renders, wants the opposite (both halves averaged):

    vanilla   D 0.5 [softplus(-r~) + softplus(f~)]   G 0.5 [softplus(r~) + softplus(-f~)]
    lsgan     D 0.5 [(r~ - 1)^2 + (f~ + 1)^2]        G 0.5 [(r~ + 1)^2 + (f~ - 1)^2]
    hinge     D 0.5 [relu(1 - r~) + relu(1 + f~)]    G 0.5 [relu(1 + r~) + relu(1 - f~)]

Accuracy is the mean of the share of real logits judged real and of fake logits judged fake:
above 0.5 for LSGAN's 0/1 targets, above 0 otherwise (r~ and f~ when relativistic).

`AdversarialLoss` (`loss.gan`) is the generator's term: forward(pred render, target render) ->
the generator loss, with the discriminator's parameters out of the graph (they get no gradient
from it). The discriminator is trained by the training step, not by the stack: after the
generator's update, `discriminator_backward(renders)` on the step's detached renders
(`LossStack.last_renders`), then the step's own optimiser (`rawrestore.train.step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rawrestore.errors import ConfigError, InputError
from rawrestore.losses.term import BuildContext, LossTerm
from rawrestore.models.discriminator import PatchDiscriminator

__all__ = ["GAN_KINDS", "GanObjective", "discriminator_loss", "generator_loss", "discriminator_accuracy", "AdversarialLoss"]

Penalty = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GanObjective:
    """One GAN kind: per-logit penalties for 'judged real' and 'judged fake', the generator's, and the decision threshold."""

    real: Penalty  # small when a logit says real
    fake: Penalty  # small when a logit says fake
    fake_relativistic: Penalty  # the fake side on relativistic logits
    generator: Penalty  # the non-relativistic generator's penalty on fake logits
    threshold: float  # a logit above it is judged real (non-relativistic)


def _vanilla_real(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(-x)  # = BCE-with-logits against 1


def _vanilla_fake(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)  # = BCE-with-logits against 0


def _ls_real(x: torch.Tensor) -> torch.Tensor:
    return (x - 1.0).square()


def _ls_fake(x: torch.Tensor) -> torch.Tensor:
    return x.square()


def _ls_fake_relativistic(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0).square()  # RaLSGAN's targets are +1 / -1


def _hinge_real(x: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - x)


def _hinge_fake(x: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 + x)


def _negated(x: torch.Tensor) -> torch.Tensor:
    return -x


# loss.gan.kind -> its objective
GAN_KINDS: dict[str, GanObjective] = {
    "vanilla": GanObjective(_vanilla_real, _vanilla_fake, _vanilla_fake, _vanilla_real, 0.0),
    "lsgan": GanObjective(_ls_real, _ls_fake, _ls_fake_relativistic, _ls_real, 0.5),
    "hinge": GanObjective(_hinge_real, _hinge_fake, _hinge_fake, _negated, 0.0),
}


def _objective(kind: str) -> GanObjective:
    if kind not in GAN_KINDS:
        raise ConfigError(f"loss.gan.kind must be one of {', '.join(GAN_KINDS)}, got {kind!r}")
    return GAN_KINDS[kind]


def _relative(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relativistic-average logits: (r - mean f, f - mean r)."""
    return real - fake.mean(), fake - real.mean()


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str, relativistic: bool = False) -> torch.Tensor:
    """The discriminator's loss (module docstring's table). real, fake logits (any shape) -> ()."""
    objective = _objective(kind)
    if relativistic:
        real, fake = _relative(real, fake)
        return 0.5 * (objective.real(real).mean() + objective.fake_relativistic(fake).mean())
    return 0.5 * (objective.real(real).mean() + objective.fake(fake).mean())


def generator_loss(fake: torch.Tensor, real: torch.Tensor | None, kind: str, relativistic: bool = False) -> torch.Tensor:
    """The generator's adversarial loss (module docstring's table). fake logits, real logits (relativistic only) -> ()."""
    objective = _objective(kind)
    if not relativistic:
        return objective.generator(fake).mean()
    if real is None:
        raise InputError("generator_loss: the relativistic form needs the real logits too")
    real, fake = _relative(real, fake)
    return 0.5 * (objective.fake_relativistic(real).mean() + objective.real(fake).mean())


def discriminator_accuracy(real: torch.Tensor, fake: torch.Tensor, kind: str, relativistic: bool = False) -> torch.Tensor:
    """Mean of the share of real logits judged real and of fake ones judged fake. -> () in [0, 1], no gradient."""
    threshold = 0.0 if relativistic else _objective(kind).threshold
    if relativistic:
        real, fake = _relative(real, fake)
    real, fake = real.detach(), fake.detach()
    return 0.5 * ((real > threshold).to(real.dtype).mean() + (fake <= threshold).to(fake.dtype).mean())


class AdversarialLoss(LossTerm):
    """`loss.gan`: the generator's adversarial loss against a PatchGAN discriminator it owns. (B,3,H,W) renders x2 -> ().

    The discriminator (`self.discriminator`) is in this module's state dict (so in the stack's and
    the checkpoint's) but not in `LossStack.trainable_parameters()`: it has its own optimiser.
    """

    domain = "srgb"

    def __init__(self, kind: str = "vanilla", relativistic: bool = False, width: int = 64, n_layers: int = 3,
                 norm: str = "instance", spectral_norm: bool = False):
        super().__init__()
        _objective(kind)
        self.kind = kind
        self.relativistic = bool(relativistic)
        self.discriminator = PatchDiscriminator(3, width=width, n_layers=n_layers, norm=norm, spectral_norm=spectral_norm)

    @classmethod
    def from_config(cls, term: Any, context: BuildContext) -> AdversarialLoss:
        return cls(kind=term.kind, relativistic=term.relativistic, width=term.width, n_layers=term.n_layers,
                   norm=term.norm, spectral_norm=term.spectral_norm)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise InputError(f"gan: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        discriminator = self.discriminator
        discriminator.requires_grad_(False)  # the generator's loss trains the generator only
        try:
            if self.relativistic:  # one pass over both renders (instance norm is per sample)
                fake, real = discriminator(torch.cat([pred, target.detach()])).chunk(2)
            else:
                fake, real = discriminator(pred), None
        finally:
            discriminator.requires_grad_(True)
        return generator_loss(fake, real, self.kind, self.relativistic)

    def discriminator_backward(self, renders: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the discriminator's loss, averaged over (pred, target) render pairs, into its parameters.

        The pairs are one step's micro-batches (detached). -> (mean loss (), mean accuracy ()), detached.
        """
        if not renders:
            raise InputError("gan: the discriminator step needs the renders of at least one micro-batch")
        losses, accuracies = [], []
        for pred, target in renders:
            real, fake = self.discriminator(torch.cat([target.detach(), pred.detach()])).chunk(2)
            loss = discriminator_loss(real, fake, self.kind, self.relativistic)
            (loss / len(renders)).backward()
            losses.append(loss.detach())
            accuracies.append(discriminator_accuracy(real, fake, self.kind, self.relativistic))
        return torch.stack(losses).mean(), torch.stack(accuracies).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, relativistic={self.relativistic}"
