"""copy_data: holes kept, same bytes by every method, empty and multi-chunk files."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs import copyfile
from backingfs.copyfile import CopyStats, copy_data

GiB = 1 << 30


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[tuple[Path, Path, list[int]]]:
    """Source/destination paths and a list that closes every fd appended to it."""
    opened: list[int] = []
    try:
        yield tmp_path / "src", tmp_path / "dst", opened
    finally:
        for fd in opened:
            os.close(fd)


def _open_pair(src: Path, dst: Path, opened: list[int]) -> tuple[int, int]:
    s = os.open(src, os.O_RDONLY)
    opened.append(s)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    opened.append(d)
    return s, d


def _force_read_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clone(src_fd: int, dst_fd: int) -> bool:
        return False

    def no_cfr(*args: object) -> int:
        raise OSError(errno.EXDEV, "forced fallback")

    monkeypatch.setattr(copyfile, "_try_clone", no_clone)
    monkeypatch.setattr(copyfile.os, "copy_file_range", no_cfr)
    monkeypatch.setattr(copyfile.os, "sendfile", no_cfr)


def _force_sendfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a copy between filesystems of different types meets: no clone, EXDEV from
    copy_file_range."""
    def no_cfr(*args: object) -> int:
        raise OSError(errno.EXDEV, "forced fallback")

    monkeypatch.setattr(copyfile, "_try_clone", lambda s, d: False)
    monkeypatch.setattr(copyfile.os, "copy_file_range", no_cfr)


def _make_sparse(path: Path) -> dict[int, bytes]:
    chunks = {0: b"head" * 1024, GiB: b"middle" * 700, 5 * GiB: b"tail-data" * 100}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for off, data in chunks.items():
            os.pwrite(fd, data, off)
        # A trailing hole: the size ends well past the last data.
        os.ftruncate(fd, 6 * GiB)
    finally:
        os.close(fd)
    return chunks


