"""Open files: open/create/read/write/fsync/release via backingfs.rw, following copy-up.

Opening for write (or with O_TRUNC) copies the file up first and opens the upper copy. A
read-only open of a file still on a lower layer opens the lower one; when another opener
copies the file up later, the handle switches to the upper copy at its next I/O
(``OvlFileHandle.current``, reference §B.8: the upper is opened lazily, the lower reference
dropped), so it reads what writers wrote. (The kernel's exception for mmap does not arise:
the FUSE page cache sits above us.)

Kernel passthrough (native session): upper files always, lower files on a read-only mount,
and lower files of a writable mount only with ``-o lower_passthrough``. The kernel gives an
inode one backing file while any passthrough open of it lasts, and every later open must
use it, so such an inode cannot be switched to its upper copy. With the option, an open
that needs the upper file (for write, or after a copy-up) while lower passthrough opens
last detaches the inode (``InodeTable.mark_stale``) and answers ESTALE; the kernel then
looks the path up again (LOOKUP_REVAL), gets a new inode for the same object, with the
same st_ino, and opens that one. The detached inode's open files keep reading the lower
file: fuse-overlayfs's semantics, not the kernel's (reference §B.8). Only an open that
walks a path is retried by the kernel: while lower passthrough readers of a copied-up file
last, an open of it that walks no name (through /proc/PID/fd/N, fexecve, or a bind mount of
the file itself) fails with ESTALE; the kernel's own read-only open of such an inode for
lsattr/chattr on an fd made before the copy-up is answered instead (a handle it does not
use: FUSE_IOCTL goes by node id). Such a failed open has changed no data: its copy-up is
a whole one, and O_TRUNC is left to the retried open. An open the kernel does not serve
by passthrough (refused, ``backing_declined``) counts for nothing: a plain handle.

Writes hold ``inode.lock`` (the kernel's inode_lock in ``ovl_write_iter``), which also
makes an APPEND write's EOF exact. ``end_write`` is the kernel's ``ovl_copyattr``: size,
mtime, ctime and mode copied from the backing inode into the overlay inode's cache, on the
loop, before the reply. The sync policy drops DSYNC/SYNC and skips fsync when the mount
does not sync (``fsync=0``, ``volatile``), and remembers a volatile write error.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Any

import trio

from backingfs import privs, rw
from backingfs.backing_file import BackingFile
from backingfs.context import BackingFileCtx
from backingfs.copyfile import copy_range
from backingfs.flags import APPEND, from_open_flags
from backingfs.fsapi import Caller, OpenReply, ReadDone, SetattrRequest
from backingfs.handles import Handle
from backingfs.request import Request
from backingfs.syscalls import fallocate as fallocate_fd
from backingfs.syscalls import proc_path, reopen

from . import protattr
from .copyup import copy_up
from .entry import OvlInode
from .inode import check_writable
from .inode import setattr as ovl_setattr

if TYPE_CHECKING:
    from .superblock import Superblock

#: Open flags never passed to the backing open: creation is done already, O_APPEND is a
#: per-request flag (backing_file.py), O_TRUNC was applied by copy-up or is applied once.
#: O_DIRECT too: backingfs.rw reads into unaligned bytearrays, which an O_DIRECT backing
#: fd refuses with EINVAL (the stacked file stays direct: the kernel bypasses its cache).
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_TRUNC | os.O_DIRECT


def is_write_open(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


class OvlFileHandle(Handle):
    """An open file; ``file`` is the backing file, ``is_upper`` where it lives."""

    def __init__(self, sb: Superblock, inode: OvlInode, file: BackingFile, flags: int,
                 is_upper: bool) -> None:
        super().__init__(inode, file)
        self.backing_flags = backing_flags(sb, flags)  # for the reopen after a copy-up
        iocb = int(from_open_flags(flags))
        if sb.params.writeback:
            # With the writeback cache the kernel places appends itself and may flush any
            # dirty page through any writable handle: APPEND here would move those pages
            # to EOF (as passthru, and libfuse's passthrough_hp).
            iocb &= ~APPEND
        self.iocb = iocb  # request flags as a plain int (hot path)
        self.is_upper = is_upper
        #: The kernel reads this open from the lower file (``lower_passthrough``): it stays
        #: on it after a copy-up, as its reads do.
        self.lower_passthrough = False

    def current(self) -> BackingFile:
        """The backing file holding the data now: switch to the upper copy if the inode
        was copied up since this handle opened its lower file."""
        inode = self.inode
        assert isinstance(inode, OvlInode)
        if not self.is_upper and inode.upper is not None and not self.lower_passthrough:
            fd = reopen(inode.upper, self.backing_flags)
            old, self.file = self.file, BackingFile(fd, self.backing_flags | os.O_CLOEXEC)
            self.is_upper = True
            if old is not None:
                old.put()  # in-flight requests hold their own references
        assert self.file is not None
        return self.file

    def end_lower_passthrough(self) -> None:
        """No longer counted as served from the lower file (closed, or never taken)."""
        if self.lower_passthrough:
            self.lower_passthrough = False
            inode = self.inode
            assert isinstance(inode, OvlInode)
            inode.lower_passthrough_opens -= 1

    def close(self) -> None:
        self.end_lower_passthrough()
        super().close()


# SHARE: same as passthru/file.py:backing_flags + _add_handle (a stacked open's flags ->
# a BackingFile reopened from an O_PATH fd, O_APPEND/O_CREAT/... stripped).
def backing_flags(sb: Superblock, flags: int) -> int:
    """The backing open's flags for a stacked open with ``flags``. Under the writeback
    cache a write-only open reads too: the kernel fills partly written pages through it."""
    flags &= ~_STRIP
    if sb.params.writeback and flags & os.O_ACCMODE == os.O_WRONLY:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


def _open_backing(sb: Superblock, fd: int, flags: int) -> BackingFile:
    bflags = backing_flags(sb, flags)
    return BackingFile(reopen(fd, bflags), bflags | os.O_CLOEXEC)


async def open(sb: Superblock, inode: OvlInode, flags: int) -> OpenReply:
    if inode.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    if is_write_open(flags):
        check_writable(sb)
        protattr.check_open(sb, inode, flags)
        if not stat.S_ISREG(inode.mode):
            # special files are never copied up on open (never reach us over FUSE anyway)
            raise OSError(errno.EINVAL, "open for write of a special file")
        # With lower passthrough the open may end in ESTALE below (readers may also come
        # during the copy-up): a whole copy then, so that an open that fails has changed
        # no data. O_TRUNC is applied below, by this open or its retry.
        trunc = flags & os.O_TRUNC and not sb.lower_passthrough
        await copy_up(sb, inode, size=0 if trunc else None)
    # Checked after the copy-up, which may let a reader in: once the inode has its upper
    # copy no open offers the lower file, so none can be registered after this point.
    if inode.lower_passthrough_opens and inode.upper is not None:
        if flags == os.O_RDONLY:
            # The kernel's private open for lsattr/chattr on an fd of this inode
            # (fuse_priv_ioctl_prepare: plain O_RDONLY, where open(2) always adds
            # O_LARGEFILE). It walks no path, so ESTALE would fail the ioctl; FUSE_IOCTL
            # goes by node id and never uses this handle, nor any backing file.
            handle = OvlFileHandle(sb, inode, _open_backing(sb, inode.upper, flags), flags,
                                   True)
            return OpenReply(sb.handles.add(handle), direct_io=True)
        # The kernel serves this inode's open files from its lower file and would bind this
        # open to it too (module docstring): a new inode for the path instead.
        inode.detached_for_passthrough = True
        sb.inodes.mark_stale(inode)
        raise OSError(errno.ESTALE, "inode detached: its lower file is open by passthrough")
    if inode.upper is not None:
        assert inode.upper is not None
        file = _open_backing(sb, inode.upper, flags)
        if flags & os.O_TRUNC:
            async with inode.lock:
                try:
                    os.truncate(proc_path(inode.upper), 0)
                    inode.attrs.copyattr(os.fstat(file.fd))
                except BaseException:
                    file.put()
                    raise
        handle = OvlFileHandle(sb, inode, file, flags, True)
    else:
        handle = OvlFileHandle(sb, inode, _open_backing(sb, inode.lowers[0].fd, flags), flags,
                               False)
    return OpenReply(sb.handles.add(handle), keep_cache=_keep_cache(sb),
                     backing=_passthrough_fd(sb, handle))


def _passthrough_fd(sb: Superblock, handle: OvlFileHandle) -> int | None:
    """The fd the kernel may serve this open from (native session, kernel passthrough).

    An upper file is final. A lower file is offered only on a mount without upper: the
    kernel gives an inode one backing file for as long as any passthrough open of it
    lasts, and every later open must use it, so a lower file opened that way could not be
    copied up under a read-only opener (the write open would go to the lower file, or
    fail). Lower files on a writable mount go through the daemon, which switches such a
    handle to the upper copy after copy-up (``OvlFileHandle.current``), unless the mount
    asked for ``lower_passthrough`` (module docstring)."""
    if handle.is_upper or sb.is_read_only:
        return handle.current().fd
    if sb.lower_passthrough and handle.file is not None:
        handle.lower_passthrough = True
        inode = handle.inode
        assert isinstance(inode, OvlInode)
        inode.lower_passthrough_opens += 1
        return handle.file.fd
    return None


def backing_declined(sb: Superblock, fh: int) -> None:
    """The kernel did not take the lower file offered for this open (passthrough refused):
    the handle is a plain one, which follows a copy-up and detaches nothing."""
    try:
        handle: OvlFileHandle = sb.handles.get(fh)
    except OSError:
        return
    handle.end_lower_passthrough()


def _keep_cache(sb: Superblock) -> bool:
    """Keep the kernel's page cache across opens while attributes are cached at all: every
    change to the data goes through this mount (lower layers changing underneath is
    undefined behaviour, kernel reference §B.16), and with timeout=0 the user asked to see
    such changes. What fuse-overlayfs does too."""
    return sb.params.timeout > 0


def open_new(sb: Superblock, inode: OvlInode, flags: int, fd: int | None = None) -> OpenReply:
    """Open a file create() just made on the upper layer; ``fd``: the fd that made it,
    opened with ``backing_flags(sb, flags)``, which the handle takes over."""
    assert inode.upper is not None
    file = (_open_backing(sb, inode.upper, flags) if fd is None
            else BackingFile(fd, backing_flags(sb, flags) | os.O_CLOEXEC))
    handle = OvlFileHandle(sb, inode, file, flags, True)
    return OpenReply(sb.handles.add(handle), keep_cache=_keep_cache(sb),
                     backing=handle.current().fd)


def _ctx(sb: Superblock) -> BackingFileCtx:
    """The mount's read/write context, built once (it only depends on the mount)."""
    if sb.rw_ctx is None:
        sb.rw_ctx = _make_ctx(sb)
    return sb.rw_ctx


