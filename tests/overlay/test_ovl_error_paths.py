"""Error paths of overlay operations: every reference and fd given back exactly once.

- The entry reply of a create carries one lookup reference; if building that reply fails,
  the reference was never delivered and must be dropped once: twice would evict an inode
  another lookup still holds (its fds closed under it), zero would leak it.
- Out of fds halfway (EMFILE), what was opened before is closed: found by tools/soak.py
  under a 300-fd limit, where the daemon keeps working by having the kernel prune inodes.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from pathlib import Path

import pytest
import trio

from backingfs.fsapi import Caller
from overlay import dir as ovl_dir
from overlay import whiteout as wo
from overlay.namei import resolve
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


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_out_of_fds_on_the_second_name_of_a_rename_leaks_nothing(tmp_path: Path) -> None:
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "a").write_bytes(b"a")
    (dirs["lower"] / "b").write_bytes(b"b")
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]))
    sb = Superblock.mount(params, str(dirs["mnt"]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main() -> None:
        root = sb.inodes.root
        before = _fds()
        probe = os.open("/dev/null", os.O_RDONLY)   # the lowest free fd number
        os.close(probe)
        # Room for exactly one more fd: "a" gets it, "b" meets EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1, hard))
        try:
            with pytest.raises(OSError) as exc:
                await ovl_dir.rename(sb, root, b"a", root, b"b", 0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert exc.value.errno == errno.EMFILE
        assert _fds() == before

    try:
        trio.run(main)
        assert (dirs["lower"] / "a").exists() and not os.listdir(dirs["upper"])
    finally:
        sb.inodes.forget_all()


@pytest.mark.parametrize("below", [False, True], ids=["new-name", "over-a-whiteout"])
def test_failed_create_leaves_the_name_as_it_was(tmp_path: Path, below: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of fds opening the new file's handle: the file made on the upper goes again, and
    # a whiteout it replaced is back, so the caller's retry with O_EXCL succeeds.
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    if below:
        (dirs["lower"] / "f").write_bytes(b"from below")
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]))
    sb = Superblock.mount(params, str(dirs["mnt"]))
    caller = Caller(os.getuid(), os.getgid(), os.getpid(), 0o022)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def no_fds(*args: object) -> None:
        raise OSError(errno.EMFILE, "injected")

    async def main() -> None:
        root = sb.inodes.root
        if below:
            await ovl_dir.unlink(sb, root, b"f")
        upper_before = os.lstat(dirs["upper"] / "f") if below else None
        monkeypatch.setattr(ovl_dir, "open_new", no_fds)
        with pytest.raises(OSError) as exc:
            await ovl_dir.create(sb, root, b"f", stat.S_IFREG | 0o644, flags, caller)
        assert exc.value.errno == errno.EMFILE
        monkeypatch.undo()
        res = resolve(sb, root, b"f")
        assert not res.exists
        res.close()
        if upper_before is None:
            assert not os.path.lexists(dirs["upper"] / "f")
        else:  # a whiteout again (a new one: it was swapped out and back)
            st = os.lstat(dirs["upper"] / "f")
            assert stat.S_ISCHR(st.st_mode) == stat.S_ISCHR(upper_before.st_mode)
            assert st.st_rdev == upper_before.st_rdev
        reply, entry = await ovl_dir.create(sb, root, b"f", stat.S_IFREG | 0o644, flags,
                                            caller)
        await sb.handles.release(reply.fh)
        sb.inodes.forget(entry.ino, 1)

    try:
        trio.run(main)
        assert (dirs["upper"] / "f").read_bytes() == b""
        assert sb.inodes.statistics().inodes == 1   # the root
    finally:
        sb.inodes.forget_all()


def _use_up_fds(free: int) -> list[int]:
    """Open /dev/null until EMFILE (under a limit lowered near what is in use), then give
    ``free`` back: the next opens of this process find exactly that many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, max(_fds()) + 64), hard))
    held: list[int] = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE
            break
    for _ in range(free):
        os.close(held.pop())
    return held


@pytest.mark.parametrize("free", range(5))
@pytest.mark.parametrize("op", ["mkdir", "mknod", "unlink-over-lower", "rmdir-upper",
                                "unlink-over-lower-aufs", "rename-over-lower",
                                "rename-over-lower-aufs"])
