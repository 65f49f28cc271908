"""The awaitable read/write helpers under load: append, the NOWAIT fast path, extending
writes racing stats, release draining in-flight writes, and fd/aio leaks."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from rw_checks import (
    ManualWorkers,
    Stacked,
    assert_size_and_versions,
    end_write_grows,
    extending_writes,
    fd_count,
    write_concurrently_racing_stats,
)

from backingfs import rw
from backingfs.aio import live_aios
from backingfs.backing_file import BackingFile
from backingfs.context import BackingFileCtx
from backingfs.flags import IocbFlags
from backingfs.inflight import InFlight
from backingfs.request import Request
from backingfs.workers import Workers


def test_append_lands_at_eof_without_o_append(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    file = BackingFile.open(p, os.O_RDWR | os.O_APPEND)
    assert not fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_APPEND
    req = Request(Stacked(), 0, IocbFlags.APPEND)
    assert rw.write_iter(file, b"ab", req, BackingFileCtx()) == 2
    assert req.pos == 12
    os.pwrite(file.fd, b"Z", 0)  # a plain write still honours its offset on this fd

    async def queued() -> None:
        req2 = Request(Stacked(), 3, IocbFlags.APPEND)
        assert await rw.write(file, b"cd", req2, BackingFileCtx()) == 2
        assert req2.pos == 14

    trio.run(queued)
    assert p.read_bytes() == b"Z123456789abcd"
    file.put()


def resident_pages(fd: int, size: int) -> int:
    """Pages of the file in the page cache: mincore on a fresh mapping (faults nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec.raw)
    finally:
        libc.munmap(addr, size)


def evict(fd: int, size: int) -> None:
    """Drop the file from the page cache, retrying while readahead still holds pages
    (DONTNEED skips locked pages and ones on per-CPU LRU batches)."""
    os.fsync(fd)
    for _ in range(200):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if resident_pages(fd, size) == 0:
            return
        time.sleep(0.005)
    raise AssertionError("could not evict the file from the page cache")


def test_nowait_fast_path_cached_stays_on_loop_uncached_goes_to_worker(tmp_path: Path) -> None:
    p = tmp_path / "big"
    data = os.urandom(1 << 20)
    p.write_bytes(data)
    workers = Workers(max_threads=2)

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDONLY)
        # Cached and clean: a page under writeback is locked, and NOWAIT would say EAGAIN.
        os.fsync(file.fd)
        os.pread(file.fd, len(data), 0)
        before = workers.statistics().queued
        got = await rw.read(file, 65536, Request(Stacked(), 4096), BackingFileCtx(),
                            workers=workers)
        assert bytes(got) == data[4096:4096 + 65536]
        assert workers.statistics().queued == before  # served on the loop thread

        # Uncached: NOWAIT says EAGAIN and the read goes to a worker. On a virtual disk
        # backed by the host's cache the readahead NOWAIT itself starts can complete before
        # NOWAIT looks again, serving the read inline; so evict and retry, and require
        # that the fallback happened (and every read returned the right bytes).
        fell_back = False
        for attempt in range(20):
            evict(file.fd, len(data))
            off = (attempt % 8) * 65536 + 512 * 1024 - 65536 * 4
            queued = workers.statistics().queued
            got = await rw.read(file, 65536, Request(Stacked(), off), BackingFileCtx(),
                                workers=workers)
            assert bytes(got) == data[off:off + 65536]
            if workers.statistics().queued == queued + 1:
                fell_back = True
                break
        assert fell_back, "an uncached read never fell back to a worker thread"

        # a read across EOF returns the short tail (not a spurious fallback or error)
        got = await rw.read(file, 8192, Request(Stacked(), len(data) - 100), BackingFileCtx(),
                            workers=workers)
        assert bytes(got) == data[-100:]
        file.put()

    trio.run(main)
    workers.shutdown()


def test_1000_concurrent_extending_writes_keep_size_and_monotonic_version(tmp_path: Path) -> None:
    p = tmp_path / "grow"
    p.write_bytes(b"")
    writes = extending_writes()

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDWR)
        stacked = await write_concurrently_racing_stats(file, writes)
        assert_size_and_versions(file, writes, stacked)
        file.put()

    trio.run(main)
    assert live_aios() == 0


