"""BackingAio / read_iter / write_iter: the refcount-2 lifecycle and ordered completion.

Fake workers decide *when* the I/O and its completion run relative to the submitter, so both
sides of the "submit returned" / "completion ran" race are forced deterministically.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from rw_checks import ManualWorkers

from backingfs import rw
from backingfs.aio import QUEUED, live_aios
from backingfs.backing_file import BackingFile
from backingfs.context import BackingFileCtx
from backingfs.request import Request
from backingfs.workers import WorkersShutDownError


class InlineWorkers:
    """Runs the work inside submit(): completion before the submitter returns."""

    def submit(self, fn: Callable[[], None]) -> None:
        fn()


class DeadWorkers:
    def submit(self, fn: Callable[[], None]) -> None:
        raise WorkersShutDownError("shut down")


def fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


class Stacked:
    """A stand-in for a user-visible handle; callbacks must get exactly this object."""


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(b"0123456789")
    return p


def test_read_completion_after_submit_returned(data_file: Path) -> None:
    file = BackingFile.open(data_file, os.O_RDONLY)
    file.nowait_ok = False  # force the queued path
    fd, stacked, events = file.fd, Stacked(), []
    ctx = BackingFileCtx(accessed=lambda h: events.append(("accessed", h)))

    def complete(req: Request, res: int) -> None:
        events.append(("complete", req.file, req.pos, res))

    req = Request(stacked, 2, complete=complete)
    buf = bytearray(4)
    workers = ManualWorkers()
    assert rw.read_iter(file, buf, req, ctx, workers=workers) is QUEUED
    assert events == [("accessed", stacked)]  # accessed runs in the submitter, even queued
    file.put()  # the owner lets go (a release) while the read is queued
    assert fd_target(fd) == str(data_file)  # the aio's reference keeps the fd open
    workers.run_all()
    assert events == [("accessed", stacked), ("complete", stacked, 6, 4)]
    assert bytes(buf) == b"2345"
    assert fd_target(fd) is None or fd_target(fd) != str(data_file)
    assert live_aios() == 0


def test_read_completion_before_submit_returned(data_file: Path) -> None:
    file = BackingFile.open(data_file, os.O_RDONLY)
    file.nowait_ok = False
    file_ref = file.get()  # stands for the submitter's hold on its handle
    fd, stacked, seen = file.fd, Stacked(), []

    def complete(req: Request, res: int) -> None:
        # Completion runs inside submit(): the submitter's reference is still held, so
        # even with the owner gone the fd must be open here.
        file.put()
        seen.append((req.file, res, fd_target(fd)))

    req = Request(stacked, 0, complete=complete)
    buf = bytearray(3)
    ret = rw.read_iter(file, buf, req, BackingFileCtx(), workers=InlineWorkers())
    assert ret is QUEUED
    assert seen == [(stacked, 3, str(data_file))]
    assert file.refs == 1 and fd_target(fd) == str(data_file)
    file_ref.put()
    assert fd_target(fd) != str(data_file)
    assert live_aios() == 0


def test_write_completion_order_on_the_loop(data_file: Path) -> None:
    async def main() -> None:
        file = BackingFile.open(data_file, os.O_RDWR)
        stacked, events = Stacked(), []
        loop_thread = threading.get_ident()

        def end_write(h: object, pos: int, res: int) -> None:
            events.append(("end_write", h, pos, res, threading.get_ident() == loop_thread,
                           req.pos))

        def complete(r: Request, res: int) -> None:
            events.append(("complete", r.file, r.pos, res))
            done.set()

        done = trio.Event()
        req = Request(stacked, 10, complete=complete)
        ret = rw.write_iter(file, b"abc", req, BackingFileCtx(end_write=end_write))
        assert ret is QUEUED
        await done.wait()
        # position copied back before end_write; end_write on the loop; then completion
        assert events == [("end_write", stacked, 13, 3, True, 13), ("complete", stacked, 13, 3)]
        file.put()

    trio.run(main)
    assert data_file.read_bytes() == b"0123456789abc"
    assert live_aios() == 0


def test_inline_completion_does_not_call_the_completion(data_file: Path) -> None:
    file = BackingFile.open(data_file, os.O_RDONLY)
    os.pread(file.fd, 10, 0)  # make sure it is cached
    called = []
    req = Request(Stacked(), 1, complete=lambda r, n: called.append(n))
    buf = bytearray(5)
    workers = ManualWorkers()
    assert rw.read_iter(file, buf, req, BackingFileCtx(), workers=workers) == 5
    assert (bytes(buf), req.pos, called, workers.queue) == (b"12345", 6, [], [])
    assert file.refs == 1 and live_aios() == 0
    file.put()


@pytest.mark.parametrize("direction", ["read", "write"])
def test_failed_submit_is_cleaned_up_by_submitter(data_file: Path, direction: str) -> None:
    file = BackingFile.open(data_file, os.O_RDWR)
    file.nowait_ok = False
    fd, stacked, events = file.fd, Stacked(), []
    ctx = BackingFileCtx(accessed=lambda h: events.append(("accessed", h)),
                         end_write=lambda h, pos, res: events.append(("end_write", h, res)))
    req = Request(stacked, 0, complete=lambda r, n: events.append(("complete",)))
    with pytest.raises(OSError) as exc:
        if direction == "read":
            rw.read_iter(file, bytearray(4), req, ctx, workers=DeadWorkers())
        else:
            rw.write_iter(file, b"zz", req, ctx, workers=DeadWorkers())
    assert exc.value.errno == errno.EIO
    expected = ("accessed", stacked) if direction == "read" else ("end_write", stacked, -errno.EIO)
    assert events == [expected]  # never the caller's completion
    assert file.refs == 1 and live_aios() == 0
    file.put()
    assert fd_target(fd) != str(data_file)


def test_sync_paths_call_back_also_on_failure(data_file: Path) -> None:
    file = BackingFile.open(data_file, os.O_RDONLY)  # writing to it fails with EBADF
    stacked, events = Stacked(), []
    ctx = BackingFileCtx(accessed=lambda h: events.append(("accessed", h)),
                         end_write=lambda h, pos, res: events.append(("end_write", h, pos, res)))
    req = Request(stacked, 3)
    with pytest.raises(OSError) as exc:
        rw.write_iter(file, b"x", req, ctx)
    assert exc.value.errno == errno.EBADF
    buf = bytearray(4)
    assert rw.read_iter(file, buf, req, ctx) == 4 and req.pos == 7
    assert events == [("end_write", stacked, 3, -errno.EBADF), ("accessed", stacked)]
    # empty requests return 0 without any callback
    assert rw.read_iter(file, bytearray(0), req, ctx) == 0
    assert rw.write_iter(file, b"", req, ctx) == 0
    assert len(events) == 2
    file.put()


def test_stacked_handle_is_never_replaced() -> None:
    with pytest.raises(OSError) as exc:
        rw.read_iter(Stacked(), bytearray(1), Request(Stacked(), 0), BackingFileCtx())  # type: ignore[arg-type]
    assert exc.value.errno == errno.EIO


def test_exception_in_callback_does_not_escape(data_file: Path) -> None:
    async def main() -> None:
        file = BackingFile.open(data_file, os.O_RDWR)

        def bad_end_write(h: object, pos: int, res: int) -> None:
            raise ValueError("boom")

        ctx = BackingFileCtx(end_write=bad_end_write)
        n = await rw.write(file, b"Q", Request(Stacked(), 0), ctx)
        assert n == 1
        file.put()

    trio.run(main)
    assert data_file.read_bytes().startswith(b"Q")
    assert live_aios() == 0
