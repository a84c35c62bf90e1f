"""What a hostile or careless user tries: each case ends with exit code 2, one line, and nothing on disk changed.

Device nodes cannot be made without privileges, so a FIFO, a folder and a symlink to a file
outside the target folder stand in for `/dev/full`; the rule under test (only new paths or
regular files are written, never an input) is the same for all of them.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import time
import zipfile
from pathlib import Path

import pytest
import torch

import isp
from rawrestore.cli import main
from rawrestore.data.manifest import read_sid_list, write_manifest
from rawrestore.errors import InputError
from rawrestore.models import NAFNet, NoiseConditioned, UNet
from rawrestore.train import checkpoint as ckpt
from tests.test_reliability import (  # noqa: F401 (fixtures)
    LONG,
    SHORT,
    checkpoint,
    one_line_error,
    one_pair_root,
    train,
    write_config,
)

INPUT = "Sony/short/10001_00_0.1s.dng"  # a test-split short exposure of the synthetic set


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots: kind, size, mtime and (regular files) sha256; nothing is opened that could block.

    A folder's own size and mtime are left out: a temporary file that came and went changes them.
    """
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = os.lstat(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            folder = stat.S_ISDIR(info.st_mode)
            state[str(path)] = (stat.S_IFMT(info.st_mode), None if folder else info.st_size,
                                None if folder else info.st_mtime_ns, digest)
    return state


def occupied(kind: str, path: Path, outside: Path) -> Path:
    """Put a FIFO, a folder or a symlink to a file in another folder at `path`. -> path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "precious.txt").write_text("the user's file")
        path.symlink_to(outside / "precious.txt")
    return path


def infer(data_root: Path, checkpoint: Path, *args: str) -> int:
    return main(["infer", str(data_root / INPUT), "--checkpoint", str(checkpoint), *args])


# ------------------------------------------------------------------ data lost or replaced


@pytest.mark.parametrize("option", ["-o", "--dng"])
@pytest.mark.parametrize("kind,says", [("fifo", "exists and is a FIFO"), ("folder", "exists and is a folder"),
                                       ("symlink", "is a symlink")])
def test_infer_never_replaces_what_is_not_a_regular_file(option, kind, says, data_root, checkpoint, tmp_path, capfd):
    target = occupied(kind, tmp_path / "out" / ("x.png" if option == "-o" else "x.dng"), tmp_path / "elsewhere")
    args = ["-o", str(target)] if option == "-o" else ["-o", str(tmp_path / "out/x.png"), "--dng", str(target)]
    before = snapshot(tmp_path)
    line = one_line_error(capfd, infer(data_root, checkpoint, *args))
    assert f"{option} {target} {says}" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option", ["-o", "--dng"])
@pytest.mark.parametrize("which", ["input", "checkpoint", "config"])
def test_infer_never_overwrites_its_own_inputs(option, which, data_root, checkpoint, tmp_path, capfd):
    config = checkpoint.parents[2] / "tiny.yaml"  # the file the checkpoint was trained from
    target = {"input": data_root / INPUT, "checkpoint": checkpoint, "config": config}[which]
    args = ["-o", str(target)] if option == "-o" else ["-o", str(tmp_path / "x.png"), "--dng", str(target)]
    before = snapshot(data_root / "Sony", checkpoint.parents[2], tmp_path)
    line = one_line_error(capfd, infer(data_root, checkpoint, "-c", str(config), *args))
    assert f"{option} {target} is one of this command's inputs; refusing to overwrite it" in line
    assert snapshot(data_root / "Sony", checkpoint.parents[2], tmp_path) == before


def test_infer_png_and_dng_the_same_file(data_root, checkpoint, tmp_path, capfd):
    line = one_line_error(capfd, infer(data_root, checkpoint, "-o", str(tmp_path / "x.png"), "--dng", str(tmp_path / "x.png")))
    assert "is the same file as -o" in line
    assert list(tmp_path.iterdir()) == []


def test_infer_failed_dng_keeps_an_existing_png_and_makes_no_folder(data_root, checkpoint, tmp_path, capfd, monkeypatch):
    """Both outputs or neither, and a PNG that was there before (a regular file) is neither removed nor replaced."""
    old = tmp_path / "x.png"
    old.write_bytes(b"yesterday's result")

    def full_disk(path, *args, **kwargs):
        raise InputError(f"output {path}: disk full while writing; free space and retry")

    monkeypatch.setattr(isp, "write_dng", full_disk)
    before = snapshot(tmp_path)
    line = one_line_error(capfd, infer(data_root, checkpoint, "-o", str(old), "--dng", str(tmp_path / "new/sub/x.dng")))
    assert "disk full while writing" in line
    assert snapshot(tmp_path) == before  # no new/sub folders left, the old PNG untouched, no temporaries


def test_infer_output_modes_follow_the_umask(data_root, checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        assert infer(data_root, checkpoint, "-o", str(tmp_path / "x.png"), "--dng", str(tmp_path / "x.dng")) == 0
    finally:
        os.umask(old)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("x.png", "x.dng")] == [0o644, 0o644]


def sid_layout(root: Path) -> Path:
    """A folder laid out like the SID download: a real file where synth would write, notes, the user's lists."""
    (root / "Sony/long").mkdir(parents=True)
    (root / "Sony/long/00001_00_10s.dng").write_bytes(b"the user's own long exposure")
    (root / "Sony/long/00001_00_10s.ARW").write_bytes(b"a real ARW")
    (root / "notes.txt").write_text("notes")
    (root / "Sony_train_list.txt").write_text("./Sony/short/00001_00_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8\n")
    return root


def test_synth_force_never_touches_files_it_did_not_write(tmp_path, capfd):
    root = sid_layout(tmp_path / "SID")
    before = snapshot(tmp_path)
    line = one_line_error(capfd, main(["synth", "--out", str(root), "--force", "--scenes", "3", "--size", "48"]))
    assert f"--out {root} holds Sony/long/00001_00_10s.dng and 1 more that synth did not write" in line
    assert snapshot(tmp_path) == before


def test_synth_force_replaces_only_its_own_files(tmp_path, capfd):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--scenes", "3", "--size", "48", "--seed", "1"]) == 0
    (out / "Sony/long/user.ARW").write_bytes(b"the user's")
    (out / "README.txt").write_text("the user's")
    first = (out / "Sony/long/00001_00_10s.dng").read_bytes()
    capfd.readouterr()
    assert main(["synth", "--out", str(out), "--force", "--scenes", "3", "--size", "48", "--seed", "2"]) == 0
    assert (out / "Sony/long/user.ARW").read_bytes() == b"the user's" and (out / "README.txt").read_text() == "the user's"
    assert (out / "Sony/long/00001_00_10s.dng").read_bytes() != first  # its own file was replaced (seed 2)
    assert len(list((out / "Sony/short").iterdir())) == 9


def test_synth_failure_leaves_no_files_or_folders(tmp_path, capfd, monkeypatch):
    real = isp.write_dng
    calls = []

    def fails_on_the_fourth_file(path, *args, **kwargs):
        if ".synth-" not in str(path):  # the metadata probes in the scratch folder pass
            calls.append(path)
            if len(calls) == 4:
                raise InputError(f"output {path}: disk full while writing; free space and retry")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(isp, "write_dng", fails_on_the_fourth_file)
    before = snapshot(tmp_path)
    line = one_line_error(capfd, main(["synth", "--out", str(tmp_path / "new/data"), "--scenes", "3", "--size", "48"]),
                          alone=False)
    assert "disk full while writing" in line and len(calls) == 4
    assert snapshot(tmp_path) == before  # the three files written are gone, and new/data with them


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file", "csv_is_a_fifo", "csv_is_a_symlink"])
def test_manifest_out_errors(case, data_root, tmp_path, capfd):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file")
    out = {"out_is_a_file": blocker, "out_under_a_file": blocker / "m"}.get(case, tmp_path / "m")
    if case in ("csv_is_a_fifo", "csv_is_a_symlink"):
        occupied(case.split("_")[-1], out / "sid_sony_val.csv", tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    line = one_line_error(capfd, main(["manifest", "--root", str(data_root), "--camera", "sony", "--out", str(out),
                                       "--exists-only"]))
    expected = {"out_is_a_file": f"cannot create output folder {out}: {blocker} is not a folder",
                "out_under_a_file": f"cannot create output folder {out}: {blocker} is not a folder",
                "csv_is_a_fifo": f"manifest {out / 'sid_sony_val.csv'} exists and is a FIFO",
                "csv_is_a_symlink": f"manifest {out / 'sid_sony_val.csv'} is a symlink"}[case]
    assert expected in line
    assert snapshot(tmp_path) == before  # refused before the first CSV: none of the three is written


def test_checkpoint_never_replaces_a_fifo(tmp_path):
    last = occupied("fifo", tmp_path / "checkpoints" / ckpt.LAST, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {last} exists and is a FIFO"):
        ckpt.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, [last])
    assert snapshot(tmp_path) == before  # no temporaries left either


# ------------------------------------------------------------------ tiny inputs that ask for everything


def test_checkpoint_config_with_shared_references_is_refused(data_root, checkpoint, tmp_path, capfd):
    """A pickled config sharing one list 10^9 times (a few hundred bytes) is refused before anything walks it."""
    state = torch.load(checkpoint, weights_only=True)
    bomb: list = ["x"] * 10
    for _ in range(8):
        bomb = [bomb] * 10
    state["config"]["bomb"] = bomb
    hostile = tmp_path / "bomb.pt"
    torch.save(state, hostile)
    before = snapshot(tmp_path)
    started = time.perf_counter()
    line = one_line_error(capfd, infer(data_root, hostile, "-o", str(tmp_path / "x.png")))
    assert time.perf_counter() - started < 10
    assert f"checkpoint {hostile}: its config: expands to more than 20000 values" in line and len(line) < 300
    assert snapshot(tmp_path) == before


def test_deflated_checkpoint_is_refused_before_it_expands(data_root, checkpoint, tmp_path, capfd):
    state = torch.load(checkpoint, weights_only=True)
    state["padding"] = torch.zeros(4 << 20)  # 16 MiB of zeros: deflate makes it about 16 kB
    buffer = io.BytesIO()
    torch.save(state, buffer)
    hostile = tmp_path / "deflated.pt"
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(hostile, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    assert hostile.stat().st_size < (2 << 20)
    before = snapshot(tmp_path)
    line = one_line_error(capfd, infer(data_root, hostile, "-o", str(tmp_path / "x.png")))
    assert f"checkpoint {hostile} would expand from 1." in line and "MiB in memory (compressed entries" in line
    assert "refused unread" in line
    assert snapshot(tmp_path) == before


def test_checkpoint_far_larger_than_its_model_is_refused(data_root, checkpoint, tmp_path, capfd):
    state = torch.load(checkpoint, weights_only=True)
    state["padding"] = torch.zeros(5 << 20)  # 20 MiB beside a model of a few kB
    hostile = tmp_path / "padded.pt"
    torch.save(state, hostile)
    before = snapshot(tmp_path)
    line = one_line_error(capfd, infer(data_root, hostile, "-o", str(tmp_path / "x.png")))
    assert re.search(rf"checkpoint {re.escape(str(hostile))} holds 2\d\.\d MiB of tensors for a model of 0\.\d MiB", line)
    assert "refused before loading it whole" in line
    assert snapshot(tmp_path) == before
    del state["padding"]
    state["optimizer_copy"] = state["model"]  # a few model-sized extras (EMA, moments) stay within the bound
    torch.save(state, tmp_path / "fine.pt")
    ckpt.check_tensor_sizes(tmp_path / "fine.pt")


def test_synth_size_is_checked_against_memory_first(tmp_path, capfd):
    before = snapshot(tmp_path)
    started = time.perf_counter()
    line = one_line_error(capfd, main(["synth", "--out", str(tmp_path / "big"), "--size", "100000"]))
    assert time.perf_counter() - started < 5
    assert "--size 100000 needs about 3725.3 GiB of memory per scene" in line and "use --size" in line
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ tracebacks where one line was promised


@pytest.mark.parametrize("model", [
    UNet(4, 4, base=2), NAFNet(4, 4, width=4, enc_blocks=[1], middle_blocks=1), NoiseConditioned(UNet(5, 4, base=2), 4),
], ids=["unet", "nafnet", "conditioned"])
def test_models_raise_the_projects_error_type(model):
    with pytest.raises(InputError, match=r"expects \(B,4,H,W\) packed RAW, got shape \(1, 9, 8, 8\)"):
        model(torch.zeros(1, 9, 8, 8))


@pytest.mark.parametrize("content,expected", [
    ("seed: 1\n# caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 13)"),
    (bytes(range(256)), "a binary file, not a YAML config"),
    (("a: " + "[" * 3000 + "]" * 3000).encode(), "nested deeper than 32 levels"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n".encode() for a, b in zip("abcdefgh", "bcdefghi")),
     "expands to more than 20000 values"),
])
def test_train_on_a_hostile_config_file(content, expected, tmp_path, capfd):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    before = snapshot(tmp_path)
    started = time.perf_counter()
    line = one_line_error(capfd, train(config))
    assert time.perf_counter() - started < 10
    assert line.startswith(f"rawrestore: error: {config}:") and expected in line and len(line) < 300
    assert snapshot(tmp_path) == before


def test_ms_ssim_with_uncertainty_on_small_crops_stops_at_the_config(data_root, tmp_path, capfd):
    config = write_config(tmp_path, data_root)
    before = snapshot(tmp_path)
    line = one_line_error(capfd, train(config, "loss.ms_ssim.weight=0.1", "loss.weighting=uncertainty"))
    assert "config key 'data.crop_size' gives 64-pixel renders" in line and "'loss.ms_ssim' (weighting uncertainty)" in line
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ wrong answers without a word


def test_infer_non_finite_ratio_is_an_error(data_root, checkpoint, tmp_path, capfd):
    line = one_line_error(capfd, infer(data_root, checkpoint, "--ratio", "1e300", "-o", str(tmp_path / "x.png"),
                                       "--dng", str(tmp_path / "x.dng")))
    assert "exposure ratio 1e+300 makes the aligned input non-finite" in line
    assert list(tmp_path.iterdir()) == []


def test_infer_fully_clipped_result_is_an_error(data_root, checkpoint, tmp_path, capfd, monkeypatch):
    import rawrestore.infer

    monkeypatch.setattr(rawrestore.infer, "restore", lambda model, x, *args: torch.full_like(x, -0.5))
    line = one_line_error(capfd, infer(data_root, checkpoint, "--ratio", "100", "-o", str(tmp_path / "x.png")))
    assert "the restored image is entirely black (every pixel clipped) at exposure ratio 100" in line
    assert list(tmp_path.iterdir()) == []


def calibration_manifest(path: Path, data_root: Path, short: str) -> Path:
    records = read_sid_list(data_root / "Sony_train_list.txt", "train", "sony")[:1]
    write_manifest(records, path)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(records[0].short.removeprefix("./"), short)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("short,expected", [
    ("/etc/passwd", "path '/etc/passwd' is absolute"),
    ("../../../../etc/passwd", "path '../../../../etc/passwd' points outside the dataset root"),
])
def test_calibrate_crosstalk_keeps_manifest_paths_inside_the_root(short, expected, data_root, tmp_path, capfd):
    manifest = calibration_manifest(tmp_path / "m.csv", data_root, short)
    before = snapshot(tmp_path)
    line = one_line_error(capfd, main(["calibrate-crosstalk", "--manifest", str(manifest), "--root", str(data_root),
                                       "--out", str(tmp_path / "K.npy")]))
    assert f"{manifest}:2: {expected}" in line
    assert snapshot(tmp_path) == before


def test_calibrate_crosstalk_never_writes_through_a_symlink(data_root, tmp_path, capfd):
    manifest = calibration_manifest(tmp_path / "m.csv", data_root, SHORT)
    out = occupied("symlink", tmp_path / "K.npy", tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    line = one_line_error(capfd, main(["calibrate-crosstalk", "--manifest", str(manifest), "--root", str(data_root),
                                       "--out", str(out)]))
    assert f"--out {out} is a symlink; refusing to write through it" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["missing", "size"])
def test_synthetic_noise_still_checks_the_short_files(case, data_root, tmp_path, capfd):
    root = one_pair_root(tmp_path, data_root, short_size=96 if case == "size" else None)
    if case == "missing":
        (root / SHORT).unlink()
    before = snapshot(root)
    line = one_line_error(capfd, train(write_config(tmp_path, data_root), f"data.root={root}", "data.synthetic_noise=true",
                                       f"data.cache_dir={tmp_path}/cache"))
    assert {"missing": f"{root / SHORT}: file named in the train list is missing",
            "size": f"pair size mismatch: {root / SHORT} is 96x96 but {root / LONG} is 128x128"}[case] in line
    assert snapshot(root) == before and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ smaller


def test_infer_with_two_inputs_says_so(data_root, checkpoint, tmp_path, capfd):
    second = data_root / "Sony/short/10001_00_0.04s.dng"
    line = one_line_error(capfd, main(["infer", str(data_root / INPUT), str(second), "--checkpoint", str(checkpoint),
                                       "-o", str(tmp_path / "x.png")]))
    assert f"infer restores one file: INPUT is {data_root / INPUT}, and '{second}' is neither an option" in line
    assert list(tmp_path.iterdir()) == []


def test_synth_unwritable_out(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = snapshot(tmp_path)
    for out in (blocker, blocker / "data"):
        line = one_line_error(capfd, main(["synth", "--out", str(out), "--scenes", "3", "--size", "48"]))
        assert f"{blocker}" in line and ("is a file" in line or "is not a folder" in line)
    assert snapshot(tmp_path) == before
