"""Shared fixtures: the 3-scene synthetic SID sets (Sony, Fuji) and the tiny experiment YAML the trainer tests run on."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY_TRAIN = {"iterations": 6, "batch_size": 2, "lr": 1.0e-3, "warmup_iters": 1, "val_every": 2, "ckpt_every": 2,
              "log_every": 1}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Three synthetic Sony scenes of 128x128 (one per split, three exposures each), generated once per session."""
    from rawrestore.data.synth import generate

    root = tmp_path_factory.mktemp("sid") / "synthetic"
    generate(root, "sony", scenes=3, seed=0, size=128, progress=False)
    return root


@pytest.fixture(scope="session")
def fuji_root(tmp_path_factory) -> Path:
    """Three synthetic Fuji (X-Trans) scenes of 96x96 (one per split, three exposures each), generated once per session."""
    from rawrestore.data.synth import generate

    root = tmp_path_factory.mktemp("sid_fuji") / "synthetic_fuji"
    generate(root, "fuji", scenes=3, seed=1, size=96, progress=False)
    return root


def tiny_yaml(folder: Path, data_root: Path, name: str = "tiny.yaml", output: str = "run", seed: int = 3,
              eval_keys: str = "tile: 0, overlap: 0", **train: object) -> Path:
    """A tiny experiment in `folder`/`name`: width-4 U-Net, 64-pixel crops, RAW-L1, on the CPU; `train` overrides TINY_TRAIN."""
    keys = {**TINY_TRAIN, **train}
    train_text = ", ".join(f"{key}: {value}" for key, value in keys.items())
    text = f"""
base:
  - {REPO}/configs/data/synthetic.yaml
  - {REPO}/configs/model/unet.yaml
  - {REPO}/configs/losses/raw_l1.yaml
data: {{root: {data_root}, crop_size: 64, num_workers: 0, cache_dir: {data_root}/.cache}}
model: {{width: 4}}
train: {{{train_text}}}
eval: {{{eval_keys}}}
output_dir: {folder}/{output}
device: cpu
seed: {seed}
"""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(data_root) -> Callable[..., Path]:
    """tiny_config(folder, **train_overrides) -> the path of a tiny experiment YAML on the shared synthetic set."""
    def make(folder: Path, **kwargs: object) -> Path:
        return tiny_yaml(folder, data_root, **kwargs)

    return make
