"""writeback=1: the kernel places appends and flushes pages through any writable handle.

Regressions found by tools/fsx.py: an O_APPEND handle's APPEND flag moved every page the
kernel flushed through it to the upper file's EOF, and a write-only backing open failed the
kernel's reads of partly written pages with EBADF.

Found by tools/soak.py (``hold EIO``): the kernel sets the ctime of a file it unlinks, or
renames another over, and sends it at once (SETATTR mtime+ctime); for a file only on a lower
layer that was a copy-up, which failed EEXIST on the whiteout (or the moved file) now at its
name, and the kernel kept that as a writeback error: EIO for close(2) and fsync(2) of every
fd still open on the file.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from ovl_layers import OvlLayers

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(60)


def test_append_handle_does_not_move_flushed_pages(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_bytes(b"a" * 100)
    mnt = ovl.mount("writeback=1")
    fd = os.open(mnt / "f", os.O_RDWR | os.O_APPEND)
    try:
        assert os.write(fd, b"b" * 10) == 10
        os.pwrite(fd, b"c", 5)  # O_APPEND: still appended, by the kernel
        os.fsync(fd)
    finally:
        os.close(fd)
    expected = b"a" * 100 + b"b" * 10 + b"c"
    assert (mnt / "f").read_bytes() == expected
    assert (ovl.upper / "f").read_bytes() == expected


def test_write_only_append_open_works(ovl: OvlLayers) -> None:
    (ovl.lower1 / "g").write_bytes(b"x" * 4097)
    mnt = ovl.mount("writeback=1")
    fd = os.open(mnt / "g", os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, b"y" * 3) == 3
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (ovl.upper / "g").read_bytes() == b"x" * 4097 + b"yyy"


@pytest.mark.parametrize("session", ["native", "pyfuse3"])
def test_unlinked_lower_file_closes_cleanly(ovl: OvlLayers, session: str) -> None:
    (ovl.lower1 / "f").write_bytes(b"lower data")
    mnt = ovl.mount("writeback=1", f"session={session}")
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        os.unlink(mnt / "f")
        assert os.pread(fd, 100, 0) == b"lower data"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not (mnt / "f").exists()
    assert (ovl.lower1 / "f").read_bytes() == b"lower data"
    assert os.stat(ovl.upper / "f", follow_symlinks=False).st_rdev == 0  # the whiteout
    assert ovl.work_entries() == []


def test_lower_file_renamed_over_closes_cleanly(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_bytes(b"old")
    (ovl.lower1 / "g").write_bytes(b"new")
    mnt = ovl.mount("writeback=1")
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        os.rename(mnt / "g", mnt / "f")
        assert os.pread(fd, 100, 0) == b"old"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (mnt / "f").read_bytes() == b"new"
    assert not (mnt / "g").exists()
    assert ovl.work_entries() == []


def test_unlinked_lower_file_is_still_not_copied_up(ovl: OvlLayers) -> None:
    """A change a caller asks for still copies up, which fails as in the kernel's overlayfs
    (EEXIST: the whiteout holds the name); only the writeback cache's times flush is
    answered without one."""
    (ovl.lower1 / "f").write_bytes(b"lower data")
    mnt = ovl.mount("writeback=1")
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        os.unlink(mnt / "f")
        with raises_errno(errno.EEXIST):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    assert ovl.work_entries() == []


@pytest.mark.parametrize("session", ["native", "pyfuse3"])
def test_append_to_an_append_only_lower_file_closes_cleanly(ovl: OvlLayers,
                                                            session: str) -> None:
    """The writeback cache keeps the mtime of the appends it makes and sends it at close
    (SETATTR mtime+ctime naming the handle): that is no caller's change of times, which a
    +a file refuses. It was refused, and close(2) failed EPERM after a good append."""
    f = ovl.lower1 / "log"
    f.write_bytes(b"one\n")
    subprocess.run(["chattr", "+a", str(f)], check=True)
    try:
        mnt = ovl.mount("writeback=1", f"session={session}")
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, b"two\n") == 4
            os.fsync(fd)
            assert os.write(fd, b"three\n") == 6
        finally:
            os.close(fd)
        assert (mnt / "log").read_bytes() == b"one\ntwo\nthree\n"
        assert (ovl.upper / "log").read_bytes() == b"one\ntwo\nthree\n"
        with raises_errno(errno.EPERM):  # a caller's own times: still refused
            os.utime(mnt / "log", (5, 5))
        with raises_errno(errno.EPERM):
            os.open(mnt / "log", os.O_WRONLY)
    finally:
        subprocess.run(["chattr", "-a", str(f)], check=False)
