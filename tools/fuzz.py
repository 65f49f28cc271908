"""fuzz: random system calls, odd ones included, thrown at a mount for a fixed time while a
watchdog makes sure the daemon stays up and keeps answering.

    python tools/fuzz.py [--targets passthru,overlay-lower] [--duration SEC] [--threads N]
                         [--seed N] [--hang SEC] [--max-disk BYTES] [--dir DIR]

Each target in turn is mounted by this script through ``backingfs.testing`` (its own
daemon only, always unmounted in ``finally``), with a small tree behind the mount
(passthru's source, the overlay's lower layer, so overlay writes copy up), and fuzzed for
``--duration`` seconds by ``--threads`` workers over a bounded pool of names, some of them
odd (non-UTF-8 bytes, a newline, 255 bytes). Operations, with deliberately bad arguments:

    open with random flag sets (O_DIRECT, O_SYNC, O_APPEND, O_TRUNC, O_EXCL, O_PATH,
    O_NOATIME, O_TMPFILE, O_DIRECTORY on files...), always O_NONBLOCK (a FIFO must not
    block the fuzzer); pread/pwrite/preadv at bad offsets (negative, past 2**62, at
    2**63-1) and sizes up to 4 MiB, O_DIRECT through page-aligned buffers; fallocate with
    every mode (keep-size, punch-hole, zero-range, collapse, insert, unshare, invalid bits);
    truncate/ftruncate to huge and negative sizes; lseek SEEK_DATA/SEEK_HOLE; fsync,
    fdatasync; copy_file_range, sendfile; xattrs (64 KiB and 64 KiB + 1 values, 256-byte
    names, odd bytes, overlay-private, security.capability / POSIX ACL garbage, unknown
    namespaces); create, mkdir, rmdir, unlink, renameat2 with every flag and invalid ones,
    link, symlink (empty, 4 KiB, escaping targets), mkfifo, mknod; chmod with all mode bits,
    chown to odd ids, utimes far in the past and future; readdir, statfs, access; ioctls
    (GETFLAGS, SETFLAGS with +i/+a and bits no filesystem takes, FSGETXATTR/FSSETXATTR
    with garbage, FICLONE, an unknown one), flock and POSIX locks; plus drop_caches every few
    seconds (FORGET storms) from a side thread.

Errnos are fine: a fuzzer expects most calls to fail. What is not fine, and makes the
exit status 1:
- the daemon dies or its mount disappears (watchdog, every second);
- the daemon hangs: a stat + statfs of the mount root (statfs always reaches the daemon,
  whatever the attribute cache holds) does not answer within ``--hang`` seconds (default
  10); the report then includes ``py-spy dump`` of the daemon when py-spy is installed;
- the daemon logs a traceback (an internal error it answered with EIO);
- it does not unmount cleanly (``fusermount3 -u``, exit status 0) at the end.

Written data is bounded (``--max-disk``, default 2 GiB, checked behind the mount every 15
seconds; over it, the pool's files are truncated through the mount) so a fallocate at a
huge offset cannot fill the disk.

Exit status: 0 clean, 1 the daemon died, hung, failed internally or unmounted uncleanly,
2 usage error, 3 a target could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (str(REPO), str(REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from soak import (  # noqa: E402
    UsageError,
    daemon_fds,
    daemon_rss,
    drop_caches,
    fuse_target,
    mount_free,
)

from backingfs.syscalls import renameat2  # noqa: E402
from backingfs.testing import FuseTargetMount, is_fuse_mounted  # noqa: E402

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
MiB = 1 << 20
DEFAULT_TARGETS = "passthru,overlay-lower"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]

FALLOC_MODES = (0, 0x01, 0x03, 0x10, 0x11, 0x08, 0x20, 0x40, 0x02, 0x80, 0x7F)
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
#: chattr's bits, +i and +a among them, and some no filesystem takes
FLAG_CHOICES = (0, 0x8, 0x10, 0x20, 0x40, 0x80, 0x10 | 0x20, 0x4000, 0x40000000, 0xFFFFFFFF)
FICLONE = 0x40049409
FIONREAD = 0x541B
BAD_IOCTL = 0xC0DE1234
ODD_OFFSETS = (0, 1, 511, 4095, 4096, 65535, 1 << 20, (1 << 31) - 1, 1 << 32, 1 << 40,
               (1 << 62), (1 << 63) - 1, -1, -4096)
ODD_SIZES = (0, 1, 7, 512, 4096, 4097, 65536, 131072, 1 << 20, 4 << 20)
OPEN_FLAGS = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_DIRECT,
              os.O_RDONLY | os.O_DIRECT, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_SYNC,
              os.O_RDWR | os.O_DSYNC, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_CREAT,
              os.O_RDWR | os.O_CREAT | os.O_EXCL, os.O_RDONLY | os.O_NOATIME,
              os.O_PATH, os.O_RDONLY | os.O_DIRECTORY, os.O_RDWR | os.O_NOFOLLOW,
              os.O_WRONLY | os.O_APPEND | os.O_DIRECT, os.O_RDONLY | os.O_TRUNC,
              os.O_ACCMODE)
ODD_NAMES = (b"\xff\xfe", b"nl\nname", b"x" * 255, b"caf\xe9", b" ", b"-", b"\x01")
XATTR_NAMES = (b"user.a", b"user.b", b"user." + b"x" * 250, b"user." + b"y" * 251,
               b"user.\xff\n", b"user.", b"trusted.fuzz", b"trusted.overlay.opaque",
               b"trusted.overlay.origin", b"user.overlay.redirect",
               b"security.capability", b"system.posix_acl_access", b"bogus.name",
               b"security.fuzz")
XATTR_SIZES = (0, 1, 255, 4000, 4096, 65536, 65537)


def log(msg: str) -> None:
    print(f"fuzz: {msg}", file=sys.stderr, flush=True)


# --- the pool of names ---------------------------------------------------------------------


@dataclass
class Pool:
    root: bytes
    dirs: list[bytes]
    paths: list[bytes]

    @classmethod
    def build(cls, root: bytes) -> Pool:
        dirs = [root + b"/" + d for d in (b"a", b"b", b"c", b"\xff odd")]
        names = [b"n%d" % i for i in range(10)] + list(ODD_NAMES)
        paths = [d + b"/" + n for d in dirs for n in names]
        paths += [p + b"/sub" for p in paths[:: 3]]   # exist while p is a directory
        return cls(root, dirs, paths)


def initial_tree() -> dict[str, bytes | None]:
    rng = random.Random("fuzz-tree")
    tree: dict[str, bytes | None] = {}
    for d in ("a", "b", "c"):
        tree[f"{d}/"] = None
        for i in range(10):
            if rng.random() < 0.6:
                tree[f"{d}/n{i}"] = rng.randbytes(rng.choice((0, 100, 5000, 70000)))
            elif rng.random() < 0.5:
                tree[f"{d}/n{i}/"] = None
                tree[f"{d}/n{i}/sub"] = b"sub"
    return tree


# --- the workers ---------------------------------------------------------------------------


class Worker(threading.Thread):
    MAX_HELD = 6

    def __init__(self, index: int, pool: Pool, seed: int, stop: threading.Event,
                 shrink: threading.Event) -> None:
        super().__init__(name=f"fuzz-worker-{index}", daemon=True)
        self.pool = pool
        self.rng = random.Random(f"fuzz-{seed}-{index}")
        self.stop = stop
        self.shrink = shrink
        self.buf = self.rng.randbytes(4 << 20)
        self.aligned = mmap.mmap(-1, 1 << 20)   # page-aligned, for O_DIRECT
        self.held: list[int] = []
        self.done = 0
        self.errnos: Counter[int] = Counter()
        self.pyerrs: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.crash: BaseException | None = None
        self.current = ""   # the op running now: what a blocked worker was doing

    def path(self) -> bytes:
        return self.rng.choice(self.pool.paths)

    def offset(self) -> int:
        if self.rng.random() < 0.6:
            return self.rng.randrange(1 << 24)
        return self.rng.choice(ODD_OFFSETS)

    def size(self) -> int:
        return self.rng.choice(ODD_SIZES)

    def fd(self) -> int:
        """A held fd, or a fresh read-write one (held)."""
        if self.held and self.rng.random() < 0.8:
            return self.rng.choice(self.held)
        fd = os.open(self.path(), os.O_RDWR | os.O_NONBLOCK)
        self.hold(fd)
        return fd

    def hold(self, fd: int) -> None:
        """Keep ``fd`` open across ops. Never closes one here: the current op may still be
        using it, and a closed number can be reused at once by another thread's open."""
        self.held.append(fd)

    def trim(self) -> None:
        """Between ops: close held fds beyond MAX_HELD, oldest first. close(2) may fail
        and still close the fd: under the writeback cache it reports a failed flush of
        dirty pages (a write the backing file refused, e.g. EFBIG at 2**62, comes back as
        EIO here); counted like any op's errno."""
        while len(self.held) > self.MAX_HELD:
            try:
                os.close(self.held.pop(0))
            except OSError as e:
                self.errnos[e.errno or 0] += 1

    def run(self) -> None:
        names = list(OPS)
        weights = [OPS[n][0] for n in names]
        try:
            while not self.stop.is_set():
                self.trim()
                name = self.rng.choices(names, weights)[0]
                if self.shrink.is_set() and self.rng.random() < 0.5:
                    name = "truncate"
                self.current = name
                try:
                    OPS[name][1](self)
                except OSError as e:
                    self.errnos[e.errno or 0] += 1
                except (OverflowError, ValueError, TypeError) as e:
                    self.pyerrs[type(e).__name__] += 1   # refused before any syscall
                self.ops[name] += 1
                self.done += 1
        except BaseException as e:   # a bug in the fuzzer: report, never hang the run
            self.crash = e
        finally:
            for fd in self.held:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.held = []


