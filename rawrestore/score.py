"""`rawrestore score`: score another method's outputs on SID with the same protocols as `rawrestore eval`.

    rawrestore score --protocol sid|raw --root SID_ROOT --camera sony|fuji --pred DIR --out DIR
                     [--split test] [--subset all|aligned|burst00|burst00_aligned] [--quantize-8bit] [--bits 8|16]

`sid`: DIR holds one sRGB image per pair named after the short file's stem (`10003_00_0.04s.png`;
.png, .tif or .tiff; 8- or 16-bit; `--bits` requires one depth), the size of LibRaw's render of
the long exposure (or cut to whole CFA periods, as a packed network outputs it); the target is
SID's LibRaw call on the long exposure (`rawrestore.protocols`).
`raw`: DIR holds `<stem>.npy`, the packed RAW (C,h,w) or (h,w,C) float in [0,1] (C = 4 Bayer in
the order R, G, B, G2 as ELD and PMN pack it; 9 X-Trans as `isp.cfa.pack`), against the packed,
black-subtracted, white-normalised long exposure clipped to [0,1].

Writes DIR/summary.json, DIR/per_image.csv and DIR/report.html (layout in `rawrestore.results`,
method `scored`). Every missing, mis-sized or unreadable prediction is printed on its own line; the
summary says how many were scored, and the exit status is 2 when any prediction could not be.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import isp
from isp.errors import InputError
from rawrestore.data.manifest import CAMERAS, SUBSETS, PairRecord, select_subset
from rawrestore.metrics import Evaluator
from rawrestore.physics.align import SID_RATIO_CAP
from rawrestore.protocols import SidRenderer, lpips_or_none, raw_row, to_tensor
from rawrestore.results import (
    check_out_folder, format_protocol_table, protocol_summaries, remove_empty, write_per_image_csv, write_report,
    write_summary,
)

__all__ = ["configure", "run", "score", "read_srgb_prediction", "read_raw_prediction", "PredictionProblem",
           "SRGB_SUFFIXES"]

SRGB_SUFFIXES = (".png", ".tif", ".tiff")
CFA_PERIODS = {"sony": 2, "fuji": 6}
METHOD = "scored"


class PredictionProblem(Exception):
    """A prediction that cannot be scored; str() is the one line printed for it."""


def _exists(pred_dir: Path, stem: str, suffixes: tuple[str, ...]) -> bool:
    try:
        _find(pred_dir, stem, suffixes)
    except PredictionProblem:
        return False
    return True


def _find(pred_dir: Path, stem: str, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        for candidate in (pred_dir / f"{stem}{suffix}", pred_dir / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise PredictionProblem(f"missing: {pred_dir / (stem + suffixes[0])} (expected {' or '.join(suffixes)})")


def _read_image(path: Path) -> np.ndarray:
    """PNG or TIFF pixels at their own depth. -> (H,W[,C]) array."""
    with path.open("rb") as handle:
        head = handle.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[24] == 16:
        import png  # pypng: Pillow (imageio's PNG reader) drops 16-bit RGB to 8 bits

        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        return np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])
    import imageio.v3 as iio

    return iio.imread(path, plugin="tifffile" if path.suffix.lower() in (".tif", ".tiff") else "pillow")


def read_srgb_prediction(path: Path, bits: int | None) -> np.ndarray:
    """An 8- or 16-bit RGB PNG/TIFF. -> (H,W,3) float64 in [0,1]; PredictionProblem naming what is wrong."""
    try:
        image = _read_image(path)
    except Exception as exc:  # imageio and pypng raise many kinds for a file that is not an image
        raise PredictionProblem(f"unreadable: {path}: not a PNG/TIFF image ({type(exc).__name__})") from None
    if image.dtype not in (np.uint8, np.uint16):
        raise PredictionProblem(f"wrong type: {path}: {image.dtype} pixels; write 8- or 16-bit integers")
    depth = 8 if image.dtype == np.uint8 else 16
    if bits is not None and depth != bits:
        raise PredictionProblem(f"wrong depth: {path}: {depth}-bit but --bits {bits} was declared")
    if image.ndim != 3 or image.shape[2] != 3:
        raise PredictionProblem(f"wrong shape: {path}: {image.shape}; expected an RGB image (H, W, 3)")
    return image.astype(np.float64) / (255.0 if depth == 8 else 65535.0)


def read_raw_prediction(path: Path, channels: int) -> np.ndarray:
    """A packed RAW .npy. -> (C,h,w) float64; PredictionProblem naming what is wrong."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PredictionProblem(f"unreadable: {path}: not a .npy array ({str(exc).splitlines()[0][:80]})") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] != channels and array.shape[-1] == channels:
        array = np.moveaxis(array, -1, 0)
    if array.ndim != 3 or array.shape[0] != channels:
        raise PredictionProblem(f"wrong shape: {path}: {array.shape}; expected packed ({channels}, h, w) or (h, w, {channels})")
    if array.dtype.kind != "f":
        raise PredictionProblem(f"wrong type: {path}: {array.dtype}; expected floats in [0, 1]")
    if not np.isfinite(array).all():
        raise PredictionProblem(f"not finite: {path}: holds NaN or inf")
    return array.astype(np.float64)


