"""Run every benchmarks/bench_*.py; print a table of our time, the reference's, and their ratio; save JSON.

Usage: python benchmarks/run.py [NAME ...] [--json benchmarks/results/latest.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bench names, e.g. isp data losses train (default: all)")
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    files = sorted(HERE.glob("bench_*.py"))
    if args.names:
        files = [f for f in files if f.stem.removeprefix("bench_") in args.names]
    rows = []
    for path in files:
        start = time.perf_counter()
        for row in load(path).run():
            row["bench"] = path.stem
            rows.append(row)
        print(f"[{path.stem} done in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print(f"{'benchmark':58s} {'ours':>10s} {'reference':>10s} {'ratio':>8s}  note")
    for r in rows:
        fmt = lambda v: f"{v:10.4g}" if isinstance(v, (int, float)) else f"{str(v):>10s}"
        print(f"{r['name'][:58]:58s} {fmt(r['ours_s'])} {fmt(r['reference_s'])} {fmt(r['ratio'])}  {r.get('note', '')}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cuda": torch.cuda.is_available()}
    out.write_text(json.dumps({"environment": meta, "rows": rows}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
