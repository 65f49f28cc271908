"""BackingAio: one queued read or write on a backing file, the twin of the kernel's backing_aio.

It holds the cloned Request, one reference on its BackingFile, the caller's Request, the
buffer and ``end_write``. Its refcount starts at **2**: one for the submitter, one for
completion. Whichever of "submit returned" and "completion ran" comes last drops the final
reference, and only then are the BackingFile reference and the in-flight count released, so
no fd is closed under a running ``preadv``/``pwritev`` and teardown waits for it.

Completion runs exactly once, in order: position copied back to the caller's request, then
``end_write(stacked, pos, result)``, then the caller's completion. Read completions run in
the worker thread that did the I/O (nothing attribute-related happens there); write
completions are punted to the trio loop (the kernel's workqueue) so that attribute updates
are serialised with each other and with request handlers.

A request whose submission fails (workers shut down) is cleaned up by the submitter, which
raises; the caller's completion is then *not* called, exactly as with the kernel's
-EIOCBQUEUED rule. Requests that complete inline never get an aio (see rw.py).

io_uring (uring.py): while a ring is active (``uring.ACTIVE``, set by the runner) and the
caller did not pick its own Workers pool, ``submit`` on the loop thread hands the I/O to the
ring instead of a worker. Its completion runs on the loop, reads included: position, then a
continuation for a short transfer (a write resubmits its remainder, as the thread path
loops; a read resubmits unless it reached the backing EOF, since FUSE takes a short read
for EOF), then APPEND's fstat, then the same ``_complete``. A ring that is full, closed or
refuses the request sends it to the workers instead (a continuation too: ``_work`` resumes
at ``_done``). The buffer stays referenced by the aio and the ring until completion.

Cancellation: a queued request is never abandoned. A cancelled awaiter only stops waiting;
the worker keeps its references until it has finished.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import trio

from . import uring
from .backing_file import BackingFile
from .context import EndWrite
from .flags import APPEND, to_rwf
from .inflight import InFlight
from .request import Request
from .workers import Workers, WorkersShutDownError, default_workers

log = logging.getLogger(__name__)


class _Queued:
    """The QUEUED sentinel: the kernel's -EIOCBQUEUED."""

    _instance: _Queued | None = None

    def __new__(cls) -> _Queued:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "QUEUED"


QUEUED = _Queued()

_live_lock = threading.Lock()
_live = 0  # BackingAio objects not yet freed; guarded by _live_lock


def live_aios() -> int:
    """How many BackingAio have not reached refcount 0 (for leak checks)."""
    return _live


