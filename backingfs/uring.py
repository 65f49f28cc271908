"""Uring: an io_uring submission/completion ring driven from the trio loop thread.

The queued path exists for overlap, and a Python worker-thread round trip (150-200 µs on a
small VM) costs more than a 4 KiB read from a host-cached disk. With io_uring the loop
thread writes a submission entry and calls ``io_uring_enter``; the kernel does the blocking
part (async buffered reads, or its own io-wq threads), and completions are reaped on the
loop when the eventfd registered with the ring polls readable. No Python thread hop, no
GIL hand-off.

Pure Python: ``io_uring_setup``/``enter``/``register`` through ``libc.syscall``, the rings
through ``mmap`` and ``struct``. Memory ordering is only argued for x86-64 (TSO): the SQE is
written before the SQ tail store, and the ``io_uring_enter`` syscall orders both before the
kernel looks; the CQ tail is read before the CQEs it covers, and the CQ head is written
after they have been read. ``probe()`` refuses other architectures.

Threading: one thread (the one that built the ring, the trio loop's) submits and reaps;
nothing here takes a lock. Callbacks run on that thread, from ``run()``, never from inside
``submit()``.

Buffers: ``submit`` takes a raw address, so the memory must stay alive and unmoved until
the callback has run. ``submit`` also takes ``keep``, an object the ring holds until then;
``buffer_address`` returns one for any buffer (for ``bytes`` the object's own storage, no
copy; for writable buffers a ctypes view that holds a buffer export, so a bytearray cannot
be resized under the kernel). Callers keep their own reference too.

Lifetime: ``close()`` refuses while ``pending`` is non-zero (the kernel may still write
into caller memory); drain first (the filesystem's destroy waits for its I/O, and every
ring operation belongs to one).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
import threading
from collections.abc import Callable
from typing import Any

import trio

_SYS_SETUP = 425
_SYS_ENTER = 426
_SYS_REGISTER = 427

IORING_OP_FSYNC = 3
IORING_OP_CLOSE = 19
IORING_OP_READ = 22
IORING_OP_WRITE = 23
#: fsync_flags of IORING_OP_FSYNC (the rw_flags slot of the SQE).
IORING_FSYNC_DATASYNC = 1
#: SQE flag: run the operation on an io-wq worker thread, never inline in io_uring_enter.
IOSQE_ASYNC = 1 << 4

_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000
_IORING_FEAT_SINGLE_MMAP = 1 << 0
_IORING_FEAT_NODROP = 1 << 1
#: sq_ring flags: completions wait in the kernel's overflow list, not in the CQ.
_IORING_SQ_CQ_OVERFLOW = 1 << 1
_IORING_ENTER_GETEVENTS = 1 << 0
_IORING_REGISTER_EVENTFD = 4
_IORING_UNREGISTER_EVENTFD = 5
_IORING_REGISTER_PROBE = 8
_IO_URING_OP_SUPPORTED = 1 << 0

# struct io_uring_params: 10 u32 (sq_entries .. resv[3]), then io_sqring_offsets (7 u32,
# resv1 u32, resv2 u64) and io_cqring_offsets (8 u32, resv2 u64): 40 + 40 + 40 bytes.
_PARAMS = struct.Struct("<10I" "7IIQ" "8IQ")
# struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, rw_flags,
# user_data, buf_index, personality, splice_fd_in, addr3, __pad2.
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
# struct io_uring_cqe (16 bytes): user_data, res, flags.
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")
_SQE_SIZE = 64
_CQE_SIZE = 16

#: ``callback(res)``: res is the byte count, or -errno.
Callback = Callable[[int], None]
#: Most entries ``deferring`` leaves in the SQ before it enters anyway: one
#: io_uring_enter for several cold reads runs them under one block plug (one doorbell to
#: the device, a VM exit on a virtual disk, instead of one each).
DEFER_MAX = 8

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class UringBusyError(OSError):
    """The ring cannot take another request now (or is closed): use a worker thread."""

    def __init__(self, msg: str) -> None:
        super().__init__(errno.EAGAIN, msg)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _setup(entries: int, params: ctypes.Array[ctypes.c_char]) -> int:
    return _check(_syscall(ctypes.c_long(_SYS_SETUP), ctypes.c_uint(entries), params),
                  "io_uring_setup")


def _enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    return _syscall(ctypes.c_long(_SYS_ENTER), ctypes.c_int(fd), ctypes.c_uint(to_submit),
                    ctypes.c_uint(min_complete), ctypes.c_uint(flags), None, ctypes.c_size_t(0))


def _register(fd: int, opcode: int, arg: Any, nr_args: int) -> int:
    return _syscall(ctypes.c_long(_SYS_REGISTER), ctypes.c_int(fd), ctypes.c_uint(opcode),
                    arg, ctypes.c_uint(nr_args))


def _supported_ops(fd: int) -> frozenset[int]:
    """The opcodes ring ``fd`` supports (IORING_REGISTER_PROBE, Linux 5.6+)."""
    # struct io_uring_probe: last_op, ops_len, resv, resv2[3], then 256 ops of
    # {op u8, resv u8, flags u16, resv2 u32}.
    probe = ctypes.create_string_buffer(16 + 256 * 8)
    if _register(fd, _IORING_REGISTER_PROBE, probe, 256) < 0:
        raise OSError(ctypes.get_errno(),
                      f"IORING_REGISTER_PROBE: {os.strerror(ctypes.get_errno())}")
    raw = probe.raw
    return frozenset(op for op in range(min(raw[0], 255) + 1)
                     if struct.unpack_from("<H", raw, 16 + op * 8 + 2)[0]
                     & _IO_URING_OP_SUPPORTED)


def buffer_address(buf: Any, *, writable: bool) -> tuple[int, int, Any]:
    """``(address, length, keep)`` for a contiguous buffer; ``keep`` pins the memory.

    ``bytes`` (only for writes) is addressed in place: a ``c_char_p`` built from a bytes
    object points at the object's own storage. A writable buffer is viewed through
    ``(c_char * n).from_buffer``, which holds a buffer export. A read-only buffer that is
    not ``bytes`` (a memoryview of bytes, say) is copied once: rare, and always correct.
    """
    if type(buf) is bytes:
        if writable:
            raise TypeError("cannot read into bytes")
        n = len(buf)
        ptr = ctypes.c_char_p(buf)
        return ctypes.cast(ptr, ctypes.c_void_p).value or 0, n, (buf, ptr)
    view = memoryview(buf)
    n = view.nbytes
    if n == 0:
        return 0, 0, None
    if view.readonly:
        if writable:
            raise TypeError("cannot read into a read-only buffer")
        data = view.tobytes()
        ptr = ctypes.c_char_p(data)
        return ctypes.cast(ptr, ctypes.c_void_p).value or 0, n, (data, ptr)
    if not view.c_contiguous:
        raise ValueError("buffer is not contiguous")
    arr = (ctypes.c_char * n).from_buffer(view.cast("B") if view.format != "B" else view)
    return ctypes.addressof(arr), n, arr



class RingMap:
    """A ring's shared memory, mapped: the SQ and CQ rings and the SQE array, with the
    offsets of their fields (from the params ``io_uring_setup`` filled in). ``sqe_size``
    is 64, or 128 for a ring set up with IORING_SETUP_SQE128. The SQ index array maps
    ring slot i to SQE i once and for all. ``maps`` are closed by the owner."""

    def __init__(self, fd: int, params: ctypes.Array[ctypes.c_char], sqe_size: int) -> None:
        v = _PARAMS.unpack(params.raw)
        sq_entries, cq_entries, _flags, _cpu, _idle, features = v[:6]
        sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _sq_dropped, sq_array = v[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes = v[19:25]
        self.features = features
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        sq_size = sq_array + sq_entries * 4
        cq_size = cqes + cq_entries * _CQE_SIZE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mflags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        self.maps: list[mmap.mmap] = []
        try:
            if features & _IORING_FEAT_SINGLE_MMAP:
                sq = cq = mmap.mmap(fd, max(sq_size, cq_size), mflags, prot,
                                    offset=_IORING_OFF_SQ_RING)
                self.maps.append(sq)
            else:
                sq = mmap.mmap(fd, sq_size, mflags, prot, offset=_IORING_OFF_SQ_RING)
                self.maps.append(sq)
                cq = mmap.mmap(fd, cq_size, mflags, prot, offset=_IORING_OFF_CQ_RING)
                self.maps.append(cq)
            self.sqes = mmap.mmap(fd, sq_entries * sqe_size, mflags, prot,
                                  offset=_IORING_OFF_SQES)
            self.maps.append(self.sqes)
        except BaseException:
            for m in self.maps:
                m.close()
            raise
        self.sq, self.cq = sq, cq
        self.sq_head, self.sq_tail, self.sq_flags = sq_head, sq_tail, sq_flags
        self.sq_mask = _U32.unpack_from(sq, sq_mask)[0]
        self.cq_head, self.cq_tail = cq_head, cq_tail
        self.cq_mask = _U32.unpack_from(cq, cq_mask)[0]
        self.cqes = cqes
        for i in range(sq_entries):
            _U32.pack_into(sq, sq_array + 4 * i, i)


class Uring:
    """One io_uring instance; see the module docstring for threading and lifetimes."""

    @staticmethod
    def probe() -> str | None:
        """None if a ring with READ/WRITE can be used here, else why not (one line)."""
        if platform.machine() not in ("x86_64", "AMD64"):
            return f"memory ordering not verified on {platform.machine()}"
        params = ctypes.create_string_buffer(_PARAMS.size)
        try:
            fd = _setup(2, params)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                try:
                    with open("/proc/sys/kernel/io_uring_disabled") as f:
                        return f"io_uring disabled (kernel.io_uring_disabled={f.read().strip()})"
                except OSError:
                    return "io_uring_setup: EPERM"
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return f"io_uring_setup: {name}"
        try:
            if not _PARAMS.unpack(params.raw)[5] & _IORING_FEAT_NODROP:
                # Without it a completion that finds the CQ full is dropped: a request
                # that never completes.
                return "io_uring without IORING_FEAT_NODROP (Linux < 5.5)"
            try:
                ops = _supported_ops(fd)
            except OSError as exc:
                return str(exc)
            for op in (IORING_OP_READ, IORING_OP_WRITE):
                if op not in ops:
                    return f"io_uring opcode {op} not supported"
        finally:
            os.close(fd)
        return None

    def __init__(self, entries: int = 256) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        self.fd = _setup(entries, params)
        self._maps: list[mmap.mmap] = []
        self._efd = -1
        try:
            self._map(params)
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int(self._efd)
            _check(_register(self.fd, _IORING_REGISTER_EVENTFD, ctypes.byref(efd), 1),
                   "IORING_REGISTER_EVENTFD")
        except BaseException:
            self._release()
            raise
        try:
            #: IORING_OP_CLOSE is there (Linux 5.6): ``closing.close_fd`` may use the ring.
            self.closes = IORING_OP_CLOSE in _supported_ops(self.fd)
        except OSError:
            self.closes = False
        self.thread = threading.get_ident()
        self._pending: dict[int, tuple[Callback, Any]] = {}
        self._next = 1
        self._unsubmitted = 0  # SQEs queued in the SQ that io_uring_enter has not taken
        #: Set by the one driving the ring (the native session's reader, while it runs
        #: handlers back to back): ``submit`` leaves entries in the SQ for ``flush``.
        self.deferring = False
        self._closed = False
        self.submitted = 0  # statistics
        self.enters = 0  # io_uring_enter calls that submitted
        self.completed = 0
        self.overflows = 0  # times completions had to be fetched from the overflow list

    def _map(self, params: ctypes.Array[ctypes.c_char]) -> None:
        m = RingMap(self.fd, params, _SQE_SIZE)
        self._maps.extend(m.maps)
        self.features = m.features
        self.sq_entries = m.sq_entries
        self.cq_entries = m.cq_entries
        self._sq, self._cq, self._sqes = m.sq, m.cq, m.sqes
        self._sq_head, self._sq_tail = m.sq_head, m.sq_tail
        self._sq_flags = m.sq_flags
        self._sq_mask = m.sq_mask
        self._cq_head, self._cq_tail = m.cq_head, m.cq_tail
        self._cq_mask = m.cq_mask
        self._cqes = m.cqes
        self._tail = _U32.unpack_from(m.sq, m.sq_tail)[0]

    # -- submission ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Operations submitted whose callback has not run yet."""
        return len(self._pending)

    # KI protection: a KeyboardInterrupt between the ring update and the pending-table
    # update would lose a completion (its request would never finish).
    @trio.lowlevel.enable_ki_protection
    def submit(self, op: int, fd: int, addr: int, length: int, offset: int, rw_flags: int,
               callback: Callback, keep: Any = None, sqe_flags: int = 0) -> None:
        """Queue one operation and hand it to the kernel now, or with ``deferring`` at the
        next ``flush`` (up to DEFER_MAX entries).

        ``rw_flags``: RWF_* bits (RWF_HIPRI is refused by the kernel on a ring without
        IOPOLL). ``keep`` is held until ``callback(res)`` has run on the loop.
        ``sqe_flags``: IOSQE_* bits of the entry (IOSQE_ASYNC). Raises
        UringBusyError when the ring is closed or full (the caller uses a worker thread),
        TypeError/ValueError for a bad argument; on a raise nothing was queued.
        """
        if self._closed:
            raise UringBusyError("io_uring is closed")
        # Never more in flight than CQ slots: a completion then always has a slot, so the
        # kernel's overflow list (and its -EBUSY on enter) never comes into play.
        if len(self._pending) >= self.cq_entries:
            raise UringBusyError("io_uring completion queue full")
        tail = self._tail
        head = _U32.unpack_from(self._sq, self._sq_head)[0]
        if (tail - head) & 0xFFFFFFFF >= self.sq_entries:
            raise UringBusyError("io_uring submission queue full")
        key = self._next
        self._next = key + 1 if key < 0xFFFFFFFFFFFF else 1
        _SQE.pack_into(self._sqes, (tail & self._sq_mask) * _SQE_SIZE, op, sqe_flags, 0, fd,
                       offset, addr, length, rw_flags, key, 0, 0, 0, 0, 0)
        self._pending[key] = (callback, keep)
        self._tail = (tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail, self._tail)  # after the SQE: x86-64 release
        self._unsubmitted += 1
        if self.deferring and self._unsubmitted < DEFER_MAX:
            self.submitted += 1
            return
        try:
            self._flush()
            failure: str | None = None
        except OSError as exc:
            failure = str(exc)
        if self._unsubmitted:
            # The kernel did not take it (EAGAIN, EBUSY, ENOMEM, or worse). Entries are
            # consumed in order and this is the last one, so take it back off the tail
            # (the kernel reads the SQ only inside io_uring_enter): the caller then uses a
            # worker. Deferred ones before it stay for the next ``flush``.
            self._unsubmitted -= 1
            self._tail = tail
            _U32.pack_into(self._sq, self._sq_tail, tail)
            del self._pending[key]
            raise UringBusyError(f"io_uring_enter did not take the request: {failure or 'busy'}")
        self.submitted += 1

    @trio.lowlevel.enable_ki_protection
    def flush(self) -> bool:
        """Stop deferring and hand the kernel what is in the SQ. False: it did not take all
        of it (EAGAIN, EBUSY, ENOMEM: try again soon; the rest stays queued in order).
        An entry it refuses outright (any other error: a bug) completes with that error,
        its callback run on the loop soon after, as if the kernel had failed it."""
        self.deferring = False
        if not self._unsubmitted:
            return True
        try:
            self._flush()
        except OSError as exc:
            self._fail_unsubmitted(-(exc.errno or errno.EIO))
        return not self._unsubmitted

    def _fail_unsubmitted(self, res: int) -> None:
        """Take the SQ entries the kernel has not read back off the tail, and complete
        each with ``res`` through trio's callback queue (never from inside the caller)."""
        n = self._unsubmitted
        self._unsubmitted = 0
        token = trio.lowlevel.current_trio_token()
        keys = []
        for _ in range(n):
            self._tail = (self._tail - 1) & 0xFFFFFFFF
            keys.append(_SQE.unpack_from(self._sqes, (self._tail & self._sq_mask)
                                         * _SQE_SIZE)[8])
        _U32.pack_into(self._sq, self._sq_tail, self._tail)
        log.error("io_uring_enter refused %d queued operation(s): %s", n, os.strerror(-res))
        for key in reversed(keys):
            self.submitted -= 1
            token.run_sync_soon(self._complete_failed, key, res)

    def _complete_failed(self, key: int, res: int) -> None:
        entry = self._pending.pop(key, None)  # pending until its callback has run
        if entry is None:
            return
        try:
            entry[0](res)
        except Exception:
            log.exception("io_uring callback %r failed", entry[0])

    def _flush(self) -> None:
        """io_uring_enter for what is in the SQ. Returns when all is taken or the kernel
        says try later (EAGAIN, EBUSY, ENOMEM); raises OSError on any other error."""
        while self._unsubmitted:
            self.enters += 1
            n = _enter(self.fd, self._unsubmitted, 0, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err in (errno.EAGAIN, errno.EBUSY, errno.ENOMEM):
                    return
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            if n == 0:
                return
            self._unsubmitted -= n

    # -- completion ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Reap completions forever, calling each callback on this (the loop) thread.

        Cancel it only once ``pending`` is 0: a callback left unrun is a request that never
        completes (and whose buffer is pinned until ``close``). Returns once ``close`` ran.
        """
        task_status.started()
        while self._efd >= 0:
            try:
                await trio.lowlevel.wait_readable(self._efd)
            except trio.ClosedResourceError:
                return  # close() took the eventfd away
            try:
                os.read(self._efd, 8)
            except BlockingIOError:
                pass
            self.reap()

    def ready(self) -> bool:
        """Completions are posted and not reaped yet, in the CQ or in the kernel's overflow
        list (loads from the shared rings, no syscall: cheap enough for a polling loop)."""
        if not self._maps:
            return False
        cq = self._cq
        return (_U32.unpack_from(cq, self._cq_head)[0] != _U32.unpack_from(cq, self._cq_tail)[0]
                or self._overflowed())

    def _overflowed(self) -> bool:
        return bool(_U32.unpack_from(self._sq, self._sq_flags)[0] & _IORING_SQ_CQ_OVERFLOW)

    def _flush_overflow(self) -> None:
        """Have the kernel move overflowed completions into the CQ. Only an enter with
        GETEVENTS does that; until then every new completion queues behind them, and the
        ring, to a reaper that only looks at the CQ, falls silent for good."""
        self.overflows += 1
        if self.overflows == 1:
            log.warning("io_uring completion queue overflowed; fetching the completions "
                        "from the kernel's overflow list")
        while True:
            if _enter(self.fd, 0, 0, _IORING_ENTER_GETEVENTS) >= 0:
                return
            err = ctypes.get_errno()
            if err != errno.EINTR:
                log.error("io_uring_enter(GETEVENTS) to flush overflowed completions: %s",
                          os.strerror(err))
                return

    @trio.lowlevel.enable_ki_protection
    def reap(self) -> int:
        """Run the callbacks of every completion posted so far; returns how many."""
        cq = self._cq
        total = 0
        while True:
            head = _U32.unpack_from(cq, self._cq_head)[0]
            tail = _U32.unpack_from(cq, self._cq_tail)[0]  # read before the CQEs it covers
            if head == tail:
                if self._maps and self._overflowed():
                    self._flush_overflow()
                    if _U32.unpack_from(cq, self._cq_tail)[0] != head:
                        continue
                break
            done = []
            mask, base = self._cq_mask, self._cqes
            while head != tail:
                done.append(_CQE.unpack_from(cq, base + (head & mask) * _CQE_SIZE))
                head = (head + 1) & 0xFFFFFFFF
            _U32.pack_into(cq, self._cq_head, head)  # after the CQEs were copied out
            for user_data, res, _flags in done:
                entry = self._pending.pop(user_data, None)
                if entry is None:
                    continue
                self.completed += 1
                total += 1
                try:
                    entry[0](res)
                except Exception:  # a callback bug must not kill the reaper
                    log.exception("io_uring callback %r failed", entry[0])
        return total

    # -- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Unregister the eventfd, unmap, close. Refuses (RuntimeError) while ``pending``."""
        if self._closed:
            return
        if self._pending:
            raise RuntimeError(f"io_uring close() with {len(self._pending)} pending")
        self._closed = True
        _register(self.fd, _IORING_UNREGISTER_EVENTFD, None, 0)
        self._release()

    def _release(self) -> None:
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self._efd >= 0:
            # trio must drop its epoll registration while the fd is still open (and wake a
            # run() waiting on it): after the close the number may name another file.
            try:
                trio.lowlevel.notify_closing(self._efd)
            except RuntimeError:  # outside trio.run: nobody can be waiting
                pass
            os.close(self._efd)
            self._efd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return (f"<Uring fd={self.fd} entries={self.sq_entries} pending={self.pending} "
                f"submitted={self.submitted} completed={self.completed}>")


#: The ring the queued path uses, set by the runner while a session serves; None: threads.
ACTIVE: Uring | None = None
