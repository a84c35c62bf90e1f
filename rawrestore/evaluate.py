"""`rawrestore eval`: score a checkpoint per image and per exposure ratio, under one or several protocols.

    rawrestore eval -c CFG --checkpoint CKPT [--split test] --out DIR [--classical wavelet|bm3d|none]
                    [--protocol internal,sid,raw] [--subset all|aligned|burst00|burst00_aligned]
                    [--[no-]quantize-8bit] [key=value ...]

For every pair of the split in eval.subset (whole frames unless data.val_crop is set; tiled per eval.tile):

    model      the network's packed RAW output (EMA weights when the checkpoint has them)
    baseline   the ratio-scaled dark input itself (what SID's "amplified input" looks like)
    classical  the same input denoised per packed channel by wavelet shrinkage (BayesShrink with
               skimage's noise estimate) or BM3D (optional `bm3d` package)

each scored under every protocol of eval.protocol (`rawrestore.protocols`: internal = our ISP on
both sides; sid = LibRaw as in SID's test script; raw = the ELD/PMN packed-RAW protocol), sRGB
images 8-bit quantised when eval.quantize_8bit. LPIPS is null unless its backbone weights are on
disk; nothing is ever made up.

Writes DIR/per_image.csv, DIR/summary.json (layout in `rawrestore.results`), DIR/report.html with
DIR/images/*.png and the published figures beside the measured ones, and prints the table.

With `data.sources` every source's split is scored (eval.subset and eval.max_images per source,
pictures named `<source>_<short>`): summary.json keeps the pooled numbers at the top and adds
one entry per source under "sources"; per_image.csv gets a `source` column.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import isp
from isp.color import delta_e2000, srgb_to_lab
from isp.png import write_png
from isp.safeio import write_bytes
from rawrestore.config import ExperimentConfig, load_config
from rawrestore.data.manifest import SUBSETS, select_subset
from rawrestore.errors import ConfigError
from rawrestore.metrics import Evaluator, quantize_8bit
from rawrestore.models import build_model_from_config
from rawrestore.protocols import (
    SidRenderer, eval_renderer, lpips_or_none, parse_protocols, predict, render_internal, score_internal, score_raw,
)
from rawrestore.results import (
    check_out_folder, format_protocol_table, pooled_evaluators, protocol_summaries, remove_empty, write_per_image_csv,
    write_report, write_summary,
)

__all__ = [
    "configure", "run", "evaluate", "classical_denoise", "load_model", "delta_e_map", "METHODS", "FULL_FRAME_PIXELS",
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


def delta_e_map(pred_srgb: torch.Tensor, target_srgb: torch.Tensor) -> np.ndarray:
    """Per-pixel CIEDE2000 as a colour picture. (1,3,H,W) sRGB -> (H,W,3) uint8 (inferno, 0..20 dE00)."""
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


# ------------------------------------------------------------------------------ report

REPORT_PICTURES = (("input", "scaled input (baseline)"), ("pred", "prediction"), ("target", "target"),
                   ("classical", "classical"), ("delta_e", f"ΔE00 of the prediction (0–{DELTA_E_SCALE:g}, inferno)"),
                   ("sid_pred", "prediction, sid protocol (LibRaw)"), ("sid_target", "target, sid protocol (LibRaw)"))


def _curves_for_report(cfg: ExperimentConfig, images_dir: Path) -> str | None:
    """Copy (or draw from log.jsonl) the run's loss curves into the report folder. -> relative path or None."""
    from rawrestore.train.runlog import CURVES_NAME, LOG_NAME, write_loss_curves

    run_dir = Path(cfg.output_dir)
    target = images_dir / CURVES_NAME
    source = run_dir / CURVES_NAME
    if source.is_file():
        write_bytes(target, source.read_bytes(), inputs=[source])
        return f"images/{CURVES_NAME}"
    if (run_dir / LOG_NAME).is_file() and write_loss_curves(run_dir / LOG_NAME, target) is not None:
        return f"images/{CURVES_NAME}"
    return None


def _picture(path: Path, srgb: torch.Tensor, quantize: bool) -> None:
    """A report picture of a (1,3,H,W) sRGB render, box-downscaled."""
    shown = quantize_8bit(srgb) if quantize else srgb
    write_png(path, _shrink(_to_picture(shown), REPORT_MAX_SIDE))


# --------------------------------------------------------------------------- evaluate


