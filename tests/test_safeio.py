"""isp.safeio: outputs go to new paths or regular files only, never an input, atomically."""
import os
import stat

import numpy as np
import pytest

from isp.errors import InputError
from isp.png import write_png
from isp.safeio import atomic_output, check_output, write_bytes


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_new_path_and_regular_file_are_written(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _listing(tmp_path) == ["out.bin"]  # no temporary left behind


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644


def test_fifo_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        write_png(fifo, np.zeros((2, 2, 3), np.uint8))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _listing(tmp_path) == ["pipe.png"]


def test_device_node_is_refused():
    with pytest.raises(InputError, match="device node"):
        check_output("/dev/null")


def test_symlink_to_outside_file_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "link.png").symlink_to(victim)
    with pytest.raises(InputError, match="symlink"):
        write_png(folder / "link.png", np.zeros((2, 2), np.uint8))
    assert victim.read_bytes() == b"keep me"
    assert os.path.islink(folder / "link.png")
    assert _listing(folder) == ["link.png"]


def test_folder_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="folder"):
        write_bytes(tmp_path / "sub", b"x")
    assert (tmp_path / "sub").is_dir()


def test_input_is_refused(tmp_path):
    source = tmp_path / "photo.dng"
    source.write_bytes(b"raw data")
    with pytest.raises(InputError, match="inputs"):
        write_bytes(tmp_path / "." / "photo.dng", b"overwritten", inputs=[source])
    assert source.read_bytes() == b"raw data"
    hard = tmp_path / "hard.dng"
    os.link(source, hard)  # the same file under another name is the same input
    with pytest.raises(InputError, match="inputs"):
        write_bytes(hard, b"overwritten", inputs=[source])
    assert source.read_bytes() == b"raw data"


def test_failure_inside_removes_the_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["keep.bin"]


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_bytes(tmp_path / "nope" / "x.bin", b"x")
