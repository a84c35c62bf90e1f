"""Restoration networks: shapes, exact residual identity, parameter counts, widths, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rawrestore.errors import ConfigError
from rawrestore.models import MODELS, NAFNet, UNet, build_model, build_model_from_config, count_parameters
from rawrestore.models.nafnet import LayerNorm2d, NAFBlock, simple_gate
from rawrestore.models.unet import pad_to_multiple

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_nafnet(in_channels: int, residual: bool = False) -> NAFNet:
    return NAFNet(in_channels, width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1], residual=residual)


def tiny_unet(in_channels: int, residual: bool = False) -> UNet:
    return UNet(in_channels, base=4, residual=residual)


BUILDERS = {"unet": tiny_unet, "nafnet": tiny_nafnet}


def conv_params(c_in: int, c_out: int, kernel: int) -> int:
    """Weights + biases of a (transposed) convolution."""
    return kernel * kernel * c_in * c_out + c_out


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("in_channels, height, width", [(4, 37, 45), (9, 21, 30), (4, 5, 3)])
@pytest.mark.parametrize("device", DEVICES)
def test_output_shape_any_size(name, in_channels, height, width, device):
    torch.manual_seed(0)
    model = BUILDERS[name](in_channels).to(device)
    x = torch.rand(2, in_channels, height, width, device=device)
    y = model(x)
    assert y.shape == (2, in_channels, height, width)
    assert y.device == x.device and y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_float64_forward(name):
    torch.manual_seed(0)
    model = BUILDERS[name](4).double()
    y = model(torch.rand(1, 4, 20, 20, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("in_channels", [4, 9])
def test_residual_with_zero_last_layer_is_identity(name, in_channels):
    torch.manual_seed(0)
    model = BUILDERS[name](in_channels, residual=True)
    last = model.head if name == "unet" else model.ending
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    x = torch.rand(2, in_channels, 19, 26)
    assert torch.equal(model(x), x)


def test_unet_parameter_count_matches_layer_formula():
    widths = [32, 64, 128, 256, 512]
    expected = 0
    previous = 4
    for width in widths:  # encoder: two 3x3 convs per level
        expected += conv_params(previous, width, 3) + conv_params(width, width, 3)
        previous = width
    for width in reversed(widths[:-1]):  # 2x2 transposed conv up, then two 3x3 convs on the concat
        expected += conv_params(previous, width, 2) + conv_params(2 * width, width, 3) + conv_params(width, width, 3)
        previous = width
    expected += conv_params(32, 4, 1)
    model = UNet(in_channels=4, base=32)
    assert count_parameters(model) == expected == 7_760_484


def test_unet_level_widths():
    model = UNet(4)
    assert [block.out_channels for block in model.encoder] == [32, 64, 128, 256, 512]
    assert [conv.out_channels for conv in model.upsample] == [256, 128, 64, 32]
    assert [block[0].in_channels for block in model.decoder] == [512, 256, 128, 64]
    assert model.encoder[0][0].in_channels == 4 and model.head.out_channels == 4
    assert model.encoder[0][0].kernel_size == (3, 3) and model.encoder[0][1].negative_slope == 0.2
    assert UNet(9, base=32, width_mult=0.5).widths == (16, 32, 64, 128, 256)
    assert UNet(9).head.out_channels == 9


def test_nafnet_structure():
    model = NAFNet(4, width=16, enc_blocks=[1, 2, 3], middle_blocks=2, dec_blocks=[1, 1, 2])
    assert [len(level) for level in model.encoders] == [1, 2, 3]
    assert len(model.middle) == 2 and [len(level) for level in model.decoders] == [1, 1, 2]
    assert [down.out_channels for down in model.downs] == [32, 64, 128]
    assert [level[0].norm1.weight.numel() for level in model.decoders] == [64, 32, 16]
    assert model.size_multiple == 8
    with pytest.raises(ConfigError, match="dec_blocks"):
        NAFNet(4, enc_blocks=[1, 1], dec_blocks=[1])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = BUILDERS[name](4)
    if name == "nafnet":  # beta/gamma start at 0, which blocks the gradient into the branches
        with torch.no_grad():
            for block in model.modules():
                if isinstance(block, NAFBlock):
                    block.beta.fill_(0.1)
                    block.gamma.fill_(0.1)
    x = torch.rand(2, 4, 18, 22, requires_grad=True)
    model(x).square().mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_init_is_deterministic_under_seed(name):
    torch.manual_seed(3)
    first = BUILDERS[name](4).state_dict()
    torch.manual_seed(3)
    second = BUILDERS[name](4).state_dict()
    torch.manual_seed(4)
    third = BUILDERS[name](4).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_pad_to_multiple_reflects_and_reports_size():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    padded, height, width = pad_to_multiple(x, 4)
    assert (height, width) == (5, 7) and padded.shape == (1, 2, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :])  # reflect: row 5 mirrors row 3 about row 4
    assert torch.equal(padded[..., :5, 7], x[..., :, 5])
    unchanged, _, _ = pad_to_multiple(x[..., :4, :4], 4)
    assert unchanged.shape == (1, 2, 4, 4)


def test_layernorm2d_matches_torch_layer_norm():
    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 5, 4)
    reference = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), reference, rtol=1e-5, atol=1e-5)


def test_simple_gate_multiplies_halves():
    x = torch.tensor([2.0, 3.0, 5.0, 7.0]).reshape(1, 4, 1, 1)
    assert torch.equal(simple_gate(x).flatten(), torch.tensor([10.0, 21.0]))


def test_nafblock_gradcheck_float64():
    torch.manual_seed(0)
    block = NAFBlock(4).double()
    with torch.no_grad():
        block.beta.fill_(0.5)
        block.gamma.fill_(0.5)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


def test_fresh_nafblock_is_identity():
    block = NAFBlock(8)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), x)


def test_registry_and_builders():
    assert {name: spec.cls for name, spec in MODELS.items()} == {"unet": UNet, "nafnet": NAFNet}
    with pytest.raises(ConfigError, match=r"unknown model 'resnet'.*nafnet, unet"):
        build_model("resnet")
    model = build_model("unet", in_channels=9, base=8)
    assert isinstance(model, UNet) and model.widths[0] == 8

    from rawrestore.config import ModelConfig

    config = ModelConfig(name="nafnet", width=8, residual=True, nafnet_blocks=[1, 2], nafnet_middle_blocks=1)
    built = build_model_from_config(config, in_channels=9)
    assert isinstance(built, NAFNet) and built.residual
    assert [len(level) for level in built.encoders] == [1, 2]
    assert [len(level) for level in built.decoders] == [1, 1]
    assert count_parameters(built) == count_parameters(
        NAFNet(9, width=8, enc_blocks=[1, 2], middle_blocks=1, residual=True)
    )


def test_count_parameters_trainable_only():
    model = tiny_unet(4)
    total = count_parameters(model)
    model.head.weight.requires_grad_(False)
    assert count_parameters(model) == total - model.head.weight.numel()
    assert count_parameters(model, trainable_only=False) == total


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match=r"\(B,4,H,W\)"):
        tiny_unet(4)(torch.rand(1, 9, 16, 16))
