"""Fuzz `isp info` / `isp render` with a few hundred mutated DNGs: every run ends with output or the
one-line error (exit 2), never a crash, an uncaught exception or a hang."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

import isp
from tests.rawfixtures import BAYER_PHASES, XTRANS, make_meta, smooth_mosaic

N_CASES = 300
TAGS_TO_CORRUPT = [256, 257, 258, 259, 262, 273, 277, 322, 323, 324, 325, 33421, 33422, 50713, 50714, 50717, 50721, 50728]


def _ifd_entries(data: bytes):
    (offset,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[offset : offset + 2])
    return [offset + 2 + 12 * i for i in range(count)]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:  # truncate
        cut = int(rng.integers(0, len(data)))
        return bytes(data[:cut]), f"truncated at {cut}"
    if kind == 1:  # flip bytes in the header / IFD region
        for _ in range(int(rng.integers(1, 8))):
            pos = int(rng.integers(0, min(600, len(data))))
            data[pos] = int(rng.integers(0, 256))
        return bytes(data), "header bytes flipped"
    if kind == 2:  # flip bytes anywhere
        for _ in range(int(rng.integers(1, 64))):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(data), "bits flipped"
    entries = _ifd_entries(bytes(data))
    chosen = [e for e in entries if struct.unpack("<H", data[e : e + 2])[0] in TAGS_TO_CORRUPT]
    entry = chosen[int(rng.integers(0, len(chosen)))]
    tag = struct.unpack("<H", data[entry : entry + 2])[0]
    if kind == 3:  # change the tag's value / offset field
        value = int(rng.choice([0, 1, 2, 3, 5, 12, 255, 65535, 2**31 - 1, 2**32 - 1, int(rng.integers(0, 2**32))]))
        data[entry + 8 : entry + 12] = struct.pack("<I", value)
        return bytes(data), f"tag {tag} value -> {value}"
    count = int(rng.choice([0, 1, 2, 7, 1000, 2**31]))  # change the tag's count
    data[entry + 4 : entry + 8] = struct.pack("<I", count)
    return bytes(data), f"tag {tag} count -> {count}"


def test_fuzz_isp_info_and_render(tmp_path):
    seeds = []
    for name, cfa, size in (("bayer", BAYER_PHASES["RGGB"], (48, 64)), ("xtrans", XTRANS, (48, 60))):
        meta = make_meta(cfa, 512, *size, exposure_time=0.1)
        isp.write_dng(tmp_path / f"seed_{name}.dng", smooth_mosaic(meta), meta)
        seeds.append((tmp_path / f"seed_{name}.dng").read_bytes())
    cases = tmp_path / "cases"
    cases.mkdir()
    rng = np.random.default_rng(2024)
    kinds = {}
    for i in range(N_CASES):
        data, kind = mutate(seeds[i % 2], rng)
        (cases / f"case_{i:04d}.dng").write_bytes(data)
        kinds[f"case_{i:04d}.dng"] = kind
    log = tmp_path / "log.jsonl"
    worker = Path(__file__).parent / "fuzz" / "isp_fuzz_worker.py"
    proc = subprocess.run([sys.executable, str(worker), str(cases), str(log)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    started = [r for r in records if r["state"] == "start"]
    ended = [r for r in records if r["state"] == "end"]
    if proc.returncode != 0:
        last = started[-1]
        raise AssertionError(f"worker died (rc {proc.returncode}) on {last} ({kinds[last['file']]}): {proc.stderr[-2000:]}")
    assert len(ended) == 2 * N_CASES
    outcomes = {"output": 0, "clean error": 0}
    for r in ended:
        assert r["rc"] in (0, 2), f"{r['file']} ({kinds[r['file']]}) {r['command']}: {r['rc']}"
        if r["rc"] == 2:
            lines = r["stderr"].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("isp: error: "), r
            outcomes["clean error"] += 1
        else:
            outcomes["output"] += 1
    # both kinds of outcome occur: the mutations are neither all harmless nor all fatal
    assert outcomes["output"] > 20 and outcomes["clean error"] > 100, outcomes
    print(f"fuzz: {2 * N_CASES} runs on {N_CASES} mutated DNGs: {outcomes}, 0 crashes")
