"""Mount launchers shared by tests/ and tools/: start a CLI, wait for its mount, tear down.

The CLIs run as ``[sys.executable, "-m", "passthru", ...]`` (``cli_argv``), with the
repository root on PYTHONPATH, so tests work without the console scripts on PATH and
always exercise this checkout.

``Mount`` has the two exits of trio's graceful/forceful close:
- ``unmount_clean()``: ``fusermount3 -u``, then the daemon must exit with status 0;
- ``force_cleanup()``: always safe, idempotent; lazy unmount, then SIGTERM and SIGKILL of
  *only* the daemon pid this Mount knows (never a process found by name).
A fixture calls ``unmount_clean()`` on success and ``force_cleanup()`` in ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def _unescape_mountinfo(s: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(code, ch)
    return s


def mount_fstype(mountpoint: str) -> str | None:
    """The fstype of the topmost mount on ``mountpoint`` (from /proc/self/mountinfo), or
    None. Reads no file under the mountpoint, so a hung daemon cannot hang the caller."""
    path = os.path.realpath(mountpoint)
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
