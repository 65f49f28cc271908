"""Error paths of passthru operations, run in-process on a PassthruFs (no mount).

A create that fails after its backing open made the file must not leave the file behind:
on a local filesystem an open(O_CREAT) that fails (EMFILE comes first there) creates
nothing, and a caller retrying with O_EXCL would otherwise meet EEXIST for a file it never
got. Under a small fd limit the O_EXCL open can take the last free fd and the O_PATH fd the
inode needs then fails (found by tools/soak.py at 300 fds).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from backingfs.fsapi import Caller
from passthru import file as file_ops
from passthru.superblock import PassthruFs

pytestmark = pytest.mark.timeout(60)


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("excl", [True, False])
def test_create_out_of_fds_after_the_open_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, excl: bool) -> None:
    fs = PassthruFs(str(tmp_path))
    caller = Caller(os.getuid(), os.getgid(), os.getpid(), 0o022)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else 0)

    def no_fds(*args: object) -> int:
        raise OSError(errno.EMFILE, "injected")

    async def main() -> None:
        root = fs.inodes.root.ino
        before = _fds()
        monkeypatch.setattr(file_ops.syscalls, "open_path", no_fds)
        with pytest.raises(OSError) as info:
            await fs.create(root, b"f", stat.S_IFREG | 0o644, flags, caller)
        assert info.value.errno == errno.EMFILE
        monkeypatch.undo()
        assert not (tmp_path / "f").exists()
        assert _fds() == before
        # The retry a caller makes now succeeds, O_EXCL or not.
        reply, entry = await fs.create(root, b"f", stat.S_IFREG | 0o644, flags, caller)
        assert (tmp_path / "f").is_file()
        await fs.release(reply.fh)
        fs.inodes.forget(entry.ino, 1)

    try:
        trio.run(main)
    finally:
        fs.inodes.forget_all()


def test_create_of_an_existing_file_keeps_it_when_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not made by this request (made in SOURCE since the kernel's lookup): never removed.
    (tmp_path / "f").write_bytes(b"kept")
    fs = PassthruFs(str(tmp_path))
    caller = Caller(os.getuid(), os.getgid(), os.getpid(), 0o022)

    def no_fds(*args: object) -> int:
        raise OSError(errno.EMFILE, "injected")

    async def main() -> None:
        monkeypatch.setattr(file_ops.syscalls, "open_path", no_fds)
        with pytest.raises(OSError):
            await fs.create(fs.inodes.root.ino, b"f", stat.S_IFREG | 0o644,
                            os.O_WRONLY | os.O_CREAT, caller)

    try:
        trio.run(main)
        assert (tmp_path / "f").read_bytes() == b"kept"
    finally:
        fs.inodes.forget_all()
