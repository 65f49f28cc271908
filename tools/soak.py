"""soak: a leak detector. Mounts a target, runs a long mix of namespace, data and xattr
operations from several threads with periodic forget storms, and watches the daemon's fd
count and RSS; at the end both must be back where they belong.

    python tools/soak.py [--target passthru|overlay-lower|...] [--opts OPTS] [--ops N]
                         [--threads N] [--dirs N] [--names N] [--drop-every K]
                         [--progress SEC] [--settle SEC] [--seed N] [--dir DIR]
                         [--nofile N]

The target is mounted by this script through ``backingfs.testing`` (its own daemon only,
always unmounted in ``finally``). A tree of ``--dirs`` directories, each with part of its
``--names`` name pool filled, starts behind the mount (passthru's source, an overlay's lower
layer, so overlay changes copy up). Workers then pick random operations on random names of
that bounded pool (create, write, append, read, stat, readdir, rename across directories,
unlink, mkdir, rmdir, symlink, readlink, link, truncate, chmod/utime, xattrs, and files or
directories held open across other operations, unlinked under them included). Errnos such
as ENOENT or EEXIST are the normal outcome of a random namespace mix and are only counted.

Every ``--drop-every`` ops the main thread writes 2 to /proc/sys/vm/drop_caches: the kernel
drops its unused dentries and inodes and sends the daemon a storm of FORGETs, which must
evict our inodes and close their O_PATH fds, racing the workers' lookups.

Every ``--progress`` seconds a line gives ops done, ops/s, the daemon's fd count
(``/proc/PID/fd``), its RSS (``VmRSS``) and its inode/handle counts (SIGUSR1 statistics).

Verdict, after the workers stop and every file they held is closed:
- fd count: a final drop_caches (repeated for up to ``--settle`` seconds while FORGETs
  arrive) must bring it back to the baseline measured after the same drop before the first
  op. A cached inode is an fd, so a count above baseline is an inode or handle the daemon
  never let go (a lost FORGET, an unbalanced reference, a handle never released) or an fd
  dropped on the floor; the report names each extra fd and what it points to.
- RSS: at most ``--rss-tolerance`` (20%) above the *warm* value, sampled once
  ``--warm`` (10%) of the ops are done: by then every name of the pool has been used, so
  the tables and the allocator have reached their working size.
- the daemon is alive, still mounted, and logged no traceback; no op failed with an errno
  that means the daemon misbehaved (EIO, ENOTCONN, ESTALE, EBADF, ...).

``--nofile N`` lowers the daemon's fd limit once the baseline is taken: the daemon then runs
at its limit (the inode table has the kernel prune inodes), EMFILE is counted rather than
failed, and every error path that meets it must still give back what it opened.

Exit status: 0 clean, 1 a leak, a dead daemon or unexpected errnos, 2 usage error,
3 the target could not be set up.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backingfs.testing import (  # noqa: E402
    TARGETS,
    FuseTargetMount,
    Target,
    with_options,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
MiB = 1 << 20

#: Errnos a random namespace mix produces on any correct filesystem.
EXPECTED_ERRNOS = frozenset({
    errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
    errno.ENODATA, errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EINVAL, errno.ENOTSUP,
    errno.ELOOP, errno.EBUSY, errno.ETXTBSY, errno.EACCES,
})
#: ...and, under ``--nofile``, when what the kernel holds pinned needs more fds than that.
NO_FDS = frozenset({errno.EMFILE, errno.ENFILE})


# --- the daemon, seen from outside ---------------------------------------------------------


def daemon_fds(pid: int) -> int:
    """How many fds ``pid`` has open; -1 when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def daemon_fd_targets(pid: int) -> dict[int, str]:
    """What each of ``pid``'s fds refers to (readlink of /proc/PID/fd/N)."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def fd_diff(before: dict[int, str], after: dict[int, str]) -> str:
    """The fds in ``after`` that were not in ``before`` (same number and target)."""
    extra = [f"{n} -> {t}" for n, t in sorted(after.items()) if before.get(n) != t]
    gone = [f"{n} -> {t}" for n, t in sorted(before.items()) if after.get(n) != t]
    return (f"new: {', '.join(extra) or 'none'}; gone: {', '.join(gone) or 'none'}")


def daemon_rss(pid: int) -> int:
    """``pid``'s resident set in bytes (VmRSS); -1 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def drop_caches() -> bool:
    """Write 2 to drop_caches (unused dentries and inodes: FORGETs for every FUSE inode the
    kernel no longer needs). False if refused (not root)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError:
        return False
    return True


_STAT_FIELD = re.compile(r"'?(\w+)'?\s*[:=]\s*(\d+)")


def daemon_statistics(mount: FuseTargetMount, timeout: float = 5.0) -> dict[str, int]:
    """SIGUSR1, then the counters of the daemon's freshly logged ``statistics:`` line
    (first occurrence of each name: ``inodes``, ``handles``, ...); {} if none came."""
    marker = "statistics: "
    before = mount.mount.stderr_text().count(marker)
    try:
        os.kill(mount.mount.pid, signal.SIGUSR1)  # type: ignore[arg-type]
    except ProcessLookupError:
        return {}
    deadline = time.monotonic() + timeout
    while (text := mount.mount.stderr_text()).count(marker) <= before:
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.01)
    line = text.split(marker)[before + 1].splitlines()[0]
    out: dict[str, int] = {}
    for name, value in _STAT_FIELD.findall(line):
        out.setdefault(name, int(value))
    return out


def fuse_target(name: str, opts: str | None) -> Target:
    """The registered FUSE target ``name`` (with ``-o opts`` added); UsageError otherwise."""
    if name not in TARGETS:
        raise UsageError(f"unknown target {name} (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    try:
        probe = with_options(target, ())   # raises for targets that are not our daemons
    except ValueError:
        raise UsageError(f"{name} is not one of our FUSE daemons: nothing to watch") from None
    if opts:
        return with_options(probe, tuple(opts.split(",")))
    return target


class UsageError(Exception):
    pass


def mount_free(base: Path) -> bool:
    """Nothing is still mounted under ``base`` (never rmtree through a live mount)."""
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo") as f:
        return not any(line.split()[4].startswith(prefix) for line in f)


# --- the workload --------------------------------------------------------------------------


@dataclass
class Pool:
    """The bounded set of paths the workers operate on."""

    root: str
    dirs: list[str]
    names: list[str]      # d/nXX: files, dirs, symlinks come and go here
    nested: list[str]     # d/nXX/mY: exist only while d/nXX is a directory

    @classmethod
    def build(cls, root: str, ndirs: int, nnames: int) -> Pool:
        dirs = [f"{root}/d{i}" for i in range(ndirs)]
        names = [f"{d}/n{j:02d}" for d in dirs for j in range(nnames)]
        nested = [f"{n}/m{k}" for n in names for k in range(3)]
        return cls(root, dirs, names, nested)


def initial_tree(ndirs: int, nnames: int, seed: int) -> dict[str, bytes | None]:
    """Half of each directory's names as files (a few KiB), a few as directories."""
    rng = random.Random(f"soak-tree-{seed}")
    tree: dict[str, bytes | None] = {}
    for i in range(ndirs):
        tree[f"d{i}/"] = None
        for j in range(nnames):
            r = rng.random()
            if r < 0.5:
                tree[f"d{i}/n{j:02d}"] = rng.randbytes(rng.randrange(1, 8192))
            elif r < 0.6:
                tree[f"d{i}/n{j:02d}/"] = None
                tree[f"d{i}/n{j:02d}/m0"] = b"nested"
    return tree