def op_open(w: Worker) -> None:
    flags = w.rng.choice(OPEN_FLAGS) | os.O_NONBLOCK
    target = w.path()
    if w.rng.random() < 0.05:
        flags = os.O_TMPFILE | os.O_RDWR
        target = w.rng.choice(w.pool.dirs)
    w.hold(os.open(target, flags, w.rng.choice((0o644, 0o7777, 0))))


def op_close(w: Worker) -> None:
    if w.held:
        os.close(w.held.pop(w.rng.randrange(len(w.held))))


def op_read(w: Worker) -> None:
    fd, r = w.fd(), w.rng.random()
    if r < 0.6:
        os.pread(fd, w.size(), w.offset())
    elif r < 0.8:
        n = w.rng.choice((512, 4096, 65536, 1 << 20))
        os.preadv(fd, [memoryview(w.aligned)[:n]], w.rng.choice((0, 4096, 1 << 20, 511)))
    else:
        os.read(fd, w.size())


def op_write(w: Worker) -> None:
    fd, r = w.fd(), w.rng.random()
    off = w.offset()
    n = w.size() if off < (1 << 24) else w.rng.choice((0, 1, 4096))
    if r < 0.7:
        os.pwrite(fd, memoryview(w.buf)[:n], off)
    elif r < 0.9:   # aligned buffer: what O_DIRECT wants
        n = w.rng.choice((512, 4096, 65536))
        os.pwritev(fd, [memoryview(w.aligned)[:n]], w.rng.choice((0, 4096, 8192, 511)))
    else:
        os.write(fd, memoryview(w.buf)[:n])


