"""The native front-end: a ``fsapi.Filesystem`` served over ``/dev/fuse`` directly, under
trio, with no libfuse and no pyfuse3 (DESIGN §7).

Why it exists: it can negotiate what pyfuse3 on libfuse 3.14 cannot, above all kernel
passthrough (``passthrough.py``: the kernel serves read/write from the backing file, the
daemon never sees them), serves requests pyfuse3 has no handler for (FALLOCATE, LSEEK,
TMPFILE: O_TMPFILE, IOCTL: lsattr/chattr, STATX: birth times, COPY_FILE_RANGE: the
backing filesystem copies), and answers a request with one read and one write of the
device and no C/Python hop in between.

Shape (``NativeSession``, the same four calls as ``bridge.Pyfuse3Session``):
- ``mount``: ``fusemount.mount_device`` (mount(2) as root, fusermount3 otherwise).
- ``serve``: worker tasks share the device. One at a time reads (a trio.Lock around a
  non-blocking read and ``wait_readable``) and runs each handler by hand (``coro.send``):
  one that completes without suspending, most of them, costs no lock hand-over and no task
  switch, and the reader goes on reading. At a handler's first suspension the reader hands
  the lock on and finishes that request itself (``_resume``), so a request costs no task
  spawn either. A new worker starts when none is left waiting, up to ``max_tasks``: that
  bounds the requests in flight, as in pyfuse3. The loop ends on ENODEV (unmounted),
  DESTROY, or ``terminate()``; requests already read finish.
- FUSE over io_uring (``-o uring=``, ``fuse_uring.py``), when INIT negotiates it: requests
  then come from per-CPU kernel queues to threads pinned on the callers' CPUs, which run
  the same handlers under the loop lease (``lease.py``); this reader is left with FORGETs.
- Replies are one ``writev`` (header, payload). A reply the kernel no longer wants (ENOENT:
  the request was interrupted) is undone where it matters: an entry's lookup reference is
  forgotten, an open handle released, as libfuse does.
- Errors: ``native_ops`` handlers raise OSError -> ``-errno``; any other exception is logged
  with its traceback and answered EIO. The loop itself never dies of a request.

Negotiated: HANDLE_KILLPRIV_V2. Without it the kernel asks GETXATTR security.capability
before every write(2), passthrough ones included; with it the daemon strips set-id bits when
the kernel says so (``native_ops``: the WRITE, OPEN and SETATTR kill flags, and the empty
SETATTR a passthrough write's file_remove_privs sends).

Not negotiated: POSIX/flock locks (the kernel keeps them local, as with pyfuse3), splice,
HANDLE_KILLPRIV (v1), EXPORT_SUPPORT, DAX, security contexts.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
import types
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import asdict
from typing import Any

import trio

from . import fuse_abi as abi
from . import fuse_uring, fusemount, lease, native_ops, uring
from .fsapi import Filesystem
from .passthrough import BackingIds
from .pressure import PRESSURE

log = logging.getLogger(__name__)

PASSTHROUGH_MODES = ("auto", "on", "off")
#: ``-o uring=``: FUSE over io_uring (fuse_uring.py). auto: when the kernel offers it.
URING_MODES = ("auto", "on", "off")
#: Idle workers kept beyond the one reading: a burst then starts no new tasks.
_SPARE_READERS = 4
#: Requests served inline in a row before the reader lets other tasks run.
_INLINE_BURST = 16
#: How long an idle reader polls the device before sleeping in epoll (``_spin``), in a
#: burst of requests. 200 µs: on a 2-vCPU VM whose idle vCPUs halt, the time from a reply
#: to the caller's next request was under 50 µs for 72% of a tar extract's requests, under
#: 200 µs for 99.3%; a poll that runs out costs a halt, the caller's IPI to wake us, and a
#: next handler 2-4x slower (caches gone cold: ``tools/reqcost.py --between sleep``). Polling
#: 200 instead of 50 µs took the Django tree from 16.3-16.9 s to 12.1-13.7 s (overlay, a
#: fixed 200 µs), and with the burst rule below the extract from 8.5 s to 7.6-8.2 s.
SPIN_SECONDS = float(os.environ.get("BACKINGFS_SPIN_US", "200")) / 1e6
#: The poll outside a burst: a caller that sends a request or two now and then (a stat,
#: a lookup and a getattr) costs the daemon at most this much polling per request.
SPIN_SHORT_SECONDS = min(SPIN_SECONDS, 50e-6)
#: A burst: the last BURST_REQUESTS requests arrived within BURST_SECONDS (a tar extract
#: sends 8 in about 1 ms).
BURST_REQUESTS = 8
BURST_SECONDS = 2e-3
#: With FUSE over io_uring, how long the reader lets FORGETs pile up on /dev/fuse after
#: reading some (an idle device is waited for as usual).
FORGET_PAUSE = 0.02
#: How soon to retry handing the ring entries it refused for the moment (EAGAIN, ENOMEM).
RING_RETRY = 1e-3


def _opcodes(*ops: abi.Op) -> frozenset[bytes]:
    """The opcode fields (header bytes 4:8) of ``ops``, to test a request without decoding."""
    return frozenset(int(op).to_bytes(4, "little") for op in ops)


#: Requests the inline loop holds back (``_hold``): nobody waits for them. FORGETs have no
#: reply; the kernel sends RELEASE and RELEASEDIR after close(2) has returned.
_HELD_OPS = _opcodes(abi.Op.FORGET, abi.Op.BATCH_FORGET, abi.Op.RELEASE, abi.Op.RELEASEDIR)
#: Requests that must find every request held before them applied. An open registers the
#: inode's backing file for kernel passthrough, and a release still pending would leave the
#: registration of the file it closed (overlay: the lower file, when this open copies up).
#: (The session's end applies what is held before the filesystem's destroy() runs.)
_BARRIERS = _opcodes(abi.Op.OPEN, abi.Op.CREATE, abi.Op.TMPFILE)
#: Most requests held back before they are applied anyway.
HOLD_MAX = 64


class NativeSession:
    """Serves ``fs`` on one FUSE connection. See the module docstring."""

    def __init__(self, fs: Filesystem, *, passthrough: str = "auto",
                 uring: str = "auto") -> None:
        if passthrough not in PASSTHROUGH_MODES:
            raise ValueError(f"passthrough={passthrough!r}: expected auto, on or off")
        if uring not in URING_MODES:
            raise ValueError(f"uring={uring!r}: expected auto, on or off")
        self.fs = fs
        self.passthrough_mode = passthrough
        self.uring_mode = uring
        #: The io_uring queues once INIT negotiated them (``start_uring``), else None.
        self.uring: fuse_uring.FuseUring | None = None
        self.lease = lease.LoopLease()
        self._outer: trio.Nursery | None = None
        self._forgets_read = False  # a request was read from /dev/fuse since the last pause
        #: Requests read but not applied yet (``_hold``), in the order read.
        self._held: list[bytes] = []
        self._backlog = False  # the last request read was there without waiting
        self.fd = -1
        self.mountpoint = ""
        #: Called on the loop, inside INIT before its reply, after fs.init(). Must not block.
        self.init_hooks: list[Callable[[], None]] = []
        self.counts: Counter[int] = Counter()
        #: Requests whose handler suspended (finished by a task of its own), by opcode.
        self.suspended: Counter[int] = Counter()
        self.proto_minor = 0
        self.flags = 0  # negotiated
        #: OPENDIR answered ENOSYS, directories listed by node id (fsapi handleless_dirs)
        self.handleless_dirs = False
        self.backing = BackingIds(-1, False)
        self.bufsize = native_ops.MAX_WRITE + 64 * 1024
        self._buf = bytearray(self.bufsize)
        self._view = memoryview(self._buf)
        self._stop = False
        self._mounted = False
        #: Why the session ended in failure (INIT refused), else None.
        self.failed: str | None = None
        self._read_lock = trio.Lock()
        self._wait_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._workers = 0
        self._idle = 0
        #: Every request logged (-d): asked once, not per request.
        self._debug = log.isEnabledFor(logging.DEBUG)
        #: When the last BURST_REQUESTS requests arrived (``_spin``).
        self._arrivals: deque[float] = deque(maxlen=BURST_REQUESTS)
        #: Tasks waiting to run (``_runnable_check``; set in ``serve``, inside the run).
        self._runnable: Callable[[], int] = lambda: trio.lowlevel.current_statistics(
        ).tasks_runnable
        self._min_tasks = 1
        self._max_tasks = 64
        self._handlers = native_ops.HANDLERS
        #: ``fs.read_start`` when the filesystem has one (native_ops READ), else None.
        self.read_start = (fs.read_start if type(fs).read_start is not Filesystem.read_start
                           else None)
        fs.notifier = NativeNotifier(self)

    # --- lifecycle (the runner's four calls) ----------------------------------------------

    def mount(self, mountpoint: str, options: set[str]) -> None:
        """Mount; raises OSError with a readable message on failure."""
        try:
            spec = fusemount.mount_spec(options)
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from None
        self.fd = fusemount.mount_device(mountpoint, spec)
        self.mountpoint = mountpoint
        self._mounted = True
        self.backing = BackingIds(self.fd, False)
        PRESSURE.watch(self.fd)

    async def serve(self, min_tasks: int, max_tasks: int) -> None:
        """Serve requests until unmounted, DESTROY, or ``terminate()``."""
        self._min_tasks, self._max_tasks = max(1, min_tasks), max(1, max_tasks)
        os.set_blocking(self.fd, False)
        self._runnable = _runnable_check()
        self._debug = log.isEnabledFor(logging.DEBUG)
        async with trio.open_nursery() as outer:
            self._outer = outer  # the loop lease lives here, past the readers
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self._min_tasks):
                    self._spawn()
            self._nursery = None
            if self.uring is not None:
                # New ring requests are left to the unmount, like unread ones; handlers
                # that suspended finish before the filesystem's destroy.
                self.uring.stop()
                await self.lease.drain()
            outer.cancel_scope.cancel()
        self._outer = None

    def uring_unavailable(self) -> str | None:
        """Why FUSE over io_uring cannot be used here (INIT asks), else None."""
        return lease.probe() or uring.Uring.probe()

    def prepare_uring(self) -> None:
        """Before an INIT reply that asks for io_uring: set up the rings (OSError)."""
        ring = fuse_uring.FuseUring(self, self.lease)
        ring.prepare(self.fd, native_ops.MAX_WRITE)
        self.uring = ring

    async def start_uring(self) -> None:
        """After that INIT reply: take the loop lease, start the queue threads."""
        assert self._outer is not None and self.uring is not None
        await self._outer.start(self.lease.serve)
        self.uring.start()

    def terminate(self) -> None:
        """Stop reading requests (requests in flight finish); ``serve`` then returns."""
        self._stop = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def unmount(self) -> None:
        PRESSURE.unwatch()
        try:
            if self._mounted:
                self._mounted = False
                try:
                    fusemount.unmount(self.mountpoint)
                finally:
                    os.close(self.fd)
                    self.fd = -1
        finally:
            if self.uring is not None:
                self.uring.close()

    def statistics(self) -> dict[str, object]:
        """Requests served by opcode, and the passthrough table (for SIGUSR1 and tests)."""
        ring = uring.ACTIVE
        return {"uring": None if self.uring is None else self.uring.statistics(),
                "requests": {_opname(op): n for op, n in sorted(self.counts.items())},
                "io_uring": None if ring is None else {
                    "submitted": ring.submitted, "enters": ring.enters,
                    "completed": ring.completed,
                    "pending": ring.pending, "overflows": ring.overflows},
                "suspended": {_opname(op): n for op, n in sorted(self.suspended.items())},
                "passthrough": {"enabled": self.backing.enabled,
                                "ids_opened": self.backing.opened_ids,
                                "ids_closed": self.backing.closed_ids,
                                **asdict(self.backing.statistics())}}

    # --- the request loop ----------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        lock = self._read_lock
        try:
            while True:
                self._idle += 1
                try:
                    await lock.acquire()
                finally:
                    self._idle -= 1
                try:
                    coro, trap = await self._serve_inline()
                finally:
                    # A handler that suspended may wait for what it just queued.
                    self._release_held()
                    lock.release()
                if coro is None:
                    return
                # A request suspended: the lock is free for another reader, and this task
                # finishes the request.
                if not self._idle and self._workers < self._max_tasks:
                    self._spawn()
                await _resume(coro, trap)
                if self._idle > _SPARE_READERS and self._workers > self._min_tasks:
                    return  # enough readers are waiting: shrink back
        finally:
            self._workers -= 1

    async def _serve_inline(self) -> tuple[Coroutine[Any, Any, None] | None, Any]:
        """With the read lock held: read requests and run each handler by hand. Most
        complete without suspending, and the next request is read at once: no lock
        hand-over, no task switch per request. Returns the first handler that suspended
        (its coroutine and what it yielded to trio), or (None, None) when the session
        ends."""
        burst = 0
        ring = uring.ACTIVE
        while True:
            data = await self._read()
            if data is None:
                return None, None
            op = data[4:8]
            if op in _HELD_OPS and self._hold(data):
                continue
            if op in _BARRIERS and self._held:
                self._release_held()
            coro = self._dispatch(data)
            if ring is not None and self._backlog:
                # Requests are queued up (this one was read without waiting): the ring's
                # submissions wait for the read that finds /dev/fuse empty (``_read``) or
                # for this loop to let go, so that a burst of cold READs enters the kernel
                # once. A lone request's I/O starts at once: the latency of queue depth 1.
                # Only here, where nothing else runs on the loop.
                ring.deferring = True
            try:
                trap = coro.send(None)
            except StopIteration:
                burst += 1
                if burst >= _INLINE_BURST:
                    # Let the requests that suspended, and thread completions, move on.
                    burst = 0
                    self._release_held()
                    await trio.lowlevel.checkpoint()
                continue
            self.suspended[int.from_bytes(data[4:8], "little")] += 1
            return coro, trap

    def _hold(self, data: bytes) -> bool:
        """Keep a FORGET or RELEASE(DIR) for ``_release_held``; False: apply it now (too
        many held).

        The kernel queues the FORGET of an unlinked file as the caller's unlink(2)
        returns, and the RELEASE of a file as its close(2) returns, and hands FORGETs out
        ahead of requests: applied at once, each would sit in front of the caller's next
        request (rm's GETATTR of the parent, tar's LOOKUP of its next file), and neither is
        cheap (closing fds, BACKING_CLOSE). Held, they are applied when the device is found
        empty, while the caller is being woken. Lookup counts add up the same in either
        order (a LOOKUP answered meanwhile finds the inode still there and counts one
        more); a handle outlives its close by that long, as if the RELEASE had come later
        (``_BARRIERS`` are the requests that cannot wait for it); and nothing is held for
        longer than one burst of requests."""
        if len(self._held) >= HOLD_MAX:
            self._release_held()
            return False
        self._held.append(data)
        return True

    def _release_held(self) -> bool:
        """Apply what the inline loop held back, in the order read, then ``_flush_ring``."""
        held = self._held
        if held:
            self._held = []
            ring = uring.ACTIVE
            if ring is not None:
                ring.deferring = True  # their fd closes: one enter, in the flush below
            for data in held:
                coro = self._dispatch(data)
                try:
                    trap = coro.send(None)
                except StopIteration:
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(_finish, coro, trap)  # one that waits
        return self._flush_ring()

    def _flush_ring(self) -> bool:
        """Submit what the inline loop left in the ring; False if the kernel did not take
        all of it (retry soon)."""
        ring = uring.ACTIVE
        return ring is None or ring.flush()

    async def _read(self) -> bytes | None:
        """The next request, as its own bytes (the shared buffer is reused at once).

        ``readv`` into one preallocated buffer and a copy of what arrived: ``os.read`` of a
        buffer this size would allocate (and the allocator map and unmap) a megabyte per
        request, measured at 50 µs each."""
        fd = self.fd
        buf = self._buf
        self._backlog = True
        while not self._stop:
            try:
                n = os.readv(fd, (buf,))
                self._arrivals.append(time.perf_counter())
                self._forgets_read = True
                return bytes(self._view[:n])
            except BlockingIOError:
                self._backlog = False
                if not self._release_held():
                    await trio.sleep(RING_RETRY)  # the kernel refused for now: no sleep
                    continue                     # on /dev/fuse with reads not started
                if self._forgets_read and self.uring is not None and self.uring.serving():
                    # /dev/fuse carries only FORGETs now, and they can wait: batched, they
                    # cost this thread one wake-up (and the queue threads one lease
                    # hand-over) per FORGET_PAUSE instead of one per forgotten inode.
                    self._forgets_read = False
                    await trio.sleep(FORGET_PAUSE)
                    continue
                ring = uring.ACTIVE
                if ring is not None and not ring.pending:
                    ring = None  # nothing in flight: nothing to poll for
                if ring is not None and ring.ready() and ring.reap():
                    # Finished what the ring completed (reads answer from their completion)
                    # before sleeping or polling: their callers are the next requests.
                    continue
                if SPIN_SECONDS and not self._runnable() and (
                        self.uring is None or not self.uring.serving()):
                    # (With io_uring, /dev/fuse carries only forgets: no poll for them,
                    # and a poll would hold the loop lease from the queue threads.)
                    n = self._spin(fd, buf, ring)
                    if n:
                        return bytes(self._view[:n])
                with trio.CancelScope() as scope:
                    self._wait_scope = scope
                    await trio.lowlevel.wait_readable(fd)
                self._wait_scope = None
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if e.errno != errno.ENODEV:
                    log.error("reading /dev/fuse failed: %s; ending the session", e)
                self._stop = True
                self._mounted = e.errno != errno.ENODEV  # ENODEV: the kernel unmounted
        return None

    def _spin(self, fd: int, buf: bytearray, ring: uring.Uring | None) -> int:
        """Poll the device for up to SPIN_SECONDS; the request's size, or 0.

        A caller waiting for our reply usually sends its next request within tens of
        microseconds; sleeping in epoll meanwhile costs a wake-up of both sides (20-40 µs on
        a VM), more than the poll. Only when nothing else waits for the loop: the poll
        blocks it. The ring is polled too, and its completions run here (their replies
        bring the next requests), so a poll never holds back an answer. Errors other than
        "nothing yet" are left to the normal read.

        The full SPIN_SECONDS only in a burst of requests (BURST_REQUESTS in
        BURST_SECONDS), else SPIN_SHORT_SECONDS."""
        now = time.perf_counter()
        arrivals = self._arrivals
        spin = (SPIN_SECONDS if len(arrivals) == BURST_REQUESTS
                and now - arrivals[0] < BURST_SECONDS else SPIN_SHORT_SECONDS)
        deadline = now + spin
        while time.perf_counter() < deadline:
            try:
                n = os.readv(fd, (buf,))
                arrivals.append(time.perf_counter())
                return n
            except (BlockingIOError, InterruptedError):
                if ring is not None and ring.ready() and ring.reap():
                    if self._runnable():
                        return 0  # a completion woke a task: let it run
                    deadline = time.perf_counter() + spin
            except OSError:
                return 0
        return 0

    async def _dispatch(self, data: bytes, s: Any = None) -> None:
        """Run the request's handler; ``s`` is what it replies through (the session, or
        an io_uring entry's stand-in for it)."""
        if s is None:
            s = self
        _, opcode, unique, nodeid, uid, gid, pid, _, _ = abi.IN_HEADER.unpack_from(data)
        self.counts[opcode] += 1
        handler = self._handlers.get(opcode)
        debug = self._debug
        if debug:
            log.debug("-> %s unique=%d nodeid=%d uid=%d pid=%d len=%d", _opname(opcode),
                      unique, nodeid, uid, pid, len(data))
        if handler is None:
            if opcode not in (abi.Op.INTERRUPT,):  # no reply exists for INTERRUPT
                s.reply_error(unique, errno.ENOSYS)
            return
        try:
            await handler(s, unique, nodeid, (uid, gid, pid), data)
        except OSError as e:
            err = e.errno or errno.EIO
            if debug:
                log.debug("<- %s unique=%d: %s (%s)", _opname(opcode), unique,
                          errno.errorcode.get(err, err), e)
            s.reply_error(unique, err)
        except Exception:
            log.exception("%s(nodeid=%d) failed with an unexpected exception; answering EIO",
                          _opname(opcode), nodeid)
            s.reply_error(unique, errno.EIO)

    # --- replies ---------------------------------------------------------------------------

    def reply(self, unique: int, *payload: bytes | bytearray | memoryview) -> bool:
        """Send a reply; False when the kernel no longer waits for it (interrupted)."""
        size = abi.OUT_HEADER.size + sum(map(len, payload))
        try:
            os.writev(self.fd, (abi.OUT_HEADER.pack(size, 0, unique), *payload))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            if e.errno != errno.ENODEV:  # ENODEV: the mount is gone, nobody waits
                log.warning("reply to request %d failed: %s", unique, e)
            return False
        return True

    def reply_error(self, unique: int, err: int) -> None:
        try:
            os.write(self.fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("error reply to request %d failed: %s", unique, e)

    def fail(self, why: str) -> None:
        """A fatal error at INIT: log it, stop serving (the runner unmounts, exits 1)."""
        log.error("%s; unmounting", why)
        self.failed = why
        self.terminate()

    def end(self) -> None:
        """DESTROY: no more requests will come."""
        self._stop = True
        self._mounted = False
        if self._wait_scope is not None:  # DESTROY came through io_uring: wake the reader
            self._wait_scope.cancel()


def _runnable_check() -> Callable[[], int]:
    """How many trio tasks wait to run, as a call cheap enough for the polling loop, which
    asks before every poll: ``current_statistics()`` builds two objects each time (2 µs,
    a tenth of a whole statfs round trip). The run queue's length is what it reports; if
    trio's internals ever move, the public call is used."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
        runq = GLOBAL_RUN_CONTEXT.runner.runq
        len(runq)
    except (ImportError, AttributeError, TypeError):
        return lambda: trio.lowlevel.current_statistics().tasks_runnable
    return runq.__len__


async def _finish(coro: Coroutine[Any, Any, None], trap: Any) -> None:
    await _resume(coro, trap)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], trap: Any) -> Generator[Any, Any, None]:
    """Finish, in the calling task, a coroutine that was run by hand until it yielded
    ``trap``: pass each trap up to trio and what trio answers (a value or an exception)
    back down, as if the coroutine had been awaited from the start."""
    while True:
        try:
            answer = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                trap = coro.send(answer)
            except StopIteration:
                return


def _opname(opcode: int) -> str:
    try:
        return abi.Op(opcode).name
    except ValueError:
        return f"OP{opcode}"


class NativeNotifier:
    """``notify.Notifier`` over the native session: invalidation messages written to the
    device (unique 0, error = the notify code). Advisory: failures are logged.

    The kernel makes an entry invalidation wait for requests on the same directory, and a
    data invalidation for writeback of dirty pages (our own WRITE requests): both are
    written from a worker thread, so the loop that serves those requests never waits on
    them. Attribute-only inode invalidation waits for nothing and is written inline.
    """

    def __init__(self, session: NativeSession) -> None:
        self.session = session
        self.can_prune = True  # until the kernel refuses FUSE_NOTIFY_PRUNE

    def invalidate_entry(self, parent_ino: int, name: bytes,
                         deleted_ino: int | None = None) -> None:
        if deleted_ino:
            msg = abi.NOTIFY_DELETE, abi.NOTIFY_DELETE_OUT.pack(parent_ino, deleted_ino,
                                                                len(name), 0)
        else:
            msg = abi.NOTIFY_INVAL_ENTRY, abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent_ino,
                                                                          len(name), 0)
        code, head = msg
        nursery = self.session._nursery
        if nursery is None:
            return
        nursery.start_soon(trio.to_thread.run_sync, self._send, code, head + name + b"\0")

    def prune(self, inos: Sequence[int]) -> None:
        if not inos or not self.can_prune:
            return
        body = abi.NOTIFY_PRUNE_OUT.pack(len(inos), 0, 0) + struct.pack(f"={len(inos)}Q", *inos)
        if not trio.lowlevel.in_trio_run():
            # A worker thread (the loop is free to serve what evictions wait for).
            self._send_prune(body)
            return
        nursery = self.session._nursery
        if nursery is not None:
            # Evicting an inode writes its dirty pages back: our own WRITE requests.
            nursery.start_soon(trio.to_thread.run_sync, self._send_prune, body)

    def _send_prune(self, body: bytes) -> None:
        fd = self.session.fd
        if fd < 0:
            return
        try:
            os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body),
                                             abi.NOTIFY_PRUNE, 0) + body)
        except OSError as e:
            if e.errno == errno.EINVAL and self.can_prune:
                # Before Linux 6.18 (FUSE 7.45) the kernel has no prune notification.
                self.can_prune = False
                log.info("the kernel cannot prune inodes (no FUSE_NOTIFY_PRUNE): past the "
                         "fd limit, lookups fail with EMFILE until it forgets inodes")
            elif e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("prune notification failed: %s", e)

    async def invalidate_inode(self, ino: int, attr_only: bool = False) -> None:
        # off -1: attributes only; off 0, len 0: attributes and every cached page
        body = abi.NOTIFY_INVAL_INODE_OUT.pack(ino, -1 if attr_only else 0, 0)
        if attr_only:
            self._send(abi.NOTIFY_INVAL_INODE, body)
        else:
            await trio.to_thread.run_sync(self._send, abi.NOTIFY_INVAL_INODE, body)

    def _send(self, code: int, body: bytes) -> None:
        fd = self.session.fd
        if fd < 0:
            return
        try:
            os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), code, 0) + body)
        except OSError as e:
            # ENOENT: the kernel does not hold that inode/entry: nothing to invalidate.
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV):
                log.warning("invalidation (notify code %d) failed: %s", code, e)
