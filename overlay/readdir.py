"""Merged readdir: upper first, first occurrence wins, whiteouts and opaque dirs respected.

A handle's first readdir takes a snapshot (``backingfs.dirents.DirSnapshot``) of the
directory's merged listing in a worker thread; offsets index that snapshot, so a handle's
listing neither skips nor repeats entries while the directory changes, and seekdir/telldir
work. A readdir at
offset 0 after the handle already read (rewinddir) takes a fresh snapshot, as the kernel
rebuilds a stale cache on a seek to 0 (reference §B.9).

The merge reads the directory's backing directories top-down (the inode's ``upper`` then
``lowers``, which namei already cut at the first opaque one) and keeps the first
occurrence of each name; whiteouts (char 0/0, ``.wh.NAME``, the xattr form in ``opaque=x``
directories) hide the name below and are never listed, nor are ``.wh.`` names.

Each entry is built by a real lookup (namei), so it carries one lookup reference and its
d_ino equals st_ino. ``.`` and ``..`` are emitted first, at offsets 1 and 2, like a native
directory (the bridge gives their references back).

Without a handle (``readdir_inode``: the native session with cached listings, fsapi
``handleless_dirs``), a listing from offset 0 takes a snapshot kept on the inode under a
new generation, and every offset handed out carries it (``generation << 32 | position``),
so a continuation, or a seekdir to a telldir value, reads the snapshot it came from, as a
handle would. A few snapshots per directory are kept (concurrent listers) until the inode
is evicted; one of more than _KEEP_READ_MAX entries is dropped once its end was read. An
offset whose snapshot is gone goes on at its position in a fresh snapshot.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

import trio

from backingfs.attrs import Attr
from backingfs.dirents import DOT_ENTRIES, DirSnapshot, fill, reply_dots, scandir_names
from backingfs.fsapi import DirEntry, Entry, ReaddirReply
from backingfs.handles import Handle

from . import whiteout as wo
from .entry import OvlInode
from .inode import make_entry

if TYPE_CHECKING:
    from .superblock import Superblock

DT_CHR = stat.S_IFCHR >> 12
DT_REG = stat.S_IFREG >> 12


class DirHandle(Handle):
    def __init__(self, inode: OvlInode, snapshot: DirSnapshot[int] | None = None) -> None:
        super().__init__(inode, None)
        #: Taken at the first READDIR, not at opendir: with the kernel's directory cache
        #: (fsapi.Filesystem.cache_dirs) most opens never read, and a snapshot of a big
        #: merged directory costs a scan of every layer.
        self.snapshot = snapshot
        self.has_read = False


def merged_names(sb: Superblock, inode: OvlInode) -> list[tuple[bytes, int]]:
    """The visible ``(name, d_type)`` of directory ``inode``, in listing order. Blocking."""
    dirs: list[tuple[int, bool]] = []
    if inode.upper is not None:
        dirs.append((inode.upper, inode.upper_xwhiteouts))
    dirs += [(lower.fd, lower.has_xwhiteouts) for lower in inode.lowers]
    seen: set[bytes] = set()
    out: list[tuple[bytes, int]] = []
    for fd, has_xwh in dirs:
        entries = scandir_names(fd)
        hidden = {name[len(wo.AUFS_PREFIX):] for name, _, _ in entries
                  if wo.is_aufs_name(name)}
        for name, _, d_type in entries:
            if name in seen or wo.is_aufs_name(name):
                continue
            seen.add(name)
            # ``hidden`` (.wh.NAME) hides NAME below this layer only (namei.resolve)
            if d_type in (DT_CHR, 0) or (has_xwh and d_type == DT_REG):
                st = wo.lstat_at(fd, name)
                if st is None or wo.is_whiteout(fd, name, st, sb.prefix, has_xwh):
                    continue
            out.append((name, d_type))
        seen |= hidden
    return out


#: Merged directories whose layer directories total at most this many bytes are listed on
#: the loop: a worker round trip costs more than listing a small cached directory, and most
#: are small. (ext4 directories grow by 4 KiB blocks of ~100-200 names.)
INLINE_DIR_BYTES = 16384


async def snapshot(sb: Superblock, inode: OvlInode) -> DirSnapshot[int]:
    fds = ([inode.upper] if inode.upper is not None else []) + [lw.fd for lw in inode.lowers]
    if sum(os.fstat(fd).st_size for fd in fds) <= INLINE_DIR_BYTES:
        return DirSnapshot(merged_names(sb, inode))
    return DirSnapshot(await trio.to_thread.run_sync(merged_names, sb, inode))


async def opendir(sb: Superblock, inode: OvlInode) -> int:
    if not inode.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory")
    return sb.handles.add(DirHandle(inode))


async def readdir(sb: Superblock, fh: int, off: int, reply: ReaddirReply) -> None:
    handle: DirHandle = sb.handles.get(fh)
    inode = handle.inode
    assert isinstance(inode, OvlInode)
    snap = handle.snapshot
    if snap is None or (off == 0 and handle.has_read):
        snap = handle.snapshot = await snapshot(sb, inode)
    handle.has_read = True
    await _fill_listing(sb, inode, snap, off, reply)


#: Snapshots kept per directory for handle-less listings in progress.
_LISTINGS_KEPT = 4
#: Entries up to which a snapshot read to its end is still kept.
_KEEP_READ_MAX = 4096
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1


async def readdir_inode(sb: Superblock, inode: OvlInode, off: int,
                        reply: ReaddirReply) -> None:
    """``readdir`` of ``inode`` without a handle (module docstring)."""
    if not inode.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory")
    gen, pos = off >> _POS_BITS, off & _POS_MASK
    listings = inode.listings
    snap = listings.get(gen) if listings is not None and off else None
    if snap is None:
        snap = await snapshot(sb, inode)
        listings = inode.listings
        if listings is None:
            listings = inode.listings = {}
        gen = sb.next_listing()
        listings[gen] = snap
        while len(listings) > _LISTINGS_KEPT:
            del listings[next(iter(listings))]   # the oldest
    if pos >= len(snap) + DOT_ENTRIES and len(snap) > _KEEP_READ_MAX:
        # Its end was read (the kernel caches the listing): a big one is not kept for a
        # seekdir after a change, which then reads on in a fresh snapshot.
        listings.pop(gen, None)
    # The generation in the high bits: offsets below 2**32 add to it as they or into it.
    await _fill_listing(sb, inode, snap, pos, reply, gen << _POS_BITS)


async def _fill_listing(sb: Superblock, inode: OvlInode, snap: DirSnapshot[int], off: int,
                        reply: ReaddirReply, base: int = 0) -> None:
    """Dots, then ``snap`` from listing offset ``off`` (dots at 1 and 2); ``base`` is
    added to every offset replied."""
    from .namei import adopt, find_upper, resolve

    def dot_entry(name: bytes) -> Entry | DirEntry:
        target = inode if name == b"." else (inode.parent or inode)
        if sb.bare_dots:
            return DirEntry(name, Entry(Attr(st_ino=target.st_ino, st_mode=stat.S_IFDIR),
                                        0.0, 0.0), 0, bare=True)
        sb.inodes.ref(target.ino)
        return make_entry(sb, target)

    start = reply_dots(off, dot_entry, reply, base)
    if start is None:
        return

    def make(name: bytes, d_type: int) -> Entry:
        known, upper_st = find_upper(sb, inode, name)
        if known is not None:
            child, st = known
        else:
            res = resolve(sb, inode, name, upper_st)
            if not res.exists:
                raise OSError(errno.ENOENT, "vanished", name)
            st = res.st
            child = adopt(sb, inode, name, res)
        try:
            return make_entry(sb, child, st)
        except BaseException:
            sb.inodes.forget(child.ino, 1)
            raise

    await fill(snap, start, make, reply, relieve=sb.inodes.prune_now,
               shift=base + DOT_ENTRIES)


async def releasedir(sb: Superblock, fh: int) -> None:
    await sb.handles.release(fh)


def is_empty(sb: Superblock, inode: OvlInode) -> bool:
    """Whether the directory lists nothing (whiteouts only). Blocking."""
    return not merged_names(sb, inode)


def remove_upper_whiteouts(sb: Superblock, dir_fd: int) -> None:
    """Empty an upper directory that holds only whiteouts (rmdir of a merged directory,
    ``ovl_clear_empty``). Blocking."""
    real = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for name, _, _ in scandir_names(real):
            os.unlink(name, dir_fd=real)
    finally:
        os.close(real)


async def fsyncdir(sb: Superblock, fh: int, datasync: bool) -> None:
    handle: DirHandle = sb.handles.get(fh)
    inode = handle.inode
    assert isinstance(inode, OvlInode)
    await fsyncdir_inode(sb, inode, datasync)


async def fsyncdir_inode(sb: Superblock, inode: OvlInode, datasync: bool) -> None:
    """Sync the upper directory (nothing of ours to sync on a lower layer)."""
    upper = inode.upper
    if upper is None or not sb.sync.is_syncing:
        sb.sync.check_error()
        return

    def sync() -> None:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=upper)
        try:
            sb.sync.sync(fd, datasync)
        finally:
            os.close(fd)

    await trio.to_thread.run_sync(sync)
