"""Mount launchers shared by tests/ and tools/: start a CLI, wait for its mount, tear down.

The CLIs run as ``[sys.executable, "-m", "passthru", ...]`` (``cli_argv``), with the
repository root on PYTHONPATH, so tests work without the console scripts on PATH and
always exercise this checkout.

``Mount`` has the two exits of trio's graceful/forceful close:
- ``unmount_clean()``: ``fusermount3 -u``, then the daemon must exit with status 0;
- ``force_cleanup()``: always safe, idempotent; lazy unmount, then SIGTERM and SIGKILL of
  *only* the daemon pid this Mount knows (never a process found by name).
A fixture calls ``unmount_clean()`` on success and ``force_cleanup()`` in ``finally``.

``Target`` / ``TargetMount`` / ``TARGETS`` name the kinds of stacked directory the behaviour
battery and the benchmarks run on (native, passthru, kernel-overlay, ...): ``start(base)``
builds one, ``.root`` is where to work, ``close()`` tears it down.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import fuse_uring

#: The directory holding the backingfs/, passthru/ and overlay/ packages.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def cli_argv(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    if extra:
        env.update(extra)
    return env


def drop_cache(path: str | os.PathLike[str]) -> None:
    """Make one file cold: written back, then its clean pages dropped from the page cache.
    For a file on a FUSE mount that is the mounted inode's own cache, which a global
    drop_caches may keep while the file is open elsewhere."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _unescape_mountinfo(s: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(code, ch)
    return s


def mount_fstype(mountpoint: str) -> str | None:
    """The fstype of the topmost mount on ``mountpoint`` (from /proc/self/mountinfo), or
    None. Touches neither the mountpoint nor anything under it, so a hung daemon cannot
    hang the caller: only the parent is resolved (realpath would lstat the mountpoint)."""
    head, tail = os.path.split(os.path.abspath(mountpoint))
    path = os.path.join(os.path.realpath(head), tail)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == path:
                found = post.split()[0]
    return found


def is_fuse_mounted(mountpoint: str) -> bool:
    fstype = mount_fstype(mountpoint)
    return fstype is not None and fstype.startswith("fuse")


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as exited: init may not reap it promptly)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


