"""The `rawrestore` command. Each sub-command lives in its own module (configure + run)."""
from __future__ import annotations

import argparse
import importlib
import sys

from isp.errors import InputError
from rawrestore.logs import configure as configure_logging

# command -> module exposing `configure(parser)` and `run(args) -> int`
COMMANDS = {
    "synth": "rawrestore.data.synth",
    "manifest": "rawrestore.data.manifest",
    "calibrate-crosstalk": "rawrestore.physics.calibrate",
    "calibrate-noise": "rawrestore.physics.noise_calibration",
    "train": "rawrestore.train.cli",
    "eval": "rawrestore.evaluate",
    "infer": "rawrestore.infer",
    "score": "rawrestore.score",
}

HELP = {
    "synth": "generate the built-in synthetic SID-format dataset",
    "manifest": "build and check CSV manifests for a SID-layout folder",
    "calibrate-crosstalk": "estimate the crosstalk kernel from aligned pairs",
    "calibrate-noise": "calibrate a camera's noise from dark and flat frames (ELD-layout JSON)",
    "train": "train a model from a config",
    "eval": "evaluate a checkpoint: PSNR / SSIM / LPIPS / dE00 per ratio",
    "infer": "restore one dark RAW file",
    "score": "score another method's outputs on SID (sid or raw protocol)",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rawrestore", description="Physics-aware RAW low-light restoration.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, module in COMMANDS.items():
        sp = sub.add_parser(name, help=HELP[name])
        sp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        if name == wanted:  # import only the module that runs (keeps `--help` and start-up fast)
            importlib.import_module(module).configure(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after the options (argparse stops filling a positional list at the first option)
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides or []) + extra
    configure_logging()
    try:
        return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
    except InputError as exc:
        if args.debug:
            raise
        print(f"rawrestore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rawrestore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
