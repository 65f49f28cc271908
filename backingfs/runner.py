"""The mount lifecycle: checks, mount, daemonize once live, serve, signals, unmount.

``run()`` is what both CLIs end in. Order, and why:

1. Checks that can fail with a clear message happen first, in the caller's process: fd
   limit raised, mountpoint exists and is a directory, /dev/fuse opens. The filesystem
   object itself was built by the CLI before ``run`` (backing dirs opened), for the same
   reason. A user error is ``QuietError``: one line on stderr, no traceback.
2. Background mode forks *before* mounting, and the child mounts (``pyfuse3.init``), so the
   mount belongs to the process that serves it; the parent waits on a pipe for one status
   message and exits 0 only once the mount is live, or prints the child's error and exits
   1. Only then does the child detach (setsid, chdir /, stdio to /dev/null).
3. ``trio.run``: the signal task starts before the session loop (SIGTERM/SIGINT/SIGHUP ->
   ``pyfuse3.terminate()``, SIGUSR1 -> ``fs.statistics()`` logged at INFO). A signal that
   arrives between the mount and the loop is recorded and acted on when the loop starts,
   never lost (its default action would leave a dead mount behind).
   The queued backing I/O backend is chosen first: an io_uring (uring.py) when
   ``Uring.probe()`` allows and BACKINGFS_IO is not "threads", its reaper task in an outer
   nursery that outlives ``fs.destroy()``; else worker threads. Logged once at INFO.
4. ``pyfuse3.main`` returns on ``fusermount3 -u`` (the kernel ends the session) or after
   ``terminate()``. Then ``fs.destroy()`` runs shielded, then ``pyfuse3.close(unmount=True)``.

Exit codes: 0 clean unmount, 1 mount or runtime error, 2 usage error.

The runner never imports pyfuse3: it drives a ``bridge.Pyfuse3Session`` (mount, serve,
terminate, unmount), so another front-end can slot in behind the same four calls.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import logging.handlers
import os
import resource
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Iterable

import trio

from . import uring
from .bridge import Pyfuse3Session
from .fsapi import Filesystem
from .native import PASSTHROUGH_MODES, URING_MODES, NativeSession
from .options import FRONTEND_OPTIONS, UsageError, escape_fuse_option, parse_option

log = logging.getLogger(__name__)

#: pyfuse3 session tasks: each reads and serves one request at a time, and a new one is
#: started only when none is waiting on /dev/fuse, so this is the bound on requests in
#: flight (measured: 80 concurrent preads peak at exactly MAX_TASKS). Idle tasks beyond
#: MIN_TASKS exit.
MAX_TASKS = 64
MIN_TASKS = 1
#: Kernel-side cap on background requests (readahead, async direct I/O): pyfuse3 sends
#: max_background=0 in INIT, which keeps the kernel's default of 12, too few for a queue
#: depth of 16. Raised through fusectl when /sys/fs/fuse/connections is mounted.
MAX_BACKGROUND = 64

#: Environment switch for the queued backing I/O: "threads" forces the worker threads
#: (comparison, escape hatch); otherwise io_uring when ``Uring.probe()`` allows it.
IO_ENV = "BACKINGFS_IO"
#: Ring size: more than MAX_TASKS requests, each of which has at most one op in flight.
URING_ENTRIES = 256
#: Longest wait at the session's end for what is still on the ring (_drain).
DRAIN_SECONDS = 5.0

#: ``-o session=``: the front-end. pyfuse3 (libfuse 3.14) or the native /dev/fuse session.
SESSIONS = ("pyfuse3", "native")
DEFAULT_SESSION = "native"

Session = Pyfuse3Session | NativeSession

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_SIGNALS = (*_STOP_SIGNALS, signal.SIGUSR1)

_OK = b"\x00"
_FAIL = b"\x01"


class QuietError(Exception):
    """A user-facing failure: printed as ``prog: msg`` on one line, exit ``exitcode``."""

    def __init__(self, msg: str, exitcode: int = 1) -> None:
        super().__init__(msg)
        self.msg = msg
        self.exitcode = exitcode


def cli_main(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body, turning UsageError/QuietError into one stderr line and an exit code."""
    try:
        return body()
    except (UsageError, QuietError) as e:
        print(f"{prog}: {e.msg}", file=sys.stderr)
        return e.exitcode


