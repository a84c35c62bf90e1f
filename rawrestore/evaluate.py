"""`rawrestore eval`: score a checkpoint per image and per exposure ratio against two references.

    rawrestore eval -c CFG --checkpoint CKPT [--split test] --out DIR [--classical wavelet|bm3d|none] [key=value ...]

For every pair of the split (whole frames unless data.val_crop is set; tiled per eval.tile):

    model      the network's packed RAW output (EMA weights when the checkpoint has them)
    baseline   the ratio-scaled dark input itself (what SID's "amplified input" looks like)
    classical  the same input denoised per packed channel by wavelet shrinkage (BayesShrink with
               skimage's noise estimate) or BM3D (optional `bm3d` package)

each rendered to sRGB by the same `isp.ISP` (bilinear demosaic, sRGB curve), 8-bit quantised
when eval.quantize_8bit, and scored with `rawrestore.metrics` against the rendered long exposure.
LPIPS is null unless its backbone weights are on disk; nothing is ever made up.

Writes DIR/per_image.csv (the model; per_image_baseline.csv and per_image_classical.csv
alongside), DIR/summary.json {"model"|"baseline"|"classical": {"all"|"x100"|...: {psnr, ssim,
lpips, delta_e00, n}}}, DIR/report.html with DIR/images/*.png, and prints the per-ratio table.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import isp
from isp.color import delta_e2000, srgb_to_lab
from isp.png import write_png
from rawrestore.config import ExperimentConfig, load_config
from rawrestore.errors import ConfigError
from rawrestore.metrics import METRIC_NAMES, Evaluator, quantize_8bit
from rawrestore.models import build_model_from_config
from rawrestore.ensemble import restore

__all__ = [
    "configure", "run", "evaluate", "classical_denoise", "load_model", "render_packed", "delta_e_map",
    "format_table", "METHODS", "FULL_FRAME_PIXELS",
]

METHODS = ("model", "baseline", "classical")
FULL_FRAME_PIXELS = 4_000_000  # RAW pixels above which the classical reference needs asking for explicitly
REPORT_MAX_SIDE = 1024  # report pictures are box-downscaled to at most this many pixels a side
DELTA_E_SCALE = 20.0  # dE00 mapped to the full colour map range


# ------------------------------------------------------------------------------ pieces


def load_model(cfg: ExperimentConfig, checkpoint: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, int, bool]:
    """The network of `cfg.model` with a checkpoint's weights (EMA preferred). -> (model in eval mode, step, used_ema)."""
    from rawrestore.train.checkpoint import CheckpointError, inference_weights

    weights, _, step, used_ema = inference_weights(checkpoint)
    model = build_model_from_config(cfg.model, cfg.data.in_channels)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit model {cfg.model.name} width {cfg.model.width} with "
            f"{cfg.data.in_channels} input channels ({first}); use the config it was trained with"
        ) from None
    return model.to(device).eval().requires_grad_(False), step, used_ema


def classical_denoise(packed: torch.Tensor, method: str) -> torch.Tensor:
    """Classical reference. packed (C,h,w) aligned RAW in [0,1] -> (C,h,w) denoised, per channel, same dtype/device.

    'wavelet': skimage's denoise_wavelet, BayesShrink soft thresholds from its own noise
    estimate (median absolute deviation of the finest diagonal sub-band), db2, per channel.
    'bm3d': the `bm3d` package with sigma from skimage's estimate_sigma, per channel.
    """
    data = packed.detach().float().cpu().numpy()
    if method == "wavelet":
        from skimage.restoration import denoise_wavelet

        out = np.stack([
            denoise_wavelet(channel, method="BayesShrink", mode="soft", wavelet="db2", rescale_sigma=True)
            for channel in data
        ])
    elif method == "bm3d":
        try:
            import bm3d
        except ImportError:
            raise ConfigError(
                "classical 'bm3d' needs the bm3d package: pip install bm3d (or pip install 'rawrestore[bm3d]'); "
                "or use --classical wavelet"
            ) from None
        from skimage.restoration import estimate_sigma

        out = np.stack([
            np.asarray(bm3d.bm3d(channel, sigma_psd=max(float(estimate_sigma(channel)), 1e-6)), dtype=np.float32)
            for channel in data
        ])
    else:
        raise ConfigError(f"classical denoiser must be wavelet, bm3d or none, got {method!r}")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(device=packed.device, dtype=packed.dtype)


