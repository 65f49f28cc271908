"""Sync policy: whether fsync and O_SYNC/O_DSYNC reach the backing files, and volatile errors.

Overlayfs has ``fsync=auto|strict|volatile`` (and fuse-overlayfs ``fsync=0``): when syncing is
off, fsync/fdatasync are skipped and DSYNC/SYNC are dropped from every write request
(:attr:`SyncPolicy.drop_flags`, fed to ``BackingFileCtx.drop_flags``). Skipping must not
turn lost data into silent success, so under ``volatile`` the first backing write error is
remembered (:meth:`SyncPolicy.record_error`, the kernel's errseq check against the upper
superblock) and from then on every fsync fails with it, for the life of the mount.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import trio

from backingfs import uring
from backingfs.flags import SYNC_FLAGS, IocbFlags


def fsync(fd: int, datasync: bool, *, volatile: bool) -> None:
    """fdatasync (``datasync``) or fsync ``fd``; nothing at all when ``volatile``.

    Errors propagate as OSError. Blocking: run in a worker thread.
    """
    if volatile:
        return
    if datasync:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


async def fsync_queued(fd: int, datasync: bool) -> None:
    """fdatasync (``datasync``) or fsync ``fd`` without blocking the trio loop.

    On the io_uring when one is active on this thread: the kernel's own worker waits for
    the disk and the completion comes back through the ring's eventfd, with no Python
    thread hop (100-200 us each way on a small VM, as long as the fsync of a small file).
    Else in a worker thread. Not cancellable: ``fd`` must stay open until the kernel is done
    with it, and a sync is bounded. Errors propagate as OSError.
    """
    ring = uring.ACTIVE
    if ring is not None and ring.thread == threading.get_ident():
        done = trio.Event()
        result = 0

        def complete(res: int) -> None:
            nonlocal result
            result = res
            done.set()

        try:
            ring.submit(uring.IORING_OP_FSYNC, fd, 0, 0, 0,
                        uring.IORING_FSYNC_DATASYNC if datasync else 0, complete)
        except OSError:
            pass  # busy or closed: a worker does it
        else:
            with trio.CancelScope(shield=True):
                await done.wait()
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            return
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)


@dataclass
class SyncPolicy:
    """A mount's durability switch.

    ``fsync``: False means fsync requests are answered without syncing (fuse-overlayfs
    ``fsync=0``). ``volatile``: nothing is synced and write errors become sticky (see the
    module docstring). Either one turns syncing off and drops DSYNC/SYNC from requests.
    ``record_error`` may be called from worker threads.
    """

    fsync: bool = True
    volatile: bool = False
    _error: int | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @property
    def is_syncing(self) -> bool:
        """Whether fsync and DSYNC/SYNC reach the backing files."""
        return self.fsync and not self.volatile

    @property
    def drop_flags(self) -> IocbFlags:
        """Request flags to drop before the backing call: DSYNC|SYNC when not syncing."""
        return IocbFlags.NONE if self.is_syncing else SYNC_FLAGS

    @property
    def error(self) -> int | None:
        """The remembered write errno (volatile only), or None."""
        return self._error

    def record_error(self, err: int) -> None:
        """Remember a backing write error; only the first counts, only under ``volatile``.

        Without volatile the error reached the writer and a later fsync re-reports writeback
        errors itself, so nothing needs remembering.
        """
        if not self.volatile or err <= 0:
            return
        with self._lock:
            if self._error is None:
                self._error = err

    def check_error(self) -> None:
        """Raise the remembered error as OSError, if any (what every later fsync answers)."""
        err = self._error
        if err is not None:
            raise OSError(err, f"earlier write error on a volatile mount: {os.strerror(err)}")

    def sync(self, fd: int, datasync: bool) -> None:
        """An fsync request under this policy: the sticky error first, then sync if on.

        Blocking: run in a worker thread (or use ``sync_queued``).
        """
        self.check_error()
        if self.is_syncing:
            fsync(fd, datasync, volatile=False)

    async def sync_queued(self, fd: int, datasync: bool) -> None:
        """``sync`` without blocking the trio loop (``fsync_queued``)."""
        self.check_error()
        if self.is_syncing:
            await fsync_queued(fd, datasync)

