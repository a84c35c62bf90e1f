"""Trainer: bit-exact resume, atomic checksummed checkpoints, non-finite guard, SIGTERM and SIGKILL recovery."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rawrestore.config import load_config
from rawrestore.train import checkpoint as ckpt
from rawrestore.errors import ConfigError
from rawrestore.train.optim import lr_factor
from rawrestore.train.runlog import TrainingError, read_log
from rawrestore.train.sampling import StepBatchSampler
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def write_config(folder: Path, data_root: Path) -> Path:
    """The shared tiny experiment (tests/conftest.py): width-4 U-Net, 64-pixel crops, RAW-L1, 6 iterations, on the CPU."""
    return tiny_yaml(folder, data_root)


def quiet(_: str) -> None:
    """Swallow the trainer's progress lines."""


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("variant", ["plain", "noise_uncertainty"])
def test_resume_is_bit_exact(tmp_path, data_root, variant):
    """6 steps in one go == 3 steps, resume, 3 steps: weights, EMA, optimiser and loss weights bit-identical."""
    overrides = ["train.accumulate=2", "train.ema=0.9"]
    if variant == "noise_uncertainty":
        overrides += ["data.synthetic_noise=true", "loss.weighting=uncertainty", "loss.ssim.weight=0.05",
                      "data.gain_jitter=0.5", "data.synthetic_crosstalk=uniform(0.02)", "data.clip_aligned=false"]
    config = write_config(tmp_path, data_root)
    straight = Trainer(load_config(config, overrides + [f"output_dir={tmp_path}/a"]), log=quiet, progress=False)
    assert straight.fit().step == 6

    # the split run also loads with two DataLoader workers: the data order must not depend on them
    split_cfg = load_config(config, overrides + [f"output_dir={tmp_path}/b", "data.num_workers=2"])
    first = Trainer(split_cfg, log=quiet, progress=False)
    result = first.fit(stop_at=3)
    assert (result.step, result.reason) == (3, "stop_at")
    second = Trainer(split_cfg, log=quiet, progress=False)
    assert second.resume("auto") and second.step == 3
    assert second.fit().step == 6

    a = ckpt.load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    b = ckpt.load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    assert states_equal(a["model"], b["model"])
    assert states_equal(a["ema"], b["ema"])
    assert states_equal(a["loss"], b["loss"])
    if variant == "noise_uncertainty":
        assert len(a["loss"]) == 2  # one learnable log-sigma per term, checkpointed
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    initial = Trainer(split_cfg, log=quiet, progress=False).net.state_dict()
    assert not states_equal(initial, a["model"])  # training moved the weights
    # the resumed run's log has each step once, with the same losses as the straight run
    log_a = [r for r in read_log(tmp_path / "a/log.jsonl") if "loss" in r]
    log_b = [r for r in read_log(tmp_path / "b/log.jsonl") if "loss" in r]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_step_sampler_shards_and_restarts():
    """Ranks split each global batch; a sampler started at batch k continues the stream exactly."""
    full = StepBatchSampler(10, 2, seed=1)
    stream = [full.batch(b) for b in range(12)]  # 2.4 epochs
    restarted = StepBatchSampler(10, 2, seed=1, start_batch=7)
    assert [next(iter(restarted))] == [stream[7]]
    epoch0 = [index for batch in stream[:5] for index, _ in batch]
    assert sorted(epoch0) == list(range(10))  # every sample once per epoch
    rank0 = StepBatchSampler(10, 1, seed=1, rank=0, world_size=2)
    rank1 = StepBatchSampler(10, 1, seed=1, rank=1, world_size=2)
    assert [rank0.batch(b) + rank1.batch(b) for b in range(5)] == stream[:5]
    seeds = {seed for batch in stream for _, seed in batch}
    assert len(seeds) == 24  # per (epoch, index): a sample seen again in a later epoch gets a new crop


