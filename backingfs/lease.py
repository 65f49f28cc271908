"""LoopLease: let another thread run trio code while the trio loop thread sleeps in I/O.

Why: FUSE over io_uring (``fuse_uring.py``) hands a request to a thread of ours pinned to
the CPU its caller runs on. Served there, a request costs no cross-CPU wake-up either way
(on a VM whose idle vCPUs halt, two IPIs and two vCPU exits per request, most of a small
request's time). But the filesystems are trio code: their handlers take QuickLocks, open
cancel scopes, spawn tasks, await worker threads.

How: the *lease* is a lock the trio thread holds at all times except while it sleeps in
the I/O manager's ``get_events`` (the only place trio blocks). A queue thread that holds the
lease is, as far as trio can tell, the loop thread between two steps: it sets ``runner``
and ``task`` in its own copy of trio's thread-local run context and runs the handler by
hand (``coro.send``), as the native session's reader does. The task it runs as is a
*carrier*: a trio task parked in ``wait_task_rescheduled``, spare for exactly this.

- The handler completes without suspending (most do): the carrier never noticed, and goes
  back to the pool. Whatever the handler did to the loop (a task spawned, a lock handed
  to a waiting task) is in the run queue; the loop is woken to run it.
- The handler suspends: it yielded a trap (``WaitTaskRescheduled`` or
  ``CancelShieldedCheckpoint``) with the carrier as its task, exactly as if the carrier had
  yielded it. The lease does what trio's run loop does with a trap (records the abort
  function, or reschedules the task), and tells the carrier which coroutine it now
  carries: when trio reschedules the carrier, it passes what it was sent on to the handler,
  and the handler finishes on the loop thread like any suspended request.

Nothing here is public trio API: ``GLOBAL_RUN_CONTEXT``, the I/O manager's class and two
Task fields are trio internals (checked against trio 0.22-0.35). ``probe()`` says whether
they are what this module expects; the session uses /dev/fuse alone when they are not.

Threading: a queue thread calls ``acquire``/``release`` around ``run``; the carriers, the
pool and the run context are only touched with the lease held.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import outcome
import trio

log = logging.getLogger(__name__)

try:
    from trio._core import _run as _trio_run
    from trio._core._traps import CancelShieldedCheckpoint, WaitTaskRescheduled
except ImportError:  # pragma: no cover - a trio without these internals
    _trio_run = None  # type: ignore[assignment]

#: Carriers kept parked: more than the requests that suspend at once in practice (the
#: queue threads have 8 ring entries per CPU); the pool grows when it runs dry.
CARRIERS = 16


def probe() -> str | None:
    """None when this trio's internals are the ones the lease relies on, else why not."""
    if _trio_run is None:
        return "this trio has no trio._core._run/_traps"
    ctx = getattr(_trio_run, "GLOBAL_RUN_CONTEXT", None)
    if ctx is None or not isinstance(ctx, threading.local):
        return "this trio has no thread-local GLOBAL_RUN_CONTEXT"
    task_cls = getattr(_trio_run, "Task", None)
    for name in ("_abort_func", "_next_send_fn", "_cancel_status",
                 "_attempt_delivery_of_any_pending_cancel", "context"):
        if task_cls is None or not hasattr(task_cls, name):
            return f"trio's Task has no {name}"
    return None


class _Carrier:
    __slots__ = ("task", "coro", "idle_abort")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.coro: Coroutine[Any, Any, None] | None = None
        self.idle_abort: Callable[[object], trio.lowlevel.Abort] | None = None


