"""Decode cache: each RAW is decoded once into a `.npy` mosaic plus a metadata JSON; later reads memory-map it.

Layout: `<cache_dir>/<key>.npy` (the visible mosaic, (H,W) uint16) and `<key>.json`
(`CameraMeta.to_dict()` plus what the entry was made from), where `key` hashes the file's
absolute path, size and modification time, so an edited or replaced RAW gets a new entry.

Concurrency: DataLoader workers may race on the same file. An entry is built under an
exclusive `flock` on `<key>.lock` (POSIX; elsewhere two workers may both decode, which is
still correct), re-checked after the lock is taken, and written atomically (temporary file +
`os.replace`, the `.npy` before the `.json`, so a present JSON means a complete entry). A
reader that mapped an entry keeps its data even if another process replaces the file.

Corruption: an entry whose JSON does not parse, names another source, or whose `.npy` has
the wrong shape, dtype or byte length is rebuilt from the RAW file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from isp.meta import CameraMeta
from rawrestore.errors import DataError, InputError

CACHE_FORMAT = 1
RawReader = Callable[[str], tuple[np.ndarray, CameraMeta]]

try:  # POSIX advisory locks; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]


def _default_reader(path: str) -> tuple[np.ndarray, CameraMeta]:
    import isp

    return isp.read_raw(path)  # looked up at call time, so tests can patch isp.read_raw / rawpy


def source_signature(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, size in bytes, mtime in ns) of a RAW file; DataError naming it if it is missing."""
    absolute = os.path.abspath(os.fspath(path))
    try:
        stat = os.stat(absolute)
    except FileNotFoundError:
        raise DataError(f"{absolute}: file not found; check the dataset root and the list/manifest that names it") from None
    except OSError as exc:
        raise DataError(f"{absolute}: cannot stat the file ({exc.strerror}); check its permissions") from None
    return absolute, int(stat.st_size), int(stat.st_mtime_ns)


def entry_key(signature: tuple[str, int, int]) -> str:
    """Cache key of a source signature: 24 hex digits of SHA-1 over path, size and mtime."""
    text = "\0".join(str(part) for part in signature)
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]