def op_fallocate(w: Worker) -> None:
    fd = w.fd()
    mode = w.rng.choice(FALLOC_MODES)
    off = w.offset()
    length = w.rng.choice((0, 1, 4096, 65536, 1 << 20, -1))
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def op_truncate(w: Worker) -> None:
    size = 0 if w.shrink.is_set() else w.rng.choice((0, 1, 4096, 1 << 20, 1 << 40,
                                                     (1 << 63) - 1, -1))
    if w.rng.random() < 0.5:
        os.truncate(w.path(), size)
    else:
        os.ftruncate(w.fd(), size)


def op_seek(w: Worker) -> None:
    whence = w.rng.choice((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA,
                           os.SEEK_HOLE, 17))
    os.lseek(w.fd(), w.offset(), whence)


def op_sync(w: Worker) -> None:
    fd = w.fd()
    (os.fsync if w.rng.random() < 0.5 else os.fdatasync)(fd)


def op_copy(w: Worker) -> None:
    src, dst = w.fd(), w.fd()
    n = w.rng.choice((0, 1, 4096, 1 << 20))
    # sendfile into a pipe waits for room whatever O_NONBLOCK says (splice_file_to_pipe):
    # into a FIFO the fuzzer itself holds open, that is forever.
    if w.rng.random() < 0.7 or stat.S_ISFIFO(os.fstat(dst).st_mode):
        os.copy_file_range(src, dst, n, w.offset(), w.offset())
    else:
        os.sendfile(dst, src, w.offset(), n)


