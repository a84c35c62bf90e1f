"""The run-folder lock: one trainer per `output_dir`.

`output_dir/.lock` holds "pid host" of the trainer that owns the folder while it trains. It is
created with O_EXCL, so of two trainers started together exactly one gets it; the other stops
with one line (a lock of this very process, an earlier Trainer object, is simply taken). A lock whose process is gone (same host, pid no longer running) is stale: it is
replaced, with one line saying so. A lock from another host cannot be checked and is never
taken over (the line says how to remove it once that run is known to be dead).
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from rawrestore.train.runlog import TrainingError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(output_dir): ...` holds output_dir/.lock; raises TrainingError when a live trainer holds it."""

    def __init__(self, folder: str | os.PathLike, report=None):
        self.path = Path(folder) / LOCK_NAME
        self.report = report
        self.held = False

    def _owner(self) -> tuple[int, str] | None:
        """(pid, host) written in the lock file; None when it is unreadable or torn."""
        try:
            pid, host = self.path.read_text(encoding="utf-8").split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner == (os.getpid(), host):  # an earlier Trainer of this process that was not closed
                    self.path.unlink(missing_ok=True)
                    continue
                if owner is None or (owner[1] == host and not _alive(owner[0])):
                    if self.report is not None:
                        was = f"process {owner[0]}" if owner else "an unreadable lock"
                        self.report(f"train: {self.path} was left by {was}, which is no longer running; taking it over")
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                pid, owner_host = owner
                if owner_host != host:
                    raise TrainingError(
                        f"{self.path.parent} is in use by a trainer on host {owner_host} (pid {pid}); use another "
                        f"output_dir, or delete {self.path} once that run is known to be stopped"
                    ) from None
                raise TrainingError(
                    f"{self.path.parent} is in use by another trainer (pid {pid}); wait for it, stop it, "
                    "or set output_dir=... to a different folder"
                ) from None
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise TrainingError(f"{self.path}: disk full; free space and retry") from None
                raise TrainingError(f"{self.path}: cannot create the run lock ({error.strerror}); "
                                    "set output_dir to a folder that can be written") from None
            try:
                os.write(fd, f"{os.getpid()} {host}\n".encode())
            finally:
                os.close(fd)
            self.held = True
            return
        raise TrainingError(f"{self.path}: could not take the run lock; another trainer keeps starting there")

    def release(self) -> None:
        if self.held:
            self.held = False
            owner = self._owner()
            if owner is not None and owner[0] == os.getpid():
                try:
                    self.path.unlink()
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
