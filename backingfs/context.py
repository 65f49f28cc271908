"""BackingFileCtx: what a consumer passes with each read or write (the kernel's backing_file_ctx).

``accessed(stacked)`` runs after every read attempt; ``end_write(stacked, pos, result)``
after every write attempt, including failed ones (``result <= 0``), with ``pos`` the final
position. Both always receive the *stacked* (user-visible) handle, never a backing file
(the kernel's 2957fa4931a3 bug). They run before the reply is sent and must not assume any
credentials: on the queued path they run on the trio loop after the worker finished.

``creds`` is the credential policy the backing syscalls run under (see creds.py); the
default is the mounter's, i.e. the daemon's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .flags import IocbFlags

Accessed = Callable[[Any], None]
EndWrite = Callable[[Any, int, int], None]


def _no_accessed(stacked: Any) -> None:
    pass


def _no_end_write(stacked: Any, pos: int, result: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class BackingFileCtx:
    """Per-call context. ``drop_flags`` are removed before the call (DSYNC|SYNC under
    ``fsync=0``/``volatile``, APPEND under writeback cache).

    ``inline_io``: a queued request may complete on the calling (loop) thread, like one
    the backing fs finished without queuing: a buffered write always (a page-cache write
    costs microseconds where a worker round trip costs tens to hundreds; one that turns out
    slow, under dirty throttling, sends the file's next writes to the workers for a while),
    and a read that missed the cache when no other request is waiting (pressure.py). Never
    for DSYNC/SYNC writes or O_DIRECT files.
    """

    accessed: Accessed = _no_accessed
    end_write: EndWrite = _no_end_write
    creds: Any = None
    drop_flags: int = IocbFlags.NONE
    inline_io: bool = False
