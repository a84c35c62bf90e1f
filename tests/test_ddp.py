"""DDP on the CPU: two gloo processes under torchrun train like one process with the global batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rawrestore.config import load_config
from rawrestore.train import checkpoint as ckpt
from rawrestore.train.distributed import weights_digest
from rawrestore.train.runlog import read_log
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def write_config(folder: Path, data_root: Path) -> Path:
    """The shared tiny experiment (tests/conftest.py), 4 iterations of batch 1, seed 5, into folder/ddp."""
    return tiny_yaml(folder, data_root, name="ddp.yaml", output="ddp", seed=5, iterations=4, batch_size=1, warmup_iters=0)


def run_torchrun(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """torchrun --standalone (rendezvous on a free port found at run time) in its own session.

    On failure or timeout the test fails with everything torchrun and both ranks printed; a
    timeout kills the whole process group, so no rank is left waiting in a collective.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", pytrace=False)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_two_gloo_ranks(tmp_path, data_root):
    config = write_config(tmp_path, data_root)
    done = run_torchrun(["-m", "rawrestore", "train", "-c", str(config), "--no-progress"], cwd=tmp_path)
    out = tmp_path / "ddp"

    # only rank 0 writes: one log with each step once, the expected checkpoints, nothing else
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "log.jsonl", "loss_curves.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.suffix == ".pt") == [
        "best.pt", "last.pt", "step_0000002.pt", "step_0000004.pt"]
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert done.stderr.count("model unet:") == 1  # rank 0 alone prints

    # both ranks end with the same weights, and they are the checkpoint's
    end = records[-1]
    assert end["event"] == "end" and len(end["weights_sha256_per_rank"]) == 2
    assert len(set(end["weights_sha256_per_rank"])) == 1
    state = ckpt.load_checkpoint(out / "checkpoints/last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    skeleton = Trainer(load_config(config, [f"output_dir={tmp_path}/skeleton"]), log=lambda _: None, progress=False)
    skeleton.net.load_state_dict(state["model"])
    assert weights_digest(skeleton.net) == end["weights_sha256_per_rank"][0]

    # validation metrics are reduced over ranks: each rank scored part of the 3 val images
    val = [r for r in records if "val" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert val[-1]["val_images_per_rank"] == [2, 1] and val[-1]["val"]["all"]["n"] == 3
    assert {k for k in val[-1]["val"] if k != "all"} == {"x100", "x250", "x300"}

    # 2 ranks x batch 1 see what one process with batch 2 sees: same samples, same crops, same updates
    single = Trainer(load_config(config, [f"output_dir={tmp_path}/single", "train.batch_size=2"]),
                     log=lambda _: None, progress=False)
    single.fit()
    reference = single.net.state_dict()
    difference = max((reference[k] - state["model"][k]).abs().max().item() for k in reference)
    assert difference < 1e-4
    initial = Trainer(load_config(config, [f"output_dir={tmp_path}/init"]), log=lambda _: None, progress=False)
    moved = max((reference[k] - v).abs().max().item() for k, v in initial.net.state_dict().items())
    assert moved > 1e-3  # the updates themselves are far larger than that difference
