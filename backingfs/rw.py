"""read_iter / write_iter: the backing-file.c skeleton, sync and queued, and awaitable helpers.

Both entry points have the kernel's one shape: sanity check -> empty request returns 0 (no
callback) -> (write) strip privileges -> mask the flags -> sync or queued branch ->
``accessed`` / ``end_write``. Callbacks always receive ``req.file``, the stacked handle.

Sync request (``req.complete is None``): ``preadv2``/``pwritev2`` at ``req.pos`` on the
calling thread, position advanced in place, then the callback, also on failure. Use it in
worker threads (copy-up) and tests; a trio handler uses the queued helpers below.

Queued request: a BackingAio (aio.py) does the I/O in a worker thread. Two cases complete
*inline* instead, on the calling thread, returning the result without calling the caller's
completion (the kernel's "not -EIOCBQUEUED"), and never build an aio:
- reads first try ``RWF_NOWAIT``: served from the page cache without blocking; on EAGAIN,
  with ``ctx.inline_io`` and no other request waiting for the loop (pressure.py), the read
  blocks inline, else it goes to a worker;
- with ``ctx.inline_io``, buffered writes run inline; one that takes longer than
  its budget (dirty-page throttling, a slow disk) sends the file's next
  WRITE_BACKOFF writes to the workers, so a stalled disk stops stalling the loop.

APPEND: backing fds never carry O_APPEND. An APPEND request is written with RWF_APPEND, so
the backing fs places it at its EOF atomically; ``req.pos`` is set to the EOF seen at
submission, which the caller makes exact by holding the stacked inode's lock.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from . import syscalls, uring
from .aio import QUEUED, BackingAio, _Queued
from .backing_file import BackingFile
from .context import BackingFileCtx
from .flags import APPEND, MASK, NOWAIT, SYNCS, WRITE
from .fsapi import ReadDone
from .inflight import InFlight
from .pressure import PRESSURE
from .request import Request
from .workers import Workers

log = logging.getLogger(__name__)

#: Optional hook run before a write: strip privileges on the stacked object (privs.py).
RemovePrivs = Callable[[Any], None]

#: An inline write slower than INLINE_WRITE_BUDGET seconds plus one second per
#: INLINE_WRITE_RATE bytes (a write running slower than a slow disk) moves the file's
#: writes to the workers for a while.
INLINE_WRITE_BUDGET = 0.002
INLINE_WRITE_RATE = 100 << 20
#: How many queued writes follow a slow inline write before inline is tried again.
WRITE_BACKOFF = 64


def _check_backing(file: object) -> BackingFile:
    # The kernel's FMODE_BACKING check: a stacked handle must never reach the backing side.
    if type(file) is not BackingFile and not isinstance(file, BackingFile):
        raise OSError(errno.EIO, f"not a backing file: {file!r}")
    return file  # type: ignore[return-value]


#: Larger reads never block the loop, idle or not: they are readahead (up to 1 MiB on the
#: native session, runner.READAHEAD_KB), and the kernel sends the next one while this one
#: reads; queued, the disk read of one overlaps the reply copy of the other.
INLINE_READ_MAX = 64 * 1024
#: After NOWAIT_MISS_STREAK small reads of a file in a row missed the page cache, the next
#: NOWAIT_SKIP small reads go straight to the queue: the attempt costs a syscall and starts
#: the readahead the queued read then waits for, and on a cold random reader it is
#: wasted every time (measured: a third of the daemon's time at queue depth 16). The
#: queued read finds cached pages just as well (io_uring completes them at submission), so
#: a file that turned warm only pays a little more until the next attempt hits.
NOWAIT_MISS_STREAK = 4
NOWAIT_SKIP = 16
#: statfs f_type of filesystems that keep files in memory (tmpfs, ramfs): no RWF_NOWAIT,
#: and no read that waits for a device (swap aside).
MEMORY_FS = frozenset({0x01021994, 0x858458F6})


def _read_nowait(file: BackingFile, buf: Any, pos: int, flags: int) -> int | None:
    """The read fast path on the calling thread. None: go queued. Raises on a real error
    (and EAGAIN when the caller itself asked for NOWAIT)."""
    small = len(buf) <= INLINE_READ_MAX and not flags & NOWAIT
    if small and file.nowait_skip:
        file.nowait_skip -= 1
        return None
    rwf = (flags & MASK) | NOWAIT
    try:
        n = os.preadv(file.fd, [buf], pos, rwf)
    except BlockingIOError:
        if flags & NOWAIT:
            raise
        if small:
            file.nowait_misses += 1
            if file.nowait_misses >= NOWAIT_MISS_STREAK:
                file.nowait_skip = NOWAIT_SKIP
        return None
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            file.nowait_ok = False
            file.in_memory = syscalls.fs_type(file.fd) in MEMORY_FS
            return None
        raise
    file.nowait_misses = 0
    # Only part was cached? A short read means EOF to FUSE, so unless this is the end of
    # the file the whole request goes to a worker.
    if 0 < n < len(buf) and not flags & NOWAIT and pos + n < os.fstat(file.fd).st_size:
        return None
    return n


def _loop_idle() -> bool:
    """Nothing waits for the loop: no FUSE request unread, no ring completion to come (a
    blocking read would delay those; and the ring's count costs no syscall)."""
    ring = uring.ACTIVE
    if ring is not None and ring.pending:
        return False
    return PRESSURE.is_idle()


def read_iter(file: BackingFile, buf: bytearray | memoryview, req: Request,
              ctx: BackingFileCtx, *, io: InFlight | None = None,
              workers: Workers | None = None, may_block: bool = True) -> int | _Queued:
    """Read into ``buf`` from ``file`` at ``req.pos`` on behalf of ``req``.

    Returns the byte count (sync, or queued that completed inline) or QUEUED; raises
    OSError on failure. ``accessed(req.file)`` runs after the attempt in every case.
    ``may_block`` False: a queued request never blocks the calling thread on a cache miss,
    even with the loop idle (``read_start``: its completion costs no task wake-up).
    """
    _check_backing(file)
    if len(buf) == 0:
        return 0
    flags = req.flags & ~int(ctx.drop_flags)
    try:
        if req.is_sync:
            n = os.preadv(file.fd, [buf], req.pos, flags & MASK)
            req.pos += n
            return n
        # Nobody else waiting: block right here (no thread hop). Checked before the NOWAIT
        # attempt, which on a miss starts the readahead and then fails: measured 40-90 us
        # of the ~100 us a cold 4 KiB read costs, for nothing, when we may block anyway.
        # tmpfs takes no RWF_NOWAIT, and the ring would hand each read to an io-wq
        # thread (measured: 112 us a 4 KiB READ against 50 inline); no read of it waits
        # for a device.
        if (ctx.inline_io and len(buf) <= INLINE_READ_MAX and not flags & NOWAIT
                and (file.in_memory or may_block and _loop_idle())):
            n = os.preadv(file.fd, [buf], req.pos, flags & MASK)
            req.pos += n
            return n
        if file.nowait_ok:
            n = _read_nowait(file, buf, req.pos, flags)
            if n is not None:
                req.pos += n
                return n
        aio = BackingAio(req, req.clone(file, flags), file, buf, is_write=False,
                         end_write=None, io=io)
        return aio.submit(workers)
    finally:
        ctx.accessed(req.file)


def _write_sync(file: BackingFile, data: Any, req: Request, ctx: BackingFileCtx,
                flags: int) -> int:
    """The sync write: on this thread, position advanced in place, end_write always."""
    view = memoryview(data)
    done = 0
    rwf = flags & MASK
    try:
        while done < len(view):
            n = os.pwritev(file.fd, [view[done:] if done else view], req.pos, rwf)
            if n == 0:
                break
            done += n
            req.pos += n
    except OSError as exc:
        if not done:
            ctx.end_write(req.file, req.pos, -(exc.errno or errno.EIO))
            raise
    if flags & APPEND:
        req.pos = os.fstat(file.fd).st_size
    ctx.end_write(req.file, req.pos, done)
    return done


def write_iter(file: BackingFile, data: Any, req: Request, ctx: BackingFileCtx, *,
               io: InFlight | None = None, workers: Workers | None = None,
               remove_privs: RemovePrivs | None = None) -> int | _Queued:
    """Write ``data`` to ``file`` at ``req.pos`` (or its EOF with APPEND) on behalf of ``req``.

    Returns the byte count (sync, or queued that completed inline) or QUEUED; raises
    OSError on failure. ``end_write(req.file, pos, result)`` runs after every attempt,
    with the final position; on the queued path it runs on the trio loop before the
    caller's completion.
    """
    _check_backing(file)
    if len(data) == 0:
        return 0
    if remove_privs is not None:
        remove_privs(req.file)  # an error here is returned before any I/O
    flags = (req.flags & ~int(ctx.drop_flags)) | WRITE
    if flags & APPEND:
        req.pos = os.fstat(file.fd).st_size
    if req.is_sync:
        return _write_sync(file, data, req, ctx, flags)
    if ctx.inline_io and not flags & SYNCS and not file.flags & os.O_DIRECT:
        if file.write_backoff == 0:
            start = time.monotonic()
            try:
                return _write_sync(file, data, req, ctx, flags)
            finally:
                budget = INLINE_WRITE_BUDGET + len(data) / INLINE_WRITE_RATE
                if time.monotonic() - start > budget:
                    file.write_backoff = WRITE_BACKOFF
        else:
            file.write_backoff -= 1
    aio = BackingAio(req, req.clone(file, flags), file, data, is_write=True,
                     end_write=ctx.end_write, io=io)
    return aio.submit(workers)


class _Waiter:
    """The caller's completion for the awaitable helpers: records the result, wakes the task
    (directly when the completion runs on the loop thread, as write completions do)."""

    __slots__ = ("token", "thread", "event", "result")

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.get_ident()
        self.event = trio.Event()
        self.result = 0

    def __call__(self, req: Request, res: int) -> None:
        self.result = res
        if threading.get_ident() == self.thread:
            self.event.set()
        else:
            self.token.run_sync_soon(self.event.set)

    async def wait(self) -> int:
        await self.event.wait()
        ret = self.result
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))
        return ret


