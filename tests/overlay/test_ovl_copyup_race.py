"""Copy-up racing a lookup of the same name: the inode ends with one upper fd, not two.

The copy-up thread renames the new upper object into place, and until the trio task
resumes, a lookup on the loop can already find it and adopt it (namei.adopt fills in the
missing ``upper``). Found by tools/soak.py as one O_PATH fd to a deleted ``work/#tmp``
object left in the daemon after a million operations; here the interleaving is forced.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from overlay import copyup, namei
from overlay.params import OvlParams
from overlay.superblock import Superblock

pytestmark = pytest.mark.timeout(60)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def paused_copy_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lower: dict[str, bytes],
                   links: dict[str, str] | None = None
                   ) -> tuple[dict[str, Path], Superblock, threading.Event, threading.Event]:
    """An overlay superblock over ``lower`` (name: content, plus hard ``links`` new: old)
    whose copy-ups run in the worker (even small ones) and wait after the rename until
    ``resume`` is set; ``renamed`` is set once the upper object is in place."""
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    for name, data in lower.items():
        (dirs["lower"] / name).write_bytes(data)
    for new, old in (links or {}).items():
        os.link(dirs["lower"] / old, dirs["lower"] / new)
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]))
    sb = Superblock.mount(params, str(dirs["mnt"]))
    renamed, resume = threading.Event(), threading.Event()
    real = copyup._copy_up_sync

    def copy_then_wait(*args: Any) -> Any:
        result = real(*args)   # the upper object is in place from here on
        renamed.set()
        resume.wait(10)
        return result

    monkeypatch.setattr(copyup, "_copy_up_sync", copy_then_wait)
    # A small file is copied on the loop (the race needs the worker's thread)
    monkeypatch.setattr(copyup, "_is_small", lambda fd, size: False)
    return dirs, sb, renamed, resume


async def copy_up_with_lookup(sb: Superblock, name: bytes, renamed: threading.Event,
                              resume: threading.Event) -> Any:
    """Look ``name`` up in the root, copy it up, and look it up again while the paused
    copy-up has renamed the upper object into place but not yet returned: the second
    lookup must find the same inode, with its upper. Returns that inode, holding the
    first lookup's reference."""
    root = sb.inodes.root
    inode = namei.adopt(sb, root, name, namei.resolve(sb, root, name))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(copyup.copy_up, sb, inode)
        await trio.to_thread.run_sync(renamed.wait)
        again = namei.adopt(sb, root, name, namei.resolve(sb, root, name))
        assert again is inode and inode.upper is not None   # adopted by the lookup
        sb.inodes.forget(inode.ino, 1)
        resume.set()
    return inode


def test_lookup_adopting_the_upper_during_copy_up_leaks_no_fd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs, sb, renamed, resume = paused_copy_up(tmp_path, monkeypatch, {"f": b"lower data"})
    before = open_fds()

    async def race() -> None:
        inode = await copy_up_with_lookup(sb, b"f", renamed, resume)
        assert inode.upper is not None
        assert os.path.samestat(os.fstat(inode.upper), os.lstat(dirs["upper"] / "f"))
        sb.inodes.forget(inode.ino, 1)   # the kernel forgets: evicted, its fds closed

    try:
        trio.run(race)
        assert open_fds() == before
        assert (dirs["upper"] / "f").read_bytes() == b"lower data"
    finally:
        sb.inodes.forget_all()


def test_lookup_during_copy_up_of_a_lower_hard_link_keeps_one_inode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy of a lower hard link is a new file with a key of its own, given to the
    inode only after the worker returns (``_broke_hard_link``). A lookup of the name in
    between used to make a second inode for the new upper file, and the copy-up then
    marked the first one stale: ESTALE on the open handle that triggered the copy-up."""
    dirs, sb, renamed, resume = paused_copy_up(tmp_path, monkeypatch, {"a": b"linked data"},
                                               links={"b": "a"})
    before = open_fds()

    async def race() -> None:
        inode = await copy_up_with_lookup(sb, b"a", renamed, resume)
        assert not inode.is_stale
        assert sb.inodes.find(inode.key) is inode
        assert os.path.samestat(os.fstat(inode.upper), os.lstat(dirs["upper"] / "a"))
        assert sb.copying_links == {}
        sb.inodes.forget(inode.ino, 1)

    try:
        trio.run(race)
        assert open_fds() == before
        assert (dirs["upper"] / "a").read_bytes() == b"linked data"
    finally:
        sb.inodes.forget_all()