class Worker(threading.Thread):
    """One client thread: random ops until its quota is done or ``stop`` is set."""

    MAX_HELD = 4

    def __init__(self, index: int, pool: Pool, quota: int, seed: int,
                 stop: threading.Event) -> None:
        super().__init__(name=f"soak-worker-{index}", daemon=True)
        self.pool = pool
        self.quota = quota
        self.rng = random.Random(f"soak-{seed}-{index}")
        self.stop = stop
        self.buf = memoryview(self.rng.randbytes(128 * 1024))
        self.done = 0
        self.ops: Counter[str] = Counter()
        self.errnos: Counter[tuple[str, int]] = Counter()
        self.crash: BaseException | None = None
        self.held: list[tuple[int, bool]] = []   # (fd, writable) held open across ops
        table = [(op, w) for op, w in OPS.items()]
        self.op_names = [op for op, _ in table]
        self.op_weights = [w for _, w in table]

    # -- picking

    def path(self) -> str:
        r = self.rng.random()
        if r < 0.12:
            return self.rng.choice(self.pool.nested)
        return self.rng.choice(self.pool.names)

    def data(self, n: int) -> memoryview:
        start = self.rng.randrange(len(self.buf) - n + 1)
        return self.buf[start:start + n]

    # -- running

    def run(self) -> None:
        try:
            choices = self.rng.choices
            names, weights = self.op_names, self.op_weights
            while self.done < self.quota and not self.stop.is_set():
                name = choices(names, weights)[0]
                try:
                    OPS_FN[name](self)
                except OSError as e:
                    self.errnos[(name, e.errno or 0)] += 1
                self.ops[name] += 1
                self.done += 1
        except BaseException as e:  # a bug in the tool: report it, never hang the run
            self.crash = e
        finally:
            self.release_all()

    def release_all(self) -> None:
        held, self.held = self.held, []
        for fd, _ in held:
            try:
                os.close(fd)
            except OSError as e:
                self.errnos[("close", e.errno or 0)] += 1


