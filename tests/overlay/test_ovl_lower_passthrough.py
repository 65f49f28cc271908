"""``-o lower_passthrough`` in process (no mount): which opens count as served from the lower
file, when an open detaches its inode (ESTALE), and what the successor inode reports.
The kernel side (no READ reaches the daemon, the VFS retry) is in tests/native."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from backingfs.fsapi import Caller
from overlay.ops import OverlayFs
from overlay.params import OvlParams
from overlay.superblock import Superblock

pytestmark = pytest.mark.timeout(60)

ROOT = 1


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[OverlayFs]:
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "f").write_bytes(b"lower data")
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]), lower_passthrough=True)
    ovl = OverlayFs(Superblock.mount(params, str(dirs["mnt"])))
    ovl.passthrough = True  # what the native session sets when the kernel offers it
    ovl.init()
    try:
        yield ovl
    finally:
        ovl.sb.inodes.forget_all()


def _caller() -> Caller:
    return Caller(os.getuid(), os.getgid(), os.getpid(), 0o022)


def test_an_open_needing_the_upper_copy_detaches_the_inode(fs: OverlayFs) -> None:
    async def main() -> None:
        entry = await fs.lookup(ROOT, b"f", _caller())
        a = fs.sb.inodes.get(entry.ino)
        ro = await fs.open(entry.ino, os.O_RDONLY, _caller())
        assert ro.backing is not None and a.lower_passthrough_opens == 1
        with pytest.raises(OSError) as e:
            await fs.open(entry.ino, os.O_RDWR | os.O_TRUNC, _caller())
        assert e.value.errno == errno.ESTALE
        assert a.is_stale and a.upper is not None
        # the failed open copied the whole file: O_TRUNC is the retried open's to apply
        fd = os.open(f"/proc/self/fd/{a.upper}", os.O_RDONLY)
        try:
            assert os.pread(fd, 20, 0) == b"lower data"
        finally:
            os.close(fd)
        # the kernel's retry: a lookup makes the successor, same st_ino, new node id
        again = await fs.lookup(ROOT, b"f", _caller())
        assert again.ino != entry.ino and again.attr.st_ino == entry.attr.st_ino
        w = await fs.open(again.ino, os.O_RDWR | os.O_TRUNC, _caller())
        assert w.backing is not None
        assert os.fstat(w.backing).st_size == 0
        await fs.release(w.fh)
        await fs.release(ro.fh)
        assert a.lower_passthrough_opens == 0

    trio.run(main)


def test_an_open_the_kernel_did_not_take_counts_for_nothing(fs: OverlayFs) -> None:
    async def main() -> None:
        entry = await fs.lookup(ROOT, b"f", _caller())
        a = fs.sb.inodes.get(entry.ino)
        ro = await fs.open(entry.ino, os.O_RDONLY, _caller())
        fs.backing_declined(ro.fh)   # e.g. EPERM in a user namespace
        assert a.lower_passthrough_opens == 0
        w = await fs.open(entry.ino, os.O_RDWR, _caller())   # no detach needed
        assert not a.is_stale
        assert await fs.write(w.fh, 0, b"UPPER") == 5
        # a plain handle follows the copy-up, as without the option
        assert bytes(await fs.read(ro.fh, 0, 10)) == b"UPPER data"
        await fs.release(w.fh)
        await fs.release(ro.fh)

    trio.run(main)


def test_without_kernel_passthrough_the_option_does_nothing(tmp_path: Path) -> None:
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_bytes(b"x")
    params = OvlParams(lowerdirs=[str(tmp_path / "lower")], upperdir=str(tmp_path / "upper"),
                       workdir=str(tmp_path / "work"), lower_passthrough=True)
    ovl = OverlayFs(Superblock.mount(params, str(tmp_path / "mnt")))
    ovl.init()   # pyfuse3, or passthrough=off: ``passthrough`` stays False

    async def main() -> None:
        entry = await ovl.lookup(ROOT, b"f", _caller())
        ro = await ovl.open(entry.ino, os.O_RDONLY, _caller())
        assert ro.backing is None
        await ovl.release(ro.fh)

    try:
        trio.run(main)
    finally:
        ovl.sb.inodes.forget_all()