def op_xattr(w: Worker) -> None:
    path, name, r = w.path(), w.rng.choice(XATTR_NAMES), w.rng.random()
    follow = w.rng.random() < 0.8
    if r < 0.45:
        value = w.buf[:w.rng.choice(XATTR_SIZES)]
        flags = w.rng.choice((0, os.XATTR_CREATE, os.XATTR_REPLACE, 3))
        os.setxattr(path, name, value, flags, follow_symlinks=follow)
    elif r < 0.7:
        os.getxattr(path, name, follow_symlinks=follow)
    elif r < 0.85:
        os.listxattr(path, follow_symlinks=follow)
    else:
        os.removexattr(path, name, follow_symlinks=follow)


def op_create(w: Worker) -> None:
    fd = os.open(w.path(), os.O_CREAT | os.O_WRONLY | os.O_NONBLOCK
                 | w.rng.choice((0, os.O_EXCL, os.O_TRUNC)), w.rng.choice((0o644, 0o4755)))
    os.close(fd)


def op_mkdir(w: Worker) -> None:
    os.mkdir(w.path(), w.rng.choice((0o755, 0o1777, 0)))


def op_remove(w: Worker) -> None:
    path = w.path()
    if w.rng.random() < 0.5:
        os.unlink(path)
    else:
        try:
            os.unlink(path + b"/sub")
        except OSError:
            pass
        os.rmdir(path)


def op_rename(w: Worker) -> None:
    a, b = w.path(), w.path()
    flags = w.rng.choice((0, 0, 1, 2, 4, 3, 8))
    da = os.open(os.path.dirname(a), os.O_PATH)
    try:
        db = os.open(os.path.dirname(b), os.O_PATH)
        try:
            renameat2(da, os.path.basename(a), db, os.path.basename(b), flags)
        finally:
            os.close(db)
    finally:
        os.close(da)


#: Symlink targets that leave the mount, for the daemon never to follow. They must not reach
#: anything real for *us* either: this process runs as root and its chown, chmod, truncate
#: and O_CREAT opens follow symlinks (a target of /etc/passwd once had the host's passwd
#: truncated, chmodded and chowned by a test run). So they lead into a directory that does
#: not exist: every call through them fails with ENOENT, and nothing can be created there.
ESCAPING_UP = b"../" * 64 + b"nonexistent-backingfs-fuzz/x"
ESCAPING_ABS = b"/nonexistent-backingfs-fuzz/passwd"


def op_link(w: Worker) -> None:
    r = w.rng.random()
    if r < 0.4:
        os.link(w.path(), w.path(), follow_symlinks=w.rng.random() < 0.5)
    elif r < 0.8:
        target = w.rng.choice((b"", b"t" * 4096, b"t" * 4095, ESCAPING_UP, ESCAPING_ABS,
                               b"n1", b"../a/n2", b"\xff"))
        os.symlink(target, w.path())
    else:
        os.readlink(w.path())


def op_special(w: Worker) -> None:
    path = w.path()
    if w.rng.random() < 0.6:
        os.mkfifo(path, 0o644)
    else:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))


def op_setattr(w: Worker) -> None:
    path, r = w.path(), w.rng.random()
    if r < 0.35:
        os.chmod(path, w.rng.choice((0o7777, 0, 0o4755, 0o2755, 0o1777, 0o644)))
    elif r < 0.6:
        ids = (-1, 0, 65534, 1000, (1 << 32) - 2)
        os.chown(path, w.rng.choice(ids), w.rng.choice(ids),
                 follow_symlinks=w.rng.random() < 0.5)
    else:
        t = w.rng.choice((0, -(10**18), 10**18, (1 << 62), -1, 10**9 * 1700000000))
        os.utime(path, ns=(t, w.rng.choice((t, 0))), follow_symlinks=w.rng.random() < 0.5)


