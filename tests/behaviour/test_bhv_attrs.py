"""Attributes: chmod, chown, utimens (with UTIME_OMIT and on symlinks), ctime updates."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from backingfs.syscalls import utimens
from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)

T1 = 1_500_000_000_123_456_789
T2 = 1_600_000_000_987_654_321
T3 = 1_700_000_000_000_000_001


def utimens_path(path: Path, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat on the object itself (a symlink stays unfollowed), None = UTIME_OMIT."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        utimens(fd, atime_ns, mtime_ns)
    finally:
        os.close(fd)


@pytest.mark.tree({"f": b"data", "d/": None})
def test_chmod(fs: Path) -> None:
    for mode in (0o600, 0o777, 0o4755, 0o2750, 0o1777, 0o000):
        os.chmod(fs / "f", mode)
        assert stat.S_IMODE(os.stat(fs / "f").st_mode) == mode
        assert stat.S_ISREG(os.stat(fs / "f").st_mode)
    os.chmod(fs / "d", 0o1733)
    assert stat.S_IMODE(os.stat(fs / "d").st_mode) == 0o1733
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(fs / "f").st_mode) == 0o640


@pytest.mark.tree({"f": b"data"})
def test_chmod_changes_ctime_not_mtime(fs: Path) -> None:
    utimens_path(fs / "f", T1, T1)
    before = os.stat(fs / "f")
    os.chmod(fs / "f", 0o600)
    after = os.stat(fs / "f")
    assert after.st_mtime_ns == T1
    assert after.st_ctime_ns >= before.st_ctime_ns


@pytest.mark.tree({"f": b"data"})
def test_chown(fs: Path) -> None:
    os.chown(fs / "f", 1234, 5678)
    st = os.stat(fs / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(fs / "f", -1, 42)
    st = os.stat(fs / "f")
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.chown(fs / "f", 0, 0)
    assert (os.stat(fs / "f").st_uid, os.stat(fs / "f").st_gid) == (0, 0)


@pytest.mark.tree({"f": b"data"})
def test_chown_clears_setuid(fs: Path) -> None:
    os.chmod(fs / "f", 0o6755)
    os.chown(fs / "f", 1234, 1234)
    # chown of an executable clears set-user-ID and set-group-ID (even for root).
    assert stat.S_IMODE(os.stat(fs / "f").st_mode) == 0o755


def test_lchown_symlink(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    os.symlink("f", fs / "l")
    os.chown(fs / "l", 1111, 2222, follow_symlinks=False)
    assert (os.lstat(fs / "l").st_uid, os.lstat(fs / "l").st_gid) == (1111, 2222)
    assert (os.stat(fs / "f").st_uid, os.stat(fs / "f").st_gid) == (0, 0)


@pytest.mark.tree({"f": b"data"})
def test_utimens(fs: Path) -> None:
    os.utime(fs / "f", ns=(T1, T2))
    st = os.stat(fs / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (T1, T2)
    utimens_path(fs / "f", None, T3)      # UTIME_OMIT for atime
    st = os.stat(fs / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (T1, T3)
    utimens_path(fs / "f", T2, None)      # UTIME_OMIT for mtime
    st = os.stat(fs / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (T2, T3)
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        os.utime(fd, ns=(T3, T1))
        assert (os.fstat(fd).st_atime_ns, os.fstat(fd).st_mtime_ns) == (T3, T1)
    finally:
        os.close(fd)


@pytest.mark.tree({"f": b"data"})
def test_utime_now(fs: Path) -> None:
    os.utime(fs / "f", ns=(T1, T1))
    os.utime(fs / "f")                    # UTIME_NOW for both
    st = os.stat(fs / "f")
    assert st.st_mtime_ns > T3 and st.st_atime_ns > T3


def test_utimens_symlink_itself(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    os.utime(fs / "f", ns=(T1, T1))
    os.symlink("f", fs / "l")
    utimens_path(fs / "l", T2, T3)
    assert (os.lstat(fs / "l").st_atime_ns, os.lstat(fs / "l").st_mtime_ns) == (T2, T3)
    assert os.stat(fs / "f").st_mtime_ns == T1


def test_write_updates_mtime(fs: Path) -> None:
    (fs / "f").write_bytes(b"x")
    os.utime(fs / "f", ns=(T1, T1))
    with open(fs / "f", "ab") as f:
        f.write(b"more")
    st = os.stat(fs / "f")
    assert st.st_mtime_ns > T1
    assert st.st_size == 5


def test_truncate_updates_mtime(fs: Path) -> None:
    (fs / "f").write_bytes(b"xyz")
    os.utime(fs / "f", ns=(T1, T1))
    os.truncate(fs / "f", 1)
    assert os.stat(fs / "f").st_mtime_ns > T1


def test_stat_missing(fs: Path) -> None:
    with raises_errno(errno.ENOENT):
        os.stat(fs / "missing")
    with raises_errno(errno.ENOENT):
        os.chmod(fs / "missing", 0o644)
    with raises_errno(errno.ENOENT):
        os.utime(fs / "missing", ns=(T1, T1))


@pytest.mark.tree({"f": b"data", "d/": None})
def test_open_for_write_shows_the_ctime_of_what_it_opened(fs: Path,
                                                           behind: Path | None) -> None:
    """An overlay copies a lower file up when it is opened for write, and a lower
    directory when something in it changes. From then on it shows the copy's ctime (the
    copy is made then), as the kernel's overlayfs does, even if the kernel holds the
    lower object's attributes in its cache."""
    before = {name: os.stat(fs / name).st_ctime_ns for name in ("f", "d")}
    time.sleep(0.02)
    os.close(os.open(fs / "f", os.O_RDWR))
    os.close(os.open(fs / "d" / "new", os.O_WRONLY | os.O_CREAT, 0o644))
    os.unlink(fs / "d" / "new")
    for name in ("f", "d"):
        after = os.stat(fs / name).st_ctime_ns
        if behind is None:
            assert after == before[name] or name == "d"
        else:
            assert after == os.stat(behind / name).st_ctime_ns, name
