"""Merged readdir: order, dedupe, whiteouts, stable offsets, d_ino == st_ino, dots."""

from __future__ import annotations

import ctypes
import os

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(60)


def test_merge_first_occurrence_wins(ovl: OvlLayers) -> None:
    (ovl.lower2 / "same").write_text("bottom")
    (ovl.lower2 / "b2").write_text("x")
    (ovl.lower1 / "same").write_text("top")
    (ovl.lower1 / "b1").write_text("x")
    (ovl.upper / "u").write_text("x")
    mnt = ovl.mount()
    names = os.listdir(mnt)
    assert sorted(names) == ["b1", "b2", "same", "u"]
    assert len(names) == len(set(names))
    assert (mnt / "same").read_text() == "top"


def test_d_ino_equals_st_ino_and_dots(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    (ovl.lower1 / "d" / "a").write_text("x")
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "b").write_text("y")
    mnt = ovl.mount()
    (mnt / "d" / "c").write_text("z")
    with os.scandir(mnt / "d") as it:
        entries = {e.name: e.inode() for e in it}
    assert sorted(entries) == ["a", "b", "c"]
    for name, ino in entries.items():
        assert os.lstat(mnt / "d" / name).st_ino == ino
    # "." and ".." come through getdents like on a native directory
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(os.fsencode(mnt / "d"))
    names = []
    while True:
        ent = libc.readdir(d)
        if not ent:
            break
        names.append(ctypes.string_at(ent + 19))
    libc.closedir(d)
    assert b"." in names and b".." in names


def test_offsets_stable_while_directory_changes(ovl: OvlLayers) -> None:
    for i in range(300):
        (ovl.lower1 / f"f{i:03d}").write_text("x")
    mnt = ovl.mount()
    libc = _libc_dirs()
    d = libc.opendir(os.fsencode(mnt))

    def next_name() -> bytes | None:
        ent = libc.readdir(d)
        return None if not ent else ctypes.string_at(ent + 19)

    first = [next_name() for _ in range(100)]
    pos = libc.telldir(d)
    tail = []
    while (n := next_name()) is not None:
        tail.append(n)
    # the directory changes under the open handle; seekdir back into the middle
    deleted = {b"f%03d" % i for i in range(0, 300, 3)}
    for name in deleted:
        os.unlink(mnt / os.fsdecode(name))
    (mnt / "zz-new").write_text("n")
    libc.seekdir(d, pos)
    again = []
    while (n := next_name()) is not None:
        again.append(n)
    libc.closedir(d)
    # the same listing from the same offset: nothing repeated, nothing new; removed names
    # may or may not be listed (POSIX leaves it unspecified; the kernel's directory cache,
    # FOPEN_CACHE_DIR, still lists them, as it does on fuse-overlayfs)
    assert [n for n in again if n not in deleted] == [n for n in tail if n not in deleted]
    assert len(again) == len(set(again)) and set(again) <= set(tail)
    seen = [n for n in first + tail if n not in (b".", b"..")]
    assert len(seen) == len(set(seen)) == 300


def _libc_dirs() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    return libc


def _read_all(libc: ctypes.CDLL, d: int, limit: int | None = None) -> list[bytes]:
    out = []
    while limit is None or len(out) < limit:
        ent = libc.readdir(d)
        if not ent:
            break
        out.append(ctypes.string_at(ent + 19))
    return out


def test_native_session_lists_merged_directories_without_handles(ovl: OvlLayers) -> None:
    # One OPENDIR answered ENOSYS, then none (nor RELEASEDIR); a listing's offsets carry
    # its snapshot's generation, so a lister that seeks back after another lister and a
    # change reads on in its own snapshot, as with a handle.
    for i in range(200):
        (ovl.lower1 / f"a{i:03d}").write_text("x")
        (ovl.lower2 / f"b{i:03d}").write_text("x")
    mnt = ovl.mount("session=native")
    libc = _libc_dirs()
    first = libc.opendir(os.fsencode(mnt))
    head = _read_all(libc, first, 150)
    pos = libc.telldir(first)
    tail = _read_all(libc, first)
    assert len(set(head + tail)) == len(head + tail) == 402
    gone = {b"a000", b"a001", b"a002"}   # ahead of pos: a fresh snapshot would shift it
    for name in gone:
        os.unlink(mnt / os.fsdecode(name))  # the kernel's cached listing is dropped
    second = libc.opendir(os.fsencode(mnt))
    listed = _read_all(libc, second)   # a new snapshot: the change is seen
    libc.closedir(second)
    assert not gone & set(listed) and len(listed) == 399
    libc.seekdir(first, pos)
    again = _read_all(libc, first)
    libc.closedir(first)
    assert again == tail
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)   # FSYNCDIR without a handle
    finally:
        os.close(dfd)
    requests = ovl.mounts[-1].session_statistics()["requests"]
    assert requests.get("OPENDIR") == 1 and "RELEASEDIR" not in requests, requests
    assert requests.get("FSYNCDIR") == 1, requests


def test_whiteouts_and_wh_files_never_listed(ovl: OvlLayers) -> None:
    (ovl.lower2 / "a").write_text("a")
    (ovl.lower2 / "b").write_text("b")
    os.mknod(ovl.lower1 / "a", 0o020000, 0)
    (ovl.lower1 / ".wh.b").write_text("")
    mnt = ovl.mount()
    assert os.listdir(mnt) == []
    (mnt / "c").write_text("c")
    os.unlink(mnt / "c")
    assert os.listdir(mnt) == []


def test_static_nlink_and_merged_nlink(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    (ovl.lower2 / "d").mkdir()
    (ovl.lower1 / "single").mkdir()
    (ovl.lower1 / "single" / "sub").mkdir()
    mnt = ovl.mount()
    assert os.stat(mnt / "d").st_nlink == 1
    assert os.stat(mnt / "single").st_nlink == 3
