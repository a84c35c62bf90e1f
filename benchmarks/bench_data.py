"""Data loading: random 512x512 packed crops from the decode cache vs decoding with rawpy each time; loader memory.

1. SID-size Sony frames (4240x2832 DNG): seconds per training sample (a short + long pair, a
   1024x1024 RAW window each -> 4x512x512 packed, aligned) read through the memory-mapped
   decode cache (warm) vs the same dataset decoding both RAW files with rawpy on every sample.
   ratio = ours / reference; goal <= 0.05 (>= 20x faster). Timed with one torch thread, as
   DataLoader workers run (with 2 threads on a busy 2-core machine, OpenMP contention makes
   every tensor op ~10x slower and measures the machine, not the loader).
2. Peak memory of a 2-worker DataLoader over a 200-file synthetic set (`rawrestore synth`,
   50 scenes at 512 px), in a fresh process: the cold cache is prepared there (every file
   decoded once), then two epochs of 256 px crops. The sum over that process and its workers
   of VmRSS, polled every 10 ms from /proc. "ours_s" holds GiB here,
   reference_s the 2 GiB budget. RSS counts shared library pages once per process, so the
   sum overstates; the note adds the summed PSS (shared pages split between processes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import isp
from isp.meta import CameraMeta
from rawrestore.data import synth
from rawrestore.data.dataset import SIDPairDataset
from rawrestore.data.manifest import PairRecord, read_sid_list

HEIGHT, WIDTH = 2832, 4240  # SID Sony frame
CROP = 1024  # RAW pixels -> 512x512 packed Bayer


def _sid_frames(root: Path, pairs: int) -> list[PairRecord]:
    """`pairs` short frames sharing one long frame, 12 MP each, smooth content plus noise."""
    rng = np.random.default_rng(0)
    meta = CameraMeta("Bench", "SID-size", WIDTH, HEIGHT, [[0, 1], [1, 2]], [[512.0] * 2] * 2, 16383.0,
                      [2.1, 1.0, 1.6], [2.0, 1.0, 1.5], [[1.8, -0.6, -0.2], [-0.2, 1.5, -0.3], [0.05, -0.5, 1.45]])
    base = np.linspace(600, 12000, WIDTH, dtype=np.float32)[None, :].repeat(HEIGHT, axis=0)
    long_rel = "Sony/long/00001_00_10s.dng"
    isp.write_dng(root / long_rel, (base + rng.normal(0, 30, base.shape)).astype(np.uint16), meta)
    records = []
    for burst in range(pairs):
        short_rel = f"Sony/short/00001_{burst:02d}_0.1s.dng"
        dark = 512 + (base - 512) / 100 + rng.normal(0, 5, base.shape)
        isp.write_dng(root / short_rel, np.clip(dark, 0, 16383).astype(np.uint16), meta)
        records.append(PairRecord("train", 1, burst, short_rel, long_rel, 0.1, 10.0, 100.0, 200, 8.0, "sony", False))
    return records


def _time_samples(dataset: SIDPairDataset, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        dataset[i % len(dataset)]
    return (time.perf_counter() - start) / count


def bench_crops(samples_cached: int = 60, samples_decoded: int = 6) -> dict:
    """Seconds per random 512x512 packed pair sample: warm cache vs rawpy decode every time."""
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        records = _sid_frames(root, pairs=2)
        cached = SIDPairDataset(records, root, "sony", crop_size=CROP, cache_dir=root / ".cache", seed=0)
        cached.cache.warm([p for r in cached.records for p in (r.short, r.long)], progress=False)
        direct = SIDPairDataset(records, root, "sony", crop_size=CROP, cache_dir=None, seed=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker (and immune to oversubscribed cores)
        try:
            _time_samples(cached, 4)  # warm-up: page cache, allocator
            _time_samples(direct, 1)
            ours = _time_samples(cached, samples_cached)
            reference = _time_samples(direct, samples_decoded)
        finally:
            torch.set_num_threads(threads)
    return {
        "name": "data: random 512x512 packed pair crop (12MP DNG, cache vs rawpy)",
        "ours_s": ours,
        "reference_s": reference,
        "ratio": ours / reference,
        "note": (f"{1 / ours:.0f} vs {1 / reference:.1f} samples/s ({reference / ours:.0f}x), 1 torch thread as in a "
                 "loader worker; goal ratio <= 0.05 (>= 20x)"),
    }


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of a process in KiB; zeros if it has gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            rss = next((int(line.split()[1]) for line in handle if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            pss = next((int(line.split()[1]) for line in handle if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        pass
    return rss, pss


class _PeakMemory(threading.Thread):
    """Polls the summed RSS/PSS of this process and its children until stopped."""

    def __init__(self, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_rss_kib = self.peak_pss_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            totals = [_memory_kib(pid) for pid in [me] + _children(me)]
            self.peak_rss_kib = max(self.peak_rss_kib, sum(t[0] for t in totals))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(t[1] for t in totals))
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _loader_child(root: Path, epochs: int) -> dict:
    """In a fresh process: prepare the cache, run a 2-worker DataLoader, report the peak summed memory."""
    records = [r for split in ("train", "val", "test")
               for r in read_sid_list(root / f"Sony_{split}_list.txt", split, "sony")]
    files = len({p for r in records for p in (r.short, r.long)})
    monitor = _PeakMemory()
    monitor.start()
    start = time.perf_counter()
    dataset = SIDPairDataset(records, root, "sony", crop_size=256, cache_dir=root / ".cache", seed=0)
    dataset.prepare(progress=False)  # cold cache: every file decoded here once
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2)
    batches = 0
    for _ in range(epochs):
        for batch in loader:
            batches += 1
            del batch
    elapsed = time.perf_counter() - start
    monitor.stop()
    return {"files": files, "pairs": len(dataset), "batches": batches, "elapsed_s": elapsed,
            "peak_rss_kib": monitor.peak_rss_kib, "peak_pss_kib": monitor.peak_pss_kib}


def bench_loader_memory(scenes: int = 50, epochs: int = 2) -> dict:
    """Peak summed RSS of a fresh process running a 2-worker DataLoader over 4 * scenes synthetic files."""
    name = f"data: 2-worker DataLoader over {4 * scenes} synthetic files, peak RSS GiB"
    if not os.path.exists("/proc/self/smaps_rollup"):
        return {"name": name, "ours_s": None, "reference_s": 2.0, "ratio": None, "note": "skipped: needs Linux /proc"}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        synth.generate(root, "sony", scenes=scenes, seed=0, size=512, progress=False)
        # A fresh interpreter, so the generator's photographs and buffers are not counted.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--loader-child", str(root), str(epochs)],
                              capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"loader benchmark child failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    gib = result["peak_rss_kib"] / 2**20
    return {
        "name": name,
        "ours_s": gib,
        "reference_s": 2.0,
        "ratio": gib / 2.0,
        "note": (f"GiB, not seconds; budget 2 GiB; main + 2 workers, summed PSS {result['peak_pss_kib'] / 2**20:.2f} GiB; "
                 f"{result['files']} files, cold cache prepared, {epochs} epochs x {result['pairs']} pairs "
                 f"({result['batches']} batches of 8, 256 px crops) in {result['elapsed_s']:.1f} s"),
    }


def run() -> list[dict]:
    """Both data benchmarks as rows {name, ours_s, reference_s, ratio, note}."""
    return [bench_crops(), bench_loader_memory()]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--loader-child":
        print(json.dumps(_loader_child(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        for row in run():
            print(row)
