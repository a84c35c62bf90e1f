"""Output folders a command creates, and removes again when it fails: no empty folders left behind."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

from rawrestore.errors import InputError


def check_parent(path: Path, option: str) -> None:
    """InputError when `path`'s folder cannot be made because a file lies where a folder is needed."""
    existing = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"{option} {path}: cannot create output folder {path.parent}: {existing} is not a folder; "
                         "choose another path")


def make_folders(folders: Iterable[Path], option: str) -> list[Path]:
    """Create `folders` (and their parents). -> the folders this call created, deepest first."""
    created: list[Path] = []
    for folder in folders:
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            remove_empty(created)
            raise InputError(f"{option}: cannot create output folder {folder}: {exc.strerror or exc}; "
                             "choose another path") from None
        created = missing + created
    return created


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove the given folders (deepest first) where they are empty; anything holding files stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def new_folders(folders: Iterable[Path], option: str) -> Iterator[list[Path]]:
    """Create the folders; if the block fails, remove the ones created here that are still empty."""
    created = make_folders(list(folders), option)
    try:
        yield created
    except BaseException:
        remove_empty(created)
        raise


__all__ = ["check_parent", "make_folders", "remove_empty", "new_folders"]