class BackingAio:
    """One queued request. See the module docstring for the whole lifecycle.

    Construction takes a reference on ``file`` (owned by this object) and begins one
    in-flight request on ``io``. ``submit()`` drops the submitter's reference.
    """

    __slots__ = ("clone", "orig", "file", "buf", "is_write", "end_write", "io", "token",
                 "_ref", "_lock", "_cleaned", "_done", "_ring", "_addr", "_len", "_keep")

    def __init__(self, orig: Request, clone: Request, file: BackingFile, buf: Any, *,
                 is_write: bool, end_write: EndWrite | None, io: InFlight | None) -> None:
        if orig.complete is None:
            raise ValueError("a queued request needs a completion callback")
        self.orig = orig
        self.clone = clone
        self.file = file.get()  # owned by the aio; dropped by the final put()
        self.buf = buf
        self.is_write = is_write
        self.end_write = end_write  # our own copy: the ctx belongs to the caller's frame
        self.io = io
        self._ref = 2  # submitter + completion
        self._lock = threading.Lock()
        self._cleaned = False
        self._done = 0  # bytes transferred so far (an inline attempt may do part of a write)
        self._ring: uring.Uring | None = None  # set while the I/O is on an io_uring
        self._addr = 0  # the buffer's address and length for the ring, and what pins it
        self._len = 0
        self._keep: Any = None
        try:
            self.token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self.token = None  # not in trio: write completions run in the worker
        global _live
        with _live_lock:
            _live += 1
        if io is not None:
            io.begin_io()

    # -- references ---------------------------------------------------------------

    def put(self) -> None:
        """Drop one reference; the last one releases the BackingFile and the io count."""
        with self._lock:
            self._ref -= 1
            ref = self._ref
        if ref > 0:
            return
        if ref < 0:
            raise AssertionError("BackingAio put() below zero")
        global _live
        with _live_lock:
            _live -= 1
        try:
            self.file.put()
        finally:
            if self.io is not None:
                self.io.end_io()

    # -- submission (submitter side) -----------------------------------------------

    def submit(self, workers: Workers | None = None) -> _Queued:
        """Queue the I/O and drop the submitter's reference; returns QUEUED.

        ``workers`` None (or the process-wide default pool) lets an active io_uring take
        the request when called on the ring's thread; a pool of the caller's own always
        gets it. Raises OSError(EIO) when the workers refuse the request; the
        completion-side cleanup (position, end_write) has then run and the caller's
        completion will not be called. (Inline completion, the NOWAIT read and the inline
        write, happens in rw.py before an aio is built at all: there is nothing to free
        then.)
        """
        ring = uring.ACTIVE
        if (ring is not None and ring.thread == threading.get_ident()
                and (workers is None or workers is default_workers())
                and self._ring_submit(ring)):
            self.put()
            return QUEUED
        try:
            (workers or default_workers()).submit(self._work)
        except WorkersShutDownError:
            self.put()
            self._cleanup(-errno.EIO)
            raise OSError(errno.EIO, "backing I/O workers are shut down") from None
        self.put()
        return QUEUED

    # -- the I/O (io_uring side, on the loop) ------------------------------------------

    def _ring_submit(self, ring: uring.Uring) -> bool:
        """Put the rest of the transfer (from ``_done``) on the ring; False: use a worker."""
        try:
            if self._keep is None:
                self._addr, self._len, self._keep = uring.buffer_address(
                    self.buf, writable=not self.is_write)
            # RWF_HIPRI is a polling hint the kernel refuses on a ring without IOPOLL.
            rwf = to_rwf(self.clone.flags) & ~os.RWF_HIPRI
            op = uring.IORING_OP_WRITE if self.is_write else uring.IORING_OP_READ
            ring.submit(op, self.file.fd, self._addr + self._done, self._len - self._done,
                        self.clone.pos, rwf, self._ring_done, self._keep)
        except (OSError, TypeError, ValueError) as exc:
            log.debug("io_uring refused %r: %s; using a worker", self, exc)
            self._ring = None
            return False
        self._ring = ring
        return True

    def _ring_done(self, res: int) -> None:
        """The ring's completion, on the loop thread: continue a short transfer, or finish."""
        ring = self._ring
        clone = self.clone
        if res > 0:
            self._done += res
            clone.pos += res
            if self._done < self._len and self._wants_more():
                if ring is not None and self._ring_submit(ring):
                    return
                try:
                    default_workers().submit(self._work)  # resumes at _done
                    return
                except WorkersShutDownError:
                    pass  # complete with the partial count
        self._ring = None
        self._keep = None
        if self._done:
            res = self._done
        if self.is_write and clone.flags & APPEND and res > 0:
            try:
                clone.pos = os.fstat(self.file.fd).st_size
            except OSError as exc:
                log.warning("fstat after an append failed: %s", exc)
        self._complete(res)

    def _wants_more(self) -> bool:
        """After a short transfer: a write always continues; a read unless at EOF."""
        if self.is_write:
            return True
        try:
            return self.clone.pos < os.fstat(self.file.fd).st_size
        except OSError:
            return False

    # -- the I/O (worker side) -------------------------------------------------------

    def _work(self) -> None:
        res = self._do_io()
        if self.is_write and self.token is not None:
            try:
                self.token.run_sync_soon(self._complete, res)
                return
            except trio.RunFinishedError:
                log.warning("write completed after the trio loop ended; completing in worker")
        self._complete(res)

    def _do_io(self) -> int:
        file, clone = self.file, self.clone
        rwf = to_rwf(clone.flags)
        try:
            if not self.is_write:
                done = self._done  # non-zero when resuming a short ring read
                n = os.preadv(file.fd, [memoryview(self.buf)[done:] if done else self.buf],
                              clone.pos, rwf)
                clone.pos += n
                return done + n
            view = memoryview(self.buf)
            while self._done < len(view):
                n = os.pwritev(file.fd, [view[self._done:]], clone.pos, rwf)
                if n == 0:
                    break
                self._done += n
                clone.pos += n
            if clone.flags & APPEND:
                # RWF_APPEND placed the data at the backing EOF whatever clone.pos said; the
                # end of the file is where this write ended (unless another append raced).
                clone.pos = os.fstat(file.fd).st_size
            return self._done
        except OSError as exc:
            if self._done:
                return self._done
            return -(exc.errno or errno.EIO)

    # -- completion ----------------------------------------------------------------

    def _cleanup(self, res: int) -> None:
        """Completion-side cleanup: position back, end_write, drop the completion ref."""
        if self._cleaned:
            raise AssertionError("BackingAio completed twice")
        self._cleaned = True
        orig = self.orig
        try:
            orig.pos = self.clone.pos
            if self.end_write is not None:
                _call_safely(self.end_write, orig.file, orig.pos, res)
        finally:
            self.put()

    def _complete(self, res: int) -> None:
        orig = self.orig
        complete = orig.complete
        self._cleanup(res)
        assert complete is not None
        _call_safely(complete, orig, res)


def _call_safely(fn: Callable[..., None], *args: Any) -> None:
    """Run a callback; an exception is logged, never allowed into a worker or the loop."""
    try:
        fn(*args)
    except Exception:
        log.exception("backing I/O callback %r failed", fn)
