"""InodeTable: the stacked inodes the kernel knows, keyed by backing identity, with lookup counts.

One table per mount holds every ``Inode`` the kernel may name by ``ino``. The counts follow
the FUSE protocol exactly (DESIGN §2): ``lookup``/``ref`` add one per entry reply the kernel
accepted, ``forget`` subtracts what the kernel forgets, and an inode leaves the table only
when its lookup count *and* its open count are both zero. The root never leaves.

Identity is the inode's ``key`` (a ``BackingId``, plus the layer for overlay). A backing
object replaced underneath is never mutated in place: ``mark_stale`` unmaps its key, so the
next lookup makes a new inode with a new ``ino``, while the stale one keeps its number
reserved until the kernel forgets it (the "bad inode" and libfuse passthrough_hp fixes,
reference §D.9, §E.16-17). The one sanctioned change of identity is ``rekey``: the same
object (type unchanged) known under a new key, as after an overlay copy-up that breaks a
lower hard link.

Locking: one ``threading.Lock`` guards both maps and every ``lookups``/``opens`` count, so
each find-or-create-and-count is atomic (libfuse 1e19235c: a lookup must not resurrect an
inode being erased; 02c0fc62: two forgets must not both see zero). Methods never await and
may be called from trio tasks and worker threads alike. ``make()`` runs under the lock.
``on_evict()`` runs after the lock is dropped, once per inode, on the thread that evicted it.

Pruning: each inode holds backing fds, and the kernel keeps every inode it was given until
memory pressure, so a big tree walked through the mount would run the daemon out of fds
(RLIMIT_NOFILE, often 20,000 or 524,288 and not raisable) and answer EMFILE where ext4
never would. With a ``Notifier`` that can prune (``enable_pruning``), the table keeps its
inodes in least-recently-looked-up order and, past a capacity derived from the fd limit,
asks the kernel to drop the oldest unopened ones (FUSE_NOTIFY_PRUNE): the kernel's own
dcache shrinker, on demand. The kernel skips what is in use, and what it drops comes back
as FORGETs, which close the fds; a later access simply looks the name up again.
"""

from __future__ import annotations

import errno
import itertools
import logging
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .attrs import AttrCache
from .fsapi import ROOT_INO
from .inflight import InFlight
from .locks import QuickLock
from .notify import Notifier

log = logging.getLogger(__name__)

#: Inode numbers handed out when a backing st_ino cannot be used (taken, or the root's).
#: Far above any real st_ino in practice; the counter only grows, so it never repeats.
RESERVED_INO_BASE = 1 << 62

#: Guards the first-use creation of every inode's ``io`` (held for a few instructions).
_LAZY_IO_LOCK = threading.Lock()

#: Pruning: fds kept free for open files, pipes and sockets: an eighth of the limit, at
#: least 1024, at most a quarter.
PRUNE_RESERVE = 0.125
PRUNE_RESERVE_MIN = 1024
#: A prune brings the table down to this fraction of its capacity...
PRUNE_TARGET = 0.875
#: ...and the next one waits for this many new inodes (FORGETs arrive asynchronously).
PRUNE_SPACING = 0.0625
#: How often (in new inodes) the fd limit is read again: prlimit(1) may change it.
_LIMIT_RECHECK = 64
#: prune_now (out of fds) prunes at most this often, in seconds.
_FORCED_SPACING = 0.05
#: The most fds per inode learned from running out (a directory in many lower layers).
_MAX_FDS_PER_INODE = 16.0


