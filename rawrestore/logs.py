"""The one logging handler: library modules log to `logging.getLogger("rawrestore...")`, the CLIs call `configure`.

Library code never prints and never configures logging; a program that imports rawrestore
decides where its lines go. `configure()` (called once by `rawrestore`'s main) sends INFO and
above of the "rawrestore" loggers to stderr as bare lines.
"""
from __future__ import annotations

import logging
import sys

__all__ = ["configure"]

_MARK = "_rawrestore_handler"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is at emit time (pytest and tqdm swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: int = logging.INFO) -> logging.Logger:
    """Attach the single stderr handler to the "rawrestore" logger (idempotent). -> that logger."""
    logger = logging.getLogger("rawrestore")
    if not any(getattr(handler, _MARK, False) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
