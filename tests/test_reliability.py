"""Reliability of `rawrestore` at the command line: bad input, faults and untrusted files.

Every bad input ends with one line on stderr naming the problem, exit code 2, no traceback and
nothing written. Most cases run `rawrestore.cli.main` in this process with `capfd`, which also
sees what C libraries (LibRaw) print on file descriptor 2.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import get_worker_info

import isp
from rawrestore.cli import main
from rawrestore.data.cache import DecodeCache
from rawrestore.data.manifest import read_sid_list, write_manifest
from rawrestore.train import checkpoint as ckpt
from rawrestore.train.runlog import read_log
from tests.conftest import tiny_yaml

REPO = Path(__file__).resolve().parent.parent
SHORT = "Sony/short/00001_00_0.04s.dng"  # a training pair of the synthetic set
LONG = "Sony/long/00001_00_10s.dng"


def write_config(folder: Path, data_root: Path) -> Path:
    """The shared tiny experiment (conftest), as 2 iterations of batch 1 without validation or checkpoints."""
    return tiny_yaml(folder, data_root, iterations=2, batch_size=1, warmup_iters=0, val_every=0, ckpt_every=0)


def one_line_error(capfd, code: int, alone: bool = True) -> str:
    """Assert exit code 2 and one `rawrestore: error:` line, last on stderr, no traceback. -> that line.

    `alone`: nothing else on stderr (the error came before training printed its first lines).
    """
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("rawrestore: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if alone:
        assert len(lines) == 1, err
    return errors[0]


def train(config: Path, *overrides: str) -> int:
    return main(["train", "-c", str(config), "--no-progress", *overrides])


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory) -> Path:
    """last.pt of a 2-step tiny run."""
    folder = tmp_path_factory.mktemp("trained")
    assert train(write_config(folder, data_root)) == 0
    return folder / "run/checkpoints/last.pt"


# ------------------------------------------------------------------- bad input: infer


@pytest.mark.parametrize("kind", ["not_raw", "empty", "truncated"])
def test_infer_bad_raw_file(kind, data_root, checkpoint, tmp_path, capfd):
    source = tmp_path / f"{kind}.dng"
    whole = (data_root / "Sony/short/10001_00_0.1s.dng").read_bytes()
    # the truncated file ends inside the pixel data: LibRaw itself prints "Unexpected end of file" on fd 2
    source.write_bytes({"not_raw": b"this is a text file, not a RAW\n" * 40, "empty": b"", "truncated": whole[:5000]}[kind])
    out = tmp_path / "out"
    line = one_line_error(capfd, main(["infer", str(source), "--checkpoint", str(checkpoint), "-o", str(out / "x.png"),
                                       "--dng", str(out / "x.dng")]))
    reason = {"not_raw": "not a RAW file LibRaw can read", "empty": "file is empty", "truncated": "truncated or corrupt RAW data"}
    assert str(source) in line and reason[kind] in line
    assert not out.exists()


def test_infer_unwritable_output_folder(data_root, checkpoint, tmp_path, capfd):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # unwritable even for root
    source = data_root / "Sony/short/10001_00_0.1s.dng"
    line = one_line_error(capfd, main(["infer", str(source), "--checkpoint", str(checkpoint),
                                       "-o", str(blocker / "sub/x.png")]))
    assert f"cannot create output folder {blocker / 'sub'}" in line
    # a DNG that cannot be written takes the PNG with it: both outputs or neither
    png = tmp_path / "ok/x.png"
    line = one_line_error(capfd, main(["infer", str(source), "--checkpoint", str(checkpoint), "-o", str(png),
                                       "--dng", str(blocker / "x.dng")]))
    assert str(blocker) in line and not png.exists()


# ------------------------------------------------------------------- bad input: data


def one_pair_root(tmp_path: Path, data_root: Path, short_meta_change: dict | None = None, short_size: int | None = None) -> Path:
    """A dataset root with one training pair copied from the synthetic set, its short file rewritten as asked."""
    root = tmp_path / "pair"
    for rel in (SHORT, LONG):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / rel, root / rel)
    mosaic, meta = isp.read_raw(root / SHORT)
    if short_size is not None:
        mosaic = np.ascontiguousarray(mosaic[:short_size, :short_size])
        meta = dataclasses.replace(meta, width=short_size, height=short_size)
    meta = dataclasses.replace(meta, **(short_meta_change or {}))
    isp.write_dng(root / SHORT, mosaic, meta)
    (root / "Sony_train_list.txt").write_text(f"./{SHORT} ./{LONG} ISO200 F8\n")
    return root


@pytest.mark.parametrize("mismatch", ["size", "camera"])
def test_pair_mismatch_stops_before_training(mismatch, data_root, tmp_path, capfd):
    if mismatch == "size":
        root = one_pair_root(tmp_path, data_root, short_size=96)
    else:
        root = one_pair_root(tmp_path, data_root, {"model": "Other camera"})
    config = write_config(tmp_path, data_root)
    line = one_line_error(capfd, train(config, f"data.root={root}", f"data.cache_dir={tmp_path}/cache"))
    assert f"pair {mismatch} mismatch" in line
    assert str(root / SHORT) in line and str(root / LONG) in line
    assert not (tmp_path / "run").exists()  # found while preparing the data, before any output


@pytest.mark.parametrize("line_text,expected", [
    (f"./{SHORT} ./Sony/long/00001_00_10s.dng ISO200 F8", None),  # control: the good line trains
    ("./Sony/short/00001_00_0s.dng ./Sony/long/00001_00_10s.dng ISO200 F8", "short exposure must be a positive number"),
    ("./Sony/short/00001_00.dng ./Sony/long/00001_00_10s.dng ISO200 F8", "is not SID's SSSSS_BB_<exposure>s.<ext>"),
    ("./Sony/../../../etc/00001_00_0.1s.dng ./Sony/long/00001_00_10s.dng ISO200 F8", "points outside the dataset root"),
    ("/etc/00001_00_0.1s.dng ./Sony/long/00001_00_10s.dng ISO200 F8", "is absolute"),
])
def test_bad_sid_list_line_is_named(line_text, expected, data_root, tmp_path, capfd):
    root = one_pair_root(tmp_path, data_root)
    (root / "Sony_train_list.txt").write_text(line_text + "\n")
    config = write_config(tmp_path, data_root)
    code = train(config, f"data.root={root}", f"data.cache_dir={tmp_path}/cache")
    if expected is None:
        assert code == 0
        return
    line = one_line_error(capfd, code)
    assert f"{root / 'Sony_train_list.txt'}:1: " in line and expected in line
    assert not (tmp_path / "run").exists()


def test_missing_file_named_in_the_list(data_root, tmp_path, capfd):
    root = one_pair_root(tmp_path, data_root)
    (root / SHORT).unlink()
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), f"data.root={root}"))
    assert f"{root / SHORT}: file named in the train list is missing" in line
    assert not (tmp_path / "run").exists()


def write_csv(path: Path, data_root: Path, row2: dict[str, str]) -> Path:
    """A manifest of the synthetic set with the first data row (line 2) changed."""
    records = [r for split in ("train", "val", "test") for r in read_sid_list(data_root / f"Sony_{split}_list.txt", split, "sony")]
    write_manifest(records, path)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    values = dict(zip(header, lines[1].split(",")))
    values.update(row2)
    lines[1] = ",".join(values[name] for name in header)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("row2,expected", [
    ({}, None),  # control
    ({"ratio": "1000"}, "ratio 1000 exceeds data.ratio_cap 300"),
    ({"short_exposure_s": "0"}, "column 'short_exposure_s' must be a positive number"),
    ({"short": "../../etc/passwd"}, "points outside the dataset root"),
    ({"short": "/etc/passwd"}, "is absolute"),
])
def test_bad_manifest_row_is_named(row2, expected, data_root, tmp_path, capfd):
    """An explicit ratio above data.ratio_cap is an error naming the row (ratios computed from SID file names are
    capped at 300 silently: that is SID's protocol); so are a zero exposure and paths leaving the root."""
    manifest = write_csv(tmp_path / "m.csv", data_root, row2)
    code = train(write_config(tmp_path, data_root), f"data.manifest={manifest}")
    if expected is None:
        assert code == 0
        return
    line = one_line_error(capfd, code)
    assert f"{manifest}:2: " in line and expected in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- bad input: config


@pytest.mark.parametrize("override,expected", [
    ("train.lr_max=1", "unknown config key 'train.lr_max'"),
    ("train.iterations=many", "config key 'train.iterations' expects int"),
    ("train.lr=-1e-4", "config key 'train.lr' must be a finite number > 0"),
    ("data.crop_size=63", "config key 'data.crop_size' must be a multiple of the sony CFA period 2"),
    ("data.crop_size=256", "crop_size 256 (data.crop_size) is larger than the 128x128 frame"),
])
def test_bad_config_values(override, expected, data_root, tmp_path, capfd):
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), override))
    assert expected in line
    assert not (tmp_path / "run").exists()  # the crop larger than the frames too is caught before training starts