class Mount:
    """One mounted daemon. ``process`` is set when we started it (our child), else only
    ``pid`` is known (a background daemon found afterwards)."""

    def __init__(self, mountpoint: str, pid: int | None,
                 process: subprocess.Popen[bytes] | None = None,
                 stderr_path: str | None = None) -> None:
        self.mountpoint = os.path.realpath(mountpoint)
        self.pid = pid
        self.process = process
        self.stderr_path = stderr_path

    def stderr_text(self) -> str:
        if self.stderr_path is None:
            return ""
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""

    def session_statistics(self, timeout: float = 10.0) -> dict[str, Any]:
        """SIGUSR1 the daemon and return the native session's statistics it logs (requests
        by opcode, passthrough table): the newest ``session: {json}`` line of its stderr."""
        assert self.pid is not None
        before = self.stderr_text().count("session: ")
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr_text()
            if text.count("session: ") > before:
                line = text[text.rindex("session: "):].partition("\n")[0]
                return dict(json.loads(line[len("session: "):]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no session statistics from {self.pid}:\n{text}")
            time.sleep(0.02)

    def _exited(self) -> bool:
        if self.process is not None:
            return self.process.poll() is not None
        return self.pid is None or not _pid_alive(self.pid)

    def wait_live(self, timeout: float = 10.0) -> None:
        """Poll mountinfo until the mountpoint carries a fuse* mount. Fails fast (with the
        daemon's stderr) if the daemon exits first."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not is_fuse_mounted(self.mountpoint):
            if self._exited():
                raise RuntimeError(f"daemon exited before mounting {self.mountpoint}:\n"
                                   f"{self.stderr_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mountpoint} not mounted after {timeout}s:\n"
                                   f"{self.stderr_text()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Wait for the daemon to end; its exit status when it is our child, else None."""
        if self.process is not None:
            return self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while self.pid is not None and _pid_alive(self.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon {self.pid} still running after {timeout}s")
            time.sleep(0.01)
        return None

    def unmount_clean(self, timeout: float = 10.0) -> None:
        """``fusermount3 -u``; the daemon must then exit (with status 0 if our child)."""
        subprocess.run(["fusermount3", "-u", self.mountpoint], check=True,
                       capture_output=True)
        status = self.wait_exit(timeout)
        assert status in (0, None), (
            f"daemon exited with status {status}:\n{self.stderr_text()}")
        assert not is_fuse_mounted(self.mountpoint), f"{self.mountpoint} still mounted"

    def force_cleanup(self) -> None:
        """Lazy unmount if still mounted, then SIGTERM, then SIGKILL of our pid only."""
        if is_fuse_mounted(self.mountpoint):
            r = subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                               capture_output=True)
            if r.returncode != 0 and is_fuse_mounted(self.mountpoint):
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        if self.pid is None or self._exited():
            if self.process is not None:
                self.process.wait()
            return
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.wait_exit(grace)
                break
            except (TimeoutError, subprocess.TimeoutExpired):
                continue


def start_daemon(argv: list[str], mountpoint: str, *, stderr_path: str | None = None,
                 env: dict[str, str] | None = None) -> Mount:
    """Start ``argv`` (e.g. ``cli_argv("passthru", src, mnt)``) in the foreground as our
    child, so ``Mount.pid`` is the daemon's. ``-f`` is added unless present. stderr goes to
    ``stderr_path`` (a temp file by default) for diagnostics. Does not wait: call
    ``wait_live``."""
    argv = list(argv)
    if "-f" not in argv:
        argv.insert(argv.index("--") if "--" in argv else len(argv), "-f")
    if stderr_path is None:
        fd, stderr_path = tempfile.mkstemp(prefix="backingfs-daemon-", suffix=".stderr")
        os.close(fd)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=cli_env(env), cwd=REPO_ROOT)
    return Mount(mountpoint, proc.pid, proc, stderr_path)


def find_daemon_pid(marker: str) -> int | None:
    """The pid of a process whose command line contains ``marker`` (a unique mountpoint
    path), other than ours: how a test finds a background daemon it must clean up."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in arg for arg in cmdline) and _pid_alive(int(entry)):
            return int(entry)
    return None


# --- Targets: what the behaviour battery (tests/behaviour) and the benchmarks run on ------
#
# A *target* is one way of presenting a directory: a plain directory, passthru over a source,
# kernel overlayfs, ... ``Target.start(base)`` builds it under ``base`` and returns a
# ``TargetMount`` whose ``root`` is the stacked directory tests work in. A new target is a
# subclass naming itself, saying why it cannot run here (``unavailable``), and building its
# mount; ``register`` adds it to ``TARGETS``.


class TargetMount:
    """A started target. ``root`` is where tests work; ``data`` is the directory holding the
    same tree *behind* the mount (passthru's source, an overlay's lower layer), or None when a
    tree must be written through ``root``; ``upper`` is the directory behind the mount where
    what is made through it lands (passthru's source, an overlay's upperdir), or None when
    that is ``root`` itself. ``close()`` is always safe and idempotent."""

    def __init__(self, root: Path, data: Path | None = None, upper: Path | None = None) -> None:
        self.root = root
        self.data = data
        self.upper = upper

    def workdir(self, name: str, tree: dict[str, bytes | None] | None = None) -> Path:
        """A fresh directory ``name`` for one test, holding ``tree`` (``{"d/": None,
        "d/f": b"data"}``; a key ending in ``/`` is a directory), written behind the mount
        when the target has ``data`` so the test meets it as pre-existing."""
        base = self.data if self.data is not None else self.root
        top = base / name
        top.mkdir()
        for rel, content in sorted((tree or {}).items()):
            path = top / rel
            if rel.endswith("/"):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content or b"")
        return self.root / name

    def check_alive(self) -> str | None:
        """None while the target still serves ``root``, else why not (a dead daemon)."""
        return None

    def close(self) -> None:
        """Unmount and stop what ``start`` started; raises if that was not clean, but leaves
        nothing mounted or running either way."""


class Target:
    """One kind of stacked directory. ``per_test`` asks for a new mount for every test
    (for targets whose backing tree may not change under a live mount)."""

    name: str = ""
    per_test: bool = False

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine, or None."""
        return None

    def start(self, base: Path) -> TargetMount:
        """Build the target under the existing, empty directory ``base``."""
        raise NotImplementedError


#: Every known target by name, in the order the battery runs them.
TARGETS: dict[str, Target] = {}


def with_options(target: Target, options: tuple[str, ...]) -> Target:
    """A copy of ``target`` that adds ``options`` to its daemon's ``-o`` (FUSE targets)."""
    if isinstance(target, PassthruTarget):
        return PassthruTarget(target.options + options, target.name)
    if isinstance(target, OverlayTarget):
        return OverlayTarget(target.name, target.where, target.options + options)
    raise ValueError(f"target {target.name} takes no -o options")


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


class NativeTarget(Target):
    """A plain directory: the reference every other target is measured against."""

    name = "native"

    def start(self, base: Path) -> TargetMount:
        root = base / "root"
        root.mkdir(mode=0o755)
        return TargetMount(root)


class FuseTargetMount(TargetMount):
    """A target served by one of our daemons (a ``Mount`` we started)."""

    def __init__(self, root: Path, data: Path | None, mount: Mount,
                 upper: Path | None = None) -> None:
        super().__init__(root, data, upper)
        self.mount = mount
        self.stderr_seen = 0

    def check_alive(self) -> str | None:
        """Also a failure: a traceback logged since the last check (an internal error the
        daemon survived by answering EIO)."""
        text = self.mount.stderr_text()
        new, self.stderr_seen = text[self.stderr_seen:], len(text)
        if self.mount._exited() or not is_fuse_mounted(self.mount.mountpoint):
            return f"daemon {self.mount.pid} died or unmounted {self.mount.mountpoint}:\n{text}"
        if "Traceback" in new:
            return f"daemon {self.mount.pid} logged a traceback:\n{new}"
        return None

    def close(self) -> None:
        try:
            if not self.mount._exited():
                self.mount.unmount_clean()
        finally:
            self.mount.force_cleanup()


def start_fuse_target(argv: list[str], mountpoint: Path, root: Path | None = None,
                      data: Path | None = None, timeout: float = 10.0,
                      upper: Path | None = None, uring: bool = False) -> FuseTargetMount:
    """Start a daemon from ``argv`` and wait for its mount; on failure nothing is left.
    ``uring``: the kernel offers FUSE over io_uring to this mount (the fuse module's
    switch is on until its INIT is answered, then back as it was)."""
    with fuse_uring.kernel_offers_uring() if uring else contextlib.nullcontext():
        mount = start_daemon(argv, str(mountpoint))
        try:
            mount.wait_live(timeout)
            if uring:
                os.stat(mountpoint)  # answered once INIT is
        except BaseException:
            mount.force_cleanup()
            raise
    return FuseTargetMount(root or mountpoint, data, mount, upper)


def _uring_unavailable(options: tuple[str, ...]) -> str | None:
    return fuse_uring.unavailable() if URING_ON in options else None


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 on PATH"
    return None


class PassthruTarget(Target):
    """passthru over ``base/source``, mounted through its real CLI; ``options`` are added
    to its ``-o`` (e.g. ``("cache=always", "writeback")``)."""

    def __init__(self, options: tuple[str, ...] = (), name: str = "passthru") -> None:
        self.options = options
        self.name = name

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("passthru.cli") is None:
            return "passthru is not written yet (no passthru.cli module for python -m passthru)"
        return fuse_unavailable() or _uring_unavailable(self.options)

    def start(self, base: Path) -> TargetMount:
        source, mnt = base / "source", base / "mnt"
        source.mkdir(mode=0o755)
        mnt.mkdir()
        opts = ",".join(("allow_other", *self.options))
        return start_fuse_target(cli_argv("passthru", "-f", "-o", opts, str(source), str(mnt)),
                                 mnt, data=source, upper=source,
                                 uring=URING_ON in self.options)


class KernelOverlayTarget(Target):
    """Kernel overlayfs (one lower, one upper) with the tree written through the mount:
    the oracle the overlay targets are compared with."""

    name = "kernel-overlay"

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "mounting kernel overlayfs needs root"
        return None

    def start(self, base: Path) -> TargetMount:
        dirs = {n: base / n for n in ("lower", "upper", "work", "mnt")}
        for d in dirs.values():
            d.mkdir(mode=0o755)
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["mnt"])],
                       check=True, capture_output=True)
        return KernelMount(dirs["mnt"], upper=dirs["upper"])


