"""close_fd: close an fd the daemon is done with, off the request path when it can.

The last close of a file can be the dearest syscall a request pays for: when the file was
unlinked, that close is what frees it (ext4 truncates its blocks and frees the inode, in
the closing thread: 60-120 µs measured under rm -rf). The O_PATH fd an inode holds is
closed when the kernel forgets the inode, and after an unlink it forgets it at once: the
FORGET waits on /dev/fuse in front of the caller's next request, which then waits for the
freeing too.

So with an io_uring active (``uring.ACTIVE``, set by the runner) that can close, and on
its thread, the close goes to the ring as IORING_OP_CLOSE with IOSQE_ASYNC: an io-wq
worker closes the fd, and does the freeing, on whichever CPU is free while the loop
answers the next request. Otherwise, or when the ring cannot take it now, ``os.close``.

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


def close_fd(fd: int) -> None:
    """Close ``fd``, now or on an io-wq worker (see the module docstring). Never raises:
    a close error comes after the fd is released, and is only logged."""
    ring = uring.ACTIVE
    if ring is not None and ring.closes and ring.thread == threading.get_ident():
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