class Inode:
    """One stacked inode. Filesystems subclass it to add their backing state.

    ``lookups`` and ``opens`` belong to the table: read them freely, change them only
    through ``InodeTable``. ``io.parent`` is set to the table's ``io`` when the table adopts
    the inode (``InodeTable.__init__`` for the root, ``lookup`` for the rest).

    ``io`` and ``lock`` are made on first use: a listing (READDIRPLUS) makes an inode for
    every entry, and most of them are never opened nor written, so building both up front
    was a measurable part of a listing's cost (allocation and garbage-collector work).
    """

    def __init__(self, ino: int, key: Hashable) -> None:
        self.ino = ino  # kernel node id == reported st_ino; never reused while held
        self.key = key  # identity: BackingId (+ layer); changed only by InodeTable.rekey
        self.lookups = 0  # kernel refs; guarded by the table lock; 0 and no opens => evict
        self.opens = 0  # open handles (files and dirs); guarded by the table lock
        self.is_stale = False  # backing object replaced: ops answer ESTALE; never cleared
        self.attrs = AttrCache()
        self._io: InFlight | None = None
        self._io_parent: InFlight | None = None
        self._lock: QuickLock | None = None

    @property
    def io(self) -> InFlight:
        """In-flight requests on this inode; parent: the table's io."""
        io = self._io
        if io is None:
            # Handles (and so this) may be made on worker threads: make exactly one.
            with _LAZY_IO_LOCK:
                io = self._io
                if io is None:
                    io = self._io = InFlight(self._io_parent)
        return io

    @property
    def lock(self) -> QuickLock:
        """Serialises writes / attribute updates on this inode."""
        lock = self._lock
        if lock is None:
            # A QuickLock is only ever taken by trio tasks on the loop thread, so a plain
            # check-and-set cannot race.
            lock = self._lock = QuickLock()
        return lock

    def _attach_io(self, parent: InFlight) -> None:
        """Make the table's ``parent`` the parent of ``io``, made now or later. Called by
        the table before the inode is published, so nothing can race it."""
        self._io_parent = parent
        if self._io is not None:
            self._io.parent = parent

    def on_evict(self) -> None:
        """Hook: the inode left the table (close an O_PATH fd, ...). Default: nothing.

        Called exactly once, without the table lock held. Must not raise.
        """

    def __repr__(self) -> str:
        stale = " stale" if self.is_stale else ""
        return (f"<{type(self).__name__} ino={self.ino} key={self.key!r} "
                f"lookups={self.lookups} opens={self.opens}{stale}>")


InodeT = TypeVar("InodeT", bound=Inode)


@dataclass(frozen=True)
class InodeTableStatistics:
    inodes: int  # held in the table, the root and stale ones included
    stale: int
    lookups: int  # sum of lookup counts
    opens: int  # sum of open counts
    evicted: int  # total ever evicted
    in_flight: int  # mount-wide in-flight requests


