"""LoopLease (backingfs/lease.py): trio code run by another thread while the loop sleeps.

No mount: a trio run with the lease installed, and a plain thread that takes the lease and
runs handlers the way a FUSE io_uring queue thread does."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import trio

from backingfs import lease as lease_mod
from backingfs.lease import LoopLease
from backingfs.locks import QuickLock

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(lease_mod.probe() is not None, reason=str(lease_mod.probe()))]


def _in_thread(lease: LoopLease, *coros: Coroutine[Any, Any, None]) -> list[bool]:
    """Run each coroutine as a queue thread would (lease taken around it); what ``run``
    answered for each."""
    answers: list[bool] = []

    def body() -> None:
        for coro in coros:
            assert lease.acquire()
            try:
                answers.append(lease.run(coro))
            finally:
                lease.release()

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return answers


def _with_lease(test: Callable[[LoopLease, trio.Nursery], Awaitable[None]]) -> LoopLease:
    lease = LoopLease()

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(lease.serve)
                await test(lease, nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)
    return lease


def test_a_handler_that_does_not_suspend_completes_on_the_calling_thread() -> None:
    seen: list[object] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        lock = QuickLock()

        async def handler() -> None:
            async with lock:  # a free QuickLock: taken without a checkpoint
                with trio.CancelScope(shield=True):
                    seen.append(threading.get_ident())
                    seen.append(trio.lowlevel.current_task())

        answers = await trio.to_thread.run_sync(_in_thread, lease, handler())
        assert answers == [True]
        assert not lock.locked()

    lease = _with_lease(check)
    assert seen[0] != threading.get_ident()  # it ran on the other thread
    assert isinstance(seen[1], trio.lowlevel.Task)
    assert (lease.inline, lease.carried) == (1, 0)


def test_a_handler_that_suspends_finishes_on_the_loop() -> None:
    seen: list[object] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        done = trio.Event()

        async def handler() -> None:
            seen.append(threading.get_ident())
            got = await trio.to_thread.run_sync(lambda: 42)  # a real wait
            await trio.sleep(0.01)
            seen.extend((threading.get_ident(), got))
            done.set()

        answers = await trio.to_thread.run_sync(_in_thread, lease, handler())
        assert answers == [False]
        await done.wait()
        await lease.drain()

    loop = threading.get_ident()
    lease = _with_lease(check)
    assert seen[0] != loop and seen[1:] == [loop, 42]
    assert lease.carried == 1


def test_a_handler_waiting_for_a_held_quicklock_gets_it_on_release() -> None:
    order: list[str] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        lock = QuickLock()
        await lock.acquire()
        done = trio.Event()

        async def handler() -> None:
            async with lock:
                order.append("handler")
            done.set()

        answers = await trio.to_thread.run_sync(_in_thread, lease, handler())
        assert answers == [False]
        order.append("holder")
        lock.release()
        await done.wait()

    _with_lease(check)
    assert order == ["holder", "handler"]


def test_work_a_handler_leaves_to_the_loop_runs_at_once() -> None:
    """A task spawned by an inline handler runs although the loop sleeps with a long
    timeout: the lease wakes it."""
    delay: list[float] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        ran = trio.Event()

        async def spawned() -> None:
            ran.set()

        async def handler() -> None:
            nursery.start_soon(spawned)

        t0 = time.monotonic()
        answers = await trio.to_thread.run_sync(_in_thread, lease, handler())
        await ran.wait()
        delay.append(time.monotonic() - t0)
        assert answers == [True]

    lease = _with_lease(check)
    assert delay[0] < 2
    assert lease.wakes >= 1


def test_the_loop_does_not_run_while_a_thread_holds_the_lease() -> None:
    held: list[float] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        def hold() -> None:
            assert lease.acquire()
            held.append(time.monotonic())
            time.sleep(0.3)
            held.append(time.monotonic())
            lease.release()

        t = threading.Thread(target=hold)
        t.start()
        while not held:
            await trio.sleep(0.001)
        await trio.sleep(0.01)  # due long before the thread lets go
        woke = time.monotonic()
        await trio.to_thread.run_sync(t.join)
        assert woke >= held[1]

    _with_lease(check)


def test_with_every_carrier_busy_a_handler_becomes_a_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_mod, "CARRIERS", 1)
    finished: list[int] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        go = trio.Event()

        async def handler(n: int) -> None:
            await go.wait()
            finished.append(n)

        answers = await trio.to_thread.run_sync(_in_thread, lease, handler(1), handler(2))
        assert answers == [False, False]
        go.set()
        await lease.drain()
        # the pool grew: a third suspending handler finds a carrier
        assert await trio.to_thread.run_sync(_in_thread, lease, handler(3)) == [False]
        await lease.drain()

    _with_lease(check)
    assert sorted(finished) == [1, 2, 3]


def test_after_the_lease_is_gone_a_thread_gets_nothing() -> None:
    lease = _with_lease(lambda lease, nursery: trio.sleep(0))
    assert not lease.active
    assert lease.acquire() is False


def test_a_carried_handler_is_cancelled_with_the_lease() -> None:
    """Shutdown while a handler waits: the cancellation reaches the handler (its finally
    runs) and ends the run cleanly."""
    cleaned: list[bool] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        async def handler() -> None:
            try:
                await trio.sleep_forever()
            finally:
                cleaned.append(True)

        assert await trio.to_thread.run_sync(_in_thread, lease, handler()) == [False]

    _with_lease(check)
    assert cleaned == [True]


def test_a_deadline_passed_before_the_handler_ran_is_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler entering a scope whose deadline has passed (the thread was held up, by
    the GIL say, between computing the deadline and entering): the cancellation is the
    handler's, met at its next wait; the carrier's own idle wait never sees it, and the
    carrier serves the next handler. (Found by the fd-limit soak: trio's assertion that
    a task is rescheduled once.)"""
    monkeypatch.setattr(lease_mod, "CARRIERS", 1)  # one carrier: every handler reuses it
    seen: list[str] = []

    async def check(lease: LoopLease, nursery: trio.Nursery) -> None:
        done = trio.Event()

        async def no_wait() -> None:
            with trio.move_on_at(trio.current_time() - 1):
                seen.append("inline")

        async def waits() -> None:
            with trio.move_on_at(trio.current_time() - 1):
                await trio.sleep_forever()
            seen.append("after")
            done.set()

        answers = await trio.to_thread.run_sync(_in_thread, lease, no_wait(), waits())
        assert answers == [True, False]
        await done.wait()
        await lease.drain()
        assert await trio.to_thread.run_sync(_in_thread, lease, no_wait()) == [True]

    _with_lease(check)
    assert seen == ["inline", "after", "inline"]
