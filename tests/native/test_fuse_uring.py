"""FUSE over io_uring on the native session (backingfs/fuse_uring.py, lease.py), observed
through the mount and the daemon's counters (SIGUSR1 -> ``session: {json}``).

The behaviour battery runs on ``passthru-uring`` and ``overlay-lower-uring``; here:
- every request but FORGET and INIT comes through the queues, a caller's through the queue
  of the CPU it runs on, and most are answered on that queue's thread;
- handlers that wait (fsync in a worker thread) answer through their entry from the loop;
- more concurrent callers than entries, with waits mixed in, all get their answers;
- SIGTERM and fusermount3 -u end the daemon cleanly;
- uring=on where the kernel does not offer io_uring fails the mount with a reason, and
  bad uring= values are usage errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs import fuse_uring
from backingfs.testing import (
    FuseTargetMount,
    cli_argv,
    cli_env,
    fuse_unavailable,
    is_fuse_mounted,
    start_daemon,
    start_fuse_target,
)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(fuse_unavailable() is not None or os.geteuid() != 0,
                                 reason="needs /dev/fuse, fusermount3 and root")]
needs_uring = pytest.mark.skipif(fuse_uring.unavailable() is not None,
                                 reason=str(fuse_uring.unavailable()))

#: Requests that never come through the ring: INIT comes before it, FORGETs and
#: INTERRUPTs always through /dev/fuse.
_DEV_ONLY = ("INIT", "FORGET", "BATCH_FORGET", "INTERRUPT")


def _mount(tmp_path: Path, cli: str, opts: str) -> FuseTargetMount:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    if cli == "passthru":
        argv = cli_argv("passthru", "-o", f"session=native,uring=on,{opts}".rstrip(","),
                        str(src), str(mnt))
    else:
        layers = f"lowerdir={src},upperdir={tmp_path / 'up'},workdir={tmp_path / 'wk'}"
        (tmp_path / "up").mkdir()
        (tmp_path / "wk").mkdir()
        argv = cli_argv("overlay", "-o", f"{layers},uring=on{',' + opts if opts else ''}",
                        str(mnt))
    return start_fuse_target(argv, mnt, data=src, uring=True)


@pytest.fixture
def passthru(tmp_path: Path) -> Iterator[FuseTargetMount]:
    m = _mount(tmp_path, "passthru", "")
    try:
        yield m
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()


def _uring(m: FuseTargetMount) -> tuple[dict[str, int], dict[str, object]]:
    st = m.mount.session_statistics()
    return dict(st["requests"]), dict(st["uring"])


def _workout(root: Path, tag: str, n: int = 50) -> None:
    d = root / tag
    d.mkdir()
    for i in range(n):
        p = d / f"f{i}"
        p.write_bytes(b"x" * i)
        assert p.read_bytes() == b"x" * i
        os.setxattr(p, "user.k", tag.encode())
        assert os.getxattr(p, "user.k") == tag.encode()
        p.rename(d / f"g{i}")
    assert sorted(os.listdir(d)) == sorted(f"g{i}" for i in range(n))
    for i in range(n):
        (d / f"g{i}").unlink()
    d.rmdir()


@needs_uring
def test_requests_come_through_the_queues(passthru: FuseTargetMount) -> None:
    _workout(passthru.root, "w")
    ops, ring = _uring(passthru)
    mine = os.sched_getaffinity(0)
    cpus = [c for c in range(fuse_uring.possible_cpus()) if c in mine]
    spare = ["spare"] if len(cpus) < fuse_uring.possible_cpus() else []
    assert ring["queues"] == [f"cpu{c}" for c in cpus] + spare and not ring["refused"]
    via_dev = sum(ops.get(op, 0) for op in _DEV_ONLY)
    served = sum(ring["requests"].values())  # type: ignore[attr-defined]
    assert served == sum(ops.values()) - via_dev > 500
    assert ring["inline"] > ring["carried"]  # type: ignore[operator]


@needs_uring
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_caller_is_served_by_the_queue_of_its_cpu(passthru: FuseTargetMount) -> None:
    """The kernel queues a request on its caller's CPU: a caller pinned to one CPU is
    served by that CPU's queue alone (what keeps caller and daemon on one CPU)."""
    root = str(passthru.root)
    for cpu in sorted(os.sched_getaffinity(0))[:2]:
        before = _uring(passthru)[1]["requests"]
        script = ("import os,sys\n"
                  f"os.sched_setaffinity(0, {{{cpu}}})\n"
                  "for i in range(200):\n"
                  f"    os.statvfs({root!r})\n")  # STATFS: never cached by the kernel
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        after = _uring(passthru)[1]["requests"]
        grew = {q: after[q] - before[q] for q in after}  # type: ignore[index, union-attr]
        assert grew[f"cpu{cpu}"] >= 200, grew
        # (a background request of the daemon's own may land anywhere)
        assert sum(grew.values()) - grew[f"cpu{cpu}"] <= 2, grew


