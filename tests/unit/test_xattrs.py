"""xattrs helpers: by fd, by O_PATH fd, by (dir_fd, name) without following symlinks."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs import xattrs
from backingfs.xattrs import XATTR_CREATE, XATTR_REPLACE


@pytest.fixture
def xdir(tmp_path: Path) -> Path:
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as e:
        pytest.skip(f"{tmp_path} does not support user xattrs: {e}")
    probe.unlink()
    return tmp_path


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in opened:
            os.close(fd)


def _open(opened: list[int], path: Path, flags: int) -> int:
    fd = os.open(path, flags)
    opened.append(fd)
    return fd


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_roundtrip_and_list_on_fd(xdir: Path, fds: list[int]) -> None:
    (xdir / "f").touch()
    fd = _open(fds, xdir / "f", os.O_RDWR)
    xattrs.fsetxattr(fd, "user.a", b"one")
    xattrs.fsetxattr(fd, b"user.b", b"\x00two\xff")
    assert xattrs.fgetxattr(fd, b"user.a") == b"one"
    assert xattrs.fgetxattr(fd, "user.b") == b"\x00two\xff"
    assert sorted(xattrs.flistxattr(fd)) == [b"user.a", b"user.b"]
    xattrs.fremovexattr(fd, "user.a")
    assert xattrs.flistxattr(fd) == [b"user.b"]
    # The value really is on the file, not on some proxy.
    assert os.getxattr(xdir / "f", "user.b") == b"\x00two\xff"


def test_missing_name_is_enodata(xdir: Path, fds: list[int]) -> None:
    (xdir / "f").touch()
    fd = _open(fds, xdir / "f", os.O_RDONLY)
    assert _errno(xattrs.fgetxattr, fd, "user.nope") == errno.ENODATA
    assert _errno(xattrs.fremovexattr, fd, "user.nope") == errno.ENODATA


def test_create_and_replace_flags(xdir: Path, fds: list[int]) -> None:
    (xdir / "f").touch()
    fd = _open(fds, xdir / "f", os.O_RDONLY)
    assert _errno(xattrs.fsetxattr, fd, "user.k", b"v", XATTR_REPLACE) == errno.ENODATA
    xattrs.fsetxattr(fd, "user.k", b"v1", XATTR_CREATE)
    assert _errno(xattrs.fsetxattr, fd, "user.k", b"v2", XATTR_CREATE) == errno.EEXIST
    xattrs.fsetxattr(fd, "user.k", b"v3", XATTR_REPLACE)
    assert xattrs.fgetxattr(fd, "user.k") == b"v3"


def test_value_too_big(xdir: Path, fds: list[int]) -> None:
    (xdir / "f").touch()
    fd = _open(fds, xdir / "f", os.O_RDONLY)
    # Over XATTR_SIZE_MAX (64 KiB) the VFS itself refuses, whatever the filesystem.
    assert _errno(xattrs.fsetxattr, fd, "user.big", b"x" * (1 << 17)) == errno.E2BIG


def test_bad_fd_stays_ebadf() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert _errno(xattrs.fgetxattr, r, "user.a") == errno.EBADF


def test_enoent_of_an_open_fd_is_the_filesystems_own(
        xdir: Path, fds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    # A filesystem below us (FUSE, NFS) may answer ENOENT for an object we hold open: that
    # answer goes up as it is; only a missing magic link (fd not open) becomes EBADF.
    (xdir / "f").touch()
    fd = _open(fds, xdir / "f", os.O_PATH)

    def enoent(*args: object, **kwargs: object) -> bytes:
        raise FileNotFoundError(errno.ENOENT, "from below")

    monkeypatch.setattr(os, "getxattr", enoent)
    assert _errno(xattrs.fgetxattr, fd, "user.a") == errno.ENOENT
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert _errno(xattrs.fgetxattr, r, "user.a") == errno.EBADF


def test_o_path_fd_of_regular_file(xdir: Path, fds: list[int]) -> None:
    (xdir / "f").touch()
    fd = _open(fds, xdir / "f", os.O_PATH)
    xattrs.fsetxattr(fd, "user.p", b"path")
    assert xattrs.fgetxattr(fd, "user.p") == b"path"
    assert xattrs.flistxattr(fd) == [b"user.p"]
    assert os.getxattr(xdir / "f", "user.p") == b"path"
    assert _errno(xattrs.fsetxattr, fd, "user.p", b"again", XATTR_CREATE) == errno.EEXIST
    xattrs.fremovexattr(fd, "user.p")
    assert _errno(xattrs.fgetxattr, fd, "user.p") == errno.ENODATA


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* on a symlink needs CAP_SYS_ADMIN")
def test_symlink_by_parent_and_name(xdir: Path, fds: list[int]) -> None:
    (xdir / "target").touch()
    os.symlink("target", xdir / "link")
    dfd = _open(fds, xdir, os.O_PATH | os.O_DIRECTORY)
    xattrs.setxattrat(dfd, "link", "trusted.t", b"on-link")
    assert xattrs.getxattrat(dfd, b"link", "trusted.t") == b"on-link"
    assert b"trusted.t" in xattrs.listxattrat(dfd, "link")
    # Not followed: the target has nothing.
    assert "trusted.t" not in os.listxattr(xdir / "target")
    assert os.getxattr(xdir / "link", "trusted.t", follow_symlinks=False) == b"on-link"
    xattrs.removexattrat(dfd, "link", "trusted.t")
    assert _errno(xattrs.getxattrat, dfd, "link", "trusted.t") == errno.ENODATA


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* on a symlink needs CAP_SYS_ADMIN")
def test_symlink_by_o_path_fd(xdir: Path, fds: list[int]) -> None:
    (xdir / "target").touch()
    os.symlink("target", xdir / "link")
    fd = _open(fds, xdir / "link", os.O_PATH | os.O_NOFOLLOW)
    xattrs.fsetxattr(fd, "trusted.s", b"sym")
    assert xattrs.fgetxattr(fd, "trusted.s") == b"sym"
    assert b"trusted.s" in xattrs.flistxattr(fd)
    assert os.getxattr(xdir / "link", "trusted.s", follow_symlinks=False) == b"sym"
    assert "trusted.s" not in os.listxattr(xdir / "target")
    xattrs.fremovexattr(fd, "trusted.s")
    assert b"trusted.s" not in xattrs.flistxattr(fd)


def test_entry_must_be_one_component(xdir: Path, fds: list[int]) -> None:
    dfd = _open(fds, xdir, os.O_PATH | os.O_DIRECTORY)
    for bad in ("a/b", "..", "", "."):
        assert _errno(xattrs.getxattrat, dfd, bad, "user.x") == errno.EINVAL
