"""chattr +a/+i files in SOURCE behave through the mount as on SOURCE itself: the backing
filesystem refuses what they forbid, and allows what they allow, although the daemon's
backing open and utimensat differ from the caller's (no O_APPEND; resolved times). And
chattr/lsattr through the mount (FUSE_IOCTL, native session) act on SOURCE's objects.
The cross-target outcomes are in tests/behaviour/test_bhv_fileattr.py."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from passthru_helpers import StartPassthru

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def flagged(tmp_path: Path) -> Iterator[Path]:
    source = tmp_path / "source"
    source.mkdir()
    (source / "app").write_bytes(b"log\n")
    (source / "imm").write_bytes(b"fixed\n")
    try:
        subprocess.run(["chattr", "+a", str(source / "app")], check=True, capture_output=True)
        subprocess.run(["chattr", "+i", str(source / "imm")], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr +a/+i not possible here: {e}")
    try:
        yield source
    finally:
        for name in ("app", "imm"):
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["chattr", "-ia", str(source / name)], check=True)


@pytest.mark.parametrize("session", ["native", "pyfuse3"])
def test_append_only_file_takes_appends_only(passthru_mount: StartPassthru, flagged: Path,
                                             session: str) -> None:
    m = passthru_mount(f"session={session}").mnt
    with open(m / "app", "ab") as f:  # O_APPEND: allowed, as on SOURCE
        f.write(b"more\n")
    assert (flagged / "app").read_bytes() == b"log\nmore\n"
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.close(os.open(m / "app", flags))
    with pytest.raises(PermissionError):
        os.utime(m / "app", ns=(1, 1))
    if session == "native":  # pyfuse3 hands UTIME_NOW over resolved: explicit times
        os.utime(m / "app")
    assert (m / "app").read_bytes() == b"log\nmore\n"


def test_append_only_under_writeback_refuses_write_opens(passthru_mount: StartPassthru,
                                                         flagged: Path) -> None:
    """The writeback cache's page flushes may rewrite the last page: no write open."""
    m = passthru_mount("writeback").mnt
    with pytest.raises(PermissionError):
        os.close(os.open(m / "app", os.O_WRONLY | os.O_APPEND))
    assert (m / "app").read_bytes() == b"log\n"


@pytest.mark.parametrize("session", ["native", "pyfuse3"])
def test_writes_through_a_handle_opened_before_plus_a_close_cleanly_under_writeback(
        passthru_mount: StartPassthru, tmp_path: Path, session: str) -> None:
    """A handle opened for write before chattr +a may still write (as on SOURCE). Under
    writeback the kernel then flushes its times at close (SETATTR mtime naming the handle),
    which SOURCE refuses on a +a file: that used to fail close(2) with EIO."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_bytes(b"0123456789")
    m = passthru_mount("writeback", f"session={session}", source=source).mnt
    fd = os.open(m / "f", os.O_RDWR)
    try:
        subprocess.run(["chattr", "+a", str(source / "f")], check=True, capture_output=True)
        assert os.pwrite(fd, b"ab", 2) == 2
        os.fsync(fd)
        assert os.pwrite(fd, b"cd", 4) == 2
    finally:
        try:
            os.close(fd)
        finally:
            subprocess.run(["chattr", "-a", str(source / "f")], check=False)
    assert (source / "f").read_bytes() == b"01abcd6789"


def test_immutable_file_refuses_every_change(passthru_mount: StartPassthru,
                                             flagged: Path) -> None:
    m = passthru_mount().mnt
    for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.close(os.open(m / "imm", flags))
    for change in (lambda: os.utime(m / "imm"), lambda: os.chmod(m / "imm", 0o600),
                   lambda: os.unlink(m / "imm"), lambda: os.link(m / "imm", m / "l"),
                   lambda: os.setxattr(m / "imm", "user.x", b"1")):
        with pytest.raises(PermissionError):
            change()
    assert (m / "imm").read_bytes() == b"fixed\n"


def _getflags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("=I", fcntl.ioctl(fd, 0x80086601, bytes(4)))[0]
    finally:
        os.close(fd)


def _setflags(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, 0x40086602, struct.pack("=I", flags))
    finally:
        os.close(fd)


def test_chattr_through_the_mount_reaches_source_and_the_new_ctime_shows(
        passthru_mount: StartPassthru) -> None:
    """cache=always keeps attributes for long: the chattr's new ctime must still show at
    once, as it does on SOURCE (the kernel drops nothing itself after a FUSE_IOCTL)."""
    pm = passthru_mount("cache=always")
    (pm.source / "f").write_bytes(b"data")
    before = os.stat(pm.mnt / "f").st_ctime_ns
    time.sleep(0.02)
    nodump = 0x40
    _setflags(pm.mnt / "f", _getflags(pm.mnt / "f") | nodump)
    assert _getflags(pm.source / "f") & nodump
    assert _getflags(pm.mnt / "f") & nodump
    after = os.stat(pm.mnt / "f").st_ctime_ns
    assert after > before
    assert after == os.stat(pm.source / "f").st_ctime_ns
    _setflags(pm.mnt / "f", _getflags(pm.mnt / "f") & ~nodump)
    assert not _getflags(pm.source / "f") & nodump


def test_other_ioctls_are_refused(passthru_mount: StartPassthru) -> None:
    """Only the fileattr ones are served: the daemon would run any other on SOURCE with
    root's rights (FS_IOC_GETVERSION here, which ext4 answers)."""
    pm = passthru_mount()
    (pm.source / "f").write_bytes(b"data")
    fd = os.open(pm.mnt / "f", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, 0x80087601, bytes(8))
        assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
