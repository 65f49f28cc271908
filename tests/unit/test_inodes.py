"""InodeTable: lookup counts, eviction, stale marking, ino allocation under concurrency."""

from __future__ import annotations

import errno
import logging
import random
import sys
import threading
from collections.abc import Hashable, Iterator

import pytest
import trio

from backingfs.fsapi import ROOT_INO
from backingfs.inodes import RESERVED_INO_BASE, Inode, InodeTable
from backingfs.notify import RecordingNotifier


class RecordingInode(Inode):
    """Counts on_evict calls; an optional check runs inside on_evict."""

    def __init__(self, ino: int, key: Hashable, on_evict_check=None) -> None:
        super().__init__(ino, key)
        self.evictions = 0
        self._check = on_evict_check

    def on_evict(self) -> None:
        self.evictions += 1
        if self._check is not None:
            self._check(self)


def make_table() -> InodeTable[RecordingInode]:
    return InodeTable(RecordingInode(ROOT_INO, "root"))


def maker(key: Hashable):
    return lambda ino: RecordingInode(ino, key)


def test_root_must_have_root_ino() -> None:
    with pytest.raises(ValueError):
        InodeTable(Inode(7, "root"))


def test_lookup_creates_once_and_counts() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=100)
    assert a.ino == 100 and a.lookups == 1
    assert table.lookup("a", maker("a"), preferred_ino=555) is a
    assert a.lookups == 2
    assert table.get(100) is a and table.find("a") is a
    assert a.io.parent is table.io
    assert len(table) == 2


def test_lookup_existing_counts_only_a_live_inode() -> None:
    table = make_table()
    assert table.lookup_existing("a") is None and len(table) == 1
    a = table.lookup("a", maker("a"), preferred_ino=100)
    assert table.lookup_existing("a") is a and a.lookups == 2
    table.mark_stale(a)
    assert table.lookup_existing("a") is None and a.lookups == 2
    table.forget(100, 2)
    assert a.evictions == 1 and table.lookup_existing("a") is None


def test_preferred_ino_taken_or_root_falls_back_to_reserved_range() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=100)
    b = table.lookup("b", maker("b"), preferred_ino=100)  # same st_ino, other device
    r = table.lookup("r", maker("r"), preferred_ino=ROOT_INO)
    n = table.lookup("n", maker("n"))
    assert a.ino == 100
    assert b.ino >= RESERVED_INO_BASE and r.ino >= RESERVED_INO_BASE
    assert n.ino >= RESERVED_INO_BASE
    assert len({b.ino, r.ino, n.ino}) == 3


def test_reserved_numbers_never_reused_after_eviction() -> None:
    table = make_table()
    seen: set[int] = set()
    for i in range(20):
        inode = table.lookup(("k", i), maker(("k", i)))
        assert inode.ino not in seen
        seen.add(inode.ino)
        table.forget(inode.ino, 1)
    assert len(table) == 1


def test_reserved_allocator_skips_number_taken_by_preferred() -> None:
    table = make_table()
    squatter = table.lookup("s", maker("s"), preferred_ino=RESERVED_INO_BASE)
    fresh = table.lookup("f", maker("f"))
    assert squatter.ino == RESERVED_INO_BASE
    assert fresh.ino != RESERVED_INO_BASE


def test_make_must_build_the_given_ino_and_key() -> None:
    table = make_table()
    with pytest.raises(ValueError):
        table.lookup("a", lambda ino: RecordingInode(ino + 1, "a"))
    with pytest.raises(ValueError):
        table.lookup("a", lambda ino: RecordingInode(ino, "b"))
    assert len(table) == 1 and table.find("a") is None


def test_evicted_exactly_at_zero() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=10)
    table.ref(10, 2)
    assert a.lookups == 3
    table.forget(10, 2)
    assert a.evictions == 0 and table.get(10) is a
    table.forget(10, 1)
    assert a.evictions == 1
    assert table.find("a") is None
    with pytest.raises(OSError) as exc:
        table.get(10)
    assert exc.value.errno == errno.ESTALE


def test_open_handle_keeps_inode_until_close() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=10)
    table.open(a)
    table.forget(10, 1)
    assert a.evictions == 0 and table.get(10) is a and a.lookups == 0
    table.close(a)
    assert a.evictions == 1
    with pytest.raises(OSError):
        table.get(10)
    # Open on an evicted inode is refused; close of one is ignored.
    with pytest.raises(OSError) as exc:
        table.open(a)
    assert exc.value.errno == errno.ESTALE
    table.close(a)
    assert a.evictions == 1


