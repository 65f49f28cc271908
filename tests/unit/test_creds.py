"""creds: owner and mode of new objects as the kernel computes them, chown_new on any kind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs.creds import (
    MounterCreds,
    caller_groups,
    check_access,
    chown_new,
    new_mode,
    new_owner,
)

SGID, SUID = stat.S_ISGID, stat.S_ISUID
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")


def _dir_stat(mode: int, gid: int = 500) -> os.stat_result:
    # st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size, st_atime, st_mtime, st_ctime
    return os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, 0, gid, 0, 0, 0, 0))


PLAIN = _dir_stat(0o755)
SETGID = _dir_stat(0o2775)


def test_mounter_creds_are_the_daemons() -> None:
    creds = MounterCreds()
    assert (creds.uid, creds.gid) == (os.geteuid(), os.getegid())
    assert creds.is_privileged == (os.geteuid() == 0)


def test_new_owner() -> None:
    assert new_owner(1000, 100, PLAIN) == (1000, 100)
    assert new_owner(1000, 100, SETGID) == (1000, 500)  # BSD group semantics


@pytest.mark.parametrize(
    ("mode", "parent", "is_dir", "in_group", "caller_gid", "expected"),
    [
        (0o777, PLAIN, False, False, 100, 0o755),  # umask only
        (0o777, PLAIN, True, False, 100, 0o755),
        (0o777, SETGID, True, False, 100, SGID | 0o755),  # dirs inherit S_ISGID
        (0o755, SETGID, True, True, 100, SGID | 0o755),
        (SGID | 0o775, SETGID, False, False, 100, 0o755),  # non-member loses S_ISGID
        (SGID | 0o775, SETGID, False, True, 100, SGID | 0o755),  # member keeps it
        (SGID | 0o775, SETGID, False, False, 500, SGID | 0o755),  # primary gid == dir gid
        (SGID | 0o765, SETGID, False, False, 100, SGID | 0o745),  # no group-exec: kept
        (SGID | 0o775, PLAIN, False, False, 100, SGID | 0o755),  # parent not setgid: kept
        (SUID | 0o755, SETGID, False, False, 100, SUID | 0o755),  # suid untouched
        (stat.S_IFREG | 0o666, PLAIN, False, False, 100, stat.S_IFREG | 0o644),  # type kept
    ],
)
def test_new_mode(
    mode: int, parent: os.stat_result, is_dir: bool, in_group: bool, caller_gid: int,
    expected: int,
) -> None:
    assert new_mode(mode, 0o022, parent, is_dir, caller_gid, in_group) == expected


def test_new_mode_strips_sgid_before_umask() -> None:
    """mode_strip_sgid looks at S_IXGRP as requested, before the umask removes it."""
    assert new_mode(SGID | 0o775, 0o077, SETGID, False, 100, False) == 0o700
    assert new_mode(SGID | 0o775, 0o077, SETGID, False, 100, True) == SGID | 0o700


def test_new_mode_umask_optional() -> None:
    assert new_mode(0o777, 0o022, PLAIN, False, 100, False, apply_umask=False) == 0o777
    assert new_mode(0o777, 0o022, SETGID, True, 100, False, apply_umask=False) == SGID | 0o777
    # Only permission bits of the umask count.
    assert new_mode(0o777, 0o7022, PLAIN, False, 100, False) == 0o755


def test_caller_groups_of_self() -> None:
    assert caller_groups(os.getpid()) == frozenset(os.getgroups())
    assert caller_groups(1 << 23) == frozenset()


@needs_root
def test_caller_groups_of_child() -> None:
    child = subprocess.Popen(
        ["sh", "-c", "echo ready; cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        user=65534, group=65534, extra_groups=[4242, 4343],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        assert caller_groups(child.pid) == {4242, 4343}
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


@needs_root
def test_chown_new_by_name_covers_every_kind(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / "file").touch()
    (tmp_path / "dir").mkdir()
    os.symlink("file", tmp_path / "link")
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mkfifo(tmp_path / "fifo")
    for name in ("file", "dir", "link", "null", "fifo"):
        chown_new(name, 1234, 5678, dir_fd=dir_fd)
        st = os.lstat(tmp_path / name)
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
    # The symlink itself was chowned, not its target (which got its own call above).
    chown_new("link", 42, 43, dir_fd=dir_fd)
    assert os.lstat(tmp_path / "link").st_uid == 42
    assert os.stat(tmp_path / "file").st_uid == 1234


@needs_root
def test_chown_new_sets_mode_after_chown(tmp_path: Path, dir_fd: int) -> None:
    """chown clears S_ISUID/S_ISGID even for root, so the mode must come afterwards."""
    path = tmp_path / "bin"
    path.touch()
    os.chmod(path, 0o6755)
    chown_new("bin", 1234, 5678, dir_fd=dir_fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # the kernel's doing
    chown_new("bin", 1234, 5678, dir_fd=dir_fd, mode=0o6755)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o6755


@needs_root
def test_chown_new_mode_skips_symlinks(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / "target").touch()
    os.chmod(tmp_path / "target", 0o600)
    os.symlink("target", tmp_path / "link")
    chown_new("link", 7, 8, dir_fd=dir_fd, mode=0o777)
    assert os.lstat(tmp_path / "link").st_uid == 7
    assert stat.S_IMODE(os.stat(tmp_path / "target").st_mode) == 0o600


@needs_root
@pytest.mark.parametrize("kind", ["file", "link", "null"])
def test_chown_new_by_o_path_fd(tmp_path: Path, kind: str) -> None:
    (tmp_path / "file").touch()
    os.symlink("file", tmp_path / "link")
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    fd = os.open(tmp_path / kind, os.O_PATH | os.O_NOFOLLOW)
    try:
        chown_new(fd, 321, 654, mode=0o640)
    finally:
        os.close(fd)
    st = os.lstat(tmp_path / kind)
    assert (st.st_uid, st.st_gid) == (321, 654)
    if kind != "link":
        assert stat.S_IMODE(st.st_mode) == 0o640
    else:
        assert os.stat(tmp_path / "file").st_uid == 0  # target untouched


@needs_root
def test_chown_new_by_open_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        chown_new(fd, 11, 12, mode=0o2750)
    finally:
        os.close(fd)
    st = os.stat(tmp_path / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (11, 12, 0o2750)


def test_chown_new_by_name_needs_dir_fd() -> None:
    with pytest.raises(ValueError):
        chown_new("x", 1, 1)


def test_check_access_by_mode_bits(tmp_path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o640)
    st = os.stat(p)
    check_access(st, os.R_OK | os.W_OK, 1000, 5, 1)  # owner: rw-
    check_access(st, os.R_OK, 7, 1000, 1)  # group: r--
    check_access(st, os.F_OK, 7, 7, 1)  # existence needs nothing
    for uid, gid, mode in ((1000, 5, os.X_OK), (7, 1000, os.W_OK), (7, 7, os.R_OK)):
        with pytest.raises(OSError) as exc:
            check_access(st, mode, uid, gid, 1)
        assert exc.value.errno == errno.EACCES
    check_access(st, os.R_OK | os.W_OK, 0, 0, 1)  # root reads and writes anything ...
    with pytest.raises(OSError):
        check_access(st, os.X_OK, 0, 0, 1)  # ... but runs nothing no one may execute
