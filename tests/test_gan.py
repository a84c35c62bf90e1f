"""The adversarial loss (`loss.gan`): objectives against explicit formulas, the PatchGAN's grid and receptive field,
gradients, config checks, and a short run that trains both networks, logs both losses and resumes bit-exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rawrestore.config import load_config
from rawrestore.config.schema import LossConfig
from rawrestore.errors import ConfigError, InputError
from rawrestore.losses import LossStack, discriminator_accuracy, discriminator_loss, generator_loss
from rawrestore.losses.adversarial import AdversarialLoss
from rawrestore.models.discriminator import PatchDiscriminator, min_input_size, patch_grid, receptive_field
from rawrestore.train import checkpoint as ckpt
from rawrestore.train.runlog import read_log
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml

CAM_TO_SRGB = [[1.7, -0.5, -0.2], [-0.2, 1.5, -0.3], [0.0, -0.4, 1.4]]
GAN = ["loss.gan.weight=0.1", "loss.gan.width=8", "loss.gan.warmup=1"]


def quiet(_: str) -> None:
    """Swallow the trainer's progress lines."""


# ------------------------------------------------------------------ objectives


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x))


def _reference(real: np.ndarray, fake: np.ndarray, kind: str, relativistic: bool) -> tuple[float, float, float]:
    """(D loss, G loss, D accuracy) written out in numpy from the papers' definitions."""
    if relativistic:
        r, f = real - fake.mean(), fake - real.mean()
        if kind == "vanilla":  # -log sigmoid(x) = softplus(-x), -log(1 - sigmoid(x)) = softplus(x)
            d = 0.5 * (_softplus(-r).mean() + _softplus(f).mean())
            g = 0.5 * (_softplus(r).mean() + _softplus(-f).mean())
        elif kind == "lsgan":  # RaLSGAN, targets +1 / -1
            d = 0.5 * (((r - 1) ** 2).mean() + ((f + 1) ** 2).mean())
            g = 0.5 * (((r + 1) ** 2).mean() + ((f - 1) ** 2).mean())
        else:  # RaHinge
            d = 0.5 * (np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean())
            g = 0.5 * (np.maximum(0, 1 + r).mean() + np.maximum(0, 1 - f).mean())
        accuracy = 0.5 * ((r > 0).mean() + (f <= 0).mean())
        return float(d), float(g), float(accuracy)
    if kind == "vanilla":
        d = 0.5 * (-np.log(1 / (1 + np.exp(-real))).mean() - np.log(1 - 1 / (1 + np.exp(-fake))).mean())
        g = -np.log(1 / (1 + np.exp(-fake))).mean()
        threshold = 0.0
    elif kind == "lsgan":
        d = 0.5 * (((real - 1) ** 2).mean() + (fake ** 2).mean())
        g = ((fake - 1) ** 2).mean()
        threshold = 0.5
    else:
        d = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
        g = -fake.mean()
        threshold = 0.0
    return float(d), float(g), float(0.5 * ((real > threshold).mean() + (fake <= threshold).mean()))


@pytest.mark.parametrize("relativistic", [False, True])
@pytest.mark.parametrize("kind", ["vanilla", "lsgan", "hinge"])
def test_objectives_match_the_written_out_formulas(kind, relativistic):
    generator = torch.Generator().manual_seed(1)
    real = (0.8 + 1.5 * torch.randn(2, 1, 5, 6, generator=generator, dtype=torch.float64))
    fake = (-0.3 + 1.5 * torch.randn(2, 1, 5, 6, generator=generator, dtype=torch.float64))
    d_ref, g_ref, acc_ref = _reference(real.numpy(), fake.numpy(), kind, relativistic)
    assert discriminator_loss(real, fake, kind, relativistic).item() == pytest.approx(d_ref, rel=1e-12)
    assert generator_loss(fake, real, kind, relativistic).item() == pytest.approx(g_ref, rel=1e-12)
    assert discriminator_accuracy(real, fake, kind, relativistic).item() == pytest.approx(acc_ref, abs=1e-12)
    assert 0.2 < acc_ref < 0.95  # the logits straddle the threshold: the accuracy is no trivial 0 or 1


