"""Directory listing: with a handle (opendir/readdir(plus)/releasedir/fsyncdir) or without.

Without a handle (``readdir_inode``, ``fsyncdir_inode``: the native session with cached
listings, fsapi ``handleless_dirs``), every call opens the SOURCE directory, seeks to the
offset and reads on with getdents64: offsets are SOURCE's own d_off cookies, as stable
under changes as SOURCE's telldir values, and the kernel sends no OPENDIR/RELEASEDIR.

With a handle (the pyfuse3 front-end, and cache=never, where the kernel must not keep
listings), each open directory lists one ``DirSnapshot`` of its SOURCE directory, taken at
the first readdir (and again at a rewind: a readdir from offset 0 after entries were
delivered), so offsets stay valid for seekdir/telldir while the directory changes.

Offsets: ``.`` and ``..`` come first, as in a native listing (``ls -a``), with offsets 1 and
2; snapshot entry ``i`` then has offset ``i + 3``. ``dirents.DirSnapshot`` refuses the dots
(the kernel takes no lookup reference for them), so they are emitted here, each carrying a
reference like any entry, which the bridge gives back. ``..`` of the root is the root.

Every other entry is a readdirplus entry (bare ones apart, see below): a lookup reference
and the attributes from an
O_PATH open and fstat of the name, so ``d_ino == st_ino`` and the kernel needs no LOOKUP
afterwards. The per-entry syscalls of a big batch run in one worker thread (a big cold
directory must not stall the loop; small ones run inline, see _INLINE_*); the table
references are then taken on the loop, one per entry handed to ``reply``, and the fds of
entries that did not fit are closed. An entry that vanished since the snapshot is
skipped. The batch size follows how many entries the kernel's buffer took last time, so
little work is thrown away.

Out of file descriptors (EMFILE/ENFILE: every inode the kernel holds costs an O_PATH fd,
so a directory bigger than RLIMIT_NOFILE cannot give each entry one), an entry is made
without one: the inode the kernel already holds for it, or a bare entry (name, d_ino and
type; node id 0, so the kernel instantiates nothing and looks the name up when it needs
it). The listing completes instead of failing, and the table asks the kernel to prune
old inodes (inodes.py), so the names after it get inodes again once their FORGETs arrive.
"""

from __future__ import annotations

import errno
import os
import stat
from itertools import islice
from typing import TYPE_CHECKING

import trio

from backingfs import fdpressure, getdents, syscalls
from backingfs.attrs import Attr
from backingfs.dirents import (
    DOT_ENTRIES,
    DOTS,
    DirItem,
    DirSnapshot,
    reply_dots,
    scandir_names,
)
from backingfs.fsapi import Caller, DirEntry, Entry, ReaddirReply
from backingfs.handles import Handle

from .inode import PassthruInode, install, lookup_fd, make_entry, take_known

if TYPE_CHECKING:
    from .superblock import PassthruFs


_MIN_BATCH = 16
_MAX_BATCH = 1024
#: About how many readdirplus entries fill the kernel's reply page (a 152-byte head and
#: the name each): the first batch of a handle-less call, which may resume anywhere.
_PLUS_PER_REPLY = 24

#: Small directories are listed, and small batches prepared, on the loop thread: a worker
#: round trip costs more than a few dozen openat+fstat calls on cached inodes, and most
#: directories are small. Bigger ones go to a worker so a cold, huge directory cannot stall
#: every other request. (ext4 directories grow by 4 KiB blocks of ~100-200 names.)
_INLINE_DIR_BYTES = 16384
_INLINE_BATCH = 64

#: One entry prepared in a worker: (O_PATH fd, stat) or the OSError it gave. Fd -1: the
#: daemon is out of file descriptors, the stat is of the name (``_without_fd``). Fd KNOWN:
#: the table had an inode for the object when it was stat'ed, no fd was opened.
_Prepared = tuple[int, os.stat_result] | OSError
KNOWN = -2

#: Out of file descriptors (the process's, or the system's).
_NO_FDS = (errno.EMFILE, errno.ENFILE)


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