def test_lr_schedules(tmp_path, data_root):
    cfg = load_config(write_config(tmp_path, data_root), ["train.iterations=100", "train.warmup_iters=10"])
    assert lr_factor(0, cfg.train) == pytest.approx(0.1)
    assert lr_factor(9, cfg.train) == pytest.approx(1.0)
    assert lr_factor(55, cfg.train) == pytest.approx(0.5)
    assert lr_factor(100, cfg.train) == pytest.approx(0.0, abs=1e-12)
    sid = load_config(write_config(tmp_path, data_root),
                      ["train.iterations=100", "train.schedule=step", "train.step_milestones=[50, 80]"])
    assert [lr_factor(s, sid.train) for s in (0, 49, 50, 79, 80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


# ------------------------------------------------------------- checkpoint files


def test_checkpoints_atomic_with_checksum_fallback(tmp_path, data_root):
    """Corrupt and truncated latest checkpoints are reported and the previous valid one is used."""
    config = write_config(tmp_path, data_root)
    cfg = load_config(config, ["train.iterations=6", "train.val_every=0"])
    Trainer(cfg, log=quiet, progress=False).fit(stop_at=4)
    folder = tmp_path / "run/checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["last.pt", "last.pt.sha256", "step_0000002.pt", "step_0000002.pt.sha256",
                     "step_0000004.pt", "step_0000004.pt.sha256"]  # no temporary files left behind
    for name in ("last.pt", "step_0000002.pt"):
        digest, listed = (folder / f"{name}.sha256").read_text().split()
        assert listed == name and digest == ckpt.sha256_file(folder / name)
    assert ckpt.verify_checkpoint(folder / "last.pt") == (True, "sha256 ok")

    # flip one byte in last.pt (still a loadable zip is not guaranteed: the checksum must catch it)
    data = bytearray((folder / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "last.pt").write_bytes(bytes(data))
    # and cut step 4 short, as a kill in the middle of a copy would
    whole = (folder / "step_0000004.pt").read_bytes()
    (folder / "step_0000004.pt").write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ckpt.CheckpointError, match="sha256 mismatch"):
        ckpt.load_checkpoint(folder / "last.pt")

    lines: list[str] = []
    trainer = Trainer(cfg, log=lines.append, progress=False)
    assert trainer.resume("auto")
    assert trainer.step == 2
    assert any("last.pt is unusable: sha256 mismatch" in line for line in lines)
    assert any("step_0000004.pt is unusable" in line for line in lines)
    assert any("using step_0000002.pt (step 2)" in line for line in lines)
    assert all("\n" not in line for line in lines)

    # all broken -> one clear error
    (folder / "step_0000002.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        Trainer(cfg, log=quiet, progress=False).resume("auto")


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path, data_root):
    cfg = load_config(write_config(tmp_path, data_root), ["train.ema=0.5", "train.val_every=0"])
    Trainer(cfg, log=quiet, progress=False).fit(stop_at=2)
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["step"] == 2
    for key in ("model", "ema", "optimizer", "scheduler", "loss", "rng", "sampler", "config", "trainer"):
        assert key in state
    rng = state["rng"][0]
    assert set(rng) == {"python", "numpy", "torch", "cuda"}
    assert state["config"]["model"]["width"] == 4 and state["sampler"]["micro_batches"] == 2


# ------------------------------------------------------------- non-finite guard


def test_nan_batch_is_skipped_and_counted(tmp_path, data_root):
    cfg = load_config(write_config(tmp_path, data_root), ["train.val_every=0", "train.ckpt_every=0"])
    trainer = Trainer(cfg, log=quiet, progress=False)
    to_device = trainer._to_device

    def poisoned(batch):
        batch = to_device(batch)
        if trainer.step == 2:  # the third step gets a NaN pixel
            batch["input"][0, 0, 0, 0] = float("nan")
        return batch

    trainer._to_device = poisoned
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    result = trainer.fit()
    assert result.step == 6 and result.skipped_steps == 1
    records = [r for r in read_log(tmp_path / "run/log.jsonl") if "step" in r and "event" not in r]
    skipped = [r for r in records if r.get("skipped")]
    assert [(r["step"], r["reason"]) for r in skipped] == [(3, "batch holds NaN/inf")]
    assert all(torch.isfinite(v).all() for v in trainer.net.state_dict().values())
    assert not states_equal(before, trainer.net.state_dict())


def test_nonfinite_losses_in_a_row_stop_with_one_line(tmp_path, data_root):
    cfg = load_config(write_config(tmp_path, data_root),
                      ["train.val_every=0", "train.ckpt_every=0", "train.max_nonfinite=3", "train.iterations=20"])
    trainer = Trainer(cfg, log=quiet, progress=False)
    forward = trainer.loss.forward

    def exploding(pred, batch, step):
        total, values = forward(pred, batch, step)
        if step >= 1:  # every step after the first has a NaN loss
            total = total * float("nan")
        return total, values

    trainer.loss.forward = exploding
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    message = str(info.value)
    assert "3 non-finite steps in a row" in message and "non-finite loss" in message and "\n" not in message
    assert trainer.step == 4 and trainer.skipped_steps == 3
    assert all(torch.isfinite(v).all() for v in trainer.net.state_dict().values())


# ---------------------------------------------------------------- signals (real)


def _train_command(config: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "rawrestore", "train", "-c", str(config), "--no-progress", *extra]


def _wait_for_steps(log: Path, count: int, proc: subprocess.Popen, timeout: float = 90.0) -> int:
    """Poll log.jsonl until it lists `count` steps; -> the last step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [r["step"] for r in read_log(log) if "loss" in r]
        if len(steps) >= count:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {count} steps in {timeout} s")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigterm_finishes_step_writes_checkpoint_exits_zero(tmp_path, data_root):
    config = write_config(tmp_path, data_root)
    proc = subprocess.Popen(
        _train_command(config, "train.iterations=100000", "train.val_every=0", "train.ckpt_every=0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(),
    )
    _wait_for_steps(tmp_path / "run/log.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    state = ckpt.load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    logged = [r["step"] for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    assert state["step"] == logged[-1] >= 3  # the step in flight was finished and saved
    assert "stopped by SIGTERM" in stderr


def test_sigkill_then_resume_auto_loses_at_most_one_period(tmp_path, data_root):
    config = write_config(tmp_path, data_root)
    period = 3
    args = ["train.iterations=100000", "train.val_every=0", f"train.ckpt_every={period}"]
    proc = subprocess.Popen(_train_command(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=_env())
    _wait_for_steps(tmp_path / "run/log.jsonl", period + 1, proc)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere in the next steps or checkpoint writes
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = [r["step"] for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r][-1]

    resumed = subprocess.run(_train_command(config, *args, "--resume", "auto", "--stop-at", str(killed_at + 2)),
                             capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    line = next(line for line in resumed.stderr.splitlines() if line.startswith("resume:") and " at step " in line)
    resumed_from = int(line.rsplit(" ", 1)[1])
    assert resumed_from % period == 0
    assert 0 <= killed_at - resumed_from <= period
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))
    steps = [r["step"] for r in read_log(tmp_path / "run/log.jsonl") if "loss" in r]
    assert steps == list(range(1, killed_at + 3))  # the log was cut back to the checkpoint, then continued
    assert ckpt.load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == killed_at + 2


def test_existing_run_needs_resume(tmp_path, data_root):
    config = write_config(tmp_path, data_root)
    Trainer(load_config(config, ["train.val_every=0"]), log=quiet, progress=False).fit(stop_at=1)
    from rawrestore.cli import main

    assert main(["train", "-c", str(config), "--no-progress"]) == 2


def test_loss_curves_written(tmp_path, data_root):
    config = write_config(tmp_path, data_root)
    Trainer(load_config(config), log=quiet, progress=False).fit()
    png = tmp_path / "run/loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    val = [r for r in read_log(tmp_path / "run/log.jsonl") if "val" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert val[-1]["val"]["all"]["n"] == 3 and val[-1]["val"]["all"]["lpips"] is None
    assert math.isfinite(val[-1]["val"]["all"]["psnr"])
    assert (tmp_path / "run/checkpoints/best.pt").is_file()
    end = read_log(tmp_path / "run/log.jsonl")[-1]
    assert end["event"] == "end" and end["reason"] == "done"
    assert json.loads(json.dumps(end))  # plain JSON


def test_amp_auto_picks_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, tmp_path):
    """auto -> bf16 only with the CPU's AVX512-BF16 or AMX flags (read from /proc/cpuinfo, no private torch op)."""
    from rawrestore.train import optim

    cpu = torch.device("cpu")
    for explicit in ("off", "bf16", "fp16"):
        assert optim.resolve_amp(explicit, cpu) == explicit
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor : 1\n")
    assert optim.cpu_flags(cpuinfo) >= {"avx2", "avx512_bf16"}
    assert optim.cpu_flags(tmp_path / "absent") == set()
    monkeypatch.setattr(optim, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert optim.resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(optim, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert optim.resolve_amp("auto", cpu) == "off"  # emulated bf16 would be slower than float32


def test_bad_synthetic_crosstalk_names_the_key(tmp_path, data_root):
    config = write_config(tmp_path, data_root)
    with pytest.raises(ConfigError, match="data.synthetic_crosstalk"):
        Trainer(load_config(config, ["data.synthetic_noise=true", "data.synthetic_crosstalk=uniform(oops)"]),
                log=quiet, progress=False)


def test_synthetic_ratio_draws_the_noise_level(tmp_path, data_root):
    """data.synthetic_ratio draws a ratio per sample in [lo, hi]; the input's measured shot-noise slope follows it."""
    from rawrestore.data.dataset import build_datasets
    from rawrestore.physics.noise_level import estimate_noise_level

    config = write_config(tmp_path, data_root)
    base = ["data.synthetic_noise=true", "data.crop_size=128", "data.clip_aligned=false"]
    with pytest.raises(ConfigError, match="data.synthetic_ratio"):
        load_config(config, base + ["data.synthetic_ratio=[300,50]"])
    slopes = {}
    for low, high in ((50, 60), (300, 300), (50, 50)):
        trainer = Trainer(load_config(config, base + [f"data.synthetic_ratio=[{low},{high}]"]), log=quiet, progress=False)
        sample = build_datasets(trainer.cfg.data, "train", seed=3)[0]
        batch = {k: (v[None].repeat(2, *([1] * v.ndim)) if torch.is_tensor(v) else v) for k, v in sample.items()}
        trainer._synthesize(batch, step=1, micro=0)
        assert batch["ratio"].shape == (2,) and bool(((batch["ratio"] >= low) & (batch["ratio"] <= high)).all())
        slopes[(low, high)] = estimate_noise_level(batch["input"])[0]
    # same seed -> same noise parameters; the slope a = K * ratio / span scales with the ratio
    assert float((slopes[(300, 300)] / slopes[(50, 50)]).mean()) == pytest.approx(6.0, rel=0.15)
