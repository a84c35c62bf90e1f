"""SID/ELD manifests: shipped counts and ratios, list parsing, path containment, the manifest CLI."""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest

import isp
from rawrestore.data import manifest
from rawrestore.data.manifest import (
    CSV_COLUMNS,
    PairRecord,
    build_shipped_manifests,
    load_manifest,
    manifest_from_root,
    parse_list_line,
    resolve_inside,
    write_manifest,
)
from rawrestore.errors import DataError, RawReadError

SHIPPED = manifest.SHIPPED_DIR
COUNTS = {
    ("sony", "train"): 1865, ("sony", "val"): 234, ("sony", "test"): 598,
    ("fuji", "train"): 1655, ("fuji", "val"): 218, ("fuji", "test"): 524,
}


@pytest.mark.parametrize(("camera", "split"), sorted(COUNTS))
def test_shipped_counts_and_columns(camera, split):
    records = load_manifest(SHIPPED / f"sid_{camera}_{split}.csv")
    assert len(records) == COUNTS[camera, split]
    assert all(r.split == split and r.camera == camera for r in records)
    assert {r.ratio for r in records} == {100.0, 250.0, 300.0}
    assert all(r.short.startswith(f"{manifest.CAMERAS[camera]}/short/") and r.long.startswith(f"{manifest.CAMERAS[camera]}/long/")
               for r in records)


def test_shipped_manifests_equal_fresh_build(tmp_path):
    written = build_shipped_manifests(out_dir=tmp_path)
    assert [p.name for p in written] == [
        "sid_sony_train.csv", "sid_sony_val.csv", "sid_sony_test.csv", "sid_sony_test_burst00.csv",
        "sid_fuji_train.csv", "sid_fuji_val.csv", "sid_fuji_test.csv", "eld_sony_paired_129.csv",
    ]
    for path in written:
        assert (SHIPPED / path.name).read_bytes() == path.read_bytes(), f"{path.name} is stale; run python -m rawrestore.data.manifest"
    for name in ("Sony_train_list.txt", "Fuji_test_list.txt", "ELD_Sony_paired_129.txt"):
        assert (manifest.SHIPPED_LISTS_DIR / name).is_file()


def test_misaligned_scenes_and_burst00_subset():
    test = load_manifest(SHIPPED / "sid_sony_test.csv")
    misaligned = [r for r in test if r.misaligned]
    assert len(misaligned) == 36
    assert {r.scene for r in misaligned} == {10034, 10045, 10172}
    for split in ("train", "val"):
        assert not any(r.misaligned for r in load_manifest(SHIPPED / f"sid_sony_{split}.csv"))
    assert not any(r.misaligned for r in load_manifest(SHIPPED / "sid_fuji_test.csv"))

    burst00 = load_manifest(SHIPPED / "sid_sony_test_burst00.csv")
    assert len(burst00) == 93 and all(r.burst == 0 for r in burst00)
    assert len({r.scene for r in burst00}) == 50
    assert sorted((r.scene, r.short_exposure_s) for r in burst00 if r.misaligned) == [
        (10034, 0.04), (10034, 0.1), (10045, 0.04), (10045, 0.1), (10172, 0.1)
    ]
    assert collections.Counter(r.ratio for r in burst00) == {100.0: 29, 250.0: 29, 300.0: 35}  # 0.1 s against a 30 s long is x300


def test_eld_paired_list_is_burst00_of_test_and_val():
    eld = load_manifest(SHIPPED / "eld_sony_paired_129.csv")
    assert len(eld) == 129
    assert collections.Counter(r.split for r in eld) == {"test": 93, "val": 36}
    burst00 = load_manifest(SHIPPED / "sid_sony_test_burst00.csv")
    val00 = [r for r in load_manifest(SHIPPED / "sid_sony_val.csv") if r.burst == 0]
    assert set(eld) == set(burst00) | set(val00)
    assert collections.Counter(r.ratio for r in eld) == {300.0: 49, 100.0: 40, 250.0: 40}


@pytest.mark.parametrize(
    ("short", "long", "ratio"),
    [("0.1", "10", 100.0), ("0.04", "10", 250.0), ("0.033", "10", 300.0), ("0.1", "30", 300.0), ("0.04", "30", 300.0)],
)
def test_parse_list_line_ratio(short, long, ratio):
    line = f"./Sony/short/00001_03_{short}s.ARW ./Sony/long/00001_00_{long}s.ARW ISO200 F7.1"
    record = parse_list_line(line, "train", "sony", "list:1")
    assert record == PairRecord(
        split="train", scene=1, burst=3, short=f"Sony/short/00001_03_{short}s.ARW", long=f"Sony/long/00001_00_{long}s.ARW",
        short_exposure_s=float(short), long_exposure_s=float(long), ratio=ratio, iso=200, fnumber=7.1, camera="sony",
        misaligned=False,
    )


