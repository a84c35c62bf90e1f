"""Data order and per-sample seeding: which item each micro-batch holds, and the generator each sample draws from.

Data order is a pure function of the step. Micro-batch b (of optimiser step b // accumulate)
on this process holds global positions `(b * world_size + rank) * batch_size + k`; position p
is item `perm_e[p mod n]` of epoch `e = p // n`, with `perm_e` a permutation seeded by
(seed, e). Each sample draws its crop and augmentation from its own `np.random.Generator`
seeded by (seed, step, index) and its position (an item drawn twice in one step gets two
crops); the generator is passed to the dataset's `draw(index, rng)`, through `Subset`
wrappers, so neither DataLoader workers, a resume nor a wrapper changes what a step sees.
No global RNG is reseeded per sample.

Several sources (`data.sources`, a `SourceMix`): every micro-batch of optimiser step s, on
every rank, comes from one source, drawn with the sources' weights from a uniform number that is
a function of (seed, s) alone (`SourceSchedule`), so batches never mix CFAs or crop sizes,
DDP ranks agree without talking, and a resume sees the same sources. Inside source k the
micro-batches it was given are numbered in order (its j-th micro-batch) and take positions in
k's own seeded permutations as above, so each source is still walked epoch by epoch; sample
seeds are mix_seed(seed, SALT_SAMPLE, step, index, position) with the mix index. A one-entry
list therefore sees exactly the batches of the same section given as `data` itself.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import math
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
    "mix_seed", "SALT_PERMUTATION", "SALT_SAMPLE", "SALT_SYNTHETIC", "SALT_RESEED", "SALT_SOURCE", "SampleKey",
    "StepBatchSampler", "SourceSchedule", "SourceBatchSampler", "SeededSamples",
    "LoadFailure", "collate", "worker_init", "worker_death_message", "seeded_item", "build_loader",
]

_MASK63 = (1 << 63) - 1
# Salts keep the streams drawn from one run seed apart (epoch order, sample crops, synthetic noise).
SALT_PERMUTATION = 0x5A3D
SALT_SAMPLE = 0x5A4E
SALT_SYNTHETIC = 0xD4
SALT_RESEED = 0x7E5E  # global RNGs after a resume with another number of processes
SALT_SOURCE = 0x50C3  # which source a step draws from (data.sources), and each source's epoch order


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

    def keys(self, local: int, step: int, sample_seed: int, offset: int = 0) -> list[SampleKey]:
        """This rank's share of this order's micro-batch `local`, indices shifted by `offset`, seeds for optimiser step `step`."""
        out = []
        for k in range(self.batch_size):
            position = (local * self.world_size + self.rank) * self.batch_size + k
            epoch, item = divmod(position, self.size)
            index = offset + self.permutation(epoch)[item]
            out.append(SampleKey(index, mix_seed(sample_seed, SALT_SAMPLE, step, index, position)))
        return out

    def batch(self, batch_index: int) -> list[SampleKey]:
        """The (index, sample seed) pairs of micro-batch `batch_index` on this rank."""
        return self.keys(batch_index, batch_index // self.accumulate, self.seed)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return _endless(self)


class SourceSchedule:
    """Which source each optimiser step draws from: source k with probability weights[k] / sum, a function of (seed, step).

    `source(step)` hashes (seed, step) to a uniform number in [0, 1) and looks it up in the
    cumulative weights: no state, so every rank and every resume agree. `steps_before(step, k)`
    counts the earlier steps of source k (cached as the schedule is walked).
    """

    def __init__(self, weights: Sequence[float], seed: int):
        if not weights or not all(float(w) > 0 and np.isfinite(float(w)) for w in weights):
            raise InputError(f"source weights must be finite numbers > 0, got {list(weights)}")
        total = math.fsum(float(w) for w in weights)
        self.bounds = [b / total for b in itertools.accumulate(float(w) for w in weights)][:-1]  # upper bound of 0..K-2
        self.seed = int(seed)
        self._sources = np.zeros(0, dtype=np.int16)  # source of steps 0 .. len-1, filled on demand
        self._tally = (0, np.zeros(len(weights), dtype=np.int64))  # (step, steps per source before it): walked forward

    def source(self, step: int) -> int:
        """Index of the source step `step` draws every micro-batch from."""
        if step < len(self._sources):
            return int(self._sources[step])
        uniform = mix_seed(self.seed, SALT_SOURCE, step) / float(1 << 63)
        return bisect.bisect_right(self.bounds, uniform)

    def sources(self, stop: int) -> np.ndarray:
        """(stop,) int16: the source of steps 0 .. stop-1."""
        have = len(self._sources)
        if stop > have:
            grown = max(stop, 2 * have, 1024)
            more = np.fromiter((self.source(step) for step in range(have, grown)), dtype=np.int16, count=grown - have)
            self._sources = np.concatenate([self._sources, more])
        return self._sources[:stop]

    def steps_before(self, step: int, source: int) -> int:
        """How many of steps 0 .. step-1 drew from `source`."""
        start, counts = self._tally
        if step < start:
            start, counts = 0, np.zeros_like(counts)
        counts = counts + np.bincount(self.sources(step)[start:], minlength=len(counts))
        self._tally = (step, counts)
        return int(counts[source])


class SourceBatchSampler(Sampler[list[SampleKey]]):
    """Endless micro-batches over a `SourceMix`: every micro-batch of step s from source `schedule.source(s)`.

    Source k's j-th micro-batch (j counts only the micro-batches k was given) holds positions
    (j * world_size + rank) * batch_size + i of k's own seeded epoch permutations, shifted into
    the mix's index space by `offsets[k]`; sample seeds as in StepBatchSampler. Starting at
    `start_batch` gives exactly the stream of a run that went through the earlier batches.
    """

    def __init__(self, sizes: Sequence[int], offsets: Sequence[int], weights: Sequence[float], batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0, accumulate: int = 1):
        if any(size < 1 for size in sizes):
            raise InputError("a training source is empty; check its root and train list")
        self.offsets, self.batch_size, self.seed, self.accumulate = list(offsets), batch_size, seed, accumulate
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.schedule = SourceSchedule(weights, seed)
        # each source's epoch order from its own seed (the first source's is the run's, so a one-source list walks
        # exactly the plain data section's stream); adding a source leaves the others' orders as they were
        self.orders = [StepBatchSampler(size, batch_size, seed if k == 0 else mix_seed(seed, SALT_SOURCE, k),
                                        rank=rank, world_size=world_size)
                       for k, size in enumerate(sizes)]

    def batch(self, batch_index: int) -> list[SampleKey]:
        """The (mix index, sample seed) pairs of micro-batch `batch_index` on this rank."""
        step, micro = divmod(batch_index, self.accumulate)
        source = self.schedule.source(step)
        order = self.orders[source]
        local = self.schedule.steps_before(step, source) * self.accumulate + micro
        return order.keys(local, step, self.seed, self.offsets[source])

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return _endless(self)


def _endless(sampler: StepBatchSampler | SourceBatchSampler) -> Iterator[list[SampleKey]]:
    """sampler.batch(start_batch), sampler.batch(start_batch + 1), ... without end."""
    batch_index = sampler.start_batch
    while True:
        yield sampler.batch(batch_index)
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
    from rawrestore.data.sources import SourceMix

    train = cfg.train
    sampler: Sampler[list[SampleKey]]
    if isinstance(dataset, SourceMix):
        sampler = SourceBatchSampler(dataset.sizes, dataset.offsets, dataset.weights, train.batch_size, cfg.seed,
                                     dist_info.rank, dist_info.world_size, start_batch=start_step * train.accumulate,
                                     accumulate=train.accumulate)
    else:
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
