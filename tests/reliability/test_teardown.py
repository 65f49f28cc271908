"""Teardown with reads and writes in flight: unmount and SIGTERM wait for them, exit cleanly.

Each test mounts one filesystem (passthru, or our overlay with the files in its lower layer)
on one FUSE front-end (the pyfuse3 session, or the native one, whose kernel passthrough
sends most reads and writes straight to the backing files) and runs six threads, each on
its own open file, in a loop until stopped or refused:

- three readers, O_DIRECT so every read reaches the daemon (page-aligned buffers, since
  passthrough hands O_DIRECT to the backing file), 4 MiB, 16 MiB and 128 KiB preads at
  random offsets of 64 MiB files whose backing pages were dropped (cold at first), each
  checked against the file's content (a read served from another fd would show);
- three writers, 1 MiB pwrites sweeping over a 16 MiB file again and again, each pass with
  new content (two buffered, one O_DIRECT); every write() that returns is recorded.

Then the teardown, at a random moment:

1. ``fusermount3 -u`` is refused (EBUSY: files are open) and disturbs nothing; ``umount -l``
   detaches the mount, I/O on the open files goes on, and once they are closed the daemon
   exits 0 by itself.
2. SIGTERM: the daemon finishes the requests it is serving, releases every handle, unmounts
   and exits 0 within a bound; the threads' later calls fail with ENOTCONN/ECONNABORTED
   (or, under passthrough, go on reaching the backing files the kernel holds).

Afterwards every write() that returned is in the backing file (the one write a thread had in
flight may have landed in part: its first bytes new, the rest old), the read-only files are
untouched, and the daemon's stderr holds no traceback, ERROR or EBADF. "Nothing touches a
closed fd" is shown by strace when it is installed: every daemon here runs under
``strace -f -y -e trace=%desc -e status=failed`` and no fd syscall of it may fail with
EBADF on an fd that is not open (``-y`` tells them apart: EBADF on an open O_PATH fd is
the xattr helpers' designed probe). The content checks (reads verified, writes landing only
in their own file) catch the worse case of an fd number reused after a close.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_crash import SEED, MiB, assert_clean_stderr, first_difference, fuse_argv, pattern

from backingfs.testing import Mount, drop_cache, is_fuse_mounted

pytestmark = pytest.mark.timeout(120)

READ_SIZE = 64 * MiB
READ_FILES = 2
#: One reader each: (file, bytes per pread). 128 KiB is one FUSE request, so a call the
#: daemon is serving at SIGTERM can still return; the large ones span many requests.
READS = ((0, 4 * MiB), (1, 16 * MiB), (0, 128 << 10))
CHUNK = MiB
CHUNKS = 16  # a writer's file: 16 MiB
WRITERS = (False, False, True)  # O_DIRECT or not
#: What a call on a file of a torn-down connection may answer.
GONE = {errno.ENOTCONN, errno.ECONNABORTED}
EXIT_BOUND = 15.0


def reader_seed(i: int) -> int:
    return SEED * 10 + i


def writer_seed(w: int) -> int:
    return SEED * 10 + 100 + w


def chunk_content(w: int, c: int, p: int) -> bytes:
    """Writer ``w``'s chunk ``c`` as written in pass ``p`` (pass 0: the file as created)."""
    return pattern(writer_seed(w), (p * CHUNKS + c) * CHUNK, CHUNK)


