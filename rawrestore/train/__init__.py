"""Training: the one `Trainer` and what it is made of.

    trainer.py      the Trainer: builds everything from a config, fit / resume / validate, checkpoints
    step.py         one optimiser step on the device (skips, counters, the log record's numbers)
    sampling.py     data order and per-sample seeding (seed, step, index); the DataLoader
    optim.py        AMP choice, optimiser, learning-rate schedules, EMA, determinism
    runlog.py       log.jsonl, loss-curve plots, progress lines
    runlock.py      one trainer per output_dir
    signals.py      SIGTERM/SIGINT as a request to stop after the step
    checkpoint.py   atomic checksummed checkpoints;  distributed.py  torch.distributed helpers;  cli.py  `rawrestore train`
"""
from rawrestore.train.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    find_resume,
    inference_weights,
    load_checkpoint,
    periodic_name,
    save_checkpoint,
    verify_checkpoint,
)
from rawrestore.train.optim import ModelEMA, lr_factor
from rawrestore.train.runlog import TrainingError, read_log, write_loss_curves
from rawrestore.train.sampling import StepBatchSampler
from rawrestore.train.trainer import FitResult, Trainer

__all__ = [
    "Trainer", "FitResult", "TrainingError", "ModelEMA", "StepBatchSampler", "lr_factor", "write_loss_curves", "read_log",
    "CheckpointError", "LAST", "BEST", "periodic_name", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
    "find_resume", "inference_weights",
]
