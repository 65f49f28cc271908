"""The io_uring backend: raw round trips and errors, 1,000 concurrent reads, RWF_APPEND,
teardown; and the queued read/write path with a ring active (sizes, versions, leaks)."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from rw_checks import (
    Stacked,
    assert_size_and_versions,
    extending_writes,
    fd_count,
    write_concurrently_racing_stats,
)

from backingfs import closing, rw, uring
from backingfs.aio import live_aios
from backingfs.backing_file import BackingFile
from backingfs.context import BackingFileCtx
from backingfs.flags import IocbFlags
from backingfs.inflight import InFlight
from backingfs.request import Request
from backingfs.sync import fsync_queued
from backingfs.uring import IORING_OP_READ, IORING_OP_WRITE, Uring, buffer_address

REASON = Uring.probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"io_uring unusable: {REASON}")


@asynccontextmanager
async def running_ring(entries: int = 256, *, active: bool = False) -> AsyncIterator[Uring]:
    ring = Uring(entries)
    async with trio.open_nursery() as nursery:
        await nursery.start(ring.run)
        if active:
            uring.ACTIVE = ring
        try:
            yield ring
        finally:
            uring.ACTIVE = None
            nursery.cancel_scope.cancel()
    assert ring.pending == 0
    ring.close()


async def do(ring: Uring, op: int, fd: int, buf: object, offset: int, rw_flags: int = 0) -> int:
    addr, n, keep = buffer_address(buf, writable=op == IORING_OP_READ)
    done = trio.Event()
    result: list[int] = []

    def callback(res: int) -> None:
        result.append(res)
        done.set()

    ring.submit(op, fd, addr, n, offset, rw_flags, callback, keep)
    await done.wait()
    return result[0]


def test_round_trips_at_odd_offsets_and_errno_results(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")

    async def main() -> None:
        fd = os.open(p, os.O_RDWR)
        async with running_ring(8) as ring:
            data = os.urandom(10007)
            assert await do(ring, IORING_OP_WRITE, fd, data, 4093) == 10007
            view = memoryview(bytearray(b"xyz" * 100))[1:200]  # writable, not at offset 0
            assert await do(ring, IORING_OP_WRITE, fd, view, 3) == 199
            expect = bytearray(4093 + 10007)
            expect[4093:] = data
            expect[3:202] = bytes(view)
            assert os.pread(fd, 20000, 0) == bytes(expect)

            buf = bytearray(777)
            assert await do(ring, IORING_OP_READ, fd, buf, 5001) == 777
            assert buf == expect[5001:5778]
            tail = bytearray(100)  # across EOF: the short tail
            assert await do(ring, IORING_OP_READ, fd, tail, len(expect) - 31) == 31
            assert tail[:31] == expect[-31:]

            closed = os.open(p, os.O_RDONLY)
            os.close(closed)
            assert await do(ring, IORING_OP_READ, closed, bytearray(8), 0) == -errno.EBADF
            ro = os.open(p, os.O_RDONLY)
            assert await do(ring, IORING_OP_WRITE, ro, b"nope", 0) == -errno.EBADF
            os.close(ro)
            assert await do(ring, IORING_OP_READ, fd, bytearray(8), 0, 1 << 30) \
                == -errno.EOPNOTSUPP  # an unknown RWF bit
            directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            assert await do(ring, IORING_OP_READ, directory, bytearray(8), 0) == -errno.EISDIR
            os.close(directory)
            assert ring.pending == 0
        os.close(fd)

    trio.run(main)


def test_bytes_are_addressed_in_place() -> None:
    data = b"in place" * 10
    addr, n, keep = buffer_address(data, writable=False)
    assert n == len(data)
    assert addr == id(data) + (data.__sizeof__() - len(data) - 1)  # PyBytesObject.ob_sval
    with pytest.raises(TypeError):
        buffer_address(data, writable=True)
    ba = bytearray(16)
    addr, n, keep = buffer_address(ba, writable=True)
    with pytest.raises(BufferError):
        ba.extend(b"x")  # pinned: cannot move under the kernel
    del keep
    ba.extend(b"x")


def test_1000_concurrent_reads_of_distinct_offsets(tmp_path: Path) -> None:
    p = tmp_path / "big"
    data = os.urandom(4 << 20)
    p.write_bytes(data)
    rng = random.Random(7)
    reads = [(rng.randrange(0, len(data) - 8192), rng.randrange(1, 8192)) for _ in range(1000)]

    async def main() -> None:
        fd = os.open(p, os.O_RDONLY)
        async with running_ring(64) as ring:  # smaller than the load: busy is exercised
            busy = 0

            async def one(off: int, n: int) -> None:
                nonlocal busy
                buf = bytearray(n)
                while True:
                    try:
                        res = await do(ring, IORING_OP_READ, fd, buf, off)
                        break
                    except uring.UringBusyError:
                        busy += 1
                        await trio.sleep(0)
                assert res == n
                assert buf == data[off:off + n]

            async with trio.open_nursery() as nursery:
                for off, n in reads:
                    nursery.start_soon(one, off, n)
            assert ring.pending == 0
            assert ring.completed == ring.submitted >= 1000
        os.close(fd)

    trio.run(main)


def test_rwf_append_lands_at_eof(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(b"0123456789")

    async def main() -> None:
        fd = os.open(p, os.O_RDWR)
        async with running_ring(4) as ring:
            assert await do(ring, IORING_OP_WRITE, fd, b"ab", 0, os.RWF_APPEND) == 2
        os.close(fd)

    trio.run(main)
    assert p.read_bytes() == b"0123456789ab"


def test_close_with_nothing_pending_releases_every_fd_and_refuses_when_pending(
        tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    before = fd_count()
    ring = Uring(4)
    assert fd_count() >= before + 2  # the ring and its eventfd (mmap objects dup theirs)
    ring.close()
    ring.close()  # idempotent
    assert fd_count() == before
    with pytest.raises(uring.UringBusyError):
        ring.submit(IORING_OP_READ, 0, 0, 0, 0, 0, lambda res: None)

    async def main() -> None:
        fd = os.open(p, os.O_RDONLY)
        ring = Uring(4)
        buf = bytearray(4096)
        addr, n, keep = buffer_address(buf, writable=True)
        got: list[int] = []
        ring.submit(IORING_OP_READ, fd, addr, n, 0, 0, got.append, keep)
        assert ring.pending == 1
        with pytest.raises(RuntimeError):
            ring.close()
        async with trio.open_nursery() as nursery:
            await nursery.start(ring.run)
            while not got:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert got == [4096] and ring.pending == 0
        ring.close()
        os.close(fd)

    trio.run(main)
    assert fd_count() == before


# -- the queued path with a ring active -----------------------------------------------------

def test_1000_concurrent_extending_writes_on_the_ring_keep_size_and_monotonic_version(
        tmp_path: Path) -> None:
    p = tmp_path / "grow"
    p.write_bytes(b"")
    writes = extending_writes()

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDWR)
        async with running_ring(1024, active=True) as ring:  # room for all 1000 at once
            stacked = await write_concurrently_racing_stats(file, writes)
            assert ring.submitted == 1000  # every write went to the ring, none to threads
        assert_size_and_versions(file, writes, stacked)
        file.put()

    trio.run(main)
    assert live_aios() == 0


def test_append_on_the_ring_sets_the_position_to_eof(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDWR)
        async with running_ring(active=True) as ring:
            req = Request(Stacked(), 3, IocbFlags.APPEND)
            assert await rw.write(file, b"cd", req, BackingFileCtx()) == 2
            assert req.pos == 12
            assert ring.submitted == 1
        file.put()

    trio.run(main)
    assert p.read_bytes() == b"0123456789cd"


def test_5000_mixed_queued_requests_on_the_ring_leak_nothing(tmp_path: Path) -> None:
    p = tmp_path / "mixed"
    data = os.urandom(1 << 20)
    p.write_bytes(data)
    rng = random.Random(99)
    ops = [(rng.random() < 0.5, rng.randrange(0, (1 << 20) - 4096), rng.randrange(1, 4096))
           for _ in range(5000)]
    base_fds = fd_count()

    async def main() -> None:
        async with running_ring(active=True) as ring:
            file = BackingFile.open(p, os.O_RDWR)
            file.nowait_ok = False  # no page-cache fast path: every read is queued
            io = InFlight()
            errors: list[BaseException] = []

            async def one(is_write: bool, off: int, n: int) -> None:
                try:
                    # writes rewrite the same bytes, so every read can be checked exactly
                    if is_write:
                        await rw.write(file, data[off:off + n], Request(Stacked(), off),
                                       BackingFileCtx(), io=io)
                    else:
                        got = await rw.read(file, n, Request(Stacked(), off), BackingFileCtx(),
                                            io=io)
                        assert bytes(got) == data[off:off + n]
                except BaseException as exc:  # noqa: BLE001 - collected and checked below
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for is_write, off, n in ops:
                    nursery.start_soon(one, is_write, off, n)
            await io.wait_drained()
            assert not errors
            assert ring.submitted >= 512  # the ring took what fits; the rest went to threads
            file.put()
            assert file.is_closed

    trio.run(main)
    assert live_aios() == 0
    assert fd_count() == base_fds


def test_a_pool_of_the_callers_own_still_gets_every_queued_request(tmp_path: Path) -> None:
    from backingfs.workers import Workers

    p = tmp_path / "f"
    p.write_bytes(b"")
    workers = Workers(max_threads=2)

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDWR)
        async with running_ring(active=True) as ring:
            assert await rw.write(file, b"abc", Request(Stacked(), 0), BackingFileCtx(),
                                  workers=workers) == 3
            assert ring.submitted == 0
        file.put()

    trio.run(main)
    assert workers.statistics().queued == 1
    workers.shutdown()


def cap_ring_transfers(ring: Uring, cap: int) -> None:
    """Make every op on ``ring`` move at most ``cap`` bytes: short transfers on demand."""
    submit = ring.submit

    def short(op: int, fd: int, addr: int, length: int, *rest: object) -> None:
        submit(op, fd, addr, min(length, cap), *rest)  # type: ignore[arg-type]

    ring.submit = short  # type: ignore[method-assign]


def test_short_ring_writes_and_reads_are_continued_until_done_or_eof(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    data = os.urandom(1000)

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDWR)
        file.nowait_ok = False
        async with running_ring(active=True) as ring:
            cap_ring_transfers(ring, 100)
            req = Request(Stacked(), 5)
            assert await rw.write(file, data, req, BackingFileCtx()) == 1000
            assert req.pos == 1005
            assert ring.submitted == 10

            req = Request(Stacked(), 5)
            got = await rw.read(file, 1000, req, BackingFileCtx())
            assert bytes(got) == data and req.pos == 1005
            assert ring.submitted == 20

            req = Request(Stacked(), 850)  # 155 bytes to EOF: two ops, not a third at EOF
            got = await rw.read(file, 4096, req, BackingFileCtx())
            assert bytes(got) == data[845:] and req.pos == 1005
            assert ring.submitted == 22
        file.put()

    trio.run(main)
    assert p.read_bytes() == bytes(5) + data
    assert live_aios() == 0


@pytest.mark.parametrize("datasync", [False, True])
def test_fsync_queued_goes_through_the_active_ring_and_reports_errors(
        tmp_path: Path, datasync: bool) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    bad = os.open(tmp_path, os.O_PATH)   # fsync of an O_PATH fd: EBADF

    async def main() -> None:
        async with running_ring(active=True) as ring:
            os.write(fd, b"x" * 8192)
            before = ring.submitted
            await fsync_queued(fd, datasync)
            assert ring.submitted == before + 1
            with pytest.raises(OSError) as exc:
                await fsync_queued(bad, datasync)
            assert exc.value.errno == errno.EBADF
            assert ring.submitted == before + 2
        # no ring serving this thread: a worker thread does it, with the same errors
        await fsync_queued(fd, datasync)
        with pytest.raises(OSError) as exc:
            await fsync_queued(bad, datasync)
        assert exc.value.errno == errno.EBADF

    try:
        trio.run(main)
    finally:
        os.close(fd)
        os.close(bad)


def test_completions_that_overflowed_the_cq_are_still_reaped(tmp_path: Path) -> None:
    # The ring never has more in flight than CQ slots, yet a CQ overflow has been seen under
    # stress (cause unknown). Once the kernel holds a completion in its overflow list, every
    # later one queues behind it until an enter with GETEVENTS: a reaper that only looked
    # at the CQ went silent for good, and the reads waiting on it hung. Force one here by
    # lifting the in-flight cap of a small ring.
    p = tmp_path / "f"
    data = os.urandom(64 * 4096)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    os.pread(fd, len(data), 0)  # cached: each read completes during its own submit
    ring = Uring(2)
    try:
        assert ring.cq_entries < 20
        ring.cq_entries = 1000  # bypass the cap that normally prevents overflow
        results: dict[int, int] = {}
        bufs = [bytearray(4096) for _ in range(20)]
        for i, buf in enumerate(bufs):
            addr, n, keep = buffer_address(buf, writable=True)
            ring.submit(IORING_OP_READ, fd, addr, n, i * 4096,
                        0, lambda res, i=i: results.__setitem__(i, res), keep)
        deadline = time.monotonic() + 5
        while len(results) < len(bufs) and time.monotonic() < deadline:
            assert ring.ready() or ring.pending == 0
            ring.reap()
        assert results == {i: 4096 for i in range(len(bufs))}
        assert [bytes(b) for b in bufs] == [data[i * 4096:(i + 1) * 4096] for i in range(20)]
        assert ring.overflows >= 1 and ring.pending == 0 and not ring.ready()
        # and the ring works on afterwards
        buf = bytearray(4096)
        addr, n, keep = buffer_address(buf, writable=True)
        ring.submit(IORING_OP_READ, fd, addr, n, 8192, 0, lambda res: results.__setitem__(-1, res),
                    keep)
        while -1 not in results and time.monotonic() < deadline:
            ring.reap()
        assert results[-1] == 4096 and bytes(buf) == data[8192:12288]
    finally:
        ring.close()
        os.close(fd)


def _queue_reads(ring: Uring, fd: int, n: int, size: int = 4096
                 ) -> tuple[list[bytearray], dict[int, int]]:
    """Submit ``n`` reads of ``size`` at offsets 0, size, ...; their results by index."""
    bufs = [bytearray(size) for _ in range(n)]
    results: dict[int, int] = {}
    for i, buf in enumerate(bufs):
        addr, length, keep = buffer_address(buf, writable=True)
        ring.submit(IORING_OP_READ, fd, addr, length, i * size, 0,
                    lambda res, i=i: results.__setitem__(i, res), keep)
    return bufs, results


def _failing_enter(err: int) -> Callable[..., int]:
    """A stand-in for ``uring._enter`` that fails with ``err``, as the syscall would."""

    def enter(*args: object) -> int:
        ctypes.set_errno(err)
        return -1

    return enter


def test_deferred_submissions_reach_the_kernel_at_flush(tmp_path: Path) -> None:
    """With ``deferring`` the SQ holds the entries (no enter, no completion, however long
    we wait) until ``flush``, which hands them over in one io_uring_enter."""
    p = tmp_path / "f"
    data = os.urandom(4 * 4096)
    p.write_bytes(data)

    async def main() -> None:
        fd = os.open(p, os.O_RDONLY)
        async with running_ring(16) as ring:
            ring.deferring = True
            bufs, results = _queue_reads(ring, fd, 4)
            await trio.sleep(0.1)
            assert (ring.enters, ring.pending, results) == (0, 4, {})
            assert ring.flush()
            assert not ring.deferring and ring.enters == 1
            while ring.pending:
                await trio.sleep(0.01)
            assert results == {i: 4096 for i in range(4)}
            assert b"".join(bufs) == data
        os.close(fd)

    trio.run(main)


def test_deferral_enters_once_defer_max_entries_wait(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom((uring.DEFER_MAX + 1) * 512))

    async def main() -> None:
        fd = os.open(p, os.O_RDONLY)
        async with running_ring(32) as ring:
            ring.deferring = True
            _queue_reads(ring, fd, uring.DEFER_MAX - 1, 512)
            assert ring.enters == 0
            _queue_reads(ring, fd, 1, 512)
            assert ring.enters == 1  # all DEFER_MAX in that one enter
            assert ring.flush() and ring.enters == 1  # nothing left to hand over
            while ring.pending:
                await trio.sleep(0.01)
        os.close(fd)

    trio.run(main)


def test_a_flush_the_kernel_defers_keeps_the_entries_for_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EAGAIN from io_uring_enter: nothing is lost or failed, the next flush submits."""
    p = tmp_path / "f"
    data = os.urandom(3 * 4096)
    p.write_bytes(data)
    real = uring._enter
    busy = _failing_enter(errno.EAGAIN)

    async def main() -> None:
        fd = os.open(p, os.O_RDONLY)
        async with running_ring(16) as ring:
            ring.deferring = True
            bufs, results = _queue_reads(ring, fd, 3)
            monkeypatch.setattr(uring, "_enter", busy)
            assert not ring.flush()
            await trio.sleep(0.05)
            assert (ring.pending, results) == (3, {})
            monkeypatch.setattr(uring, "_enter", real)
            assert ring.flush()
            while ring.pending:
                await trio.sleep(0.01)
            assert results == {0: 4096, 1: 4096, 2: 4096} and b"".join(bufs) == data
        os.close(fd)

    trio.run(main)


