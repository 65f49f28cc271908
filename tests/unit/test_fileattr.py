"""backingfs.fileattr: the two forms of chattr's attributes and the copy-up of sync and
noatime, on real files (no mount)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from backingfs import fileattr
from backingfs.fileattr import FileAttr


def test_forms_pack_and_name_their_bits() -> None:
    word = FileAttr.unpack(b"\x30\x00\x08\x00", fsx=False)
    assert word == FileAttr(0x80030)
    assert word.pack() == b"\x30\x00\x08\x00"
    assert (word.immutable, word.append, word.copied_up) == (0x10, 0x20, 0x88)
    fsx = FileAttr.unpack(fileattr.FSXATTR.pack(0x18, 1, 2, 3, 4), fsx=True)
    assert fsx == FileAttr(0x18, (1, 2, 3, 4))
    assert fsx.pack() == fileattr.FSXATTR.pack(0x18, 1, 2, 3, 4)
    assert (fsx.immutable, fsx.append, fsx.copied_up) == (0x8, 0x10, 0x60)
    assert fsx.with_flags(-1 & ~0x8).flags == 0xFFFFFFF7


def test_only_regular_files_and_directories(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p")
    fd = os.open(tmp_path / "p", os.O_PATH)
    try:
        with pytest.raises(OSError) as e:
            fileattr.get_at(fd, 0o010000, False)
        assert e.value.errno == 25  # ENOTTY, as the FUSE kernel says for the rest
    finally:
        os.close(fd)


def _chattr(flag: str, path: Path) -> None:
    try:
        subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr not possible here: {e}")


def test_copy_up_flags_takes_sync_and_noatime_only(tmp_path: Path) -> None:
    src, dst, plain = tmp_path / "src", tmp_path / "dst", tmp_path / "plain"
    for p in (src, dst, plain):
        p.write_bytes(b"x")
    _chattr("+SAd", src)
    _chattr("+d", plain)
    fds = [os.open(p, os.O_RDONLY) for p in (src, dst, plain)]
    try:
        before = fileattr.getflags_fd(fds[1]).flags
        fileattr.copy_up_flags(fds[0], fds[1])
        assert fileattr.getflags_fd(fds[1]).flags == before | 0x88  # S, A; not d
        fileattr.copy_up_flags(fds[2], fds[1])  # nothing to copy: dst keeps its own
        assert fileattr.getflags_fd(fds[1]).flags == before | 0x88
        # The forms agree on one object.
        fsx = fileattr.getflags_fd(fds[0], fsx=True)
        assert fsx.flags & fsx.copied_up == fsx.copied_up
    finally:
        for fd in fds:
            os.close(fd)