class KernelMount(TargetMount):
    """A mount made with mount(8): no daemon; unmount, then lazily if busy."""

    def check_alive(self) -> str | None:
        if mount_fstype(str(self.root)) is None:
            return f"{self.root} is no longer mounted"
        return None

    def close(self) -> None:
        if mount_fstype(str(self.root)) is None:
            return
        r = subprocess.run(["umount", str(self.root)], capture_output=True)
        if r.returncode != 0 and mount_fstype(str(self.root)) is not None:
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
            raise RuntimeError(f"umount {self.root} failed (lazily unmounted): "
                               f"{r.stderr.decode(errors='replace').strip()}")


class OverlayTarget(Target):
    """Our overlay through its real CLI. ``where`` says which layer holds the tree the tests
    meet as pre-existing: ``lower`` (every change copies up), ``upper`` (written through the
    mount), or ``multi`` (two lowers and an upper, the tree in the bottom lower)."""

    def __init__(self, name: str, where: str, options: tuple[str, ...] = ()) -> None:
        self.name = name
        self.where = where
        self.options = options  # added to -o, e.g. ("writeback=1",)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("overlay.cli") is None:
            return "overlay is not written yet (no overlay.cli module for python -m overlay)"
        return fuse_unavailable() or _uring_unavailable(self.options)

    def start(self, base: Path) -> TargetMount:
        names = ("lower", "lower2", "upper", "work", "mnt")
        d = {n: base / n for n in names}
        for p in d.values():
            p.mkdir(mode=0o755)
        lowers = f"{d['lower2']}:{d['lower']}" if self.where == "multi" else str(d["lower"])
        opts = ",".join((f"lowerdir={lowers},upperdir={d['upper']},workdir={d['work']}",
                         *self.options))
        data = None if self.where == "upper" else d["lower"]
        return start_fuse_target(cli_argv("overlay", "-f", "-o", opts, str(d["mnt"])),
                                 d["mnt"], data=data, upper=d["upper"],
                                 uring=URING_ON in self.options)


