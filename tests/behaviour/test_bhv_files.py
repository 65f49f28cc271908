"""Regular file data: create, read, write, append, offsets, truncate, sparse files, open flags."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(30)

GiB = 1 << 30


def test_create_write_read(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    try:
        assert os.write(fd, b"hello world") == 11
        assert os.pread(fd, 100, 0) == b"hello world"
    finally:
        os.close(fd)
    st = os.stat(fs / "f")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask()
    assert (st.st_size, st.st_uid, st.st_gid) == (11, os.geteuid(), os.getegid())
    assert (fs / "f").read_bytes() == b"hello world"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.tree({"old": b"pre-existing data\n"})
def test_read_existing(fs: Path) -> None:
    assert (fs / "old").read_bytes() == b"pre-existing data\n"
    assert os.stat(fs / "old").st_size == 18


@pytest.mark.tree({"old": b"0123456789"})
def test_write_into_existing(fs: Path) -> None:
    fd = os.open(fs / "old", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"abc", 4) == 3
        assert os.pread(fd, 100, 0) == b"0123abc789"
    finally:
        os.close(fd)
    assert (fs / "old").read_bytes() == b"0123abc789"


def test_size_seen_through_path_after_write(fs: Path) -> None:
    # A size grown through one fd is what a stat by path reports at once.
    fd = os.open(fs / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 5000)
        assert os.stat(fs / "f").st_size == 5000
        os.pwrite(fd, b"y", 9999)
        assert os.stat(fs / "f").st_size == 10000
    finally:
        os.close(fd)


def test_append_two_writers(fs: Path) -> None:
    path = fs / "log"
    path.write_bytes(b"start\n")
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 == 0 else b, f"line {i} from {'ab'[i % 2]}\n".encode())
        # O_APPEND ignores the file position: every write lands at the current EOF.
        os.lseek(a, 0, os.SEEK_SET)
        os.write(a, b"end\n")
    finally:
        os.close(a)
        os.close(b)
    expected = b"start\n" + b"".join(
        f"line {i} from {'ab'[i % 2]}\n".encode() for i in range(20)) + b"end\n"
    assert path.read_bytes() == expected


def test_pread_pwrite_odd_offsets(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        writes = {1: b"A" * 3, 4095: b"BC", 4097: b"D" * 8191, 65535: b"E", 131071: b"FG"}
        for off, data in writes.items():
            assert os.pwrite(fd, data, off) == len(data)
        expected = bytearray(131073)
        for off, data in writes.items():
            expected[off:off + len(data)] = data
        assert os.fstat(fd).st_size == len(expected)
        assert os.pread(fd, 1 << 20, 0) == bytes(expected)
        for off, size in ((0, 1), (3, 4094), (4096, 3), (12287, 1), (65534, 3), (131072, 10)):
            assert os.pread(fd, size, off) == bytes(expected[off:off + size])
        assert os.pread(fd, 10, 200000) == b""
    finally:
        os.close(fd)


@pytest.mark.tree({"f": b"0123456789" * 1000})
def test_truncate_down_and_up(fs: Path) -> None:
    path = fs / "f"
    os.truncate(path, 4097)
    assert os.stat(path).st_size == 4097
    assert path.read_bytes() == (b"0123456789" * 1000)[:4097]
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
        os.ftruncate(fd, 10000)
        # Bytes past the old end read back as zeros, never as the data cut off before.
        assert os.pread(fd, 20000, 0) == b"012" + bytes(9997)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 10000
    os.truncate(path, 0)
    assert path.read_bytes() == b""


def test_sparse_past_4gib(fs: Path) -> None:
    off = 4 * GiB + 12345
    fd = os.open(fs / "sparse", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"tail", off) == 4
        st = os.fstat(fd)
        assert st.st_size == off + 4
        # A hole takes no space: far less than the 4 GiB the size claims.
        assert st.st_blocks * 512 < (1 << 20)
        assert os.pread(fd, 4, off) == b"tail"
        assert os.pread(fd, 8, off - 4) == bytes(4) + b"tail"
        assert os.pread(fd, 4096, 2 * GiB) == bytes(4096)
        assert os.pread(fd, 16, 4 * GiB - 8) == bytes(16)
    finally:
        os.close(fd)
    assert os.stat(fs / "sparse").st_size == off + 4


def test_o_excl(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    with raises_errno(errno.EEXIST):
        os.open(fs / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.symlink("dangling-target", fs / "link")
    # O_EXCL does not follow a symlink, even a dangling one.
    with raises_errno(errno.EEXIST):
        os.open(fs / "link", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert not os.path.lexists(fs / "dangling-target")


@pytest.mark.tree({"f": b"old contents"})
def test_o_trunc(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert (fs / "f").read_bytes() == b"new"


def test_open_errors(fs: Path) -> None:
    (fs / "f").write_bytes(b"x")
    with raises_errno(errno.ENOENT):
        os.open(fs / "missing", os.O_RDONLY)
    with raises_errno(errno.ENOTDIR):
        os.open(fs / "f" / "below", os.O_RDONLY)
    with raises_errno(errno.EISDIR):
        os.open(fs, os.O_WRONLY)
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        with raises_errno(errno.EBADF):
            os.write(fd, b"y")
    finally:
        os.close(fd)


@pytest.mark.tree({"f": b"keep me"})
def test_unlink_while_open(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_RDWR)
    try:
        os.unlink(fs / "f")
        assert not os.path.lexists(fs / "f")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"keep me"
        assert os.pwrite(fd, b"still writable", 7) == 14
        assert os.pread(fd, 100, 0) == b"keep mestill writable"
        assert os.fstat(fd).st_size == 21
        os.ftruncate(fd, 4)
        assert os.pread(fd, 100, 0) == b"keep"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.listdir(fs) == []


def test_fsync_and_fdatasync(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (fs / "f").read_bytes() == b"durable"


def test_large_sequential_write_read(fs: Path) -> None:
    data = os.urandom(1 << 16) * 48  # 3 MiB, crosses many request sizes
    (fs / "big").write_bytes(data)
    assert os.stat(fs / "big").st_size == len(data)
    assert (fs / "big").read_bytes() == data


_NO_FALLOCATE = "pyfuse3 3.5 has no fallocate handler: the kernel answers EOPNOTSUPP"


@pytest.mark.differs("passthru-pyfuse3", reason=_NO_FALLOCATE)
@pytest.mark.differs("overlay-lower-pyfuse3", reason=_NO_FALLOCATE)
def test_fallocate_modes(fs: Path) -> None:
    """posix_fallocate grows the file; KEEP_SIZE allocates past EOF without growing it;
    PUNCH_HOLE zeroes a range in place (the size stays)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    keep_size, punch_hole = 0x01, 0x02
    path = fs / "falloc"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 65536)
        assert os.fstat(fd).st_size == 65536
        assert libc.fallocate(fd, keep_size, 65536, 65536) == 0, os.strerror(ctypes.get_errno())
        assert os.stat(path).st_size == 65536
        assert libc.fallocate(fd, punch_hole | keep_size, 0, 4096) == 0, \
            os.strerror(ctypes.get_errno())
        assert os.pread(fd, 8192, 0) == bytes(4096) + b"x" * 4096
        assert os.stat(path).st_size == 65536
    finally:
        os.close(fd)