def test_close_keeps_inode_while_lookups_remain() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=10)
    table.open(a)
    table.close(a)
    assert a.evictions == 0 and table.get(10) is a


def test_forget_below_zero_is_logged_and_clamped(caplog: pytest.LogCaptureFixture) -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=10)
    table.open(a)
    with caplog.at_level(logging.ERROR, logger="backingfs.inodes"):
        table.forget(10, 5)
    assert a.lookups == 0
    assert any("clamped" in r.message for r in caplog.records)
    table.close(a)
    assert a.evictions == 1


def test_forget_unknown_ino_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    table = make_table()
    with caplog.at_level(logging.DEBUG, logger="backingfs.inodes"):
        table.forget(12345, 1)
    assert any("unknown" in r.message for r in caplog.records)
    assert len(table) == 1


def test_ref_requires_live_inode() -> None:
    table = make_table()
    with pytest.raises(OSError):
        table.ref(99)
    a = table.lookup("a", maker("a"), preferred_ino=10)
    table.mark_stale(a)
    with pytest.raises(OSError) as exc:
        table.ref(10)
    assert exc.value.errno == errno.ESTALE
    with pytest.raises(ValueError):
        table.ref(ROOT_INO, 0)


def test_stale_inode_keeps_ino_until_forgotten() -> None:
    table = make_table()
    old = table.lookup("a", maker("a"), preferred_ino=10)
    table.mark_stale(old)
    table.mark_stale(old)  # idempotent
    assert old.is_stale and table.find("a") is None
    assert table.get(10) is old  # ops on it can still find it and answer ESTALE
    new = table.lookup("a", maker("a"), preferred_ino=10)
    assert new is not old and not new.is_stale
    assert new.ino != 10 and new.ino >= RESERVED_INO_BASE
    assert table.find("a") is new
    assert table.statistics().stale == 1
    table.forget(10, 1)
    assert old.evictions == 1 and new.evictions == 0
    assert table.find("a") is new  # evicting the stale one leaves the new key mapping alone
    # Number 10 is free again: the kernel no longer holds it.
    c = table.lookup("c", maker("c"), preferred_ino=10)
    assert c.ino == 10


def test_rekey_moves_identity_keeps_ino_and_counts() -> None:
    table = make_table()
    a = table.lookup("lower-link", maker("lower-link"), preferred_ino=10)
    assert table.rekey(a, "upper")
    assert a.key == "upper" and a.ino == 10 and a.lookups == 1
    assert table.find("upper") is a and table.find("lower-link") is None
    assert table.lookup("upper", maker("upper"), preferred_ino=99) is a  # found, not made
    assert table.rekey(a, "upper")  # to its own key: nothing changes
    table.forget(10, 2)
    assert a.evictions == 1 and table.find("upper") is None


def test_rekey_refused_when_taken_stale_or_evicted() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"), preferred_ino=10)
    b = table.lookup("b", maker("b"), preferred_ino=11)
    assert not table.rekey(a, "b")  # another live inode has it
    assert a.key == "a" and table.find("a") is a and table.find("b") is b
    table.mark_stale(a)
    assert not table.rekey(a, "c") and table.find("c") is None
    table.forget(11, 1)
    assert not table.rekey(b, "d") and table.find("d") is None


def test_root_never_evicted_nor_stale() -> None:
    table = make_table()
    root = table.root
    assert root.lookups == 1  # the kernel's implicit reference from mounting
    table.ref(ROOT_INO, 3)
    table.forget(ROOT_INO, 4)
    assert root.lookups == 0 and table.get(ROOT_INO) is root
    table.open(root)
    table.close(root)
    table.forget_all()
    assert table.get(ROOT_INO) is root and root.evictions == 0
    with pytest.raises(ValueError):
        table.mark_stale(root)
    assert root.io.parent is table.io


def test_forget_all_evicts_everything_but_root() -> None:
    table = make_table()
    inodes = [table.lookup(i, maker(i), preferred_ino=100 + i) for i in range(10)]
    table.open(inodes[0])
    table.mark_stale(inodes[1])
    table.forget_all()
    assert len(table) == 1
    assert all(inode.evictions == 1 for inode in inodes)
    table.close(inodes[0])  # a handle released after destroy: ignored
    table.forget(100, 1)  # the kernel forgetting after destroy: ignored
    assert all(inode.evictions == 1 for inode in inodes)
    stats = table.statistics()
    assert stats.inodes == 1 and stats.evicted == 10


