"""Reads the daemon serves itself (lower files of a writable overlay), from cold data, many
at once: the right bytes, and the backing io_uring gets several of them per
io_uring_enter (the native session defers its submissions while requests queue up on
/dev/fuse: one block plug, one doorbell to the device, for the lot)."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from backingfs.testing import cli_argv, drop_cache, fuse_unavailable, start_fuse_target

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(fuse_unavailable() is not None or os.geteuid() != 0,
                                 reason="needs /dev/fuse, fusermount3 and root")]

BLOCK = 4096
BLOCKS = 4096  # a 16 MiB lower file
THREADS = 16
READS = 200  # per thread


def test_concurrent_cold_reads_of_a_lower_file(tmp_path: Path) -> None:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    data = os.urandom(BLOCK * BLOCKS)
    (d["lower"] / "f").write_bytes(data)
    opts = (f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']},"
            "session=native,uring=off")
    m = start_fuse_target(cli_argv("overlay", "-o", opts, str(d["mnt"])), d["mnt"],
                          data=d["lower"])
    try:
        path = d["mnt"] / "f"
        fds = [os.open(path, os.O_RDONLY) for _ in range(THREADS)]
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one READ per 4 KiB block
        drop_cache(d["lower"] / "f")
        drop_cache(path)
        before = m.mount.session_statistics()["io_uring"]
        if before is None:
            pytest.skip("no io_uring in the daemon (io_uring disabled here)")
        wrong: list[int] = []

        def reader(fd: int, seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(READS):
                off = rng.randrange(BLOCKS) * BLOCK
                if os.pread(fd, BLOCK, off) != data[off:off + BLOCK]:
                    wrong.append(off)

        threads = [threading.Thread(target=reader, args=(fd, i)) for i, fd in enumerate(fds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fd in fds:
            os.close(fd)
        assert wrong == []
        after = m.mount.session_statistics()["io_uring"]
        submitted = after["submitted"] - before["submitted"]
        enters = after["enters"] - before["enters"]
        assert submitted > THREADS, "cold reads were expected to queue on the ring"
        assert enters < submitted, (enters, submitted)
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()
