"""FileHandle and the open-file operations: open/create/tmpfile/read/write/flush/fsync/release.

One ``BackingFile`` per open, opened with the caller's access mode (the kernel already
checked it: default_permissions). Data moves through ``backingfs.rw``: reads try the
RWF_NOWAIT fast path on the loop and fall back to a worker, writes always run in a worker,
and ``end_write`` (on the loop) grows the inode's cached size.

Flags, as the kernel sends them and as the backing fd gets them:

- O_TRUNC is honoured by the reopen itself (pyfuse3 negotiates ATOMIC_O_TRUNC).
- O_APPEND never reaches a backing fd (BackingFile refuses it): without writeback the
  handle's requests carry ``IocbFlags.APPEND`` (RWF_APPEND: each write lands at the backing
  EOF, also with several appenders). With the writeback cache the kernel places appends
  itself, so APPEND is dropped, and O_WRONLY becomes O_RDWR because the kernel reads
  partial pages for write-only opens (libfuse passthrough_hp does the same).
- O_DIRECT is dropped on the backing fd: our buffers are not aligned for it, and the kernel
  already bypasses its page cache for the stacked file.
- O_SYNC/O_DSYNC stay on the fd and in the request flags.

Limit: a later ``fcntl(F_SETFL, O_APPEND)`` on the stacked fd is not seen (FUSE does not
forward it through pyfuse3).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import TYPE_CHECKING

import trio

from backingfs import privs, rw, syscalls
from backingfs.backing_file import BackingFile
from backingfs.copyfile import copy_range
from backingfs.flags import APPEND, IocbFlags, from_open_flags
from backingfs.fsapi import Caller, Entry, OpenReply, ReadDone
from backingfs.handles import Handle
from backingfs.request import Request
from backingfs.sync import fsync_queued

from .dir import give_owner, made_mode
from .inode import PassthruInode, install, make_entry

if TYPE_CHECKING:
    from .superblock import PassthruFs

#: Open flags that describe the open, not the file: never passed to the backing reopen.
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT
#: Request flags a stacked handle passes on (DIRECT describes the stacked open only).
_REQUEST_FLAGS = IocbFlags.APPEND | IocbFlags.DSYNC | IocbFlags.SYNC


class FileHandle(Handle):
    """An open file: the backing fd and the request flags of its open."""

    inode: PassthruInode

    def __init__(self, inode: PassthruInode, file: BackingFile, flags: IocbFlags) -> None:
        super().__init__(inode, file)
        self.flags = int(flags)  # IocbFlags bits for every request, as a plain int (hot path)


def backing_flags(fs: PassthruFs, flags: int) -> tuple[int, IocbFlags]:
    """(flags for the backing open, request flags) for a stacked open with ``flags``."""
    req_flags = from_open_flags(flags) & _REQUEST_FLAGS
    if fs.writeback:
        req_flags &= ~IocbFlags.APPEND
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return (flags & ~_OPEN_ONLY) | os.O_CLOEXEC, req_flags


def _append_only(fd: int) -> bool:
    try:
        return bool(syscalls.statx_attributes(fd) & syscalls.STATX_ATTR_APPEND)
    except OSError:
        return False


def _add_handle(fs: PassthruFs, inode: PassthruInode, fd: int, flags: int,
                req_flags: IocbFlags) -> OpenReply:
    file = BackingFile(fd, flags)
    try:
        fh = fs.handles.add(FileHandle(inode, file, req_flags))
    except BaseException:
        file.put()
        raise
    if flags & os.O_TRUNC:
        inode.attrs.set_size(0)
    # Offered for kernel passthrough (native session): one source inode per inode, so the
    # kernel may serve every open of it from this file.
    return OpenReply(fh, keep_cache=fs.keep_cache, backing=fd)


async def open(fs: PassthruFs, ino: int, flags: int, caller: Caller) -> OpenReply:
    inode = fs.live(ino)
    bflags, req_flags = backing_flags(fs, flags)
    try:
        fd = syscalls.reopen(inode.fd, bflags)
    except PermissionError:
        if flags & os.O_APPEND and not fs.writeback and _append_only(inode.fd):
            # chattr +a: a write open needs O_APPEND, which the backing open leaves out
            # (every write appends by its request flag instead). Kept here, the backing fd
            # appends at EOF, where each of these writes goes anyway; not under writeback
            # cache, whose page flushes may rewrite the last page's bytes.
            return _add_handle(fs, inode, syscalls.reopen(inode.fd, bflags | os.O_APPEND),
                               bflags, req_flags)
        if bflags & os.O_ACCMODE == flags & os.O_ACCMODE:
            raise
        # The writeback upgrade to O_RDWR needs read permission, which an unprivileged
        # daemon may lack: fall back to what the caller asked for.
        bflags = (bflags & ~os.O_ACCMODE) | (flags & os.O_ACCMODE)
        fd = syscalls.reopen(inode.fd, bflags)
    return _add_handle(fs, inode, fd, bflags, req_flags)


async def create(fs: PassthruFs, parent_ino: int, name: bytes, mode: int, flags: int,
                 caller: Caller) -> tuple[OpenReply, Entry]:
    """Create (or, without O_EXCL, open) ``name`` and open it, in one step.

    The backing open always uses O_CREAT|O_EXCL first, so we know whether this request
    made the file (and must give it the caller's ownership) or found one made in SOURCE
    since the kernel's lookup (opened as is, O_TRUNC honoured).

    O_NOFOLLOW is added: the kernel resolves symlinks itself before sending CREATE, so a
    symlink here was put in SOURCE behind our back and must not be followed out of it.
    """
    parent = fs.live(parent_ino)
    syscalls.check_name(name)
    bflags, req_flags = backing_flags(fs, flags)
    bflags |= os.O_NOFOLLOW
    mode = made_mode(fs, parent, mode, caller)
    try:
        fd = os.open(name, bflags | os.O_CREAT | os.O_EXCL, mode & 0o7777, dir_fd=parent.fd)
        created = True
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        # Made in SOURCE since the kernel's lookup: open it as an O_CREAT open would.
        fd = os.open(name, bflags, dir_fd=parent.fd)
        created = False
    try:
        try:
            if created:
                give_owner(fs, parent, fd, stat.S_IFREG | (mode & 0o7777), caller)
            st = os.fstat(fd)
            path_fd = _path_fd_of(parent.fd, name, fd, st)
        except BaseException:
            # A failed create leaves no file, as on a local filesystem (where EMFILE comes
            # before the file is made): the open above may have taken the last free fd.
            if created:
                _unlink_if_same(parent.fd, name, fd)
            raise
    except BaseException:
        os.close(fd)
        raise
    return _opened_new(fs, fd, path_fd, st, bflags & ~os.O_NOFOLLOW, req_flags)


async def tmpfile(fs: PassthruFs, parent_ino: int, mode: int, flags: int,
                  caller: Caller) -> tuple[OpenReply, Entry]:
    """O_TMPFILE: an unnamed file made in the SOURCE directory itself, and opened.

    The backing open is O_TMPFILE on the directory, with the caller's mode (umask as for
    create: ``made_mode``) and owner (``give_owner``), and O_EXCL when the caller gave it,
    so the backing file is exactly as linkable as the stacked one. Its inode is keyed by
    ``(st_dev, st_ino)`` like any other and held by an O_PATH fd reopened through the
    magic link; nlink is 0. A later linkat(2) of it is a plain ``link``, whose
    linkat(AT_SYMLINK_FOLLOW) on that fd's magic link publishes the file (the backing
    inode is I_LINKABLE). Closing it unlinked leaves nothing in SOURCE: the file goes
    when the kernel forgets the inode and its O_PATH fd closes.
    """
    parent = fs.live(parent_ino)
    bflags, req_flags = backing_flags(fs, flags)
    bflags |= os.O_TMPFILE | (flags & os.O_EXCL)  # ENOTDIR on a non-directory
    mode = made_mode(fs, parent, mode, caller)
    fd = os.open(".", bflags, mode & 0o7777, dir_fd=parent.fd)
    try:
        give_owner(fs, parent, fd, stat.S_IFREG | (mode & 0o7777), caller)
        st = os.fstat(fd)
        path_fd = os.open(syscalls.proc_path(fd), os.O_PATH | os.O_CLOEXEC)
    except BaseException:
        os.close(fd)  # the unnamed file goes with its only fd
        raise
    return _opened_new(fs, fd, path_fd, st, bflags & ~(os.O_TMPFILE | os.O_EXCL), req_flags)


def _opened_new(fs: PassthruFs, fd: int, path_fd: int, st: os.stat_result, bflags: int,
                req_flags: IocbFlags) -> tuple[OpenReply, Entry]:
    """CREATE's and TMPFILE's reply for the file just made and open in ``fd`` (O_PATH
    ``path_fd``): its inode (taking ``path_fd``) and a handle (taking ``fd``); on failure
    neither is left open and no lookup reference is kept."""
    try:
        inode = install(fs, path_fd, st)
    except BaseException:
        os.close(fd)
        raise
    try:
        reply = _add_handle(fs, inode, fd, bflags, req_flags)
    except BaseException:
        fs.inodes.forget(inode.ino, 1)
        raise
    return reply, make_entry(fs, inode, st)


def _path_fd_of(parent_fd: int, name: bytes, fd: int, st: os.stat_result) -> int:
    """An O_PATH fd of the object open in ``fd`` (stat ``st``), made as ``name``."""
    path_fd = syscalls.open_path(parent_fd, name)
    try:
        pst = os.fstat(path_fd)
        if (pst.st_dev, pst.st_ino) != (st.st_dev, st.st_ino):
            # Renamed in SOURCE meanwhile: reach the object through the open fd (the
            # magic link is followed to the file itself).
            os.close(path_fd)
            path_fd = -1
            path_fd = os.open(syscalls.proc_path(fd), os.O_PATH | os.O_CLOEXEC)
    except BaseException:
        if path_fd >= 0:
            os.close(path_fd)
        raise
    return path_fd


def _unlink_if_same(parent_fd: int, name: bytes, fd: int) -> None:
    """Remove ``name`` if it is still the file open in ``fd`` (best effort)."""
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        now = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(name, dir_fd=parent_fd)


async def read(fs: PassthruFs, fh: int, off: int, size: int) -> memoryview:
    handle: FileHandle = fs.handles.begin_io(fh)
    try:
        assert handle.file is not None
        return await rw.read(handle.file, size, Request(handle, off, handle.flags), fs.ctx,
                             io=handle.io, workers=fs.workers)
    finally:
        handle.io.end_io()


def read_start(fs: PassthruFs, fh: int, off: int, size: int,
               done: ReadDone) -> memoryview | None:
    """``read`` for a callback front-end (fsapi ``read_start``)."""
    handle: FileHandle = fs.handles.begin_io(fh)
    file = handle.file
    if file is None:  # never: a FileHandle is made with its file
        handle.io.end_io()
        raise OSError(errno.EBADF, "file handle without a backing file")
    # ``held`` spans the whole read, the queued I/O included: no second count on the aio.
    return rw.read_start(file, size, Request(handle, off, handle.flags), fs.ctx, done,
                         workers=fs.workers, held=handle.io)


async def write(fs: PassthruFs, fh: int, off: int, data: bytes) -> int:
    handle: FileHandle = fs.handles.begin_io(fh)
    try:
        assert handle.file is not None
        req = Request(handle, off, handle.flags)
        if handle.flags & APPEND:
            # rw.write_iter samples the EOF at submission: the lock makes it exact.
            async with handle.inode.lock:
                return await rw.write(handle.file, data, req, fs.ctx, io=handle.io,
                                      workers=fs.workers)
        return await rw.write(handle.file, data, req, fs.ctx, io=handle.io,
                              workers=fs.workers)
    finally:
        handle.io.end_io()


async def kill_suidgid(fs: PassthruFs, fh: int, caller: Caller) -> None:
    handle: FileHandle = fs.handles.begin_io(fh)
    try:
        assert handle.file is not None
        async with handle.inode.lock:
            st = privs.kill_suidgid(handle.file.fd, caller.gid, caller.pid)
            if st is not None:
                handle.inode.attrs.copyattr(st)
    finally:
        handle.io.end_io()


def end_write(stacked: FileHandle, pos: int, result: int) -> None:
    """BackingFileCtx.end_write: after a write ended at ``pos``, on the trio loop."""
    if result > 0:
        stacked.inode.attrs.grow_size(pos)


async def flush(fs: PassthruFs, fh: int) -> None:
    """close(2) of a stacked fd: close a duplicate of the backing fd, so errors that a
    backing filesystem reports at close (NFS, FUSE) reach the caller, as passthrough_hp.

    When SOURCE is on a filesystem whose close cannot fail that way (``fs.flush_closes``
    is False: ext4, xfs, tmpfs...), answer ENOSYS: the kernel then stops sending FLUSH for
    the rest of the mount, one round trip fewer per close. Dirty pages of the writeback
    cache are still written at close (the kernel does that before asking us).
    """
    if not fs.flush_closes:
        raise OSError(errno.ENOSYS, "flush is not needed on this backing filesystem")
    handle = fs.handles.begin_io(fh)
    try:
        if handle.file is not None:
            os.close(os.dup(handle.file.fd))
    finally:
        handle.io.end_io()


async def fsync(fs: PassthruFs, fh: int, datasync: bool) -> None:
    handle = fs.handles.begin_io(fh)
    try:
        if handle.file is not None:
            await fsync_queued(handle.file.fd, datasync)
    finally:
        handle.io.end_io()


async def fallocate(fs: PassthruFs, fh: int, mode: int, off: int, length: int) -> None:
    handle = fs.handles.begin_io(fh)
    try:
        if handle.file is None:
            raise OSError(errno.EBADF, "no backing file")
        inode = handle.inode
        async with inode.lock:
            await trio.to_thread.run_sync(syscalls.fallocate, handle.file.fd, mode, off, length)
            inode.attrs.copyattr(os.fstat(handle.file.fd))
    finally:
        handle.io.end_io()


async def copy_file_range(fs: PassthruFs, fh_in: int, off_in: int, fh_out: int, off_out: int,
                          length: int) -> int:
    """SOURCE's filesystem copies between the two backing files (copyfile.copy_range)."""
    src = fs.handles.begin_io(fh_in)
    try:
        dst = fs.handles.begin_io(fh_out)
        try:
            if src.file is None or dst.file is None:
                raise OSError(errno.EBADF, "no backing file")
            async with dst.inode.lock:
                done = await trio.to_thread.run_sync(copy_range, src.file.fd, dst.file.fd,
                                                     off_in, off_out, length)
                dst.inode.attrs.copyattr(os.fstat(dst.file.fd))
            return done
        finally:
            dst.io.end_io()
    finally:
        src.io.end_io()


async def lseek(fs: PassthruFs, fh: int, off: int, whence: int) -> int:
    handle = fs.handles.begin_io(fh)
    try:
        if handle.file is None:
            raise OSError(errno.EBADF, "no backing file")
        return os.lseek(handle.file.fd, off, whence)  # the backing fd's offset is unused
    finally:
        handle.io.end_io()


async def release(fs: PassthruFs, fh: int) -> None:
    await fs.handles.release(fh)