def test_vanilla_is_torchs_binary_cross_entropy():
    real, fake = torch.tensor([[2.0, -0.5], [0.3, 1.1]]), torch.tensor([[-1.0, 0.4], [0.2, -2.2]])
    bce = F.binary_cross_entropy_with_logits
    expected_d = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert generator_loss(fake, None, "vanilla").item() == pytest.approx(bce(fake, torch.ones_like(fake)).item(), rel=1e-6)
    # ESRGAN's relativistic generator: mean of BCE(r - mean f, 0) and BCE(f - mean r, 1)
    esrgan = 0.5 * (bce(real - fake.mean(), torch.zeros_like(real)) + bce(fake - real.mean(), torch.ones_like(fake)))
    assert generator_loss(fake, real, "vanilla", True).item() == pytest.approx(esrgan.item(), rel=1e-6)
    assert discriminator_accuracy(real, fake, "vanilla").item() == pytest.approx(0.5 * (3 / 4 + 2 / 4))


# ------------------------------------------------------------------ discriminator


def test_patch_grid_and_receptive_field():
    torch.manual_seed(0)
    assert [receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]  # pix2pix's 16x16 and 70x70 PatchGANs
    net = PatchDiscriminator(width=4, n_layers=3, norm="none").double()
    assert net(torch.rand(2, 3, 64, 80, dtype=torch.float64)).shape == (2, 1, 6, 8) == (2, 1, patch_grid(64, 3), patch_grid(80, 3))
    assert net(torch.rand(1, 3, 24, 24, dtype=torch.float64)).shape == (1, 1, 1, 1) and min_input_size(3) == 24
    # the input pixels one logit depends on: its gradient's support is receptive_field pixels a side
    image = torch.rand(1, 3, 160, 160, dtype=torch.float64, requires_grad=True)
    logits = net(image)
    logits[0, 0, logits.shape[-2] // 2, logits.shape[-1] // 2].backward()
    rows = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()
    cols = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
    assert int(rows[-1] - rows[0]) + 1 == int(cols[-1] - cols[0]) + 1 == 70
    with pytest.raises(InputError, match="smaller than the 24 pixels"):
        net(torch.rand(1, 3, 20, 40, dtype=torch.float64))


@pytest.mark.parametrize("options", [{"kind": "vanilla"}, {"kind": "lsgan", "relativistic": True, "spectral_norm": True}])
def test_generator_term_trains_the_generator_only_and_gradchecks(options):
    torch.manual_seed(0)
    term = AdversarialLoss(width=4, n_layers=1, norm="none", **options).double()
    pred = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    term.eval()  # spectral norm's power iteration would move between gradcheck's evaluations
    assert torch.autograd.gradcheck(lambda p: term(p, target[:1]), (pred[:1].detach().requires_grad_(),))
    term.train()
    term(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.discriminator.parameters())  # no gradient from the generator's loss
    assert all(p.requires_grad for p in term.discriminator.parameters())
    pred.grad = None
    pairs = [(pred.detach(), target), (target.flip(-1), target)]  # two micro-batches
    with torch.no_grad():
        expected = [discriminator_loss(term.discriminator(real), term.discriminator(fake), term.kind, term.relativistic)
                    for fake, real in pairs]
    loss, accuracy = term.discriminator_backward(pairs)
    grads = [p.grad for p in term.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert pred.grad is None and not loss.requires_grad and 0.0 <= accuracy.item() <= 1.0
    if not options.get("spectral_norm"):  # (spectral norm's power iteration moves the weights at every forward)
        assert loss.item() == pytest.approx(0.5 * (expected[0].item() + expected[1].item()), rel=1e-12)


def test_stack_keeps_the_discriminator_out_of_the_trainable_parameters():
    config = LossConfig()
    for term in config.terms().values():
        term.weight, term.end_weight, term.start_weight = 0.0, None, None
    config.raw_l1.weight, config.gan.weight, config.gan.width, config.gan.warmup = 1.0, 0.5, 4, 3
    stack = LossStack(config, total_steps=10, cfa_period=2)
    assert stack.adversary is stack.terms["gan"] and stack.trainable_parameters() == []
    assert any(key.startswith("terms.gan.discriminator.") for key in stack.state_dict())
    generator = torch.Generator().manual_seed(0)
    target = 0.05 + 0.3 * torch.rand(2, 4, 16, 16, generator=generator)
    pred = (target + 0.02).requires_grad_()
    batch = {"target": target, "input": target, "cfa": torch.tensor([[0, 1], [1, 2]]),
             "wb": torch.tensor([2.0, 1.0, 1.5]), "cam_to_srgb": torch.tensor(CAM_TO_SRGB)}
    assert stack.weights_now(2)["gan"] == 0.0 and stack.weights_now(3)["gan"] == 0.5  # warm-up: off for steps 0-2
    total, values = stack(pred, batch, step=5)
    pred_srgb, target_srgb = stack.last_renders
    assert not pred_srgb.requires_grad and pred_srgb.shape == (2, 3, 32, 32) and stack.renders_last_step == 2
    expected = generator_loss(stack.adversary.discriminator(pred_srgb), None, "vanilla")
    assert values["gan"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.item() == pytest.approx(values["raw_l1"].item() + 0.5 * expected.item(), rel=1e-6)


# ------------------------------------------------------------------ config


def test_config_errors_name_the_key(tmp_path, data_root):
    config = tiny_yaml(tmp_path, data_root)
    cases = {
        "loss.gan.kind=wgan": "loss.gan.kind' must be one of 'vanilla', 'lsgan', 'hinge', got 'wgan'",
        "loss.gan.betas=[0.5]": "loss.gan.betas' must be two numbers in [0, 1)",
        "loss.gan.lr=0": "loss.gan.lr' must be a finite number > 0",
        "loss.weighting=uncertainty": "loss.weighting' must be 'fixed' while loss.gan.weight > 0",
        "loss.gan.warmup=6": "loss.gan.warmup' must be < train.iterations=6",
        "loss.gan.n_layers=5": "the 5-layer discriminator of 'loss.gan' needs 96",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as error:
            load_config(config, ["loss.gan.weight=0.1", override])
        assert message in str(error.value) and "\n" not in str(error.value), override
    assert LossConfig().gan.weight == 0.0 and not LossConfig().gan.active  # off by default


# ------------------------------------------------------------------ training


def test_short_run_trains_both_networks_logs_both_losses_and_resumes_bit_exactly(tmp_path, data_root):
    """4 steps straight == 2 steps, resume, 2 steps: model, discriminator, both optimisers bit-identical."""
    config = tiny_yaml(tmp_path, data_root, iterations=4, val_every=0, ckpt_every=2)
    overrides = GAN + ["loss.gan.kind=hinge", "loss.gan.relativistic=true", "loss.gan.spectral_norm=true",
                       "train.accumulate=2"]
    straight = Trainer(load_config(config, overrides + [f"output_dir={tmp_path}/a"]), log=quiet, progress=False)
    initial_model = {k: v.clone() for k, v in straight.net.state_dict().items()}
    initial_loss = {k: v.clone() for k, v in straight.loss.state_dict().items()}
    assert straight.fit().step == 4

    split = load_config(config, overrides + [f"output_dir={tmp_path}/b"])
    assert Trainer(split, log=quiet, progress=False).fit(stop_at=2).step == 2
    second = Trainer(split, log=quiet, progress=False)
    assert second.resume("auto") and second.step == 2 and second.fit().step == 4

    a = ckpt.load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    b = ckpt.load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    for key in ("model", "loss"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("optimizer", "discriminator_optimizer"):
        states_a, states_b = a[key]["state"], b[key]["state"]
        assert len(states_a) == len(states_b) > 0
        for sa, sb in zip(states_a.values(), states_b.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    # the discriminator trained after its one warm-up step only: 3 updates
    assert {int(s["step"]) for s in a["discriminator_optimizer"]["state"].values()} == {3}
    discriminator = [k for k in a["loss"] if k.startswith("terms.gan.discriminator.")]
    assert discriminator and any(not torch.equal(a["loss"][k], initial_loss[k]) for k in discriminator)
    assert any(not torch.equal(a["model"][k], initial_model[k]) for k in initial_model)

    records = [r for r in read_log(tmp_path / "a/log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["terms"]["gan"]["weight"] == 0.0 and "gan/d_loss" not in records[0]  # warm-up
    for record in records[1:]:
        assert record["terms"]["gan"]["weight"] == 0.1 and np.isfinite(record["terms"]["gan"]["value"])
        assert np.isfinite(record["gan/d_loss"]) and 0.0 <= record["gan/d_acc"] <= 1.0
    resumed = [r for r in read_log(tmp_path / "b/log.jsonl") if "loss" in r]
    assert [(r["loss"], r.get("gan/d_loss")) for r in resumed] == [(r["loss"], r.get("gan/d_loss")) for r in records]
