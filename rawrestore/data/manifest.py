"""SID / ELD pair manifests: parse the official lists, write and read CSV manifests, check files.

A SID list line is `<short path> <long path> ISO<n> F<n>`, e.g.
`./Sony/short/00001_00_0.04s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8`; file names are
`SSSSS_BB_<exposure>s.<ext>` (scene, burst, exposure in seconds) and the first digit of the
scene is the split (0 train, 1 test, 2 val). ELD's `ELD_Sony_paired_129.txt` lists the 129
burst-00 Sony pairs of the test (93) and val (36) scenes as `<short name> <long name> <ratio>`.

Manifest CSV columns (`CSV_COLUMNS`): split, scene, burst, short, long, short_exposure_s,
long_exposure_s, ratio, iso, fnumber, camera, misaligned. `short`/`long` are POSIX paths
relative to the dataset root (`Sony/short/...`); `ratio = min(long / short, 300)` (training
rejects a row whose ratio exceeds data.ratio_cap rather than capping it silently);
`misaligned` marks Sony test scenes 10034, 10045, 10172, which papers leave out of scores.

Burst-00 Sony test subset (`sid_sony_test_burst00.csv`): 93 pairs from 50 scenes (the same
93 test pairs as ELD's list), and it INCLUDES 5 pairs of the misaligned scenes (10034 x2,
10045 x2, 10172 x1); 88 pairs remain once they are dropped.

Paths from a list are joined to the dataset root after lexical normalisation; an absolute
path or one whose `..` leads out of the root is rejected with DataError. Symbolic links
inside the root are followed on purpose (a root often links `Sony/` to another disk).

Regenerate the shipped manifests with `python -m rawrestore.data.manifest`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import posixpath
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

from isp.safeio import check_output
from rawrestore.errors import DataError, InputError
from rawrestore.folders import check_folder, new_folders
from rawrestore.physics.align import SID_RATIO_CAP, exposure_ratio

CAMERAS: dict[str, str] = {"sony": "Sony", "fuji": "Fuji"}  # manifest name -> SID folder / list prefix
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_BY_SCENE_DIGIT: dict[str, str] = {"0": "train", "1": "test", "2": "val"}
MISALIGNED_SONY_SCENES: frozenset[int] = frozenset({10034, 10045, 10172})
CSV_COLUMNS: tuple[str, ...] = (
    "split", "scene", "burst", "short", "long", "short_exposure_s", "long_exposure_s",
    "ratio", "iso", "fnumber", "camera", "misaligned",
)
ELD_LIST_NAME = "ELD_Sony_paired_129.txt"
# eval.subset: which pairs of a split are scored. `burst00` is the first short frame of each scene
# (both ratios), as SID's test_Sony.py globs `%05d_00*.ARW`; `aligned` drops the misaligned scenes.
SUBSETS: tuple[str, ...] = ("all", "aligned", "burst00", "burst00_aligned")
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "data_manifests"
SHIPPED_LISTS_DIR = SHIPPED_DIR / "lists"

_NAME = re.compile(r"^(?P<scene>\d{5})_(?P<burst>\d{2})_(?P<exposure>\d+(?:\.\d+)?)s\.(?P<ext>[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class PairRecord:
    """One short/long pair: exposures in seconds, ratio dimensionless, paths relative to the root or absolute."""

    split: str
    scene: int
    burst: int
    short: str
    long: str
    short_exposure_s: float
    long_exposure_s: float
    ratio: float
    iso: int
    fnumber: float
    camera: str
    misaligned: bool


def sid_list_name(camera: str, split: str) -> str:
    """File name of SID's list for a camera ('sony'|'fuji') and split, e.g. 'Sony_train_list.txt'."""
    return f"{CAMERAS[_camera_key(camera)]}_{split}_list.txt"


def parse_name(name: str, where: str) -> tuple[int, int, float]:
    """Scene, burst and exposure (s) from a SID file name `SSSSS_BB_<exposure>s.<ext>`."""
    match = _NAME.match(PurePosixPath(name).name)
    if not match:
        raise DataError(f"{where}: file name {name!r} is not SID's SSSSS_BB_<exposure>s.<ext>")
    return int(match["scene"]), int(match["burst"]), float(match["exposure"])


