"""Data order and per-sample seeding: which item each micro-batch holds, and the generator each sample draws from.

Data order is a pure function of the step. Micro-batch b (of optimiser step b // accumulate)
on this process holds global positions `(b * world_size + rank) * batch_size + k`; position p
is item `perm_e[p mod n]` of epoch `e = p // n`, with `perm_e` a permutation seeded by
(seed, e). Each sample draws its crop and augmentation from its own `np.random.Generator`
seeded by (seed, step, index) and its position (an item drawn twice in one step gets two
crops); the generator is passed to the dataset's `draw(index, rng)`, through `Subset`
wrappers, so neither DataLoader workers, a resume nor a wrapper changes what a step sees.
No global RNG is reseeded per sample.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import signal
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate, get_worker_info

from rawrestore.errors import InputError

__all__ = [
    "mix_seed", "SALT_PERMUTATION", "SALT_SAMPLE", "SALT_SYNTHETIC", "SALT_RESEED", "SampleKey", "StepBatchSampler", "SeededSamples",
    "LoadFailure", "collate", "worker_init", "worker_death_message", "seeded_item", "build_loader",
]

_MASK63 = (1 << 63) - 1
# Salts keep the streams drawn from one run seed apart (epoch order, sample crops, synthetic noise).
SALT_PERMUTATION = 0x5A3D
SALT_SAMPLE = 0x5A4E
SALT_SYNTHETIC = 0xD4
SALT_RESEED = 0x7E5E  # global RNGs after a resume with another number of processes


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, salt, step, index, ...), stable across processes and Python runs."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


class SampleKey(NamedTuple):
    """One item of a micro-batch: the dataset index and the seed of the generator its random draws come from."""

    index: int
    seed: int


class StepBatchSampler(Sampler[list[SampleKey]]):
    """Endless, deterministic micro-batches: micro-batch b -> this rank's [SampleKey(index, seed)] * batch_size.

    DistributedSampler-like sharding: global position p = (b * world_size + rank) * batch_size + k
    belongs to epoch p // size and is item p % size of that epoch's seeded permutation; its
    sample seed is mix_seed(seed, SALT_SAMPLE, step, index, p) with step = b // accumulate.
    Starting at `start_batch` gives exactly the stream a run that went through the earlier
    batches would see.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, shuffle: bool = True, accumulate: int = 1):
        if size < 1:
            raise InputError("the training set is empty; check data.root and the train list")
        self.size, self.batch_size, self.seed, self.accumulate = size, batch_size, seed, accumulate
        self.rank, self.world_size, self.start_batch, self.shuffle = rank, world_size, start_batch, shuffle
        self._perms: OrderedDict[int, list[int]] = OrderedDict()

    def permutation(self, epoch: int) -> list[int]:
        """Dataset order of `epoch` (cached for the last few epochs)."""
        if epoch not in self._perms:
            if self.shuffle:
                generator = torch.Generator().manual_seed(mix_seed(self.seed, SALT_PERMUTATION, epoch))
                self._perms[epoch] = torch.randperm(self.size, generator=generator).tolist()
            else:
                self._perms[epoch] = list(range(self.size))
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def batch(self, batch_index: int) -> list[SampleKey]:
        """The (index, sample seed) pairs of micro-batch `batch_index` on this rank."""
        step = batch_index // self.accumulate
        out = []
        for k in range(self.batch_size):
            position = (batch_index * self.world_size + self.rank) * self.batch_size + k
            epoch, offset = divmod(position, self.size)
            index = self.permutation(epoch)[offset]
            out.append(SampleKey(index, mix_seed(self.seed, SALT_SAMPLE, step, index, position)))
        return out

    def __iter__(self) -> Iterator[list[SampleKey]]:
        batch_index = self.start_batch
        while True:
            yield self.batch(batch_index)
            batch_index += 1


@dataclass(frozen=True)
class LoadFailure:
    """A sample a DataLoader worker could not load: its one-line message crosses to the main process as data."""

    message: str


