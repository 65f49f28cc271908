"""writeback=1: the kernel places appends and flushes pages through any writable handle.

Regressions found by tools/fsx.py: an O_APPEND handle's APPEND flag moved every page the
kernel flushed through it to the upper file's EOF, and a write-only backing open failed the
kernel's reads of partly written pages with EBADF.
"""

from __future__ import annotations

import os

import pytest
from ovl_layers import OvlLayers

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
