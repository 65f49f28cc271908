"""A create that fails after making its inode gives the kernel's lookup back exactly once.

The entry reply of a create carries one lookup reference; if building that reply fails,
the reference was never delivered and must be dropped once: twice would evict an inode
another lookup still holds (its fds closed under it), zero would leak it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from backingfs.fsapi import Caller
from overlay import dir as ovl_dir
from overlay.params import OvlParams
from overlay.superblock import Superblock

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("failing", ["make_entry", "open_new"])
def test_failed_create_drops_its_lookup_once(tmp_path: Path, failing: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]))
    sb = Superblock.mount(params, str(dirs["mnt"]))
    caller = Caller(os.getuid(), os.getgid(), os.getpid(), 0o022)

    held: list[int] = []

    def fail(sb_: Superblock, inode: object, *args: object) -> None:
        # A lookup of the new name by another caller got in first: it holds one reference.
        ino = inode.ino  # type: ignore[attr-defined]
        sb_.inodes.ref(ino)
        held.append(ino)
        raise OSError(errno.EIO, "injected")

    async def main() -> None:
        root = sb.inodes.root
        monkeypatch.setattr(ovl_dir, failing, fail)
        with pytest.raises(OSError):
            await ovl_dir.create(sb, root, b"f", stat.S_IFREG | 0o644,
                                 os.O_WRONLY | os.O_CREAT, caller)
        monkeypatch.undo()
        # Only the create's own reference went back: the other lookup still holds f.
        assert sb.inodes.get(held[0]).lookups == 1
        sb.inodes.forget(held[0], 1)

    try:
        trio.run(main)
        assert sb.inodes.statistics().inodes == 1   # the root
    finally:
        sb.inodes.forget_all()