def run(fs: Filesystem, mountpoint: str, fuse_options: Iterable[str], *, foreground: bool,
        debug: bool, fsname: str) -> int:
    """Mount ``fs`` on ``mountpoint`` and serve it until unmounted; returns the exit code.

    ``fuse_options`` are libfuse options (``options.split_fuse_options``), passed as given
    (pyfuse3's ``default_options`` are not added: the filesystem decides on
    default_permissions). ``fsname`` is used unless the options carry one. Raises
    QuietError for errors found before mounting. In background mode the parent returns 0
    once the mount is live; the daemon never returns from here (it ``_exit``s).
    """
    frontend, fuse_options = frontend_choice(fuse_options)
    setup_logging(debug)
    raise_nofile_limit()
    mountpoint = os.path.abspath(mountpoint)
    check_mountpoint(mountpoint)
    check_dev_fuse()
    opts = set(fuse_options)
    if not any(parse_option(o)[0] == "fsname" for o in fuse_options):
        opts.add(f"fsname={fsname}")

    def make_session() -> tuple[Session, set[str]]:
        if frontend["session"] == "native":
            return NativeSession(fs, passthrough=frontend["passthrough"],
                                 uring=frontend["uring"]), opts
        # libfuse splits its -o string on commas again: escape ours.
        return Pyfuse3Session(fs), {escape_fuse_option(o) for o in opts}

    if foreground:
        _install_early_signal_handlers()
        return _serve(make_session, mountpoint, on_live=None)
    return _daemonize(lambda on_live: _serve(make_session, mountpoint, on_live))