def test_parse_list_line_errors():
    with pytest.raises(DataError, match="list:4: expected '<short> <long> ISO<n> F<n>', got 3 fields"):
        parse_list_line("./Sony/short/00001_00_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO200", "train", "sony", "list:4")
    with pytest.raises(DataError, match="belongs to split 'test'"):
        parse_list_line("./Sony/short/10003_00_0.1s.ARW ./Sony/long/10003_00_10s.ARW ISO200 F9", "train", "sony", "l")
    with pytest.raises(DataError, match="differ"):
        parse_list_line("./Sony/short/00001_00_0.1s.ARW ./Sony/long/00002_00_10s.ARW ISO200 F9", "train", "sony", "l")
    with pytest.raises(DataError, match="not SID's SSSSS_BB"):
        parse_list_line("./Sony/short/img.ARW ./Sony/long/00001_00_10s.ARW ISO200 F9", "train", "sony", "l")
    with pytest.raises(DataError, match="camera must be one of"):
        parse_list_line("./Sony/short/00001_00_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F9", "train", "canon", "l")


def test_csv_round_trip_and_header_check(tmp_path):
    records = load_manifest(SHIPPED / "sid_fuji_val.csv")[:5]
    path = write_manifest(records, tmp_path / "m.csv")
    assert load_manifest(path) == records
    assert path.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    (tmp_path / "bad.csv").write_text("split,scene\ntrain,1\n")
    with pytest.raises(DataError, match="header must be"):
        load_manifest(tmp_path / "bad.csv")
    lines = path.read_text().splitlines()
    (tmp_path / "badvalue.csv").write_text("\n".join([lines[0], lines[1].replace(",10,", ",ten,")]) + "\n")
    with pytest.raises(DataError, match=r"badvalue.csv:2: bad value 'ten' in column 'long_exposure_s'"):
        load_manifest(tmp_path / "badvalue.csv")


def test_path_escape_rejected(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert resolve_inside(root, "./Sony/short/../long/a.ARW") == root.resolve() / "Sony" / "long" / "a.ARW"
    for bad in ("../outside/00001_00_0.1s.ARW", "Sony/../../x.ARW", "/etc/passwd"):
        with pytest.raises(DataError, match="outside the dataset root|is absolute"):
            resolve_inside(root, bad)
    record = load_manifest(SHIPPED / "sid_sony_train.csv")[0]
    (tmp_path / "escape.csv").write_text(
        ",".join(CSV_COLUMNS) + "\n" + f"train,00001,00,../x/00001_00_0.1s.ARW,{record.long},0.1,10,100,200,8,sony,false\n"
    )
    assert load_manifest(tmp_path / "escape.csv")[0].short == "../x/00001_00_0.1s.ARW"  # without a root: as written
    with pytest.raises(DataError, match="outside the dataset root"):
        load_manifest(tmp_path / "escape.csv", root=root)


# ---------------------------------------------------------------- manifest_from_root and the CLI


def _fake_root(tmp_path: Path, escape: bool = False) -> Path:
    """A SID-layout Sony folder: 4 pairs over 3 splits; some files missing, one corrupt."""
    root = tmp_path / "SID"
    for folder in ("Sony/short", "Sony/long"):
        (root / folder).mkdir(parents=True)
    lists = {
        "train": ["./Sony/short/00001_00_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8",
                  "./Sony/short/00001_01_0.04s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8"],
        "val": ["./Sony/short/20005_00_0.033s.ARW ./Sony/long/20005_00_10s.ARW ISO200 F13"],
        "test": ["./Sony/short/10034_00_0.1s.ARW ./Sony/long/10034_00_30s.ARW ISO100 F4"],
    }
    if escape:
        lists["test"].append("./Sony/short/10003_00_0.1s.ARW ./Sony/../../secret/10003_00_10s.ARW ISO200 F9")
    for split, lines in lists.items():
        (root / f"Sony_{split}_list.txt").write_text("\n".join(lines) + "\n")
    for name in ("short/00001_00_0.1s.ARW", "short/00001_01_0.04s.ARW", "long/00001_00_10s.ARW", "short/20005_00_0.033s.ARW"):
        (root / "Sony" / name).write_bytes(b"RAW" * 10)
    (root / "Sony/long/20005_00_10s.ARW").write_bytes(b"BAD")  # present but corrupt
    return root  # missing: Sony/short/10034_00_0.1s.ARW, Sony/long/10034_00_30s.ARW


def _fake_reader(path: str) -> None:
    if Path(path).read_bytes().startswith(b"BAD"):
        raise RawReadError(path, "truncated or corrupt RAW data (LibRawIOError)")


def test_manifest_from_root_resolves_under_root(tmp_path):
    root = _fake_root(tmp_path)
    splits = manifest_from_root(root, "Sony")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}
    assert splits["train"][0].short == str(root.resolve() / "Sony/short/00001_00_0.1s.ARW")
    assert splits["val"][0].ratio == 300.0 and splits["test"][0].misaligned
    with pytest.raises(DataError, match="no Fuji_train_list.txt in .*pass --lists DIR"):
        manifest_from_root(root, "fuji")
    escaping = _fake_root(tmp_path / "e", escape=True)
    with pytest.raises(DataError, match="points outside the dataset root"):
        manifest_from_root(escaping, "sony")


