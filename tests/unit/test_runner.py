"""The mount lifecycle: checks before mounting, foreground and background daemons, signals.

The mounting tests run tests/unit/hellofs.py as a real CLI. Every one goes through a
fixture or ``finally`` that always unmounts and kills only the pid it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs import runner
from backingfs.options import UsageError
from backingfs.runner import QuietError, check_mountpoint, cli_main
from backingfs.testing import (
    Mount,
    cli_argv,
    cli_env,
    find_daemon_pid,
    is_fuse_mounted,
    start_daemon,
)
from tests.unit.hellofs import CONTENT

HELLOFS = "tests.unit.hellofs"


# --- no mount ----------------------------------------------------------------------------

def test_check_mountpoint_missing_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(QuietError, match="does not exist") as ei:
        check_mountpoint(str(tmp_path / "nope"))
    assert ei.value.exitcode == 1
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(QuietError, match="not a directory"):
        check_mountpoint(str(f))
    check_mountpoint(str(tmp_path))


def test_cli_main_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def quiet() -> int:
        raise QuietError("mountpoint /x does not exist", 1)

    def usage() -> int:
        raise UsageError("unknown option '-x'")

    assert cli_main("prog", quiet) == 1
    assert cli_main("prog", usage) == 2
    assert cli_main("prog", lambda: 0) == 0
    err = capsys.readouterr().err
    assert err == "prog: mountpoint /x does not exist\nprog: unknown option '-x'\n"


_LIMITS_AFTER_RAISE = (
    "import resource, backingfs.runner as r; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); r.raise_nofile_limit(); "
    "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")


def _limits_after_raise(*prefix: str) -> list[int]:
    """Run raise_nofile_limit in a child (a lowered hard limit cannot be raised back
    without CAP_SYS_RESOURCE, so not in the test process) from soft 256, hard 4096."""
    r = subprocess.run([*prefix, sys.executable, "-c", _LIMITS_AFTER_RAISE], env=cli_env(),
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


def _has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def test_raise_nofile_limit_reaches_hard_limit() -> None:
    """Without CAP_SYS_RESOURCE the hard limit is fixed: the soft limit goes up to it."""
    assert _limits_after_raise("setpriv", "--bounding-set=-sys_resource",
                               "--inh-caps=-sys_resource") == [4096, 4096]


def test_raise_nofile_limit_with_cap_sys_resource_lifts_the_hard_limit() -> None:
    """With CAP_SYS_RESOURCE both limits go up to nr_open, at most NOFILE_CAP (a
    container's 20,000 would make a directory of 20,000 entries costly to list); without it
    (some sandboxes deny it even to root, this one among them) the hard limit stays and
    the soft one reaches it."""
    nr_open = min(int(Path("/proc/sys/fs/nr_open").read_text()), runner.NOFILE_CAP)
    want = nr_open if _has_cap(24) else 4096   # 24: CAP_SYS_RESOURCE
    assert _limits_after_raise() == [want, want]


def test_mountpoint_missing_is_one_line_no_traceback(tmp_path: Path) -> None:
    for flags in ([], ["-f"]):
        r = subprocess.run(cli_argv(HELLOFS, *flags, str(tmp_path / "missing")),
                           env=cli_env(), capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "does not exist" in r.stderr


def test_usage_error_exits_2(tmp_path: Path) -> None:
    r = subprocess.run(cli_argv(HELLOFS, "-x", str(tmp_path)), env=cli_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr == "hellofs: unknown option '-x'\n"


# --- mounting ----------------------------------------------------------------------------

@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return mnt


@pytest.fixture
def hello_mount(mountpoint: Path, tmp_path: Path) -> Iterator[Mount]:
    """A foreground hellofs daemon; always unmounted and its pid (only) killed."""
    m = start_daemon(cli_argv(HELLOFS, str(mountpoint)), str(mountpoint),
                     stderr_path=str(tmp_path / "daemon.stderr"))
    try:
        m.wait_live(timeout=10)
        yield m
    finally:
        m.force_cleanup()


def _wait_for_text(m: Mount, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (out := m.stderr_text()):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{out}"
        time.sleep(0.01)
    return out


@pytest.mark.timeout(60)
def test_foreground_mount_serves_and_sigterm_exits_clean(hello_mount: Mount) -> None:
    mnt = Path(hello_mount.mountpoint)
    assert (mnt / "hello").read_bytes() == CONTENT
    assert os.listdir(mnt) == ["hello"]
    assert (mnt / "hello").stat().st_ino == 2

    os.kill(hello_mount.pid, signal.SIGUSR1)
    _wait_for_text(hello_mount, "statistics: {'reads':")

    os.kill(hello_mount.pid, signal.SIGTERM)
    assert hello_mount.wait_exit(timeout=20) == 0, hello_mount.stderr_text()
    assert not is_fuse_mounted(str(mnt))
    assert "Traceback" not in hello_mount.stderr_text()


@pytest.mark.timeout(60)
def test_fusermount_unmount_exits_clean(hello_mount: Mount) -> None:
    assert (Path(hello_mount.mountpoint) / "hello").read_bytes() == CONTENT
    hello_mount.unmount_clean(timeout=20)  # asserts exit status 0 and no mount left


@pytest.mark.timeout(60)
def test_background_returns_only_once_live(mountpoint: Path) -> None:
    m = Mount(str(mountpoint), pid=None)
    try:
        r = subprocess.run(cli_argv(HELLOFS, str(mountpoint)), env=cli_env(),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        # No waiting: the parent's exit status promised a live mount.
        assert is_fuse_mounted(str(mountpoint))
        m.pid = find_daemon_pid(str(mountpoint))
        assert m.pid is not None
        assert (mountpoint / "hello").read_bytes() == CONTENT
        m.unmount_clean(timeout=20)
        assert find_daemon_pid(str(mountpoint)) is None
    finally:
        if m.pid is None:  # the mount may exist without us having found the daemon
            m.pid = find_daemon_pid(str(mountpoint))
        m.force_cleanup()


@pytest.mark.timeout(60)
def test_background_mount_failure_reported_by_parent(mountpoint: Path) -> None:
    # libfuse rejects the value only in the child (pyfuse3.init); the parent must say so.
    try:
        r = subprocess.run(cli_argv(HELLOFS, "-o", "max_read=abc", str(mountpoint)),
                           env=cli_env(), capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert f"hellofs: cannot mount on {mountpoint}" in r.stderr
        assert "Traceback" not in r.stderr
        assert not is_fuse_mounted(str(mountpoint))
    finally:
        Mount(str(mountpoint), find_daemon_pid(str(mountpoint))).force_cleanup()
