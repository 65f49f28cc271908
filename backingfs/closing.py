"""close_fd: close an fd the daemon is done with, off the request path when it can.

The last close of a file can be the dearest syscall a request pays for: when the file was
unlinked, that close is what frees it (ext4 truncates its blocks and frees the inode, in
the closing thread: 60-120 µs measured under rm -rf). The O_PATH fd an inode holds is
closed when the kernel forgets the inode, and after an unlink it forgets it at once: the
FORGET waits on /dev/fuse in front of the caller's next request, which then waits for the
freeing too.

The freeing costs in proportion to the file: 10 µs for an empty one, 0.3 ms for 1 MiB,
290 ms for 1 GiB (ext4, 2026-12-06: the blocks and the cached pages). So when the fd is
that of an unlinked file bigger than ASYNC_CLOSE_BYTES, and an io_uring that can close is
active (``uring.ACTIVE``, set by the runner) on this thread, the close goes to the ring as
IORING_OP_CLOSE with IOSQE_ASYNC: an io-wq worker closes the fd, and does the freeing,
while the loop answers the next request. Every other close is ``os.close`` at once, as is
one the ring cannot take now: handing a close to a worker costs a wake-up of it, and on a
machine with few CPUs the worker runs where the caller is about to (overlay rm -rf of the
Django tree, where every close frees a small file: 1.35-1.41 s through the ring, 1.09-1.17 s
closing at once, 2026-12-06). The native session applies FORGETs while the caller is being
woken anyway (``NativeSession._hold``), so a small file's close is off the request path.

The fd number stays taken until the worker has closed it, so nothing reuses it
meanwhile. The ring counts the close as pending like any queued I/O: the session's end
waits for it (runner) and the ring is never closed under it.
"""

from __future__ import annotations

import logging
import os
import threading

from . import uring

log = logging.getLogger(__name__)

#: An unlinked file bigger than this (allocated bytes) is closed on an io-wq worker.
ASYNC_CLOSE_BYTES = 64 << 10


def close_fd(fd: int) -> None:
    """Close ``fd``, now or on an io-wq worker (see the module docstring). Never raises:
    a close error comes after the fd is released, and is only logged."""
    ring = uring.ACTIVE
    if (ring is not None and ring.closes and ring.thread == threading.get_ident()
            and _frees_much(fd)):
        try:
            ring.submit(uring.IORING_OP_CLOSE, fd, 0, 0, 0, 0,
                        lambda res: _closed(fd, res), sqe_flags=uring.IOSQE_ASYNC)
            return
        except OSError:
            pass  # full or closed: nothing was queued
    try:
        os.close(fd)
    except OSError as e:
        log.debug("close(%d): %s", fd, e)


def _closed(fd: int, res: int) -> None:
    if res < 0:
        # Never retried with os.close: the kernel releases the number even when the close
        # fails, and by now it may name another file. (EBADF would be a double close of
        # ours; an entry the ring refused outright, a bug already logged by uring.py,
        # leaves the fd open.)
        log.error("io_uring close(%d): %s", fd, os.strerror(-res))


def _frees_much(fd: int) -> bool:
    """Whether closing ``fd`` may free a file bigger than ASYNC_CLOSE_BYTES: it is
    unlinked and that big (the close frees it if no other fd holds it)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False  # the close reports what is wrong
    return st.st_nlink == 0 and st.st_blocks * 512 > ASYNC_CLOSE_BYTES