def _prepare(fs: PassthruFs, dir_fd: int, names: list[bytes]) -> list[_Prepared]:
    """Worker: stat each name, and O_PATH open the ones the table has no inode for
    (never raises; the others get fd KNOWN, see inode.take_known)."""
    out: list[_Prepared] = []
    find = fs.inodes.find
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            out.append(e)
            continue
        if find((st.st_dev, st.st_ino)) is not None:
            out.append((KNOWN, st))
            continue
        try:
            fd = syscalls.open_path(dir_fd, name)
        except OSError as e:
            out.append((-1, st) if e.errno in _NO_FDS else e)  # the stat above stands in
            continue
        try:
            out.append((fd, os.fstat(fd)))
        except OSError as e:
            os.close(fd)
            out.append(e)
    return out


def _close_prepared(prepared: list[_Prepared]) -> None:
    for p in prepared:
        if not isinstance(p, OSError) and p[0] >= 0:
            os.close(p[0])


def _without_fd(fs: PassthruFs, name: bytes, st: os.stat_result) -> Entry | DirEntry:
    """The entry of ``name`` (stat ``st``) when no fd is left to make it an inode of its
    own: the inode the kernel already holds for the object, with one more reference, or
    else a bare entry (no inode, no reference: the kernel looks the name up when it needs
    it, and the listing goes on; d_ino is the st_ino that lookup will most likely give)."""
    fs.inodes.prune_now()   # so that the names after this one get inodes again
    known = fs.inodes.find((st.st_dev, st.st_ino))
    if known is not None:
        fs.inodes.ref(known.ino)
        return make_entry(fs, known, st)
    attr = Attr(st_ino=st.st_ino, st_mode=stat.S_IFMT(st.st_mode))
    return DirEntry(name, Entry(attr, 0.0, 0.0), 0, bare=True)


def _dot_entry(fs: PassthruFs, inode: PassthruInode, name: bytes) -> Entry | DirEntry:
    """The entry of ``.`` or ``..`` in ``inode``: bare when the front-end allows it (its
    d_ino is all the kernel uses), else with a reference (the front-end gives it back: the
    kernel counts none for the dots). ``..`` of the root is the root, as at the root of a
    mounted filesystem."""
    if fs.bare_dots:
        if name == b"." or inode is fs.inodes.root:
            ino = inode.ino
        else:
            st = os.stat(name, dir_fd=inode.fd, follow_symlinks=False)
            known = fs.inodes.find((st.st_dev, st.st_ino))
            ino = st.st_ino if known is None else known.ino
        return DirEntry(name, Entry(Attr(st_ino=ino, st_mode=stat.S_IFDIR), 0.0, 0.0), 0,
                        bare=True)
    if name == b"." or inode is fs.inodes.root:  # the inode itself: no fd to open
        st = os.fstat(inode.fd)
        fs.inodes.ref(inode.ino)
        return make_entry(fs, inode, st)
    st = os.stat(name, dir_fd=inode.fd, follow_symlinks=False)
    known = take_known(fs, st)
    if known is not None:
        return make_entry(fs, known, st)
    try:
        fd, st = lookup_fd(fs, inode, name)
    except OSError as e:
        if e.errno not in _NO_FDS:
            raise
        return _without_fd(fs, name, os.stat(name, dir_fd=inode.fd, follow_symlinks=False))
    return make_entry(fs, install(fs, fd, st), st)


def _made_entry(fs: PassthruFs, parent: PassthruInode, name: bytes,
                p: tuple[int, os.stat_result], next_off: int) -> DirEntry | None:
    """The DirEntry of a prepared name: its inode (taking over the fd), with a reference;
    None if the name is gone."""
    fd, st = p
    if fd == KNOWN:
        known = take_known(fs, st)
        if known is not None:
            return DirEntry(name, make_entry(fs, known, st), next_off)
        # Forgotten since (or a recycled number): the name is opened after all.
        try:
            fd, st = lookup_fd(fs, parent, name)
        except FileNotFoundError:
            return None  # removed since: listed as the ones gone before the stat
        except OSError as e:
            if e.errno not in _NO_FDS:
                raise
            fd = -1
    made = _without_fd(fs, name, st) if fd < 0 else make_entry(fs, install(fs, fd, st), st)
    return (made._replace(next_off=next_off) if isinstance(made, DirEntry)
            else DirEntry(name, made, next_off))


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

    def dot_entry(name: bytes) -> Entry | DirEntry:
        handle.is_delivered = True
        return _dot_entry(fs, inode, name)

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
            prepared = _prepare(fs, inode.fd, names)
        else:
            prepared = await trio.to_thread.run_sync(_prepare, fs, inode.fd, names)
        for i, (item, p) in enumerate(zip(batch, prepared, strict=True)):
            if isinstance(p, OSError):
                if p.errno == errno.ENOENT:
                    continue  # vanished since the snapshot
                _close_prepared(prepared[i + 1:])
                if accepted == 0:
                    raise p
                return  # an errno now would lose the references already delivered
            try:
                d = _made_entry(fs, inode, item.name, p, item.next_off + DOT_ENTRIES)
            except BaseException:
                _close_prepared(prepared[i + 1:])
                raise
            if d is None:
                continue
            handle.is_delivered = True
            if not reply(d):
                # The kernel's buffer is full; the bridge gives back this reference.
                _close_prepared(prepared[i + 1:])
                handle.batch = min(max(accepted + 1, _MIN_BATCH), _MAX_BATCH)
                return
            accepted += 1
        batch_size = min(batch_size * 2, _MAX_BATCH)


