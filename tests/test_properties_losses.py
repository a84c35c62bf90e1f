"""Property tests (hypothesis): the loss stack gives a finite total and finite gradients for any
finite prediction, target and input in range, on Bayer and X-Trans, packed or not."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rawrestore.config.schema import LossConfig, LossTermConfig
from rawrestore.losses import LossStack
from tests.rawfixtures import BAYER_PHASES, XTRANS


def stack_config() -> LossConfig:
    cfg = LossConfig()
    cfg.perceptual = type(cfg.perceptual)(weight=0.0)  # backbones are covered by their own tests
    cfg.lpips = type(cfg.lpips)(weight=0.0)
    for name, weight in (("charbonnier", 0.5), ("robust", 0.5), ("edge", 0.1), ("color_angle", 0.1)):
        setattr(cfg, name, type(getattr(cfg, name))(weight=weight))
    return cfg


STACKS = {period: LossStack(stack_config(), total_steps=100, cfa_period=period) for period in (2, 6)}
value = st.floats(min_value=-0.25, max_value=1.5, allow_nan=False, allow_infinity=False)


@st.composite
def batches(draw):
    cfa = draw(st.sampled_from([BAYER_PHASES["RGGB"], BAYER_PHASES["GBRG"], XTRANS]))
    period = len(cfa)
    size = 24 if period == 6 else 16
    packed = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    special = draw(value)  # a constant region (zero chroma, clipped or black pixels) inside the random field
    g = torch.Generator().manual_seed(seed)
    def field():
        x = torch.rand(2, 1, size, size, generator=g, dtype=torch.float64) * 1.7 - 0.2
        x[..., : size // 2, : size // 2] = special
        return x
    pred, target, aligned = field(), field().clamp(0, 1), field()
    if packed:
        from isp.cfa import pack

        pred, target, aligned = (pack(t, cfa) for t in (pred, target, aligned))
    wb = torch.tensor([draw(st.floats(1.0, 3.0)), 1.0, draw(st.floats(1.0, 3.0))], dtype=torch.float64)
    batch = {"target": target, "input": aligned, "cfa": torch.tensor(cfa), "wb": wb,
             "cam_to_srgb": torch.tensor([[1.7, -0.5, -0.2], [-0.2, 1.4, -0.2], [0.0, -0.4, 1.4]], dtype=torch.float64),
             "packed": packed}
    return period, pred, batch


@settings(max_examples=25, deadline=None)
@given(batches(), st.integers(0, 100))
def test_stack_total_and_gradients_finite(sample, step):
    period, pred, batch = sample
    pred = pred.clone().requires_grad_()
    total, values = STACKS[period](pred, batch, step)
    assert total.ndim == 0 and torch.isfinite(total)
    assert all(bool(torch.isfinite(v)) for v in values.values())
    total.backward()
    assert pred.grad.shape == pred.shape and torch.isfinite(pred.grad).all()
