"""Shared by test_rw.py and test_uring.py: a stand-in stacked handle whose end_write grows
its AttrCache, and the 1,000-concurrent-extending-writes check both I/O backends must pass.

Its own module (not conftest.py) so the tests import it by a name no other directory uses.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import trio

from backingfs import rw
from backingfs.attrs import Attr, AttrCache
from backingfs.backing_file import BackingFile
from backingfs.context import BackingFileCtx
from backingfs.inflight import InFlight
from backingfs.request import Request


class Stacked:
    def __init__(self) -> None:
        self.attrs = AttrCache()
        self.versions: list[int] = []


def end_write_grows(h: Stacked, pos: int, res: int) -> None:
    if res > 0:
        h.attrs.grow_size(pos)
        h.versions.append(h.attrs.version)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def extending_writes(n: int = 1000, seed: int = 1234) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(0, 4 << 20), rng.randrange(1, 4096)) for _ in range(n)]


async def write_concurrently_racing_stats(file: BackingFile,
                                          writes: list[tuple[int, int]]) -> Stacked:
    """Every write as its own task, with getattr-style stats (version read, fstat off the
    loop, merge) racing them; returns the stacked handle once all I/O drained."""
    stacked = Stacked()
    ctx = BackingFileCtx(end_write=end_write_grows)
    io = InFlight()

    async def one(off: int, n: int) -> None:
        assert await rw.write(file, b"w" * n, Request(stacked, off), ctx, io=io) == n

    async def stat_racer() -> None:
        for _ in range(200):
            v = stacked.attrs.version
            st = await trio.to_thread.run_sync(os.fstat, file.fd)
            stacked.attrs.merge(Attr.from_stat(st), v)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stat_racer)
        for off, n in writes:
            nursery.start_soon(one, off, n)
    await io.wait_drained()
    return stacked


def assert_size_and_versions(file: BackingFile, writes: list[tuple[int, int]],
                             stacked: Stacked) -> None:
    backing = os.fstat(file.fd).st_size
    assert backing == max(off + n for off, n in writes)
    assert stacked.attrs.size == backing
    assert stacked.versions == sorted(stacked.versions)
    assert len(set(stacked.versions)) == len(stacked.versions) == len(writes)


class ManualWorkers:
    """Queues work until the test runs it: completion strictly after submit returned."""

    def __init__(self) -> None:
        self.queue: list[Callable[[], None]] = []

    def submit(self, fn: Callable[[], None]) -> None:
        self.queue.append(fn)

    def run_all(self) -> None:
        while self.queue:
            self.queue.pop(0)()
