"""Writing files that belong to the user: new paths or regular files only, never an input, atomically.

Every writer in `isp` and `rawrestore` goes through `atomic_output`: the data is written to a
temporary file in the target's folder, flushed, then renamed over the target. Before the rename
(and before any work, through `check_output`) the target must be a new path or an existing
regular file that is not a symlink and not one of the command's own inputs; a device node, FIFO,
socket, folder or symlink there is refused with one line, and nothing on disk changes.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError

PathLike = str | os.PathLike


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output(path: PathLike, inputs: Iterable[PathLike] = (), what: str = "output") -> Path:
    """Refuse a target that is not a new path or a plain regular file, or that is one of `inputs`."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new path (its folder may still have to be made)
        info = None
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot be checked ({exc.strerror}); choose another path") from None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise InputError(f"{what} {path} is a symlink; refusing to write through it: name a new file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} {path} exists and is {_kind(info.st_mode)}; refusing to replace it: name a new file")
    for source in inputs:
        if info is not None and _same_file(path, Path(source)) or os.path.abspath(path) == os.path.abspath(source):
            raise InputError(f"{what} {path} is one of this command's inputs; refusing to overwrite it: name a new file")
    return path


def _permissions() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: PathLike, inputs: Iterable[PathLike] = (), what: str = "output",
                  suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (checked with `check_output`).

    The temporary file is removed on any failure; a full disk or a read-only folder becomes one
    `InputError` line naming the path.
    """
    inputs = list(inputs)
    path = check_output(path, inputs, what)
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {path}: {folder} is not a folder")
    if not folder.exists():
        raise InputError(f"{what} {path}: folder {folder} does not exist; create it first")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix if suffix is not None else path.suffix,
                                        dir=folder)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write in {folder} ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            os.chmod(tmp, _permissions())  # mkstemp makes 0600; outputs get the user's usual mode
            check_output(path, inputs, what)  # again: something may have appeared meanwhile
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InputError(f"{what} {path}: disk full while writing; free space and retry") from None
            raise InputError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: PathLike, data: bytes, inputs: Iterable[PathLike] = (), what: str = "output") -> Path:
    """Write `data` to `path` atomically under the rules of `atomic_output`."""
    with atomic_output(path, inputs, what) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)
