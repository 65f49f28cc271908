"""BackingFile: the one owner of a backing fd, refcounted, closed only at zero.

Userspace fd numbers are reused at once, so a ``pwritev`` that runs after its fd was closed
writes into whatever file got the number next: silent corruption. Every in-flight request
therefore holds its own reference, and the fd is closed by whoever drops the last one.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass


class BackingFileClosedError(RuntimeError):
    """A reference was taken or dropped on a BackingFile that already reached zero."""


@dataclass(frozen=True)
class BackingFileStatistics:
    fd: int
    refs: int


class BackingFile:
    """A backing fd with a reference count.

    Created with one reference, owned by the creator (normally the stacked handle). ``get()``
    takes another, ``put()`` drops one; the fd is closed when the count reaches zero, by the
    thread that dropped it. Taking a reference on a file at zero is a bug and raises.

    Backing fds are never opened with O_APPEND (``open()`` strips it): ``pwrite`` ignores
    its offset on an O_APPEND fd, so appending is the request's APPEND flag instead.
    """

    __slots__ = ("fd", "flags", "nowait_ok", "in_memory", "nowait_misses", "nowait_skip",
                 "write_backoff", "_refs", "_lock", "__weakref__")

    def __init__(self, fd: int, flags: int = 0) -> None:
        if flags & os.O_APPEND:
            raise ValueError("backing fds must not carry O_APPEND; use IocbFlags.APPEND")
        self.fd = fd
        self.flags = flags  # the open flags, for the access mode and O_DIRECT
        # Cleared the first time the backing fs refuses RWF_NOWAIT (EOPNOTSUPP), so the
        # read fast path is not tried again on this fd.
        self.nowait_ok = True
        # Set with nowait_ok cleared when the fd is on a filesystem in memory (tmpfs):
        # none of its reads waits for a device, so small ones are made inline (rw.py).
        self.in_memory = False
        # RWF_NOWAIT misses of small reads in a row, and how many small reads still skip
        # the attempt after a run of them (rw.py: a cold random reader pays a syscall and a
        # readahead submission per read for nothing).
        self.nowait_misses = 0
        self.nowait_skip = 0
        # Queued writes still to send to the workers before an inline write is tried
        # again, after one was slow (rw.py); 0 means inline writes are allowed.
        self.write_backoff = 0
        self._refs = 1  # guarded by _lock
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | bytes, flags: int, mode: int = 0o666, *,
             dir_fd: int | None = None) -> BackingFile:
        """Open a backing file; O_APPEND is dropped, O_CLOEXEC added."""
        flags = (flags & ~os.O_APPEND) | os.O_CLOEXEC
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
        return cls(fd, flags)

    @property
    def refs(self) -> int:
        return self._refs

    @property
    def is_closed(self) -> bool:
        return self._refs == 0

    def get(self) -> BackingFile:
        with self._lock:
            if self._refs <= 0:
                raise BackingFileClosedError(f"get() on closed backing fd {self.fd}")
            self._refs += 1
        return self

    def put(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise BackingFileClosedError(f"put() on closed backing fd {self.fd}")
            self._refs -= 1
            last = self._refs == 0
        if last:
            os.close(self.fd)

    def statistics(self) -> BackingFileStatistics:
        return BackingFileStatistics(self.fd, self._refs)

    def __repr__(self) -> str:
        return f"<BackingFile fd={self.fd} refs={self._refs}>"