def collate(samples: list[Any]) -> Any:
    """default_collate, or the first LoadFailure among the samples; a CFA the whole batch shares becomes one (P,P).

    The CFA is host metadata (isp plans packing and demosaicking from it): one (P,P) pattern,
    checked here in the loader, spares every step a per-call check that the batch shares it.
    """
    failure = next((sample for sample in samples if isinstance(sample, LoadFailure)), None)
    if failure is not None:
        return failure
    batch = default_collate(samples)
    cfa = batch.get("cfa") if isinstance(batch, dict) else None
    if isinstance(cfa, torch.Tensor) and cfa.ndim == 3 and bool((cfa == cfa[:1]).all()):
        batch["cfa"] = cfa[0].clone()
    return batch


def seeded_item(dataset: Dataset, index: int, rng: np.random.Generator) -> Any:
    """`dataset[index]` with its random draws from `rng`: through Subset wrappers to a dataset's `draw(index, rng)`.

    A dataset without `draw` is indexed plainly (it draws nothing, or from its own state).
    """
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    draw = getattr(dataset, "draw", None)
    return draw(index, rng) if callable(draw) else dataset[index]


class SeededSamples(Dataset):
    """Wraps a dataset so item SampleKey(index, seed) is `dataset[index]` drawn from a generator seeded by `seed`.

    In a DataLoader worker an InputError becomes a `LoadFailure` (DataLoader would re-raise it
    with a traceback in its message), and `reading`, a shared int64 array of (pid, index) per
    worker, says which item each worker is loading (index -1 between items), so the pair a
    worker that died was reading can be named (`worker_death_message`).
    """

    def __init__(self, dataset: Dataset, reading: Any = None):
        self.dataset = dataset
        self.reading = reading

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        worker = get_worker_info()
        tracked = worker is not None and self.reading is not None
        if tracked:
            self.reading[2 * worker.id] = os.getpid()
            self.reading[2 * worker.id + 1] = index
        try:
            return seeded_item(self.dataset, index, np.random.default_rng(seed))
        except InputError as error:
            if worker is None:
                raise
            return LoadFailure(str(error))
        finally:
            if tracked:
                self.reading[2 * worker.id + 1] = -1


def worker_init(_: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process finishes its step and checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_death_message(error: BaseException, reading: Sequence[int] | None, records: Any) -> str | None:
    """torch's RuntimeError for a DataLoader worker that died -> one line naming the pair it was reading; else None."""
    text = str(error).strip()
    match = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", text)
    if not isinstance(error, RuntimeError) or match is None or reading is None:
        return None
    pids = {int(pid) for pid in re.findall(r"\d+", match.group(1))}
    reading = list(reading)
    indices = [reading[i + 1] for i in range(0, len(reading), 2) if reading[i] in pids and reading[i + 1] >= 0]
    names = [f"{records[i].short} / {records[i].long}" if records is not None else f"item {i}" for i in indices]
    where = f"while reading {'; '.join(names)}" if names else "between samples"
    return (f"{text.splitlines()[0].rstrip('. ')} {where}; rerun with data.num_workers=0 to see the error in this "
            "process, or lower data.num_workers if the machine ran out of memory")


def build_loader(dataset: Dataset, cfg: Any, dist_info: Any, start_step: int) -> tuple[Iterator[Any], Any]:
    """Endless training micro-batches from optimiser step `start_step` on. -> (iterator, shared `reading` array or None).

    `cfg` is the ExperimentConfig (seed, train.batch_size/accumulate, data.num_workers);
    `dist_info` the DistInfo (rank, world size, device).
    """
    train = cfg.train
    sampler = StepBatchSampler(len(dataset), train.batch_size, cfg.seed, dist_info.rank, dist_info.world_size,
                               start_batch=start_step * train.accumulate, accumulate=train.accumulate)
    workers = cfg.data.num_workers
    reading = multiprocessing.RawArray("q", [0, -1] * workers) if workers else None
    loader = DataLoader(
        SeededSamples(dataset, reading), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=dist_info.device.type == "cuda", worker_init_fn=worker_init if workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global torch RNG untouched
        prefetch_factor=2 if workers else None,
    )
    return iter(loader), reading
