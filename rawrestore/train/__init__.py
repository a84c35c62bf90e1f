"""Training: the one `Trainer`, atomic checksummed checkpoints, torch.distributed helpers, `rawrestore train`."""
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
from rawrestore.train.trainer import FitResult, ModelEMA, StepBatchSampler, Trainer, TrainingError, lr_factor, write_loss_curves

__all__ = [
    "Trainer", "FitResult", "TrainingError", "ModelEMA", "StepBatchSampler", "lr_factor", "write_loss_curves",
    "CheckpointError", "LAST", "BEST", "periodic_name", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
    "find_resume", "inference_weights",
]