def frontend_choice(fuse_options: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Take ``session=``, ``passthrough=`` and ``uring=`` out of the options; UsageError
    when bad.

    The defaults come from BACKINGFS_SESSION, BACKINGFS_PASSTHROUGH and BACKINGFS_URING
    when set (tests run the battery and the overlay suite on every front-end that way),
    else DEFAULT_SESSION and ``auto``. ``uring=on`` given with the pyfuse3 session is an
    error; as a default (BACKINGFS_URING) it yields to ``session=pyfuse3``."""
    choice = {"session": os.environ.get("BACKINGFS_SESSION", "").strip() or DEFAULT_SESSION,
              "passthrough": os.environ.get("BACKINGFS_PASSTHROUGH", "").strip() or "auto",
              "uring": os.environ.get("BACKINGFS_URING", "").strip() or "auto"}
    rest = []
    given = set()
    for tok in fuse_options:
        key, value = parse_option(tok)
        if key in FRONTEND_OPTIONS:
            if value is None:
                raise UsageError(f"option {key} needs a value")
            choice[key] = value
            given.add(key)
        else:
            rest.append(tok)
    if choice["session"] not in SESSIONS:
        raise UsageError(f"session={choice['session']}: expected one of {', '.join(SESSIONS)}")
    if choice["passthrough"] not in PASSTHROUGH_MODES:
        raise UsageError(f"passthrough={choice['passthrough']}: expected one of "
                         f"{', '.join(PASSTHROUGH_MODES)}")
    if choice["uring"] not in URING_MODES:
        raise UsageError(f"uring={choice['uring']}: expected one of {', '.join(URING_MODES)}")
    if choice["uring"] == "on" and choice["session"] != "native":
        if "uring" in given:
            raise UsageError("uring=on needs session=native (libfuse 3.14 has no io_uring)")
        choice["uring"] = "off"  # BACKINGFS_URING=on is a default, session=pyfuse3 a choice
    return choice, rest


# --- checks ------------------------------------------------------------------------------

def setup_logging(debug: bool) -> None:
    """Log to stderr; DEBUG (every request, via the bridge) with -d, else INFO."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d [%(process)d] %(name)s %(levelname)s: %(message)s",
        "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


#: The most fds the daemon asks for. systemd hosts set nr_open to 2**30: a limit that high
#: only lets a runaway fd table eat the machine's memory; four million inodes is plenty.
NOFILE_CAP = 1 << 22


def raise_nofile_limit() -> None:
    """RLIMIT_NOFILE up to the kernel's ``nr_open`` (at most NOFILE_CAP): a stacked fs
    holds an fd per open file and per inode the kernel caches, so an ``ls -l`` of a
    directory bigger than the limit would fail with EMFILE. The soft limit goes up to the
    hard one; with CAP_SYS_RESOURCE (root) the hard one goes up first (a container's
    20,000 or systemd's 524,288 are far below what a big tree needs; past the limit the
    inode table has the kernel prune inodes, see inodes.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = min(int(f.read()), NOFILE_CAP)
    except (OSError, ValueError):
        ceiling = 1 << 20
    if hard != resource.RLIM_INFINITY and hard < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return
        except (OSError, ValueError):
            pass  # no CAP_SYS_RESOURCE: the hard limit is what we get
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise RLIMIT_NOFILE to %d: %s", target, e)


def check_mountpoint(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QuietError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise QuietError(f"mountpoint {path} is a dead FUSE mount; "
                             f"run 'fusermount3 -u {path}' first") from None
        raise QuietError(f"cannot access mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuietError(f"mountpoint {path} is not a directory")


def check_dev_fuse() -> None:
    """/dev/fuse must open for root (mount(2) uses it). A user mounts through the setuid
    fusermount3, which opens the device itself: the device need only exist (it is 0600 on
    some systems) and fusermount3 be on PATH."""
    if os.geteuid() != 0:
        if not os.path.exists("/dev/fuse"):
            raise QuietError("/dev/fuse does not exist (is the fuse module loaded?)")
        if shutil.which("fusermount3") is None:
            raise QuietError("fusermount3 not found on PATH (install fuse3)")
        return
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise QuietError(f"cannot open /dev/fuse: {e.strerror} "
                         "(is the fuse module loaded and the device accessible?)") from None
    os.close(fd)


# --- background mode ---------------------------------------------------------------------

def _daemonize(serve: Callable[[Callable[[], None] | None], int]) -> int:
    """Fork; the child runs ``serve(on_live)``. The parent returns 0 once the child calls
    ``on_live`` (the mount is live) or raises QuietError with the child's message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return _wait_for_child(r, pid)

    # Child. Never returns into the caller: the parent already speaks for the CLI.
    os.close(r)
    live = False
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _install_early_signal_handlers()

        def on_live() -> None:
            nonlocal live
            _detach_stdio()
            os.write(w, _OK)
            os.close(w)
            live = True

        code = serve(on_live)
    except QuietError as e:
        code = e.exitcode
        if not live:
            _report_failure(w, e.msg)
    except BaseException as e:  # a bug: tell the parent rather than vanish
        if not live:
            _report_failure(w, f"daemon failed: {e!r}")
        else:
            log.exception("daemon failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _report_failure(w: int, msg: str) -> None:
    with contextlib.suppress(OSError):
        os.write(w, _FAIL + msg.encode(errors="replace"))
        os.close(w)


def _wait_for_child(r: int, pid: int) -> int:
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    status = b"".join(chunks)
    if status == _OK:
        return 0
    # The child failed: reap it so no zombie outlives the CLI.
    _, wstatus = os.waitpid(pid, 0)
    if status.startswith(_FAIL):
        raise QuietError(status[1:].decode(errors="replace"), 1)
    raise QuietError(f"daemon exited before the mount was live "
                     f"(wait status {wstatus:#x})", 1)


def _detach_stdio() -> None:
    """stdin/stdout/stderr to /dev/null: writes to them (logging) must keep working.
    WARNING and above also go to syslog when there is one."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)
    if os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            return
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("backingfs[%(process)d]: %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)


# --- serving -----------------------------------------------------------------------------

_early_signals: list[int] = []


def _install_early_signal_handlers() -> None:
    """Record signals arriving before the trio loop listens (see module docstring, 3.)."""
    for sig in _SIGNALS:
        signal.signal(sig, lambda signum, frame: _early_signals.append(signum))


def _serve(make_session: Callable[[], tuple[Session, set[str]]], mountpoint: str,
           on_live: Callable[[], None] | None) -> int:
    session, options = make_session()
    fs = session.fs
    log.debug("mounting on %s with options %s", mountpoint, sorted(options))
    try:
        session.mount(mountpoint, options)
    except OSError as e:
        raise QuietError(f"cannot mount on {mountpoint}: {e.strerror}") from None
    code = 1
    try:
        if on_live is not None:
            on_live()
        code = trio.run(_session, fs, session, mountpoint)
    finally:
        try:
            session.unmount()
        except Exception:
            log.exception("unmount failed")
            code = 1
    log.info("unmounted %s", mountpoint)
    return code


async def _session(fs: Filesystem, session: Session, mountpoint: str) -> int:
    # The ring's reaper lives in an outer nursery: it must outlast fs.destroy(), which
    # waits for every queued request, ring ones included, to complete. The ring is closed
    # only after the reaper has stopped waiting on its eventfd.
    ring: uring.Uring | None = None
    code = 1
    try:
        async with trio.open_nursery() as backend:
            ring = await _start_io_backend(backend)
            try:
                code = await _serve_session(fs, session, mountpoint)
            finally:
                uring.ACTIVE = None
                if ring is not None:
                    await _drain(ring)
                backend.cancel_scope.cancel()
    finally:
        if ring is not None:
            if ring.pending:  # destroy() failed to drain: leave the ring, never unmap
                log.error("io_uring still has %d requests after destroy", ring.pending)
            else:
                log.info("backing I/O: io_uring completed %d requests", ring.completed)
                ring.close()
    return code


async def _drain(ring: uring.Uring) -> None:
    """Let the reaper finish what is still on the ring after destroy(): the fd closes of
    the inodes it evicted (closing.py). Shielded: this runs on the way out, cancelled or
    not; bounded, since a ring left with pending requests is never unmapped anyway."""
    with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_SECONDS):
        while ring.pending:
            ring.flush()
            await trio.sleep(0.001)


async def _start_io_backend(nursery: trio.Nursery) -> uring.Uring | None:
    """An io_uring for the queued backing I/O when usable, unless BACKINGFS_IO=threads."""
    choice = os.environ.get(IO_ENV, "").strip().lower()
    reason = "BACKINGFS_IO=threads" if choice == "threads" else uring.Uring.probe()
    ring = None
    if reason is None:
        try:
            ring = uring.Uring(URING_ENTRIES)
        except OSError as e:
            reason = str(e)
    if ring is None:
        log.info("backing I/O: threads (%s)", reason)
        return None
    await nursery.start(ring.run)
    uring.ACTIVE = ring
    log.info("backing I/O: io_uring")
    return ring


async def _serve_session(fs: Filesystem, session: Session, mountpoint: str) -> int:
    code = 0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_handle_signals, fs, session)
            if isinstance(session, Pyfuse3Session):  # the native INIT sets these itself
                session.init_hooks.append(
                    lambda: nursery.start_soon(_tune_connection, mountpoint))
            else:
                session.init_hooks.append(
                    lambda: nursery.start_soon(_tune_readahead, mountpoint))
            log.info("serving %s", mountpoint)
            try:
                await session.serve(MIN_TASKS, MAX_TASKS)
                if getattr(session, "failed", None):
                    code = 1
            except Exception:
                log.exception("FUSE session loop failed")
                code = 1
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            try:
                await fs.destroy()
            except Exception:
                log.exception("filesystem destroy() failed")
                code = 1
    return code


async def _handle_signals(fs: Filesystem, session: Session, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        task_status.started()
        while _early_signals:
            _on_signal(fs, session, _early_signals.pop(0))
        async for signum in signals:
            _on_signal(fs, session, signum)


def _on_signal(fs: Filesystem, session: Session, signum: int) -> None:
    if signum == signal.SIGUSR1:
        try:
            log.info("statistics: %s", fs.statistics())
            if isinstance(session, NativeSession):
                log.info("session: %s", json.dumps(session.statistics()))
        except Exception:
            log.exception("statistics() failed")
        return
    log.info("%s received: unmounting", signal.Signals(signum).name)
    session.terminate()


async def _tune_connection(mountpoint: str) -> None:
    """Raise the kernel's max_background for this connection, best effort: needs fusectl
    mounted on /sys/fs/fuse/connections. Runs after the INIT reply, which would reset it."""
    conn = _connection_id(mountpoint)
    if conn is None:
        return
    base = f"/sys/fs/fuse/connections/{conn}"
    for name, value in (("max_background", MAX_BACKGROUND),
                        ("congestion_threshold", MAX_BACKGROUND * 3 // 4)):
        try:
            with open(f"{base}/{name}", "w") as f:
                f.write(str(value))
        except OSError as e:
            log.debug("cannot set %s/%s: %s", base, name, e)
            return


#: Readahead of a native-session mount: one READ of max_pages (1 MiB) instead of the
#: default 128 KiB, so a sequential read through the daemon costs an eighth of the round
#: trips. The kernel only lowers it at INIT, so it is raised after the INIT reply.
READAHEAD_KB = 1024


async def _tune_readahead(mountpoint: str) -> None:
    """Best effort (root, sysfs): /sys/class/bdi/MAJOR:MINOR/read_ahead_kb of our mount."""
    conn = _connection_id(mountpoint)
    if conn is None:
        return
    path = f"/sys/class/bdi/{conn >> 20}:{conn & 0xFFFFF}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("cannot set %s: %s", path, e)


def _connection_id(mountpoint: str) -> int | None:
    # From mountinfo, not stat(): a stat of our own mount would wait on ourselves.
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in reversed(lines):  # the newest mount on a path is listed last
        fields = line.split()
        if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
            major, minor = (int(x) for x in fields[2].split(":"))
            return (major << 20) | minor
    return None


def _unescape_mountinfo(s: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(code, ch)
    return s