class DecodeCache:
    """Decoded RAW mosaics by path. cache_dir None: no cache, every `load` decodes the file.

    `load(path)` -> (mosaic (H,W) uint16, read-only memory map when cached; CameraMeta).
    `crop(path, top, left, height, width)` copies only that window out of the map.
    Counters: `decodes` (RAW files decoded by this process), `rebuilds` (corrupt entries replaced).
    """

    def __init__(self, cache_dir: str | os.PathLike | None, reader: RawReader | None = None, max_open: int = 512):
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.reader = reader or _default_reader
        self.max_open = max_open
        self.decodes = 0
        self.rebuilds = 0
        self._open: OrderedDict[str, tuple[np.ndarray, CameraMeta]] = OrderedDict()

    def __getstate__(self) -> dict:
        # DataLoader workers get their own maps; memory maps are not pickled.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    @property
    def enabled(self) -> bool:
        """True when decoded mosaics are kept on disk."""
        return self.cache_dir is not None

    def load(self, path: str | os.PathLike) -> tuple[np.ndarray, CameraMeta]:
        """Mosaic and metadata of a RAW file. -> ((H,W) uint16, CameraMeta); errors name the file."""
        signature = source_signature(path)
        if self.cache_dir is None:
            return self._decode(signature[0])
        key = entry_key(signature)
        hit = self._open.get(key)
        if hit is not None:
            self._open.move_to_end(key)
            return hit
        entry = self._read_entry(key, signature)
        if entry is None:
            entry = self._build(key, signature)
        self._open[key] = entry
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return entry

    def meta(self, path: str | os.PathLike) -> CameraMeta:
        """CameraMeta of a RAW file (decodes it into the cache on first use)."""
        return self.load(path)[1]

    def crop(self, path: str | os.PathLike, top: int, left: int, height: int, width: int) -> np.ndarray:
        """A window of the mosaic. -> (height, width) uint16 copy; DataError if it leaves the frame."""
        mosaic, _ = self.load(path)
        if top < 0 or left < 0 or top + height > mosaic.shape[0] or left + width > mosaic.shape[1]:
            raise DataError(
                f"{path}: crop {height}x{width} at ({top},{left}) leaves the {mosaic.shape[0]}x{mosaic.shape[1]} frame; "
                "use a smaller crop_size"
            )
        return np.array(mosaic[top:top + height, left:left + width])

    def warm(self, paths: Iterable[str | os.PathLike], progress: bool = True) -> int:
        """Decode every distinct file into the cache now (tqdm progress). -> number of files."""
        from tqdm import tqdm

        unique = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
        for path in tqdm(unique, desc="decode cache", unit="file", disable=None if progress else True):
            self.load(path)
        return len(unique)

    # ------------------------------------------------------------------ internals

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        folder = Path(self.cache_dir or ".")
        return folder / f"{key}.npy", folder / f"{key}.json", folder / f"{key}.lock"

    def _decode(self, path: str) -> tuple[np.ndarray, CameraMeta]:
        try:
            mosaic, meta = self.reader(path)
        except InputError:
            raise  # RawReadError and friends already name the file
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"{path}: could not be decoded ({type(exc).__name__}: {exc})") from None
        self.decodes += 1
        mosaic = np.asarray(mosaic)
        if mosaic.ndim != 2 or mosaic.dtype != np.uint16:
            raise DataError(f"{path}: decoder returned a {mosaic.dtype} {mosaic.shape} array, expected a 2-D uint16 mosaic")
        return mosaic, meta

    def _read_entry(self, key: str, signature: tuple[str, int, int]) -> tuple[np.ndarray, CameraMeta] | None:
        """A valid entry from disk, or None if it is missing or corrupt."""
        npy_path, json_path, _ = self._paths(key)
        try:
            info = json.loads(json_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        try:
            if info.get("format") != CACHE_FORMAT or list(info.get("source", [])) != list(signature):
                return None
            meta = CameraMeta.from_dict(info["meta"])
            mosaic = np.load(npy_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError, InputError):
            return None
        expected = (int(meta.height), int(meta.width))
        if (
            not isinstance(mosaic, np.memmap)
            or mosaic.dtype != np.uint16
            or mosaic.shape != expected
            or list(info.get("shape", [])) != list(expected)
            or mosaic.offset + mosaic.nbytes != os.path.getsize(npy_path)
        ):
            return None
        return mosaic, meta

    @contextlib.contextmanager
    def _locked(self, lock_path: Path) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _build(self, key: str, signature: tuple[str, int, int]) -> tuple[np.ndarray, CameraMeta]:
        npy_path, json_path, lock_path = self._paths(key)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            with self._locked(lock_path):
                entry = self._read_entry(key, signature)  # another worker may have built it meanwhile
                if entry is not None:
                    return entry
                if json_path.exists() or npy_path.exists():
                    self.rebuilds += 1
                mosaic, meta = self._decode(signature[0])
                self._atomic_write(npy_path, lambda handle: np.save(handle, np.ascontiguousarray(mosaic), allow_pickle=False))
                info = {"format": CACHE_FORMAT, "source": list(signature), "shape": list(mosaic.shape),
                        "dtype": "uint16", "meta": meta.to_dict()}
                payload = json.dumps(info, indent=1).encode("utf-8")
                self._atomic_write(json_path, lambda handle: handle.write(payload))
        except PermissionError as exc:
            raise DataError(f"cache folder {self.cache_dir} is not writable ({exc.strerror}); set data.cache_dir to a writable folder") from None
        except OSError as exc:
            raise DataError(f"cache folder {self.cache_dir}: cannot write the entry for {signature[0]} ({exc}); "
                            "free disk space or set data.cache_dir elsewhere") from None
        entry = self._read_entry(key, signature)
        if entry is None:
            raise DataError(f"cache entry for {signature[0]} in {self.cache_dir} is unreadable right after writing it; "
                            "check the disk or set data.cache_dir elsewhere")
        return entry

    def _atomic_write(self, target: Path, write: Callable) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


__all__ = ["CACHE_FORMAT", "DecodeCache", "entry_key", "source_signature"]