def _make_ctx(sb: Superblock) -> BackingFileCtx:
    def end_write(stacked: Any, pos: int, result: int) -> None:
        # ovl_copyattr: runs on the loop with the inode's lock held by write() below.
        if result < 0:
            sb.sync.record_error(-result)
            return
        handle: OvlFileHandle = stacked
        if handle.file is not None:
            handle.inode.attrs.copyattr(os.fstat(handle.file.fd))

    return BackingFileCtx(end_write=end_write, drop_flags=sb.sync.drop_flags,
                          inline_io=True)


async def read(sb: Superblock, fh: int, off: int, size: int) -> memoryview:
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        file = handle.current()
        req = Request(handle, off, handle.iocb & ~APPEND)
        return await rw.read(file, size, req, _ctx(sb))
    finally:
        handle.io.end_io()


def read_start(sb: Superblock, fh: int, off: int, size: int,
               done: ReadDone) -> memoryview | None:
    """``read`` for a callback front-end (fsapi ``read_start``)."""
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        file = handle.current()
    except BaseException:
        handle.io.end_io()
        raise
    return rw.read_start(file, size, Request(handle, off, handle.iocb & ~APPEND), _ctx(sb),
                         done, held=handle.io)


def _writable(handle: OvlFileHandle) -> BackingFile:
    """The file a write through ``handle`` goes to: its upper one (an open for write made
    it one by copy-up); EBADF for a handle open read-only."""
    file = handle.current()
    if not handle.is_upper:
        raise OSError(errno.EBADF, "file not open for writing")
    return file


