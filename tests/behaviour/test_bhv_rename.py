"""rename and renameat2: replacement rules, their errnos, RENAME_NOREPLACE, RENAME_EXCHANGE."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from backingfs.syscalls import AT_FDCWD, RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)


def rename2(old: Path, new: Path, flags: int) -> None:
    renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)


@pytest.mark.tree({"a": b"content a", "b": b"content b"})
def test_rename_file_over_file(fs: Path) -> None:
    ino_a = os.stat(fs / "a").st_ino
    os.rename(fs / "a", fs / "b")
    assert not os.path.lexists(fs / "a")
    assert (fs / "b").read_bytes() == b"content a"
    assert os.stat(fs / "b").st_ino == ino_a
    assert sorted(os.listdir(fs)) == ["b"]


def test_rename_over_open_file(fs: Path) -> None:
    # Created here, not pre-existing: a read-only fd on an overlay lower file is the lower
    # file itself, which the rename leaves linked (kernel overlayfs reports nlink 1).
    (fs / "a").write_bytes(b"content a")
    (fs / "b").write_bytes(b"content b")
    fd_b = os.open(fs / "b", os.O_RDONLY)
    try:
        os.rename(fs / "a", fs / "b")
        # The replaced file lives on for its open fd.
        assert os.fstat(fd_b).st_nlink == 0
        assert os.pread(fd_b, 100, 0) == b"content b"
    finally:
        os.close(fd_b)
    assert (fs / "b").read_bytes() == b"content a"


@pytest.mark.tree({"d/": None, "d/f": b"x"})
def test_rename_keeps_inode_and_moves_between_dirs(fs: Path) -> None:
    os.mkdir(fs / "e")
    ino = os.stat(fs / "d" / "f").st_ino
    os.rename(fs / "d" / "f", fs / "e" / "g")
    assert os.stat(fs / "e" / "g").st_ino == ino
    assert (fs / "e" / "g").read_bytes() == b"x"
    assert os.listdir(fs / "d") == []
    dir_ino = os.stat(fs / "e").st_ino
    os.rename(fs / "e", fs / "d" / "e2")
    assert os.stat(fs / "d" / "e2").st_ino == dir_ino
    assert os.stat(fs / "d" / "e2" / "..").st_ino == os.stat(fs / "d").st_ino
    assert (fs / "d" / "e2" / "g").read_bytes() == b"x"


# Directory renames use directories made by the test: renaming a pre-existing (overlay
# lower or merged) directory is EXDEV on overlayfs without redirect_dir, an overlay-only rule
# tested in tests/overlay.


def test_rename_dir_over_empty_dir(fs: Path) -> None:
    os.makedirs(fs / "src")
    (fs / "src" / "inside").write_bytes(b"i")
    os.mkdir(fs / "empty")
    os.rename(fs / "src", fs / "empty")
    assert sorted(os.listdir(fs)) == ["empty"]
    assert (fs / "empty" / "inside").read_bytes() == b"i"


def test_rename_dir_over_nonempty_dir(fs: Path) -> None:
    os.mkdir(fs / "src")
    os.mkdir(fs / "full")
    (fs / "full" / "f").write_bytes(b"f")
    with raises_errno(errno.ENOTEMPTY):
        os.rename(fs / "src", fs / "full")
    assert sorted(os.listdir(fs)) == ["full", "src"]
    assert (fs / "full" / "f").read_bytes() == b"f"


@pytest.mark.tree({"d/": None, "d/sub/": None, "f": b""})
def test_rename_type_mismatch(fs: Path) -> None:
    with raises_errno(errno.EISDIR):
        os.rename(fs / "f", fs / "d")
    with raises_errno(errno.ENOTDIR):
        os.rename(fs / "d", fs / "f")
    with raises_errno(errno.ENOENT):
        os.rename(fs / "missing", fs / "x")
    assert sorted(os.listdir(fs)) == ["d", "f"]


@pytest.mark.tree({"d/": None, "d/sub/": None})
def test_rename_dir_into_own_subdir(fs: Path) -> None:
    with raises_errno(errno.EINVAL):
        os.rename(fs / "d", fs / "d" / "sub" / "inner")
    with raises_errno(errno.EINVAL):
        os.rename(fs / "d", fs / "d" / "new")
    assert os.listdir(fs) == ["d"]


@pytest.mark.tree({"a": b"a", "b": b"b"})
def test_rename_hardlinks_of_same_inode_is_noop(fs: Path) -> None:
    os.link(fs / "a", fs / "a2")
    os.rename(fs / "a", fs / "a2")
    # POSIX: both names of the same inode stay.
    assert sorted(os.listdir(fs)) == ["a", "a2", "b"]
    assert os.stat(fs / "a").st_nlink == 2


@pytest.mark.tree({"a": b"a", "b": b"b"})
def test_rename_noreplace(fs: Path) -> None:
    with raises_errno(errno.EEXIST):
        rename2(fs / "a", fs / "b", RENAME_NOREPLACE)
    assert (fs / "a").read_bytes() == b"a"
    assert (fs / "b").read_bytes() == b"b"
    rename2(fs / "a", fs / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(fs)) == ["b", "c"]
    assert (fs / "c").read_bytes() == b"a"


@pytest.mark.tree({"a": b"file a", "b": b"file b"})
def test_rename_exchange(fs: Path) -> None:
    os.mkdir(fs / "d")
    (fs / "d" / "in").write_bytes(b"in d")
    ino_a, ino_b = os.stat(fs / "a").st_ino, os.stat(fs / "b").st_ino
    rename2(fs / "a", fs / "b", RENAME_EXCHANGE)
    assert (fs / "a").read_bytes() == b"file b"
    assert (fs / "b").read_bytes() == b"file a"
    assert (os.stat(fs / "a").st_ino, os.stat(fs / "b").st_ino) == (ino_b, ino_a)
    # A file and a directory swap too.
    rename2(fs / "a", fs / "d", RENAME_EXCHANGE)
    assert stat.S_ISDIR(os.stat(fs / "a").st_mode)
    assert (fs / "a" / "in").read_bytes() == b"in d"
    assert (fs / "d").read_bytes() == b"file b"
    with raises_errno(errno.ENOENT):
        rename2(fs / "b", fs / "missing", RENAME_EXCHANGE)
    with raises_errno(errno.EINVAL):
        rename2(fs / "a", fs / "b", RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert sorted(os.listdir(fs)) == ["a", "b", "d"]


def test_rename_exchange_dirs_in_different_parents(fs: Path) -> None:
    os.makedirs(fs / "d" / "sub")
    (fs / "d" / "sub" / "f").write_bytes(b"deep")
    os.mkdir(fs / "other")
    (fs / "other" / "g").write_bytes(b"g")
    rename2(fs / "d" / "sub", fs / "other", RENAME_EXCHANGE)
    assert (fs / "other" / "f").read_bytes() == b"deep"
    assert (fs / "d" / "sub" / "g").read_bytes() == b"g"
    assert os.stat(fs / "d" / "sub" / "..").st_ino == os.stat(fs / "d").st_ino
    assert os.stat(fs / "other" / "..").st_ino == os.stat(fs).st_ino


def test_rename_open_file_keeps_working(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"before ")
        os.rename(fs / "f", fs / "g")
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert (fs / "g").read_bytes() == b"before after"