def op_readdir(w: Worker) -> None:
    where = w.rng.choice(w.pool.dirs + [w.pool.root, w.path()])
    with os.scandir(where) as it:
        for entry in it:
            try:
                entry.stat(follow_symlinks=False)
            except OSError:
                pass


def op_stat(w: Worker) -> None:
    r, path = w.rng.random(), w.path()
    if r < 0.5:
        os.lstat(path)
    elif r < 0.7:
        os.stat(path)
    elif r < 0.85:
        os.statvfs(path)
    else:
        os.access(path, w.rng.choice((os.R_OK, os.W_OK | os.X_OK, 0, 0o17)))


def op_ioctl(w: Worker) -> None:
    fd, r = w.fd(), w.rng.random()
    if r < 0.25:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)
    elif r < 0.4:
        # chattr: mostly clearing +i/+a again, so that the pool stays usable
        rng = w.rng
        flags = 0 if rng.random() < 0.5 else rng.choice(FLAG_CHOICES)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(rng.choice((4, 8)), "little"))
    elif r < 0.5:
        fcntl.ioctl(fd, w.rng.choice((FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR)),
                    w.rng.choice((bytes(28), w.rng.randbytes(28), bytes(32))))
    elif r < 0.6:
        fcntl.ioctl(fd, FICLONE, w.fd())
    elif r < 0.8:
        fcntl.ioctl(fd, FIONREAD, b"\0" * 4)
    else:
        fcntl.ioctl(fd, BAD_IOCTL, b"\0" * 64)


def op_lock(w: Worker) -> None:
    fd = w.fd()
    if w.rng.random() < 0.5:
        fcntl.flock(fd, w.rng.choice((fcntl.LOCK_EX, fcntl.LOCK_SH, fcntl.LOCK_UN))
                    | fcntl.LOCK_NB)
    else:
        fcntl.lockf(fd, w.rng.choice((fcntl.LOCK_EX, fcntl.LOCK_UN)) | fcntl.LOCK_NB,
                    w.rng.choice((0, 1, 4096)), w.rng.choice((0, 4096, 1 << 40)))


OPS: dict[str, tuple[int, Callable[[Worker], None]]] = {
    "open": (10, op_open), "close": (6, op_close), "read": (12, op_read),
    "write": (12, op_write), "fallocate": (5, op_fallocate), "truncate": (4, op_truncate),
    "seek": (3, op_seek), "sync": (2, op_sync), "copy": (3, op_copy), "xattr": (8, op_xattr),
    "create": (6, op_create), "mkdir": (3, op_mkdir), "remove": (6, op_remove),
    "rename": (6, op_rename), "link": (4, op_link), "special": (1, op_special),
    "setattr": (4, op_setattr), "readdir": (4, op_readdir), "stat": (8, op_stat),
    "ioctl": (2, op_ioctl), "lock": (2, op_lock),
}


# --- the watchdog --------------------------------------------------------------------------


