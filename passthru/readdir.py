"""DirHandle and the directory-handle operations: opendir/readdir(plus)/releasedir/fsyncdir.

Each open directory lists one ``DirSnapshot`` of its SOURCE directory, taken at the first
readdir (and again at a rewind: a readdir from offset 0 after entries were delivered), so
offsets stay valid for seekdir/telldir while the directory changes.

Offsets: ``.`` and ``..`` come first, as in a native listing (``ls -a``), with offsets 1 and
2; snapshot entry ``i`` then has offset ``i + 3``. ``dirents.DirSnapshot`` refuses the dots
(the kernel takes no lookup reference for them), so they are emitted here, each carrying a
reference like any entry, which the bridge gives back. ``..`` of the root is the root.

Every other entry is a readdirplus entry: a lookup reference and the attributes from an
O_PATH open and fstat of the name, so ``d_ino == st_ino`` and the kernel needs no LOOKUP
afterwards. The per-entry syscalls of a big batch run in one worker thread (a big cold
directory must not stall the loop; small ones run inline, see _INLINE_*); the table
references are then taken on the loop, one per entry handed to ``reply``, and the fds of
entries that did not fit are closed. An entry that vanished since the snapshot is
skipped. The batch size follows how many entries the kernel's buffer took last time, so
little work is thrown away.
"""

from __future__ import annotations

import errno
import os
import stat
from itertools import islice
from typing import TYPE_CHECKING

import trio

from backingfs import syscalls
from backingfs.dirents import DOT_ENTRIES, DirItem, DirSnapshot, reply_dots, scandir_names
from backingfs.fsapi import Caller, DirEntry, Entry, ReaddirReply
from backingfs.handles import Handle

from .inode import PassthruInode, install, lookup_fd, make_entry

if TYPE_CHECKING:
    from .superblock import PassthruFs


_MIN_BATCH = 16
_MAX_BATCH = 1024

#: Small directories are listed, and small batches prepared, on the loop thread: a worker
#: round trip costs more than a few dozen openat+fstat calls on cached inodes, and most
#: directories are small. Bigger ones go to a worker so a cold, huge directory cannot stall
#: every other request. (ext4 directories grow by 4 KiB blocks of ~100-200 names.)
_INLINE_DIR_BYTES = 16384
_INLINE_BATCH = 64

#: One entry prepared in a worker: (O_PATH fd, stat) or the OSError it gave.
_Prepared = tuple[int, os.stat_result] | OSError


class DirHandle(Handle):
    """An open directory: its snapshot (None until the first readdir)."""

    inode: PassthruInode

    def __init__(self, inode: PassthruInode) -> None:
        super().__init__(inode, None)
        self.snapshot: DirSnapshot[None] | None = None
        self.is_delivered = False  # entries were replied from this snapshot
        self.batch = 32  # entries to prepare per worker round; tuned by readdir


async def opendir(fs: PassthruFs, ino: int, caller: Caller) -> int:
    inode = fs.live(ino)
    if inode.fmt != stat.S_IFDIR:
        raise OSError(errno.ENOTDIR, "not a directory")
    return fs.handles.add(DirHandle(inode))


def _prepare(dir_fd: int, names: list[bytes]) -> list[_Prepared]:
    """Worker: O_PATH open and fstat each name (never raises)."""
    out: list[_Prepared] = []
    for name in names:
        try:
            fd = syscalls.open_path(dir_fd, name)
        except OSError as e:
            out.append(e)
            continue
        try:
            out.append((fd, os.fstat(fd)))
        except OSError as e:
            os.close(fd)
            out.append(e)
    return out


def _close_prepared(prepared: list[_Prepared]) -> None:
    for p in prepared:
        if not isinstance(p, OSError):
            os.close(p[0])


async def readdir(fs: PassthruFs, fh: int, off: int, reply: ReaddirReply) -> None:
    handle: DirHandle = fs.handles.get(fh)
    inode = fs.live(handle.inode.ino)
    if handle.snapshot is None or (off == 0 and handle.is_delivered):
        if os.fstat(inode.fd).st_size <= _INLINE_DIR_BYTES:
            names = scandir_names(inode.fd)
        else:
            names = await trio.to_thread.run_sync(scandir_names, inode.fd)
        handle.snapshot = DirSnapshot((name, None) for name, _, _ in names)
        handle.is_delivered = False
    snapshot = handle.snapshot

    def dot_entry(name: bytes) -> Entry:
        fd, st = lookup_fd(fs, inode, name)
        handle.is_delivered = True
        return make_entry(fs, install(fs, fd, st), st)

    start = reply_dots(off, dot_entry, reply)
    if start is None:
        return
    accepted = DOT_ENTRIES - min(off, DOT_ENTRIES)
    items = snapshot.entries_from(start)
    batch_size = handle.batch
    while True:
        batch: list[DirItem[None]] = list(islice(items, batch_size))
        if not batch:
            break
        names = [item.name for item in batch]
        if len(names) <= _INLINE_BATCH:
            prepared = _prepare(inode.fd, names)
        else:
            prepared = await trio.to_thread.run_sync(_prepare, inode.fd, names)
        for i, (item, p) in enumerate(zip(batch, prepared, strict=True)):
            if isinstance(p, OSError):
                if p.errno == errno.ENOENT:
                    continue  # vanished since the snapshot
                _close_prepared(prepared[i + 1:])
                if accepted == 0:
                    raise p
                return  # an errno now would lose the references already delivered
            fd, st = p
            try:
                entry_inode = install(fs, fd, st)
            except BaseException:
                _close_prepared(prepared[i + 1:])
                raise
            handle.is_delivered = True
            if not reply(DirEntry(item.name, make_entry(fs, entry_inode, st),
                                  item.next_off + DOT_ENTRIES)):
                # The kernel's buffer is full; the bridge gives back this reference.
                _close_prepared(prepared[i + 1:])
                handle.batch = min(max(accepted + 1, _MIN_BATCH), _MAX_BATCH)
                return
            accepted += 1
        batch_size = min(batch_size * 2, _MAX_BATCH)


async def releasedir(fs: PassthruFs, fh: int) -> None:
    await fs.handles.release(fh)


async def fsyncdir(fs: PassthruFs, fh: int, datasync: bool) -> None:
    handle = fs.handles.begin_io(fh)
    try:
        await trio.to_thread.run_sync(_fsync_dir, handle.inode.fd, datasync)
    finally:
        handle.io.end_io()


def _fsync_dir(fd: int, datasync: bool) -> None:
    dfd = syscalls.reopen(fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (os.fdatasync if datasync else os.fsync)(dfd)
    finally:
        os.close(dfd)
