"""InFlight: counts of in-flight requests, per handle, per inode and per mount.

The userspace form of the netfs ``io_count`` fix: release, forget-to-zero and unmount wait
until every request that may still touch a backing fd has finished. A count is separate
from object references (the seed ``fuse_io_priv`` fix): holding a reference keeps an object
alive, an in-flight count says work is running that teardown must wait for.

Counts nest: ``begin_io()`` on a handle's counter also counts on its inode's and on the
mount's, so each level can be drained on its own. ``end_io()`` may be called from any thread
(a read completion runs in a worker); waiters are woken on their own trio loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class InFlightStatistics:
    in_flight: int
    begun: int
    waiters: int


class InFlight:
    """A thread-safe in-flight counter with an awaitable ``wait_drained()``.

    ``parent``: the counter one level up (inode for a handle, mount for an inode); every
    begin/end is mirrored there.
    """

    def __init__(self, parent: InFlight | None = None) -> None:
        self.parent = parent
        self._lock = threading.Lock()
        self._count = 0  # guarded by _lock
        self._begun = 0  # guarded by _lock; total ever begun, for statistics
        self._waiters: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []  # guarded by _lock

    @property
    def count(self) -> int:
        return self._count

    def begin_io(self) -> None:
        with self._lock:
            self._count += 1
            self._begun += 1
        if self.parent is not None:
            self.parent.begin_io()

    def end_io(self) -> None:
        with self._lock:
            if self._count <= 0:
                raise AssertionError("InFlight.end_io() without a matching begin_io()")
            self._count -= 1
            wake = self._waiters if self._count == 0 else []
            if wake:
                self._waiters = []
        for token, event in wake:
            # run_sync_soon is safe from any thread, the loop's own included.
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass
        if self.parent is not None:
            self.parent.end_io()

    async def wait_drained(self) -> None:
        """Return once no request is in flight: at once, without a checkpoint, when none
        is (the common case: a RELEASE after the last read), so the native session serves
        the request inline.

        Cancellation: a cancelled waiter stops waiting; the requests go on. Callers that
        must not stop waiting (release, unmount) shield themselves.
        """
        while True:
            with self._lock:
                if self._count == 0:
                    return
                event = trio.Event()
                self._waiters.append((trio.lowlevel.current_trio_token(), event))
            await event.wait()

    def statistics(self) -> InFlightStatistics:
        with self._lock:
            return InFlightStatistics(self._count, self._begun, len(self._waiters))
