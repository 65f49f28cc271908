"""DirSnapshot offsets, fill()'s reference handling, and scandir_names()."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from backingfs.attrs import Attr
from backingfs.dirents import DirSnapshot, fill, scandir_names
from backingfs.fsapi import DirEntry, Entry

NAMES = [b"a", b"b", b"c", b"d", b"e"]


def snapshot() -> DirSnapshot[int]:
    return DirSnapshot((name, i) for i, name in enumerate(NAMES))


def entry_for(name: bytes, payload: int) -> DirEntry:
    return DirEntry(name, Entry(Attr(st_ino=100 + payload, st_mode=stat.S_IFREG)), next_off=-1)


class Kernel:
    """A readdir buffer with room for ``room`` entries; records what it accepted."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.accepted: list[DirEntry] = []
        self.rejected: list[DirEntry] = []

    def reply(self, entry: DirEntry) -> bool:
        if len(self.accepted) >= self.room:
            self.rejected.append(entry)
            return False
        self.accepted.append(entry)
        return True


def test_offsets_are_one_based_and_stable() -> None:
    snap = snapshot()
    items = list(snap.entries_from(0))
    assert [i.name for i in items] == NAMES
    assert [i.next_off for i in items] == [1, 2, 3, 4, 5]
    # telldir after "c" is 3; seeking back there resumes at "d", however often.
    assert [i.name for i in snap.entries_from(3)] == [b"d", b"e"]
    assert [i.name for i in snap.entries_from(1)] == NAMES[1:]
    assert [i.name for i in snap.entries_from(3)] == [b"d", b"e"]
    assert list(snap.entries_from(5)) == [] and list(snap.entries_from(99)) == []
    with pytest.raises(ValueError):
        list(snap.entries_from(-1))


def test_snapshot_does_not_follow_its_source(tmp_path: Path) -> None:
    for name in ("x", "y", "z"):
        (tmp_path / name).touch()
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        snap = DirSnapshot((name, d_ino) for name, d_ino, _ in sorted(scandir_names(fd)))
        first = [i.name for i in snap.entries_from(1)]
        (tmp_path / "a").touch()  # sorts first: would shift every later offset
        (tmp_path / "y").unlink()
        assert [i.name for i in snap.entries_from(1)] == first == [b"y", b"z"]
    finally:
        os.close(fd)


def test_dots_and_str_names_refused() -> None:
    for bad in (b".", b".."):
        with pytest.raises(ValueError):
            DirSnapshot([(b"a", 0), (bad, 1)])
    with pytest.raises(ValueError):
        DirSnapshot([("a", 0)])  # type: ignore[list-item]


def test_fill_stops_at_first_rejection_and_sets_next_off() -> None:
    snap = snapshot()
    made: list[bytes] = []

    def make(name: bytes, payload: int) -> DirEntry:
        made.append(name)  # each call takes one lookup reference
        return entry_for(name, payload)

    kernel = Kernel(room=2)
    assert trio.run(fill, snap, 1, make, kernel.reply) == 2
    assert [e.name for e in kernel.accepted] == [b"b", b"c"]
    assert [e.next_off for e in kernel.accepted] == [2, 3]
    # One entry was made and refused: its reference is the caller's to give back.
    assert [e.name for e in kernel.rejected] == [b"d"] and made == [b"b", b"c", b"d"]
    # Resume at the last accepted entry's next_off: nothing skipped or repeated.
    rest = Kernel(room=10)
    assert trio.run(fill, snap, kernel.accepted[-1].next_off, make, rest.reply) == 2
    assert [e.name for e in rest.accepted] == [b"d", b"e"]
    assert [e.next_off for e in rest.accepted] == [4, 5]


def test_fill_awaits_async_make_entry() -> None:
    async def make(name: bytes, payload: int) -> DirEntry:
        await trio.lowlevel.checkpoint()
        return entry_for(name, payload)

    kernel = Kernel(room=10)
    assert trio.run(fill, snapshot(), 0, make, kernel.reply) == len(NAMES)
    assert [e.entry.ino for e in kernel.accepted] == [100, 101, 102, 103, 104]