async def write(sb: Superblock, fh: int, off: int, data: bytes) -> int:
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        inode = handle.inode
        async with inode.lock:
            file = _writable(handle)
            req = Request(handle, off, handle.iocb)
            return await rw.write(file, data, req, _ctx(sb))
    finally:
        handle.io.end_io()


async def kill_suidgid(sb: Superblock, fh: int, caller: Caller) -> None:
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        if sb.owners is not None and handle.is_upper:
            # The reported mode may be an override record (xattr_permissions): setattr
            # knows where the bits live.
            await ovl_setattr(sb, handle.inode, SetattrRequest(kill_suidgid=caller), None)
            return
        async with handle.inode.lock:
            if handle.is_upper:  # a lower file is never written: the write will fail
                st = privs.kill_suidgid(handle.current().fd, caller.gid, caller.pid)
                if st is not None:
                    handle.inode.attrs.copyattr(st)
    finally:
        handle.io.end_io()


async def flush(sb: Superblock, fh: int) -> None:
    """close(2) of a stacked fd: close a duplicate of the upper fd where that can report a
    write error (NFS, FUSE, ...); elsewhere ENOSYS, and the kernel stops sending FLUSH for
    the rest of the mount (backingfs.syscalls.CLOSE_REPORTS_ERRORS)."""
    if not sb.flush_closes:
        raise OSError(errno.ENOSYS, "flush is not needed on this upper filesystem")
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        if handle.is_upper and handle.file is not None:
            os.close(os.dup(handle.file.fd))
    finally:
        handle.io.end_io()