class LoopLease:
    """See the module docstring. ``install`` and ``uninstall`` run on the trio thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runner: Any = None
        self._io_class: type | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._idle: list[_Carrier] = []
        self._carriers = 0
        self._loose = 0  # handlers run as tasks of their own (no carrier was free)
        self.active = False
        #: Handlers run by ``run``: finished on the calling thread / finished on the loop.
        self.inline = 0
        self.carried = 0
        self.wakes = 0  # times the loop was woken for work a handler left it

    # --- the trio side ---------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Install the lease and keep the carriers; runs until cancelled (then uninstalls).
        Cancel it only after every thread that uses the lease has stopped."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._install()
            try:
                for _ in range(CARRIERS):
                    self._spawn_carrier()
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._uninstall()
                self._nursery = None

    async def drain(self) -> None:
        """Wait until no carrier carries a handler (the queue threads have stopped)."""
        while self._loose or len(self._idle) < self._carriers:
            await trio.sleep(0.005)

    def _install(self) -> None:
        runner = _trio_run.GLOBAL_RUN_CONTEXT.runner
        io = runner.io_manager
        base = type(io)
        lock = self._lock

        class Leased(base):  # type: ignore[valid-type, misc]
            # Same layout as the base (no slots of its own): the live object can switch
            # class, and trio finds get_events through it.
            __slots__ = ()

            def get_events(self, timeout: float) -> Any:
                lock.release()
                try:
                    return base.get_events(self, timeout)
                finally:
                    lock.acquire()

        lock.acquire()
        self._runner = runner
        self._token = trio.lowlevel.current_trio_token()
        self._io_class = base
        io.__class__ = Leased
        self.active = True

    def _uninstall(self) -> None:
        if not self.active:
            return
        self.active = False
        self._runner.io_manager.__class__ = self._io_class
        self._lock.release()

    def _spawn_carrier(self) -> None:
        assert self._nursery is not None
        self._carriers += 1
        self._nursery.start_soon(self._carrier_task)

    async def _carrier_task(self) -> None:
        try:
            await self._carry(_Carrier(trio.lowlevel.current_task()))
        finally:
            self._carriers -= 1

    @types.coroutine
    def _carry(self, carrier: _Carrier) -> Generator[Any, Any, None]:
        idle = self._idle

        def abort(_: object) -> trio.lowlevel.Abort:
            # Only ever an idle carrier's own wait: a borrowed one has the handler's.
            if carrier in idle:
                idle.remove(carrier)
            return trio.lowlevel.Abort.SUCCEEDED

        carrier.idle_abort = abort
        while True:
            idle.append(carrier)
            sent = yield WaitTaskRescheduled(abort)
            coro, carrier.coro = carrier.coro, None
            if coro is None:
                sent.unwrap()  # Cancelled: the nursery is closing
                continue
            while True:
                # trio sends outcomes in, never throws (its run loop unwraps nothing):
                # pass each straight to the handler, as if it had been awaited.
                try:
                    trap = coro.send(sent)
                except StopIteration:
                    break
                except trio.Cancelled:
                    raise  # shutting down: this carrier ends with its handler
                except BaseException:
                    log.exception("a request handler carried on the loop raised")
                    break
                sent = yield trap

    # --- the queue thread side -------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the lease (blocks while the loop runs); False: uninstalled, nothing taken."""
        self._lock.acquire()
        if self.active:
            return True
        self._lock.release()
        return False

    def release(self) -> None:
        self._lock.release()

    def run(self, coro: Coroutine[Any, Any, None]) -> bool:
        """With the lease held: run ``coro`` (a request handler that answers by itself and
        raises nothing) until it completes or first suspends. True: it completed here."""
        ctx = _trio_run.GLOBAL_RUN_CONTEXT
        runner = self._runner
        ctx.runner = runner
        if not self._idle:
            # Every carrier is busy: the handler becomes a task of its own (the loop runs
            # it), and the pool grows for the next time.
            self._loose += 1
            self._nursery.start_soon(self._await, coro)  # type: ignore[union-attr]
            self._spawn_carrier()
            self.carried += 1
            self._wake()
            return False
        carrier = self._idle.pop()
        task = carrier.task
        ctx.task = task
        # Running, as trio sees a task in a step: no abort function. A cancellation the
        # handler meets (a scope whose deadline passed while it ran) is then delivered at
        # its next wait, below, and never to the carrier's idle wait.
        task._abort_func = None
        try:
            trap = task.context.run(coro.send, None)
        except BaseException as exc:
            # Back to the idle wait, which a cancellation of the lease may still abort.
            task._abort_func = carrier.idle_abort
            task._attempt_delivery_of_any_pending_cancel()
            if task._next_send_fn is None:
                self._idle.append(carrier)
            if not isinstance(exc, StopIteration):
                log.exception("a request handler raised past its error handling")
            self.inline += 1
            if runner.runq:
                self._wake()
            return True
        finally:
            del ctx.task
        # Suspended: do with the trap what trio's run loop does, then let the carrier
        # carry the handler from here.
        carrier.coro = coro
        self.carried += 1
        if trap is CancelShieldedCheckpoint:
            runner.reschedule(task)
        elif type(trap) is WaitTaskRescheduled:
            task._abort_func = trap.abort_func
            task._attempt_delivery_of_any_pending_cancel()
        else:  # pragma: no cover - no other trap exists in trio
            runner.reschedule(task, outcome.Error(TypeError(f"unknown trap {trap!r}")))
        self._wake()
        return False

    async def _await(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        finally:
            self._loose -= 1

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Have the loop call ``fn`` (from any thread; nothing if the run is over)."""
        if self._token is not None:
            try:
                self._token.run_sync_soon(fn)
            except trio.RunFinishedError:
                pass

    def _wake(self) -> None:
        """Have the loop look at its run queue now: it may sleep in get_events for long."""
        if self._token is not None:
            self.wakes += 1
            try:
                self._token.run_sync_soon(_nothing)
            except trio.RunFinishedError:
                pass


def _nothing() -> None:
    pass