def read_start(file: BackingFile, size: int, req: Request, ctx: BackingFileCtx,
               done: ReadDone, *, io: InFlight | None = None,
               workers: Workers | None = None,
               held: InFlight | None = None) -> memoryview | None:
    """Read up to ``size`` bytes for ``req`` (whose completion this helper sets), with a
    callback instead of an await (``fsapi.Filesystem.read_start``): the data when the read
    completed inline, else None and ``done(data or OSError)`` runs later, on the calling
    thread (the trio loop), exactly once. Raises OSError when the read fails at once.

    ``held``: an in-flight count the caller began for this read (its handle's); ended
    once the read is over, whichever way, before ``done`` runs."""
    buf = bytearray(size)
    thread = threading.get_ident()
    try:
        token = trio.lowlevel.current_trio_token()

        def complete(_req: Request, res: int) -> None:
            if threading.get_ident() == thread:
                _finish(held, done, buf, res)
                return
            # A worker thread's read: the count ends on the loop, with the reply, so that
            # no teardown waiting for it can end the loop in between.
            try:
                token.run_sync_soon(_finish, held, done, buf, res)
            except trio.RunFinishedError:
                if held is not None:
                    held.end_io()

        req.complete = complete
        # Never blocking, even with the loop idle: a queued read answers from its
        # completion, which the native session's reader runs as soon as the ring posts it
        # (measured at queue depth 1 on a cold file: 7,000-9,000 reads/s against
        # 5,200-6,500 blocking).
        n = read_iter(file, buf, req, ctx, io=io, workers=workers, may_block=False)
    except BaseException:
        if held is not None:
            held.end_io()
        raise
    if n is QUEUED:
        return None
    if held is not None:
        held.end_io()
    return memoryview(buf)[:n]  # type: ignore[index]


