"""The training step on the device: no host reads outside logging steps, fp16 skipped steps, explicit sample seeding."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import Subset

from rawrestore.config import load_config
from rawrestore.train import checkpoint as ckpt
from rawrestore.train.sampling import SeededSamples, StepBatchSampler, mix_seed
from rawrestore.train.trainer import Trainer
from tests.conftest import tiny_yaml

# Tensor methods that copy a value to the host (a device sync on a GPU).
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}

# Every stage of the stack: synthetic noise with gain jitter and crosstalk, RAW, mosaic and sRGB terms,
# learnable weighting, EMA, gradient clipping, two micro-batches.
FULL_STEP = ["data.synthetic_noise=true", "data.gain_jitter=0.5", "data.synthetic_crosstalk=uniform(0.02)",
             "loss.crosstalk.weight=0.1", "loss.ssim.weight=0.05", "loss.delta_e00.weight=0.02", "loss.weighting=uncertainty",
             "train.ema=0.9", "train.grad_clip=1.0", "train.accumulate=2", "train.val_every=0", "train.ckpt_every=0"]


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors, except of the storage of the batch's CFA pattern.

    The CFA is host metadata (the loader gives one (P,P) pattern per batch and the trainer
    keeps it on the host): isp reads it to plan packing and demosaicking, which is no device sync.
    """

    def __init__(self, host_storages: set[int]):
        super().__init__()
        self.host_storages = host_storages
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else None
        if func in HOST_READS and not (isinstance(tensor, torch.Tensor)
                                       and tensor.untyped_storage().data_ptr() in self.host_storages):
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def quiet(_: str) -> None:
    """Swallow the trainer's progress lines."""


# The same with the adversarial term after its warm-up (fixed weighting: loss.gan refuses a learnt one): the
# discriminator's forward in the loss, its step with spectral norm's power iteration, its optimiser.
GAN_STEP = [o for o in FULL_STEP if o != "loss.weighting=uncertainty"] + [
    "loss.gan.weight=0.1", "loss.gan.width=4", "loss.gan.relativistic=true", "loss.gan.spectral_norm=true",
    "loss.gan.warmup=1"]


@pytest.mark.parametrize("overrides, record_reads, extras", [
    (FULL_STEP, 2, set()),  # the numbers, then the learnt weights
    (GAN_STEP, 1, {"gan/d_loss", "gan/d_acc"}),  # fixed weights are host numbers
], ids=["full", "gan"])
def test_no_host_reads_in_a_step_except_to_log(tmp_path, data_root, overrides, record_reads, extras):
    cfg = load_config(tiny_yaml(tmp_path, data_root), overrides)
    trainer = Trainer(cfg, log=quiet, progress=False)
    batches = trainer._loader(0)
    trainer.model.train()
    trainer._train_step(batches)  # first step: lazy kernels and plans are built
    prepared = [next(batches) for _ in range(2)]  # loading is the DataLoader's work, not the step's
    assert all(batch["cfa"].shape == (2, 2) and batch["cfa"].device.type == "cpu" for batch in prepared)
    cfa_storages = {batch["cfa"].untyped_storage().data_ptr() for batch in prepared}
    with HostReads(cfa_storages) as reads:
        outcome = trainer._train_step(iter(prepared))
    assert sum(reads.calls.values()) == 0, dict(reads.calls)
    with HostReads(cfa_storages) as reads:
        record = outcome.record()  # a logging step: the numbers in one transfer, the learnt weights in another
    assert dict(reads.calls) == {"tolist": record_reads} and record["step"] == 2 and np.isfinite(record["loss"])
    assert set(record["terms"]) == {"raw_l1", "crosstalk", "ssim", "delta_e00"} | ({"gan"} if extras else set())
    assert extras <= set(record) and all(np.isfinite(record[key]) for key in extras)