def parse_list_line(line: str, split: str, camera: str, where: str) -> PairRecord:
    """One PairRecord from a SID list line `<short> <long> ISO<n> F<n>`; DataError naming `where` if malformed."""
    camera = _camera_key(camera)
    fields = line.split()
    if len(fields) != 4:
        raise DataError(f"{where}: expected '<short> <long> ISO<n> F<n>', got {len(fields)} fields")
    short, long_, iso_text, f_text = fields
    scene, burst, short_s = parse_name(short, where)
    long_scene, _, long_s = parse_name(long_, where)
    if long_scene != scene:
        raise DataError(f"{where}: short scene {scene:05d} and long scene {long_scene:05d} differ")
    scene_split = SPLIT_BY_SCENE_DIGIT.get(f"{scene:05d}"[0])
    if scene_split != split:
        raise DataError(f"{where}: scene {scene:05d} belongs to split {scene_split!r} by its first digit, not {split!r}")
    if not re.fullmatch(r"ISO\d+", iso_text) or not re.fullmatch(r"F\d+(?:\.\d+)?", f_text):
        raise DataError(f"{where}: expected ISO<n> F<n> after the paths, got {iso_text!r} {f_text!r}")
    return PairRecord(
        split=split,
        scene=scene,
        burst=burst,
        short=_clean_relative(short),
        long=_clean_relative(long_),
        short_exposure_s=short_s,
        long_exposure_s=long_s,
        ratio=_ratio(short_s, long_s, where),
        iso=int(iso_text[3:]),
        fnumber=float(f_text[1:]),
        camera=camera,
        misaligned=camera == "sony" and scene in MISALIGNED_SONY_SCENES,
    )


def read_sid_list(path: str | os.PathLike, split: str, camera: str) -> list[PairRecord]:
    """All pairs of one SID list file, in file order; DataError naming file:line for a bad line."""
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    return [record for _, record in _numbered_records(path, split, camera)]


def _numbered_records(path: Path, split: str, camera: str) -> list[tuple[int, PairRecord]]:
    return [(number, parse_list_line(text, split, camera, f"{path}:{number}")) for number, text in _read_lines(path)]


def read_eld_list(path: str | os.PathLike, sid_records: Iterable[PairRecord]) -> list[PairRecord]:
    """ELD's paired list `<short> <long> <ratio>` as PairRecords; ISO and F-number come from the SID lists."""
    path = Path(path)
    by_short = {PurePosixPath(r.short).name: r for r in sid_records}
    records = []
    for number, text in _read_lines(path):
        where = f"{path}:{number}"
        fields = text.split()
        if len(fields) != 3:
            raise DataError(f"{where}: expected '<short> <long> <ratio>', got {len(fields)} fields")
        short, long_, ratio_text = fields
        sid = by_short.get(PurePosixPath(short).name)
        if sid is None or PurePosixPath(sid.long).name != PurePosixPath(long_).name:
            raise DataError(f"{where}: pair {short} {long_} is not in the SID lists; check the lists directory")
        try:
            listed_ratio = float(ratio_text)
        except ValueError:
            raise DataError(f"{where}: ratio {ratio_text!r} is not a number") from None
        if abs(listed_ratio - sid.ratio) > 1e-9 * sid.ratio:
            raise DataError(f"{where}: listed ratio {listed_ratio:g} differs from min(long/short, 300) = {sid.ratio:g}")
        records.append(sid)
    return records


def select_subset(records: Sequence[PairRecord], subset: str) -> list[PairRecord]:
    """The pairs of `records` in an eval subset (SUBSETS), in their order; DataError for an unknown name."""
    if subset not in SUBSETS:
        raise DataError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    keep_burst = subset.startswith("burst00")
    keep_aligned = subset.endswith("aligned")
    return [r for r in records if (not keep_burst or r.burst == 0) and not (keep_aligned and r.misaligned)]