def test_cli_lists_every_bad_file_and_exits_2(tmp_path, capsys, monkeypatch):
    from rawrestore.cli import main

    monkeypatch.setattr(manifest, "default_raw_reader", lambda: _fake_reader)
    root = _fake_root(tmp_path)
    out = tmp_path / "out"
    code = main(["manifest", "--root", str(root), "--camera", "sony", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 2
    base = root.resolve()
    assert f"missing: {base / 'Sony/short/10034_00_0.1s.ARW'}" in printed
    assert f"missing: {base / 'Sony/long/10034_00_30s.ARW'}" in printed
    assert f"unreadable: {base / 'Sony/long/20005_00_10s.ARW'}: truncated or corrupt RAW data (LibRawIOError)" in printed
    assert sum(line.startswith(("missing:", "unreadable:")) for line in printed) == 3
    assert printed[:3] == [f"sony {s}: {n} pairs -> {out / f'sid_sony_{s}.csv'}" for s, n in (("train", 2), ("val", 1), ("test", 1))]
    assert printed[-1].startswith("summary: 3 of 7 files bad (2 missing, 1 unreadable) in 4 pairs")
    written = load_manifest(out / "sid_sony_train.csv")
    assert [r.short for r in written] == ["Sony/short/00001_00_0.1s.ARW", "Sony/short/00001_01_0.04s.ARW"]
    assert load_manifest(out / "sid_sony_test.csv", root=root)[0].long == str(base / "Sony/long/10034_00_30s.ARW")


def test_cli_all_good_returns_0_and_exists_only(tmp_path, capsys, monkeypatch):
    root = _fake_root(tmp_path)
    for name in ("short/10034_00_0.1s.ARW", "long/10034_00_30s.ARW"):
        (root / "Sony" / name).write_bytes(b"RAW")
    args = argparse.Namespace(root=str(root), camera="sony", lists=None, out=str(tmp_path / "o"), exists_only=True)
    assert manifest.run(args) == 0  # the corrupt file opens, and exists-only does not decode
    assert capsys.readouterr().out.splitlines()[-1].startswith("summary: all 7 files of 4 pairs present and readable")
    monkeypatch.setattr(manifest, "default_raw_reader", lambda: _fake_reader)
    args.exists_only = False
    assert manifest.run(args) == 2


def test_cli_rejects_escaping_list_with_one_line_error(tmp_path, capsys):
    from rawrestore.cli import main

    root = _fake_root(tmp_path, escape=True)
    assert main(["manifest", "--root", str(root), "--camera", "sony", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rawrestore: error: {root / 'Sony_test_list.txt'}:2: path 'Sony/../../secret/10003_00_10s.ARW' "
                          "points outside the dataset root")
    assert "\n" not in err


def test_cli_real_reader_reports_junk_as_unreadable(tmp_path, capsys):
    assert manifest.default_raw_reader() is isp.read_raw  # rawpy and isp are dependencies: never skipped
    root = _fake_root(tmp_path)
    args = argparse.Namespace(root=str(root), camera="sony", lists=None, out=str(tmp_path / "o"), exists_only=False)
    assert manifest.run(args) == 2
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("unreadable:") for line in printed) == 5  # 4 junk files + the corrupt one
    assert sum(line.startswith("missing:") for line in printed) == 2