def test_fp16_steps_the_scaler_skips_leave_ema_weights_and_counter(tmp_path, data_root):
    """A GradScaler that overflows (scale inf): no update, no EMA move or count, the in-a-row counter kept."""
    cfg = load_config(tiny_yaml(tmp_path, data_root), ["train.ema=0.9", "train.val_every=0", "train.ckpt_every=0"])
    trainer = Trainer(cfg, log=quiet, progress=False)
    batches = trainer._loader(0)
    trainer.model.train()
    trainer._train_step(batches)
    trainer.state.set(0, 2)  # two non-finite steps in a row before this one
    weights = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    averaged = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    updates, skipped = trainer.ema.updates, trainer.skipped_steps
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))  # every scaled gradient overflows
    record = trainer._train_step(batches).record()
    assert record["skipped"] and "fp16 overflow" in record["reason"]
    assert trainer.nonfinite_in_row == 2  # an overflow neither counts as non-finite nor resets the run
    assert trainer.skipped_steps == skipped + 1 and trainer.ema.updates == updates
    assert all(torch.equal(v, weights[k]) for k, v in trainer.net.state_dict().items())
    assert all(torch.equal(v, averaged[k]) for k, v in trainer.ema.module.state_dict().items())
    assert all(int(s["step"]) == 1 for s in trainer.optimizer.state.values())  # the fused step was not counted

    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    record = trainer._train_step(batches).record()
    assert "loss" in record and trainer.nonfinite_in_row == 0 and trainer.ema.updates == updates + 1
    assert not all(torch.equal(v, averaged[k]) for k, v in trainer.ema.module.state_dict().items())


def test_samples_draw_from_seed_step_index_also_through_a_subset(data_root):
    from rawrestore.config import DataConfig
    from rawrestore.data.dataset import build_datasets

    dataset = build_datasets(DataConfig(root=str(data_root), crop_size=32, cache_dir=str(data_root / ".cache")), "train",
                             seed=1)
    wrapped = Subset(dataset, [2, 0, 1])
    plain, through = SeededSamples(dataset), SeededSamples(wrapped)
    key = (2, mix_seed(1, 7, 2))
    first = plain[key]
    for _ in range(3):
        dataset[0]  # plain indexing moves the dataset's own counter; seeded items must not care
    assert torch.equal(plain[key]["target"], first["target"])
    assert torch.equal(through[(0, key[1])]["target"], first["target"])  # Subset position 0 is item 2
    crops = {tuple(plain[(2, seed)]["crop"].tolist()) + (plain[(2, seed)]["augment"],) for seed in range(12)}
    assert len(crops) > 4  # the seed, not the index alone, places the crop
    sampler = StepBatchSampler(3, 2, seed=1, accumulate=2)
    assert sampler.batch(0)[0].seed != sampler.batch(2)[0].seed or sampler.batch(0)[0].index != sampler.batch(2)[0].index


def test_resume_is_bit_exact_on_a_wrapped_dataset(tmp_path, data_root):
    """The training set in a Subset: 4 steps straight == 2 steps, resume, 2 steps."""
    config = tiny_yaml(tmp_path, data_root, iterations=4, val_every=0, ckpt_every=2)

    def trainer(folder: str) -> Trainer:
        made = Trainer(load_config(config, [f"output_dir={tmp_path}/{folder}"]), log=quiet, progress=False)
        made.train_set = Subset(made.train_set, [2, 0, 1])
        return made

    assert trainer("a").fit().step == 4
    assert trainer("b").fit(stop_at=2).step == 2
    second = trainer("b")
    assert second.resume("auto") and second.fit().step == 4
    a = ckpt.load_checkpoint(Path(tmp_path) / "a/checkpoints/last.pt")["model"]
    b = ckpt.load_checkpoint(Path(tmp_path) / "b/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_option_trains_and_repeats(tmp_path, data_root):
    """train.deterministic: deterministic kernels switched on; two runs give identical weights."""
    cfg = load_config(tiny_yaml(tmp_path, data_root), ["train.deterministic=true", "train.iterations=2", "train.val_every=0"])
    try:
        first = Trainer(cfg, log=quiet, progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        first.fit()
        second = Trainer(cfg, log=quiet, progress=False)
        second.fit()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(v, second.net.state_dict()[k]) for k, v in first.net.state_dict().items())


def test_gpu_benchmark_says_so_without_a_gpu():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/gpu.py would measure it")
    from tests.conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("gpu.py: no CUDA GPU on this machine")
