"""passthru-only behaviour: cache modes, SOURCE changing underneath, lookup counts, symlinks
leading out of SOURCE, exact modes and ownership of new objects, writeback on and off.

Inode-table statistics come from the daemon's SIGUSR1 dump (``statistics: {...}`` in its
log, see ``conftest.PassthruMount.statistics``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from passthru_helpers import PassthruMount, StartPassthru

pytestmark = pytest.mark.timeout(60)


def _poll(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_cache_never_sees_source_changes_at_once(passthru_mount: StartPassthru) -> None:
    p = passthru_mount("cache=never")
    (p.source / "f").write_bytes(b"one")
    assert (p.mnt / "f").read_bytes() == b"one"
    assert not (p.mnt / "new").exists()

    (p.source / "f").write_bytes(b"second")
    (p.source / "new").write_bytes(b"n")
    assert (p.mnt / "f").read_bytes() == b"second"
    assert (p.mnt / "f").stat().st_size == 6
    assert (p.mnt / "new").read_bytes() == b"n"
    assert sorted(os.listdir(p.mnt)) == ["f", "new"]

    (p.source / "new").unlink()
    assert not (p.mnt / "new").exists()


def test_file_replaced_by_directory_in_source(passthru_mount: StartPassthru) -> None:
    p = passthru_mount("cache=never")
    (p.source / "x").write_bytes(b"file")
    old_ino = (p.mnt / "x").stat().st_ino
    held = open(p.mnt / "x", "rb")  # noqa: SIM115 - held across the replacement
    try:
        (p.source / "x").unlink()
        (p.source / "x").mkdir()
        (p.source / "x" / "inside").write_bytes(b"i")

        st = (p.mnt / "x").stat()
        assert stat.S_ISDIR(st.st_mode)
        assert st.st_ino == (p.source / "x").stat().st_ino != old_ino
        assert os.listdir(p.mnt / "x") == ["inside"]
        assert (p.mnt / "x" / "inside").read_bytes() == b"i"
        assert held.read() == b"file"  # the open file keeps its own backing fd
    finally:
        held.close()
    assert p.mount.process is not None and p.mount.process.poll() is None


def test_unlinked_open_file_keeps_working(passthru_mount: StartPassthru) -> None:
    p = passthru_mount()
    fd = os.open(p.mnt / "u", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.unlink(p.mnt / "u")
        assert os.write(fd, b"abcdef") == 6
        assert os.pread(fd, 3, 2) == b"cde"
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.listdir(p.source) == []


def test_drop_caches_shrinks_the_inode_table(passthru_mount: StartPassthru) -> None:
    p = passthru_mount("cache=always")
    for d in range(10):
        (p.source / f"d{d}").mkdir()
        for f in range(20):
            (p.source / f"d{d}" / f"f{f}").write_bytes(b"")
    baseline = p.statistics()
    assert baseline["inodes"] == 1  # the root only

    walked = sum(len(files) + len(dirs) for _, dirs, files in os.walk(p.mnt))
    assert walked == 210
    for d in range(10):  # plain lookups too, besides readdirplus entries
        (p.mnt / f"d{d}" / "f0").stat()
    assert p.statistics()["inodes"] >= 211

    def shrunk() -> bool:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        return p.statistics()["inodes"] == 1

    _poll(shrunk, "the inode table to shrink back to the root after drop_caches")
    stats = p.statistics()
    assert stats["lookups"] == 1 and stats["stale"] == 0 and stats["handles"] == 0


def test_known_objects_keep_one_inode_through_lookups_and_listings(
        passthru_mount: StartPassthru) -> None:
    """A name whose object already has an inode (inode.take_known: no open of its own)
    gives that inode, renamed or linked behind the mount too, with exact lookup counts; a
    new object at the name gets a new one."""
    p = passthru_mount("cache=never")
    d, md = p.source / "d", p.mnt / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    ino = (md / "f").stat().st_ino
    for _ in range(3):
        assert [(e.name, e.inode()) for e in os.scandir(md)] == [("f", ino)]
        assert (md / "f").stat().st_ino == ino
    os.rename(d / "f", d / "g")
    os.link(d / "g", d / "h")
    assert sorted((e.name, e.inode()) for e in os.scandir(md)) == [("g", ino), ("h", ino)]
    assert (md / "h").stat().st_nlink == 2 and (md / "h").read_bytes() == b"x"
    (d / "g").unlink()
    (d / "h").unlink()
    (d / "g").write_bytes(b"new")
    assert (md / "g").stat().st_ino == (d / "g").stat().st_ino
    assert (md / "g").read_bytes() == b"new"
    assert [e.name for e in os.scandir(md)] == ["g"]

    def shrunk() -> bool:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        return p.statistics()["inodes"] == 1

    _poll(shrunk, "the inode table to shrink back to the root after drop_caches")
    assert p.statistics()["lookups"] == 1


def test_symlinks_out_of_source_are_never_followed_by_the_daemon(
        passthru_mount: StartPassthru, tmp_path: Path) -> None:
    p = passthru_mount("cache=never")
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    os.symlink(outside, p.source / "abs")
    os.symlink("../outside", p.source / "rel")  # source/../outside
    os.symlink("../../../../../../../../etc/passwd", p.source / "up")
    before = outside.stat()

    for name, target in (("abs", str(outside)), ("rel", "../outside"),
                         ("up", "../../../../../../../../etc/passwd")):
        st = os.lstat(p.mnt / name)
        assert stat.S_ISLNK(st.st_mode), name
        assert st.st_size == len(target)
        assert os.readlink(p.mnt / name) == target
        # Changes aimed at the link itself land on the link in SOURCE, not on its target.
        os.lchown(p.mnt / name, 4321, 4321)
        os.utime(p.mnt / name, ns=(10**9, 10**9), follow_symlinks=False)
        backing = os.lstat(p.source / name)
        assert (backing.st_uid, backing.st_mtime_ns) == (4321, 10**9)

    after = outside.stat()
    assert (after.st_uid, after.st_mtime_ns) == (before.st_uid, before.st_mtime_ns)
    # Following a link is the kernel's job, in the caller's view: mnt/../outside here.
    assert os.path.realpath(p.mnt / "rel") == str(p.mnt.parent / "outside")
    assert sorted(os.listdir(p.mnt)) == ["abs", "rel", "up"]


def _make_objects(root: Path) -> dict[str, int]:
    """Create a file, a dir, a fifo and a set-id file with umask 022; return their modes."""
    old = os.umask(0o022)
    try:
        os.close(os.open(root / "file", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(root / "dir", 0o777)
        os.mkfifo(root / "fifo", 0o666)
        os.umask(0)
        os.close(os.open(root / "setid", os.O_CREAT | os.O_WRONLY, 0o6755))
        os.close(os.open(root / "wide", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(root / "sticky", 0o1777)
    finally:
        os.umask(old)
    names = ("file", "dir", "fifo", "setid", "wide", "sticky")
    return {n: os.lstat(root / n).st_mode for n in names}


def test_modes_of_new_objects_match_native(passthru_mount: StartPassthru,
                                           tmp_path: Path) -> None:
    p = passthru_mount()
    native = tmp_path / "native"
    native.mkdir()
    expected = _make_objects(native)
    assert stat.S_IMODE(expected["file"]) == 0o644  # the premise of the test
    got = _make_objects(p.mnt)
    assert {n: oct(m) for n, m in got.items()} == {n: oct(m) for n, m in expected.items()}
    backing = {n: os.lstat(p.source / n).st_mode for n in got}
    assert backing == got


# Run as nobody with the directory passed as an fd: pytest's tmp dirs are 0700, so nobody
# could not walk a path to the mount.
_CREATE_AS_NOBODY = """
import os, sys
d = int(sys.argv[1])
os.umask(0o022)
os.close(os.open("file", os.O_CREAT | os.O_WRONLY, 0o666, dir_fd=d))
os.mkdir("dir", 0o777, dir_fd=d)
os.symlink("target", "link", dir_fd=d)
os.mkfifo("fifo", dir_fd=d)
os.mknod("node", 0o644, dir_fd=d)
sub = os.open("dir", os.O_RDONLY | os.O_DIRECTORY, dir_fd=d)
os.close(os.open("nested", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=sub))
os.rename("file", "renamed", src_dir_fd=d, dst_dir_fd=d)
"""

_OPEN_AS_NOBODY = """
import os, sys
os.open("rootfile", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=int(sys.argv[1]))
"""


def _as_nobody(code: str, directory: Path) -> subprocess.CompletedProcess[str]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", code, str(fd)], pass_fds=(fd,),
                              capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_new_objects_belong_to_the_caller(passthru_mount: StartPassthru) -> None:
    p = passthru_mount("allow_other")
    shared = p.mnt / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = _as_nobody(_CREATE_AS_NOBODY, shared)
    assert r.returncode == 0, r.stderr
    for name, mode in (("renamed", 0o644), ("dir", 0o755), ("link", None), ("fifo", 0o644),
                       ("node", 0o644), ("dir/nested", 0o600)):
        for st in (os.lstat(shared / name), os.lstat(p.source / "shared" / name)):
            assert (st.st_uid, st.st_gid) == (65534, 65534), name
            if mode is not None:
                assert stat.S_IMODE(st.st_mode) == mode, name
    # default_permissions: the kernel refuses what nobody may not do (root's 0755 dir).
    r = _as_nobody(_OPEN_AS_NOBODY, p.mnt)
    assert r.returncode != 0 and "PermissionError" in r.stderr
    assert not (p.source / "rootfile").exists()


@pytest.mark.parametrize("mode", ["writeback", "nowriteback"])
def test_write_append_read(passthru_mount: StartPassthru, mode: str) -> None:
    p = passthru_mount(mode)
    path = p.mnt / "w"
    with open(path, "wb") as f:  # O_WRONLY: read-write on the backing side under writeback
        f.write(b"hello")
    with open(path, "ab") as a, open(path, "ab") as b:
        a.write(b" one")
        a.flush()
        b.write(b" two")
        b.flush()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"J", 0)
        assert os.pread(fd, 100, 0) == b"Jello one two"
        assert os.fstat(fd).st_size == 13
        os.pwrite(fd, b"!", 20)  # a hole, then one byte
        assert os.fstat(fd).st_size == 21
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"Jello one two" + b"\0" * 7 + b"!"
    assert (p.source / "w").read_bytes() == path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(4)
    assert path.stat().st_size == 4 and (p.source / "w").read_bytes() == b"Jell"


def test_o_trunc_and_o_excl(passthru_mount: StartPassthru) -> None:
    p = passthru_mount()
    (p.mnt / "t").write_bytes(b"long content")
    with open(p.mnt / "t", "r+b") as f:
        f.read()
    fd = os.open(p.mnt / "t", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert (p.source / "t").stat().st_size == 0
    with pytest.raises(FileExistsError):
        os.open(p.mnt / "t", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_readdir_lists_dots_and_d_ino_is_st_ino(passthru_mount: StartPassthru) -> None:
    p = passthru_mount()
    names = {f"n{i:04d}" for i in range(300)}
    for n in names:
        (p.source / n).write_bytes(b"")
    listing = subprocess.run(["ls", "-a", "-1", "-f", str(p.mnt)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing[:2] == [".", ".."]
    assert set(listing[2:]) == names and len(listing) == 302
    with os.scandir(p.mnt) as it:
        for entry in it:
            assert entry.inode() == entry.stat(follow_symlinks=False).st_ino
            assert entry.inode() == (p.source / entry.name).stat().st_ino
    assert p.mnt.stat().st_ino == 1


def test_statistics_count_handles(passthru_mount: StartPassthru) -> None:
    p: PassthruMount = passthru_mount()
    (p.source / "f").write_bytes(b"x")
    with open(p.mnt / "f", "rb"):
        stats = p.statistics()
        assert stats["handles"] == 1 and stats["opens"] >= 1
    _poll(lambda: p.statistics()["handles"] == 0, "the handle to be released")


def test_passthru_over_a_fuse_source_serves_flush(passthru_mount: StartPassthru) -> None:
    # On a FUSE (or network) SOURCE, close(2) can report errors: FLUSH closes a duplicate
    # of the backing fd instead of answering ENOSYS (passthru.file.flush).
    lower = passthru_mount()
    upper = passthru_mount("cache=never", source=lower.mnt)
    with open(upper.mnt / "f", "wb") as f:
        f.write(b"through two mounts")
    assert (lower.source / "f").read_bytes() == b"through two mounts"
    assert (upper.mnt / "f").read_bytes() == b"through two mounts"


def _tree(root: Path) -> dict[str, list[str]]:
    return {os.path.relpath(d, root): sorted(dirs + files) for d, dirs, files in os.walk(root)}


def test_native_session_lists_directories_without_handles(
        passthru_mount: StartPassthru) -> None:
    # FUSE_NO_OPENDIR_SUPPORT: one OPENDIR answered ENOSYS, then no OPENDIR/RELEASEDIR at
    # all; listings by the backing fs's cookies are what a plain directory gives.
    p = passthru_mount("session=native")
    for d in ("a", "a/b", "a/b/c", "e"):
        (p.source / d).mkdir()
        for i in range(150):
            (p.source / d / f"f{i:03d}").write_bytes(b"")
    for _ in range(3):
        assert _tree(p.mnt) == _tree(p.source)
    # changes through the mount drop the kernel's cached listings
    (p.mnt / "a" / "new").write_bytes(b"")
    shutil.rmtree(p.mnt / "a" / "b" / "c")
    assert _tree(p.mnt) == _tree(p.source)
    dfd = os.open(p.mnt / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)   # FSYNCDIR without a handle
        assert sorted(os.listdir(dfd)) == sorted(os.listdir(p.source / "a"))
    finally:
        os.close(dfd)
    requests = p.mount.session_statistics()["requests"]
    assert requests.get("OPENDIR") == 1 and "RELEASEDIR" not in requests, requests
    assert requests.get("FSYNCDIR") == 1, requests


def test_cache_never_keeps_directory_handles(passthru_mount: StartPassthru) -> None:
    # The kernel would keep every handle-less listing in its page cache: cache=never opens
    # each directory with a handle (OPENDIR, RELEASEDIR) and lists a fresh snapshot.
    p = passthru_mount("session=native", "cache=never")
    (p.source / "d").mkdir()
    assert os.listdir(p.mnt / "d") == []
    (p.source / "d" / "behind").write_bytes(b"")
    assert os.listdir(p.mnt / "d") == ["behind"]

    def released() -> bool:
        r = p.mount.session_statistics()["requests"]
        return r.get("OPENDIR", 0) >= 2 and r.get("RELEASEDIR") == r.get("OPENDIR")

    _poll(released, "every directory handle to be released")
