"""PassthruInode: one SOURCE object held by an O_PATH fd; lookup, attributes, links, xattrs.

Identity is the backing object's ``(st_dev, st_ino)``; the kernel's ino is its st_ino when
free (so ``d_ino == st_ino`` and ``ls -i`` matches SOURCE), except the root, which is
``ROOT_INO``. Every lookup is one ``openat(parent_fd, name, O_PATH|O_NOFOLLOW)`` then an
``fstat`` of the new fd: a symlink is held as itself and never followed, and ``..`` at the
root answers the root, so no walk leaves SOURCE.

The O_PATH fd pins the backing inode, so its ``(st_dev, st_ino)`` cannot be reused while
we hold it on a local filesystem. A lookup that still finds a live inode for the key with
another file type (possible on filesystems that recycle numbers of open inodes) marks the
old one stale and makes a new one: a live inode's type never changes.

Metadata syscalls on held fds (fstat, chmod, utimensat, xattrs) run inline on the trio
loop: they are quick and a thread hop would cost more than the call. Truncate, which may
free many blocks, runs in a worker. All functions raise OSError; none imports pyfuse3.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

import trio

from backingfs import creds, fileattr, syscalls, xattrs
from backingfs.attrs import Attr
from backingfs.closing import close_fd
from backingfs.fileattr import FileAttr
from backingfs.fsapi import Caller, Entry, SetattrRequest, Statfs
from backingfs.inodes import Inode
from backingfs.setattr import setattr_backing

if TYPE_CHECKING:
    from .superblock import PassthruFs

BackingId = tuple[int, int]

_DOTS = (b".", b"..")


class PassthruInode(Inode):
    """A stacked inode and the O_PATH fd of its backing object (closed at eviction)."""

    def __init__(self, ino: int, key: BackingId, fd: int, fmt: int) -> None:
        super().__init__(ino, key)
        self.fd = fd  # O_PATH|O_NOFOLLOW; owned by the inode, closed by on_evict
        self.fmt = fmt  # S_IFMT of the backing object; never changes

    def on_evict(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            close_fd(fd)


def make_entry(fs: PassthruFs, inode: PassthruInode, st: os.stat_result) -> Entry:
    return Entry(Attr.from_stat(st, inode.ino), fs.entry_timeout, fs.attr_timeout)


def install(fs: PassthruFs, fd: int, st: os.stat_result) -> PassthruInode:
    """The live inode for the object of O_PATH ``fd`` (stat ``st``), with one more lookup.

    Takes ownership of ``fd``: it becomes the new inode's, or is closed when an inode for
    the object already exists. Call on the trio loop (the table lock is brief).
    """
    key = (st.st_dev, st.st_ino)
    fmt = stat.S_IFMT(st.st_mode)
    made: list[PassthruInode] = []

    def make(ino: int) -> PassthruInode:
        inode = PassthruInode(ino, key, fd, fmt)
        made.append(inode)
        return inode

    try:
        inode = fs.inodes.lookup(key, make, st.st_ino)
        if made:
            return inode
        if inode.fmt != fmt:
            # Same backing id, another type: the old object is gone (see module docstring).
            fs.inodes.mark_stale(inode)
            fs.inodes.forget(inode.ino, 1)
            inode = fs.inodes.lookup(key, make, st.st_ino)
            if made:
                return inode
    except BaseException:
        if not made:
            os.close(fd)
        raise
    os.close(fd)
    return inode


def take_known(fs: PassthruFs, st: os.stat_result) -> PassthruInode | None:
    """The live inode of the object ``st`` (a fresh stat of a name), with one more lookup,
    if the table holds one of its type; else None (open the name: ``install``).

    The inode's O_PATH fd pins the backing inode, so a name that stats as its
    ``(st_dev, st_ino)`` names that very object: a repeated lookup or listing entry needs
    no open of its own (one fstatat instead of openat + fstat + close)."""
    inode = fs.inodes.lookup_existing((st.st_dev, st.st_ino))
    if inode is None:
        return None
    if inode.fmt != stat.S_IFMT(st.st_mode):  # recycled number: install() sorts it out
        fs.inodes.forget(inode.ino, 1)
        return None
    return inode


def lookup_fd(fs: PassthruFs, parent: PassthruInode, name: bytes) -> tuple[int, os.stat_result]:
    """Open ``name`` in ``parent`` as O_PATH and stat it; ``..`` of the root is the root."""
    if name in _DOTS and (name == b"." or parent is fs.inodes.root):
        fd = os.dup(parent.fd)
    else:
        fd = syscalls.open_path(parent.fd, name)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


async def lookup(fs: PassthruFs, parent_ino: int, name: bytes, caller: Caller) -> Entry:
    parent = fs.live(parent_ino)
    try:
        if name not in _DOTS:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            known = take_known(fs, st)
            if known is not None:
                return make_entry(fs, known, st)
        fd, st = lookup_fd(fs, parent, name)
    except FileNotFoundError:
        if fs.negative_timeout > 0:
            # ino 0: a negative entry the kernel caches for entry_timeout; no reference.
            return Entry(Attr(st_ino=0, st_mode=0), fs.negative_timeout, 0.0)
        raise
    return make_entry(fs, install(fs, fd, st), st)


async def getattr(fs: PassthruFs, ino: int, caller: Caller) -> Entry:
    inode = fs.live(ino)
    version = inode.attrs.version  # before the stat: a newer local update wins (attrs.py)
    attr = inode.attrs.merge(Attr.from_stat(os.fstat(inode.fd), inode.ino), version)
    return Entry(attr, fs.entry_timeout, fs.attr_timeout)


async def setattr(fs: PassthruFs, ino: int, changes: SetattrRequest, fh: int | None,
                  caller: Caller) -> Entry:
    """backingfs.setattr's order (owner, mode, size, times); permission checks are the
    kernel's (default_permissions)."""
    inode = fs.live(ino)
    async with inode.lock:
        try:
            st = await setattr_backing(inode.fd, inode.fmt, changes,
                                       lambda size: _truncate(fs, inode, size, fh))
        except OSError as e:
            if not (e.errno == errno.EPERM and fh is not None and changes.only_cmtime()
                    and _protected(inode.fd)):
                raise
            # The writeback cache's flush of the times of writes it made through handle
            # ``fh`` (allowed ones: appends to a +a file, or through a handle opened
            # before +i/+a); SOURCE set its own times when we wrote. Failing it would
            # fail close(2) with EIO after good writes.
            st = os.fstat(inode.fd)
        inode.attrs.copyattr(st)
    return make_entry(fs, inode, st)