# Each op takes the worker and raises OSError on failure.


def op_create(w: Worker) -> None:
    fd = os.open(w.path(), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, w.data(w.rng.randrange(8192)))
    finally:
        os.close(fd)


def op_write(w: Worker) -> None:
    fd = os.open(w.path(), os.O_WRONLY)
    try:
        os.pwrite(fd, w.data(w.rng.randrange(1, 16384)), w.rng.randrange(65536))
    finally:
        os.close(fd)


def op_append(w: Worker) -> None:
    fd = os.open(w.path(), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, w.data(w.rng.randrange(1, 4096)))
    finally:
        os.close(fd)


def op_read(w: Worker) -> None:
    fd = os.open(w.path(), os.O_RDONLY)
    try:
        if w.rng.random() < 0.5:
            os.read(fd, 65536)
        else:
            os.pread(fd, 4096, w.rng.randrange(65536))
    finally:
        os.close(fd)


def op_stat(w: Worker) -> None:
    if w.rng.random() < 0.7:
        os.lstat(w.path())
    else:
        os.stat(w.path())   # follows symlinks within the pool


def op_readdir(w: Worker) -> None:
    r = w.rng.random()
    if r < 0.5:
        os.listdir(w.rng.choice(w.pool.dirs))
    elif r < 0.8:
        with os.scandir(w.rng.choice(w.pool.dirs)) as it:
            for entry in it:
                try:
                    entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    pass
    else:
        os.listdir(w.path())


def op_rename(w: Worker) -> None:
    os.rename(w.path(), w.path())


def op_unlink(w: Worker) -> None:
    os.unlink(w.path())


def op_mkdir(w: Worker) -> None:
    os.mkdir(w.path(), 0o755)


def op_rmdir(w: Worker) -> None:
    """Mostly an rm -r of one level: without emptying, directories would take over the
    pool (mkdir always works on a free name, rmdir rarely on a used one)."""
    path = w.path()
    if w.rng.random() < 0.7:
        for k in range(3):
            try:
                os.unlink(f"{path}/m{k}")
            except IsADirectoryError:
                os.rmdir(f"{path}/m{k}")
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
    os.rmdir(path)


