"""Request: the "iocb" of one read or write: target file, position, flags, completion.

A request without a completion callback is a *sync request*: the I/O runs before the call
returns. With one it is a *queued request*: the call may return ``QUEUED`` and the callback
runs later, exactly once. The caller's request is never handed to the backing side: the
backing side gets ``clone(backing_file)``, whose flags have passed through the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .flags import MASK, IocbFlags

#: ``complete(request, result)``; result is a byte count, or ``-errno`` on failure.
Completion = Callable[["Request", int], None]


class Request:
    """One read or write request.

    ``file``: the object the request targets. On a caller's request it is the *stacked*
    handle (what the user opened); on a clone it is the BackingFile. ``pos`` is advanced in
    place by the sync path and copied back from the clone on the queued path.
    """

    __slots__ = ("file", "pos", "flags", "complete")

    def __init__(self, file: Any, pos: int, flags: int = 0,
                 complete: Completion | None = None) -> None:
        if pos < 0:
            raise ValueError(f"negative position {pos}")
        self.file = file
        self.pos = pos
        self.flags = int(flags)  # IocbFlags bits as a plain int (see flags.MASK)
        self.complete = complete

    @property
    def is_sync(self) -> bool:
        """True for a sync request (no completion callback), as the kernel's is_sync_kiocb."""
        return self.complete is None

    def clone(self, backing_file: Any, flags: int | None = None) -> Request:
        """A sync request for ``backing_file`` at the same position.

        ``flags`` (default: this request's) pass through BACKING_IOCB_MASK, so DIRECT and
        WRITE never travel down. The clone has no completion of its own: the BackingAio
        that owns it completes the caller's request.
        """
        base = self.flags if flags is None else int(flags)
        return Request(backing_file, self.pos, base & MASK)

    def __repr__(self) -> str:
        kind = "sync" if self.is_sync else "queued"
        return (f"<Request {kind} pos={self.pos} flags={IocbFlags(self.flags)!r} "
                f"file={self.file!r}>")