def _check_sparse_copy(src: Path, dst: Path, chunks: dict[int, bytes]) -> None:
    s, d = os.stat(src), os.stat(dst)
    assert d.st_size == s.st_size == 6 * GiB
    # Three small extents; reading through the holes would allocate ~6 GiB.
    assert d.st_blocks * 512 < 4 << 20
    fd = os.open(dst, os.O_RDONLY)
    try:
        for off, data in chunks.items():
            assert os.pread(fd, len(data), off) == data
            assert os.pread(fd, 4096, off + len(data)) == bytes(4096)
        assert os.pread(fd, 4096, 3 * GiB) == bytes(4096)
        assert os.pread(fd, 4096, 6 * GiB - 4096) == bytes(4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("forced_rw", [False, True], ids=["native", "read_write"])
def test_sparse_file_keeps_holes(fds, monkeypatch: pytest.MonkeyPatch, forced_rw: bool) -> None:
    src, dst, opened = fds
    chunks = _make_sparse(src)
    if forced_rw:
        _force_read_write(monkeypatch)
    s, d = _open_pair(src, dst, opened)
    stats = copy_data(s, d)
    if forced_rw:
        assert stats.method == "read_write"
    if stats.method != "clone":
        assert stats.extents == 3
        # Extents are block-granular: the data rounded out to blocks, never a hole's GiBs.
        assert sum(len(c) for c in chunks.values()) <= stats.bytes_copied < 1 << 20
    _check_sparse_copy(src, dst, chunks)


def test_data_extents_skip_holes(fds) -> None:
    src, _, opened = fds
    chunks = _make_sparse(src)
    fd = os.open(src, os.O_RDONLY)
    opened.append(fd)
    extents = copyfile.data_extents(fd, 6 * GiB)
    assert len(extents) == 3
    for (start, end), (off, data) in zip(extents, sorted(chunks.items()), strict=True):
        assert start <= off and off + len(data) <= end
        assert end - start < 1 << 20


@pytest.mark.parametrize("forced_rw", [False, True], ids=["native", "read_write"])
def test_random_3mib_file(fds, monkeypatch: pytest.MonkeyPatch, forced_rw: bool) -> None:
    src, dst, opened = fds
    data = os.urandom(3 * (1 << 20) + 12345)
    src.write_bytes(data)
    if forced_rw:
        _force_read_write(monkeypatch)
    s, d = _open_pair(src, dst, opened)
    stats = copy_data(s, d)
    assert dst.read_bytes() == data
    assert stats.bytes_copied == len(data)
    assert stats.method == ("read_write" if forced_rw else stats.method)
    assert stats.method in ("clone", "copy_file_range", "sendfile", "read_write")


def test_fallback_midway_keeps_copied_part(fds, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range failing after its first chunk: the rest comes by sendfile."""
    src, dst, opened = fds
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    real_cfr = os.copy_file_range
    calls = 0

    def flaky_cfr(*args: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.EOPNOTSUPP, "forced fallback")
        return real_cfr(*args)

    monkeypatch.setattr(copyfile, "_try_clone", lambda s, d: False)
    monkeypatch.setattr(copyfile.os, "copy_file_range", flaky_cfr)
    s, d = _open_pair(src, dst, opened)
    stats = copy_data(s, d)
    assert stats.method == "sendfile"
    assert stats.bytes_copied == len(data)
    assert dst.read_bytes() == data


@pytest.mark.parametrize("fails_after", [0, 1])
def test_sendfile_fallback_keeps_holes_and_falls_back_itself(
        fds, monkeypatch: pytest.MonkeyPatch, fails_after: int) -> None:
    """Between filesystems that refuse copy_file_range, sendfile copies each data extent
    at its own offset (holes stay holes); refused in turn, pread/pwrite finish the job."""
    src, dst, opened = fds
    chunks = _make_sparse(src)
    _force_sendfile(monkeypatch)
    real_sendfile = os.sendfile
    calls = 0

    def sendfile(*args: int) -> int:
        nonlocal calls
        calls += 1
        if fails_after and calls > fails_after:
            raise OSError(errno.EINVAL, "forced fallback")
        return real_sendfile(*args)

    monkeypatch.setattr(copyfile.os, "sendfile", sendfile)
    s, d = _open_pair(src, dst, opened)
    stats = copy_data(s, d)
    assert stats.method == ("read_write" if fails_after else "sendfile")
    assert stats.extents == 3
    assert sum(len(c) for c in chunks.values()) <= stats.bytes_copied < 1 << 20
    _check_sparse_copy(src, dst, chunks)


def test_other_errors_propagate(fds, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, opened = fds
    src.write_bytes(b"x" * 100)

    def failing_cfr(*args: int) -> int:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(copyfile, "_try_clone", lambda s, d: False)
    monkeypatch.setattr(copyfile.os, "copy_file_range", failing_cfr)
    s, d = _open_pair(src, dst, opened)
    with pytest.raises(OSError) as exc:
        copy_data(s, d)
    assert exc.value.errno == errno.EIO


def test_empty_file(fds) -> None:
    src, dst, opened = fds
    src.write_bytes(b"")
    s, d = _open_pair(src, dst, opened)
    assert copy_data(s, d) == CopyStats(method="copy_file_range", bytes_copied=0, extents=0)
    assert os.stat(dst).st_size == 0


def test_prefix_copy(fds) -> None:
    """``size`` smaller than the source copies a prefix (never a clone of the whole file)."""
    src, dst, opened = fds
    data = os.urandom(10000)
    src.write_bytes(data)
    s, d = _open_pair(src, dst, opened)
    stats = copy_data(s, d, 4000)
    assert stats.method != "clone"
    assert dst.read_bytes() == data[:4000]


def test_clone_used_when_available(fds, monkeypatch: pytest.MonkeyPatch) -> None:
    """A successful FICLONE ends the copy: no extent is visited."""
    src, dst, opened = fds
    src.write_bytes(b"abc")
    seen: list[tuple[int, int, int]] = []

    def fake_ioctl(fd: int, request: int, arg: int) -> int:
        seen.append((fd, request, arg))
        os.pwrite(fd, os.pread(arg, 3, 0), 0)
        return 0

    monkeypatch.setattr(copyfile.fcntl, "ioctl", fake_ioctl)
    s, d = _open_pair(src, dst, opened)
    stats = copy_data(s, d)
    assert seen == [(d, copyfile.FICLONE, s)]
    assert stats == CopyStats(method="clone", bytes_copied=3, extents=1)
    assert dst.read_bytes() == b"abc"


@pytest.mark.parametrize("size", [None, 4000])
def test_dense_file_needs_no_hole_search_nor_truncate(fds, monkeypatch: pytest.MonkeyPatch,
                                                      size: int | None) -> None:
    """A file with a block for every byte (most files) has no hole to look for: one extent,
    no SEEK_DATA/SEEK_HOLE, and no ftruncate once the copy reached the size."""
    src, dst, opened = fds
    data = os.urandom(10000)
    src.write_bytes(data)
    os.sync()  # blocks allocated, not only reserved
    s, d = _open_pair(src, dst, opened)

    def refuse(*args: object) -> None:
        raise AssertionError("not needed for a dense file")

    monkeypatch.setattr(copyfile, "_try_clone", lambda s, d: False)
    monkeypatch.setattr(copyfile, "data_extents", refuse)
    monkeypatch.setattr(copyfile.os, "ftruncate", refuse)
    stats = copy_data(s, d, size)
    assert stats.extents == 1
    assert dst.read_bytes() == data[:size]


@pytest.mark.parametrize("forced_rw", [False, True])
def test_writeback_starts_each_chunk_and_copies_the_same(
        fds, monkeypatch: pytest.MonkeyPatch, forced_rw: bool) -> None:
    """writeback=True (copy-up before its fsync): the disk writes of every copied chunk
    are started as the copy goes, covering the file once, and the copy is the same."""
    src, dst, opened = fds
    data = os.urandom(3 * copyfile.CHUNK + 12345)
    src.write_bytes(data)
    s, d = _open_pair(src, dst, opened)
    if forced_rw:
        _force_read_write(monkeypatch)
    started: list[tuple[int, int]] = []
    real = copyfile.start_writeback

    def record(fd: int, offset: int, length: int) -> None:
        assert fd == d
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(copyfile, "start_writeback", record)
    copy_data(s, d, writeback=True)
    assert dst.read_bytes() == data
    assert len(started) == 4
    assert sorted(started)[0][0] == 0 and sum(n for _, n in started) == len(data)
