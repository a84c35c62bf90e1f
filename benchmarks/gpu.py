"""The GPU path in one command: step times, data-loader throughput, peak memory, 12 MP inference.

    python benchmarks/gpu.py [--steps 20] [--batch 1] [--workers 4] [--amp auto]

On a machine with a CUDA GPU it prints, for SID's 512x512 packed crop (1024x1024 RAW):
  - step time of RAW-L1 alone (SID), of configs/demo.yaml's stack, and of the full stack with VGG and
    LPIPS (pretrained weights when on disk, else random backbones of the same cost, said so);
  - the data loader's throughput (batches/s, with --workers processes) against the step rate:
    whether the GPU waits for data;
  - peak GPU memory per configuration;
  - restoring a 12 MP frame (2832x4240 RAW) with the demo U-Net, tiled 512/32, plus rendering.
On a CPU-only machine it says so and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _synchronized(fn) -> float:
    """Seconds of `fn()` including the GPU work it queued."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _trainer(root: Path, out: Path, extra: list[str], args: argparse.Namespace):
    from rawrestore.config import load_config
    from rawrestore.train.trainer import Trainer

    overrides = [f"data.root={root}", f"output_dir={out}", "data.crop_size=1024", f"data.num_workers={args.workers}",
                 f"train.batch_size={args.batch}", "train.val_every=0", "train.ckpt_every=0", "device=cuda",
                 f"train.amp={args.amp}", "train.log_every=1000000", *extra]
    return Trainer(load_config(REPO / "configs/demo.yaml", overrides), log=lambda _: None, progress=False)


def _step_rows(root: Path, tmp: Path, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    raw_l1 = ["loss.raw_l1.weight=1", "loss.robust.weight=0", "loss.crosstalk.weight=0", "loss.perceptual.weight=0",
              "loss.lpips.weight=0", "loss.delta_e00.weight=0", "loss.ssim.weight=0"]
    full = ["loss.perceptual.weight=0.02", "loss.lpips.weight=0.02", "loss.drop_missing_pretrained=false"]
    rows = []
    for name, extra in (("RAW-L1 alone (SID)", raw_l1), ("demo stack", []), ("full stack + VGG + LPIPS", full)):
        from rawrestore.errors import WeightsError
        from rawrestore.losses import LossStack

        folder = tmp / name.replace(" ", "_")
        try:
            trainer = _trainer(root, folder, extra, args)
            note = ""
        except WeightsError:  # no VGG/LPIPS weights here: random backbones cost the same
            trainer = _trainer(root, folder, [*extra[:-1], "loss.drop_missing_pretrained=true"], args)
            trainer.loss = LossStack(trainer.cfg.loss, trainer.cfg.train.iterations, cfa_period=2,
                                     allow_random_backbones=True).to(trainer.device)
            trainer.loss.backbone_dtype = trainer.autocast_dtype
            note = " (random VGG/LPIPS: weights not on disk)"
        batches = trainer._loader(0)
        trainer.model.train()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator
            trainer._train_step(batches)
        times = [_synchronized(lambda: trainer._train_step(batches)) for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append((name + note, statistics.median(times), peak))
        print(f"step  {name + note:58s} {statistics.median(times) * 1e3:8.1f} ms  peak {peak:6.2f} GiB", flush=True)
        del batches, trainer
        torch.cuda.empty_cache()
    return rows


def _loader_rate(root: Path, tmp: Path, args: argparse.Namespace) -> float:
    trainer = _trainer(root, tmp / "loader", [], args)
    batches = trainer._loader(0)
    for _ in range(3):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    return args.steps / (time.perf_counter() - start)


def _inference_s() -> float:
    import isp
    from rawrestore.config import load_config
    from rawrestore.models import build_model_from_config
    from rawrestore.tiling import tiled_apply

    cfg = load_config(REPO / "configs/demo.yaml")
    model = build_model_from_config(cfg.model, 4).cuda().eval().requires_grad_(False)
    packed = torch.rand(1, 4, 1416, 2120, device="cuda")
    renderer = isp.ISP("bilinear", "srgb")
    cfa = torch.tensor([[0, 1], [1, 2]])
    wb = torch.tensor([2.0, 1.0, 1.5], device="cuda")
    matrix = torch.eye(3, device="cuda")

    def restore() -> None:
        with torch.no_grad():
            renderer(tiled_apply(model, packed, 512, 32).clamp(0, 1), cfa, wb, matrix, packed=True)

    restore()
    return min(_synchronized(restore) for _ in range(3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=1, help="batch size (SID: 1)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--amp", default="auto", choices=["off", "bf16", "fp16", "auto"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure. "
              "Run it where a GPU is; the CPU figures are in benchmarks/run.py.")
        return 0
    sys.path.insert(0, str(REPO))
    from rawrestore.data.synth import generate

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | amp {args.amp} | batch {args.batch} | "
          f"crop 1024 RAW = 512 packed", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        root = generate(tmp / "synthetic", "sony", scenes=6, seed=0, size=1024, progress=False)
        rows = _step_rows(root, tmp, args)
        rate = _loader_rate(root, tmp, args)
        step_rate = 1.0 / rows[1][1]
        verdict = "the GPU waits for data" if rate < step_rate else "the loader keeps up"
        print(f"data  loader {rate:.1f} batches/s with {args.workers} workers vs demo step {step_rate:.1f} steps/s: {verdict}")
        print(f"infer 12 MP frame, demo U-Net, tiles 512/32 + render: {_inference_s() * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