def _raw_target(long_path: str, period: int) -> torch.Tensor:
    """The long exposure packed, normalised, clipped to [0,1], cut to whole CFA periods. -> (1,C,h,w) float64."""
    mosaic, meta = isp.read_raw(long_path)
    height, width = mosaic.shape[0] // period * period, mosaic.shape[1] // period * period
    raw = torch.from_numpy(mosaic[:height, :width].astype(np.float64))[None, None]
    normal = isp.ops.normalize(raw, torch.tensor(meta.black_level, dtype=torch.float64), meta.white_level)
    return isp.cfa.pack(normal.clamp(0.0, 1.0), torch.as_tensor(meta.cfa_array))


def _records(root: str, camera: str, split: str, subset: str) -> tuple[list[PairRecord], int]:
    from rawrestore.data.dataset import resolve_records

    data = SimpleNamespace(root=root, camera=camera, manifest="auto", ratio_cap=SID_RATIO_CAP)
    records, _ = resolve_records(data, split)
    return select_subset(records, subset), len(records)


def score(protocol: str, root: str, camera: str, pred_dir: str, out: str, split: str = "test", subset: str = "all",
          quantize: bool = False, bits: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Score a folder of predictions; write the outputs. -> (summary, problem lines)."""
    pred_path = Path(pred_dir)
    if not pred_path.is_dir():
        raise InputError(f"--pred {pred_dir} is not a folder; name the folder holding the predictions")
    out_path = Path(out)
    created = check_out_folder(out_path)
    try:
        return _score(protocol, root, camera, pred_path, out_path, split, subset, quantize, bits)
    except BaseException:
        remove_empty(created)
        raise


def _score(protocol: str, root: str, camera: str, pred_dir: Path, out: Path, split: str, subset: str,
           quantize: bool, bits: int | None) -> tuple[dict[str, Any], list[str]]:
    from tqdm import tqdm

    records, listed = _records(root, camera, split, subset)
    period = CFA_PERIODS[camera]
    missing = [r.long for r in records if not Path(r.long).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: long exposure named in the {camera} {split} list is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + "; check --root and --camera")
    suffixes = SRGB_SUFFIXES if protocol == "sid" else (".npy",)
    if records and not any(_exists(pred_dir, Path(r.short).stem, suffixes) for r in records):
        raise InputError(f"--pred {pred_dir} holds none of the {len(records)} predictions (e.g. "
                         f"{Path(records[0].short).stem}{suffixes[0]}); name the folder of files named after the short "
                         "files' stems")
    lpips_net, lpips_note = lpips_or_none() if protocol == "sid" else (None, "")
    evaluator = Evaluator(lpips_net=lpips_net, quantize=quantize and protocol == "sid")
    sid = SidRenderer()
    problems: list[str] = []
    for record in tqdm(records, desc=f"score {protocol}", unit="img", file=sys.stderr, disable=None):
        stem = Path(record.short).stem
        name = Path(record.short).name
        try:
            if protocol == "sid":
                pred = read_srgb_prediction(_find(pred_dir, stem, SRGB_SUFFIXES), bits)
                target = sid.target(record.long)
                height, width = target.shape[-2:]
                if pred.shape[:2] == (height // period * period, width // period * period):
                    target = target[..., :pred.shape[0], :pred.shape[1]]
                elif pred.shape[:2] != (height, width):
                    raise PredictionProblem(f"wrong size: {_find(pred_dir, stem, SRGB_SUFFIXES)}: {pred.shape[1]}x"
                                            f"{pred.shape[0]}, expected {width}x{height} (LibRaw's render of {record.long})")
                evaluator.update([name], [record.ratio], to_tensor(pred), target)
            else:
                channels = 4 if period == 2 else 9
                path = _find(pred_dir, stem, (".npy",))
                pred = read_raw_prediction(path, channels)
                target = _raw_target(record.long, period)
                if tuple(pred.shape) != tuple(target.shape[1:]):
                    raise PredictionProblem(f"wrong size: {path}: {tuple(pred.shape)}, expected {tuple(target.shape[1:])} "
                                            f"(the packed long exposure {record.long})")
                row = raw_row(name, record.ratio, torch.from_numpy(pred)[None], target)
                evaluator.add(row.name, row.ratio, row.psnr, row.ssim)
        except PredictionProblem as problem:
            problems.append(str(problem))
    evaluators = {protocol: {METHOD: evaluator}}
    by_protocol = protocol_summaries(evaluators)
    summary = {"protocols": by_protocol, "subset": subset, "pairs": len(records), "scored": len(evaluator),
               "unscored": len(problems), "problems": problems, "camera": camera, "split": split,
               "quantize_8bit": quantize and protocol == "sid", "pred": str(pred_dir)}
    write_per_image_csv(out / "per_image.csv", evaluators)
    write_summary(out / "summary.json", summary)
    notes = [f"{pred_dir}: {len(evaluator)} of {len(records)} predictions scored ({subset} subset of the {listed} {split} "
             f"pairs of {camera}); protocol {protocol}" + (f"; {lpips_note}" if lpips_note else "")
             + (f"; 8-bit quantisation {'on' if quantize else 'off'}" if protocol == "sid" else "")]
    notes += [f"not scored: {line}" for line in problems]
    report = write_report(out, by_protocol, camera, [], notes, None, f"rawrestore score: {pred_dir.name} ({protocol})")
    print(format_protocol_table(by_protocol))
    print(f"report: {report}")
    return summary, problems


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore score`."""
    parser.description = "Score another method's outputs on SID under the sid or raw protocol, like rawrestore eval."
    parser.add_argument("--protocol", required=True, choices=("sid", "raw"), help="sid: sRGB images; raw: packed .npy")
    parser.add_argument("--root", required=True, help="SID root holding Sony/ or Fuji/ (and optionally SID's lists)")
    parser.add_argument("--camera", required=True, choices=sorted(CAMERAS), help="which SID subset")
    parser.add_argument("--pred", required=True, help="folder of predictions named after the short files' stems")
    parser.add_argument("--out", required=True, help="folder for summary.json, per_image.csv, report.html")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="split (default test)")
    parser.add_argument("--subset", choices=SUBSETS, default="all", help="pairs to score (default all)")
    parser.add_argument("--quantize-8bit", action="store_true", help="sid: round both images to 8 bits before scoring")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=None, help="sid: require this bit depth of every image")


def run(args: argparse.Namespace) -> int:
    """Score; print each unscorable prediction on its own line. -> 0, or 2 when any prediction was not scored."""
    summary, problems = score(args.protocol, args.root, args.camera, args.pred, args.out, split=args.split,
                              subset=args.subset, quantize=args.quantize_8bit, bits=args.bits)
    for line in problems:
        print(f"rawrestore score: {line}", file=sys.stderr)
    print(f"score: {summary['scored']} of {summary['pairs']} predictions scored"
          + (f"; {len(problems)} not scored (listed above)" if problems else ""))
    return 2 if problems else 0
