"""SIGTERM/SIGINT as a request to stop: the trainer finishes its step, checkpoints and returns.

`rawrestore train` installs the handlers before it builds anything, so a signal that comes while
the data, model or loss are still being built is also answered (with one line) instead of
killing the process without a word.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["StopRequest"]

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopRequest:
    """Remembers the first SIGTERM/SIGINT while `installed()`; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return _NAMES.get(self.signum, "a signal") if self.signum is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Route SIGTERM/SIGINT here for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in _NAMES}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
