"""O_TMPFILE: unnamed files in a directory, published (or not) by a later linkat(2).

Two ways to give such a file a name, both a FUSE_LINK of its node on a FUSE mount:
linkat(AT_FDCWD, "/proc/self/fd/N", dir, name, AT_SYMLINK_FOLLOW), and linkat(N, "", dir,
name, AT_EMPTY_PATH) (root, or since Linux 6.10 the opener itself). Not ``os.link(src,
dst)`` with default arguments: Python 3.11 then calls link(2), which does not follow the
magic link and tries to link /proc's symlink itself, EXDEV on every filesystem (ext4 and
kernel overlayfs alike); with a ``dst_dir_fd`` it calls linkat(AT_SYMLINK_FOLLOW).

Kernel overlayfs (6.18) and ext4 agree on everything here, so both oracles state one
outcome. One difference the FUSE targets show is left unasserted: /proc/self/fd/N of a
FUSE tmpfile reads ``DIR// (deleted)``, of an ext4 or overlayfs one ``DIR/#INO (deleted)``
(the FUSE kernel instantiates the kernel's "/" placeholder dentry as is; no daemon can
change it).

The pyfuse3 front-end has no FUSE_TMPFILE handler: libfuse answers ENOSYS, and the kernel
EOPNOTSUPP from then on. Errors the VFS gives before asking the filesystem (EINVAL,
ENOTDIR, ENOENT) are the same there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from frontend_gaps import differs_on_pyfuse3

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)

_AT_EMPTY_PATH = 0x1000
_NO_TMPFILE = ("pyfuse3 3.5 has no FUSE_TMPFILE handler (libfuse answers ENOSYS): the kernel "
               "gives EOPNOTSUPP to every O_TMPFILE open")


_differs_on_pyfuse3 = differs_on_pyfuse3(_NO_TMPFILE)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def tmpfile(directory: Path, flags: int = os.O_RDWR, mode: int = 0o600) -> Iterator[int]:
    fd = os.open(directory, os.O_TMPFILE | flags, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def link_by_proc(fd: int, directory: Path, name: str) -> None:
    """linkat(AT_FDCWD, /proc/self/fd/N, dir, name, AT_SYMLINK_FOLLOW)."""
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def link_empty_path(fd: int, directory: Path, name: str) -> None:
    """linkat(N, "", dir, name, AT_EMPTY_PATH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        if libc.linkat(fd, b"", dfd, name.encode(), _AT_EMPTY_PATH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), name)
    finally:
        os.close(dfd)


@_differs_on_pyfuse3
def test_tmpfile_is_unnamed_until_linked(fs: Path) -> None:
    with tmpfile(fs, os.O_RDWR, 0o640) as fd:
        assert os.write(fd, b"unnamed data") == 12
        assert os.pread(fd, 100, 0) == b"unnamed data"
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask()
        assert (st.st_nlink, st.st_size) == (0, 12)
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        assert os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")
        assert os.listdir(fs) == []
        link_by_proc(fd, fs, "named")
        assert os.fstat(fd).st_nlink == 1
        named = os.stat(fs / "named")
        assert (named.st_ino, named.st_nlink, named.st_size) == (st.st_ino, 1, 12)
        assert (fs / "named").read_bytes() == b"unnamed data"
        assert os.listdir(fs) == ["named"]
        # Still the same file through the fd.
        os.pwrite(fd, b"!", 12)
        assert (fs / "named").read_bytes() == b"unnamed data!"
        link_by_proc(fd, fs, "second")
        assert os.fstat(fd).st_nlink == 2
    assert os.stat(fs / "second").st_ino == os.stat(fs / "named").st_ino
    assert sorted(os.listdir(fs)) == ["named", "second"]


@_differs_on_pyfuse3
def test_tmpfile_linked_by_empty_path(fs: Path) -> None:
    with tmpfile(fs, os.O_WRONLY) as fd:
        os.write(fd, b"flink")
        link_empty_path(fd, fs, "f")
        assert os.fstat(fd).st_nlink == 1
    assert (fs / "f").read_bytes() == b"flink"
    assert os.stat(fs / "f").st_nlink == 1


@_differs_on_pyfuse3
def test_tmpfile_with_o_excl_can_never_be_linked(fs: Path) -> None:
    with tmpfile(fs, os.O_RDWR | os.O_EXCL) as fd:
        os.write(fd, b"private")
        with raises_errno(errno.ENOENT):
            link_by_proc(fd, fs, "a")
        with raises_errno(errno.ENOENT):
            link_empty_path(fd, fs, "b")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"private"
    assert os.listdir(fs) == []


@_differs_on_pyfuse3
def test_closed_unlinked_tmpfile_leaves_nothing(fs: Path, behind: Path | None) -> None:
    """Nothing of it remains, through the mount or behind it (passthru's source, an
    overlay's upper layer): the directory is as it was, or an empty copy-up of it."""
    for flags in (os.O_RDWR, os.O_WRONLY | os.O_EXCL):
        with tmpfile(fs, flags) as fd:
            os.write(fd, b"x" * 70000)
    assert os.listdir(fs) == []
    if behind is not None:
        assert os.listdir(behind) == []


@_differs_on_pyfuse3
@pytest.mark.tree({"d/": None, "d/old": b"pre-existing"})
def test_tmpfile_in_a_preexisting_directory(fs: Path, behind: Path | None) -> None:
    """On an overlay with the directory in a lower layer, the parent is copied up first
    (as the kernel's ovl_tmpfile does), and the link publishes the file there."""
    with tmpfile(fs / "d", os.O_RDWR) as fd:
        os.write(fd, b"new")
        assert sorted(os.listdir(fs / "d")) == ["old"]
        link_by_proc(fd, fs / "d", "new")
    assert sorted(os.listdir(fs / "d")) == ["new", "old"]
    assert (fs / "d" / "new").read_bytes() == b"new"
    assert (fs / "d" / "old").read_bytes() == b"pre-existing"
    if behind is not None:
        assert (behind / "d" / "new").read_bytes() == b"new"


@_differs_on_pyfuse3
def test_link_of_tmpfile_over_existing_name_and_after_unlink(fs: Path) -> None:
    (fs / "taken").write_bytes(b"")
    with tmpfile(fs) as fd:
        with raises_errno(errno.EEXIST):
            link_by_proc(fd, fs, "taken")
        link_by_proc(fd, fs, "mine")
        os.unlink(fs / "mine")
        assert os.fstat(fd).st_nlink == 0
        # Linked once, it is an ordinary file that lost its last name: no longer linkable.
        with raises_errno(errno.ENOENT):
            link_by_proc(fd, fs, "again")
    assert os.listdir(fs) == ["taken"]


def test_tmpfile_open_errors(fs: Path) -> None:
    """Refused by the VFS before the filesystem is asked: the same on every target."""
    (fs / "file").write_bytes(b"")
    with raises_errno(errno.EINVAL):  # O_TMPFILE needs write access
        os.open(fs, os.O_TMPFILE | os.O_RDONLY, 0o600)
    with raises_errno(errno.EINVAL):  # and excludes O_CREAT
        os.open(fs, os.O_TMPFILE | os.O_RDWR | os.O_CREAT, 0o600)
    with raises_errno(errno.ENOTDIR):
        os.open(fs / "file", os.O_TMPFILE | os.O_RDWR, 0o600)
    with raises_errno(errno.ENOENT):
        os.open(fs / "missing", os.O_TMPFILE | os.O_RDWR, 0o600)
    assert os.listdir(fs) == ["file"]