def write_manifest(records: Sequence[PairRecord], csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                   inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write records as a manifest CSV (CSV_COLUMNS); with `root`, absolute paths are written relative to it.

    Written atomically through `isp.safeio` to a new path or a regular file that is none of `inputs`;
    the folder must exist (or be creatable).
    """
    from isp.safeio import write_bytes

    csv_path = Path(csv_path)
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create folder {csv_path.parent} for {csv_path.name}: {exc.strerror or exc}; "
                         "choose another --out") from None
    base = None if root is None else _root_path(root)
    handle = io.StringIO(newline="")
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        short, long_ = (_relative_to(p, base) for p in (record.short, record.long))
        writer.writerow([
            record.split, f"{record.scene:05d}", f"{record.burst:02d}", short, long_,
            _number(record.short_exposure_s), _number(record.long_exposure_s), _number(record.ratio),
            record.iso, _number(record.fnumber), record.camera, "true" if record.misaligned else "false",
        ])
    write_bytes(csv_path, handle.getvalue().encode("utf-8"), inputs=inputs, what="manifest")
    return csv_path


def load_manifest(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                  ratio_cap: float | None = None) -> list[PairRecord]:
    """Read a manifest CSV -> list[PairRecord]; with `root`, paths become absolute and must stay inside root.

    With `ratio_cap` (data.ratio_cap), a row whose `ratio` column exceeds it is a DataError naming
    the row: an explicit ratio is never silently capped (ratios computed from SID's file names are,
    at 300, as SID does).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} not found; build it with `rawrestore manifest`")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise DataError(f"manifest {csv_path}: header must be {','.join(CSV_COLUMNS)}; regenerate it with `rawrestore manifest`")
        rows = [(f"{csv_path}:{number}", row) for number, row in enumerate(reader, start=2) if row]
    records = []
    for where, row in rows:
        record = _row_to_record(row, where)
        if ratio_cap is not None and record.ratio > ratio_cap:
            raise DataError(f"{where}: ratio {record.ratio:g} exceeds data.ratio_cap {ratio_cap:g}; fix the row or raise "
                            "data.ratio_cap (ratios are capped only when computed from exposure times)")
        if root is not None:
            try:
                record = resolve_record(record, root)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
        records.append(record)
    return records


def resolve_record(record: PairRecord, root: str | os.PathLike) -> PairRecord:
    """The record with absolute short/long paths under `root`; DataError if a path leads outside it."""
    base = _root_path(root)
    return dataclasses.replace(
        record,
        short=str(resolve_inside(base, record.short)),
        long=str(resolve_inside(base, record.long)),
    )


def resolve_inside(root: str | os.PathLike, relative: str) -> Path:
    """root / relative after lexical normalisation; DataError for absolute paths or `..` escapes."""
    base = _root_path(root)
    if PurePosixPath(relative).is_absolute() or Path(relative).is_absolute() or re.match(r"^[A-Za-z]:", relative):
        raise DataError(f"path {relative!r} is absolute; list paths must be relative to the dataset root {base}")
    normal = posixpath.normpath(relative.replace("\\", "/"))
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise DataError(f"path {relative!r} points outside the dataset root {base}; fix the list file")
    return base.joinpath(*PurePosixPath(normal).parts)


def manifest_from_root(root: str | os.PathLike, camera: str,
                       lists_dir: str | os.PathLike | None = None) -> dict[str, list[PairRecord]]:
    """Pairs of each split of a SID-layout folder (`Sony_train_list.txt` beside `Sony/`), paths absolute under root."""
    camera = _camera_key(camera)
    base = _root_path(root)
    if not base.is_dir():
        raise DataError(f"dataset root {base} is not a folder")
    folder = base if lists_dir is None else Path(lists_dir).expanduser()
    out: dict[str, list[PairRecord]] = {}
    for split in SPLITS:
        list_path = folder / sid_list_name(camera, split)
        if not list_path.is_file():
            hint = "pass --lists DIR" if lists_dir is None else "check --lists"
            raise DataError(f"no {list_path.name} in {folder}; {hint} (the repository ships SID's lists in data_manifests/lists)")
        out[split] = resolve_sid_list(list_path, split, camera, base)
    return out