def test_inode_io_nests_in_table_io() -> None:
    table = make_table()
    a = table.lookup("a", maker("a"))
    a.io.begin_io()
    assert table.io.count == 1 and table.statistics().in_flight == 1
    a.io.end_io()
    assert table.io.count == 0


class KernelModel:
    """What the kernel holds: lookups per inode object, from replies it has received.

    A lookup is recorded *after* the table returned it and a forget *before* it is sent, so
    the table's count is always >= the model's: a held inode must still be in the table,
    its ino belongs to it alone, and on_evict must never see a held inode.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[RecordingInode, int] = {}
        self.ino_owner: dict[int, RecordingInode] = {}
        self.errors: list[str] = []

    def received(self, inode: RecordingInode) -> None:
        with self.lock:
            owner = self.ino_owner.get(inode.ino)
            if owner is not None and owner is not inode and self.held.get(owner, 0) > 0:
                self.errors.append(f"ino {inode.ino} reused while {owner!r} is held")
            self.ino_owner[inode.ino] = inode
            self.held[inode] = self.held.get(inode, 0) + 1

    def forgetting(self, inode: RecordingInode, n: int) -> None:
        with self.lock:
            self.held[inode] -= n

    def check_evict(self, inode: RecordingInode) -> None:
        with self.lock:
            if self.held.get(inode, 0) != 0:
                self.errors.append(f"{inode!r} evicted while held {self.held[inode]}")
            if inode.evictions != 1:
                self.errors.append(f"{inode!r} evicted {inode.evictions} times")


KEYS = 12
INOS = 6  # fewer preferred numbers than keys: collisions force reserved allocations


def storm_step(table: InodeTable, model: KernelModel, rng: random.Random,
               mine: dict[RecordingInode, int]) -> None:
    """One random kernel action: lookup, forget part of what this agent holds, or mark a
    found inode stale (the backing object was replaced)."""
    action = rng.random()
    if action < 0.55 or not mine:
        key = rng.randrange(KEYS)
        inode = table.lookup(key, lambda ino, key=key: RecordingInode(
            ino, key, model.check_evict), preferred_ino=100 + rng.randrange(INOS))
        model.received(inode)
        mine[inode] = mine.get(inode, 0) + 1
    elif action < 0.95:
        inode = rng.choice(list(mine))
        n = rng.randint(1, mine[inode])
        mine[inode] -= n
        if mine[inode] == 0:
            del mine[inode]
        model.forgetting(inode, n)
        table.forget(inode.ino, n)
    else:
        found = table.find(rng.randrange(KEYS))
        if found is not None:
            table.mark_stale(found)


def check_counts(table: InodeTable, model: KernelModel) -> None:
    with model.lock:
        for inode, held in model.held.items():
            if held > 0:
                assert table.get(inode.ino) is inode
                assert inode.lookups == held, inode
                if not inode.is_stale:  # one live inode per key
                    assert table.find(inode.key) is inode, inode
            else:
                assert inode.lookups == 0
                assert inode.evictions == 1


@pytest.fixture
def fast_thread_switches() -> Iterator[None]:
    """Switch threads far more often than the default 5 ms, so races get a chance."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_thread_switches")
