"""read_iter / write_iter: the backing-file.c skeleton, sync and queued, and awaitable helpers.

Both entry points have the kernel's one shape: sanity check -> empty request returns 0 (no
callback) -> (write) strip privileges -> mask the flags -> sync or queued branch ->
``accessed`` / ``end_write``. Callbacks always receive ``req.file``, the stacked handle.

Sync request (``req.complete is None``): ``preadv2``/``pwritev2`` at ``req.pos`` on the
calling thread, position advanced in place, then the callback, also on failure. Use it in
worker threads (copy-up) and tests; a trio handler uses the queued helpers below.

Queued request: a BackingAio (see aio.py) does the I/O in a worker thread; reads first try
``RWF_NOWAIT`` on the calling thread and complete inline when the data is cached.

APPEND: backing fds never carry O_APPEND. An APPEND request is written with RWF_APPEND, so
the backing fs places it at its EOF atomically; ``req.pos`` is set to the EOF seen at
submission, which the caller makes exact by holding the stacked inode's lock.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import trio

from .aio import QUEUED, BackingAio, _Queued
from .backing_file import BackingFile
from .context import BackingFileCtx
from .flags import IocbFlags, to_rwf
from .inflight import InFlight
from .request import Request
from .workers import Workers, default_workers

#: Optional hook run before a write: strip privileges on the stacked object (privs.py).
RemovePrivs = Callable[[Any], None]


def _check_backing(file: object) -> BackingFile:
    # The kernel's FMODE_BACKING check: a stacked handle must never reach the backing side.
    if not isinstance(file, BackingFile):
        raise OSError(errno.EIO, f"not a backing file: {file!r}")
    return file


def read_iter(file: BackingFile, buf: bytearray | memoryview, req: Request,
              ctx: BackingFileCtx, *, io: InFlight | None = None,
              workers: Workers | None = None) -> int | _Queued:
    """Read into ``buf`` from ``file`` at ``req.pos`` on behalf of ``req``.

    Returns the byte count (sync, or queued that completed inline) or QUEUED; raises
    OSError on failure. ``accessed(req.file)`` runs after the attempt in every case.
    """
    _check_backing(file)
    if len(buf) == 0:
        return 0
    flags = req.flags & ~ctx.drop_flags
    try:
        if req.is_sync:
            n = os.preadv(file.fd, [buf], req.pos, to_rwf(flags))
            req.pos += n
            return n
        aio = BackingAio(req, req.clone(file, flags), file, buf, is_write=False,
                         end_write=None, io=io)
        return aio.submit(workers or default_workers(), try_inline=True)
    finally:
        ctx.accessed(req.file)


def write_iter(file: BackingFile, data: Any, req: Request, ctx: BackingFileCtx, *,
               io: InFlight | None = None, workers: Workers | None = None,
               remove_privs: RemovePrivs | None = None) -> int | _Queued:
    """Write ``data`` to ``file`` at ``req.pos`` (or its EOF with APPEND) on behalf of ``req``.

    Returns the byte count (sync) or QUEUED; raises OSError on failure. ``end_write(
    req.file, pos, result)`` runs after every attempt, with the final position; on the
    queued path it runs on the trio loop before the caller's completion.
    """
    _check_backing(file)
    if len(data) == 0:
        return 0
    if remove_privs is not None:
        remove_privs(req.file)  # an error here is returned before any I/O
    flags = (req.flags & ~ctx.drop_flags) | IocbFlags.WRITE
    if flags & IocbFlags.APPEND:
        req.pos = os.fstat(file.fd).st_size
    if not req.is_sync:
        aio = BackingAio(req, req.clone(file, flags), file, data, is_write=True,
                         end_write=ctx.end_write, io=io)
        return aio.submit(workers or default_workers(), try_inline=False)
    view = memoryview(data)
    done = 0
    rwf = to_rwf(flags)
    try:
        while done < len(view):
            n = os.pwritev(file.fd, [view[done:]], req.pos, rwf)
            if n == 0:
                break
            done += n
            req.pos += n
    except OSError as exc:
        if not done:
            ctx.end_write(req.file, req.pos, -(exc.errno or errno.EIO))
            raise
    if flags & IocbFlags.APPEND:
        req.pos = os.fstat(file.fd).st_size
    ctx.end_write(req.file, req.pos, done)
    return done


class _Waiter:
    """The caller's completion for the awaitable helpers: records the result, wakes the task."""

    __slots__ = ("token", "event", "result")

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.event = trio.Event()
        self.result = 0

    def __call__(self, req: Request, res: int) -> None:
        self.result = res
        self.token.run_sync_soon(self.event.set)

    async def wait(self, ret: int | _Queued) -> int:
        if ret is QUEUED:
            await self.event.wait()
            ret = self.result
        else:
            await trio.lowlevel.checkpoint()
        assert isinstance(ret, int)
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))
        return ret


async def read(file: BackingFile, size: int, req: Request, ctx: BackingFileCtx, *,
               io: InFlight | None = None, workers: Workers | None = None) -> memoryview:
    """Read up to ``size`` bytes for ``req`` (whose completion this helper sets).

    Cancellation: the caller stops waiting; a queued read keeps its own references and
    finishes in its worker.
    """
    buf = bytearray(size)
    waiter = _Waiter()
    req.complete = waiter
    n = await waiter.wait(read_iter(file, buf, req, ctx, io=io, workers=workers))
    return memoryview(buf)[:n]


async def write(file: BackingFile, data: Any, req: Request, ctx: BackingFileCtx, *,
                io: InFlight | None = None, workers: Workers | None = None,
                remove_privs: RemovePrivs | None = None) -> int:
    """Write ``data`` for ``req`` (whose completion this helper sets); returns the count.

    ``end_write`` has run on the trio loop before this returns. Cancellation as ``read``.
    """
    waiter = _Waiter()
    req.complete = waiter
    return await waiter.wait(write_iter(file, data, req, ctx, io=io, workers=workers,
                                        remove_privs=remove_privs))
