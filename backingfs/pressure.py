"""LoopPressure: is other work waiting for the event loop right now?

The queued path exists for overlap: while one request waits for the disk, others proceed.
Overlap only pays when there *are* others, and a worker round trip is not free (on a small
VM a thread wake-up costs 100-200 µs, more than a 128 KiB read from a host-cached disk).
So a read that missed the page cache is done inline, blocking the loop for just that read,
when nothing else is waiting; and queued to a worker when something is.

"Something is waiting" is read off the FUSE device: it polls readable while the kernel
holds requests the daemon has not read yet (fuse_dev_poll). The session registers its
device fd once mounted; without one (unit tests, tools) the loop always counts as busy and
requests go to the workers, which keeps their behaviour deterministic.
"""

from __future__ import annotations

import os
import select


class LoopPressure:
    def __init__(self) -> None:
        self._poll: select.poll | None = None

    def watch(self, fd: int) -> None:
        """Treat ``fd`` polling readable as "requests are waiting"."""
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        self._poll = poll

    def unwatch(self) -> None:
        self._poll = None

    def is_idle(self) -> bool:
        """True when nothing waits for the loop, so blocking it briefly costs no one."""
        poll = self._poll
        if poll is None:
            return False
        try:
            return not poll.poll(0)
        except OSError:
            return False


#: The process-wide probe; a daemon serves one mount.
PRESSURE = LoopPressure()


def find_device_fd(path: str = "/dev/fuse") -> int | None:
    """The highest open fd of this process that refers to ``path`` (the session's)."""
    found = None
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == path:
                fd = int(name)
                found = fd if found is None else max(found, fd)
        except OSError:
            continue
    return found
