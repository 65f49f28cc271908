"""Special files (fifo, AF_UNIX socket, device nodes) and statfs."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)


def test_fifo(fs: Path) -> None:
    os.mkfifo(fs / "fifo", 0o640)
    st = os.lstat(fs / "fifo")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()
    r = os.open(fs / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        w = os.open(fs / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(w, b"through the pipe")
            assert os.read(r, 100) == b"through the pipe"
        finally:
            os.close(w)
    finally:
        os.close(r)
    with raises_errno(errno.EEXIST):
        os.mkfifo(fs / "fifo")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unix_socket(fs: Path) -> None:
    dfd = os.open(fs, os.O_PATH | os.O_DIRECTORY)
    try:
        # Through the fd's magic link: a short path, whatever the mount's path length.
        path = f"/proc/self/fd/{dfd}/sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(path)
            server.listen(1)
            assert stat.S_ISSOCK(os.lstat(fs / "sock").st_mode)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(path)
                conn, _ = server.accept()
                with conn:
                    client.sendall(b"ping")
                    assert conn.recv(10) == b"ping"
            finally:
                client.close()
        finally:
            server.close()
    finally:
        os.close(dfd)
    os.unlink(fs / "sock")
    assert os.listdir(fs) == []


def test_mknod_socket_node(fs: Path) -> None:
    os.mknod(fs / "s", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(fs / "s").st_mode)


def test_device_nodes(fs: Path) -> None:
    os.mknod(fs / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(fs / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    st = os.lstat(fs / "null")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    st = os.lstat(fs / "loop")
    assert stat.S_ISBLK(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 200)
    assert sorted(os.listdir(fs)) == ["loop", "null"]
    os.unlink(fs / "null")
    os.unlink(fs / "loop")


def test_statfs(fs: Path) -> None:
    sv = os.statvfs(fs)
    assert sv.f_bsize > 0
    assert sv.f_frsize > 0
    assert sv.f_namemax == 255
    assert sv.f_blocks > 0
    assert 0 <= sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert 0 <= sv.f_ffree <= sv.f_files
    fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fstatvfs(fd).f_namemax == 255
    finally:
        os.close(fd)


def test_name_length_limit(fs: Path) -> None:
    (fs / ("n" * 255)).write_bytes(b"")
    assert os.listdir(fs) == ["n" * 255]
    with raises_errno(errno.ENAMETOOLONG):
        (fs / ("n" * 256)).write_bytes(b"")
