"""torch.distributed helpers: start-up from torchrun's environment, rank-0 gating, small reductions.

Without torchrun (no WORLD_SIZE in the environment) everything here is a single-process no-op,
so the trainer calls these helpers unconditionally. Under `torchrun --nproc_per_node=N` each
process joins a process group (NCCL on CUDA, gloo on the CPU); only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import gc
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from isp.pipeline import resolve_device
from rawrestore.errors import ConfigError

__all__ = [
    "DistInfo", "init_distributed", "shutdown", "is_distributed", "barrier", "any_flag", "all_gather_objects",
    "broadcast_object", "average_gradients", "max_tensor", "mean_tensor", "weights_digest",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank in [0, world_size), its device and the backend (None: single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.backend is not None and self.world_size > 1


def _env_int(name: str, default: int) -> int:
    """An integer from the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join torchrun's process group if there is one. device 'auto'|'cpu'|'cuda[:N]' -> DistInfo.

    Under torchrun the CUDA device is `cuda:LOCAL_RANK` (NCCL); on the CPU the backend is gloo.
    A process group that is already initialised is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device)
    if world_size <= 1:
        return DistInfo(0, 1, 0, resolved, None)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc_per_node <= the number of GPUs"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, resolved, dist.get_backend())


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group (no-op when there is none).

    Objects that hold the group (a DDP reducer) must be gone first: the collection below frees
    those only reachable through reference cycles, so none is destroyed after the group at exit.
    """
    global _host_group
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        _host_group = None  # destroyed with the default group below
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


_host_group: Any = None


def _host_flag_group() -> Any:
    """A gloo group over the same ranks for host flags (None: the default group is gloo already).

    Under NCCL a flag all-reduce would run on the GPU and its `.item()` would wait for the whole
    step's queued work; on a gloo group the flag stays on the host, so the per-step stop check
    costs a tiny CPU collective and no device sync. Created on first use (every rank reaches
    `any_flag` at the same point, as `new_group` requires).
    """
    global _host_group
    if dist.get_backend() == "gloo":
        return None
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def any_flag(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank: one tiny all-reduce on the host, no device sync."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_flag_group())
    return bool(value.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (obj itself in a single process)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not own (e.g. learnable loss weights)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(world)


def max_tensor(value: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks, on the device (no host read; `value` itself in a single process)."""
    if not is_distributed():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def mean_tensor(value: torch.Tensor) -> torch.Tensor:
    """Elementwise mean over ranks, on the device (`value` itself in a single process)."""
    if not is_distributed():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's state_dict tensors (names and bytes), to compare ranks."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
