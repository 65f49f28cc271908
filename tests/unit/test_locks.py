"""backingfs.locks.QuickLock: free means no checkpoint; held means FIFO hand-over."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backingfs.locks import QuickLock


def test_a_free_lock_is_taken_without_a_checkpoint() -> None:
    async def main() -> None:
        lock = QuickLock()
        ran: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _note(ran))  # runs at our first checkpoint
            async with lock:
                assert lock.locked()
                assert ran == []  # nothing else ran: acquire did not yield
            assert not lock.locked()
            await trio.testing.wait_all_tasks_blocked()
            assert ran == ["other"]

    trio.run(main)


async def _note(ran: list[str]) -> None:
    ran.append("other")


def test_waiters_get_the_lock_in_order_and_no_one_barges() -> None:
    async def main() -> None:
        lock = QuickLock()
        order: list[int] = []

        async def worker(i: int) -> None:
            async with lock:
                order.append(i)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            await lock.acquire()
            for i in range(5):  # one at a time: trio starts a batch in random order
                nursery.start_soon(worker, i)
                await trio.testing.wait_all_tasks_blocked()
            lock.release()
            # The lock went to waiter 0 at release: a newcomer queues behind them all.
            nursery.start_soon(worker, 99)
        assert order == [0, 1, 2, 3, 4, 99]

    trio.run(main)


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        lock = QuickLock()
        got: list[str] = []

        async def waiter(name: str, scope_out: list[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                scope_out.append(scope)
                async with lock:
                    got.append(name)

        async with trio.open_nursery() as nursery:
            await lock.acquire()
            scopes: list[trio.CancelScope] = []
            nursery.start_soon(waiter, "a", scopes)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "b", scopes)
            await trio.testing.wait_all_tasks_blocked()
            scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
        assert got == ["b"]
        assert not lock.locked()

    trio.run(main)


def test_misuse_is_refused() -> None:
    async def main() -> None:
        lock = QuickLock()
        with pytest.raises(RuntimeError):
            lock.release()
        await lock.acquire()
        with pytest.raises(RuntimeError):
            await lock.acquire()

        async def other() -> None:
            with pytest.raises(RuntimeError):
                lock.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
        lock.release()

    trio.run(main)