def render_packed(renderer: isp.ISP, raw: torch.Tensor, sample: dict[str, Any], packed: bool, device: torch.device) -> torch.Tensor:
    """sRGB of one sample's RAW. raw (1,C,h,w) packed or (1,1,H,W) -> (1,3,H,W) in [0,1]."""
    return renderer(raw.float(), sample["cfa"].to(device), sample["wb"].to(device), sample["cam_to_srgb"].to(device),
                    packed=packed)


def delta_e_map(pred_srgb: torch.Tensor, target_srgb: torch.Tensor) -> np.ndarray:
    """Per-pixel CIEDE2000 as a colour picture. (1,3,H,W) sRGB -> (H,W,3) uint8 (inferno, 0..20 dE00)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    difference = delta_e2000(srgb_to_lab(pred_srgb.double()), srgb_to_lab(target_srgb.double()))[0]
    scaled = (difference.squeeze(0).clamp(0, DELTA_E_SCALE) / DELTA_E_SCALE).cpu().numpy()
    return (colormaps["inferno"](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _to_picture(srgb: torch.Tensor) -> np.ndarray:
    """(1,3,H,W) sRGB in [0,1] -> (H,W,3) uint8."""
    return (srgb[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def _shrink(picture: np.ndarray, max_side: int) -> np.ndarray:
    """Box-downscale (H,W,3) uint8 by an integer factor so both sides are <= max_side."""
    factor = max(1, math.ceil(max(picture.shape[:2]) / max_side))
    if factor == 1:
        return picture
    height, width = picture.shape[0] // factor * factor, picture.shape[1] // factor * factor
    blocks = picture[:height, :width].reshape(height // factor, factor, width // factor, factor, 3)
    return (blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def _stem(name: str) -> str:
    """A file-name-safe stem of an image name."""
    stem = Path(name).stem
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem) or "image"


# ----------------------------------------------------------------------------- summary


def _empty_like(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Same groups as `summary` with every metric null and n = 0 (a method that did not run)."""
    return {group: {**{metric: None for metric in METRIC_NAMES}, "n": 0} for group in summary}


def format_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The per-ratio table: one block per group, rows model / baseline / classical, columns PSNR SSIM LPIPS dE00 n."""
    lines = [f"{'group':<6} {'method':<10} {'PSNR dB':>8} {'SSIM':>7} {'LPIPS':>7} {'dE00':>7} {'n':>4}"]
    groups = list(summary["model"])
    for group in groups:
        for index, method in enumerate(METHODS):
            stats = summary.get(method, {}).get(group)
            if stats is None:
                continue

            def cell(key: str, digits: int, width: int) -> str:
                value = stats.get(key)
                return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else f"{'-':>{width}}"

            lines.append(f"{group if index == 0 else '':<6} {method:<10} {cell('psnr', 2, 8)} {cell('ssim', 4, 7)} "
                         f"{cell('lpips', 4, 7)} {cell('delta_e00', 2, 7)} {stats.get('n', 0):>4}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report


def _html_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = "<tr><th>group</th><th>method</th><th>PSNR (dB)</th><th>SSIM</th><th>LPIPS</th><th>ΔE00</th><th>n</th></tr>"
    rows = []
    for group in summary["model"]:
        for method in METHODS:
            stats = summary[method].get(group)
            if stats is None:
                continue
            cells = []
            for key, digits in (("psnr", 2), ("ssim", 4), ("lpips", 4), ("delta_e00", 2)):
                value = stats.get(key)
                cells.append(f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–")
            rows.append(f"<tr><td>{html.escape(group)}</td><td>{method}</td>" + "".join(f"<td>{c}</td>" for c in cells)
                        + f"<td>{stats.get('n', 0)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(out: Path, summary: dict[str, Any], images: list[dict[str, Any]], notes: list[str],
                 curves: str | None, title: str) -> Path:
    """DIR/report.html: notes, per-ratio table, loss curves, one row of pictures per image."""
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "figure{display:inline-block;margin:4px;text-align:center}img{max-width:260px}"
             "figcaption{font-size:12px}.row{margin-bottom:1.2em}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts.append("<h2>Per exposure ratio</h2>" + _html_table(summary))
    if curves:
        parts.append(f"<h2>Training curves</h2><img style='max-width:900px' src='{html.escape(curves)}'>")
    parts.append("<h2>Images</h2><p>scaled input (baseline) · prediction · target · classical · ΔE00 of the prediction "
                 f"(0–{DELTA_E_SCALE:g}, inferno)</p>")
    for item in images:
        figures = []
        for key, caption in (("input", "scaled input"), ("pred", "prediction"), ("target", "target"),
                             ("classical", "classical"), ("delta_e", "ΔE00 map")):
            if item.get(key):
                figures.append(f"<figure><a href='{html.escape(item[key])}'><img src='{html.escape(item[key])}'></a>"
                               f"<figcaption>{caption}</figcaption></figure>")
        scores = item["scores"]
        parts.append(f"<div class='row'><h3>{html.escape(item['name'])} (x{item['ratio']:g})</h3>"
                     f"<p>{html.escape(scores)}</p>{''.join(figures)}</div>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _curves_for_report(cfg: ExperimentConfig, images_dir: Path) -> str | None:
    """Copy (or draw from log.jsonl) the run's loss curves into the report folder. -> relative path or None."""
    from rawrestore.train.trainer import CURVES_NAME, LOG_NAME, write_loss_curves

    run_dir = Path(cfg.output_dir)
    target = images_dir / CURVES_NAME
    source = run_dir / CURVES_NAME
    if source.is_file():
        shutil.copyfile(source, target)
        return f"images/{CURVES_NAME}"
    if (run_dir / LOG_NAME).is_file() and write_loss_curves(run_dir / LOG_NAME, target) is not None:
        return f"images/{CURVES_NAME}"
    return None


