"""Validation during training: the val split scored exactly as `rawrestore eval` scores it, and its log.

`validate(trainer)` scores the EMA weights (or the model) on the val split, sharded over ranks
and gathered, through `rawrestore.protocols` (the same prediction path and renderer as eval);
`validate_and_log` writes the record, the lines and TensorBoard scalars, and best.pt when the
selection PSNR improved. Global RNGs are left as they were, so when validation runs never
changes training.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from rawrestore.pretrained import build_lpips_or_none
from rawrestore.train import checkpoint as ckpt
from rawrestore.train import distributed as dist_utils
from rawrestore.train.runlog import JsonlLog, format_groups

if TYPE_CHECKING:
    from rawrestore.train.trainer import Trainer

__all__ = ["validate", "validate_and_log", "mean_over_sources"]


def validate_and_log(trainer: Trainer, log: JsonlLog, board: Any, bar: Any) -> None:
    """Validate, log the summary, write best.pt when the PSNR improved."""
    result = validate(trainer)
    if result is None:
        return
    summary = result["summary"]
    psnr = result["select_psnr"]
    record: dict[str, Any] = {"step": trainer.step, "val": summary}
    if "sources" in result:
        record.update(val_sources=result["sources"], val_select_psnr=psnr)
    log.write({**record, "val_images_per_rank": result["per_rank"], "ema": trainer.ema is not None})
    lines = [f"val @ {trainer.step}: {format_groups(summary)}"]
    lines += [f"val @ {trainer.step} {name}: {format_groups(part)}" for name, part in result.get("sources", {}).items()]
    for line in lines:
        if bar is not None:
            bar.write(line)
        else:
            trainer.info(line)
    if board is not None:
        for key in ("psnr", "ssim", "delta_e00", "lpips"):
            if summary["all"].get(key) is not None:
                board.add_scalar(f"val/{key}", summary["all"][key], trainer.step)
            for name, part in result.get("sources", {}).items():
                if part["all"].get(key) is not None:
                    board.add_scalar(f"val/{name}/{key}", part["all"][key], trainer.step)
    if psnr is not None and math.isfinite(psnr) and (trainer.best_psnr is None or psnr > trainer.best_psnr):
        trainer.best_psnr, trainer.best_step = float(psnr), trainer.step
        trainer.save([ckpt.BEST])


@torch.no_grad()
def validate(trainer: Trainer) -> dict[str, Any] | None:
    """Metrics on the val split (sharded over ranks, gathered). -> summary, select_psnr, per-rank counts; or None.

    Scores exactly as `rawrestore eval`'s internal protocol (`rawrestore.protocols`: same
    prediction path, float32, same renderer), so validation and evaluation cannot disagree.
    With data.sources: `summary` pools every source's images, `sources` holds one summary per
    source, and `select_psnr` (what best.pt follows) is the mean over sources of their PSNR;
    without, `select_psnr` is the summary's PSNR.
    """
    if trainer.val_set is None or len(trainer.val_set) == 0:
        return None
    from rawrestore.metrics import Evaluator, pooled
    from rawrestore.protocols import eval_renderer, predict, score_internal

    if trainer.val_lpips_note is None:
        trainer.val_lpips, trainer.val_lpips_note = build_lpips_or_none(trainer.cfg, trainer.device)
        trainer.info(f"validation: {trainer.val_lpips_note}")
    model = trainer.ema.module if trainer.ema is not None else trainer.net  # the weights that are saved and evaluated
    was_training = model.training
    model.eval()
    parts = trainer.val_set.parts() if hasattr(trainer.val_set, "parts") else [("", trainer.val_set)]
    evaluators = {name: Evaluator(lpips_net=trainer.val_lpips, quantize=trainer.cfg.eval.quantize_8bit) for name, _ in parts}
    renderer = eval_renderer()
    count = 0
    with _preserved_rngs():
        for name, dataset in parts:
            indices = range(trainer.dist.rank, len(dataset), trainer.dist.world_size)
            for index in indices:
                sample = dataset[index]
                pred = predict(model, sample, trainer.cfg.eval, trainer.cfg.data.packed, trainer.device)
                score_internal(evaluators[name], renderer, pred, sample, trainer.cfg.data.packed)
            count += len(indices)
    if was_training:
        model.train()
    counts = dist_utils.all_gather_objects(count)
    for evaluator in evaluators.values():
        evaluator.gather()
    if trainer.cfg.data.sources is None:
        summary = evaluators[""].summary()
        return {"summary": summary, "select_psnr": summary["all"]["psnr"], "per_rank": counts}
    by_source = {name: evaluator.summary() for name, evaluator in evaluators.items()}
    return {"summary": pooled(evaluators).summary(), "sources": by_source,
            "select_psnr": mean_over_sources(by_source), "per_rank": counts}



def mean_over_sources(by_source: dict[str, dict[str, Any]], metric: str = "psnr") -> float | None:
    """The best-checkpoint aggregate of data.sources: the mean over sources of their `all` group's metric (None if any lacks it)."""
    values = [summary["all"].get(metric) for summary in by_source.values()]
    if not values or any(value is None for value in values):
        return None
    return math.fsum(values) / len(values)


@contextlib.contextmanager
def _preserved_rngs() -> Iterator[None]:
    """Run validation without moving any global RNG (so when it runs never changes training)."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