def test_val_crop_larger_than_the_frames_fails_before_training(data_root, tmp_path, capfd):
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), "train.val_every=1", "data.val_crop=256"))
    assert "crop_size 256 (data.val_crop) is larger than the 128x128 frame" in line and "20001_00_10s.dng" in line
    assert not (tmp_path / "run").exists()


def bad_kernel(kind: str) -> np.ndarray:
    kernel = np.zeros((3, 3))
    if kind == "shape":
        return np.full((4, 4), 1 / 16)
    if kind == "negative":
        kernel[1, 1], kernel[0, 1] = 1.02, -0.02  # sums to 1, one tap < 0
    else:
        kernel[1, 1], kernel[0, 1] = 0.9, 0.05  # loses 5% of the charge
    return kernel


@pytest.mark.parametrize("kind,expected", [
    ("shape", "shape must be (2,2,3,3) or (3,3) for CFA period 2, got (4, 4)"),
    ("negative", "negative tap -0.02"),
    ("energy", "not energy preserving"),
])
def test_bad_crosstalk_kernel_file(kind, expected, data_root, tmp_path, capfd):
    path = tmp_path / "K.npy"
    np.save(path, bad_kernel(kind))
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), "loss.crosstalk.weight=0.1",
                                       f"loss.crosstalk_kernel={path}"))
    assert f"crosstalk kernel {path}: " in line and expected in line
    assert not (tmp_path / "run").exists()


