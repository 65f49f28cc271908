"""The per-entry savings of the listing path keep their meaning: inode objects made on
first use are still wired to the table, and the cheaper layer reads answer as before."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from pathlib import Path

import pytest

from backingfs.fsapi import ROOT_INO
from backingfs.inodes import Inode, InodeTable
from backingfs.locks import QuickLock
from overlay import whiteout as wo

PREFIX = b"trusted.overlay."


def make_table() -> InodeTable[Inode]:
    return InodeTable(Inode(ROOT_INO, "root"))


def make(key: Hashable) -> Callable[[int], Inode]:
    return lambda ino: Inode(ino, key)


def test_lazy_io_counts_on_the_table() -> None:
    table = make_table()
    inode = table.lookup("a", make("a"), preferred_ino=10)
    inode.io.begin_io()
    assert table.io.count == 1
    inode.io.end_io()
    assert table.io.count == 0
    assert inode.io is inode.io


def test_io_made_before_adoption_gets_the_table_parent() -> None:
    table = make_table()
    early = Inode(11, "b")
    io = early.io
    inode = table.lookup("b", lambda ino: early, preferred_ino=11)
    assert inode.io is io and io.parent is table.io


def test_lazy_lock_is_one_quicklock() -> None:
    inode = Inode(12, "c")
    assert isinstance(inode.lock, QuickLock)
    assert inode.lock is inode.lock


def _o_path(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)


def _can_set_trusted(tmp_path: Path) -> bool:
    try:
        os.setxattr(tmp_path, PREFIX + b"probe", b"1")
    except OSError:
        return False
    os.removexattr(tmp_path, PREFIX + b"probe")
    return True


@pytest.mark.parametrize("value, expect", [(None, (False, False)), (b"y", (True, False)),
                                           (b"x", (False, True))])
def test_dir_state_on_an_o_path_fd(tmp_path: Path, value: bytes | None,
                                   expect: tuple[bool, bool]) -> None:
    if value is not None:
        if not _can_set_trusted(tmp_path):
            pytest.skip("trusted.* xattrs need CAP_SYS_ADMIN")
        os.setxattr(tmp_path, PREFIX + b"opaque", value)
    fd = _o_path(tmp_path)
    try:
        assert wo.dir_state(fd, PREFIX) == expect
        assert wo.dir_state(fd, PREFIX, is_bottom=True) == expect
    finally:
        os.close(fd)


def test_bottom_dir_skips_only_the_aufs_opaque_marker(tmp_path: Path) -> None:
    (tmp_path / ".wh..wh..opq").touch()
    fd = _o_path(tmp_path)
    try:
        assert wo.dir_state(fd, PREFIX) == (True, False)
        assert wo.dir_state(fd, PREFIX, is_bottom=True) == (False, False)
    finally:
        os.close(fd)


def test_get_xattr_fd_reads_a_symlink_itself(tmp_path: Path) -> None:
    if not _can_set_trusted(tmp_path):
        pytest.skip("trusted.* xattrs need CAP_SYS_ADMIN")
    target = tmp_path / "target"
    target.touch()
    os.setxattr(target, PREFIX + b"origin", b"7")
    link = tmp_path / "link"
    link.symlink_to(target)
    fd = _o_path(link)
    try:
        assert wo.get_xattr_fd(fd, PREFIX + b"origin") is None
    finally:
        os.close(fd)
    fd = _o_path(target)
    try:
        assert wo.get_xattr_fd(fd, PREFIX + b"origin") == b"7"
    finally:
        os.close(fd)
