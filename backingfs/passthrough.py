"""Kernel FUSE passthrough bookkeeping: one backing id per inode, and which I/O mode each
inode's opens are in.

The kernel's rules (fs/fuse/iomode.c, passthrough.c, 6.9+), which this table keeps:
- A FUSE inode has at most one backing file. Every open of an inode that has one must be a
  passthrough open with the same backing id (any other reply fails that open), and an inode
  with cached (non-passthrough) opens refuses passthrough opens.
- The id is resolved after the OPEN reply, in the opener's context; so an id is registered
  at the inode's first passthrough open (``BACKING_OPEN``) and closed at the release of its
  last passthrough open (``BACKING_CLOSE``), never earlier.
- The kernel opens its own per-open backing file from the registered file's path with the
  user's flags: the mode of the fd we register does not matter.

``decide()`` is pure accounting plus the ioctls; it runs on the session's one thread, so an
OPEN and a RELEASE of the same inode can interleave only between calls, never inside one.
Registration can be refused (no CAP_SYS_ADMIN in the initial namespace, a backing file on a
stacked filesystem deeper than we declared): that open then goes the userspace way, and the
first refusal is logged once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import fuse_abi as abi

log = logging.getLogger(__name__)


def backing_open(devfd: int, fd: int) -> int:
    """Register ``fd`` with the connection; returns the backing id (> 0)."""
    arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
    # mutate_flag=True makes fcntl.ioctl return the syscall's result: the id.
    return fcntl.ioctl(devfd, abi.DEV_IOC_BACKING_OPEN, arg, True)


def backing_close(devfd: int, backing_id: int) -> None:
    arg = bytearray(backing_id.to_bytes(4, "little"))
    fcntl.ioctl(devfd, abi.DEV_IOC_BACKING_CLOSE, arg, True)


def file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@dataclass
class Registration:
    backing_id: int
    file_id: tuple[int, int]  # (st_dev, st_ino) of the registered file
    opens: int = 0


class BackingMismatchError(OSError):
    """An open offered a backing file other than the one its inode has registered: the
    kernel would serve it from the registered one. A filesystem bug; the open fails (EIO)."""

    def __init__(self, nodeid: int) -> None:
        super().__init__(errno.EIO, f"inode {nodeid}: open offers a backing file other "
                                    "than the registered one")


@dataclass
class PassthroughStatistics:
    registered: int
    passthrough_opens: int
    cached_opens: int
    refused: int


class BackingIds:
    """Per-inode backing ids and open modes of one connection."""

    def __init__(self, devfd: int, enabled: bool, *,
                 open_ioctl: Callable[[int, int], int] = backing_open,
                 close_ioctl: Callable[[int, int], None] = backing_close,
                 identify: Callable[[int], tuple[int, int]] = file_id) -> None:
        self.devfd = devfd
        self.enabled = enabled
        self._open_ioctl = open_ioctl
        self._close_ioctl = close_ioctl
        self._identify = identify
        self._reg: dict[int, Registration] = {}
        self._cached: Counter[int] = Counter()
        #: fh -> (nodeid, passthrough?) for every file open we answered
        self._handles: dict[int, tuple[int, bool]] = {}
        self.refused = 0
        self.opened_ids = 0
        self.closed_ids = 0

    def decide(self, nodeid: int, fh: int, backing_fd: int | None) -> int:
        """Account a new open of ``nodeid`` as handle ``fh``; returns the backing id to
        answer with (0: not passthrough). ``backing_fd`` is what the filesystem offers
        (None: this open must go through the daemon)."""
        reg = self._reg.get(nodeid)
        if reg is None and self.enabled and backing_fd is not None and not self._cached[nodeid]:
            try:
                reg = Registration(self._open_ioctl(self.devfd, backing_fd),
                                   self._identify(backing_fd))
            except OSError as e:
                self._refused(e)
            else:
                self._reg[nodeid] = reg
                self.opened_ids += 1
        elif (reg is not None and backing_fd is not None
              and self._identify(backing_fd) != reg.file_id):
            # Answered as passthrough, this open would read and write the registered file
            # (overlay: a lower file instead of the upper copy): refuse it.
            log.error("inode %d: an open offered a backing file other than the registered "
                      "one; failing it with EIO", nodeid)
            raise BackingMismatchError(nodeid)
        if reg is not None:
            # An inode with a backing file admits passthrough opens only (module docstring).
            reg.opens += 1
            self._handles[fh] = (nodeid, True)
            return reg.backing_id
        self._cached[nodeid] += 1
        self._handles[fh] = (nodeid, False)
        return 0

    def release(self, fh: int) -> None:
        """The kernel released handle ``fh``: close the inode's id after its last open."""
        item = self._handles.pop(fh, None)
        if item is None:
            return
        nodeid, passthrough = item
        if not passthrough:
            self._cached[nodeid] -= 1
            if self._cached[nodeid] <= 0:
                del self._cached[nodeid]
            return
        reg = self._reg[nodeid]
        reg.opens -= 1
        if reg.opens:
            return
        del self._reg[nodeid]
        try:
            self._close_ioctl(self.devfd, reg.backing_id)
            self.closed_ids += 1
        except OSError as e:
            log.warning("BACKING_CLOSE of id %d (inode %d) failed: %s", reg.backing_id,
                        nodeid, e)

    def backing_id(self, nodeid: int) -> int:
        reg = self._reg.get(nodeid)
        return reg.backing_id if reg is not None else 0

    def _refused(self, e: OSError) -> None:
        self.refused += 1
        if self.refused == 1:
            why = {errno.EPERM: "needs CAP_SYS_ADMIN in the initial user namespace",
                   errno.EOPNOTSUPP: "backing filesystem not supported",
                   errno.ELOOP: "backing file on a stacked filesystem too deep"}.get(
                       e.errno or 0, e.strerror or str(e))
            log.warning("kernel passthrough refused (%s: %s); serving read/write in "
                        "userspace for such files", errno.errorcode.get(e.errno or 0, "?"), why)
        if e.errno == errno.EPERM:
            self.enabled = False  # it will not change for this connection

    def statistics(self) -> PassthroughStatistics:
        return PassthroughStatistics(
            registered=len(self._reg),
            passthrough_opens=sum(r.opens for r in self._reg.values()),
            cached_opens=sum(self._cached.values()), refused=self.refused)