def op_symlink(w: Worker) -> None:
    target = w.rng.choice(w.pool.names)
    rel = os.path.relpath(target, os.path.dirname(w.path()))
    os.symlink(rel, w.path())


def op_readlink(w: Worker) -> None:
    os.readlink(w.path())


def op_link(w: Worker) -> None:
    os.link(w.path(), w.path(), follow_symlinks=False)


def op_truncate(w: Worker) -> None:
    os.truncate(w.path(), w.rng.randrange(70000))


def op_setattr(w: Worker) -> None:
    if w.rng.random() < 0.5:
        os.chmod(w.path(), w.rng.choice((0o644, 0o600, 0o755)))
    else:
        t = w.rng.randrange(1 << 31) * 1_000_000_000
        os.utime(w.path(), ns=(t, t), follow_symlinks=False)


def op_xattr(w: Worker) -> None:
    path, r = w.path(), w.rng.random()
    name = f"user.soak{w.rng.randrange(4)}"
    if r < 0.4:
        os.setxattr(path, name, bytes(w.data(w.rng.randrange(1, 512))))
    elif r < 0.7:
        os.getxattr(path, name)
    elif r < 0.85:
        os.listxattr(path)
    else:
        os.removexattr(path, name)


def op_hold(w: Worker) -> None:
    """Open a file or directory and keep it across later ops (unlinks and renames of it
    included); at most MAX_HELD per worker, the oldest closed first."""
    if len(w.held) >= w.MAX_HELD:
        os.close(w.held.pop(0)[0])
    writable = w.rng.random() < 0.5
    w.held.append((os.open(w.path(), os.O_RDWR if writable else os.O_RDONLY), writable))


def op_use_held(w: Worker) -> None:
    """I/O or fstat on a held fd (its name may be gone by now)."""
    if not w.held:
        return
    fd, writable = w.rng.choice(w.held)
    r = w.rng.random()
    if r < 0.4:
        os.fstat(fd)
    elif r < 0.7 or not writable:
        os.pread(fd, 4096, 0)   # EISDIR for a held directory
    else:
        os.pwrite(fd, w.data(512), w.rng.randrange(16384))


OPS: dict[str, int] = {
    "create": 10, "write": 8, "append": 4, "read": 12, "stat": 14, "readdir": 5,
    "rename": 8, "unlink": 7, "mkdir": 4, "rmdir": 4, "symlink": 3, "readlink": 2,
    "link": 3, "truncate": 2, "setattr": 3, "xattr": 6, "hold": 2, "use_held": 3,
}

OPS_FN: dict[str, Callable[[Worker], None]] = {
    "create": op_create, "write": op_write, "append": op_append, "read": op_read,
    "stat": op_stat, "readdir": op_readdir, "rename": op_rename, "unlink": op_unlink,
    "mkdir": op_mkdir, "rmdir": op_rmdir, "symlink": op_symlink, "readlink": op_readlink,
    "link": op_link, "truncate": op_truncate, "setattr": op_setattr, "xattr": op_xattr,
    "hold": op_hold, "use_held": op_use_held,
}


# --- the run -------------------------------------------------------------------------------


@dataclass
class Figures:
    """What the run measured (printed at the end; the smoke test reads it)."""

    ops: int = 0
    seconds: float = 0.0
    fd_base: int = -1
    fd_peak: int = -1
    fd_end: int = -1
    rss_start: int = -1
    rss_warm: int = -1
    rss_peak: int = -1
    rss_end: int = -1
    drops: int = 0
    problems: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def mib(n: int) -> str:
    return f"{n / MiB:.1f}" if n >= 0 else "?"