def test_storm_threads() -> None:
    table = make_table()
    model = KernelModel()
    holdings: list[dict[RecordingInode, int]] = [{} for _ in range(8)]
    barrier = threading.Barrier(len(holdings))
    failures: list[BaseException] = []

    def agent(index: int) -> None:
        rng = random.Random(1000 + index)
        try:
            barrier.wait()
            for _ in range(4000):
                storm_step(table, model, rng, holdings[index])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(holdings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert not model.errors
    check_counts(table, model)
    finish_storm(table, model, holdings)


def finish_storm(table: InodeTable, model: KernelModel,
                 holdings: list[dict[RecordingInode, int]]) -> None:
    """The kernel forgets everything it holds: only the root remains, all evicted once."""
    for mine in holdings:
        for inode, n in mine.items():
            model.forgetting(inode, n)
            table.forget(inode.ino, n)
    assert not model.errors
    assert len(table) == 1
    assert all(inode.evictions == 1 for inode in model.held)
    assert all(held == 0 for held in model.held.values())


@pytest.mark.usefixtures("fast_thread_switches")
def test_storm_trio_tasks_and_threads() -> None:
    trio.run(storm_trio_tasks_and_threads)


async def storm_trio_tasks_and_threads() -> None:
    table = make_table()
    model = KernelModel()
    holdings: list[dict[RecordingInode, int]] = [{} for _ in range(12)]

    async def task_agent(index: int) -> None:
        rng = random.Random(2000 + index)
        for _ in range(1500):
            storm_step(table, model, rng, holdings[index])
            if rng.random() < 0.5:
                await trio.lowlevel.checkpoint()

    def thread_agent(index: int) -> None:
        rng = random.Random(3000 + index)
        for _ in range(3000):
            storm_step(table, model, rng, holdings[index])

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(task_agent, i)
        for i in range(8, 12):
            nursery.start_soon(trio.to_thread.run_sync, thread_agent, i)
    assert not model.errors
    check_counts(table, model)
    finish_storm(table, model, holdings)


# --- pruning (FUSE_NOTIFY_PRUNE) -----------------------------------------------------------

def _pruned(notifier: RecordingNotifier) -> list[int]:
    return [ino for call in notifier.calls if call[0] == "prune" for ino in call[1]]


def test_pruning_asks_for_the_oldest_unopened_inodes_past_capacity() -> None:
    table = make_table()
    notifier = RecordingNotifier()
    table.enable_pruning(notifier, capacity=80)
    inodes = [table.lookup(i, maker(i), preferred_ino=1000 + i) for i in range(79)]
    assert notifier.calls == []  # 80 held with the root: at capacity, not past it
    table.open(inodes[0])          # open: the kernel cannot drop it, so it is not asked
    table.lookup(1, maker(1))      # looked up again: now the youngest
    table.lookup(79, maker(79), preferred_ino=1079)  # 81 held: past capacity
    victims = _pruned(notifier)
    # down to 7/8 of the capacity: 81 - 70 = 11, oldest first, skipping 0 and 1
    assert victims == [1000 + i for i in range(2, 13)]
    assert ROOT_INO not in victims
    # The next prune waits for capacity/16 = 5 new inodes, whatever the count says.
    for i in range(80, 84):
        table.lookup(i, maker(i), preferred_ino=1000 + i)
    assert len(_pruned(notifier)) == 11
    table.lookup(84, maker(84), preferred_ino=1084)
    again = _pruned(notifier)[11:]
    # The ones asked before went to the young end: others are asked first.
    assert again == [1013 + i for i in range(len(again))] and len(again) == 86 - 70
    assert 1000 not in again


def test_forgotten_inodes_leave_the_pruning_order() -> None:
    table = make_table()
    notifier = RecordingNotifier()
    table.enable_pruning(notifier, capacity=20)
    for i in range(16):
        table.lookup(i, maker(i), preferred_ino=100 + i)
    for i in range(8):
        table.forget(100 + i, 1)   # what the kernel does for pruned inodes
    assert notifier.calls == []
    for i in range(16, 28):
        table.lookup(i, maker(i), preferred_ino=100 + i)
    victims = _pruned(notifier)
    assert victims and min(victims) >= 108
    assert all(table.get(ino).lookups == 1 for ino in victims)


def test_prune_now_prunes_below_capacity_and_without_a_notifier_nothing() -> None:
    table = make_table()
    for i in range(10):
        table.lookup(i, maker(i), preferred_ino=100 + i)
    assert table.prune_now() is False  # no notifier: nothing to do, no error
    notifier = RecordingNotifier(can_prune=False)
    table.enable_pruning(notifier, capacity=4)
    table.prune_now()
    assert notifier.calls == []   # the kernel cannot prune: never asked
    notifier = RecordingNotifier()
    table.enable_pruning(notifier, capacity=1000)
    assert table.prune_now() is True
    assert _pruned(notifier) == [100 + i for i in range(10)]
    assert table.prune_now() is True   # at once again: no second prune
    assert len(notifier.calls) == 1


def test_running_out_of_fds_under_capacity_learns_the_cost_of_an_inode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlay directories hold an fd per layer: EMFILE while the table is under its
    capacity means inodes cost more than assumed; the capacity shrinks to match."""
    import backingfs.inodes as inodes_mod

    monkeypatch.setattr(inodes_mod.resource, "getrlimit", lambda which: (200, 200))
    table = make_table()
    notifier = RecordingNotifier()
    table.enable_pruning(notifier)
    assert table.capacity == 150            # 200 fds, a quarter kept free, 1 fd per inode
    for i in range(140):
        table.lookup(i, maker(i), preferred_ino=100 + i)
    assert notifier.calls == []             # under capacity
    assert table.prune_now() is True        # but the daemon met EMFILE
    assert table.capacity == int(150 / (200 / 141))
    assert len(_pruned(notifier)) == 141 - int(table.capacity * 0.875)