def _protected(fd: int) -> bool:
    return bool(syscalls.statx_attributes(fd) & (syscalls.STATX_ATTR_IMMUTABLE
                                                 | syscalls.STATX_ATTR_APPEND))


async def _truncate(fs: PassthruFs, inode: PassthruInode, size: int, fh: int | None) -> None:
    """Through the open handle when the kernel names one (it may be the only way to reach
    an unlinked file's data with write access), else a short-lived O_WRONLY reopen."""
    if fh is not None:
        handle = fs.handles.begin_io(fh)
        try:
            if handle.file is not None:
                await trio.to_thread.run_sync(os.ftruncate, handle.file.fd, size)
                inode.attrs.set_size(size)
                return
        finally:
            handle.io.end_io()
    await trio.to_thread.run_sync(_truncate_path, inode.fd, size)
    inode.attrs.set_size(size)


def _truncate_path(fd: int, size: int) -> None:
    wfd = syscalls.reopen(fd, os.O_WRONLY)
    try:
        os.ftruncate(wfd, size)
    finally:
        os.close(wfd)


async def fileattr_get(fs: PassthruFs, ino: int, fsx: bool, caller: Caller) -> FileAttr:
    inode = fs.live(ino)
    return fileattr.get_at(inode.fd, inode.fmt, fsx)


async def fileattr_set(fs: PassthruFs, ino: int, attr: FileAttr, caller: Caller) -> None:
    inode = fs.live(ino)
    async with inode.lock:
        fileattr.set_at(inode.fd, inode.fmt, attr)
        inode.attrs.copyattr(os.fstat(inode.fd))
    if fs.notifier is not None:  # the new ctime: the kernel does not drop its copy itself
        await fs.notifier.invalidate_inode(ino, attr_only=True)


async def readlink(fs: PassthruFs, ino: int, caller: Caller) -> bytes:
    inode = fs.live(ino)
    if inode.fmt != stat.S_IFLNK:
        raise OSError(errno.EINVAL, "not a symlink")
    return os.readlink(b"", dir_fd=inode.fd)  # readlinkat(fd, ""): the link's own text


async def access(fs: PassthruFs, ino: int, mode: int, caller: Caller) -> None:
    """A fallback only: passthru always mounts with default_permissions."""
    creds.check_access(os.fstat(fs.live(ino).fd), mode, caller.uid, caller.gid, caller.pid)


async def statfs(fs: PassthruFs, caller: Caller) -> Statfs:
    return Statfs.from_statvfs(os.statvfs(fs.inodes.root.fd))  # fstatfs works on O_PATH fds


# --- xattrs: on the object itself, through its O_PATH fd (symlinks included) -------------

async def getxattr(fs: PassthruFs, ino: int, name: bytes, caller: Caller) -> bytes:
    # The kernel asks for security.capability before every write (file_remove_privs), so
    # this is a hot path: go straight to the magic link that xattrs.fgetxattr falls back
    # to for O_PATH fds (one syscall instead of three).
    return os.getxattr(b"/proc/self/fd/%d" % fs.live(ino).fd, name)


async def listxattr(fs: PassthruFs, ino: int, caller: Caller) -> list[bytes]:
    return xattrs.flistxattr(fs.live(ino).fd)


async def setxattr_prepare(fs: PassthruFs, ino: int) -> None:
    """Before the front-end's XATTR_CREATE/REPLACE check: the VFS's ``xattr_permission``
    refuses any change of an immutable or append-only object first (EPERM, not the
    check's ENODATA/EEXIST), and the FUSE inode carries no such flag for it to see."""
    if _protected(fs.live(ino).fd):
        raise OSError(errno.EPERM, "xattr change: immutable or append-only (chattr)")


async def setxattr(fs: PassthruFs, ino: int, name: bytes, value: bytes,
                   caller: Caller) -> None:
    # pyfuse3 passes no flags: it emulates XATTR_CREATE/REPLACE with a getxattr first.
    xattrs.fsetxattr(fs.live(ino).fd, name, value)


async def removexattr(fs: PassthruFs, ino: int, name: bytes, caller: Caller) -> None:
    xattrs.fremovexattr(fs.live(ino).fd, name)