def test_missing_pretrained_weights_write_nothing(data_root, tmp_path, capfd):
    weights = tmp_path / "vgg19-missing.pth"
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), "loss.perceptual.weight=0.05",
                                       f"loss.perceptual.weights={weights}", "loss.drop_missing_pretrained=false"))
    assert str(weights) in line and "loss.perceptual" in line
    assert not (tmp_path / "run").exists()


def test_unwritable_output_dir(data_root, tmp_path, capfd):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # unwritable even for root
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), f"output_dir={blocker}/sub"))
    assert f"cannot write to output_dir {blocker / 'sub'}: Not a directory" in line
    assert blocker.read_text() == "a file where a folder should be"


# ------------------------------------------------------------------------- full disk


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(data_root, tmp_path, capfd, monkeypatch):
    config = write_config(tmp_path, data_root)
    folder = tmp_path / "run/checkpoints"
    real_fdopen = os.fdopen
    opened: list[str] = []

    class FullDisk:
        """A checkpoint temporary file that takes half of what is written, then reports a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        name = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if name.parent == folder and name.name.startswith(".tmp-"):
            opened.append(name.name)
            if len(opened) == 5:  # step 1 wrote step_0000001.pt and last.pt (file + sidecar each); step 2's first file
                return FullDisk(handle)
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    line = one_line_error(capfd, train(config, "train.iterations=3", "train.ckpt_every=1"), alone=False)
    monkeypatch.undo()
    assert f"cannot write checkpoint {folder / 'step_0000002.pt'}: No space left on device" in line
    assert len(opened) == 5
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "last.pt.sha256", "step_0000001.pt",
                                                        "step_0000001.pt.sha256"]  # temporary file removed
    for name in ("last.pt", "step_0000001.pt"):
        assert ckpt.verify_checkpoint(folder / name) == (True, "sha256 ok")
        assert ckpt.load_checkpoint(folder / name)["step"] == 1
    # once there is room again the run continues from the checkpoint that survived
    assert train(config, "train.iterations=3", "train.ckpt_every=1", "--resume", "auto") == 0
    assert ckpt.load_checkpoint(folder / "last.pt")["step"] == 3
    assert "resume: " in capfd.readouterr().err


# ------------------------------------------------------------------ DataLoader workers


def test_worker_error_is_one_line_naming_the_file(data_root, tmp_path, capfd, monkeypatch):
    crop = DecodeCache.crop

    def failing_crop(self, path, *args):
        if SHORT in str(path) and get_worker_info() is not None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return crop(self, path, *args)

    monkeypatch.setattr(DecodeCache, "crop", failing_crop)
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), "data.num_workers=2", "train.iterations=3"),
                          alone=False)
    assert str(data_root / SHORT) in line and "Input/output error" in line


def test_killed_worker_names_the_file_it_was_reading(data_root, tmp_path, capfd, monkeypatch):
    crop = DecodeCache.crop

    def dying_crop(self, path, *args):
        if SHORT in str(path) and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # in a worker process only
        return crop(self, path, *args)

    monkeypatch.setattr(DecodeCache, "crop", dying_crop)
    code = train(write_config(tmp_path, data_root), "data.num_workers=2", "train.iterations=3")
    err = capfd.readouterr().err
    assert code == 2, err
    # (a worker torn down mid-transfer may add a traceback from multiprocessing's resource-sharer thread)
    last = err.strip().splitlines()[-1]
    assert last.startswith("rawrestore: error: DataLoader worker (pid") and str(data_root / SHORT) in last
    assert err.count("rawrestore: error:") == 1


# ------------------------------------------------------------------------- SIGINT


def test_sigint_checkpoints_exits_zero_and_resume_continues(data_root, tmp_path):
    config = write_config(tmp_path, data_root)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "rawrestore", "train", "-c", str(config), "--no-progress",
               "train.iterations=100000", "train.ckpt_every=0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    log = tmp_path / "run/log.jsonl"
    deadline = time.monotonic() + 90
    while len([r for r in read_log(log) if "loss" in r]) < 2:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no 2 steps in 90 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGINT" in stderr and "Traceback" not in stderr
    stopped = ckpt.load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"]
    assert stopped == [r["step"] for r in read_log(log) if "loss" in r][-1] >= 2

    resumed = subprocess.run(command + ["--resume", "auto", "--stop-at", str(stopped + 2)], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped}" in resumed.stderr
    assert [r["step"] for r in read_log(log) if "loss" in r] == list(range(1, stopped + 3))


# ------------------------------------------------------------------ untrusted input


class _Payload:
    """Unpickling this would create a folder: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_with_pickled_code_is_refused(data_root, tmp_path, capfd):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "step": 0, "model": {}, "payload": _Payload(marker)}, evil)
    source = data_root / "Sony/short/10001_00_0.1s.dng"
    line = one_line_error(capfd, main(["infer", str(source), "--checkpoint", str(evil), "-o", str(tmp_path / "o/x.png")]))
    assert f"checkpoint {evil} holds pickled Python objects" in line and "refused" in line
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), "--resume", str(evil)))
    assert f"checkpoint {evil} holds pickled Python objects" in line
    assert not marker.exists() and not (tmp_path / "o").exists()
    assert not (tmp_path / "run/checkpoints/last.pt").exists()


def test_yaml_with_python_tags_is_refused(tmp_path, capfd):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'train:\n  lr: !!python/object/apply:os.mkdir ["{marker}"]\n')
    line = one_line_error(capfd, train(config))
    assert f"{config}: line 2 is not valid YAML" in line and "python/object/apply:os.mkdir" in line
    plain = tmp_path / "plain.yaml"
    plain.write_text("seed: 1\n")
    line = one_line_error(capfd, train(plain, f'train.lr=!!python/object/apply:os.mkdir ["{marker}"]'))
    assert "is not valid YAML" in line
    assert not marker.exists()
