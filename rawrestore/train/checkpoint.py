"""Training checkpoints: atomic writes, sha256 sidecars, RNG snapshots, finding the latest valid one.

Layout under `<output_dir>/checkpoints/`:

    last.pt              newest state (every `ckpt_every` steps, at the end, on SIGTERM/SIGINT)
    best.pt              state at the best validation PSNR so far
    step_0001000.pt      periodic states, one per `ckpt_every` steps
    <name>.sha256        `sha256sum` format ("<hex>  <name>"), written after its checkpoint

A checkpoint is written to a temporary file in the same folder, fsynced, then `os.replace`d over
its name, so a reader never sees half a file; the sidecar follows the same way. A crash between
the two leaves a checksum that no longer matches: that checkpoint is reported as unusable and the
previous one is used. Files hold only tensors and plain Python values (RNG states included) so
they load with `torch.load(weights_only=True)`:

    {"format", "step", "model", "ema" | None, "optimizer", "discriminator_optimizer" | None (loss.gan),
     "scheduler", "scaler" | None, "loss" (LossStack state: learnable weights, loss.gan's discriminator),
     "rng" (one entry per rank), "sampler",
     "trainer" (counters, best metric), "config" (the resolved config as a dict), "world_size"}
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from isp.safeio import check_output
from rawrestore.errors import InputError
from rawrestore.memory import available_memory

__all__ = [
    "FORMAT", "CHECKPOINT_DIR", "LAST", "BEST", "CheckpointError", "periodic_name", "checkpoint_dir",
    "save_checkpoint", "verify_checkpoint", "load_checkpoint", "find_resume", "rng_state", "set_rng_state",
    "sha256_file", "inference_weights", "clean_temporaries", "check_expansion",
    "check_tensor_sizes",
]

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
_PERIODIC = re.compile(r"^step_(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20
# torch.save stores entries uncompressed: what a checkpoint expands to is about its size on disk
_MAX_EXPANSION = 1.25
_EXPANSION_SLACK = 1 << 20
_MAX_STATE_PER_MODEL = 5  # model + EMA + two Adam moments, and room to spare (the loss's networks count as model)
_STATE_SLACK = 16 << 20  # RNG states (a few kB each), the loss weights, the sampler


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt or does not fit; the message names the file."""


def periodic_name(step: int) -> str:
    """File name of the periodic checkpoint after `step` optimiser steps: 'step_0001000.pt'."""
    return f"step_{step:07d}.pt"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """<output_dir>/checkpoints."""
    return Path(output_dir) / CHECKPOINT_DIR


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temporary(folder: Path, data: bytes) -> Path:
    """Write bytes to a new fsynced temporary file in `folder`. -> its path; nothing is left behind if the write fails."""
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: dict[str, Any], paths: list[Path]) -> str:
    """Serialise `state` once and write it atomically to every path, each with its sha256 sidecar. -> hex digest.

    Both files of a path are written in full to temporaries before either is renamed, so a full
    disk or an unwritable folder leaves the existing checkpoints as they were; that is a
    CheckpointError naming the file and the reason.
    """
    if not paths:
        raise InputError("save_checkpoint needs at least one path")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    for path in paths:
        path = Path(path)
        temporaries: list[Path] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries.append(_write_temporary(path.parent, data))
            temporaries.append(_write_temporary(path.parent, f"{digest}  {path.name}\n".encode("ascii")))
            for target in (path, _sidecar(path)):  # only a regular file or a new path is replaced
                check_output(target, what="checkpoint")
            os.replace(temporaries[0], path)
            os.replace(temporaries[1], _sidecar(path))
            _fsync_dir(path.parent)
        except InputError as error:
            raise CheckpointError(f"{error}; the checkpoints already in {path.parent} are unchanged") from None
        except OSError as error:
            reason = error.strerror or str(error)
            raise CheckpointError(
                f"cannot write checkpoint {path}: {reason}; the checkpoints already in {path.parent} are unchanged "
                "(fix that, then continue with --resume auto)"
            ) from None
        finally:
            for temporary in temporaries:
                if temporary.exists():
                    temporary.unlink()
    return digest