class IoThread(threading.Thread):
    """Runs ``step`` on its fd until stopped or until a call fails; closes the fd at the end.
    ``error``: the OSError that ended it; ``failure``: a wrong read (AssertionError)."""

    def __init__(self, name: str, fd: int, step: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.fd = fd
        self.step = step
        self.stop = threading.Event()
        self.ops = 0
        self.in_op = False
        self.error: OSError | None = None
        self.failure: BaseException | None = None
        self.close_error: OSError | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.in_op = True
                self.step()
                self.in_op = False
                self.ops += 1
        except OSError as e:
            self.error = e
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e
        finally:
            self.in_op = False
            try:
                os.close(self.fd)
            except OSError as e:  # the FLUSH of a close on a torn-down connection
                self.close_error = e


class ShortWrite(OSError):
    """A write() that returned fewer bytes than asked: the connection went away after
    some of its requests were served."""


class Writer:
    """One writer's state: the pass of the last acknowledged write of each chunk, and the
    write in flight (chunk, pass, bytes acknowledged) when the thread ended."""

    def __init__(self, w: int, fd: int) -> None:
        self.w = w
        self.fd = fd
        self.acked = [0] * CHUNKS
        self.next = 0  # sequence number of the next write: chunk next % CHUNKS
        self.in_flight: tuple[int, int, int] | None = None
        self.buf = mmap.mmap(-1, CHUNK)

    def step(self) -> None:
        c, p = self.next % CHUNKS, self.next // CHUNKS + 1
        data = chunk_content(self.w, c, p)
        self.buf[:] = data  # page-aligned: O_DIRECT may reach a backing file (passthrough)
        self.in_flight = (c, p, 0)
        n = os.pwritev(self.fd, [self.buf], c * CHUNK)
        if n != len(data):
            self.in_flight = (c, p, n)
            raise ShortWrite(errno.EIO, f"short write: {n} of {len(data)} bytes")
        self.acked[c] = p
        self.in_flight = None
        self.next += 1

    def verify(self, path: Path) -> None:
        got = path.read_bytes()
        assert len(got) == CHUNKS * CHUNK, f"{path}: size {len(got)}"
        for c in range(CHUNKS):
            old = chunk_content(self.w, c, self.acked[c])
            have = got[c * CHUNK:(c + 1) * CHUNK]
            if have == old:
                continue
            flight = self.in_flight
            assert flight is not None and flight[0] == c, (
                f"{path} chunk {c} is not its last acknowledged write (pass {self.acked[c]}): "
                + first_difference(have, old))
            new = chunk_content(self.w, c, flight[1])
            k = common_prefix(have, new)
            assert k >= flight[2], f"{path} chunk {c}: acknowledged bytes of a short write lost"
            assert have[k:] == old[k:], (
                f"{path} chunk {c} (in flight) is neither old, new, nor new then old")


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    page = 0
    while page < n and a[page:page + 4096] == b[page:page + 4096]:
        page += 4096
    k = page
    while k < n and a[k] == b[k]:
        k += 1
    return k


def make_reader(fd: int, seed: int, size: int, rng: random.Random) -> Callable[[], None]:
    # Page-aligned buffer and offsets: O_DIRECT may reach the backing file (passthrough).
    buf = mmap.mmap(-1, size)

    def step() -> None:
        off = rng.randrange(0, (READ_SIZE - size) // 4096) * 4096
        n = os.preadv(fd, [buf], off)
        got = buf[:n]
        want = pattern(seed, off, n)
        if got != want:
            raise AssertionError(f"read at {off} wrong: " + first_difference(got, want))
    return step


class Scene:
    """The files of one test, behind the mount (``data``) and where writes land (``backing``)."""

    def __init__(self, kind: str, base: Path) -> None:
        self.kind = kind
        self.base = base
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        if kind == "passthru":
            self.data = self.backing = base / "source"
            self.data.mkdir()
        else:
            for d in ("lower", "upper", "work"):
                (base / d).mkdir()
            self.data, self.backing = base / "lower", base / "upper"
        for i in range(READ_FILES):
            path = self.data / f"r{i}"
            path.write_bytes(pattern(reader_seed(i), 0, READ_SIZE))
            drop_cache(path)
        for w in range(len(WRITERS)):
            with open(self.data / f"w{w}", "wb") as f:
                for c in range(CHUNKS):
                    f.write(chunk_content(w, c, 0))

    def argv(self) -> list[str]:
        return fuse_argv(self.kind, self.base, self.mnt)

    def start_io(self, rng: random.Random) -> tuple[list[IoThread], list[Writer]]:
        threads, writers = [], []
        for r, (i, size) in enumerate(READS):
            fd = os.open(self.mnt / f"r{i}", os.O_RDONLY | os.O_DIRECT)
            threads.append(IoThread(f"r{r}", fd, make_reader(fd, reader_seed(i), size,
                                                             random.Random(rng.random()))))
        for w, direct in enumerate(WRITERS):
            fd = os.open(self.mnt / f"w{w}", os.O_WRONLY | (os.O_DIRECT if direct else 0))
            writer = Writer(w, fd)
            writers.append(writer)
            threads.append(IoThread(f"w{w}", fd, writer.step))
        for t in threads:
            t.start()
        return threads, writers

    def verify(self, writers: list[Writer]) -> None:
        """Check the backing files once nothing serves them any more, then delete them
        (pytest keeps the last runs' tmp_path)."""
        for writer in writers:
            writer.verify(self.backing / f"w{writer.w}")
        for i in range(READ_FILES):
            assert (self.data / f"r{i}").read_bytes() == pattern(reader_seed(i), 0, READ_SIZE)
        if self.kind == "overlay":
            assert not any((self.backing / f"r{i}").exists() for i in range(READ_FILES))
        assert not is_fuse_mounted(str(self.mnt))
        for d in {self.data, self.backing}:
            shutil.rmtree(d)


def wait_progress(threads: list[IoThread], more: int, timeout: float = 30.0) -> None:
    """Until every thread has done ``more`` further calls (each is still working)."""
    goal = {t.name: t.ops + more for t in threads}
    deadline = time.monotonic() + timeout
    while any(t.ops < goal[t.name] for t in threads):
        stuck = [t.name for t in threads if not t.is_alive() and t.ops < goal[t.name]]
        assert not stuck, f"threads ended: {[(t.name, t.error, t.failure) for t in threads]}"
        assert time.monotonic() < deadline, f"no progress: {[(t.name, t.ops) for t in threads]}"
        time.sleep(0.01)


def join_all(threads: list[IoThread], timeout: float = EXIT_BOUND) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still blocked after the teardown: {hung}"
    failures = [(t.name, t.failure) for t in threads if t.failure is not None]
    assert not failures, f"wrong data read: {failures}"


#: (filesystem, FUSE front-end): the pyfuse3 session, and the native one (runner -o session=),
#: where kernel passthrough sends most reads and writes straight to the backing files.
KINDS = [pytest.param(fs, session, id=f"{fs}-{session}")
         for session in ("pyfuse3", "native") for fs in ("passthru", "overlay")]


#: strace -y prints an open fd as ``N<what>`` and a closed one as a bare ``N``.
_FIRST_FD = re.compile(r"^\d+\s+\w+\((\d+)(<)?")
_EPOLL_FD = re.compile(r"epoll_ctl\(\d+<[^>]*>, EPOLL_CTL_\w+, (\d+)(<)?")


def closed_fd_calls(trace: str) -> list[str]:
    """The syscalls of an ``strace -f -y -e trace=%desc -e status=failed`` log that failed
    with EBADF on a closed fd. EBADF on an open one is allowed: fgetxattr & co. on O_PATH
    fds answer it by design and are retried through /proc/self/fd (backingfs.xattrs)."""
    out = []
    for line in trace.splitlines():
        if "EBADF" not in line:
            continue
        m = _EPOLL_FD.search(line) or _FIRST_FD.match(line)
        if m is None or m.group(2) is None:
            out.append(line)
    return out


def strace_available() -> bool:
    if shutil.which("strace") is None:
        return False
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True)
    return r.returncode == 0


def traced_child(mount: Mount, timeout: float = 10.0) -> int:
    """The daemon's pid under strace (strace's only child)."""
    assert mount.pid is not None
    deadline = time.monotonic() + timeout
    path = f"/proc/{mount.pid}/task/{mount.pid}/children"
    while time.monotonic() < deadline:
        with open(path) as f:
            children = f.read().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("strace started no daemon")


def start_traced(daemons, scene: Scene, session: str) -> tuple[Mount, int, Path | None]:
    """Mount ``scene`` on ``session``, under strace when it works here: (mount, the daemon's
    pid, the strace log or None)."""
    argv = scene.argv()
    trace = scene.base / "strace.log" if strace_available() else None
    if trace is not None:
        argv = ["strace", "-f", "-qq", "-y", "--seccomp-bpf", "-o", str(trace),
                "-e", "trace=%desc", "-e", "status=failed", *argv]
    mount = daemons.start(argv, scene.mnt, env={"BACKINGFS_SESSION": session})
    pid = traced_child(mount) if trace is not None else mount.pid
    assert pid is not None
    return mount, pid, trace


def check_trace(trace: Path | None) -> str:
    if trace is None:
        return "strace off"
    closed = closed_fd_calls(trace.read_text())
    assert not closed, "the daemon used a closed fd:\n" + "\n".join(closed[:20])
    return "strace on"


@pytest.mark.parametrize(("kind", "session"), KINDS)
def test_busy_unmount_then_lazy_unmount(kind: str, session: str, tmp_path: Path,
                                        daemons) -> None:
    rng = random.Random(f"{SEED}-lazy-{kind}")
    scene = Scene(kind, tmp_path)
    mount, _, trace = start_traced(daemons, scene, session)
    threads, writers = scene.start_io(rng)
    try:
        wait_progress(threads, 2)
        time.sleep(rng.uniform(0, 0.3))

        refused = subprocess.run(["fusermount3", "-u", str(scene.mnt)], capture_output=True)
        assert refused.returncode != 0, "unmount with files open succeeded"
        assert b"busy" in refused.stderr.lower(), refused.stderr
        assert is_fuse_mounted(str(scene.mnt))
        wait_progress(threads, 2)  # the refused unmount disturbed nothing

        subprocess.run(["umount", "-l", str(scene.mnt)], check=True, capture_output=True)
        assert not is_fuse_mounted(str(scene.mnt))
        assert mount.process is not None and mount.process.poll() is None, \
            "the daemon exited while files were still open"
        wait_progress(threads, 2)  # open files still work after the lazy unmount
    finally:
        for t in threads:
            t.stop.set()
    join_all(threads)
    errors = [(t.name, t.error) for t in threads if t.error is not None]
    assert not errors, f"I/O failed while the daemon was serving: {errors}"

    # The last close ends the superblock, and with it the session.
    t0 = time.monotonic()
    assert mount.process is not None
    status = mount.process.wait(EXIT_BOUND)  # strace exits with its child's status
    took = time.monotonic() - t0
    assert status == 0, mount.stderr_text()
    assert_clean_stderr(mount)
    scene.verify(writers)
    traced = check_trace(trace)
    print(f"{kind}-{session}: ops {[t.ops for t in threads]}, "
          f"daemon exit {took:.2f}s after the close, {traced}")


@pytest.mark.parametrize(("kind", "session"), KINDS)
def test_sigterm_waits_for_in_flight_io(kind: str, session: str, tmp_path: Path,
                                        daemons) -> None:
    rng = random.Random(f"{SEED}-term-{kind}")
    scene = Scene(kind, tmp_path)
    mount, pid, trace = start_traced(daemons, scene, session)
    threads, writers = scene.start_io(rng)
    try:
        wait_progress(threads, 2)
        time.sleep(rng.uniform(0, 0.3))
        busy = sum(t.in_op for t in threads)
        ops_at_signal = sum(t.ops for t in threads)
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        assert mount.process is not None
        status = mount.process.wait(EXIT_BOUND)  # strace exits with its child's status
        took = time.monotonic() - t0
    finally:
        for t in threads:
            t.stop.set()
    assert status == 0, mount.stderr_text()
    assert not is_fuse_mounted(str(scene.mnt))
    join_all(threads)
    unexpected = [(t.name, t.error) for t in threads if t.error is not None
                  and t.error.errno not in GONE and not isinstance(t.error, ShortWrite)]
    assert not unexpected, f"calls failed other than with ENOTCONN/ECONNABORTED: {unexpected}"

    assert_clean_stderr(mount)
    scene.verify(writers)
    traced = check_trace(trace)
    after = sum(t.ops for t in threads) - ops_at_signal
    print(f"{kind}-{session}: {busy} threads in a call at SIGTERM, {after} calls completed "
          "after it, "
          f"ops {[t.ops for t in threads]}, errors {[str(t.error) for t in threads]}, "
          f"exit {took:.2f}s after SIGTERM, {traced}")
