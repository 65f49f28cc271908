"""FUSE over io_uring: requests from the kernel's per-CPU queues, served on the caller's CPU.

Why: over /dev/fuse, one daemon thread serves every caller. On a VM whose idle vCPUs halt,
a request from a caller on the other vCPU costs a wake-up each way (an IPI and a vCPU exit
and entry: tens of microseconds, more than our handler for a small request), and the
scheduler keeps the two apart. Over io_uring the kernel puts a request on the queue of the
CPU its caller runs on (``fuse_uring_task_to_queue``: ``task_cpu(current)``), and the
thread serving that queue, pinned there, runs when the caller sleeps: no IPI, no idle exit.
A C ping-pong on this VM (futex, 20 µs of work a side): 150 µs a round trip with one
server, 49 µs with a server per CPU, 44 µs with both on one CPU.

Protocol (Linux >= 6.14, fs/fuse/dev_uring.c; only when the fuse module parameter
``enable_uring`` is on, an administrator's switch):

- INIT offers OVER_IO_URING; the session answers with it only when it will register
  (``native_ops.init``): from that answer on, the kernel holds every request until each
  queue, one per possible CPU, has an entry.
- One io_uring per queue thread, set up with IORING_SETUP_SQE128: a command's arguments
  (struct fuse_uring_cmd_req: commit_id, qid) live in the SQE's second half.
- An entry is a 288-byte header buffer and a payload buffer of the largest request
  (``max_write``, 1 MiB; the pages are touched only as far as requests fill them),
  registered by an IORING_OP_URING_CMD REGISTER on the /dev/fuse fd.
- A request arrives as the completion of its entry's command: the in header in
  ``in_out``, the request's first argument in ``op_in``, the rest in the payload buffer
  (``payload_sz``). The reply goes the same way: the out header in ``in_out``, the reply's
  arguments in the payload buffer, ``payload_sz``; then COMMIT_AND_FETCH, which also
  hands the entry back for the next request.
- FORGET, BATCH_FORGET and INTERRUPT still come through read(2) of /dev/fuse, and
  notifications are still written to it: the session's own reader keeps running.

Threads: a queue thread sleeps in io_uring_enter without the GIL. Woken on its CPU, it
takes the loop lease (``lease.py``) and runs the handler by hand. A handler that suspends
finishes on the trio loop; its reply is written into the entry there and the commit is
passed back to the queue thread (a deque, and an eventfd whose read the thread keeps on its
own ring): every command of a ring is submitted by the thread that owns it, because the
kernel runs the work that delivers the entry's next request in its submitter's context.

A kernel limit (6.18): the kernel hands a request to its entry in the queue thread's own
context (task work). While the daemon is stopped (SIGSTOP), a request it was handed is
neither answered nor released by an abort of the connection (fusectl ``abort``): its
caller waits until the daemon continues or dies. Over /dev/fuse the abort releases it.

Shutdown: ``stop`` makes the threads leave new requests alone (the unmount ends them with
ECONNABORTED, as it does requests not yet read from /dev/fuse) while handlers that
suspended still answer; after the unmount ``close`` ends the threads and closes the rings.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fuse_abi as abi
from . import lease, uring
from .lease import LoopLease

if TYPE_CHECKING:
    from .native import NativeSession

log = logging.getLogger(__name__)

IORING_OP_URING_CMD = 46
IORING_SETUP_SQE128 = 1 << 10
_SQE_SIZE = 128
_CMD_AREA = 48  # offset of the command's arguments in an SQE128
#: Entries per queue: the requests one CPU's callers can have with us at once. A handler
#: that suspends keeps its entry until it answers; the others go on serving.
ENTRIES = 8
_DOORBELL = 1 << 32  # user_data of the eventfd read (an entry's is its index)
_PAYLOAD_SZ = abi.URING_ENT_IN_OUT + 16  # offset of payload_sz in the header buffer
#: An entry's teardown: what the kernel completes a command with once the connection is
#: gone (unmounted, aborted), or the thread's ring with when cancelled.
_GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV)


#: The fuse module's switch; the kernel offers io_uring in INIT only while it is on.
ENABLE_PARAM = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def kernel_offers_uring() -> Iterator[None]:
    """Turn the fuse module's ``enable_uring`` on for the ``with`` block, then back to what
    it was: for tests and benchmarks, around a mount and its INIT (a connection keeps
    io_uring once negotiated). Raises OSError when the switch is missing or read-only."""
    old = ENABLE_PARAM.read_text().strip()
    ENABLE_PARAM.write_text("Y")
    try:
        yield
    finally:
        ENABLE_PARAM.write_text(old)


def unavailable() -> str | None:
    """Why a test or benchmark here cannot mount with io_uring (None: it can, turning the
    fuse module's switch on for the mount with ``kernel_offers_uring``)."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        major = minor = 0
    if (major, minor) < (6, 14):
        return "FUSE over io_uring needs Linux >= 6.14"
    if not ENABLE_PARAM.exists():
        return f"no {ENABLE_PARAM} (a kernel without CONFIG_FUSE_IO_URING)"
    if not os.access(ENABLE_PARAM, os.W_OK):
        return f"{ENABLE_PARAM} is not writable here (root only)"
    return lease.probe() or uring.Uring.probe()


def possible_cpus() -> int:
    """How many queues the kernel expects: ``num_possible_cpus()``."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class _Iovecs(ctypes.Structure):
    _fields_ = [("hdr_base", ctypes.c_void_p), ("hdr_len", ctypes.c_size_t),
                ("pay_base", ctypes.c_void_p), ("pay_len", ctypes.c_size_t)]


class _EntryReply:
    """The session as one ring request's handler sees it: ``reply`` and ``reply_error``
    write into the entry; everything else is the session's own."""

    __slots__ = ("_queue", "_ent", "_session")

    def __init__(self, queue: UringQueue, ent: int, session: NativeSession) -> None:
        self._queue = queue
        self._ent = ent
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def reply(self, unique: int, *payload: bytes | bytearray | memoryview) -> bool:
        return self._queue.answer(self._ent, unique, 0, payload)

    def reply_error(self, unique: int, err: int) -> None:
        self._queue.answer(self._ent, unique, -err, ())


class UringQueue:
    """A ring, its entries and its thread. Entry i serves kernel queue ``qids[i]``: a
    CPU's thread has ENTRIES entries of that CPU's queue; the spare thread one entry for
    each CPU the daemon does not run on (offline, or outside its affinity): the kernel
    wants every possible CPU's queue registered, and a caller there is served, unpinned."""

    def __init__(self, session: NativeSession, lease: LoopLease, name: str,
                 qids: list[int], payload_size: int) -> None:
        self.session = session
        self.lease = lease
        self.name = name
        self.qids = qids
        entries = len(qids)
        self.payload_size = payload_size
        self.stopping = False  # new requests are left alone (the unmount ends them)
        self.closing = False  # the thread ends
        #: Why registration failed (the kernel then serves through /dev/fuse), else None.
        self.refused: str | None = None
        self.requests = 0
        self._retries = 0
        self._thread: threading.Thread | None = None
        self._ident = 0
        self._inbox: deque[tuple[int, int]] = deque()
        self._bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._bell_buf = ctypes.create_string_buffer(8)
        self._fd = -1
        self._ring: uring.RingMap | None = None
        self._tail = 0
        self._live = 0
        self._hdr = mmap.mmap(-1, entries * abi.URING_HEADER_SIZE)
        self._pay = mmap.mmap(-1, entries * payload_size)
        # Buffer exports: they keep the maps from being closed while the kernel has them.
        self._hdr_arr = (ctypes.c_char * len(self._hdr)).from_buffer(self._hdr)
        self._pay_arr = (ctypes.c_char * len(self._pay)).from_buffer(self._pay)
        hdr_base, pay_base = ctypes.addressof(self._hdr_arr), ctypes.addressof(self._pay_arr)
        self._iovecs = [_Iovecs(hdr_base + i * abi.URING_HEADER_SIZE, abi.URING_HEADER_SIZE,
                                pay_base + i * payload_size, payload_size)
                        for i in range(entries)]
        self._replies = [_EntryReply(self, i, session) for i in range(entries)]

    # --- lifecycle (called from the trio thread) -------------------------------------------

    def prepare(self, devfd: int) -> None:
        """Set up the ring (raises OSError); nothing is registered yet."""
        params = ctypes.create_string_buffer(uring._PARAMS.size)
        uring._PARAMS.pack_into(params, 0, 0, 0, IORING_SETUP_SQE128, *[0] * 25)
        self._fd = uring._setup(len(self.qids) * 2, params)
        try:
            self._ring = uring.RingMap(self._fd, params, _SQE_SIZE)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self._tail = uring._U32.unpack_from(self._ring.sq, self._ring.sq_tail)[0]
        self._devfd = devfd

    def start(self, cpu: int | None) -> None:
        """Start the thread, which registers the entries."""
        self._thread = threading.Thread(target=self._main, args=(cpu,), daemon=True,
                                        name=f"fuse-uring-{self.name}")
        self._thread.start()

    def stop(self) -> None:
        """Leave new requests alone from now on; answers still go out. The thread stays:
        a request the kernel has handed over in it (task work) is then left in its
        entry, which the unmount ends with ECONNABORTED, as a request never read from
        /dev/fuse. (Were the thread gone, the kernel would fail it with ECANCELED.)"""
        self.stopping = True

    def end(self) -> None:
        """End the thread (after the unmount, which completes the waiting entries)."""
        self.stopping = self.closing = True
        self._ring_bell()

    def join(self, timeout: float) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """After ``join``: the ring and the buffers (never while the thread may run)."""
        if self._thread is not None and self._thread.is_alive():
            return  # the kernel may still write into the buffers: leave them mapped
        if self._ring is not None:
            for m in self._ring.maps:
                m.close()
            self._ring = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._bell >= 0:
            os.close(self._bell)
            self._bell = -1

    # --- answers (any thread) ---------------------------------------------------------------

    def answer(self, ent: int, unique: int, error: int,
               payload: tuple[bytes | bytearray | memoryview, ...]) -> bool:
        """Write a reply into entry ``ent`` and commit it (from its thread)."""
        pay, size = self._pay, self.payload_size
        start = pos = ent * size
        for part in payload:
            n = len(part) if type(part) is bytes else memoryview(part).nbytes
            if pos + n - start > size:
                log.error("reply to request %d is larger than the payload buffer (%d)",
                          unique, size)
                error, pos = -errno.EIO, start
                break
            pay[pos:pos + n] = part
            pos += n
        n = pos - start
        base = ent * abi.URING_HEADER_SIZE
        abi.OUT_HEADER.pack_into(self._hdr, base, abi.OUT_HEADER.size + n, error, unique)
        uring._U32.pack_into(self._hdr, base + _PAYLOAD_SZ, n)
        if threading.get_ident() == self._ident:
            self._commit(ent, unique)
        else:
            self._inbox.append((ent, unique))
            self._ring_bell()
        return True

    def _ring_bell(self) -> None:
        try:
            os.eventfd_write(self._bell, 1)
        except OSError:
            pass  # closed: the thread is gone

    # --- the queue thread -------------------------------------------------------------------

    def _main(self, cpu: int | None) -> None:
        self._ident = threading.get_ident()
        if cpu is not None:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError as e:
                log.debug("queue %s: cannot pin to CPU %d: %s", self.name, cpu, e)
        try:
            for ent in range(len(self.qids)):
                self._register(ent)
            self._arm_bell()
            self._live = len(self.qids)
            self._loop()
        except Exception:
            # Its CPU's requests would wait forever: end the session, so that the unmount
            # answers them (ENOTCONN) rather than leaving their callers hung.
            log.exception("FUSE io_uring queue %s failed; unmounting", self.name)
            self.lease.call_soon(self.session.terminate)

    def _push(self, opcode: int, fd: int, cmd_op: int, addr: int, length: int,
              user_data: int, cmd: bytes | None) -> None:
        ring = self._ring
        assert ring is not None
        off = (self._tail & ring.sq_mask) * _SQE_SIZE
        uring._SQE.pack_into(ring.sqes, off, opcode, 0, 0, fd, cmd_op, addr, length, 0,
                             user_data, 0, 0, 0, 0, 0)
        if cmd is not None:
            ring.sqes[off + _CMD_AREA:off + _CMD_AREA + len(cmd)] = cmd
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        uring._U32.pack_into(ring.sq, ring.sq_tail, self._tail)  # after the SQE (x86-64)

    def _register(self, ent: int) -> None:
        self._push(IORING_OP_URING_CMD, self._devfd, abi.URING_CMD_REGISTER,
                   ctypes.addressof(self._iovecs[ent]), 2, ent,
                   abi.URING_CMD_REQ.pack(0, 0, self.qids[ent]))

    def _commit(self, ent: int, unique: int) -> None:
        self._push(IORING_OP_URING_CMD, self._devfd, abi.URING_CMD_COMMIT_AND_FETCH, 0, 0,
                   ent, abi.URING_CMD_REQ.pack(0, unique, self.qids[ent]))

    def _arm_bell(self) -> None:
        self._push(uring.IORING_OP_READ, self._bell, 0, ctypes.addressof(self._bell_buf), 8,
                   _DOORBELL, None)

    def _loop(self) -> None:
        ring = self._ring
        assert ring is not None
        sq, cq = ring.sq, ring.cq
        u32 = uring._U32
        cqe = uring._CQE
        getevents = uring._IORING_ENTER_GETEVENTS
        while True:
            to_submit = (self._tail - u32.unpack_from(sq, ring.sq_head)[0]) & 0xFFFFFFFF
            if uring._enter(self._fd, to_submit, 1, getevents) < 0:
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
                if err != errno.EINTR:
                    time.sleep(0.001)
            head = u32.unpack_from(cq, ring.cq_head)[0]
            tail = u32.unpack_from(cq, ring.cq_tail)[0]
            done = []
            while head != tail:
                done.append(cqe.unpack_from(cq, ring.cqes + (head & ring.cq_mask) * 16))
                head = (head + 1) & 0xFFFFFFFF
            u32.pack_into(cq, ring.cq_head, head)
            for user_data, res, _flags in done:
                if user_data == _DOORBELL:
                    self._doorbell(res)
                elif res < 0:
                    self._gone(user_data, -res)
                elif not self.stopping:
                    self._serve(user_data)
            if self._live == 0 or self.closing:
                return

    def _doorbell(self, res: int) -> None:
        if self.closing or self._bell < 0:
            return
        if res < 0 and res != -errno.EAGAIN:
            log.error("queue %s: eventfd read failed: %s", self.name, os.strerror(-res))
        self._arm_bell()
        inbox = self._inbox
        while inbox:
            self._commit(*inbox.popleft())

    def _gone(self, ent: int, err: int) -> None:
        if err == errno.EAGAIN and self.requests == 0 and self._retries < 100:
            # Registered before the kernel took the INIT reply as done: again, shortly.
            self._retries += 1
            time.sleep(0.001)
            self._register(ent)
            return
        self._live -= 1
        if err in _GONE:
            return
        why = f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if self.refused is None and self.requests == 0:
            self.refused = why
            log.warning("FUSE over io_uring: queue %s entry %d refused: %s", self.name, ent,
                        why)
        else:
            log.error("FUSE over io_uring: queue %s entry %d failed: %s", self.name, ent, why)

    def _serve(self, ent: int) -> None:
        hdr = self._hdr
        base = ent * abi.URING_HEADER_SIZE
        length, opcode, unique = _IN_HEAD.unpack_from(hdr, base)
        payload_sz = uring._U32.unpack_from(hdr, base + _PAYLOAD_SZ)[0]
        oplen = length - abi.IN_HEADER.size - payload_sz
        if not 0 <= oplen <= abi.URING_ENT_IN_OUT - abi.URING_OP_IN \
                or payload_sz > self.payload_size:
            log.error("queue %s: request %d (opcode %d) has sizes that do not add up: len %d, "
                      "payload %d", self.name, unique, opcode, length, payload_sz)
            self.answer(ent, unique, -errno.EIO, ())
            return
        self.requests += 1
        op = base + abi.URING_OP_IN
        pay = ent * self.payload_size
        data = (hdr[base:base + abi.IN_HEADER.size] + hdr[op:op + oplen]
                + self._pay[pay:pay + payload_sz])
        lease = self.lease
        if not lease.acquire():
            return  # the session is over: the unmount aborts this request
        try:
            lease.run(self.session._dispatch(data, self._replies[ent]))
        finally:
            lease.release()


_IN_HEAD = struct.Struct("=IIQ")  # the in header's len, opcode, unique


class FuseUring:
    """The queues of one connection: ``start`` after the INIT reply, ``stop`` when the
    session ends, ``close`` after the unmount."""

    def __init__(self, session: NativeSession, lease: LoopLease) -> None:
        self.session = session
        self.lease = lease
        self.queues: list[UringQueue] = []
        self.cpus: list[int | None] = []  # what each queue's thread is pinned to

    def prepare(self, devfd: int, payload_size: int) -> None:
        """Set up one queue and ring per possible CPU, before the INIT reply promises
        io_uring (once promised, the kernel holds every request until the queues have
        registered). Raises OSError, with nothing left behind."""
        mine = os.sched_getaffinity(0)
        cpus = [c for c in range(possible_cpus()) if c in mine]
        spare = [c for c in range(possible_cpus()) if c not in mine]
        try:
            for cpu in cpus:
                self.queues.append(UringQueue(self.session, self.lease, f"cpu{cpu}",
                                              [cpu] * ENTRIES, payload_size))
                self.cpus.append(cpu)
            if spare:
                self.queues.append(UringQueue(self.session, self.lease, "spare", spare,
                                              payload_size))
                self.cpus.append(None)
            for q in self.queues:
                q.prepare(devfd)
        except BaseException:
            self.close()
            self.queues.clear()
            self.cpus.clear()
            raise

    def start(self) -> None:
        """After the INIT reply: start the threads (they register the entries)."""
        for q, cpu in zip(self.queues, self.cpus, strict=True):
            q.start(cpu)
        log.info("FUSE over io_uring: %d queue threads (%s)", len(self.queues),
                 ", ".join(q.name for q in self.queues))

    def serving(self) -> bool:
        """The queues registered: requests other than FORGET and INTERRUPT come through
        them. (A refused registration turns io_uring off for the connection.)"""
        return bool(self.queues) and not any(q.refused for q in self.queues)

    def stop(self) -> None:
        for q in self.queues:
            q.stop()

    def close(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for q in self.queues:
            q.end()
            if not q.join(max(0.0, deadline - time.monotonic())):
                log.warning("FUSE io_uring queue %s did not end", q.name)
            q.close()

    def statistics(self) -> dict[str, object]:
        return {"queues": [q.name for q in self.queues],
                "requests": {q.name: q.requests for q in self.queues},
                "inline": self.lease.inline, "carried": self.lease.carried,
                "wakes": self.lease.wakes,
                "refused": [q.refused for q in self.queues if q.refused]}