def py_spy_dump(pid: int) -> str:
    """The daemon's Python stacks, if py-spy is around (it needs ptrace rights)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        return "(py-spy not installed: no stack dump)"
    out = ""
    # A stopped process cannot be paused for a consistent dump: then read it as it is.
    for extra in ([], ["--nonblocking"]):
        try:
            r = subprocess.run([exe, "dump", *extra, "--pid", str(pid)], capture_output=True,
                               text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            out = f"(py-spy dump {' '.join(extra)} failed: {e})"
            continue
        out = (r.stdout + r.stderr).strip() or f"(py-spy dump: exit {r.returncode})"
        if r.returncode == 0:
            break
    return out


class Watchdog(threading.Thread):
    """Every ``interval``: the daemon pid is alive and mounted, and the probe (stat and
    statfs of the mount root, in its own thread so it can hang alone) has answered within
    ``hang`` seconds. Sets ``verdict`` and ``tripped`` at the first failure."""

    def __init__(self, mount: FuseTargetMount, root: str, hang: float,
                 interval: float = 1.0) -> None:
        super().__init__(name="fuzz-watchdog", daemon=True)
        self.mount = mount
        self.root = root
        self.hang = hang
        self.interval = interval
        self.stop = threading.Event()
        self.tripped = threading.Event()
        self.verdict: str | None = None
        self.probes = 0
        self.max_latency = 0.0
        self._probe_started: float | None = None
        self._probe_done = threading.Event()

    def _probe(self) -> None:
        t0 = time.monotonic()
        try:
            os.stat(self.root)
            os.statvfs(self.root)
        except OSError:
            pass   # an errno is an answer; the death check says whether it was ours
        finally:
            self.max_latency = max(self.max_latency, time.monotonic() - t0)
            self._probe_done.set()

    def trip(self, verdict: str) -> None:
        self.verdict = verdict
        self.tripped.set()

    def run(self) -> None:
        pid = self.mount.mount.pid
        assert pid is not None
        while not self.stop.wait(self.interval):
            now = time.monotonic()
            if self.mount.mount._exited() or daemon_fds(pid) < 0:
                self.trip(f"daemon {pid} died:\n{self.mount.mount.stderr_text()[-3000:]}")
                return
            if not is_fuse_mounted(self.mount.mount.mountpoint):
                self.trip(f"{self.mount.mount.mountpoint} is no longer mounted")
                return
            if self._probe_started is not None:
                if self._probe_done.is_set():
                    self._probe_started = None
                elif now - self._probe_started > self.hang:
                    self.trip(f"daemon {pid} hung: stat/statfs of the mount root unanswered "
                              f"for {now - self._probe_started:.0f} s\n{py_spy_dump(pid)}")
                    return
            if self._probe_started is None:
                self._probe_done.clear()
                self._probe_started = now
                self.probes += 1
                threading.Thread(target=self._probe, daemon=True).start()


# --- one target ----------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    ops: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def blocked_in(w: Worker) -> str:
    """Which op and system call a worker thread is stuck in (/proc/self/task/TID/syscall:
    the number, then the arguments; an fd argument is named by what it refers to)."""
    tid = w.native_id
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            call = f.read().split()
        with open(f"/proc/self/task/{tid}/wchan") as f:
            wchan = f.read().strip()
    except OSError as e:
        return f"op {w.current} (no /proc details: {e})"
    fd = ""
    if len(call) > 1:
        with contextlib.suppress(OSError, ValueError):
            fd = f", arg 1 is fd {int(call[1], 16)} -> " + os.readlink(
                f"/proc/self/fd/{int(call[1], 16)}")
    return f"op {w.current}, syscall {' '.join(call[:4])} in {wchan}{fd}"


def tracebacks(text: str) -> list[tuple[str, str]]:
    """Every traceback in a daemon's log: (signature, the log line and traceback). The
    signature is the logged request without numbers plus the exception line, so a
    thousand of one bug count as one kind."""
    out = []
    parts = text.split("Traceback (most recent call last):")
    for before, body in zip(parts, parts[1:], strict=False):
        head = before.rstrip("\n").rpartition("\n")[2]
        lines = body.strip("\n").splitlines()
        end = next((i for i, line in enumerate(lines)
                    if line and not line.startswith((" ", "\t"))), len(lines) - 1)
        exc = lines[end] if lines else ""
        what = re.sub(r"\d+", "N", head.partition("ERROR: ")[2] or head)
        out.append((f"{what} -> {exc}", head + "\nTraceback (most recent call last):\n"
                    + "\n".join(lines[:end + 1])))
    return out


def disk_used(base: Path, skip: Path) -> int:
    """Bytes allocated under ``base``, never looking into ``skip`` (the mountpoint)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == skip.parent and skip.name in dirnames:
            dirnames.remove(skip.name)
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def fuzz_target(name: str, args: argparse.Namespace) -> Result:
    res = Result(name)
    try:
        target = fuse_target(name, args.opts)
    except UsageError as e:
        res.problems.append(str(e))
        return res
    why = target.unavailable()
    if why:
        res.problems.append(f"unavailable: {why}")
        return res
    if args.dir:
        base = Path(args.dir).resolve() / f"fuzz-{name}-{args.seed}-{os.getpid()}"
        base.mkdir(parents=True)
    else:
        base = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    mount: FuseTargetMount | None = None
    try:
        try:
            started = target.start(base)
        except Exception as e:
            res.problems.append(f"cannot start: {e}")
            return res
        assert isinstance(started, FuseTargetMount)
        mount = started
        root = mount.workdir("fuzz", initial_tree())
        (root / os.fsdecode(b"\xff odd")).mkdir()
        run_fuzz(mount, os.fsencode(root), base, args, res)
    finally:
        if mount is not None:
            try:
                mount.close()
            except Exception as e:
                res.problems.append(f"unmount was not clean: {e}")
        if not args.keep and mount_free(base):
            # chattr +i/+a (op_ioctl) would keep rm from removing them
            subprocess.run(["chattr", "-R", "-f", "-ia", str(base)], capture_output=True,
                           check=False)
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    return res


