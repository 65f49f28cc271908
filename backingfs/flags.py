"""Request flags (the kernel's IOCB_* bits), the mask of those that travel down, RWF mapping.

The values of the five flags that may reach the backing file are the ``os.RWF_*`` values
themselves, exactly as the kernel defines IOCB_NOWAIT/HIPRI/DSYNC/SYNC/APPEND numerically
equal to the RWF bits: converting a masked request to ``preadv2``/``pwritev2`` flags is a
mask and an ``int()``. DIRECT and WRITE describe the stacked request and never travel down:
O_DIRECT is a property of how the backing fd was opened, and WRITE is the direction.
"""

from __future__ import annotations

import enum
import os


class IocbFlags(enum.IntFlag):
    """Per-request flags; the first five equal their ``os.RWF_*`` counterparts."""

    NONE = 0
    HIPRI = os.RWF_HIPRI
    DSYNC = os.RWF_DSYNC
    SYNC = os.RWF_SYNC
    NOWAIT = os.RWF_NOWAIT
    APPEND = os.RWF_APPEND
    DIRECT = 1 << 17
    WRITE = 1 << 18


#: The flags a stacked request may pass to the backing file; the same for both consumers.
BACKING_IOCB_MASK = (
    IocbFlags.APPEND | IocbFlags.DSYNC | IocbFlags.SYNC | IocbFlags.HIPRI | IocbFlags.NOWAIT
)

#: Durability flags a consumer drops when its sync policy is off (fsync=0, volatile).
SYNC_FLAGS = IocbFlags.DSYNC | IocbFlags.SYNC


def from_open_flags(open_flags: int) -> IocbFlags:
    """The request flags implied by a file's open flags (what the kernel's iocb_flags() does).

    O_SYNC implies O_DSYNC on Linux (O_SYNC == __O_SYNC | O_DSYNC), so both bits come out set.
    """
    flags = IocbFlags.NONE
    if open_flags & os.O_APPEND:
        flags |= IocbFlags.APPEND
    if open_flags & os.O_DIRECT:
        flags |= IocbFlags.DIRECT
    if open_flags & os.O_DSYNC:
        flags |= IocbFlags.DSYNC
    if (open_flags & os.O_SYNC) == os.O_SYNC:
        flags |= IocbFlags.SYNC
    if open_flags & os.O_NONBLOCK:
        # A non-blocking open does not make file I/O non-blocking on Linux; NOWAIT is a
        # per-request choice (preadv2 RWF_NOWAIT), never inferred from O_NONBLOCK.
        pass
    return flags


#: Plain-int twins for the per-request hot path: IntFlag arithmetic costs microseconds a
#: call, an int operation tens of nanoseconds. Request.flags is a plain int.
MASK = int(BACKING_IOCB_MASK)
APPEND = int(IocbFlags.APPEND)
NOWAIT = int(IocbFlags.NOWAIT)
WRITE = int(IocbFlags.WRITE)
DIRECT = int(IocbFlags.DIRECT)
SYNCS = int(SYNC_FLAGS)


def to_rwf(flags: int) -> int:
    """``preadv2``/``pwritev2`` flags for a request: the masked bits, nothing else."""
    return int(flags) & MASK