def verify_checkpoint(path: str | os.PathLike) -> tuple[bool, str]:
    """Check a checkpoint against its sidecar. -> (usable, reason); a missing sidecar is usable, 'unverified'."""
    path = Path(path)
    if not path.is_file():
        return False, "no such file"
    if path.stat().st_size == 0:
        return False, "file is empty"
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return True, "unverified (no .sha256 file)"
    try:
        expected = sidecar.read_text(encoding="ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        return False, f"checksum file {sidecar.name} is unreadable"
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        return False, f"checksum file {sidecar.name} holds no sha256"
    actual = sha256_file(path)
    if actual != expected:
        return False, "sha256 mismatch (truncated or damaged)"
    return True, "sha256 ok"


def check_expansion(path: str | os.PathLike) -> int:
    """What loading a checkpoint would hold in memory, checked before loading it. -> bytes.

    A zip checkpoint's entries are sized from its directory: their total may exceed the file's
    size only by a little (torch.save does not compress), and must fit in the memory available.
    A deflate-compressed file that would expand many times over is refused unread.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return size  # not a zip (legacy torch format): stored as is, its size bounds what it holds
    if total > _MAX_EXPANSION * size + _EXPANSION_SLACK:
        raise CheckpointError(f"checkpoint {path} would expand from {size / 2**20:.1f} MiB on disk to {total / 2**20:.1f} MiB "
                              "in memory (compressed entries; rawrestore writes checkpoints uncompressed): refused unread")
    available = available_memory()
    if available is not None and total > available:
        raise CheckpointError(f"checkpoint {path} needs {total / 2**30:.2f} GiB of memory but {available / 2**30:.2f} GiB "
                              "is available; free memory or load it on a larger machine")
    return total


def _tensor_bytes(tree: Any, limit: int = 1_000_000) -> int:
    """Bytes of every tensor in a nested state (dicts, lists, tuples), walking at most `limit` values."""
    total, stack, seen = 0, [tree], 0
    while stack and seen < limit:
        value = stack.pop()
        seen += 1
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def check_tensor_sizes(path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose tensors are far larger than its networks' own (EMA, Adam moments and RNG allowed).

    The networks are the model and the loss state (learnt weights, a GAN discriminator with its own Adam moments).

    Read memory-mapped, so nothing is loaded whole; a legacy (non-zip) file is bounded by its size already.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not mmap-able (legacy format) or unreadable: load_checkpoint reports the latter
        return
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        return
    loss = state.get("loss")
    model = _tensor_bytes(state["model"]) + (_tensor_bytes(loss) if isinstance(loss, dict) else 0)
    total = _tensor_bytes(state)
    allowed = _MAX_STATE_PER_MODEL * model + _STATE_SLACK
    if total > allowed:
        raise CheckpointError(f"checkpoint {path} holds {total / 2**20:.1f} MiB of tensors for a model of {model / 2**20:.1f} MiB "
                              f"with its loss networks (at most {_MAX_STATE_PER_MODEL}x that + {_STATE_SLACK >> 20} MiB: weights, EMA, "
                              "optimizer moments, RNG states); refused before loading it whole")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True) after checking its sha256. -> the state dict.

    Raises CheckpointError naming the file when it is missing, fails its checksum or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file from <output_dir>/checkpoints/")
    if verify:
        ok, reason = verify_checkpoint(path)
        if not ok:
            raise CheckpointError(f"checkpoint {path} is unusable: {reason}; use another file in {path.parent}")
    check_expansion(path)
    check_tensor_sizes(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refused a pickled object (a class, a function call): say so, never retry unsafely
        lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise CheckpointError(f"checkpoint {path} holds pickled Python objects, not only tensors and plain values{detail}; "
                              "refused: rawrestore loads checkpoints weights-only and never runs code from them") from None
    except Exception as error:  # torch raises several types for truncated zips and foreign pickles
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {first[:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a rawrestore checkpoint (no 'model'/'step' entries)")
    if state.get("config") is not None:
        from rawrestore.config.bounds import check_tree

        try:
            check_tree(state["config"], "its config")
        except InputError as error:
            raise CheckpointError(f"checkpoint {path}: {error}") from None
    return state


def clean_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files left by a write that was killed. -> number removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for leftover in folder.glob(f"{_TEMP_PREFIX}*"):
        try:
            leftover.unlink()
            removed += 1
        except OSError:
            pass
    return removed


@dataclass(frozen=True)
class _Candidate:
    path: Path
    step: int
    rank: int  # tie-break at equal steps: last (0) before periodic (1) before best (2)


def _peek_step(path: Path) -> int | None:
    """The step stored in a checkpoint, reading only its small entries (mmap); None when unreadable."""
    try:
        check_expansion(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:  # unreadable files are reported when they are verified
        return None


def find_resume(output_dir: str | os.PathLike, report: Callable[[str], None] = print,
                map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest usable checkpoint under <output_dir>/checkpoints. -> (path, state) or None when there is none.

    Candidates are last.pt, the periodic step_*.pt and best.pt, newest step first; each one that
    fails its checksum or cannot be read is reported (one line) and the next is tried.
    """
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return None
    candidates: list[_Candidate] = []
    for path in folder.iterdir():
        match = _PERIODIC.match(path.name)
        if match:
            candidates.append(_Candidate(path, int(match.group(1)), 1))
        elif path.name in (LAST, BEST):
            step = _peek_step(path)
            # an unreadable last.pt still goes first so that its failure is reported
            candidates.append(_Candidate(path, step if step is not None else 1 << 62, 0 if path.name == LAST else 2))
    candidates.sort(key=lambda c: (-c.step, c.rank))
    rejected: list[str] = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate.path, map_location=map_location)
        except CheckpointError as error:
            rejected.append(candidate.path.name)
            report(f"resume: {error}")
            continue
        if rejected:
            report(f"resume: using {candidate.path.name} (step {int(state['step'])}) instead of {', '.join(rejected)}")
        return candidate.path, state
    if rejected:
        raise CheckpointError(f"no usable checkpoint in {folder} (all of {', '.join(rejected)} failed); start without --resume")
    return None


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values: python, numpy, torch CPU, every CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy_state["kind"], keys, int(numpy_state["pos"]), int(numpy_state["has_gauss"]),
                         float(numpy_state["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ------------------------------------------------------------------------ inference


def inference_weights(path: str | os.PathLike, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any], int, bool]:
    """Weights to run a checkpoint with. -> (model state_dict, config dict, step, used_ema).

    The EMA weights are used when the checkpoint has them (and `prefer_ema`), else the raw weights.
    """
    state = load_checkpoint(path)
    use_ema = prefer_ema and state.get("ema") is not None
    weights = state["ema"] if use_ema else state["model"]
    return weights, state.get("config") or {}, int(state["step"]), use_ema