def test_entries_the_kernel_refuses_at_flush_complete_with_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other error from io_uring_enter: each deferred entry is taken back off the SQ
    and its callback gets the error, on the loop, after ``flush`` returned; the ring
    stays usable."""
    p = tmp_path / "f"
    data = os.urandom(2 * 4096)
    p.write_bytes(data)
    real = uring._enter
    refuse = _failing_enter(errno.EINVAL)

    async def main() -> None:
        fd = os.open(p, os.O_RDONLY)
        async with running_ring(16) as ring:
            ring.deferring = True
            _, results = _queue_reads(ring, fd, 2)
            monkeypatch.setattr(uring, "_enter", refuse)
            assert ring.flush()  # nothing left queued to retry
            assert results == {}  # not from inside flush
            monkeypatch.setattr(uring, "_enter", real)
            while ring.pending:
                await trio.sleep(0.01)
            assert results == {0: -errno.EINVAL, 1: -errno.EINVAL}
            buf = bytearray(4096)
            assert await do(ring, IORING_OP_READ, fd, buf, 4096) == 4096
            assert bytes(buf) == data[4096:]
        os.close(fd)

    trio.run(main)


# -- closing.close_fd: big unlinked files closed by an io-wq worker ---------------------

def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


BIG = 32 << 20


def test_close_fd_on_the_ring_closes_on_a_worker_and_frees_an_unlinked_file(
        tmp_path: Path) -> None:
    # The point of going through the ring: the close that frees an unlinked file is not
    # made by the loop thread. Until the ring completes it the number stays taken (no
    # reuse), the ring counts it pending, and then the fd is gone and the file freed.
    p = tmp_path / "big"
    p.write_bytes(os.urandom(BIG))
    path_fds = [os.open(p, os.O_PATH) for _ in range(3)]
    os.unlink(p)
    free0 = os.statvfs(tmp_path).f_bfree

    async def main() -> None:
        async with running_ring(8, active=True) as ring:
            assert ring.closes
            submitted = ring.submitted
            for fd in path_fds[:2]:
                os.close(fd)
            closing.close_fd(path_fds[2])
            assert ring.submitted == submitted + 1
            assert ring.pending == 1
            with trio.fail_after(5):
                while ring.pending:
                    await trio.sleep(0.001)
            assert not _is_open(path_fds[2])

    trio.run(main)
    os.sync()
    st = os.statvfs(tmp_path)
    # Most of it: the filesystem is shared with whatever else runs meanwhile.
    assert (st.f_bfree - free0) * st.f_frsize >= BIG * 3 // 4


def _big_unlinked(tmp_path: Path, n: int) -> list[int]:
    """``n`` O_PATH fds of one unlinked file that a close would have much to free."""
    p = tmp_path / "big"
    p.write_bytes(b"x" * (closing.ASYNC_CLOSE_BYTES * 4))
    os.sync()  # allocated, so st_blocks says how big it is
    fds = [os.open(p, os.O_PATH) for _ in range(n)]
    os.unlink(p)
    return fds


def test_close_fd_off_the_rings_thread_or_without_a_ring_closes_at_once(
        tmp_path: Path) -> None:
    fds = _big_unlinked(tmp_path, 2)

    async def main() -> None:
        async with running_ring(8, active=True) as ring:
            submitted = ring.submitted
            await trio.to_thread.run_sync(closing.close_fd, fds[0])
            assert not _is_open(fds[0])
            assert ring.submitted == submitted

    trio.run(main)
    assert uring.ACTIVE is None
    closing.close_fd(fds[1])
    assert not _is_open(fds[1])
    closing.close_fd(fds[1])  # a double close is logged, never raised


def test_close_fd_closes_at_once_what_frees_little(tmp_path: Path) -> None:
    # A worker's wake-up costs more than these closes: a linked file's, a small unlinked
    # file's (the freeing of the Django tree's files under rm -rf), a directory's.
    linked = tmp_path / "linked"
    linked.write_bytes(b"x" * (closing.ASYNC_CLOSE_BYTES * 4))
    small = tmp_path / "small"
    small.write_bytes(b"x" * 4096)
    gone = tmp_path / "gone"
    gone.mkdir()
    os.sync()
    fds = [os.open(p, os.O_PATH) for p in (linked, small, gone)]
    small.unlink()
    gone.rmdir()

    async def main() -> None:
        async with running_ring(8, active=True) as ring:
            submitted = ring.submitted
            for fd in fds:
                closing.close_fd(fd)
                assert not _is_open(fd)
            assert ring.submitted == submitted

    trio.run(main)


def test_close_fd_falls_back_to_close_when_the_ring_is_full(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_ring(2, active=True) as ring:
            fds = _big_unlinked(tmp_path, ring.cq_entries + 2)
            submitted = ring.submitted
            ring.deferring = True  # keep them in the SQ: the ring fills up
            for fd in fds:
                closing.close_fd(fd)
            assert 0 < ring.pending < len(fds)  # the ring took some, os.close the rest
            ring.flush()
            with trio.fail_after(5):
                while ring.pending:
                    await trio.sleep(0.001)
            assert ring.submitted > submitted
            assert not any(_is_open(fd) for fd in fds)

    trio.run(main)
