"""PassthruFs: one mount of SOURCE, the ``fsapi.Filesystem`` the bridge serves.

It owns the mount's state: SOURCE's root O_PATH fd (the root inode's), the InodeTable,
the HandleTable, the cache timeouts of the mode chosen (``params.py``) and the
``BackingFileCtx`` of every read and write. Each operation is a one-line delegation to the
module of its family (``inode``, ``dir``, ``file``, ``readdir``); those hold the logic.

Lifecycle: built by the CLI before mounting (a bad SOURCE fails there, with a clear
message); ``init`` sets the daemon's umask to 0 so modes the kernel computed for the caller
land exactly; ``destroy`` releases every handle (waiting for in-flight I/O), waits for the
mount's I/O to drain, evicts every inode (closing its fd) and closes the root fd.

Crossing into another filesystem mounted inside SOURCE is allowed: identity includes
st_dev, and a st_ino already taken gets a number from the table's reserved range.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from backingfs import acl, getdents
from backingfs.context import BackingFileCtx
from backingfs.fileattr import FileAttr
from backingfs.flags import IocbFlags
from backingfs.fsapi import (
    ROOT_INO,
    Caller,
    Entry,
    Filesystem,
    OpenReply,
    ReaddirReply,
    ReadDone,
    SetattrRequest,
    Statfs,
)
from backingfs.handles import Handle, HandleTable
from backingfs.inodes import InodeTable
from backingfs.syscalls import birth_time_ns, close_reports_errors
from backingfs.workers import Workers, default_workers

from . import dir as dir_ops
from . import file as file_ops
from . import inode as inode_ops
from . import readdir as readdir_ops
from .inode import PassthruInode
from .params import Params


class PassthruFs(Filesystem):
    """Mirror of the directory ``source``. Raises OSError if it cannot be opened as one."""

    def __init__(self, source: str, params: Params | None = None, *,
                 workers: Workers | None = None) -> None:
        self.params = params or Params()
        self.source = source
        fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        root = PassthruInode(ROOT_INO, (st.st_dev, st.st_ino), fd, stat.S_IFDIR)
        self.inodes: InodeTable[PassthruInode] = InodeTable(root)
        self.handles: HandleTable[Handle] = HandleTable(self.inodes)
        self.entry_timeout = self.params.entry_timeout
        self.attr_timeout = self.params.attr_timeout
        self.negative_timeout = self.params.negative_timeout
        self.keep_cache = self.params.keep_cache
        # Cached listings are dropped when a revalidated mtime differs: cache=auto sees
        # changes made in SOURCE after its timeout, as it does for attributes.
        self.cache_dirs = self.params.entry_timeout > 0
        # Listings by the backing fs's own cookies: no OPENDIR/RELEASEDIR round trips
        # (native session), half the requests of a find, two thirds of a du.
        self.handleless_dirs = self.cache_dirs and getdents.supported()
        self.writeback = self.params.writeback
        self.enable_writeback_cache = self.params.writeback
        # Not on a SOURCE without ACLs: each inode would cost a GETXATTR for nothing.
        self.enable_acl = self.params.acl and acl.supported(fd)
        self.workers = workers or default_workers()
        self.ctx = BackingFileCtx(
            end_write=file_ops.end_write,
            drop_flags=IocbFlags.APPEND if self.writeback else IocbFlags.NONE,
            inline_io=True)
        #: Whether FLUSH closes a dup of the backing fd (else ENOSYS, see file.flush). A
        #: network filesystem mounted *inside* SOURCE does not count (only SOURCE's own).
        self.flush_closes = close_reports_errors(fd)
        self.uid = os.geteuid()  # the daemon's ids: objects it makes need no chown for
        self.gid = os.getegid()  # a caller with the same ones

    def live(self, ino: int) -> PassthruInode:
        """The inode ``ino``; ESTALE if unknown or stale (its object was replaced)."""
        inode = self.inodes.get(ino)
        if inode.is_stale:
            raise OSError(errno.ESTALE, f"inode {ino} is stale")
        return inode

    # --- lifecycle -----------------------------------------------------------------------

    def init(self) -> None:
        # The kernel already applied the caller's umask; ours must not apply another.
        os.umask(0)
        self.inodes.enable_pruning(self.notifier)

    def relieve_fds(self) -> bool:
        return self.inodes.prune_now()

    async def destroy(self) -> None:
        await self.handles.release_all()
        await self.inodes.io.wait_drained()
        self.inodes.forget_all()
        self.inodes.root.on_evict()

    def statistics(self) -> dict[str, object]:
        i = self.inodes.statistics()
        h = self.handles.statistics()
        return {"inodes": i.inodes, "stale": i.stale, "lookups": i.lookups,
                "opens": i.opens, "evicted": i.evicted, "handles": h.handles,
                "opened": h.opened, "released": h.released, "in_flight": i.in_flight}

    # --- operations: one line each ----------------------------------------------------------

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        return await inode_ops.lookup(self, parent, name, caller)

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        forget = self.inodes.forget
        for ino, n in items:
            forget(ino, n)

    async def getattr(self, ino: int, caller: Caller) -> Entry:
        return await inode_ops.getattr(self, ino, caller)

    async def birth_time(self, ino: int) -> int | None:
        return birth_time_ns(self.live(ino).fd)

    async def setattr(self, ino: int, changes: SetattrRequest, fh: int | None,
                      caller: Caller) -> Entry:
        return await inode_ops.setattr(self, ino, changes, fh, caller)

    async def readlink(self, ino: int, caller: Caller) -> bytes:
        return await inode_ops.readlink(self, ino, caller)

    async def access(self, ino: int, mode: int, caller: Caller) -> None:
        await inode_ops.access(self, ino, mode, caller)

    async def statfs(self, caller: Caller) -> Statfs:
        return await inode_ops.statfs(self, caller)

    async def setxattr_prepare(self, ino: int, name: bytes, caller: Caller) -> None:
        await inode_ops.setxattr_prepare(self, ino)

    async def getxattr(self, ino: int, name: bytes, caller: Caller) -> bytes:
        return await inode_ops.getxattr(self, ino, name, caller)

    async def listxattr(self, ino: int, caller: Caller) -> list[bytes]:
        return await inode_ops.listxattr(self, ino, caller)

    async def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        await inode_ops.setxattr(self, ino, name, value, caller)

    async def removexattr(self, ino: int, name: bytes, caller: Caller) -> None:
        await inode_ops.removexattr(self, ino, name, caller)

    async def fileattr_get(self, ino: int, fsx: bool, caller: Caller) -> FileAttr:
        return await inode_ops.fileattr_get(self, ino, fsx, caller)

    async def fileattr_set(self, ino: int, attr: FileAttr, caller: Caller) -> None:
        await inode_ops.fileattr_set(self, ino, attr, caller)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> Entry:
        return await dir_ops.mknod(self, parent, name, mode, rdev, caller)

    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        return await dir_ops.mkdir(self, parent, name, mode, caller)

    async def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        return await dir_ops.symlink(self, parent, name, target, caller)

    async def link(self, ino: int, new_parent: int, new_name: bytes, caller: Caller) -> Entry:
        return await dir_ops.link(self, ino, new_parent, new_name, caller)

    async def unlink(self, parent: int, name: bytes, caller: Caller) -> None:
        await dir_ops.unlink(self, parent, name, caller)

    async def rmdir(self, parent: int, name: bytes, caller: Caller) -> None:
        await dir_ops.rmdir(self, parent, name, caller)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int, caller: Caller) -> None:
        await dir_ops.rename(self, old_parent, old_name, new_parent, new_name, flags, caller)

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        return await file_ops.open(self, ino, flags, caller)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[OpenReply, Entry]:
        return await file_ops.create(self, parent, name, mode, flags, caller)

    async def tmpfile(self, parent: int, mode: int, flags: int,
                      caller: Caller) -> tuple[OpenReply, Entry]:
        return await file_ops.tmpfile(self, parent, mode, flags, caller)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        return await file_ops.read(self, fh, off, size)

    def read_start(self, fh: int, off: int, size: int, done: ReadDone) -> memoryview | None:
        return file_ops.read_start(self, fh, off, size, done)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await file_ops.write(self, fh, off, data)

    async def kill_suidgid(self, fh: int, caller: Caller) -> None:
        await file_ops.kill_suidgid(self, fh, caller)

    async def flush(self, fh: int) -> None:
        await file_ops.flush(self, fh)

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        await file_ops.fallocate(self, fh, mode, off, length)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int) -> int:
        return await file_ops.copy_file_range(self, fh_in, off_in, fh_out, off_out, length)

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        return await file_ops.lseek(self, fh, off, whence)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await file_ops.fsync(self, fh, datasync)

    async def release(self, fh: int) -> None:
        await file_ops.release(self, fh)

    async def opendir(self, ino: int, caller: Caller) -> int:
        return await readdir_ops.opendir(self, ino, caller)

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        await readdir_ops.readdir(self, fh, off, reply)

    async def releasedir(self, fh: int) -> None:
        await readdir_ops.releasedir(self, fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await readdir_ops.fsyncdir(self, fh, datasync)

    async def readdir_inode(self, ino: int, off: int, reply: ReaddirReply) -> None:
        await readdir_ops.readdir_inode(self, ino, off, reply)

    async def fsyncdir_inode(self, ino: int, datasync: bool) -> None:
        await readdir_ops.fsyncdir_inode(self, ino, datasync)
