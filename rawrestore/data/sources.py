"""Several data sections in one run (`data.sources`): one index space over the sources' datasets.

`build_sources(cfg.data, split)` builds each source's dataset with `build_datasets` (any kind:
SID pairs, a clean folder) and joins them in a `SourceMix`: item i of source k is index
`offsets[k] + i`. A sample is exactly the one its own dataset gives (the source's camera, CFA,
crop size and layout); the mix only routes an index to its source. Which source a training
step draws from is decided by the sampler (`rawrestore.train.sampling.SourceSchedule`), never here.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from rawrestore.errors import InputError

__all__ = ["SourceMix", "build_sources"]


class SourceMix(Dataset):
    """The datasets of several sources as one index space; `names[k]` and `weights[k]` describe source k."""

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str], weights: Sequence[float]):
        if not datasets or not len(datasets) == len(names) == len(weights):
            raise InputError(f"SourceMix needs one name and weight per dataset, got {len(datasets)} datasets, "
                             f"{len(names)} names, {len(weights)} weights")
        self.datasets = list(datasets)
        self.names = list(names)
        self.weights = [float(w) for w in weights]
        self.sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, index: int) -> tuple[int, int]:
        """Mix index -> (source, index inside that source's dataset)."""
        if not 0 <= index < len(self):
            raise IndexError(f"source mix index {index} outside [0, {len(self)})")
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, local = self.locate(index)
        return self.datasets[source][local]

    def draw(self, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        """Sample `index` drawn from `rng` by its source's dataset (`draw(index, rng)`, or plain indexing)."""
        source, local = self.locate(index)
        dataset = self.datasets[source]
        draw = getattr(dataset, "draw", None)
        return draw(local, rng) if callable(draw) else dataset[local]

    @property
    def records(self) -> list[Any]:
        """Every source's pair records, in mix index order (names a pair a loader worker died on)."""
        return [record for dataset in self.datasets for record in getattr(dataset, "records", [None] * len(dataset))]

    def prepare(self, progress: bool = True) -> int:
        """Decode every source's files into its cache now (see SIDPairDataset.prepare). -> files decoded."""
        return sum(int(dataset.prepare(progress) or 0) for dataset in self.datasets)  # type: ignore[attr-defined]

    def parts(self) -> list[tuple[str, Dataset]]:
        """(name, dataset) of each source, in config order."""
        return list(zip(self.names, self.datasets))


def build_sources(cfg_data: Any, split: str, seed: int = 0, prepare: bool = True) -> SourceMix:
    """The `split` of every source of a DataConfig with `sources`, joined; an error names the source it came from."""
    from rawrestore.data.dataset import build_datasets

    sources, names = cfg_data.source_list(), cfg_data.source_names()
    datasets = []
    for index, (source, name) in enumerate(zip(sources, names)):
        try:
            datasets.append(build_datasets(source, split, seed=seed, prepare=prepare))
        except InputError as error:
            raise type(error)(f"data.sources[{index}] ({name}): {error}") from None
    return SourceMix(datasets, names, [source.weight for source in sources])