class InodeTable(Generic[InodeT]):
    """Every inode the kernel may name, by ``ino`` and (live ones) by ``key``.

    The root starts with one lookup: the kernel's implicit reference from mounting, which
    it never forgets. Errors: ``get``/``ref`` raise ``OSError(ESTALE)`` for an ino not in
    the table. Internal count errors (forget or close below zero) are logged and clamped,
    never raised, since they arrive from the kernel or from teardown paths.
    """

    def __init__(self, root: InodeT) -> None:
        if root.ino != ROOT_INO:
            raise ValueError(f"root inode must have ino {ROOT_INO}, not {root.ino}")
        self.io = InFlight()  # mount-wide in-flight count
        self.root = root
        self._lock = threading.Lock()  # guards the maps, counters and every inode's counts
        self._by_ino: dict[int, InodeT] = {}  # live and stale inodes
        self._by_key: dict[Hashable, InodeT] = {}  # live inodes only
        self._next_ino = RESERVED_INO_BASE  # guarded by _lock
        self._evicted = 0  # guarded by _lock
        # Pruning (module docstring); all guarded by _lock.
        self._lru: OrderedDict[int, InodeT] = OrderedDict()  # non-root, oldest lookup first
        self._notifier: Notifier | None = None
        self._fds_per_inode = 1.0
        self._fixed_capacity: int | None = None
        self.capacity = 0  # inodes held before pruning; 0: never prune
        self._until_prune = 0  # new inodes before the next prune may start
        self._until_recheck = 0
        self.pruned = 0  # node ids handed to the kernel to prune
        self._last_forced = -1e9  # monotonic time of the last prune_now
        root.lookups = 1
        self._adopt(root)

    def _adopt(self, inode: InodeT) -> None:
        """Enter a new inode in both maps. Caller holds _lock (or is __init__)."""
        inode._attach_io(self.io)
        self._by_ino[inode.ino] = inode
        self._by_key[inode.key] = inode
        if inode is not self.root:
            self._lru[inode.ino] = inode

    def _allocate_ino(self, preferred_ino: int | None) -> int:
        """Caller holds _lock. A held number (live or stale) is never handed out again."""
        if (preferred_ino is not None and preferred_ino > 0 and preferred_ino != ROOT_INO
                and preferred_ino not in self._by_ino):
            return preferred_ino
        # A preferred ino may have taken a number from the reserved range: skip it.
        while self._next_ino in self._by_ino:
            self._next_ino += 1
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _unmap(self, inode: InodeT) -> None:
        """Remove an evictable inode from both maps. Caller holds _lock, then calls
        ``inode.on_evict()`` once the lock is dropped."""
        del self._by_ino[inode.ino]
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        self._lru.pop(inode.ino, None)
        self._evicted += 1

    def _is_evictable(self, inode: InodeT) -> bool:
        return inode is not self.root and inode.lookups == 0 and inode.opens == 0

    def get(self, ino: int) -> InodeT:
        """The inode for ``ino``, stale ones included; ``OSError(ESTALE)`` if unknown."""
        with self._lock:
            inode = self._by_ino.get(ino)
        if inode is None:
            raise OSError(errno.ESTALE, f"unknown inode {ino}")
        return inode

    def peek(self, ino: int) -> InodeT | None:
        """The inode holding number ``ino`` (stale ones included), if any. No reference."""
        with self._lock:
            return self._by_ino.get(ino)

    def find(self, key: Hashable) -> InodeT | None:
        """The live (non-stale) inode for ``key``, if any. Takes no reference."""
        with self._lock:
            return self._by_key.get(key)

    def lookup_existing(self, key: Hashable) -> InodeT | None:
        """``lookup`` of a key only if its live inode exists (None otherwise): one lookup
        added, which the caller owns as with ``lookup``."""
        with self._lock:
            inode = self._by_key.get(key)
            if inode is None:
                return None
            if inode is not self.root:
                self._lru.move_to_end(inode.ino)
            inode.lookups += 1
            return inode

    def lookup(self, key: Hashable, make: Callable[[int], InodeT],
               preferred_ino: int | None = None) -> InodeT:
        """Find or create the live inode for ``key`` and add one lookup, atomically.

        ``make(ino)`` builds a new inode with that ino and ``key``; it runs under the table
        lock, so it must be quick and must not call back into the table. ``preferred_ino``
        (normally the backing st_ino) is used if no live or stale inode holds it and it is
        not the root's; otherwise a fresh number from the reserved range is given. The
        returned inode is never stale. The caller owns the added lookup and must pass it to
        the kernel in an entry reply, or give it back with ``forget(ino, 1)``.
        """
        victims: list[int] = []
        with self._lock:
            inode = self._by_key.get(key)
            if inode is None:
                ino = self._allocate_ino(preferred_ino)
                inode = make(ino)
                if inode.ino != ino or inode.key != key:
                    raise ValueError(f"make({ino}) built {inode!r}, not ino {ino} key {key!r}")
                self._adopt(inode)
                if self.capacity:
                    victims = self._pick_victims()
            elif inode is not self.root:
                self._lru.move_to_end(inode.ino)
            inode.lookups += 1
        if victims:
            self._send_prune(victims)
        return inode

    # --- pruning ------------------------------------------------------------------------------

    def enable_pruning(self, notifier: Notifier | None, fds_per_inode: float = 1.0,
                       capacity: int | None = None) -> None:
        """Prune through ``notifier`` when it can (see the module docstring); an inode costs
        ``fds_per_inode`` fds on average. Call once the session is up (``Filesystem.init``).
        A fixed ``capacity`` replaces the one read from RLIMIT_NOFILE (tests)."""
        if notifier is None or not notifier.can_prune:
            return
        with self._lock:
            self._notifier = notifier
            self._fds_per_inode = fds_per_inode
            self._fixed_capacity = capacity
            self._read_limit()

    def _read_limit(self) -> None:
        """Caller holds _lock."""
        self._until_recheck = _LIMIT_RECHECK
        if self._fixed_capacity is not None:
            self.capacity = self._fixed_capacity
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            self.capacity = 0
            return
        reserve = min(soft // 4, max(PRUNE_RESERVE_MIN, int(soft * PRUNE_RESERVE)))
        self.capacity = max(64, int((soft - reserve) / self._fds_per_inode))

    def _learn_fds_per_inode(self) -> None:
        """Out of fds with the table under its capacity: inodes cost more fds than assumed
        (an overlay directory holds one per layer it is in). The limit is what is in use
        now, so limit / inodes bounds the real cost: use it from here on. Caller holds
        _lock."""
        if self._fixed_capacity is not None or len(self._by_ino) > self.capacity:
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        learned = min(_MAX_FDS_PER_INODE, soft / max(1, len(self._by_ino)))
        if learned > self._fds_per_inode:
            log.info("out of fds with %d inodes: counting %.2f fds per inode, not %.2f",
                     len(self._by_ino), learned, self._fds_per_inode)
            self._fds_per_inode = learned
            self._read_limit()

    def _pick_victims(self, force: bool = False) -> list[int]:
        """The oldest unopened inodes to prune, if the table is past capacity and the last
        prune is far enough behind (or ``force``). They move to the young end, so one the
        kernel keeps (in use) is not asked for again at once. Caller holds _lock."""
        self._until_recheck -= 1
        if self._until_recheck <= 0:
            self._read_limit()
        self._until_prune -= 1
        notifier = self._notifier
        if notifier is None or not notifier.can_prune or not self.capacity:
            return []
        spacing = max(1, int(self.capacity * PRUNE_SPACING))
        if force:
            excess = max(spacing, len(self._by_ino) - int(self.capacity * PRUNE_TARGET))
        elif len(self._by_ino) > self.capacity and self._until_prune <= 0:
            excess = len(self._by_ino) - int(self.capacity * PRUNE_TARGET)
        else:
            return []
        victims = list(itertools.islice(
            (ino for ino, inode in self._lru.items() if inode.opens == 0), excess))
        for ino in victims:
            self._lru.move_to_end(ino)
        self._until_prune = spacing
        self.pruned += len(victims)
        return victims

    def _send_prune(self, victims: list[int]) -> None:
        notifier = self._notifier
        if notifier is None:
            return
        log.debug("asking the kernel to prune %d inodes (%d held, capacity %d)",
                  len(victims), len(self), self.capacity)
        notifier.prune(victims)

    def prune_now(self) -> bool:
        """Out of fds now (EMFILE/ENFILE): prune without waiting for the capacity, at most
        every ``_FORCED_SPACING`` seconds (a burst of failures must not empty the cache).
        True if the kernel can prune at all, i.e. waiting for FORGETs may help."""
        now = time.monotonic()
        with self._lock:
            notifier = self._notifier
            if notifier is None or not notifier.can_prune or not self.capacity:
                return False
            if now - self._last_forced < _FORCED_SPACING:
                return True
            self._last_forced = now
            self._read_limit()
            self._learn_fds_per_inode()
            victims = self._pick_victims(force=True)
        if victims:
            self._send_prune(victims)
        return True

    def ref(self, ino: int, n: int = 1) -> None:
        """Add ``n`` lookups to the live inode ``ino`` (an entry reply naming an inode the
        caller already holds, e.g. link). ``OSError(ESTALE)`` if unknown or stale."""
        if n <= 0:
            raise ValueError(f"ref() needs n > 0, not {n}")
        with self._lock:
            inode = self._by_ino.get(ino)
            if inode is None or inode.is_stale:
                raise OSError(errno.ESTALE, f"ref() on unknown or stale inode {ino}")
            inode.lookups += n

    def forget(self, ino: int, n: int) -> None:
        """Drop ``n`` lookups from ``ino``; evict it at zero lookups and zero opens.

        Never raises: an unknown ino is ignored (the kernel may forget after destroy), and a
        count that would go below zero is an internal error, logged and clamped to zero.
        """
        with self._lock:
            inode = self._by_ino.get(ino)
            if inode is None:
                log.debug("forget(%d, %d) of unknown inode ignored", ino, n)
                return
            if n < 0:
                log.error("forget(%d, %d) with a negative count ignored", ino, n)
                return
            if n > inode.lookups:
                log.error("forget(%d, %d) with only %d lookups: count clamped to 0",
                          ino, n, inode.lookups)
                n = inode.lookups
            inode.lookups -= n
            evict = self._is_evictable(inode)
            if evict:
                self._unmap(inode)
        if evict:
            inode.on_evict()

    def mark_stale(self, inode: InodeT) -> None:
        """The backing object behind ``inode`` was replaced: unmap its key so the next
        lookup of that key makes a new inode. The stale inode keeps its ino until the
        kernel forgets it and its handles are closed. Idempotent. The root cannot be
        stale (ValueError)."""
        if inode is self.root:
            raise ValueError("the root inode cannot be marked stale")
        with self._lock:
            inode.is_stale = True
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]

    def rekey(self, inode: InodeT, key: Hashable) -> bool:
        """Give the live ``inode`` a new identity in place (its ino stays: the kernel knows
        it by that): an overlay copy-up that breaks a lower hard link turns the inode of
        one name into the inode of a new upper file, and the kernel must keep one inode,
        one page cache, for it. False, and nothing changed, when ``inode`` is stale or
        evicted or another live inode already has ``key`` (the caller then marks it
        stale)."""
        with self._lock:
            if inode.is_stale or self._by_ino.get(inode.ino) is not inode:
                return False
            other = self._by_key.get(key)
            if other is not None and other is not inode:
                return False
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            inode.key = key
            self._by_key[key] = inode
            return True

    def open(self, inode: InodeT) -> None:
        """One more open handle on ``inode``. ``OSError(ESTALE)`` if it already left the
        table (an open racing the last forget: the kernel never does this)."""
        with self._lock:
            if self._by_ino.get(inode.ino) is not inode:
                raise OSError(errno.ESTALE, f"open() on evicted inode {inode.ino}")
            inode.opens += 1

    def close(self, inode: InodeT) -> None:
        """One handle fewer on ``inode``; evicts it if that was the last reason to keep it.
        Never raises: closing an inode already evicted by ``forget_all`` is ignored, and an
        open count below zero is logged and clamped."""
        with self._lock:
            if self._by_ino.get(inode.ino) is not inode:
                log.debug("close() of evicted inode %d ignored", inode.ino)
                return
            if inode.opens <= 0:
                log.error("close() of inode %d with no opens", inode.ino)
                inode.opens = 0
            else:
                inode.opens -= 1
            evict = self._is_evictable(inode)
            if evict:
                self._unmap(inode)
        if evict:
            inode.on_evict()

    def forget_all(self) -> None:
        """Destroy: evict every inode but the root, whatever its counts (the kernel does
        not promise FORGETs at unmount). Callers release handles and drain ``io`` first."""
        with self._lock:
            evicted = [inode for inode in self._by_ino.values() if inode is not self.root]
            for inode in evicted:
                inode.lookups = 0
                self._unmap(inode)
        for inode in evicted:
            inode.on_evict()

    def statistics(self) -> InodeTableStatistics:
        with self._lock:
            inodes = list(self._by_ino.values())
            evicted = self._evicted
        return InodeTableStatistics(
            inodes=len(inodes),
            stale=sum(inode.is_stale for inode in inodes),
            lookups=sum(inode.lookups for inode in inodes),
            opens=sum(inode.opens for inode in inodes),
            evicted=evicted,
            in_flight=self.io.count,
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_ino)
