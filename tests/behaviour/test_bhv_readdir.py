"""readdir: large directories, telldir/seekdir positions, d_ino == st_ino, d_type, freshness."""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


class _Dirent(ctypes.Structure):
    # glibc's struct dirent on 64-bit Linux (== dirent64).
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.seekdir.restype = None
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.rewinddir.restype = None
_libc.closedir.argtypes = [ctypes.c_void_p]


class Dir:
    """libc's DIR stream, for the positions os.scandir does not expose."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def read(self, n: int | None = None) -> list[tuple[str, int, int]]:
        """Up to ``n`` (default: all remaining) entries as (name, d_ino, d_type)."""
        out: list[tuple[str, int, int]] = []
        while n is None or len(out) < n:
            ctypes.set_errno(0)
            ent = _libc.readdir(self.handle)
            if not ent:
                err = ctypes.get_errno()
                if err:
                    raise OSError(err, os.strerror(err))
                break
            d = ent.contents
            out.append((os.fsdecode(d.d_name), d.d_ino, d.d_type))
        return out

    def tell(self) -> int:
        return _libc.telldir(self.handle)

    def seek(self, pos: int) -> None:
        _libc.seekdir(self.handle, pos)

    def rewind(self) -> None:
        _libc.rewinddir(self.handle)


@contextmanager
def opendir(path: Path) -> Iterator[Dir]:
    handle = _libc.opendir(os.fsencode(path))
    if not handle:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    try:
        yield Dir(handle)
    finally:
        _libc.closedir(handle)


N = 10_000


@pytest.mark.timeout(120)  # 10,000 creates through FUSE on a loaded 2-core machine
def test_readdir_10000_entries_seekdir_telldir(fs: Path) -> None:
    big = fs / "big"
    big.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(N)}
    for name in names:
        os.close(os.open(big / name, os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(big)) == names

    with opendir(big) as d:
        first = d.read(3001)
        pos = d.tell()
        rest = d.read()
        listed = [n for n, _, _ in first + rest]
        assert sorted(listed) == sorted(names | {".", ".."})  # each name exactly once
        # A position taken mid-listing gives back the same remaining entries.
        d.seek(pos)
        assert d.read() == rest
        d.seek(pos)
        again = d.read(500)
        assert again == rest[:500]
        # A position from the first batch still works after reading past it.
        d.rewind()
        d.read(1234)
        mid = d.tell()
        d.read(50)
        d.seek(mid)
        assert d.read() == (first + rest)[1234:]
        d.rewind()
        assert d.read() == first + rest


def test_readdir_dot_entries_and_types(fs: Path) -> None:
    os.mkdir(fs / "d")
    d = fs / "d"
    (d / "file").write_bytes(b"")
    os.mkdir(d / "sub")
    os.symlink("file", d / "link")
    os.mkfifo(d / "fifo")
    with opendir(d) as dd:
        entries = {name: (ino, dtype) for name, ino, dtype in dd.read()}
    assert sorted(entries) == [".", "..", "fifo", "file", "link", "sub"]
    types = {"file": 8, "sub": 4, "link": 10, "fifo": 1}  # DT_REG, DT_DIR, DT_LNK, DT_FIFO
    for name, dtype in types.items():
        assert entries[name][1] == dtype, name
        assert entries[name][0] == os.lstat(d / name).st_ino, name
    assert entries["."][0] == os.stat(d).st_ino
    # The dots too: a directory, and ".." is the parent (FUSE lists them bare: their d_ino
    # and type are all there is of them).
    assert entries["."][1] == entries[".."][1] == 4
    assert entries[".."][0] == os.stat(fs).st_ino


def test_d_ino_matches_st_ino(fs: Path) -> None:
    os.mkdir(fs / "sub")
    for i in range(50):
        (fs / f"f{i}").write_bytes(b"x" * i)
    os.symlink("f1", fs / "link")
    os.link(fs / "f2", fs / "hard")
    seen = 0
    with os.scandir(fs) as it:
        for entry in it:
            st = os.lstat(entry.path)
            assert entry.inode() == st.st_ino, entry.name
            assert entry.is_dir(follow_symlinks=False) == stat.S_ISDIR(st.st_mode)
            assert entry.is_symlink() == stat.S_ISLNK(st.st_mode)
            seen += 1
    assert seen == 53
    assert os.lstat(fs / "hard").st_ino == os.lstat(fs / "f2").st_ino


def test_readdir_sees_changes_at_once(fs: Path) -> None:
    assert os.listdir(fs) == []
    (fs / "a").write_bytes(b"")
    assert os.listdir(fs) == ["a"]
    os.rename(fs / "a", fs / "b")
    assert os.listdir(fs) == ["b"]
    os.mkdir(fs / "c")
    assert sorted(os.listdir(fs)) == ["b", "c"]
    os.unlink(fs / "b")
    os.rmdir(fs / "c")
    assert os.listdir(fs) == []


def test_readdir_while_unlinking(fs: Path) -> None:
    # The rm -rf pattern: remove each entry as it is listed; none is listed twice or missed.
    names = {f"n{i}" for i in range(300)}
    for name in names:
        (fs / name).write_bytes(b"")
    removed: list[str] = []
    with opendir(fs) as d:
        while batch := d.read(1):
            name = batch[0][0]
            if name not in (".", ".."):
                os.unlink(fs / name)
                removed.append(name)
    assert sorted(removed) == sorted(names)
    assert os.listdir(fs) == []
