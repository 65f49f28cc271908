"""Notifier: how a filesystem tells the kernel to drop a cached entry or inode.

A filesystem holds a ``Notifier`` and calls it when the backing side changed behind the
kernel's back (overlay copy-up replacing a lower file, passthru seeing an external rename).
The pyfuse3 implementation is ``bridge.Pyfuse3Notifier`` (kept there so that only the bridge
imports pyfuse3); ``RecordingNotifier`` is the fake for unit tests.

Contract of every implementation:
- Invalidation is advisory: failures (the kernel does not know the entry, no support) are
  logged, never raised.
- ``invalidate_entry`` never blocks and may take effect after it returns (the kernel makes
  it wait for requests on the same directory, so doing it inline from such a request would
  deadlock). ``deleted_ino`` also tells inotify watchers the entry was deleted.
- ``prune`` asks the kernel to drop the unused dentries and inodes of the given node ids
  (FUSE_NOTIFY_PRUNE), so that it FORGETs them: how a daemon that holds an fd per inode
  stays under RLIMIT_NOFILE. Never blocks, may be called from worker threads; inodes in
  use (open, a cwd, a mount point, a directory with cached children) are skipped by the
  kernel. ``can_prune`` is False where it does nothing (pyfuse3, kernels before 6.18).
- ``invalidate_inode`` is async: dropping cached data can wait for writeback, i.e. for our
  own WRITE requests, so an implementation must not block the loop while it waits.
  ``attr_only`` drops only the cached attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Notifier(Protocol):
    def invalidate_entry(self, parent_ino: int, name: bytes,
                         deleted_ino: int | None = None) -> None: ...

    async def invalidate_inode(self, ino: int, attr_only: bool = False) -> None: ...

    can_prune: bool

    def prune(self, inos: Sequence[int]) -> None: ...


@dataclass
class RecordingNotifier:
    """Records calls in order: ``("entry", parent_ino, name, deleted_ino)`` and
    ``("inode", ino, attr_only)`` and ``("prune", inos)``."""

    calls: list[tuple[object, ...]] = field(default_factory=list)
    can_prune: bool = True

    def prune(self, inos: Sequence[int]) -> None:
        self.calls.append(("prune", tuple(inos)))

    def invalidate_entry(self, parent_ino: int, name: bytes,
                         deleted_ino: int | None = None) -> None:
        self.calls.append(("entry", parent_ino, name, deleted_ino))

    async def invalidate_inode(self, ino: int, attr_only: bool = False) -> None:
        self.calls.append(("inode", ino, attr_only))
