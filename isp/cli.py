"""The `isp` command: render camera files to PNG, TIFF or JPEG like LibRaw, print their metadata."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import InputError


def cmd_render(args: argparse.Namespace) -> int:
    from .outputs import check_bits, format_of, plan_outputs, write_image
    from .rawfile import WB_CHOICES, parse_wb

    wb = args.wb if args.wb in WB_CHOICES else parse_wb(args.wb)  # checked before any work
    for path in args.inputs:
        if Path(path).is_dir():
            raise InputError(f"{path} is a folder; name the RAW files in it (e.g. {Path(path) / '*.dng'})")
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    targets = plan_outputs(args.inputs, args.output, args.format)
    for target in targets:
        check_bits(format_of(target), args.bits)

    from tqdm import tqdm

    from .pipeline import render_file, resolve_device

    device = resolve_device(args.device)
    failures = 0
    bar = tqdm(list(zip(args.inputs, targets)), disable=len(args.inputs) < 2, unit="file", desc="render")
    for src, dst in bar:
        try:
            image = render_file(src, wb=wb, gamma=args.gamma, demosaic=args.demosaic, device=device,
                                exposure_ratio=args.exposure_ratio, half_size=args.half_size, flip=not args.no_flip,
                                warn=lambda line: tqdm.write(line, file=sys.stderr))
        except InputError as exc:  # this input cannot be read: the others still render
            if len(args.inputs) == 1:
                raise
            failures += 1
            tqdm.write(f"isp: error: {exc}", file=sys.stderr)
            continue
        write_image(dst, image, args.bits, inputs=args.inputs)  # a write failure (disk full) stops the batch
    if failures:
        print(f"isp: {failures} of {len(args.inputs)} files failed", file=sys.stderr)
        return 2
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .rawfile import libraw_multipliers, open_raw

    raw = open_raw(args.input)
    gains, source = libraw_multipliers(raw, "camera")
    height, width = raw.data.shape[:2]
    info = {
        "make": raw.make,
        "model": raw.model,
        "layout": {"cfa": "colour filter array", "stack": "full colour (already demosaiced)", "mono": "monochrome"}[raw.layout],
        "width": width,
        "height": height,
        "flip": raw.flip,
        "cfa": None if raw.cfa is None else (
            "".join("RGB"[c] for c in raw.cfa.ravel()) if raw.cfa.shape[0] == 2 else raw.cfa.tolist()),
        "black_level": raw.black.tolist(),
        "white_level": raw.white,
        "wb_as_shot": [round(float(v), 6) for v in gains[:3] / gains[1]],
        "wb_source": source,
        "wb_camera_in_file": [round(float(v), 6) for v in raw.cam_mul],
        "wb_daylight": [round(float(v), 6) for v in raw.pre_mul[:3] / raw.pre_mul[1]] if raw.pre_mul[1] > 0 else None,
        "cam_to_srgb": None if raw.cam_to_srgb is None else raw.cam_to_srgb.tolist(),
        "matrix_source": raw.matrix_source,
    }
    if raw.unique_model:
        info["unique_camera_model"] = raw.unique_model
    for key in ("exposure_time", "iso", "fnumber"):
        if getattr(raw, key) is not None:
            info[key] = getattr(raw, key)
    print(json.dumps(info, indent=2))
    return 0


def _ratio(text: str) -> float:
    from .develop import MAX_EXPOSURE_RATIO

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (np.isfinite(value) and 0 < value <= MAX_EXPOSURE_RATIO):
        raise argparse.ArgumentTypeError(f"exposure ratio must be positive and at most {MAX_EXPOSURE_RATIO:g}, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (what is wrong; `-h` shows the usage), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isp", description="Render camera RAW files like LibRaw, differentiably, in PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render RAW files to PNG, TIFF or JPEG like LibRaw")
    render.add_argument("inputs", nargs="+", metavar="INPUT")
    render.add_argument("-o", "--output", required=True,
                        help="image file (.png .tif .tiff .jpg .jpeg; one input) or folder (<stem>.<format> per input)")
    render.add_argument("--format", choices=["png", "tiff", "jpeg"], help="file format in an output folder (default png)")
    render.add_argument("--wb", default="camera",
                        help="camera (LibRaw's auto when the file has none) | auto | daylight | none | R,G,B (default camera)")
    render.add_argument("--gamma", default="srgb", choices=["srgb", "bt709", "linear"])
    render.add_argument("--demosaic", default="bilinear", choices=["bilinear", "malvar", "half"],
                        help="bilinear = LibRaw LINEAR; malvar = Malvar-He-Cutler (Bayer); half = --half-size")
    render.add_argument("--half-size", action="store_true", help="one pixel per 2x2 block, as rawpy's half_size=True")
    render.add_argument("--no-flip", action="store_true", help="keep sensor orientation (default: the file's, as rawpy)")
    render.add_argument("--bits", type=int, choices=[8, 16], help="PNG 8 (default) or 16, TIFF 16 (default) or 8, JPEG 8")
    render.add_argument("--exposure-ratio", type=_ratio, default=1.0, help="multiply the normalised RAW (brighten a dark frame)")
    render.add_argument("--device", default="auto", help="auto (default: cuda if present) | cpu | cuda | cuda:N")
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