@needs_uring
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_cpu_the_daemon_does_not_run_on_is_served_by_the_spare_queue(
        tmp_path: Path) -> None:
    """The kernel wants a queue for every possible CPU: a daemon confined to one CPU
    serves the others' queues from one unpinned thread."""
    mine = sorted(os.sched_getaffinity(0))
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    argv = ["taskset", "-c", str(mine[0]),
            *cli_argv("passthru", "-o", "session=native,uring=on", str(src), str(mnt))]
    m = start_fuse_target(argv, mnt, data=src, uring=True)
    try:
        ring = _uring(m)[1]
        assert ring["queues"] == [f"cpu{mine[0]}", "spare"]
        script = (f"import os\nos.sched_setaffinity(0, {{{mine[1]}}})\n"
                  f"for i in range(100): os.statvfs({str(mnt)!r})\n")
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        _workout(mnt, "w", 10)
        assert _uring(m)[1]["requests"]["spare"] >= 100  # type: ignore[index]
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()


@needs_uring
def test_handlers_that_wait_answer_through_their_entry(passthru: FuseTargetMount) -> None:
    big = passthru.root / "big"
    big.mkdir()
    for i in range(3000):  # readdir of a directory this size lists it in a worker thread
        (passthru.data / "big" / f"n{i:05d}").write_bytes(b"")
    assert len(os.listdir(big)) == 3000
    with open(passthru.root / "f", "wb") as f:
        f.write(b"data")
        os.fsync(f.fileno())  # the backing fsync runs in a worker thread
    ring = _uring(passthru)[1]
    assert ring["carried"] >= 1
    assert (passthru.data / "f").read_bytes() == b"data"


@needs_uring
@pytest.mark.parametrize("cli", ["passthru", "overlay"])
def test_more_callers_than_entries(tmp_path: Path, cli: str) -> None:
    m = _mount(tmp_path, cli, "")
    try:
        for i in range(40):
            (m.data / f"lower{i}").write_bytes(b"l" * i)  # type: ignore[operator]
        errors: list[BaseException] = []

        def caller(n: int) -> None:
            try:
                _workout(m.root, f"t{n}", 20)
                with open(m.root / f"lower{n}", "r+b") as f:  # overlay: a copy-up each
                    f.seek(0, 2)
                    f.write(b"+")
                    os.fsync(f.fileno())
                assert (m.root / f"lower{n}").read_bytes() == b"l" * n + b"+"
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(n,))
                   for n in range(4 * fuse_uring.ENTRIES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a caller hung"
        assert not errors, errors[0]
        assert m.check_alive() is None
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()


@needs_uring
def test_sigterm_ends_the_daemon_cleanly(tmp_path: Path) -> None:
    m = _mount(tmp_path, "passthru", "")
    try:
        _workout(m.root, "w", 10)
        assert m.mount.pid is not None
        os.kill(m.mount.pid, signal.SIGTERM)
        assert m.mount.wait_exit(15) == 0
        assert not is_fuse_mounted(str(m.root))
        assert "Traceback" not in m.mount.stderr_text()
    finally:
        m.mount.force_cleanup()


def test_uring_on_when_the_kernel_does_not_offer_it_fails_the_mount(tmp_path: Path) -> None:
    if fuse_uring.ENABLE_PARAM.exists() and \
            fuse_uring.ENABLE_PARAM.read_text().strip() == "Y":
        pytest.skip("this machine's kernel offers FUSE over io_uring to every mount")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    mount = start_daemon(cli_argv("passthru", "-o", "session=native,uring=on", str(src),
                                  str(mnt)), str(mnt))
    try:
        assert mount.wait_exit(15) == 1
        assert "uring=on but FUSE over io_uring is unavailable" in mount.stderr_text()
        assert not is_fuse_mounted(str(mnt))
    finally:
        mount.force_cleanup()


@pytest.mark.parametrize("opts, message", [
    ("uring=sometimes", "uring=sometimes: expected one of auto, on, off"),
    ("session=pyfuse3,uring=on", "uring=on needs session=native"),
])
def test_bad_uring_options_are_usage_errors(tmp_path: Path, opts: str, message: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(cli_argv("passthru", "-o", opts, str(tmp_path), str(mnt)),
                       capture_output=True, text=True, timeout=30, env=cli_env())
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not is_fuse_mounted(str(mnt))