def resolve_sid_list(list_path: str | os.PathLike, split: str, camera: str, root: str | os.PathLike) -> list[PairRecord]:
    """Pairs of one SID list with absolute paths under `root`; DataError naming file:line for a bad or escaping line."""
    list_path = Path(list_path)
    resolved = []
    for number, record in _numbered_records(list_path, split, camera):
        try:
            resolved.append(resolve_record(record, root))
        except DataError as exc:
            raise DataError(f"{list_path}:{number}: {exc}") from None
    return resolved


def build_shipped_manifests(out_dir: str | os.PathLike | None = None,
                            lists_dir: str | os.PathLike | None = None) -> list[Path]:
    """(Re)write the committed manifests from SID's and ELD's lists. -> paths written, in a fixed order."""
    out = SHIPPED_DIR if out_dir is None else Path(out_dir)
    lists = SHIPPED_LISTS_DIR if lists_dir is None else Path(lists_dir)
    written = []
    all_sony: list[PairRecord] = []
    for camera in CAMERAS:
        for split in SPLITS:
            records = read_sid_list(lists / sid_list_name(camera, split), split, camera)
            written.append(write_manifest(records, out / f"sid_{camera}_{split}.csv"))
            if camera == "sony":
                all_sony.extend(records)
                if split == "test":
                    burst00 = [r for r in records if r.burst == 0]
                    written.append(write_manifest(burst00, out / "sid_sony_test_burst00.csv"))
    eld = read_eld_list(lists / ELD_LIST_NAME, all_sony)
    written.append(write_manifest(eld, out / "eld_sony_paired_129.csv"))
    return written


RawReader = Callable[[str], object]


@dataclass(frozen=True)
class FileProblem:
    """A file a manifest names that cannot be used: kind 'missing' or 'unreadable', with the reason."""

    path: str
    kind: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}" + (f": {self.reason}" if self.reason else "")


def check_raw_files(paths: Iterable[str | os.PathLike], reader: RawReader | None) -> list[FileProblem]:
    """Problems of the distinct files among `paths`, in first-seen order; never stops at the first.

    `reader` opens a file as RAW and raises InputError (or OSError) if it cannot; None checks
    only that the file exists, is non-empty and can be opened.
    """
    from tqdm import tqdm

    unique = list(dict.fromkeys(str(p) for p in paths))
    problems = []
    for path in tqdm(unique, desc="checking RAW files", unit="file", disable=None, file=sys.stderr):
        if not os.path.isfile(path):
            problems.append(FileProblem(path, "missing"))
            continue
        try:
            if reader is None:
                with open(path, "rb") as handle:
                    if not handle.read(1):
                        raise OSError("file is empty")
            else:
                reader(path)
        except (InputError, OSError) as exc:
            # RawReadError carries the path in its message; keep only the reason.
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            problems.append(FileProblem(path, "unreadable", " ".join(str(reason).split()) or type(exc).__name__))
    return problems