async def fsync(sb: Superblock, fh: int, datasync: bool) -> None:
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        file = handle.current()
        if not handle.is_upper:
            return  # nothing of ours to sync on a lower layer
        file.get()
        try:
            await sb.sync.sync_queued(file.fd, datasync)
        finally:
            file.put()
    finally:
        handle.io.end_io()


async def fallocate(sb: Superblock, fh: int, mode: int, off: int, length: int) -> None:
    """Only on a handle open for write, which copy-up made an upper one."""
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        file = _writable(handle)
        inode = handle.inode
        protattr.check_fallocate(sb, inode, mode)
        file.get()
        try:
            async with inode.lock:
                await trio.to_thread.run_sync(fallocate_fd, file.fd, mode, off, length)
                inode.attrs.copyattr(os.fstat(file.fd))
        finally:
            file.put()
    finally:
        handle.io.end_io()


async def copy_file_range(sb: Superblock, fh_in: int, off_in: int, fh_out: int, off_out: int,
                          length: int) -> int:
    """Between the real files, as the kernel's overlayfs (ovl_copy_file_range): from the
    upper copy once there is one, else the lower file, into the upper file (a handle open
    for write, which copy-up made an upper one)."""
    src: OvlFileHandle = sb.handles.begin_io(fh_in)
    try:
        dst: OvlFileHandle = sb.handles.begin_io(fh_out)
        try:
            inode = dst.inode
            async with inode.lock:
                dst_file = _writable(dst)
                src_file = src.current()
                src_file.get()
                dst_file.get()
                try:
                    done = await trio.to_thread.run_sync(copy_range, src_file.fd, dst_file.fd,
                                                         off_in, off_out, length)
                    inode.attrs.copyattr(os.fstat(dst_file.fd))
                finally:
                    dst_file.put()
                    src_file.put()
            return done
        finally:
            dst.io.end_io()
    finally:
        src.io.end_io()


async def lseek(sb: Superblock, fh: int, off: int, whence: int) -> int:
    handle: OvlFileHandle = sb.handles.begin_io(fh)
    try:
        file = handle.current()
        file.get()
        try:
            return os.lseek(file.fd, off, whence)  # the backing fd's offset is unused
        finally:
            file.put()
    finally:
        handle.io.end_io()


async def release(sb: Superblock, fh: int) -> None:
    await sb.handles.release(fh)