def run_fuzz(mount: FuseTargetMount, root: bytes, base: Path, args: argparse.Namespace,
             res: Result) -> None:
    pid = mount.mount.pid
    assert pid is not None
    pool = Pool.build(root)
    stop, shrink = threading.Event(), threading.Event()
    workers = [Worker(i, pool, args.seed, stop, shrink) for i in range(args.threads)]
    dog = Watchdog(mount, str(mount.mount.mountpoint), args.hang)
    log(f"{res.target}: daemon pid {pid}, {args.threads} threads, {args.duration:.0f} s, "
        f"seed {args.seed}; fds {daemon_fds(pid)}, rss {daemon_rss(pid) / MiB:.1f} MiB")
    t0 = time.monotonic()
    last_progress = last_drop = last_disk = t0
    last_done = 0
    drops = shrinks = 0
    traceback_seen = 0
    kinds: Counter[str] = Counter()   # traceback signature -> count
    dog.start()
    for w in workers:
        w.start()
    try:
        while True:
            if dog.tripped.wait(0.25):
                break
            now = time.monotonic()
            if now - t0 >= args.duration:
                break
            if args.self_test and now - t0 >= 2.0:   # the watchdog must notice
                sig = signal.SIGSTOP if args.self_test == "stop" else signal.SIGKILL
                os.kill(pid, sig)
                args.self_test = None
            if args.drop_every and now - last_drop >= args.drop_every:
                drop_caches()
                drops += 1
                last_drop = now
            if now - last_disk >= 15.0:
                last_disk = now
                used = disk_used(base, Path(mount.mount.mountpoint))
                if used > args.max_disk and not shrink.is_set():
                    shrinks += 1
                    shrink.set()
                elif used < args.max_disk // 2:
                    shrink.clear()
            text = mount.mount.stderr_text()
            if text.count("Traceback") > traceback_seen:
                for sig, tb in tracebacks(text)[traceback_seen:]:
                    if sig not in kinds:
                        log(f"{res.target}: the daemon logged a traceback:\n{tb}")
                    kinds[sig] += 1
                    traceback_seen += 1
            if now - last_progress >= args.progress:
                done = sum(w.done for w in workers)
                errs: Counter[int] = Counter()
                for w in workers:
                    errs.update(w.errnos)
                top = ", ".join(f"{errno.errorcode.get(e, e)} {n}"
                                for e, n in errs.most_common(6))
                log(f"{res.target}: {now - t0:.0f} s, {done} ops "
                    f"({(done - last_done) / (now - last_progress):.0f} ops/s), fds "
                    f"{daemon_fds(pid)}, rss {daemon_rss(pid) / MiB:.1f} MiB, probe max "
                    f"{dog.max_latency:.2f} s, drops {drops}; errnos: {top}")
                last_progress, last_done = now, done
    finally:
        stop.set()
        dog.stop.set()
        if dog.tripped.is_set():
            # Dead or hung: take the mount away (our pid only) so blocked workers return.
            if mount.mount.pid is not None and not mount.mount._exited():
                try:
                    os.kill(mount.mount.pid, signal.SIGCONT)   # a stopped daemon cannot die
                except ProcessLookupError:
                    pass
            mount.mount.force_cleanup()
        for w in workers:
            w.join(30)
        dog.join(5)
    res.seconds = time.monotonic() - t0
    res.ops = sum(w.done for w in workers)
    ops: Counter[str] = Counter()
    errs: Counter[int] = Counter()
    pyerrs: Counter[str] = Counter()
    for w in workers:
        ops.update(w.ops)
        errs.update(w.errnos)
        pyerrs.update(w.pyerrs)
        if w.crash is not None:
            res.problems.append(f"{w.name} crashed: {w.crash!r}")
        if w.is_alive():
            res.problems.append(f"{w.name} still blocked after the run: {blocked_in(w)}")
    if any(w.is_alive() for w in workers) and not dog.verdict:
        log(f"{res.target}: workers still blocked while the daemon answers: daemon stacks:\n"
            f"{py_spy_dump(pid)}")
    if dog.verdict:
        res.problems.append(dog.verdict)
    elif mount.mount._exited():
        res.problems.append("daemon died at the end")
    for sig, n in kinds.most_common():
        log(f"{res.target}: internal error x{n}: {sig}")
    if traceback_seen:
        res.problems.append(f"the daemon logged {traceback_seen} traceback(s) "
                            f"(internal errors answered with EIO)")
    log(f"{res.target}: op mix: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    log(f"{res.target}: errnos: " + (", ".join(f"{errno.errorcode.get(e, e)} {n}"
                                               for e, n in errs.most_common()) or "none")
        + (f"; refused by Python: {dict(pyerrs)}" if pyerrs else ""))
    log(f"{res.target}: watchdog probes {dog.probes}, slowest answer {dog.max_latency:.2f} s, "
        f"drop_caches {drops}, disk shrinks {shrinks}; fds {daemon_fds(pid)}, "
        f"rss {daemon_rss(pid) / MiB:.1f} MiB at the end")