_NO_LSEEK = "pyfuse3 3.5 has no lseek handler: the kernel treats the whole file as data"


@pytest.mark.differs("passthru-pyfuse3", reason=_NO_LSEEK)
@pytest.mark.differs("overlay-lower-pyfuse3", reason=_NO_LSEEK)
def test_seek_data_and_hole(fs: Path) -> None:
    """SEEK_DATA/SEEK_HOLE find the extents of a sparse file (as cp --sparse and tar do)."""
    path = fs / "sparse"
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(b"d" * 4096)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 1 << 20, os.SEEK_HOLE) == (1 << 20) + 4096
        with raises_errno(errno.ENXIO):
            os.lseek(fd, (1 << 20) + 4096, os.SEEK_DATA)
    finally:
        os.close(fd)


def _pattern(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


@pytest.mark.tree({"src": _pattern(3 << 20)})
def test_copy_file_range(fs: Path) -> None:
    """copy_file_range(2) inside the mount (GNU cp uses it): from a file of the tree (a
    lower one on an overlay) into a new one, at odd offsets, past the destination's EOF
    (a hole between), within one file, and the kernel's refusals."""
    data = _pattern(3 << 20)
    src = os.open(fs / "src", os.O_RDONLY)
    dst = os.open(fs / "dst", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < len(data):
            n = os.copy_file_range(src, dst, len(data) - done, done, done)
            assert n > 0
            done += n
        assert os.copy_file_range(src, dst, 100, len(data), 0) == 0  # at the source's EOF
        assert os.fstat(dst).st_size == len(data)
        assert os.copy_file_range(src, dst, 4097, 12345, 5_000_001) == 4097
        assert os.fstat(dst).st_size == 5_000_001 + 4097
        assert os.pread(dst, 4097, 5_000_001) == data[12345:12345 + 4097]
        assert os.pread(dst, 100, len(data) + 10) == bytes(100)
        # Within the destination itself, ranges apart; overlapping ones are refused.
        assert os.copy_file_range(dst, dst, 1000, 0, 4_000_000) == 1000
        assert os.pread(dst, 1000, 4_000_000) == data[:1000]
        with raises_errno(errno.EINVAL):
            os.copy_file_range(dst, dst, 1000, 0, 500)
        with raises_errno(errno.EBADF):
            os.copy_file_range(dst, src, 10, 0, 0)  # into a file open read-only
    finally:
        os.close(src)
        os.close(dst)
    whole = (fs / "dst").read_bytes()
    assert whole[:len(data)] == data
    assert (fs / "src").read_bytes() == data