#: The front-end variants the battery also runs (the plain names use the default session,
#: runner.DEFAULT_SESSION, with kernel passthrough where the kernel offers it).
PYFUSE3 = ("session=pyfuse3",)
NO_PASSTHROUGH = ("session=native", "passthrough=off")
#: FUSE over io_uring (targets that use it turn the fuse module's switch on to mount).
URING_ON = "uring=on"
URING = ("session=native", URING_ON)

for _target in (NativeTarget(), PassthruTarget(), KernelOverlayTarget(),
                OverlayTarget("overlay-lower", "lower"), OverlayTarget("overlay-upper", "upper"),
                OverlayTarget("overlay-multi", "multi"),
                PassthruTarget(PYFUSE3, "passthru-pyfuse3"),
                PassthruTarget(NO_PASSTHROUGH, "passthru-nopt"),
                OverlayTarget("overlay-lower-pyfuse3", "lower", PYFUSE3),
                OverlayTarget("overlay-upper-nopt", "upper", NO_PASSTHROUGH),
                # lower files by kernel passthrough: fuse-overlayfs's copy-up semantics
                OverlayTarget("overlay-lower-lpt", "lower", ("lower_passthrough",)),
                PassthruTarget(URING, "passthru-uring"),
                OverlayTarget("overlay-lower-uring", "lower", URING)):
    register(_target)


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    """Assert that the block raises OSError with errno ``code`` (named in the failure)."""
    try:
        yield
    except OSError as e:
        if e.errno != code:
            raise AssertionError(f"expected {errno.errorcode[code]}, got "
                                 f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e}") from e
    else:
        raise AssertionError(f"expected OSError {errno.errorcode[code]}, nothing raised")