class Soak:
    def __init__(self, args: argparse.Namespace, mount: FuseTargetMount, pool: Pool) -> None:
        self.args = args
        self.mount = mount
        self.pid: int = mount.mount.pid  # type: ignore[assignment]
        self.pool = pool
        self.fig = Figures()
        self.stop = threading.Event()
        self.can_drop = True
        self.base_fds: dict[int, str] = {}
        self.end_fds: dict[int, str] = {}

    def done(self, workers: list[Worker]) -> int:
        return sum(w.done for w in workers)

    def check_daemon(self) -> str | None:
        why = self.mount.check_alive()
        if why is None and daemon_fds(self.pid) < 0:
            why = f"daemon {self.pid} is gone"
        return why

    def forget_storm(self) -> None:
        if self.can_drop and not drop_caches():
            self.can_drop = False
            log("WARNING: drop_caches refused (not root?): no forget storms, and the final "
                "fd check only sees what the kernel forgets on its own")
        if self.can_drop:
            self.fig.drops += 1

    def settle_fds(self, want: int, seconds: float) -> int:
        """drop_caches until the fd count is at most ``want`` or ``seconds`` pass (FORGETs
        are asynchronous: the kernel queues them, the daemon serves them in batches)."""
        deadline = time.monotonic() + seconds
        while True:
            self.forget_storm()
            time.sleep(0.2)
            n = daemon_fds(self.pid)
            if n <= want or time.monotonic() > deadline:
                return n

    def progress(self, done: int, rate: float) -> None:
        fds, rss = daemon_fds(self.pid), daemon_rss(self.pid)
        self.fig.fd_peak = max(self.fig.fd_peak, fds)
        self.fig.rss_peak = max(self.fig.rss_peak, rss)
        stats = daemon_statistics(self.mount)
        extra = "".join(f" {k} {stats[k]}" for k in ("inodes", "stale", "handles")
                        if k in stats)
        log(f"{done}/{self.args.ops} ops  {rate:.0f} ops/s  fds {fds} (base "
            f"{self.fig.fd_base})  rss {mib(rss)} MiB  drops {self.fig.drops}{extra}")

    def run(self) -> int:
        args, fig = self.args, self.fig
        # One request served before the baseline: libfuse (session=pyfuse3) makes its
        # splice pipe, two fds it then keeps, at the first request after INIT.
        os.statvfs(self.mount.root)
        fig.rss_start = daemon_rss(self.pid)
        fig.fd_base = self.settle_fds(0, 1.0)   # whatever the daemon holds with nothing cached
        fig.fd_peak = fig.fd_base
        self.base_fds = daemon_fd_targets(self.pid)
        log(f"daemon pid {self.pid}: baseline fds {fig.fd_base}, rss {mib(fig.rss_start)} MiB")
        if args.nofile:
            # After the baseline: the daemon lives near its limit from here on, and every
            # error path that meets EMFILE must still give back what it opened.
            resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
            log(f"daemon fd limit {args.nofile}: EMFILE is counted, not a failure")
        quota = [args.ops // args.threads + (i < args.ops % args.threads)
                 for i in range(args.threads)]
        workers = [Worker(i, self.pool, quota[i], args.seed, self.stop)
                   for i in range(args.threads)]
        warm_at = max(1, int(args.ops * args.warm))
        next_drop = args.drop_every
        t0 = last_t = time.monotonic()
        last_done = last_change = 0
        last_change_t = t0
        died: str | None = None
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                time.sleep(0.05)
                now = time.monotonic()
                done = self.done(workers)
                if args.kill_at is not None and done >= args.kill_at:
                    args.kill_at = None   # self-test: the daemon dies under the workers
                    os.kill(self.pid, signal.SIGKILL)
                if args.drop_every and done >= next_drop:
                    self.forget_storm()
                    next_drop = done + args.drop_every
                if fig.rss_warm < 0 and done >= warm_at:
                    fig.rss_warm = daemon_rss(self.pid)
                    log(f"warm after {done} ops: rss {mib(fig.rss_warm)} MiB")
                if done != last_change:
                    last_change, last_change_t = done, now
                elif now - last_change_t > args.hang:
                    died = f"no op completed for {args.hang:.0f} s: daemon hung?"
                if now - last_t >= args.progress or died:
                    died = died or self.check_daemon()
                    if died:
                        break
                    self.progress(done, (done - last_done) / (now - last_t))
                    last_t, last_done = now, done
        finally:
            self.stop.set()
            if died:
                # Unblock workers stuck on a dead or hung mount before joining them.
                self.mount.mount.force_cleanup()
            for w in workers:
                w.join(30)
        fig.seconds = time.monotonic() - t0
        fig.ops = self.done(workers)
        return self.verdict(workers, died)

    def verdict(self, workers: list[Worker], died: str | None) -> int:
        args, fig = self.args, self.fig
        ops: Counter[str] = Counter()
        errs: Counter[tuple[str, int]] = Counter()
        for w in workers:
            ops.update(w.ops)
            errs.update(w.errnos)
            if w.crash is not None:
                fig.problems.append(f"{w.name} crashed: {w.crash!r}")
            if w.is_alive():
                fig.problems.append(f"{w.name} still blocked after the run")
        if died is None:
            died = self.check_daemon()
        if died is None:
            held = []
            if args.hold_open:  # self-test: a file left open looks like a leaked fd
                held.append(os.open(self.pool.dirs[0], os.O_RDONLY))
            try:
                fig.fd_end = self.settle_fds(fig.fd_base, args.settle)
            finally:
                for fd in held:
                    os.close(fd)
            self.end_fds = daemon_fd_targets(self.pid)
            fig.rss_end = daemon_rss(self.pid)
            stats = daemon_statistics(self.mount)
            log("after the final drop_caches: " + (", ".join(f"{k} {v}" for k, v in
                                                              stats.items()) or "no statistics"))
            died = self.check_daemon()
        if died:
            fig.problems.append(f"daemon died: {died}")
        else:
            if fig.fd_end > fig.fd_base:
                fig.problems.append(f"fd leak: {fig.fd_end} fds open at the end, baseline "
                                    f"{fig.fd_base} (after {args.settle:.0f} s of drop_caches)"
                                    f"; {fd_diff(self.base_fds, self.end_fds)}")
            warm = fig.rss_warm if fig.rss_warm > 0 else fig.rss_start
            if fig.rss_end > warm * (1 + args.rss_tolerance):
                fig.problems.append(f"RSS grew: {mib(fig.rss_end)} MiB at the end, warm "
                                    f"{mib(warm)} MiB (+{(fig.rss_end / warm - 1) * 100:.0f}%, "
                                    f"limit {args.rss_tolerance * 100:.0f}%)")
        expected = EXPECTED_ERRNOS | (NO_FDS if args.nofile else frozenset())
        unexpected = {k: v for k, v in errs.items() if k[1] not in expected}
        if unexpected:
            fig.problems.append("unexpected errnos: " + ", ".join(
                f"{op} {errno.errorcode.get(e, e)} x{n}" for (op, e), n in
                sorted(unexpected.items())))
        mix = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))
        log(f"op mix: {mix}")
        by_errno: Counter[int] = Counter()
        for (_, e), n in errs.items():
            by_errno[e] += n
        log("errnos: " + (", ".join(f"{errno.errorcode.get(e, e)} {n}"
                                    for e, n in by_errno.most_common()) or "none"))
        rate = fig.ops / fig.seconds if fig.seconds > 0 else 0.0
        warm_txt = mib(fig.rss_warm) if fig.rss_warm > 0 else "-"
        log(f"RESULT target {args.target}: {fig.ops} ops in {fig.seconds:.1f} s ({rate:.0f} "
            f"ops/s), {args.threads} threads, {fig.drops} drop_caches; fds base {fig.fd_base} "
            f"peak {fig.fd_peak} end {fig.fd_end}; rss start {mib(fig.rss_start)} warm "
            f"{warm_txt} peak {mib(fig.rss_peak)} end {mib(fig.rss_end)} MiB")
        if fig.problems:
            for p in fig.problems:
                log(f"FAIL: {p}")
            return EXIT_FAIL
        log("OK")
        return EXIT_OK


