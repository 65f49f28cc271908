"""setattr on a backing object: owner, mode, size and times in the order native calls leave.

Shared by both filesystems: each holds the stacked inode's lock, names the backing object
by its O_PATH fd, and supplies its own truncate (through an open handle when the kernel
names one, else a reopen; in a worker or not).

Order: chown first (it clears set-id bits, so a mode set in the same request must come
after it), then chmod (or the set-id bits a truncate by an unprivileged caller clears),
then the size, then the times (a truncate updates mtime, so times
set in the same request must come after it). ctime cannot be set and is ignored.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable

from .fsapi import SetattrRequest
from .privs import kill_mask
from .syscalls import proc_path, utimens

Truncate = Callable[[int], Awaitable[None]]


async def setattr_backing(fd: int, fmt: int, changes: SetattrRequest,
                          truncate: Truncate) -> os.stat_result:
    """Apply ``changes`` to the object behind O_PATH ``fd`` (file type ``fmt``); returns its
    stat afterwards. ``truncate(size)`` is called for a size change of a regular file;
    other types answer EISDIR (directories) or EINVAL, as truncate(2) does."""
    path = proc_path(fd)  # followed to the object itself, a symlink included
    if changes.uid is not None or changes.gid is not None:
        os.chown(path, -1 if changes.uid is None else changes.uid,
                 -1 if changes.gid is None else changes.gid)
    if changes.mode is not None:
        if fmt == stat.S_IFLNK:
            raise OSError(errno.EOPNOTSUPP, "cannot chmod a symlink")
        os.chmod(path, stat.S_IMODE(changes.mode))
    elif changes.kill_suidgid is not None and fmt == stat.S_IFREG:
        # Before the truncate, as the kernel's notify_change orders ATTR_KILL_S*ID.
        st = os.fstat(fd)  # an O_PATH fd does for fstat: no walk of the /proc link
        kill = kill_mask(st, changes.kill_suidgid.gid, changes.kill_suidgid.pid)
        if kill:
            os.chmod(path, stat.S_IMODE(st.st_mode & ~kill))
    if changes.size is not None:
        if fmt != stat.S_IFREG:
            raise OSError(errno.EISDIR if fmt == stat.S_IFDIR else errno.EINVAL, "truncate")
        await truncate(changes.size)
    if changes.atime_ns is not None or changes.mtime_ns is not None:
        utimens(fd, changes.atime_ns, changes.mtime_ns, now=changes.times_now)
    return os.fstat(fd)