def test_fill_skips_vanished_entries() -> None:
    def make(name: bytes, payload: int) -> DirEntry:
        if name == b"b":
            raise OSError(errno.ENOENT, "gone")
        return entry_for(name, payload)

    kernel = Kernel(room=10)
    assert trio.run(fill, snapshot(), 0, make, kernel.reply) == 4
    assert [(e.name, e.next_off) for e in kernel.accepted][:2] == [(b"a", 1), (b"c", 3)]


def test_fill_error_raised_only_before_any_output() -> None:
    def failing_at(bad: bytes):
        def make(name: bytes, payload: int) -> DirEntry:
            if name == bad:
                raise OSError(errno.EIO, "backing error")
            return entry_for(name, payload)
        return make

    kernel = Kernel(room=10)
    with pytest.raises(OSError) as exc:
        trio.run(fill, snapshot(), 0, failing_at(b"a"), kernel.reply)
    assert exc.value.errno == errno.EIO and kernel.accepted == []
    # After partial output an error reply would drop delivered references: stop instead.
    assert trio.run(fill, snapshot(), 0, failing_at(b"c"), kernel.reply) == 2


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("nowhere")
    os.mkfifo(tmp_path / "fifo")
    os.mknod(tmp_path / "whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (tmp_path / "caf\xe9").touch()
    bad = os.fsencode(tmp_path) + b"/bad\xff"  # not valid UTF-8
    os.close(os.open(bad, os.O_CREAT | os.O_WRONLY, 0o600))
    yield tmp_path


@pytest.mark.parametrize("open_flags", [os.O_PATH, os.O_RDONLY])
def test_scandir_names(tree: Path, open_flags: int) -> None:
    fd = os.open(tree, open_flags | os.O_DIRECTORY)
    try:
        if open_flags == os.O_RDONLY:
            pos = os.lseek(fd, 0, os.SEEK_CUR)
        listing = scandir_names(fd)
        listing2 = scandir_names(fd)
        os.fstat(fd)  # still open
        if open_flags == os.O_RDONLY:
            assert os.lseek(fd, 0, os.SEEK_CUR) == pos  # caller's offset untouched
    finally:
        os.close(fd)
    assert sorted(listing) == sorted(listing2)
    by_name = {name: (d_ino, d_type) for name, d_ino, d_type in listing}
    assert set(by_name) == {b"file", b"dir", b"link", b"fifo", b"whiteout",
                            "caf\xe9".encode(), b"bad\xff"}
    for name, (d_ino, d_type) in by_name.items():
        st = os.lstat(os.fsencode(tree) + b"/" + name)
        assert d_ino == st.st_ino
        assert d_type == stat.S_IFMT(st.st_mode) >> 12, name


def test_scandir_names_leaks_no_fd(tree: Path) -> None:
    fd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        for _ in range(20):
            scandir_names(fd)
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)


def test_reply_dots_from_each_offset_and_a_full_buffer() -> None:
    from backingfs.attrs import Attr
    from backingfs.dirents import DOT_ENTRIES, reply_dots
    from backingfs.fsapi import Entry

    made: list[bytes] = []

    def dot_entry(name: bytes) -> Entry:
        made.append(name)
        return Entry(Attr(st_ino=1, st_mode=0o40755))

    got: list[tuple[bytes, int]] = []
    assert reply_dots(0, dot_entry, lambda e: got.append((e.name, e.next_off)) or True) == 0
    assert got == [(b".", 1), (b"..", 2)] and made == [b".", b".."]
    got.clear()
    made.clear()
    assert reply_dots(1, dot_entry, lambda e: got.append((e.name, e.next_off)) or True) == 0
    assert got == [(b"..", 2)] and made == [b".."]
    assert reply_dots(DOT_ENTRIES + 5, dot_entry, lambda e: True) == 5
    made.clear()
    assert reply_dots(0, dot_entry, lambda e: False) is None  # buffer full at "."
    assert made == [b"."]  # made once; the bridge gives back the rejected reference
