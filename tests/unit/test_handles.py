"""HandleTable: fh numbering, EBADF, and release waiting for in-flight I/O before closing."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from backingfs.backing_file import BackingFile
from backingfs.fsapi import ROOT_INO
from backingfs.handles import Handle, HandleTable
from backingfs.inodes import Inode, InodeTable


class EvictRecordingInode(Inode):
    def __init__(self, ino: int, key: object) -> None:
        super().__init__(ino, key)
        self.evicted = False

    def on_evict(self) -> None:
        self.evicted = True


@pytest.fixture
def inodes() -> InodeTable[EvictRecordingInode]:
    return InodeTable(EvictRecordingInode(ROOT_INO, "root"))


@pytest.fixture
def backing_path(tmp_path: Path) -> Path:
    path = tmp_path / "backing"
    path.write_bytes(b"data")
    return path


@pytest.fixture
def opened(backing_path: Path) -> Iterator[list[BackingFile]]:
    """BackingFiles a test opens; any still open at the end are closed."""
    files: list[BackingFile] = []
    yield files
    for file in files:
        while not file.is_closed:
            file.put()


def open_file(path: Path, files: list[BackingFile]) -> BackingFile:
    file = BackingFile.open(str(path), os.O_RDONLY)
    files.append(file)
    return file


def fd_names(fd: int, path: Path) -> bool:
    """Whether ``fd`` is open in this process on ``path``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except FileNotFoundError:
        return False


def lookup(inodes: InodeTable, key: object) -> EvictRecordingInode:
    return inodes.lookup(key, lambda ino: EvictRecordingInode(ino, key))


def test_fh_counts_from_one_and_is_never_reused(inodes: InodeTable) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    inode = lookup(inodes, "a")
    seen: list[int] = []

    async def main() -> None:
        for _ in range(5):
            handle = Handle(inode)
            fh = table.add(handle)
            assert handle.fh == fh and table.get(fh) is handle
            seen.append(fh)
            assert await table.release(fh) is handle

    trio.run(main)
    assert seen == [1, 2, 3, 4, 5]
    assert table.add(Handle(inode)) == 6
    stats = table.statistics()
    assert (stats.handles, stats.opened, stats.released) == (1, 6, 5)


def test_unknown_or_released_fh_is_ebadf(inodes: InodeTable) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    for call in (lambda: table.get(1), lambda: table.begin_io(1)):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF
    fh = table.add(Handle(lookup(inodes, "a")))

    async def main() -> None:
        await table.release(fh)
        with pytest.raises(OSError) as exc:
            await table.release(fh)
        assert exc.value.errno == errno.EBADF

    trio.run(main)
    with pytest.raises(OSError) as exc:
        table.get(fh)
    assert exc.value.errno == errno.EBADF


def test_add_counts_an_open_and_release_may_evict(inodes: InodeTable) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    inode = lookup(inodes, "a")
    fh = table.add(Handle(inode))
    assert inode.opens == 1
    inodes.forget(inode.ino, 1)  # the kernel forgets while the file is open
    assert not inode.evicted
    trio.run(table.release, fh)
    assert inode.opens == 0 and inode.evicted


def test_add_on_evicted_inode_is_estale(inodes: InodeTable) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    inode = lookup(inodes, "a")
    inodes.forget(inode.ino, 1)
    with pytest.raises(OSError) as exc:
        table.add(Handle(inode))
    assert exc.value.errno == errno.ESTALE
    assert len(table) == 0


def test_io_nests_handle_inode_mount(inodes: InodeTable) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    inode = lookup(inodes, "a")
    fh = table.add(Handle(inode))
    handle = table.begin_io(fh)
    assert (handle.io.count, inode.io.count, inodes.io.count) == (1, 1, 1)
    assert table.statistics().in_flight == 1
    handle.io.end_io()
    assert inodes.io.count == 0


OPS = 50


def test_release_waits_for_in_flight_ops_before_closing_fd(
        inodes: InodeTable, backing_path: Path, opened: list[BackingFile]) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    inode = lookup(inodes, "a")
    file = open_file(backing_path, opened)
    fd = file.fd
    fh = table.add(Handle(inode, file))
    handle = table.get(fh)
    inodes.forget(inode.ino, 1)  # only the open keeps the inode now
    ended = 0

    async def op(gate: trio.Event, via_thread: bool) -> None:
        nonlocal ended
        await gate.wait()
        # The request still uses the fd until the moment it ends.
        assert fd_names(fd, backing_path)
        ended += 1
        if via_thread:  # completions may come from worker threads
            await trio.to_thread.run_sync(handle.io.end_io)
        else:
            handle.io.end_io()

    async def main() -> None:
        gates = [trio.Event() for _ in range(OPS)]
        released = trio.Event()

        async def release() -> None:
            assert await table.release(fh) is handle
            assert ended == OPS
            released.set()

        async with trio.open_nursery() as nursery:
            for i, gate in enumerate(gates):
                assert table.begin_io(fh) is handle
                nursery.start_soon(op, gate, i % 5 == 0)
            nursery.start_soon(release)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OSError):  # gone from the table at once
                table.get(fh)
            # Release ops one at a time, in reverse order, checking nothing closed early.
            for gate in reversed(gates):
                assert not released.is_set()
                assert fd_names(fd, backing_path) and inode.opens == 1
                gate.set()
                await trio.testing.wait_all_tasks_blocked()
            await released.wait()
        assert not fd_names(fd, backing_path)
        assert file.is_closed and inode.opens == 0 and inode.evicted
        assert inodes.io.count == 0

    trio.run(main)


def test_cancelled_release_still_drains_and_closes(
        inodes: InodeTable, backing_path: Path, opened: list[BackingFile]) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    file = open_file(backing_path, opened)
    fd = file.fd
    fh = table.add(Handle(lookup(inodes, "a"), file))
    handle = table.begin_io(fh)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def release() -> None:
                with scope:
                    await table.release(fh)
                assert scope.cancelled_caught is False  # shield: ran to completion
                assert file.is_closed

            nursery.start_soon(release)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert fd_names(fd, backing_path)  # cancelled, yet still waiting
            handle.io.end_io()

    trio.run(main)
    assert not fd_names(fd, backing_path)


def test_in_flight_reference_outlives_release(
        inodes: InodeTable, backing_path: Path, opened: list[BackingFile]) -> None:
    """A request holding its own BackingFile reference keeps the fd open past release."""
    table: HandleTable[Handle] = HandleTable(inodes)
    file = open_file(backing_path, opened)
    fh = table.add(Handle(lookup(inodes, "a"), file))
    extra = file.get()
    trio.run(table.release, fh)
    assert fd_names(file.fd, backing_path) and file.refs == 1
    extra.put()
    assert file.is_closed


def test_release_all(inodes: InodeTable, backing_path: Path,
                     opened: list[BackingFile]) -> None:
    table: HandleTable[Handle] = HandleTable(inodes)
    inode = lookup(inodes, "a")
    files = [open_file(backing_path, opened) for _ in range(3)]
    for file in files:
        table.add(Handle(inode, file))
    trio.run(table.release_all)
    assert len(table) == 0 and inode.opens == 0
    assert all(file.is_closed for file in files)
