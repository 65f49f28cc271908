"""Directories: mkdir, rmdir, ENOTEMPTY and the errnos of using a file as a directory."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)


def test_mkdir_rmdir(fs: Path) -> None:
    os.mkdir(fs / "d", 0o750)
    st = os.stat(fs / "d")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750 & ~_umask()
    assert st.st_nlink == 2
    assert os.listdir(fs / "d") == []
    os.rmdir(fs / "d")
    assert not os.path.lexists(fs / "d")
    assert os.listdir(fs) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_mkdir_existing(fs: Path) -> None:
    os.mkdir(fs / "d")
    (fs / "f").write_bytes(b"")
    with raises_errno(errno.EEXIST):
        os.mkdir(fs / "d")
    with raises_errno(errno.EEXIST):
        os.mkdir(fs / "f")
    with raises_errno(errno.ENOENT):
        os.mkdir(fs / "missing" / "d")


def test_rmdir_not_empty(fs: Path) -> None:
    os.makedirs(fs / "d" / "sub")
    (fs / "e").mkdir()
    (fs / "e" / "f").write_bytes(b"x")
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(fs / "d")
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(fs / "e")
    os.unlink(fs / "e" / "f")
    os.rmdir(fs / "e")
    os.rmdir(fs / "d" / "sub")
    os.rmdir(fs / "d")
    assert os.listdir(fs) == []


def test_rmdir_unlink_wrong_type(fs: Path) -> None:
    os.mkdir(fs / "d")
    (fs / "f").write_bytes(b"x")
    with raises_errno(errno.ENOTDIR):
        os.rmdir(fs / "f")
    with raises_errno(errno.EISDIR):
        os.unlink(fs / "d")
    with raises_errno(errno.ENOENT):
        os.rmdir(fs / "missing")
    with raises_errno(errno.ENOENT):
        os.unlink(fs / "missing")
    with raises_errno(errno.EINVAL):
        os.rmdir(f"{fs}/d/.")


def test_nlink_counts_subdirectories(fs: Path) -> None:
    os.mkdir(fs / "d")
    for name in ("a", "b", "c"):
        os.mkdir(fs / "d" / name)
    (fs / "d" / "file").write_bytes(b"")
    assert os.stat(fs / "d").st_nlink == 5
    os.rmdir(fs / "d" / "b")
    assert os.stat(fs / "d").st_nlink == 4


def test_deep_tree(fs: Path) -> None:
    deep = fs.joinpath(*(f"level{i}" for i in range(30)))
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"bottom")
    assert (deep / "leaf").read_bytes() == b"bottom"
    found = [Path(dirpath) for dirpath, _, files in os.walk(fs) if "leaf" in files]
    assert found == [deep]


def test_dotdot_and_dot(fs: Path) -> None:
    os.mkdir(fs / "d")
    (fs / "f").write_bytes(b"x")
    assert os.stat(fs / "d" / "..").st_ino == os.stat(fs).st_ino
    assert os.stat(f"{fs}/d/.").st_ino == os.stat(fs / "d").st_ino
    assert (fs / "d" / ".." / "f").read_bytes() == b"x"


def test_mtime_changes_on_entry_change(fs: Path) -> None:
    os.mkdir(fs / "d")
    os.utime(fs / "d", ns=(1_000_000_000, 1_000_000_000))
    (fs / "d" / "f").write_bytes(b"")
    assert os.stat(fs / "d").st_mtime_ns > 1_000_000_000
    os.utime(fs / "d", ns=(1_000_000_000, 1_000_000_000))
    os.unlink(fs / "d" / "f")
    assert os.stat(fs / "d").st_mtime_ns > 1_000_000_000