# --- main ----------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"fuzz: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> Parser:
    p = Parser(prog="fuzz.py", description="random-syscall fuzz with a watchdog (see the "
               "module docstring).")
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated FUSE targets, run one after the other "
                        f"(default {DEFAULT_TARGETS})")
    p.add_argument("--opts", help="extra -o options for the daemons")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of fuzzing per target (default 600)")
    p.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    p.add_argument("--hang", type=float, default=10.0,
                   help="seconds without an answer from the daemon that make a hang "
                        "(default 10)")
    p.add_argument("--drop-every", type=float, default=3.0,
                   help="seconds between drop_caches (default 3; 0: never)")
    p.add_argument("--progress", type=float, default=30.0,
                   help="seconds between progress lines (default 30)")
    p.add_argument("--max-disk", type=int, default=2 << 30,
                   help="bytes the backing tree may take before files are truncated "
                        "(default 2 GiB)")
    p.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    p.add_argument("--dir", help="base directory for the mounts (default: temp dirs)")
    p.add_argument("--keep", action="store_true", help="keep the mount bases afterwards")
    p.add_argument("--self-test", choices=("stop", "kill"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    try:
        if not names:
            raise UsageError("--targets names no target")
        for n in names:
            fuse_target(n, args.opts)
        if args.duration <= 0 or args.threads < 1 or args.hang <= 0 or args.progress <= 0:
            raise UsageError("--duration, --threads, --hang, --progress must be positive")
    except UsageError as e:
        print(f"fuzz: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.seed is None:
        args.seed = int(time.time() * 1000) % 1_000_000_007
    status = EXIT_OK
    for n in names:
        res = fuzz_target(n, args)
        rate = res.ops / res.seconds if res.seconds > 0 else 0.0
        if res.problems:
            for p in res.problems:
                log(f"FAIL {n}: {p}")
            setup = any(p.startswith(("unavailable", "cannot start")) for p in res.problems)
            status = max(status, EXIT_SETUP if setup and not res.ops else EXIT_FAIL)
        log(f"RESULT {n}: {'FAIL' if res.problems else 'OK'}: {res.ops} ops in "
            f"{res.seconds:.0f} s ({rate:.0f} ops/s), seed {args.seed}")
    return status


if __name__ == "__main__":
    sys.exit(main())
