"""tools/fuzz.py smoke check: a short fuzz of passthru and overlay keeps both daemons up and
unmounts cleanly, and the watchdog reports a daemon that stops answering (SIGSTOP: a hang,
with a stack dump) or dies, tearing the mount down either way.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backingfs.testing import REPO_ROOT, cli_argv, cli_env, fuse_unavailable

FUZZ = str(Path(REPO_ROOT) / "tools" / "fuzz.py")


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    why = fuse_unavailable()
    if why:
        pytest.skip(why)


def run_fuzz(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, FUZZ, "--dir", str(tmp_path), "--seed", "11", *args],
                          capture_output=True, text=True, timeout=150, cwd=REPO_ROOT)


def nothing_left(base: Path) -> bool:
    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4].startswith(prefix) for line in f)
    return not mounted and not list(base.glob("fuzz-*"))


@pytest.mark.timeout(90)
def test_short_fuzz_keeps_both_daemons_up(tmp_path: Path) -> None:
    r = run_fuzz(tmp_path, "--targets", "passthru,overlay-lower", "--duration", "5",
                 "--drop-every", "1", "--progress", "2")
    assert r.returncode == 0, r.stderr[-5000:]
    for target in ("passthru", "overlay-lower"):
        assert f"RESULT {target}: OK: " in r.stderr
        assert f"fuzz: {target}: op mix: " in r.stderr
    assert "FAIL" not in r.stderr
    assert nothing_left(tmp_path)


@pytest.mark.timeout(90)
def test_watchdog_reports_a_hung_daemon(tmp_path: Path) -> None:
    r = run_fuzz(tmp_path, "--targets", "passthru", "--duration", "60", "--hang", "2",
                 "--self-test", "stop")
    assert r.returncode == 1, r.stderr[-5000:]
    assert "hung: stat/statfs of the mount root unanswered" in r.stderr
    assert "py-spy" in r.stderr or "MainThread" in r.stderr   # a dump, or why there is none
    assert nothing_left(tmp_path)


@pytest.mark.timeout(90)
def test_watchdog_reports_a_dead_daemon(tmp_path: Path) -> None:
    r = run_fuzz(tmp_path, "--targets", "overlay-lower", "--duration", "60", "--self-test",
                 "kill")
    assert r.returncode == 1, r.stderr[-5000:]
    assert "FAIL overlay-lower: daemon" in r.stderr and " died:" in r.stderr
    assert nothing_left(tmp_path)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_fuzz(tmp_path, "--targets", "native").returncode == 2
    assert run_fuzz(tmp_path, "--targets", "passthru", "--duration", "0").returncode == 2


def load_fuzz():
    spec = importlib.util.spec_from_file_location("backingfs_tools_fuzz", FUZZ)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_worker_counts_a_failed_close_under_writeback(tmp_path: Path, daemons) -> None:
    """Under the writeback cache a write the backing file refuses (EFBIG at 2**62 on
    ext4/tmpfs) is taken into the page cache and its failure comes back from close(2) as
    EIO. A worker closing its held fds between ops counts that errno like any op's: it
    used to die with the OSError (every writeback fuzz run failed with 'crashed')."""
    source, mnt = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    (source / "f").write_bytes(b"hello")
    mount = daemons.start(cli_argv("passthru", "-f", "-o", "allow_other,writeback",
                                   str(source), str(mnt)), mnt, env=cli_env())
    fuzz = load_fuzz()
    pool = fuzz.Pool.build(os.fsencode(mnt))
    w = fuzz.Worker(0, pool, 1, threading.Event(), threading.Event())
    w.MAX_HELD = 0
    fd = os.open(mnt / "f", os.O_RDWR)
    assert os.pwrite(fd, b"x", 1 << 62) == 1   # cached: the kernel checks no backing limit
    w.hold(fd)
    w.trim()   # close(2) -> EIO: counted, not raised
    assert w.held == []
    assert w.errnos[errno.EIO] == 1
    assert w.crash is None
    mount.unmount_clean()