def _finish(held: InFlight | None, done: ReadDone,
            buf: bytearray, res: int) -> None:
    if held is not None:
        held.end_io()
    _deliver(done, buf, res)


def _deliver(done: ReadDone, buf: bytearray, res: int) -> None:
    try:
        done(OSError(-res, os.strerror(-res)) if res < 0 else memoryview(buf)[:res])
    except Exception:  # it runs from the ring's reaper or trio's callback queue
        log.exception("read completion %r failed", done)


# The awaitable helpers complete inline requests without a checkpoint: they are the
# ``*_nowait`` twins of themselves for cached data, and every FUSE handler task
# checkpoints when it waits for its next request anyway.

async def read(file: BackingFile, size: int, req: Request, ctx: BackingFileCtx, *,
               io: InFlight | None = None, workers: Workers | None = None) -> memoryview:
    """Read up to ``size`` bytes for ``req`` (whose completion this helper sets).

    Cancellation: the caller stops waiting; a queued read keeps its own references and
    finishes in its worker.
    """
    buf = bytearray(size)
    waiter = _Waiter()
    req.complete = waiter
    n = read_iter(file, buf, req, ctx, io=io, workers=workers)
    if n is QUEUED:
        n = await waiter.wait()
    return memoryview(buf)[:n]  # type: ignore[misc]


async def write(file: BackingFile, data: Any, req: Request, ctx: BackingFileCtx, *,
                io: InFlight | None = None, workers: Workers | None = None,
                remove_privs: RemovePrivs | None = None) -> int:
    """Write ``data`` for ``req`` (whose completion this helper sets); returns the count.

    ``end_write`` has run on the trio loop before this returns. Cancellation as ``read``.
    """
    waiter = _Waiter()
    req.complete = waiter
    n = write_iter(file, data, req, ctx, io=io, workers=workers, remove_privs=remove_privs)
    if n is QUEUED:
        return await waiter.wait()
    return n  # type: ignore[return-value]