async def readdir_inode(fs: PassthruFs, ino: int, off: int, reply: ReaddirReply) -> None:
    """List directory ``ino`` from the backing fs's cookie ``off`` (fsapi handleless_dirs).

    Each call opens the directory, seeks to ``off`` and reads on, so offsets are the backing
    fs's ``d_off`` cookies (getdents.py) and a listing resumed after a full buffer, or at a
    telldir value, neither skips nor repeats entries while the directory changes, as on
    the backing fs itself. ``.`` and ``..`` come where the backing fs lists them."""
    inode = fs.live(ino)
    if inode.fmt != stat.S_IFDIR:
        raise OSError(errno.ENOTDIR, "not a directory")
    flags = os.O_RDONLY | os.O_DIRECTORY
    try:
        dfd = syscalls.reopen(inode.fd, flags)
    except OSError as e:
        if e.errno not in fdpressure.NO_FDS:
            raise
        # Nothing listed yet: wait for the FORGETs of a prune, as a lookup does.
        dfd = await fdpressure.retry(fs.inodes.prune_now,
                                     lambda: syscalls.reopen(inode.fd, flags), e)
    try:
        await _fill_from(fs, inode, dfd, off, reply)
    finally:
        os.close(dfd)


async def _fill_from(fs: PassthruFs, inode: PassthruInode, dfd: int, off: int,
                     reply: ReaddirReply) -> None:
    # getdents reads on the loop: one call takes getdents.BUFSIZE bytes of directory (a
    # block or two), bounded like a small read; the per-name syscalls of a big batch go
    # to a worker as in readdir.
    entries = getdents.iter_from(dfd, off)
    accepted = 0
    batch_size = _PLUS_PER_REPLY
    while True:
        batch = list(islice(entries, batch_size))
        if not batch:
            return
        names = [e.name for e in batch if e.name not in DOTS]
        if len(names) <= _INLINE_BATCH:
            prepared = _prepare(fs, inode.fd, names)
        else:
            prepared = await trio.to_thread.run_sync(_prepare, fs, inode.fd, names)
        k = 0
        for e in batch:
            if e.name in DOTS:
                made = _dot_entry(fs, inode, e.name)
                d = (made._replace(next_off=e.next_off) if isinstance(made, DirEntry)
                     else DirEntry(e.name, made, e.next_off))
            else:
                p = prepared[k]
                k += 1
                if isinstance(p, OSError):
                    if p.errno == errno.ENOENT:
                        continue  # removed since getdents saw it
                    _close_prepared(prepared[k:])
                    if accepted == 0:
                        raise p
                    return  # an errno now would lose the references already delivered
                try:
                    d = _made_entry(fs, inode, e.name, p, e.next_off)
                except BaseException:
                    _close_prepared(prepared[k:])
                    raise
                if d is None:
                    continue
            if not reply(d):
                _close_prepared(prepared[k:])  # the bridge gives back this one's reference
                return
            accepted += 1
        batch_size = min(batch_size * 2, _MAX_BATCH)


async def fsyncdir_inode(fs: PassthruFs, ino: int, datasync: bool) -> None:
    inode = fs.live(ino)
    await trio.to_thread.run_sync(_fsync_dir, inode.fd, datasync)


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