# --- main ----------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"soak: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> Parser:
    p = Parser(prog="soak.py", description="fd/RSS leak soak (see the module docstring).")
    p.add_argument("--target", default="passthru",
                   help="passthru, overlay-lower, overlay-upper, overlay-multi")
    p.add_argument("--opts", help="extra -o options for the daemon")
    p.add_argument("--ops", type=int, default=1_000_000, help="total ops (default 1000000)")
    p.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    p.add_argument("--dirs", type=int, default=8, help="top-level directories (default 8)")
    p.add_argument("--names", type=int, default=32, help="names per directory (default 32)")
    p.add_argument("--drop-every", type=int, default=20_000,
                   help="drop_caches every K ops (default 20000; 0: never)")
    p.add_argument("--progress", type=float, default=10.0,
                   help="seconds between progress lines (default 10)")
    p.add_argument("--warm", type=float, default=0.1,
                   help="fraction of ops after which RSS is 'warm' (default 0.1)")
    p.add_argument("--rss-tolerance", type=float, default=0.2,
                   help="allowed RSS growth over warm (default 0.2)")
    p.add_argument("--settle", type=float, default=30.0,
                   help="seconds of drop_caches allowed for fds to return (default 30)")
    p.add_argument("--hang", type=float, default=60.0,
                   help="no op completing for this long is a hang (default 60)")
    p.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    p.add_argument("--nofile", type=int, default=0,
                   help="lower the daemon's RLIMIT_NOFILE to this once it is up: error "
                        "paths under EMFILE, and the kernel pruning inodes (default: off)")
    p.add_argument("--dir", help="base directory for the mount (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the mount base afterwards")
    p.add_argument("--self-test-hold-open", dest="hold_open", action="store_true",
                   help=argparse.SUPPRESS)
    p.add_argument("--self-test-kill-at", dest="kill_at", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.ops < 1 or args.threads < 1 or args.dirs < 1 or args.names < 1:
            raise UsageError("--ops, --threads, --dirs, --names must be >= 1")
        if args.drop_every < 0 or args.progress <= 0 or not 0 < args.warm < 1:
            raise UsageError("--drop-every >= 0, --progress > 0, 0 < --warm < 1")
        target = fuse_target(args.target, args.opts)
    except UsageError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.seed is None:
        args.seed = int(time.time() * 1000) % 1_000_000_007
    why = target.unavailable()
    if why:
        log(f"target {args.target} unavailable: {why}")
        return EXIT_SETUP
    if args.dir:
        base = Path(args.dir).resolve() / f"soak-{args.target}-{args.seed}-{os.getpid()}"
        base.mkdir(parents=True)
    else:
        base = Path(tempfile.mkdtemp(prefix=f"soak-{args.target}-"))
    mount = None
    status = EXIT_SETUP
    try:
        try:
            started = target.start(base)
        except Exception as e:
            log(f"cannot start target {args.target}: {e}")
            return EXIT_SETUP
        assert isinstance(started, FuseTargetMount)
        mount = started
        root = mount.workdir("soak", initial_tree(args.dirs, args.names, args.seed))
        log(f"{args.target}{' -o ' + args.opts if args.opts else ''} at {mount.root}: "
            f"seed {args.seed}, {args.ops} ops, {args.threads} threads, "
            f"{args.dirs}x{args.names} names, drop_caches every {args.drop_every} ops")
        status = Soak(args, mount, Pool.build(str(root), args.dirs, args.names)).run()
    finally:
        if mount is not None:
            try:
                mount.close()
            except Exception as e:
                log(f"FAIL: unmount was not clean: {e}")
                status = status or EXIT_FAIL
        if not args.keep and mount_free(base):
            shutil.rmtree(base, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
