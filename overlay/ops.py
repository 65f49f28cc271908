"""OverlayFs: the ``backingfs.fsapi.Filesystem`` of an overlay mount, one line per operation.

Each handler resolves its inode or handle and delegates to the module that owns the concept
(namei, inode, dir, file, readdir), as the kernel's overlayfs.h table of contents does.
Inodes marked stale by a hard-link-breaking copy-up keep working (they still name their
backing objects); only new lookups stop finding them.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from backingfs import acl
from backingfs.attrs import Attr
from backingfs.fileattr import FileAttr
from backingfs.fsapi import (
    Caller,
    Entry,
    Filesystem,
    OpenReply,
    ReaddirReply,
    ReadDone,
    SetattrRequest,
    Statfs,
)
from backingfs.notify import Notifier
from backingfs.syscalls import birth_time_ns

from . import dir as ovl_dir
from . import file as ovl_file
from . import fileattr as ovl_fileattr
from . import inode as ovl_inode
from . import readdir as ovl_readdir
from .entry import OvlInode
from .namei import adopt, find_upper, resolve
from .superblock import Superblock


class OverlayFs(Filesystem):
    def __init__(self, sb: Superblock) -> None:
        self.sb = sb
        self.enable_writeback_cache = sb.params.writeback
        # The kernel enforces the layers' POSIX ACLs (FUSE_POSIX_ACL), which pass through
        # as xattrs and are copied up; new objects inherit default ACLs (dir._make).
        # noacl, or a layer without ACLs: mode bits only, as fuse-overlayfs.
        self.enable_acl = not sb.params.noacl and all(
            acl.supported(layer.fd) for layer in sb.layers.all())
        # Changes reach the merged directories only through the mount (lower layers
        # changing underneath are undefined, as for keep_cache), unless timeout=0.
        self.cache_dirs = sb.params.timeout > 0
        # no OPENDIR/RELEASEDIR round trips on the native session (readdir.readdir_inode)
        self.handleless_dirs = self.cache_dirs

    @property  # type: ignore[override]
    def notifier(self) -> Notifier | None:
        return self.sb.notifier

    @notifier.setter
    def notifier(self, notifier: Notifier | None) -> None:
        self.sb.notifier = notifier

    def _inode(self, ino: int) -> OvlInode:
        return self.sb.inodes.get(ino)

    def _dir(self, ino: int) -> OvlInode:
        inode = self._inode(ino)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return inode

    def init(self) -> None:
        # The front-end set ``passthrough``: lower_passthrough needs it (and node ids
        # apart from st_ino, which only the native session has).
        self.sb.lower_passthrough = self.sb.params.lower_passthrough and self.passthrough
        self.sb.node_ids = self.node_ids
        self.sb.bare_dots = self.bare_dots
        self.sb.dont_mask = self.dont_mask
        # Most inodes hold one fd (a merged directory one per layer it is in, but they are
        # few); a lookup that meets EMFILE anyway prunes and retries (native_ops).
        self.sb.inodes.enable_pruning(self.sb.notifier)

    def relieve_fds(self) -> bool:
        return self.sb.inodes.prune_now()

    def backing_declined(self, fh: int) -> None:
        ovl_file.backing_declined(self.sb, fh)

    async def destroy(self) -> None:
        await self.sb.handles.release_all()
        await self.sb.inodes.io.wait_drained()
        self.sb.inodes.forget_all()
        root = self.sb.inodes.root
        root.on_evict()
        self.sb.close()

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        sb = self.sb
        dir_inode = self._dir(parent)
        known, upper_st = find_upper(sb, dir_inode, name)
        if known is not None:
            inode, st = known
            try:
                return ovl_inode.make_entry(sb, inode, st)
            except BaseException:
                sb.inodes.forget(inode.ino, 1)
                raise
        res = resolve(sb, dir_inode, name, upper_st)
        if not res.exists:
            res.close()
            timeout = sb.params.timeout
            if timeout > 0:
                # ino 0: a negative entry the kernel caches for the entry timeout (no
                # reference), as passthru does; a name made through the mount replaces it.
                return Entry(Attr(st_ino=0, st_mode=0), timeout, 0.0)
            raise OSError(errno.ENOENT, "no such file or directory", name)
        inode = adopt(sb, dir_inode, name, res)
        try:
            return ovl_inode.make_entry(sb, inode)
        except BaseException:
            sb.inodes.forget(inode.ino, 1)
            raise

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, n in items:
            self.sb.inodes.forget(ino, n)

    async def getattr(self, ino: int, caller: Caller) -> Entry:
        return await ovl_inode.getattr(self.sb, self._inode(ino))

    async def birth_time(self, ino: int) -> int | None:
        # The kernel's overlayfs reports the real object's (ovl_getattr): a copy-up is born
        # at the copy-up.
        return birth_time_ns(self._inode(ino).data_fd())

    async def setattr(self, ino: int, changes: SetattrRequest, fh: int | None,
                      caller: Caller) -> Entry:
        fd = None
        if fh is not None and changes.size is not None:
            try:
                handle = self.sb.handles.get(fh)
                if isinstance(handle, ovl_file.OvlFileHandle) and handle.is_upper:
                    fd = handle.current().fd
            except OSError:
                fd = None
        return await ovl_inode.setattr(self.sb, self._inode(ino), changes, fd,
                                       by_handle=fh is not None)

    async def readlink(self, ino: int, caller: Caller) -> bytes:
        return await ovl_inode.readlink(self.sb, self._inode(ino))

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> Entry:
        return await ovl_dir.mknod(self.sb, self._dir(parent), name, mode, rdev, caller)

    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        return await ovl_dir.mkdir(self.sb, self._dir(parent), name, mode, caller)

    async def unlink(self, parent: int, name: bytes, caller: Caller) -> None:
        await ovl_dir.unlink(self.sb, self._dir(parent), name)

    async def rmdir(self, parent: int, name: bytes, caller: Caller) -> None:
        await ovl_dir.rmdir(self.sb, self._dir(parent), name)

    async def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        return await ovl_dir.symlink(self.sb, self._dir(parent), name, target, caller)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int, caller: Caller) -> None:
        await ovl_dir.rename(self.sb, self._dir(old_parent), old_name, self._dir(new_parent),
                             new_name, flags)

    async def link(self, ino: int, new_parent: int, new_name: bytes, caller: Caller) -> Entry:
        return await ovl_dir.link(self.sb, self._inode(ino), self._dir(new_parent), new_name,
                                  caller)

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        return await ovl_file.open(self.sb, self._inode(ino), flags)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[OpenReply, Entry]:
        return await ovl_dir.create(self.sb, self._dir(parent), name, mode, flags, caller)

    async def tmpfile(self, parent: int, mode: int, flags: int,
                      caller: Caller) -> tuple[OpenReply, Entry]:
        return await ovl_dir.tmpfile(self.sb, self._dir(parent), mode, flags, caller)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        return await ovl_file.read(self.sb, fh, off, size)

    def read_start(self, fh: int, off: int, size: int, done: ReadDone) -> memoryview | None:
        return ovl_file.read_start(self.sb, fh, off, size, done)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await ovl_file.write(self.sb, fh, off, data)

    async def kill_suidgid(self, fh: int, caller: Caller) -> None:
        await ovl_file.kill_suidgid(self.sb, fh, caller)

    async def flush(self, fh: int) -> None:
        await ovl_file.flush(self.sb, fh)

    async def release(self, fh: int) -> None:
        await ovl_file.release(self.sb, fh)

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        await ovl_file.fallocate(self.sb, fh, mode, off, length)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int) -> int:
        return await ovl_file.copy_file_range(self.sb, fh_in, off_in, fh_out, off_out,
                                              length)

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        return await ovl_file.lseek(self.sb, fh, off, whence)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await ovl_file.fsync(self.sb, fh, datasync)

    async def opendir(self, ino: int, caller: Caller) -> int:
        return await ovl_readdir.opendir(self.sb, self._inode(ino))

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        await ovl_readdir.readdir(self.sb, fh, off, reply)

    async def releasedir(self, fh: int) -> None:
        await ovl_readdir.releasedir(self.sb, fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await ovl_readdir.fsyncdir(self.sb, fh, datasync)

    async def readdir_inode(self, ino: int, off: int, reply: ReaddirReply) -> None:
        await ovl_readdir.readdir_inode(self.sb, self._dir(ino), off, reply)

    async def fsyncdir_inode(self, ino: int, datasync: bool) -> None:
        await ovl_readdir.fsyncdir_inode(self.sb, self._dir(ino), datasync)

    async def statfs(self, caller: Caller) -> Statfs:
        return await ovl_inode.statfs(self.sb)

    async def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        await ovl_inode.setxattr(self.sb, self._inode(ino), name, value)

    async def setxattr_prepare(self, ino: int, name: bytes, caller: Caller) -> None:
        await ovl_inode.setxattr_prepare(self.sb, self._inode(ino), name)

    async def getxattr(self, ino: int, name: bytes, caller: Caller) -> bytes:
        return await ovl_inode.getxattr(self.sb, self._inode(ino), name)

    async def listxattr(self, ino: int, caller: Caller) -> list[bytes]:
        return await ovl_inode.listxattr(self.sb, self._inode(ino))

    async def removexattr(self, ino: int, name: bytes, caller: Caller) -> None:
        await ovl_inode.removexattr(self.sb, self._inode(ino), name)

    async def fileattr_get(self, ino: int, fsx: bool, caller: Caller) -> FileAttr:
        return await ovl_fileattr.lsattr(self.sb, self._inode(ino), fsx)

    async def fileattr_set(self, ino: int, attr: FileAttr, caller: Caller) -> None:
        await ovl_fileattr.chattr(self.sb, self._inode(ino), attr)

    async def access(self, ino: int, mode: int, caller: Caller) -> None:
        ovl_inode.access(self.sb, self._inode(ino), mode, caller)

    def statistics(self) -> dict[str, object]:
        """Flat counts for the SIGUSR1 line (a Python literal, as passthru's)."""
        i = self.sb.inodes.statistics()
        h = self.sb.handles.statistics()
        return {"inodes": i.inodes, "stale": i.stale, "lookups": i.lookups,
                "opens": i.opens, "evicted": i.evicted, "handles": h.handles,
                "opened": h.opened, "released": h.released, "in_flight": i.in_flight,
                "handle_in_flight": h.in_flight}