def default_raw_reader() -> RawReader | None:
    """isp.read_raw if the isp package provides it, else None (existence checks only)."""
    try:
        from isp import read_raw
    except ImportError:
        return None
    return read_raw


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore manifest`."""
    parser.description = "Build sid_<camera>_<split>.csv for a SID-layout folder and check every file it names."
    parser.add_argument("--root", required=True, help="dataset root holding Sony/ or Fuji/ (and SID's list files)")
    parser.add_argument("--camera", required=True, choices=sorted(CAMERAS), help="which SID subset")
    parser.add_argument("--lists", default=None, help="folder with SID's <Camera>_<split>_list.txt (default: --root)")
    parser.add_argument("--out", required=True, help="folder to write the CSV manifests to")
    parser.add_argument("--exists-only", action="store_true", help="check that files exist and open, without decoding them as RAW")


def run(args: argparse.Namespace) -> int:
    """Build the manifests, check every file; 0 if all files are good, 2 if any is missing or unreadable."""
    root = _root_path(args.root)
    splits = manifest_from_root(root, args.camera, args.lists)
    out_dir = Path(args.out)
    lists = Path(args.lists).expanduser() if args.lists is not None else root
    inputs = [lists / sid_list_name(args.camera, split) for split in SPLITS]
    targets = {split: out_dir / f"sid_{args.camera}_{split}.csv" for split in splits}
    check_folder(out_dir, "--out")
    for target in targets.values():  # all refused before any is written
        check_output(target, inputs, "manifest")
    with new_folders([out_dir], "--out"):
        for split, records in splits.items():
            path = write_manifest(records, targets[split], root=root, inputs=inputs)
            print(f"{args.camera} {split}: {len(records)} pairs -> {path}")
    reader = None if args.exists_only else default_raw_reader()
    if reader is None:
        print("note: checking that files exist and open only (no RAW decoding)")
    paths = [p for records in splits.values() for r in records for p in (r.short, r.long)]
    problems = check_raw_files(paths, reader)
    for problem in problems:
        print(problem)
    total = len(set(paths))
    missing = sum(1 for p in problems if p.kind == "missing")
    unreadable = len(problems) - missing
    pairs = sum(len(r) for r in splits.values())
    if problems:
        print(f"summary: {len(problems)} of {total} files bad ({missing} missing, {unreadable} unreadable) "
              f"in {pairs} pairs; manifests written to {out_dir} but not usable as they are")
        return 2
    print(f"summary: all {total} files of {pairs} pairs present and readable; manifests written to {out_dir}")
    return 0


def _row_to_record(row: list[str], where: str) -> PairRecord:
    if len(row) != len(CSV_COLUMNS):
        raise DataError(f"{where}: expected {len(CSV_COLUMNS)} columns, got {len(row)}")
    values = dict(zip(CSV_COLUMNS, row))
    column = ""
    try:
        column = "split"
        if values["split"] not in SPLITS:
            raise ValueError(values["split"])
        column = "camera"
        camera = _camera_key(values["camera"])
        column = "misaligned"
        if values["misaligned"] not in ("true", "false"):
            raise ValueError(values["misaligned"])
        parsed = {}
        for column, convert in (("scene", int), ("burst", int), ("short_exposure_s", float), ("long_exposure_s", float),
                                ("ratio", float), ("iso", int), ("fnumber", float)):
            parsed[column] = convert(values[column])
    except (ValueError, InputError):
        raise DataError(f"{where}: bad value {values.get(column)!r} in column {column!r}") from None
    for column in ("short_exposure_s", "long_exposure_s", "ratio"):
        if not (math.isfinite(parsed[column]) and parsed[column] > 0):
            raise DataError(f"{where}: column {column!r} must be a positive number, got {values[column]!r}")
    for column in ("short", "long"):
        if not values[column]:
            raise DataError(f"{where}: empty {column!r} path")
    return PairRecord(split=values["split"], short=values["short"], long=values["long"], camera=camera,
                      misaligned=values["misaligned"] == "true", **parsed)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"list file {path} not found")
    with path.open(encoding="utf-8") as handle:
        return [(n, line.strip()) for n, line in enumerate(handle, start=1) if line.strip()]


def _ratio(short_s: float, long_s: float, where: str) -> float:
    try:
        return exposure_ratio(short_s, long_s, cap=SID_RATIO_CAP)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def _camera_key(camera: str) -> str:
    key = str(camera).lower()
    if key not in CAMERAS:
        raise DataError(f"camera must be one of {sorted(CAMERAS)}, got {camera!r}")
    return key


def _clean_relative(path: str) -> str:
    return path[2:] if path.startswith("./") else path


def _root_path(root: str | os.PathLike) -> Path:
    return Path(root).expanduser().resolve()


def _relative_to(path: str, base: Path | None) -> str:
    if base is None or not Path(path).is_absolute():
        return path
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        raise DataError(f"path {path} is not under the dataset root {base}") from None


def _number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


if __name__ == "__main__":
    for written in build_shipped_manifests():
        print(written)
