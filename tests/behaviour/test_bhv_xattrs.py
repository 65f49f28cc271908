"""Extended attributes in the user.* namespace: get/set/list/remove and their errnos."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)


def user_names(path: Path, follow_symlinks: bool = True) -> list[str]:
    return sorted(n for n in os.listxattr(path, follow_symlinks=follow_symlinks)
                  if n.startswith("user."))


@pytest.mark.tree({"f": b"data"})
def test_xattr_set_get_list_remove(fs: Path) -> None:
    f = fs / "f"
    with raises_errno(errno.ENODATA):
        os.getxattr(f, "user.missing")
    assert user_names(f) == []
    os.setxattr(f, "user.one", b"1")
    os.setxattr(f, "user.two", b"\x00binary\xff" * 10)
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.one") == b"1"
    assert os.getxattr(f, "user.two") == b"\x00binary\xff" * 10
    assert os.getxattr(f, "user.empty") == b""
    assert user_names(f) == ["user.empty", "user.one", "user.two"]
    os.setxattr(f, "user.one", b"replaced")
    assert os.getxattr(f, "user.one") == b"replaced"
    os.removexattr(f, "user.one")
    with raises_errno(errno.ENODATA):
        os.getxattr(f, "user.one")
    with raises_errno(errno.ENODATA):
        os.removexattr(f, "user.one")
    assert user_names(f) == ["user.empty", "user.two"]
    assert f.read_bytes() == b"data"


@pytest.mark.tree({"f": b""})
def test_xattr_create_replace_flags(fs: Path) -> None:
    f = fs / "f"
    with raises_errno(errno.ENODATA):
        os.setxattr(f, "user.k", b"v", os.XATTR_REPLACE)
    os.setxattr(f, "user.k", b"v", os.XATTR_CREATE)
    with raises_errno(errno.EEXIST):
        os.setxattr(f, "user.k", b"w", os.XATTR_CREATE)
    assert os.getxattr(f, "user.k") == b"v"
    os.setxattr(f, "user.k", b"w", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.k") == b"w"


def test_xattr_large_value_and_fd(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    value = bytes(range(256)) * 15
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        os.setxattr(fd, "user.big", value)
        assert os.getxattr(fd, "user.big") == value
        assert "user.big" in os.listxattr(fd)
    finally:
        os.close(fd)
    assert os.getxattr(fs / "f", "user.big") == value


def test_xattr_on_directory(fs: Path) -> None:
    os.mkdir(fs / "d")
    os.setxattr(fs / "d", "user.dir", b"yes")
    assert os.getxattr(fs / "d", "user.dir") == b"yes"
    assert user_names(fs / "d") == ["user.dir"]


def test_xattr_user_on_symlink_refused(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    os.symlink("f", fs / "l")
    # user.* attributes are only for regular files and directories.
    with raises_errno(errno.EPERM):
        os.setxattr(fs / "l", "user.x", b"1", follow_symlinks=False)
    # Following the link sets it on the target.
    os.setxattr(fs / "l", "user.x", b"1")
    assert os.getxattr(fs / "f", "user.x") == b"1"
    assert user_names(fs / "l", follow_symlinks=False) == []


def test_xattr_errors(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    with raises_errno(errno.ENOENT):
        os.getxattr(fs / "missing", "user.x")
    with raises_errno(errno.EOPNOTSUPP):
        os.setxattr(fs / "f", "bogusns.x", b"1")
    with raises_errno(errno.ERANGE):
        os.setxattr(fs / "f", "user." + "n" * 300, b"1")