def evaluate(cfg: ExperimentConfig, checkpoint: str | os.PathLike, out: str | os.PathLike, split: str | None = None,
             classical: str | None = None, classical_explicit: bool = False, images: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score a checkpoint on a split and write the outputs described in the module docstring. -> summary dict.

    A failure removes the folders this call created while they are still empty.
    """
    out = Path(out)
    created = check_out_folder(out)
    try:
        return _evaluate(cfg, checkpoint, out, split, classical, classical_explicit, images, log)
    except BaseException:
        remove_empty(created)
        raise


def _evaluate(cfg: ExperimentConfig, checkpoint: str | os.PathLike, out: Path, split: str | None,
              classical: str | None, classical_explicit: bool, images: bool,
              log: Callable[[str], None] | None) -> dict[str, Any]:
    from tqdm import tqdm

    from rawrestore.data.dataset import build_datasets

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    split = split or cfg.eval.split
    method = classical or cfg.eval.classical
    protocols = list(cfg.eval.protocol)
    device = isp.resolve_device(cfg.device)
    packed = cfg.data.packed

    model, step, used_ema = load_model(cfg, checkpoint, device)
    with_sources = cfg.data.sources is not None
    sources = list(zip(cfg.data.source_names(), cfg.data.source_list()))
    datasets = {}
    listed, counts = {}, {}
    for name, source in sources:
        dataset = build_datasets(source, split, seed=cfg.seed, prepare=False)
        listed[name] = len(dataset)
        dataset.records = select_subset(dataset.records, cfg.eval.subset)
        if not dataset.records:
            where = f" of source {name}" if with_sources else ""
            raise ConfigError(f"eval.subset {cfg.eval.subset} leaves none of the {listed[name]} {split} pairs{where}; "
                              "use eval.subset=all")
        dataset.prepare()
        datasets[name] = dataset
        counts[name] = len(dataset) if cfg.eval.max_images is None else min(len(dataset), cfg.eval.max_images)
    count, total_listed = sum(counts.values()), sum(listed.values())
    lpips_net, lpips_note = lpips_or_none(cfg.loss.lpips.net, cfg.loss.lpips.weights, device)
    renderer = eval_renderer()
    sid = SidRenderer()
    quantize = cfg.eval.quantize_8bit
    by_source = {name: {protocol: {kind: Evaluator(lpips_net=None if protocol == "raw" else lpips_net, quantize=quantize)
                                   for kind in METHODS} for protocol in protocols} for name, _ in sources}
    pairs = ", ".join(f"{name} {counts[name]} of {listed[name]}" for name, _ in sources)
    notes = [f"checkpoint {checkpoint} (step {step}, {'EMA' if used_ema else 'raw'} weights); split {split}, "
             f"subset {cfg.eval.subset}: {count} of {total_listed} pairs" + (f" ({pairs})" if with_sources else "")
             + f"; protocols {', '.join(protocols)}; "
             f"8-bit quantisation {'on' if quantize else 'off'}; tile {cfg.eval.tile or 'off'}"
             + (f", overlap {cfg.eval.overlap}" if cfg.eval.tile else "")
             + ("; self-ensemble over the CFA-preserving flips/transposes" if cfg.eval.self_ensemble else "")
             + f"; {lpips_note}"]
    run_classical = method != "none"
    images_dir = out / "images"
    if images:
        images_dir.mkdir(exist_ok=True)
    report_items: list[dict[str, Any]] = []
    started = time.perf_counter()

    for (source_name, source), index in tqdm([(item, i) for item in sources for i in range(counts[item[0]])],
                                             desc=f"eval {split}", unit="img", file=sys.stderr, disable=None):
        dataset, evaluators = datasets[source_name], by_source[source_name]
        sample = dataset[index]
        record = dataset.records[index]
        name = sample["short_name"]
        ratio = float(sample["ratio"])
        packed_input = sample["input"][None].to(device)
        pixels = packed_input.shape[-2] * packed_input.shape[-1] * (source.cfa_period ** 2 if packed else 1)
        if run_classical and pixels > FULL_FRAME_PIXELS and not classical_explicit:
            run_classical = False
            notes.append(f"classical reference skipped: frames of {pixels / 1e6:.1f} MP (slow on full SID frames); "
                         f"ask for it with --classical {method}")
        with torch.no_grad():
            raws = {"model": predict(model, sample, cfg.eval, packed, device), "baseline": packed_input}
            if run_classical:
                raws["classical"] = classical_denoise(packed_input[0], method)[None]
            scores: dict[str, str] = {}
            shown: dict[str, torch.Tensor] = {}
            if "internal" in protocols or images:
                for key, raw in raws.items():
                    if "internal" in protocols:
                        row, srgb, target_srgb = score_internal(evaluators["internal"][key], renderer, raw, sample, packed)
                        scores[key] = f"{key}: {row.psnr:.2f} dB, SSIM {row.ssim:.3f}, ΔE00 {row.delta_e00:.2f}" + (
                            f", LPIPS {row.lpips:.3f}" if row.lpips is not None else "")
                    else:
                        srgb = render_internal(renderer, raw, sample, packed)
                        target_srgb = render_internal(renderer, sample["target"][None].to(device), sample, packed)
                    shown[{"model": "pred", "baseline": "input"}.get(key, key)] = srgb
                    shown["target"] = target_srgb
            if "sid" in protocols:
                box = tuple(int(v) for v in sample["crop"].tolist())
                sid_target = sid.target(record.long, box).to(device)
                for key, raw in raws.items():
                    sid_pred = sid.prediction(record.long, raw, sample, packed, box).to(device)
                    row = evaluators["sid"][key].update([name], [ratio], sid_pred, sid_target)[0]
                    if key == "model":
                        shown["sid_pred"], shown["sid_target"] = sid_pred, sid_target
                        scores["sid"] = f"sid: {row.psnr:.2f} dB, SSIM {row.ssim:.3f}"
            if "raw" in protocols:
                for key, raw in raws.items():
                    row = score_raw(evaluators["raw"][key], raw, sample, packed)
                    if key == "model":
                        scores["raw"] = f"raw: {row.psnr:.2f} dB, SSIM {row.ssim:.4f}"
        if images:
            stem = _stem(f"{source_name}_{name}" if with_sources else name)
            shown_name = f"{source_name}/{name}" if with_sources else name
            item: dict[str, Any] = {"name": shown_name, "ratio": ratio, "scores": "  ·  ".join(scores.values())}
            for key, srgb in shown.items():
                _picture(images_dir / f"{stem}_{key}.png", srgb, quantize)
                item[key] = f"images/{stem}_{key}.png"
            pred_shown = quantize_8bit(shown["pred"]) if quantize else shown["pred"]
            target_shown = quantize_8bit(shown["target"]) if quantize else shown["target"]
            write_png(images_dir / f"{stem}_delta_e.png", _shrink(delta_e_map(pred_shown, target_shown), REPORT_MAX_SIDE))
            item["delta_e"] = f"images/{stem}_delta_e.png"
            report_items.append(item)
    elapsed = time.perf_counter() - started

    if not run_classical and method == "none":
        notes.append("classical reference off (--classical none)")
    evaluators = pooled_evaluators(by_source) if with_sources else by_source[sources[0][0]]
    by_protocol = protocol_summaries(evaluators)
    summary: dict[str, Any] = dict(by_protocol.get("internal", {}))
    summary.update({"protocols": by_protocol, "subset": cfg.eval.subset, "pairs": count, "split": split,
                    "quantize_8bit": quantize})
    source_tables = {name: protocol_summaries(by_source[name]) for name, _ in sources} if with_sources else None
    if source_tables is not None:
        summary["sources"] = {name: {**source_tables[name].get("internal", {}), "protocols": source_tables[name],
                                     "pairs": counts[name], "camera": source.camera} for name, source in sources}
    write_per_image_csv(out / "per_image.csv", evaluators, by_source if with_sources else None)
    write_summary(out / "summary.json", summary)
    notes.append(f"{count} images in {elapsed:.1f} s ({elapsed / max(count, 1):.2f} s per image, "
                 f"model + references + protocols + metrics + pictures) on {device}")
    curves = _curves_for_report(cfg, images_dir) if images else None
    report = write_report(out, by_protocol, tuple(source.camera for _, source in sources), report_items, notes, curves,
                          f"rawrestore eval: {Path(cfg.output_dir).name} / {split}", REPORT_PICTURES, source_tables)
    for note in notes[1:]:
        say(f"eval: {note}")
    if source_tables is not None:
        print("all sources:")
    print(format_protocol_table(by_protocol))
    for name, tables in (source_tables or {}).items():
        print(f"source {name}:")
        print(format_protocol_table(tables))
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
    parser.add_argument("--protocol", default=None, metavar="P[,P...]",
                        help="comma-separated scoring protocols (default eval.protocol): internal, sid (LibRaw as SID), "
                        "raw (ELD/PMN)")
    parser.add_argument("--subset", choices=SUBSETS, default=None, help="pairs to score (default eval.subset)")
    parser.add_argument("--quantize-8bit", action=argparse.BooleanOptionalAction, default=None,
                        help="round both sRGB images to 8 bits before scoring (default eval.quantize_8bit)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.tile=512 device=cpu")


def run(args: argparse.Namespace) -> int:
    """Load the config and evaluate; prints the per-ratio table and the report path."""
    overrides = list(args.overrides or [])
    if args.protocol:
        overrides.append(f"eval.protocol=[{','.join(parse_protocols(args.protocol))}]")
    if args.subset:
        overrides.append(f"eval.subset={args.subset}")
    if args.quantize_8bit is not None:
        overrides.append(f"eval.quantize_8bit={'true' if args.quantize_8bit else 'false'}")
    cfg = load_config(args.config, overrides)
    explicit = args.classical is not None or any(o.strip().startswith("eval.classical=") for o in args.overrides)
    evaluate(cfg, args.checkpoint, args.out, split=args.split, classical=args.classical,
             classical_explicit=explicit, images=not args.no_images)
    return 0
