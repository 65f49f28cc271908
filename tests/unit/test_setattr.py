"""setattr_backing: the order of a combined request and the errors by file type."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from backingfs.fsapi import SetattrRequest
from backingfs.setattr import setattr_backing
from backingfs.syscalls import open_path


def _apply(dir_fd: int, name: bytes, changes: SetattrRequest,
           truncated: list[int] | None = None) -> os.stat_result:
    fd = open_path(dir_fd, name)
    fmt = stat.S_IFMT(os.fstat(fd).st_mode)

    async def truncate(size: int) -> None:
        if truncated is not None:
            truncated.append(size)
        os.truncate(f"/proc/self/fd/{fd}", size)

    try:
        return trio.run(setattr_backing, fd, fmt, changes, truncate)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_mode_after_chown_keeps_setuid_and_times_after_truncate(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    dfd = os.open(tmp_path, os.O_PATH)
    truncated: list[int] = []
    st = _apply(dfd, b"f", SetattrRequest(mode=0o4755, uid=1000, gid=1000, size=10,
                                          atime_ns=1_000_000_000, mtime_ns=2_000_000_000),
                truncated)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    assert truncated == [10] and st.st_size == 10
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    st = _apply(dfd, b"f", SetattrRequest(mtime_ns=5_000_000_000))  # atime left alone
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 5_000_000_000)


def test_errors_by_file_type(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "p")
    os.symlink("d", tmp_path / "l")
    dfd = os.open(tmp_path, os.O_PATH)
    for name, changes, code in ((b"d", SetattrRequest(size=0), errno.EISDIR),
                                (b"p", SetattrRequest(size=0), errno.EINVAL),
                                (b"l", SetattrRequest(mode=0o600), errno.EOPNOTSUPP)):
        with pytest.raises(OSError) as exc:
            _apply(dfd, name, changes)
        assert exc.value.errno == code, name
    st = _apply(dfd, b"l", SetattrRequest(mtime_ns=7_000_000_000))  # the link, not "d"
    assert st.st_mtime_ns == 7_000_000_000
    assert os.stat(tmp_path / "d").st_mtime_ns != 7_000_000_000
