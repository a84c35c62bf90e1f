"""`rawrestore train -c CFG [key=value ...] [--resume auto|PATH] [--stop-at STEP]` (also under torchrun)."""
from __future__ import annotations

import argparse

from rawrestore.config import load_config

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore train`."""
    parser.description = (
        "Train a restoration model from an experiment config. Checkpoints go to <output_dir>/checkpoints "
        "(last.pt, best.pt, step_*.pt), the per-step log to <output_dir>/log.jsonl. For several processes: "
        "torchrun --nproc_per_node=N -m rawrestore train -c CFG."
    )
    parser.add_argument("-c", "--config", required=True, help="experiment YAML (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.iterations=200 model.width=8")
    parser.add_argument("--resume", metavar="auto|PATH", default=None,
                        help="continue from PATH, or 'auto': the newest valid checkpoint in output_dir (start fresh if none)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after STEP steps with a checkpoint (split a run; schedules still span train.iterations)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")


def run(args: argparse.Namespace) -> int:
    """Build the Trainer, resume if asked, train; 0 also when stopped by SIGTERM/SIGINT (after checkpointing).

    The signal handlers go in first, so a SIGTERM while the data and model are still being built
    is answered with one line; the run-folder lock is taken before anything is written there.
    """
    from rawrestore.train import distributed
    from rawrestore.train.checkpoint import LAST, checkpoint_dir
    from rawrestore.train.signals import StopRequest
    from rawrestore.train.trainer import Trainer, TrainingError

    cfg = load_config(args.config, args.overrides)
    if args.stop_at is not None and args.stop_at < 1:
        raise TrainingError(f"--stop-at must be >= 1, got {args.stop_at}")
    stop = StopRequest()
    with stop.installed():
        info = distributed.init_distributed(cfg.device)
        trainer = None
        try:
            trainer = Trainer(cfg, info, progress=not args.no_progress, stop=stop)
            trainer.acquire_lock()
            if args.resume is None and (checkpoint_dir(cfg.output_dir) / LAST).is_file():
                raise TrainingError(
                    f"{cfg.output_dir} already holds a run ({checkpoint_dir(cfg.output_dir) / LAST}); pass --resume auto "
                    f"to continue it, or set output_dir=... (or delete the folder) to start over"
                )
            trainer.resume(args.resume)
            trainer.fit(stop_at=args.stop_at)
            distributed.barrier()  # leave together: rank 0 may still be writing loss curves
        finally:
            if trainer is not None:
                trainer.release_lock()
                trainer.release_process_group()
            del trainer
            distributed.shutdown()
    return 0
