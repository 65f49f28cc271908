"""getdents.iter_from: a listing from any cookie, by the backing filesystem's own d_off."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from backingfs import getdents

pytestmark = pytest.mark.skipif(not getdents.supported(), reason="getdents64 number unknown")


def listing(path: Path, off: int = 0, bufsize: int = getdents.BUFSIZE) -> list[getdents.Dirent]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return list(getdents.iter_from(fd, off, bufsize))
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["ext4", "tmpfs"])
def test_every_cookie_resumes_right_after_its_entry(tmp_path: Path, where: str) -> None:
    base = tmp_path if where == "ext4" else Path("/dev/shm")
    d = base / f"getdents-{os.getpid()}"
    d.mkdir()
    try:
        names = {f"entry-{i:05d}-{'x' * (i % 40)}".encode() for i in range(2000)}
        for n in names:
            (d / os.fsdecode(n)).touch()
        (d / "sub").mkdir()
        # a small buffer: many getdents calls, entries split across them
        full = listing(d, bufsize=512)
        assert sorted(e.name for e in full) == sorted(names | {b".", b"..", b"sub"})
        by_name = {e.name: e for e in full}
        assert by_name[b"sub"].dtype == 4 and by_name[b"entry-00001-x"].dtype == 8
        assert by_name[b"sub"].ino == os.stat(d / "sub").st_ino
        assert len({e.next_off for e in full}) == len(full)   # cookies are unique
        for i in (0, 1, 2, 977, len(full) - 2, len(full) - 1):
            rest = listing(d, full[i].next_off)
            assert [e.name for e in rest] == [e.name for e in full[i + 1:]]
    finally:
        for p in d.iterdir():
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()


def test_errors_are_oserrors(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            list(getdents.iter_from(fd, 0))
        assert exc.value.errno == errno.ENOTDIR
    finally:
        os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    with pytest.raises(OSError) as exc:
        list(getdents.iter_from(fd, 0))
    assert exc.value.errno == errno.EBADF
