"""The fds of forgotten inodes that free a big file are closed by the backing io_uring's
workers, the others by the loop at once (backingfs/closing.py): after rm of files made
through the mount, the daemon holds no fd of a deleted file within moments, the space is
back on the backing filesystem, and the closes of the big files, only those, went through
the ring."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backingfs.testing import cli_argv, fuse_unavailable, start_fuse_target

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(fuse_unavailable() is not None or os.geteuid() != 0,
                                 reason="needs /dev/fuse, fusermount3 and root")]

FILES = 64
SIZE = 256 * 1024  # above closing.ASYNC_CLOSE_BYTES
SMALL = 4096  # below it


def _deleted_fds(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.endswith(" (deleted)"):
            out.append(target)
    return out


def _wait_for_no_deleted_fds(pid: int) -> None:
    deadline = time.monotonic() + 10
    while _deleted_fds(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _deleted_fds(pid) == []


@pytest.mark.parametrize("fs", ["overlay", "passthru"])
def test_rm_closes_the_big_forgotten_files_through_the_ring(tmp_path: Path, fs: str) -> None:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "src", "mnt")}
    for p in d.values():
        p.mkdir()
    if fs == "overlay":
        backing = d["upper"]
        argv = cli_argv("overlay", "-o", f"lowerdir={d['lower']},upperdir={d['upper']},"
                        f"workdir={d['work']},session=native,uring=off", str(d["mnt"]))
    else:
        backing = d["src"]
        argv = cli_argv("passthru", "-o", "session=native,uring=off", str(d["src"]),
                        str(d["mnt"]))
    m = start_fuse_target(argv, d["mnt"], data=backing)
    try:
        assert m.mount.pid is not None
        before = m.mount.session_statistics()["io_uring"]
        if before is None:
            pytest.skip("no io_uring in the daemon (io_uring disabled here)")
        tree = d["mnt"] / "t"
        tree.mkdir()
        for i in range(FILES):
            (tree / f"f{i}").write_bytes(os.urandom(SIZE))
        os.sync()
        free = os.statvfs(backing).f_bavail * os.statvfs(backing).f_frsize
        for i in range(FILES):
            os.unlink(tree / f"f{i}")
        tree.rmdir()
        _wait_for_no_deleted_fds(m.mount.pid)
        os.sync()
        st = os.statvfs(backing)
        assert st.f_bavail * st.f_frsize >= free + FILES * SIZE * 3 // 4
        after = m.mount.session_statistics()["io_uring"]
        # Every big file's fd went through the ring; with passthrough nothing else of this
        # test reaches it.
        assert after["submitted"] - before["submitted"] >= FILES
        # Small files: closed at once, none through the ring.
        tree.mkdir()
        for i in range(FILES):
            (tree / f"s{i}").write_bytes(b"s" * SMALL)
        for i in range(FILES):
            os.unlink(tree / f"s{i}")
        tree.rmdir()
        _wait_for_no_deleted_fds(m.mount.pid)
        small = m.mount.session_statistics()["io_uring"]
        assert small["submitted"] - after["submitted"] < FILES // 2
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()
