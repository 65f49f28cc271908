"""HandleTable: the open files and directories of a mount, by fh, with their in-flight I/O.

A ``Handle`` is what an open (or opendir) returns to the kernel as ``fh``. It owns one
reference on its ``BackingFile`` and counts the requests running on it (``io``, nested in
its inode's and the mount's counts). Release is the ordered teardown: the fh disappears at
once (a second release or a late request gets EBADF), then release waits, shielded, until
no request still uses the backing fd, and only then drops the handle's BackingFile
reference and the inode's open count. fh numbers come from a counter starting at 1 and are
never reused, so a stale fh can never name another file.

Locking: one ``threading.Lock`` guards the map and counters; only ``release`` awaits.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from .backing_file import BackingFile
from .inflight import InFlight
from .inodes import Inode, InodeTable


class Handle:
    """One open file or directory. Filesystems subclass it (file handle, dir handle).

    ``file``: the backing fd, one reference owned by the handle and dropped by ``close()``
    (the fd itself closes at its last reference, after any request still holding one).
    """

    def __init__(self, inode: Inode, file: BackingFile | None = None) -> None:
        self.fh = 0  # assigned by HandleTable.add; never reused
        self.inode = inode
        self.io = InFlight(parent=inode.io)  # requests running on this handle
        self.file = file

    async def wait_drained(self) -> None:
        """Wait until no request is in flight on this handle. Shielded: a cancelled caller
        still waits, since what follows (closing the fd) must not run before."""
        if not self.io.count:
            return  # the shielded scope costs more than this whole release
        with trio.CancelScope(shield=True):
            await self.io.wait_drained()

    def close(self) -> None:
        """Drop the handle's BackingFile reference. Idempotent. Call after ``wait_drained``."""
        file, self.file = self.file, None
        if file is not None:
            file.put()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fh={self.fh} ino={self.inode.ino} file={self.file!r}>"


HandleT = TypeVar("HandleT", bound=Handle)


@dataclass(frozen=True)
class HandleTableStatistics:
    handles: int  # open now
    opened: int  # total ever added
    released: int  # total ever released
    in_flight: int  # requests running on open handles


class HandleTable(Generic[HandleT]):
    """fh -> Handle for one mount; keeps each inode's open count in ``inodes``."""

    def __init__(self, inodes: InodeTable) -> None:
        self.inodes = inodes
        self._lock = threading.Lock()  # guards _handles and the counters
        self._handles: dict[int, HandleT] = {}
        self._next_fh = 1
        self._released = 0

    def add(self, handle: HandleT) -> int:
        """Enter ``handle``: counts an open on its inode, assigns and returns its fh.
        ``OSError(ESTALE)`` if the inode already left the inode table."""
        self.inodes.open(handle.inode)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            handle.fh = fh
            self._handles[fh] = handle
        return fh

    def get(self, fh: int) -> HandleT:
        """The handle for ``fh``; ``OSError(EBADF)`` if unknown or released."""
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        return handle

    def begin_io(self, fh: int) -> HandleT:
        """``get(fh)`` and ``handle.io.begin_io()`` in one step under the table lock, so a
        concurrent ``release`` either waits for this request or makes it fail with EBADF.
        The caller must call ``handle.io.end_io()`` once the request stops using the fd."""
        with self._lock:
            handle = self._handles.get(fh)
            if handle is None:
                raise OSError(errno.EBADF, f"unknown file handle {fh}")
            handle.io.begin_io()
        return handle

    async def release(self, fh: int) -> HandleT:
        """Remove ``fh`` now, wait (shielded) for its in-flight requests, close the handle,
        then drop the inode's open count (which may evict the inode). ``OSError(EBADF)`` if
        unknown. Cancellation cannot interrupt the teardown; it takes effect afterwards."""
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is None:
                raise OSError(errno.EBADF, f"unknown file handle {fh}")
            self._released += 1
        try:
            await handle.wait_drained()
        finally:
            try:
                handle.close()
            finally:
                self.inodes.close(handle.inode)
        return handle

    async def release_all(self) -> None:
        """Destroy: release every handle still open, one after the other."""
        with self._lock:
            fhs = list(self._handles)
        for fh in fhs:
            try:
                await self.release(fh)
            except OSError:
                pass  # released concurrently meanwhile

    def statistics(self) -> HandleTableStatistics:
        with self._lock:
            handles = list(self._handles.values())
            opened, released = self._next_fh - 1, self._released
        return HandleTableStatistics(
            handles=len(handles),
            opened=opened,
            released=released,
            in_flight=sum(handle.io.count for handle in handles),
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)
