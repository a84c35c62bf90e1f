"""Noise calibration of 12 MP frames: time and peak memory of `calibrate-noise` on 4 ISOs x (10 darks + 10 flat pairs).

The shoot: SID-size Sony frames (4240x2832 Bayer DNG, 12 MP), 4 ISOs, per ISO 10 dark frames
and 10 flat pairs at two levels, noised with the project's ELD model (`rawrestore.data.synth
.dark_frame`). To keep the disk use at ~0.6 GB, each ISO has 2 distinct dark frames and 2 distinct
pairs per level, each written once and hard-linked 5 times under other names: the calibration
still reads, decodes and measures 120 files (160 frames' worth of work is not saved anywhere).

1. Time: `rawrestore calibrate-noise` in a fresh process (`python -m rawrestore`, no report),
   wall seconds. Reference: the same process decoding the 120 files with `isp.read_raw` and
   nothing else, so ratio = calibration / decoding alone (the cost of the measurements on top of
   reading the files).
2. Peak memory: VmHWM of that calibration process (polled from /proc), GiB. Reference: the 120 frames held at once
   as uint16 (what not streaming would take at the least); ratio < 1 means streamed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HEIGHT, WIDTH = 2832, 4240
ISOS = (800, 1600, 3200, 6400)
DARKS, PAIRS, LINKS = 10, 10, 5  # per ISO; distinct files = DARKS / LINKS darks and PAIRS / LINKS pairs
LEVELS = (0.05, 0.3)
ROOT = Path(__file__).resolve().parent.parent


def _write_shoot(root: Path) -> int:
    import isp
    from dataclasses import replace

    from rawrestore.data.shoot import _flat_signal, shoot_params
    from rawrestore.data.synth import CAMERA_SPECS, _camera_meta, dark_frame

    spec = CAMERA_SPECS["sony"]
    params = shoot_params("SonyA7S2", ISOS)
    cfa = np.asarray(spec.cfa)
    generator = torch.Generator().manual_seed(0)
    files = 0
    for iso in ISOS:
        for kind, level_list, count in (("dark", (None,), DARKS), ("flat", LEVELS, PAIRS // len(LEVELS))):
            for level in level_list:
                exposure = 1.0 if level is None else level
                meta = replace(_camera_meta(spec, WIDTH, np.eye(3), [2.0, 1.0, 1.5], [2.0, 1.0, 1.5], exposure),
                               width=WIDTH, height=HEIGHT, iso=float(iso))
                signal = (torch.zeros(1, 1, HEIGHT, WIDTH, dtype=torch.float32) if level is None
                          else _flat_signal(cfa, WIDTH, level)[..., :HEIGHT, :].float())
                sides = ("",) if level is None else ("a", "b")
                for distinct in range(count // LINKS if level is None else max(1, count // LINKS)):
                    for side in sides:
                        mosaic = dark_frame(signal, 1.0, params[float(iso)], spec.black_level, spec.white_level, cfa, generator)
                        first = root / kind / f"iso{iso}" / f"{kind}_{level or 0:g}_{distinct}_0{side}.dng"
                        isp.write_dng(first, mosaic, meta)
                        files += 1
                        for copy in range(1, LINKS):
                            os.link(first, first.with_name(f"{kind}_{level or 0:g}_{distinct}_{copy}{side}.dng"))
                            files += 1
    return files


_DECODE_ONLY = """
import sys, isp
from pathlib import Path
for folder in sys.argv[1:]:
    for path in sorted(Path(folder).rglob('*.dng')):
        isp.read_raw(path)
"""


def _peak_rss_gib(pid: int) -> float | None:
    """VmHWM of a running process (its own address space's high-water mark, reset by exec), GiB; None once gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        return None
    return None


def _run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB, polled from /proc every 20 ms) of a child process with one OpenMP thread."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    peak = 0.0
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        while child.poll() is None:
            peak = max(peak, _peak_rss_gib(child.pid) or 0.0)
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(err.read().decode()[-2000:])
    return seconds, peak


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the noise of 120 12 MP frames: oversubscribed OpenMP on a busy box is far slower
        try:
            files = _write_shoot(root)
        finally:
            torch.set_num_threads(threads)
        print(f"[bench_calibration: wrote {files} files of {WIDTH}x{HEIGHT} in {time.perf_counter() - start:.0f} s]",
              file=sys.stderr)
        decode_s, decode_gib = _run([sys.executable, "-c", _DECODE_ONLY, str(root / "dark"), str(root / "flat")])
        calib_s, calib_gib = _run([sys.executable, "-m", "rawrestore", "calibrate-noise", "--dark", str(root / "dark"),
                                   "--flat", str(root / "flat"), "--out", str(root / "camera.json")])
    held = files * HEIGHT * WIDTH * 2 / 2 ** 30
    return [
        {"name": f"calibrate-noise {len(ISOS)} ISOs x ({DARKS} dark + {PAIRS} flat pairs), 12 MP",
         "ours_s": calib_s, "reference_s": decode_s, "ratio": calib_s / decode_s,
         "note": f"reference: decoding the {files} files alone ({decode_s / files:.2f} s per file)"},
        {"name": "calibrate-noise peak memory (GiB)", "ours_s": calib_gib, "reference_s": held, "ratio": calib_gib / held,
         "note": f"reference: the {files} frames held at once as uint16; decoding alone peaks at {decode_gib:.2f} GiB"},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
