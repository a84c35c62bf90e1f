"""Training and evaluation throughput on the CPU: full-frame tiled restoration and the demo's training step.

Rows:
  1. Restoring one SID Sony-size frame (2832x4240 RAW = 1416x2120 packed) with the demo U-Net
     (configs/demo.yaml's width) in 512-pixel tiles with 32-pixel overlap, then rendering it with `isp`
     (what `rawrestore eval`/`infer` do per frame). Reference: LibRaw developing the same DNG
     with rawpy's default postprocess (AHD demosaic, 8-bit sRGB), the classical pipeline the
     network replaces; the ratio says how many LibRaw develops one restoration costs.
  2. Tiling overhead: the same network tiled vs run on the whole packed frame at once (the
     reference); the note gives the peak-RSS growth of each (tiling bounds memory).
  3. One training step of configs/demo.yaml (batch 4, 256-pixel crops, full physics-aware
     stack without VGG/LPIPS weights) vs the SID baseline step (RAW-L1 only) on the same data.
  4. The same step with `train.compile=true` (torch.compile, inductor) vs eager.
"""
from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import isp
from isp.meta import CameraMeta

REPO = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH = 2832, 4240  # SID Sony frame (visible area, whole CFA periods)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _frame(tmp: Path) -> Path:
    """A smooth, noisy, dark 12 MP Bayer DNG (0.1 s exposure)."""
    rng = np.random.default_rng(0)
    meta = CameraMeta("Bench", "12MP", WIDTH, HEIGHT, [[0, 1], [1, 2]], [[512, 512], [512, 512]], 16383.0,
                      [2.1, 1.0, 1.6], [2.0, 1.0, 1.5], [[1.8, -0.6, -0.2], [-0.2, 1.5, -0.3], [0.05, -0.5, 1.45]],
                      exposure_time=0.1)
    coarse = rng.random((HEIGHT // 64 + 2, WIDTH // 64 + 2))
    scene = np.kron(coarse, np.ones((64, 64)))[:HEIGHT, :WIDTH]
    mosaic = np.clip(512 + scene * 120 + rng.normal(0, 8, (HEIGHT, WIDTH)), 0, 16383).astype(np.uint16)
    path = tmp / "frame.dng"
    isp.write_dng(path, mosaic, meta)
    return path


def _restore_rows(tmp: Path) -> list[dict]:
    from rawrestore.config import load_config
    from rawrestore.models import build_model_from_config
    from rawrestore.tiling import tiled_apply

    import rawpy

    cfg = load_config(REPO / "configs/demo.yaml")
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, cfg.data.in_channels).eval().requires_grad_(False)
    path = _frame(tmp)
    mosaic, meta = isp.read_raw(path)
    tensors = meta.render_tensors()
    renderer = isp.ISP("bilinear", "srgb")

    def packed_input() -> torch.Tensor:
        raw = torch.from_numpy(mosaic.astype(np.float32))[None, None]
        aligned = (isp.ops.normalize(raw, meta.black_level, meta.white_level) * 100.0).clamp(0, 1)
        return isp.cfa.pack(aligned, meta.cfa_array)

    def restore(tile: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            restored = tiled_apply(model, packed_input(), tile, 32).clamp(0, 1)
            renderer(restored, tensors["cfa"], tensors["wb"], tensors["cam_to_srgb"], packed=True)
        return time.perf_counter() - start

    def develop() -> float:
        start = time.perf_counter()
        with rawpy.imread(str(path)) as raw:
            raw.postprocess(use_camera_wb=True)
        return time.perf_counter() - start

    with torch.no_grad():  # warm-up: allocator, oneDNN kernels for the tile shapes
        tiled_apply(model, packed_input()[..., :544, :544], 512, 32)
    rss0 = _peak_rss_mb()
    tiled_s = min(restore(512) for _ in range(2))
    rss_tiled = _peak_rss_mb()
    whole_s = restore(0)
    rss_whole = _peak_rss_mb()
    develop_s = min(develop() for _ in range(2))
    note_mem = (f"peak RSS +{rss_tiled - rss0:.0f} MB tiled, then +{rss_whole - rss_tiled:.0f} MB more for the whole frame")
    return [
        {"name": f"restore 12MP frame: U-Net w{cfg.model.width}, tiles 512/32, + render", "ours_s": tiled_s,
         "reference_s": develop_s, "ratio": tiled_s / develop_s,
         "note": "reference: rawpy postprocess (LibRaw AHD, 8-bit sRGB) of the same DNG; seconds per frame"},
        {"name": f"tiled 512/32 vs whole-frame U-Net w{cfg.model.width} (+render), 12MP", "ours_s": tiled_s,
         "reference_s": whole_s, "ratio": tiled_s / whole_s, "note": note_mem},
    ]


def _train_row(tmp: Path, steps: int = 8) -> dict:
    from rawrestore.config import load_config
    from rawrestore.data.synth import generate
    from rawrestore.train.trainer import Trainer

    root = generate(tmp / "synthetic", "sony", scenes=6, seed=0, size=512, progress=False)

    def step_time(extra: list[str]) -> float:
        overrides = [f"data.root={root}", f"output_dir={tmp}/run", "data.num_workers=0", "train.val_every=0",
                     "train.ckpt_every=0", "device=cpu", *extra]
        trainer = Trainer(load_config(REPO / "configs/demo.yaml", overrides), log=lambda _: None, progress=False)
        batches = trainer._loader(0)
        trainer.model.train()
        times = []
        for index in range(steps + 2):
            start = time.perf_counter()
            trainer._train_step(batches)
            if index >= 2:  # first steps: decode cache and kernel warm-up
                times.append(time.perf_counter() - start)
        del batches
        return statistics.median(times)

    full = step_time([])
    baseline = step_time(["loss.raw_l1.weight=1", "loss.robust.weight=0", "loss.crosstalk.weight=0",
                          "loss.perceptual.weight=0", "loss.lpips.weight=0", "loss.delta_e00.weight=0",
                          "loss.ssim.weight=0"])
    width = load_config(REPO / "configs/demo.yaml").model.width
    return {"name": f"train step demo.yaml (b4, crop256, w{width}, full stack)", "ours_s": full,
            "reference_s": baseline, "ratio": full / baseline,
            "note": f"reference: same step with RAW-L1 only (SID baseline); median of {steps} steps, no VGG/LPIPS weights"}


def _compile_row(tmp: Path, steps: int = 6) -> dict:
    """train.compile=true against eager on the demo step (the first compiled steps, compilation, are not timed)."""
    from rawrestore.config import load_config
    from rawrestore.train.trainer import Trainer

    root = tmp / "synthetic"

    def timed(extra: list[str]) -> tuple[float, float]:
        overrides = [f"data.root={root}", f"output_dir={tmp}/run_compile", "data.num_workers=0", "train.val_every=0",
                     "train.ckpt_every=0", "device=cpu", *extra]
        trainer = Trainer(load_config(REPO / "configs/demo.yaml", overrides), log=lambda _: None, progress=False)
        batches = trainer._loader(0)
        trainer.model.train()
        start = time.perf_counter()
        trainer._train_step(batches)
        first = time.perf_counter() - start
        trainer._train_step(batches)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer._train_step(batches)
            times.append(time.perf_counter() - start)
        return statistics.median(times), first

    compiled, compile_s = timed(["train.compile=true"])
    eager, _ = timed([])
    return {"name": "train step demo.yaml, train.compile=true", "ours_s": compiled, "reference_s": eager,
            "ratio": compiled / eager,
            "note": f"reference: the same step eager; median of {steps} steps; first compiled step {compile_s:.0f} s"}


def run() -> list[dict]:
    torch.set_grad_enabled(True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rows = _restore_rows(tmp)
        rows.append(_train_row(tmp))
        rows.append(_compile_row(tmp))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    for row in run():
        print(row)
