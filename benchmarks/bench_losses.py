"""Training-step time with the full loss stack vs RAW-L1 alone: SID U-Net, same crop and batch, forward + backward.

Rows: the full default stack (RAW-L1, crosstalk, VGG-19 perceptual, LPIPS, CIEDE2000, SSIM), the
same with a half-size render for the sRGB terms, that with VGG and LPIPS on a window of half
the render's side (`loss.backbone_window: 0.5`), and the stack without the two pretrained
networks, each against RAW-L1 alone; then the full and half-size stacks with mixed precision
(train.amp: the model and the frozen VGG/LPIPS under autocast, bf16 on the CPU) against RAW-L1
with the same mixed precision. VGG/LPIPS use RANDOM backbones (allow_random_backbones):
the timing is the same as with ImageNet weights, the values are not. Goal: full / RAW-L1 <= 1.6.
Issue 16's terms get a row each: RAW-L1 + the term (Gram, Sobel edge, blurred colour, the S3Net
perceptual preset, the adversarial loss with its discriminator step) against RAW-L1 alone.

Usage: python benchmarks/bench_losses.py [--crop 256] [--batch 1] [--repeats 5] [--kinds full gram ...]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from typing import Callable

import torch

from rawrestore.config.schema import LossConfig
from rawrestore.losses import LossStack
from rawrestore.models import build_model
from rawrestore.train.optim import build_discriminator_optimizer
from rawrestore.train.step import discriminator_step

CAM_TO_SRGB = [[1.8, -0.6, -0.2], [-0.2, 1.5, -0.3], [0.05, -0.5, 1.45]]

STEP = 850  # 85% of the run: the perceptual ramp is on, so every term is weighted
TOTAL_STEPS = 1000


# RAW-L1 plus one sRGB term at weight 0.1 (issue 16's terms); "s3net" is the perceptual term with that preset
SINGLE_TERMS = ("gram", "sobel_edge", "blur_color", "s3net", "gan")
KINDS = ("full", "half", "half_window", "no_backbones") + SINGLE_TERMS


def _config(kind: str) -> LossConfig:
    """'full' (defaults), 'half' (defaults, half-size render), 'half_window' (+ VGG/LPIPS on a half-side window),
    'no_backbones', 'raw_l1', or one of SINGLE_TERMS (RAW-L1 + that term)."""
    config = LossConfig()
    if kind in SINGLE_TERMS:
        for term in config.terms().values():
            term.weight = 0.0
        config.raw_l1.weight = 1.0
        if kind == "s3net":
            config.perceptual.preset = "s3net"
        term = config.perceptual if kind == "s3net" else getattr(config, kind)
        term.weight, term.schedule = 0.1, "fixed"
        return config
    if kind in ("half", "half_window"):
        config.render_demosaic = "half"
    if kind == "half_window":
        config.backbone_window = 0.5
    if kind in ("no_backbones", "raw_l1"):
        config.perceptual.weight = config.lpips.weight = 0.0
    if kind == "raw_l1":
        for name, term in config.terms().items():
            if name != "raw_l1":
                term.weight = 0.0
    return config


@contextlib.contextmanager
def _quiet():
    """Silence the (expected) random-backbone warnings while the stacks are built."""
    loggers = [logging.getLogger(name) for name in ("rawrestore.pretrained", "rawrestore.losses")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _best_of_interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best time of each fn over `repeats` rounds, the fns taking turns in every round (load drift hits all alike)."""
    for fn in fns.values():
        fn()  # warm-up: plan caches, allocator, oneDNN kernels
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run(crop: int = 256, batch: int = 1, repeats: int = 5, width: int = 32, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model("unet", in_channels=4, base=width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = crop // 2
    target = 0.05 + 0.5 * torch.rand(batch, 4, size, size, device=device)
    data = {
        "target": target,
        "input": (target + 0.05 * torch.randn_like(target)).clamp(0, 1),
        "cfa": torch.tensor([[0, 1], [1, 2]], device=device),
        "wb": torch.tensor([2.0, 1.0, 1.5], device=device),
        "cam_to_srgb": torch.tensor(CAM_TO_SRGB, device=device),
    }
    with _quiet():
        stacks = {kind: LossStack(_config(kind), TOTAL_STEPS, cfa_period=2, allow_random_backbones=True).to(device)
                  for kind in ("raw_l1",) + tuple(kinds)}

    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    # loss.gan: the discriminator's own optimiser and step, as the trainer runs them
    d_optimizers = {kind: build_discriminator_optimizer(stack.adversary.discriminator, stack.config.gan, device)
                    for kind, stack in stacks.items() if stack.adversary is not None}
    no_skip = torch.zeros((), dtype=torch.bool, device=device)

    def step(kind: str, amp: bool = False) -> Callable[[], None]:
        def one() -> None:
            optimizer.zero_grad(set_to_none=True)
            stacks[kind].backbone_dtype = amp_dtype if amp else None
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):  # what train.amp does
                pred = model(data["input"])
            total, _ = stacks[kind](pred.float(), data, STEP)
            total.backward()
            optimizer.step()
            if kind in d_optimizers:
                discriminator_step(stacks[kind].adversary, d_optimizers[kind], [stacks[kind].last_renders], no_skip)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return one

    times = _best_of_interleaved({kind: step(kind) for kind in stacks}, repeats)
    amp_kinds = [kind for kind in ("full", "half") if kind in kinds]
    amp_times = _best_of_interleaved({kind: step(kind, amp=True) for kind in ["raw_l1"] + amp_kinds}, repeats) if amp_kinds else {}
    shape = f"UNet({width}) batch {batch}, {crop}x{crop} Bayer crop ({size}x{size} packed), {device.type}"
    notes = {
        "full": "default stack (VGG-19 relu3_3+relu4_3, LPIPS-alex, dE00, SSIM, crosstalk, RAW-L1); RANDOM backbones; goal ratio <= 1.6",
        "half": "default stack, sRGB terms on the half-size render (render_demosaic=half); RANDOM backbones",
        "half_window": "as half, VGG and LPIPS on a window of half the render's side (loss.backbone_window=0.5); RANDOM backbones",
        "no_backbones": "default stack without VGG/LPIPS (RAW-L1, crosstalk, dE00, SSIM)",
        "gram": "RAW-L1 + Gram style loss on VGG-19 relu1_1..relu5_1 (weight 0.1); RANDOM backbone",
        "sobel_edge": "RAW-L1 + edge-masked Sobel loss (weight 0.1)",
        "blur_color": "RAW-L1 + blurred-colour loss, sigma 3 (weight 0.1)",
        "s3net": "RAW-L1 + VGG-19 perceptual with preset s3net (relu1_1..relu5_1, 1/32..1; weight 0.1); RANDOM backbone",
        "gan": "RAW-L1 + adversarial loss (vanilla, 70x70 PatchGAN width 64; weight 0.1) and its discriminator step",
    }
    amp_name = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    rows = [
        {"name": f"train step, loss={kind}: {shape}", "ours_s": times[kind], "reference_s": times["raw_l1"],
         "ratio": times[kind] / times["raw_l1"], "note": f"reference: RAW-L1 alone; {notes[kind]}"}
        for kind in kinds
    ]
    rows += [
        {"name": f"train step, loss={kind}, amp {amp_name}: {shape}", "ours_s": amp_times[kind],
         "reference_s": amp_times["raw_l1"], "ratio": amp_times[kind] / amp_times["raw_l1"],
         "note": f"reference: RAW-L1 alone, same amp; {notes[kind]}; model and VGG/LPIPS under autocast (train.amp={amp_name})"}
        for kind in amp_kinds
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="stacks to time against RAW-L1")
    args = parser.parse_args()
    for row in run(args.crop, args.batch, args.repeats, kinds=tuple(args.kinds)):
        print(row)