class GatedWorkers:
    """Real threads that hold every request at a gate until the test opens it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.inner = Workers(max_threads=64)

    def submit(self, fn: Callable[[], None]) -> None:
        def gated() -> None:
            self.gate.wait()
            fn()

        self.inner.submit(gated)


def test_release_waits_for_50_delayed_writes_and_loses_nothing(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    workers = GatedWorkers()
    order: list[str] = []

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDWR)
        fd = file.fd
        handle_io = InFlight()
        stacked = Stacked()
        ctx = BackingFileCtx(end_write=end_write_grows)

        async def writer(i: int) -> None:
            await rw.write(file, bytes([65 + i % 26]) * 100, Request(stacked, i * 100), ctx,
                           io=handle_io, workers=workers)  # type: ignore[arg-type]

        async def release() -> None:
            with trio.CancelScope(shield=True):
                await handle_io.wait_drained()
            order.append(f"released with {handle_io.count} in flight")
            file.put()

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(writer, i)
            await trio.testing.wait_all_tasks_blocked()
            assert handle_io.count == 50
            nursery.start_soon(release)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []  # release is waiting
            assert os.readlink(f"/proc/self/fd/{fd}") == str(p)
            order.append("gate opened")
            workers.gate.set()
        assert order == ["gate opened", "released with 0 in flight"]
        assert stacked.attrs.size == 5000

    try:
        trio.run(main)
    finally:
        workers.gate.set()  # never leave a worker parked at the gate: it would hang exit
        workers.inner.shutdown()
    assert p.read_bytes() == b"".join(bytes([65 + i % 26]) * 100 for i in range(50))
    assert live_aios() == 0


def test_fd_count_returns_to_baseline_after_10000_mixed_requests(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(1 << 16))
    rng = random.Random(99)
    workers = GatedWorkers()
    workers.gate.set()
    baseline = fd_count()

    async def main() -> None:
        mount_io = InFlight()
        stacked = Stacked()
        ctx = BackingFileCtx(end_write=end_write_grows)
        cancelled = 0
        for _round in range(100):
            rw_file = BackingFile.open(p, os.O_RDWR)
            ro_file = BackingFile.open(p, os.O_RDONLY)
            io = InFlight(parent=mount_io)
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    kind = rng.randrange(6)
                    off = rng.randrange(0, 1 << 16)
                    if kind == 0:  # sync read
                        rw.read_iter(rw_file, bytearray(512), Request(stacked, off), ctx)
                    elif kind == 1:  # sync write
                        rw.write_iter(rw_file, b"s" * 64, Request(stacked, off), ctx)
                    elif kind == 2:  # queued read
                        nursery.start_soon(_read, rw_file, off, stacked, ctx, io, workers)
                    elif kind == 3:  # queued write
                        nursery.start_soon(_write, rw_file, off, stacked, ctx, io, workers)
                    elif kind == 4:  # failed write (read-only fd)
                        nursery.start_soon(_write, ro_file, off, stacked, ctx, io, workers)
                    else:  # cancelled while queued: the caller stops waiting, I/O goes on
                        with trio.CancelScope() as scope:
                            scope.cancel()
                            await rw.write(rw_file, b"c" * 64, Request(stacked, off), ctx,
                                           io=io, workers=workers)  # type: ignore[arg-type]
                        cancelled += scope.cancelled_caught
            with trio.CancelScope(shield=True):
                await io.wait_drained()
            rw_file.put()
            ro_file.put()
        await mount_io.wait_drained()
        assert cancelled > 0

    trio.run(main)
    workers.inner.shutdown()
    assert live_aios() == 0
    assert fd_count() == baseline


async def _read(file: BackingFile, off: int, stacked: Stacked, ctx: BackingFileCtx,
                io: InFlight, workers: GatedWorkers) -> None:
    await rw.read(file, 512, Request(stacked, off), ctx, io=io, workers=workers)  # type: ignore[arg-type]


async def _write(file: BackingFile, off: int, stacked: Stacked, ctx: BackingFileCtx,
                 io: InFlight, workers: GatedWorkers) -> None:
    try:
        await rw.write(file, b"q" * 64, Request(stacked, off), ctx, io=io, workers=workers)  # type: ignore[arg-type]
    except OSError:
        pass


class NowaitMisses:
    """``os.preadv`` as rw.py sees it: every RWF_NOWAIT attempt fails (counted) while
    ``miss`` is set, everything else is the real call. Deterministic, unlike evicting."""

    def __init__(self) -> None:
        self.miss = True
        self.attempts = 0
        self.real = os.preadv

    def __call__(self, fd: int, buffers: list[object], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            self.attempts += 1
            if self.miss:
                raise BlockingIOError(11, "would block")
        return self.real(fd, buffers, offset, flags)


def test_read_start_answers_inline_when_cached_and_from_its_completion_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f"
    data = os.urandom(256 * 1024)
    p.write_bytes(data)
    workers = Workers(max_threads=2)
    fake = NowaitMisses()
    monkeypatch.setattr(rw.os, "preadv", fake)

    async def main() -> None:
        loop_thread = threading.get_ident()
        file = BackingFile.open(p, os.O_RDONLY)
        io = InFlight()
        got: list[tuple[object, int]] = []
        delivered = trio.Event()

        def done(result: memoryview | OSError) -> None:
            got.append((bytes(result) if isinstance(result, memoryview) else result,
                        threading.get_ident()))
            delivered.set()

        # A NOWAIT hit: the data comes back at once, the callback never runs.
        held = InFlight()  # the caller's count, ended by read_start whichever way
        held.begin_io()
        fake.miss = False
        out = rw.read_start(file, 4096, Request(Stacked(), 8192), BackingFileCtx(), done,
                            io=io, workers=workers, held=held)
        assert out is not None and bytes(out) == data[8192:12288]
        assert held.count == 0
        # A miss: None now, then the data through ``done``, once, on the loop thread, even
        # though a worker thread did the read; the in-flight count is back to zero.
        fake.miss = True
        held.begin_io()
        out = rw.read_start(file, 5000, Request(Stacked(), 100_001), BackingFileCtx(), done,
                            io=io, workers=workers, held=held)
        assert out is None
        with trio.fail_after(10):
            await delivered.wait()
        await trio.sleep(0.05)  # a second delivery would have arrived by now
        assert got == [(data[100_001:105_001], loop_thread)]
        assert io.count == 0 and held.count == 0 and live_aios() == 0
        # A read that fails in the worker: ``done`` gets the OSError.
        wfile = BackingFile.open(p, os.O_WRONLY)
        got.clear()
        delivered = trio.Event()
        assert rw.read_start(wfile, 4096, Request(Stacked(), 0), BackingFileCtx(), done,
                             workers=workers) is None
        with trio.fail_after(10):
            await delivered.wait()
        [(err, _)] = got
        assert isinstance(err, OSError) and err.errno == errno.EBADF
        wfile.put()
        file.put()

    trio.run(main)
    workers.shutdown()


def test_a_run_of_nowait_misses_skips_the_attempt_for_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f"
    data = os.urandom(1 << 20)
    p.write_bytes(data)
    workers = Workers(max_threads=2)
    fake = NowaitMisses()
    monkeypatch.setattr(rw.os, "preadv", fake)

    async def main() -> None:
        file = BackingFile.open(p, os.O_RDONLY)

        async def read(off: int, size: int = 4096) -> None:
            got = await rw.read(file, size, Request(Stacked(), off), BackingFileCtx(),
                                workers=workers)
            assert bytes(got) == data[off:off + size]

        for i in range(rw.NOWAIT_MISS_STREAK):
            await read(i * 8192)
        assert fake.attempts == rw.NOWAIT_MISS_STREAK
        for i in range(rw.NOWAIT_SKIP):  # queued without trying
            await read(i * 4096 + 7)
        assert fake.attempts == rw.NOWAIT_MISS_STREAK
        # Large reads (readahead) are not small random reads: they still try.
        await read(0, rw.INLINE_READ_MAX + 4096)
        assert fake.attempts == rw.NOWAIT_MISS_STREAK + 1
        # The skip is over: the next small read tries again; a hit resets the streak, so a
        # single miss after it does not start skipping.
        fake.miss = False
        await read(12345)
        assert fake.attempts == rw.NOWAIT_MISS_STREAK + 2 and file.nowait_misses == 0
        fake.miss = True
        await read(4096)
        await read(8192)
        assert fake.attempts == rw.NOWAIT_MISS_STREAK + 4 and file.nowait_skip == 0
        file.put()

    trio.run(main)
    workers.shutdown()


@pytest.mark.parametrize("where", ["tmpfs", "ext4"])
def test_small_reads_of_a_file_in_memory_are_made_inline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """tmpfs refuses RWF_NOWAIT: after that first refusal its small reads are made on the
    calling thread (no device to wait for), larger ones still queued. Another filesystem
    that refuses it keeps every read queued: a read there may wait for a device."""
    if where == "tmpfs":
        if not Path("/dev/shm").is_dir() or rw.syscalls.fs_type(
                os.open("/dev/shm", os.O_PATH | os.O_CLOEXEC)) not in rw.MEMORY_FS:
            pytest.skip("no tmpfs at /dev/shm")
        base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    else:
        base = tmp_path
        real = os.preadv

        def no_nowait(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
            if flags & os.RWF_NOWAIT:
                raise OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT here")
            return real(fd, buffers, offset, flags)
        monkeypatch.setattr(rw.os, "preadv", no_nowait)
    try:
        data = os.urandom(256 * 1024)
        (base / "f").write_bytes(data)
        file = BackingFile.open(base / "f", os.O_RDONLY)
        workers = ManualWorkers()
        ctx = BackingFileCtx(inline_io=True)

        def read(off: int, size: int) -> int | object:
            buf = bytearray(size)
            n = rw.read_iter(file, buf, Request(Stacked(), off, complete=lambda r, res: None),
                             ctx, workers=workers, may_block=False)
            if n is not rw.QUEUED:
                assert bytes(buf[:n]) == data[off:off + n]  # type: ignore[operator]
            return n

        try:
            assert read(0, 4096) is rw.QUEUED  # the refusal: learnt, this one queued
            assert not file.nowait_ok
            assert file.in_memory == (where == "tmpfs")
            if where == "tmpfs":
                assert read(8192, 4096) == 4096
                assert read(100_000, rw.INLINE_READ_MAX) == rw.INLINE_READ_MAX
                assert read(0, rw.INLINE_READ_MAX + 4096) is rw.QUEUED
            else:
                assert read(8192, 4096) is rw.QUEUED
        finally:
            workers.run_all()
            file.put()
        assert live_aios() == 0
    finally:
        if where == "tmpfs":
            shutil.rmtree(base, ignore_errors=True)
