"""Output folders a command creates, and removes again when it fails: no empty folders left behind."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from rawrestore.errors import InputError


def check_folder(folder: Path, option: str) -> None:
    """InputError when `folder` cannot be made because something that is not a folder lies on its way."""
    existing = next((f for f in (folder, *folder.parents) if os.path.lexists(f)), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"{option}: cannot create output folder {folder}: {existing} is not a folder; "
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


__all__ = ["check_folder", "make_folders", "remove_empty", "new_folders"]
