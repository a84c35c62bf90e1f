"""The `isp` command: render RAW files to PNG like LibRaw, print their metadata."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import InputError
from .png import write_png


def _outputs(inputs: list[str], out: str) -> list[Path]:
    out_path = Path(out)
    if len(inputs) == 1 and not out_path.is_dir() and out_path.suffix.lower() == ".png":
        targets = [out_path]
    else:
        if out_path.exists() and not out_path.is_dir():
            raise InputError(f"-o {out}: several inputs need an output folder, not a file")
        targets = [out_path / (Path(p).stem + ".png") for p in inputs]
    folder = targets[0].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable; choose another -o")
    return targets


def cmd_render(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import render_file, resolve_device, select_wb

    resolve_device(args.device)
    if args.wb not in ("camera", "daylight", "none"):
        select_wb(None, args.wb)  # validates R,G,B before any work
    for path in args.inputs:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    targets = _outputs(args.inputs, args.output)
    failures = 0
    bar = tqdm(list(zip(args.inputs, targets)), disable=len(args.inputs) < 2, unit="file", desc="render")
    for src, dst in bar:
        try:
            rgb = render_file(src, wb=args.wb, gamma=args.gamma, demosaic=args.demosaic, device=args.device, exposure_ratio=args.exposure_ratio)
        except InputError as exc:
            if len(args.inputs) == 1:
                raise
            failures += 1
            tqdm.write(f"isp: error: {exc}", file=sys.stderr)
            continue
        write_png(dst, rgb, args.bits)
    if failures:
        print(f"isp: {failures} of {len(args.inputs)} files failed", file=sys.stderr)
        return 2
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .io import read_raw

    mosaic, meta = read_raw(args.input)
    info = {
        "make": meta.make,
        "model": meta.model,
        "width": meta.width,
        "height": meta.height,
        "cfa": meta.cfa_string() if meta.cfa_period == 2 else meta.cfa,
        "black_level": meta.black_level,
        "white_level": meta.white_level,
        "wb_as_shot": meta.wb_as_shot,
        "wb_daylight": meta.wb_daylight,
        "cam_to_srgb": meta.cam_to_srgb,
    }
    for key in ("exposure_time", "iso", "fnumber"):
        if getattr(meta, key) is not None:
            info[key] = getattr(meta, key)
    print(json.dumps(info, indent=2))
    return 0


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"exposure ratio must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isp", description="Render camera RAW files like LibRaw, differentiably, in PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render RAW files to PNG")
    render.add_argument("inputs", nargs="+", metavar="INPUT")
    render.add_argument("-o", "--output", required=True, help="PNG file (one input) or folder")
    render.add_argument("--wb", default="camera", help="camera | daylight | none | R,G,B (default camera)")
    render.add_argument("--gamma", default="srgb", choices=["srgb", "bt709", "linear"])
    render.add_argument("--demosaic", default="bilinear", choices=["bilinear", "half"])
    render.add_argument("--bits", type=int, default=8, choices=[8, 16])
    render.add_argument("--exposure-ratio", type=_ratio, default=1.0, help="multiply the normalised RAW (brighten a dark frame)")
    render.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    render.set_defaults(func=cmd_render)
    info = sub.add_parser("info", help="print a RAW file's metadata as JSON")
    info.add_argument("input")
    info.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    info.set_defaults(func=cmd_info)
    render.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        if args.debug:
            raise
        print(f"isp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
