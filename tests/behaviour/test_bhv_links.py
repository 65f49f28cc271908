"""Hard links and nlink; symlinks: readlink, dangling links, loops, O_NOFOLLOW."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)


@pytest.mark.tree({"f": b"shared data", "d/": None})
def test_hard_links_and_nlink(fs: Path) -> None:
    st = os.stat(fs / "f")
    assert st.st_nlink == 1
    os.link(fs / "f", fs / "g")
    os.link(fs / "f", fs / "d" / "h")
    for name in ("f", "g", "d/h"):
        s = os.stat(fs / name)
        assert (s.st_ino, s.st_nlink) == (st.st_ino, 3)
    with open(fs / "g", "ab") as f:
        f.write(b"!")
    assert (fs / "d" / "h").read_bytes() == b"shared data!"
    os.unlink(fs / "f")
    assert os.stat(fs / "g").st_nlink == 2
    os.rename(fs / "d" / "h", fs / "h")
    assert os.stat(fs / "h").st_nlink == 2
    os.unlink(fs / "g")
    assert os.stat(fs / "h").st_nlink == 1
    assert (fs / "h").read_bytes() == b"shared data!"


def test_link_errors(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    os.mkdir(fs / "d")
    with raises_errno(errno.EEXIST):
        os.link(fs / "f", fs / "d")
    with raises_errno(errno.EPERM):
        os.link(fs / "d", fs / "d2")
    with raises_errno(errno.ENOENT):
        os.link(fs / "missing", fs / "x")


def test_link_of_symlink_is_the_symlink(fs: Path) -> None:
    os.symlink("target", fs / "l")
    os.link(fs / "l", fs / "l2", follow_symlinks=False)
    assert os.readlink(fs / "l2") == "target"
    assert os.lstat(fs / "l2").st_ino == os.lstat(fs / "l").st_ino
    assert os.lstat(fs / "l").st_nlink == 2


def test_symlink_readlink(fs: Path) -> None:
    (fs / "f").write_bytes(b"through the link")
    os.symlink("f", fs / "rel")
    os.symlink("../" + fs.name + "/f", fs / "up")
    st = os.lstat(fs / "rel")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == 1
    assert os.readlink(fs / "rel") == "f"
    assert (fs / "rel").read_bytes() == b"through the link"
    assert (fs / "up").read_bytes() == b"through the link"
    assert os.stat(fs / "rel").st_ino == os.stat(fs / "f").st_ino
    long_target = "x" * 1000 + "/" + "y" * 3000
    os.symlink(long_target, fs / "long")
    assert os.readlink(fs / "long") == long_target
    assert os.lstat(fs / "long").st_size == len(long_target)


def test_dangling_symlink(fs: Path) -> None:
    os.symlink("nowhere", fs / "dangling")
    assert os.path.lexists(fs / "dangling")
    assert not os.path.exists(fs / "dangling")
    with raises_errno(errno.ENOENT):
        os.stat(fs / "dangling")
    assert os.readlink(fs / "dangling") == "nowhere"
    # Creating through a dangling link creates its target.
    fd = os.open(fs / "dangling", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"made")
    os.close(fd)
    assert (fs / "nowhere").read_bytes() == b"made"


def test_symlink_loop(fs: Path) -> None:
    os.symlink("b", fs / "a")
    os.symlink("a", fs / "b")
    os.symlink("self", fs / "self")
    for name in ("a", "self"):
        with raises_errno(errno.ELOOP):
            os.stat(fs / name)
        with raises_errno(errno.ELOOP):
            os.open(fs / name, os.O_RDONLY)
    with raises_errno(errno.ELOOP):
        os.open(fs / "a" / "x", os.O_RDONLY)
    assert os.readlink(fs / "a") == "b"


def test_o_nofollow_and_symlink_errors(fs: Path) -> None:
    (fs / "f").write_bytes(b"")
    os.symlink("f", fs / "l")
    with raises_errno(errno.ELOOP):
        os.open(fs / "l", os.O_RDONLY | os.O_NOFOLLOW)
    with raises_errno(errno.EEXIST):
        os.symlink("other", fs / "f")
    with raises_errno(errno.EINVAL):
        os.readlink(fs / "f")
    with raises_errno(errno.ENOENT):
        os.readlink(fs / "missing")
    fd = os.open(fs / "l", os.O_PATH | os.O_NOFOLLOW)
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_symlink_to_directory(fs: Path) -> None:
    os.mkdir(fs / "d")
    (fs / "d" / "f").write_bytes(b"in d")
    os.symlink("d", fs / "ld")
    assert os.listdir(fs / "ld") == ["f"]
    assert (fs / "ld" / "f").read_bytes() == b"in d"
    # rmdir of a symlink to a directory refuses (the link is not a directory).
    with raises_errno(errno.ENOTDIR):
        os.rmdir(fs / "ld")
    os.unlink(fs / "ld")
    assert os.path.isdir(fs / "d")