# --------------------------------------------------------------------------- evaluate


def evaluate(cfg: ExperimentConfig, checkpoint: str | os.PathLike, out: str | os.PathLike, split: str | None = None,
             classical: str | None = None, classical_explicit: bool = False, images: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score a checkpoint on a split and write the outputs described in the module docstring. -> summary dict."""
    from rawrestore.data.dataset import build_datasets
    from rawrestore.train.trainer import build_lpips_or_none

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    split = split or cfg.eval.split
    method = classical or cfg.eval.classical
    device = isp.resolve_device(cfg.device)
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    model, step, used_ema = load_model(cfg, checkpoint, device)
    dataset = build_datasets(cfg.data, split, seed=cfg.seed)
    count = len(dataset) if cfg.eval.max_images is None else min(len(dataset), cfg.eval.max_images)
    lpips_net, lpips_note = build_lpips_or_none(cfg, device)
    renderer = isp.ISP(demosaic="bilinear", gamma="srgb")
    evaluators = {name: Evaluator(lpips_net=lpips_net, quantize=cfg.eval.quantize_8bit) for name in METHODS}
    notes = [f"checkpoint {checkpoint} (step {step}, {'EMA' if used_ema else 'raw'} weights); split {split}, "
             f"{count} of {len(dataset)} pairs; tile {cfg.eval.tile or 'off'}"
             + (f", overlap {cfg.eval.overlap}" if cfg.eval.tile else "")
             + ("; self-ensemble over the CFA-preserving flips/transposes" if cfg.eval.self_ensemble else "")
             + f"; {lpips_note}"]
    run_classical = method != "none"
    report_items: list[dict[str, Any]] = []
    started = time.perf_counter()
    from tqdm import tqdm

    for index in tqdm(range(count), desc=f"eval {split}", unit="img", file=sys.stderr, disable=None):
        sample = dataset[index]
        name = sample["short_name"]
        ratio = float(sample["ratio"])
        packed_input = sample["input"][None].to(device)
        target = sample["target"][None].to(device)
        pixels = packed_input.shape[-2] * packed_input.shape[-1] * (cfg.data.cfa_period ** 2 if cfg.data.packed else 1)
        if run_classical and pixels > FULL_FRAME_PIXELS and not classical_explicit:
            run_classical = False
            notes.append(f"classical reference skipped: frames of {pixels / 1e6:.1f} MP (slow on full SID frames); "
                         f"ask for it with --classical {method}")
        with torch.no_grad():
            pred = restore(model, packed_input, sample["cfa"].to(device), cfg.eval.tile, cfg.eval.overlap,
                           cfg.eval.self_ensemble, cfg.data.packed)
            renders = {
                "model": render_packed(renderer, pred, sample, cfg.data.packed, device),
                "baseline": render_packed(renderer, packed_input, sample, cfg.data.packed, device),
            }
            if run_classical:
                denoised = classical_denoise(packed_input[0], method)[None]
                renders["classical"] = render_packed(renderer, denoised, sample, cfg.data.packed, device)
            target_srgb = render_packed(renderer, target, sample, cfg.data.packed, device)
            rows = {key: evaluators[key].update([name], [ratio], srgb, target_srgb)[0] for key, srgb in renders.items()}
        if images:
            stem = _stem(name)
            item: dict[str, Any] = {"name": name, "ratio": ratio}
            shown = {"input": renders["baseline"], "pred": renders["model"], "target": target_srgb,
                     "classical": renders.get("classical")}
            for key, srgb in shown.items():
                if srgb is None:
                    continue
                picture = quantize_8bit(srgb) if cfg.eval.quantize_8bit else srgb
                write_png(images_dir / f"{stem}_{key}.png", _shrink(_to_picture(picture), REPORT_MAX_SIDE))
                item[key] = f"images/{stem}_{key}.png"
            pred_shown = quantize_8bit(renders["model"]) if cfg.eval.quantize_8bit else renders["model"]
            target_shown = quantize_8bit(target_srgb) if cfg.eval.quantize_8bit else target_srgb
            write_png(images_dir / f"{stem}_delta_e.png", _shrink(delta_e_map(pred_shown, target_shown), REPORT_MAX_SIDE))
            item["delta_e"] = f"images/{stem}_delta_e.png"
            item["scores"] = "  ·  ".join(
                f"{key}: {row.psnr:.2f} dB, SSIM {row.ssim:.3f}, ΔE00 {row.delta_e00:.2f}"
                + (f", LPIPS {row.lpips:.3f}" if row.lpips is not None else "")
                for key, row in rows.items()
            )
            report_items.append(item)
    elapsed = time.perf_counter() - started

    model_summary = evaluators["model"].write(out)
    summary = {
        "model": model_summary,
        "baseline": evaluators["baseline"].summary(),
        "classical": evaluators["classical"].summary() if len(evaluators["classical"]) else _empty_like(model_summary),
    }
    evaluators["baseline"].write_csv(out / "per_image_baseline.csv")
    if len(evaluators["classical"]):
        evaluators["classical"].write_csv(out / "per_image_classical.csv")
    elif method == "none":
        notes.append("classical reference off (--classical none)")
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "summary.json")
    notes.append(f"{count} images in {elapsed:.1f} s ({elapsed / max(count, 1):.2f} s per image, "
                 f"model + references + metrics + pictures) on {device}")
    curves = _curves_for_report(cfg, images_dir) if images else None
    report = write_report(out, summary, report_items, notes, curves, f"rawrestore eval: {Path(cfg.output_dir).name} / {split}")
    for note in notes[1:]:
        say(f"eval: {note}")
    print(format_table(summary))
    print(f"report: {report}")
    return summary


# ---------------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore eval`."""
    parser.description = ("Evaluate a checkpoint per image and per exposure ratio (PSNR, SSIM, LPIPS, dE00) against the "
                          "scaled dark input and a classical denoiser; writes per_image.csv, summary.json, report.html.")
    parser.add_argument("-c", "--config", required=True, help="experiment YAML the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a .pt checkpoint (e.g. runs/demo/checkpoints/last.pt)")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None, help="split to score (default eval.split)")
    parser.add_argument("--out", required=True, help="folder for per_image.csv, summary.json, report.html, images/")
    parser.add_argument("--classical", choices=("wavelet", "bm3d", "none"), default=None,
                        help="classical reference (default eval.classical; skipped on full SID frames unless given here)")
    parser.add_argument("--no-images", action="store_true", help="write no pictures (the report keeps the tables)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.tile=512 device=cpu")


def run(args: argparse.Namespace) -> int:
    """Load the config and evaluate; prints the per-ratio table and the report path."""
    cfg = load_config(args.config, args.overrides)
    explicit = args.classical is not None or any(o.strip().startswith("eval.classical=") for o in args.overrides)
    evaluate(cfg, args.checkpoint, args.out, split=args.split, classical=args.classical,
             classical_explicit=explicit, images=not args.no_images)
    return 0
