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

from .backing_file import BackingFile
from .context import EndWrite
from .flags import APPEND, to_rwf
from .inflight import InFlight
from .request import Request
from .workers import Workers, WorkersShutDownError

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
                 "_ref", "_lock", "_cleaned", "_done")

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

    def submit(self, workers: Workers) -> _Queued:
        """Queue the I/O and drop the submitter's reference; returns QUEUED.

        Raises OSError(EIO) when the workers refuse the request; the completion-side
        cleanup (position, end_write) has then run and the caller's completion will not be
        called. (Inline completion, the NOWAIT read and the inline write, happens in rw.py
        before an aio is built at all: there is nothing to free then.)
        """
        try:
            workers.submit(self._work)
        except WorkersShutDownError:
            self.put()
            self._cleanup(-errno.EIO)
            raise OSError(errno.EIO, "backing I/O workers are shut down") from None
        self.put()
        return QUEUED

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
                n = os.preadv(file.fd, [self.buf], clone.pos, rwf)
                clone.pos += n
                return n
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
