"""Out of file descriptors: wait for the kernel to give some back, briefly.

A stacked filesystem holds an fd per inode the kernel caches; past RLIMIT_NOFILE the inode
table asks the kernel to prune its oldest unused inodes (inodes.py), and the fds come back
with the FORGETs, asynchronously. A request that meets EMFILE/ENFILE meanwhile calls
``relieve`` (prune now; False if the kernel cannot) and tries again after growing pauses,
for about 80 ms in all, so a caller sees EMFILE only when what is held is in use.
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

NO_FDS = (errno.EMFILE, errno.ENFILE)
#: Pauses between attempts (seconds): FORGETs arrive within a few milliseconds of a
#: prune; what is still held after ~80 ms is in use, and waiting longer only makes every
#: request of a mount that is really out of fds crawl.
DELAYS = (0.001, 0.005, 0.02, 0.05)


async def retry(relieve: Callable[[], bool], call: Callable[[], T | Awaitable[T]],
                error: OSError) -> T:
    """``call()`` again (plain or async) after ``error`` (EMFILE/ENFILE) while ``relieve()``
    says pruning may help; the last error when it never stops failing that way."""
    for delay in DELAYS:
        if not relieve():
            break
        await trio.sleep(delay)
        try:
            result = call()
            if inspect.isawaitable(result):
                result = await result
            return result  # type: ignore[return-value]
        except OSError as again:
            if again.errno not in NO_FDS:
                raise
            error = again
    raise error
