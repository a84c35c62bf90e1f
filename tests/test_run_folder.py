"""The run folder: one trainer at a time, a killed run's leftovers, a full disk, a signal before the first step.

Each case asserts the exit code, the one line on stderr, and that nothing on disk was lost.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rawrestore.cli import main
from rawrestore.train import checkpoint as ckpt
from rawrestore.train import runlog
from rawrestore.train.runlog import read_log
from tests.conftest import REPO, tiny_yaml

TRAIN = ["train.val_every=0", "train.ckpt_every=2"]


def one_line(capfd, code: int, returned: int) -> str:
    """Assert the exit code and that the last stderr line is one `rawrestore: error:` line without a traceback."""
    err = capfd.readouterr().err
    assert returned == code, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_second_trainer_on_a_running_folder_stops_with_one_line(tmp_path, data_root, capfd):
    config = tiny_yaml(tmp_path, data_root)
    first = subprocess.Popen([sys.executable, "-m", "rawrestore", "train", "-c", str(config), "--no-progress",
                              "train.iterations=100000", "train.val_every=0", "train.ckpt_every=0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    try:
        log = tmp_path / "run/log.jsonl"
        deadline = time.monotonic() + 90
        while len([r for r in read_log(log) if "loss" in r]) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.05)
        lock = (tmp_path / "run/.lock").read_text().split()
        assert lock == [str(first.pid), socket.gethostname()]
        returned = main(["train", "-c", str(config), "--no-progress", "--resume", "auto"])
        line = one_line(capfd, 2, returned)
        assert line == (f"rawrestore: error: {tmp_path / 'run'} is in use by another trainer (pid {first.pid}); "
                        "wait for it, stop it, or set output_dir=... to a different folder")
        assert (tmp_path / "run/.lock").read_text().split() == lock  # the running trainer keeps its lock
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    steps = [r["step"] for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, in order: nothing interleaved
    assert not (tmp_path / "run/.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, data_root, capfd):
    config = tiny_yaml(tmp_path, data_root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run/.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(["train", "-c", str(config), "--no-progress", "train.iterations=2", *TRAIN]) == 0
    err = capfd.readouterr().err
    assert f"was left by process {dead.pid}, which is no longer running; taking it over" in err
    assert ckpt.load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 2
    assert not (tmp_path / "run/.lock").exists()


def test_fresh_run_in_a_killed_runs_folder_starts_clean(tmp_path, data_root, capfd):
    """A run killed before its first checkpoint left a temporary checkpoint and log records; a new run drops both."""
    config = tiny_yaml(tmp_path, data_root)
    folder = tmp_path / "run/checkpoints"
    folder.mkdir(parents=True)
    (folder / ".tmp-x1y2.part").write_bytes(b"half a checkpoint")
    (tmp_path / "run/log.jsonl").write_text('{"step": 1, "lr": 1, "loss": 99.0, "stale": true}\n{"step": 2, "lr"')
    assert main(["train", "-c", str(config), "--no-progress", "train.iterations=2", *TRAIN]) == 0
    assert not list(folder.glob(".tmp-*"))
    records = read_log(tmp_path / "run/log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert not any(r.get("stale") for r in records)


class _FullDisk(io.StringIO):
    """A text file on a full disk: every write fails with ENOSPC."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _open_full(target: str):
    """open() for runlog: files named `target` behave as on a full disk when opened for writing."""
    def fake(path, mode="r", *args, **kwargs):
        if Path(path).name == target and ("w" in mode or "a" in mode):
            return _FullDisk()
        return open(path, mode, *args, **kwargs)

    return fake


def test_log_write_on_a_full_disk_is_one_line(tmp_path, data_root, capfd, monkeypatch):
    config = tiny_yaml(tmp_path, data_root)
    assert main(["train", "-c", str(config), "--no-progress", "train.iterations=2", *TRAIN]) == 0
    before = snapshot(tmp_path / "run")
    capfd.readouterr()
    monkeypatch.setattr(runlog, "open", _open_full("log.jsonl"), raising=False)
    returned = main(["train", "-c", str(config), "--no-progress", "--resume", "auto", "train.iterations=4", *TRAIN])
    line = one_line(capfd, 2, returned)
    assert line == (f"rawrestore: error: {tmp_path / 'run/log.jsonl'}: disk full while writing the run log; "
                    "free space, then rerun with --resume auto")
    after = snapshot(tmp_path / "run")
    assert after["checkpoints/last.pt"] == before["checkpoints/last.pt"]  # the last good checkpoint is kept
    steps_before = [json.loads(line) for line in before["log.jsonl"].decode().splitlines() if '"loss"' in line]
    assert [r for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r] == steps_before  # every logged step kept
    assert not (tmp_path / "run/.lock").exists()


def test_resume_on_a_full_disk_keeps_the_log(tmp_path, data_root, capfd, monkeypatch):
    """Cutting log.jsonl back to the checkpoint fails on a full disk: one line, the log as it was, no temporary file."""
    config = tiny_yaml(tmp_path, data_root)
    assert main(["train", "-c", str(config), "--no-progress", "train.iterations=3", "train.val_every=0",
                 "train.ckpt_every=2"]) == 0
    before = snapshot(tmp_path / "run")
    capfd.readouterr()
    monkeypatch.setattr(runlog, "open", _open_full(".tmp-log.jsonl"), raising=False)
    returned = main(["train", "-c", str(config), "--no-progress", "--resume", str(tmp_path / "run/checkpoints/step_0000002.pt"),
                     "train.iterations=3", "train.val_every=0", "train.ckpt_every=2"])
    line = one_line(capfd, 2, returned)
    assert line.startswith(f"rawrestore: error: {tmp_path / 'run/log.jsonl'}: disk full")
    assert snapshot(tmp_path / "run") == before  # no .tmp-log.jsonl, nothing cut, nothing replaced


def test_sigterm_before_the_first_step_says_so(tmp_path, data_root, capfd, monkeypatch):
    """SIGTERM while the trainer is still being built: exit 0, one line, nothing trained or written."""
    from rawrestore.train import trainer as trainer_module

    build = trainer_module.Trainer.__init__

    def build_then_signal(self, *args, **kwargs):
        build(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before fit's first step

    monkeypatch.setattr(trainer_module.Trainer, "__init__", build_then_signal)
    config = tiny_yaml(tmp_path, data_root)
    assert main(["train", "-c", str(config), "--no-progress", *TRAIN]) == 0
    err = capfd.readouterr().err
    assert "train: stopped by SIGTERM before the first step; nothing trained, no checkpoint written" in err
    assert not (tmp_path / "run/checkpoints/last.pt").exists()
    assert [r for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r] == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were put back
