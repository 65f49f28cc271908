"""Workers: the threads blocking backing syscalls run in (an io_uring backend may come later).

``submit(fn)`` queues ``fn`` and returns at once, like a block device accepting a bio: the
caller learns of the result only through what ``fn`` itself does on completion. Work is
never abandoned: ``shutdown()`` waits for every queued ``fn`` to finish, and a function
cannot be cancelled once queued (that is why the work itself holds its references).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

#: Enough threads for a queue depth of 16 per file on a couple of files (the async-overlap
#: target); each idle thread costs only its stack.
DEFAULT_THREADS = 32


class WorkersShutDownError(RuntimeError):
    """submit() after shutdown(): the request fails to submit and is cleaned up by its caller."""


@dataclass(frozen=True)
class WorkersStatistics:
    max_threads: int
    queued: int
    completed: int


class Workers:
    def __init__(self, max_threads: int = DEFAULT_THREADS, name: str = "backingfs-io") -> None:
        self.max_threads = max_threads
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._queued = 0
        self._completed = 0
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> None:
        """Queue ``fn``; raises WorkersShutDownError after shutdown(). ``fn`` must not raise:
        an exception escaping it would be lost, so request functions catch their own."""
        with self._lock:
            if self._closed:
                raise WorkersShutDownError("backing I/O workers are shut down")
            self._queued += 1
        try:
            self._pool.submit(self._run, fn)
        except RuntimeError as exc:  # the pool refused (interpreter shutting down)
            raise WorkersShutDownError(str(exc)) from exc

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        finally:
            with self._lock:
                self._completed += 1

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)

    def statistics(self) -> WorkersStatistics:
        with self._lock:
            return WorkersStatistics(self.max_threads, self._queued, self._completed)


_default: Workers | None = None
_default_lock = threading.Lock()


def default_workers() -> Workers:
    """The process-wide worker pool, made on first use."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Workers()
        return _default