def test_out_of_fds_a_request_fails_whole_or_succeeds(tmp_path: Path, op: str,
                                                      free: int) -> None:
    # The native session runs a request again after EMFILE (native_ops fails_whole): the
    # first attempt must have changed nothing, or have finished; never half (a retry would
    # then meet EEXIST or ENOENT for a request that was done).
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "a").write_bytes(b"lower a")
    (dirs["upper"] / "a").write_bytes(b"copied up")
    (dirs["upper"] / "d").mkdir()
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]))
    sb = Superblock.mount(params, str(dirs["mnt"]))
    if op.endswith("-aufs"):
        # As where mknod of 0/0 is refused (a user namespace): whiteouts are .wh.NAME
        # files, which take an fd to make.
        sb.whiteout_kind = wo.WHITEOUT_AUFS
    caller = Caller(os.getuid(), os.getgid(), os.getpid(), 0o022)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def run() -> None:
        root = sb.inodes.root
        if op == "mkdir":
            sb.inodes.forget((await ovl_dir.mkdir(sb, root, b"new", 0o755, caller)).ino, 1)
        elif op == "mknod":
            entry = await ovl_dir.mknod(sb, root, b"new", stat.S_IFIFO | 0o644, 0, caller)
            sb.inodes.forget(entry.ino, 1)
        elif op.startswith("unlink-over-lower"):
            await ovl_dir.unlink(sb, root, b"a")
        elif op.startswith("rename-over-lower"):
            await ovl_dir.rename(sb, root, b"a", root, b"b", 0)
        else:
            await ovl_dir.rmdir(sb, root, b"d")

    def assert_unchanged() -> None:
        upper = dirs["upper"]
        assert sorted(os.listdir(upper)) == ["a", "d"]
        assert (upper / "a").read_bytes() == b"copied up"
        assert os.listdir(upper / "d") == []

    async def main() -> None:
        held = _use_up_fds(free)
        try:
            await run()
        except OSError as e:
            assert e.errno == errno.EMFILE
            for fd in held:
                os.close(fd)
            held.clear()
            assert_unchanged()
            await run()   # what the native session does after a prune
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    try:
        trio.run(main)
        upper = dirs["upper"]
        if op in ("mkdir", "mknod"):
            st = os.lstat(upper / "new")
            assert stat.S_ISDIR(st.st_mode) if op == "mkdir" else stat.S_ISFIFO(st.st_mode)
        elif op == "unlink-over-lower":
            assert stat.S_ISCHR(os.lstat(upper / "a").st_mode)   # the whiteout
        elif op == "unlink-over-lower-aufs":
            assert not os.path.lexists(upper / "a")
            assert os.path.lexists(upper / ".wh.a")
        elif op.startswith("rename-over-lower"):
            # The copied-up data moved; a retry that saw the lower a again would have
            # copied it up over b.
            assert (upper / "b").read_bytes() == b"copied up"
            if op.endswith("-aufs"):
                assert not os.path.lexists(upper / "a")
                assert os.path.lexists(upper / ".wh.a")
            else:
                assert stat.S_ISCHR(os.lstat(upper / "a").st_mode)
        else:
            assert not os.path.lexists(upper / "d")
    finally:
        sb.inodes.forget_all()


def _tree(root: Path) -> dict[str, object]:
    """Every entry under ``root`` with its type, content and opaque marker."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_dir():
                out[rel] = ("dir", os.getxattr(p, "trusted.overlay.opaque")
                            if "trusted.overlay.opaque" in os.listxattr(p) else None)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


@pytest.mark.parametrize("failing", ["free fds", "make_whiteout", "remove_upper_whiteouts"])
def test_out_of_fds_a_directory_renamed_onto_a_merged_one_fails_whole(
        tmp_path: Path, failing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # AUFS whiteouts: the .wh. of the source is made before the target's own whiteouts are
    # emptied, so running out of fds in either step leaves the target's deleted lower
    # entries hidden. (A plain fd limit rarely fails the second step alone: each step gives
    # its fd back, so the injected failures stand for fds taken by other threads.)
    dirs = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "f").write_bytes(b"lower f")
    (dirs["lower"] / "d2").mkdir()
    (dirs["lower"] / "d2" / "x").write_bytes(b"deleted")
    (dirs["upper"] / "f").mkdir()               # an upper directory over a lower file
    (dirs["upper"] / "f" / "inside").write_bytes(b"kept")
    (dirs["upper"] / "d2").mkdir()              # merged, every entry deleted
    (dirs["upper"] / "d2" / ".wh.x").write_bytes(b"")
    params = OvlParams(lowerdirs=[str(dirs["lower"])], upperdir=str(dirs["upper"]),
                       workdir=str(dirs["work"]))
    sb = Superblock.mount(params, str(dirs["mnt"]))
    sb.whiteout_kind = wo.WHITEOUT_AUFS
    before = _tree(dirs["upper"])

    def emfile(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "injected")

    async def attempt() -> None:
        await ovl_dir.rename(sb, sb.inodes.root, b"f", sb.inodes.root, b"d2", 0)

    async def main() -> None:
        if failing == "free fds":
            for free in range(16):   # until the rename has the fds it needs
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                held = _use_up_fds(free)
                try:
                    await attempt()
                    return
                except OSError as e:
                    assert e.errno == errno.EMFILE
                finally:
                    for fd in held:
                        os.close(fd)
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                _assert_unchanged()
            raise AssertionError("the rename failed even with 15 free fds")
        with monkeypatch.context() as m:
            m.setattr(wo if failing == "make_whiteout" else ovl_dir, failing, emfile)
            with pytest.raises(OSError):
                await attempt()
        _assert_unchanged()
        await attempt()

    def _assert_unchanged() -> None:
        now = _tree(dirs["upper"])
        # The source may have become opaque already: invisible where it is (no lower
        # directory f), and what the retry does anyway.
        now["f"] = before["f"]
        assert now == before

    try:
        trio.run(main)
        assert _tree(dirs["upper"]) == {".wh.f": ("file", b""),
                                        "d2": ("dir", b"y"),
                                        "d2/inside": ("file", b"kept")}
    finally:
        sb.inodes.forget_all()
