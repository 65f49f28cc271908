"""tests/hangguard.py ends a test hung in a FUSE call that pytest-timeout cannot interrupt.

An inner pytest run (the hangguard plugin, an 8 s timeout, a 2 s grace) mounts passthru, stops
its daemon with SIGSTOP and stats a name under the mount: the lookup waits for a daemon that
never answers. The inner run must end by itself, naming the test, with the connection aborted,
the test failed, and no mount or process left behind. A second inner test never returns
even after the abort (it sleeps): the guard must end that run with status 3 and say why on
the terminal, not in the capture that dies with the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backingfs.testing import REPO_ROOT, cli_env, is_fuse_mounted

pytestmark = pytest.mark.timeout(240)

INNER = '''
import os, signal
from pathlib import Path

import pytest

from backingfs.testing import cli_argv, start_daemon


@pytest.fixture
def stopped_daemon(tmp_path: Path):
    src, mnt = tmp_path / "src", Path(os.environ["HANG_MNT"])
    src.mkdir()
    m = start_daemon(cli_argv("passthru", str(src), str(mnt)), str(mnt))
    Path(os.environ["HANG_PID"]).write_text(str(m.pid))
    try:
        m.wait_live()
        os.kill(m.pid, signal.SIGSTOP)
        yield mnt
    finally:
        os.kill(m.pid, signal.SIGCONT)
        m.force_cleanup()


@pytest.mark.timeout(8, func_only=True)  # the daemon's start, under load, is not the test
def test_stat_under_a_stopped_daemon(stopped_daemon: Path) -> None:
    os.stat(stopped_daemon / "never-answered")
'''


def test_a_stat_under_a_stopped_daemon_is_aborted(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pidfile = tmp_path / "pid"
    tests_dir = os.path.join(REPO_ROOT, "tests")
    env = cli_env({"HANGGUARD_GRACE": "2", "HANGGUARD_EXIT_AFTER": "60", "HANG_MNT": str(mnt),
                   "HANG_PID": str(pidfile),
                   "PYTHONPATH": os.pathsep.join([tests_dir, REPO_ROOT])})
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hangguard",
                        "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_inner.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=150)
    took = time.monotonic() - started
    out = r.stdout + r.stderr
    try:
        assert r.returncode == 1, out
        assert "test_stat_under_a_stopped_daemon still running" in out, out
        assert "aborted FUSE connections of ['" + str(mnt) in out, out
        assert "1 failed" in out, out
        assert took < 60, (took, out)
        assert not is_fuse_mounted(str(mnt))
        pid = int(pidfile.read_text())
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), f"daemon {pid} left running"
    finally:
        if is_fuse_mounted(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


SLEEPER = '''
import time

import pytest


@pytest.mark.timeout(1)
def test_sleeps_through_everything() -> None:
    while True:
        try:
            time.sleep(100)
        except BaseException:  # swallows pytest-timeout's exception, as a stuck call would
            pass
'''


def test_a_test_that_never_ends_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_sleeper.py").write_text(textwrap.dedent(SLEEPER))
    env = cli_env({"HANGGUARD_GRACE": "1", "HANGGUARD_EXIT_AFTER": "1",
                   "PYTHONPATH": os.pathsep.join([os.path.join(REPO_ROOT, "tests"),
                                                  REPO_ROOT])})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hangguard",
                        "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_sleeper.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "test_sleeps_through_everything did not end within 1s" in r.stderr, r.stderr
