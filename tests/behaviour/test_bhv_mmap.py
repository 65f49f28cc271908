"""Memory maps: a shared mapping's writes are seen through other fds, and the reverse."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)


@pytest.mark.tree({"f": b"." * 8192})
def test_shared_mmap_write_then_read_other_fd(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[100:105] = b"HELLO"
            m[5000:5003] = b"abc"
            other = os.open(fs / "f", os.O_RDONLY)
            try:
                # Same page cache: visible before any msync.
                assert os.pread(other, 5, 100) == b"HELLO"
                m.flush()
                assert os.pread(other, 3, 5000) == b"abc"
            finally:
                os.close(other)
    finally:
        os.close(fd)
    data = (fs / "f").read_bytes()
    assert data[100:105] == b"HELLO" and data[5000:5003] == b"abc"
    assert len(data) == 8192


def test_write_then_mmap_read(fs: Path) -> None:
    (fs / "f").write_bytes(b"a" * 4096)
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:4] == b"aaaa"
            w = os.open(fs / "f", os.O_WRONLY)
            try:
                os.pwrite(w, b"ZZ", 10)
            finally:
                os.close(w)
            assert m[10:12] == b"ZZ"
    finally:
        os.close(fd)


def test_mmap_grown_file(fs: Path) -> None:
    fd = os.open(fs / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, 3 * mmap.PAGESIZE)
        with mmap.mmap(fd, 3 * mmap.PAGESIZE) as m:
            m[-3:] = b"end"
            m[:5] = b"start"
            m.flush()
    finally:
        os.close(fd)
    data = (fs / "f").read_bytes()
    assert len(data) == 3 * mmap.PAGESIZE
    assert data[:5] == b"start" and data[-3:] == b"end"
    assert data[5:-3] == bytes(len(data) - 8)


def test_private_mmap_not_written_back(fs: Path) -> None:
    (fs / "f").write_bytes(b"original")
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        with mmap.mmap(fd, 8, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[:3] = b"XYZ"
            assert m[:8] == b"XYZginal"
    finally:
        os.close(fd)
    assert (fs / "f").read_bytes() == b"original"
