"""Kernel passthrough on the native session, observed through the mount and the daemon's
own request counters (SIGUSR1 -> ``session: {json}`` on its stderr).

What is proven here:
- data I/O on a passthrough open never reaches the daemon (READ = WRITE = 0), an O_TMPFILE
  one included, with ``passthrough=off`` it does, and the data is the same either way;
- shared mmap and fsync work through passthrough (FSYNC still reaches the daemon, which
  syncs the backing file);
- the backing id lives exactly as long as the inode's opens (open/close storm);
- overlay copy-up in every ordering of a read-only opener and a writer gives both the right
  data (lower files on a writable overlay go through the daemon; DESIGN note in
  overlay/file.py ``_passthrough_fd``);
- an unprivileged mount (fusermount3) falls back to userspace I/O, with the same behaviour.
"""

from __future__ import annotations

import mmap
import os
import pwd
import shutil
import site
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from backingfs.testing import (
    REPO_ROOT,
    FuseTargetMount,
    cli_argv,
    fuse_unavailable,
    is_fuse_mounted,
    start_daemon,
    start_fuse_target,
)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(fuse_unavailable() is not None or os.geteuid() != 0,
                                 reason="needs /dev/fuse, fusermount3 and root")]

MiB = 1 << 20


def _kernel_has_passthrough() -> bool:
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 9)


needs_passthrough = pytest.mark.skipif(not _kernel_has_passthrough(),
                                       reason="kernel FUSE passthrough needs Linux >= 6.9")


def _mount(argv: list[str], mnt: Path, data: Path | None = None) -> FuseTargetMount:
    return start_fuse_target(argv, mnt, data=data)


@pytest.fixture
def passthru(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FuseTargetMount]:
    mode = getattr(request, "param", "auto")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = _mount(cli_argv("passthru", "-o", f"session=native,passthrough={mode}", str(src),
                        str(mnt)), mnt, data=src)
    try:
        yield m
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()


def _ops(m: FuseTargetMount) -> dict[str, int]:
    return dict(m.mount.session_statistics()["requests"])


def _pt(m: FuseTargetMount) -> dict[str, object]:
    """The passthrough table once every closed file's RELEASE arrived: the kernel sends
    RELEASE asynchronously, after close() has returned."""
    deadline = time.monotonic() + 10
    while True:
        pt = dict(m.mount.session_statistics()["passthrough"])
        if pt["registered"] == 0 or time.monotonic() > deadline:
            return pt
        time.sleep(0.05)


def _payload(n: int, seed: int = 1) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[seed:seed + n]


@needs_passthrough
def test_passthrough_data_io_never_reaches_the_daemon(passthru: FuseTargetMount) -> None:
    path = passthru.root / "f"
    data = _payload(8 * MiB)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        assert f.read() == data
        f.seek(12345)
        f.write(b"patch")
        f.seek(12340)
        assert f.read(15) == data[12340:12345] + b"patch" + data[12350:12355]
    assert (passthru.data / "f").read_bytes()[12345:12350] == b"patch"
    assert os.stat(path).st_size == 8 * MiB  # GETATTR answers from the backing file
    ops = _ops(passthru)
    assert ops.get("READ", 0) == 0 and ops.get("WRITE", 0) == 0, ops
    assert ops["FSYNC"] >= 1 and ops["OPEN"] >= 1
    pt = _pt(passthru)
    assert pt["enabled"] and pt["registered"] == 0 and pt["ids_opened"] == pt["ids_closed"] >= 1


@needs_passthrough
def test_tmpfile_data_io_never_reaches_the_daemon(passthru: FuseTargetMount) -> None:
    """An O_TMPFILE open is answered as a create is, its backing file registered: its
    I/O, before and after a link publishes it, is the kernel's alone."""
    data = _payload(2 * MiB)
    fd = os.open(passthru.root, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, data)
        assert os.pread(fd, 100, MiB) == data[MiB:MiB + 100]
        dfd = os.open(passthru.root, os.O_PATH)
        try:
            os.link(f"/proc/self/fd/{fd}", "t", dst_dir_fd=dfd)
        finally:
            os.close(dfd)
        os.pwrite(fd, b"tail", len(data))
    finally:
        os.close(fd)
    assert (passthru.data / "t").read_bytes() == data + b"tail"
    assert (passthru.root / "t").read_bytes() == data + b"tail"
    ops = _ops(passthru)
    assert ops["TMPFILE"] == 1 and ops["LINK"] == 1, ops
    assert ops.get("READ", 0) == 0 and ops.get("WRITE", 0) == 0, ops
    pt = _pt(passthru)
    assert pt["registered"] == 0 and pt["ids_opened"] == pt["ids_closed"] >= 1


@needs_passthrough
def test_copy_file_range_is_the_backing_filesystems(passthru: FuseTargetMount) -> None:
    """copy_file_range between two passthrough opens: one COPY_FILE_RANGE request per
    call (were it refused, the kernel would send no second one and copy by itself),
    SOURCE's filesystem copies, no data comes through the daemon."""
    data = _payload(3 * MiB)
    (passthru.root / "a").write_bytes(data)
    before = _ops(passthru)
    src = os.open(passthru.root / "a", os.O_RDONLY)
    dst = os.open(passthru.root / "b", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.copy_file_range(src, dst, MiB, 0, 0) == MiB
        assert os.copy_file_range(src, dst, 2 * MiB, MiB, MiB) == 2 * MiB
    finally:
        os.close(src)
        os.close(dst)
    after = _ops(passthru)
    assert after["COPY_FILE_RANGE"] == before.get("COPY_FILE_RANGE", 0) + 2, after
    assert after.get("READ", 0) == after.get("WRITE", 0) == 0, after
    assert (passthru.data / "b").read_bytes() == data
    assert os.stat(passthru.root / "b").st_size == 3 * MiB


@pytest.mark.parametrize("passthru", ["off"], indirect=True)
def test_passthrough_off_serves_data_in_userspace(passthru: FuseTargetMount) -> None:
    path = passthru.root / "f"
    data = _payload(3 * MiB)
    path.write_bytes(data)
    assert path.read_bytes() == data
    ops = _ops(passthru)
    assert ops["WRITE"] > 0, ops
    assert _pt(passthru)["ids_opened"] == 0


@needs_passthrough
def test_shared_mmap_through_passthrough(passthru: FuseTargetMount) -> None:
    path = passthru.root / "m"
    path.write_bytes(bytes(2 * 4096))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 2 * 4096, mmap.MAP_SHARED) as mm:
            mm[4096:4101] = b"mmapd"
            mm.flush()
        assert os.pread(fd, 5, 4096) == b"mmapd"
    finally:
        os.close(fd)
    assert (passthru.data / "m").read_bytes()[4096:4101] == b"mmapd"
    # and a change made in the backing file is seen through a new mapping
    with open(passthru.data / "m", "r+b") as f:
        f.seek(10)
        f.write(b"outside")
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
            assert mm[10:17] == b"outside"
    finally:
        os.close(fd)
    ops = _ops(passthru)
    assert ops.get("READ", 0) == 0 and ops.get("WRITE", 0) == 0, ops


@needs_passthrough
def test_backing_id_closed_only_after_the_last_release_under_a_storm(
        passthru: FuseTargetMount) -> None:
    path = passthru.root / "s"
    data = _payload(64 * 1024, seed=7)
    path.write_bytes(data)
    errors: list[BaseException] = []
    holder = open(path, "rb")  # noqa: SIM115 - held across the storm on purpose

    def storm(n: int) -> None:
        try:
            for i in range(n):
                with open(path, "rb" if i % 2 else "r+b") as f:
                    if f.read() != data:
                        raise AssertionError("short or wrong read during the storm")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=storm, args=(300,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert holder.read() == data
    holder.close()
    assert not errors, errors
    pt = _pt(passthru)
    assert pt["registered"] == 0 and pt["passthrough_opens"] == 0
    assert pt["ids_opened"] == pt["ids_closed"] >= 1
    ops = _ops(passthru)
    assert ops.get("READ", 0) == 0 and ops["RELEASE"] >= 1200


# --- overlay and copy-up ----------------------------------------------------------------------


def _overlay(tmp_path: Path, extra: str = "") -> Iterator[FuseTargetMount]:
    """A writable overlay on the native session, lower files a, b, c, d."""
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    for name in ("a", "b", "c", "d"):
        (d["lower"] / name).write_bytes(b"lower " + name.encode() * 1000)
    opts = (f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']},"
            f"session=native{extra}")
    m = _mount(cli_argv("overlay", "-o", opts, str(d["mnt"])), d["mnt"], data=d["lower"])
    try:
        yield m
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[FuseTargetMount]:
    yield from _overlay(tmp_path)


def _rw_check(reader_first: bool, mnt: Path, name: str) -> None:
    path = mnt / name
    old = path.read_bytes()
    # unbuffered: a Python buffer would hide what the filesystem returns
    if reader_first:
        r = open(path, "rb", buffering=0)  # noqa: SIM115
        w = open(path, "r+b", buffering=0)  # noqa: SIM115 - copies up under the reader
    else:
        w = open(path, "r+b", buffering=0)  # noqa: SIM115
        r = open(path, "rb", buffering=0)  # noqa: SIM115
    with r, w:
        assert r.read(6) == b"lower "
        w.seek(0)
        w.write(b"UPPER!")
        w.flush()
        r.seek(0)
        assert r.read() == b"UPPER!" + old[6:], f"stale data for {name}"


@needs_passthrough
def test_copy_up_orderings_give_both_openers_the_right_data(
        overlay: FuseTargetMount) -> None:
    mnt = overlay.root
    upper = mnt.parent / "upper"
    # 1. reader on the lower file first, then a writer copies up under it
    _rw_check(True, mnt, "a")
    # 2. writer first (copy-up, passthrough on the upper), then a reader
    _rw_check(False, mnt, "b")
    # 3. a reader opens and closes the lower file, then writer and reader overlap
    (mnt / "c").read_bytes()
    _rw_check(False, mnt, "c")
    # 4. after everything closed, the now-upper file is served by passthrough
    before = _ops(overlay)
    with open(mnt / "a", "r+b", buffering=0) as f:
        f.seek(100)
        f.write(b"again")
        f.seek(98)
        assert f.read(9)[2:7] == b"again"
    after = _ops(overlay)
    assert after.get("READ", 0) == before.get("READ", 0)
    assert after.get("WRITE", 0) == before.get("WRITE", 0)
    for name in "abc":
        assert (upper / name).read_bytes()[:6] == b"UPPER!"
    assert not (upper / "d").exists()
    pt = _pt(overlay)
    assert pt["registered"] == 0 and pt["ids_opened"] == pt["ids_closed"] >= 1


@needs_passthrough
def test_overlay_copy_file_range_from_a_lower_file(overlay: FuseTargetMount) -> None:
    """From a lower file (read through the daemon on a writable overlay) into an upper
    one: a COPY_FILE_RANGE per call, the real files copy, no READ or WRITE."""
    mnt = overlay.root
    old = (mnt.parent / "lower" / "a").read_bytes()
    half = len(old) // 2
    before = _ops(overlay)
    src = os.open(mnt / "a", os.O_RDONLY)
    dst = os.open(mnt / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.copy_file_range(src, dst, half, 0, 0) == half
        assert os.copy_file_range(src, dst, len(old), half, half) == len(old) - half
    finally:
        os.close(src)
        os.close(dst)
    after = _ops(overlay)
    assert after["COPY_FILE_RANGE"] == before.get("COPY_FILE_RANGE", 0) + 2, after
    assert after.get("READ", 0) == before.get("READ", 0), after
    assert after.get("WRITE", 0) == before.get("WRITE", 0), after
    assert (mnt.parent / "upper" / "new").read_bytes() == old
    assert not (mnt.parent / "upper" / "a").exists()  # the source was not copied up


@pytest.fixture
def lower_pt(tmp_path: Path) -> Iterator[FuseTargetMount]:
    """The same with ``-o lower_passthrough``."""
    yield from _overlay(tmp_path, ",lower_passthrough")


@needs_passthrough
def test_lower_passthrough_orderings(lower_pt: FuseTargetMount) -> None:
    # fuse-overlayfs's semantics, by choice of the mount: a file opened read-only before a
    # copy-up keeps reading the lower file; every later open sees the upper copy; stat
    # sees one st_ino throughout; no READ or WRITE reaches the daemon.
    mnt = lower_pt.root
    upper, lower = mnt.parent / "upper", mnt.parent / "lower"
    ino = {n: os.stat(mnt / n).st_ino for n in "abcd"}
    before = _ops(lower_pt)

    # 1. a reader on the lower file, then a writer (its open is answered ESTALE once and
    #    the kernel opens a new inode of the path)
    with open(mnt / "a", "rb", buffering=0) as r:
        assert r.read(6) == b"lower "
        with open(mnt / "a", "r+b", buffering=0) as w:
            w.write(b"UPPER!")
            assert os.fstat(w.fileno()).st_ino == ino["a"]
        r.seek(0)
        assert r.read(6) == b"lower ", "the old reader keeps the lower file"
        assert os.fstat(r.fileno()).st_ino == ino["a"]
        with open(mnt / "a", "rb", buffering=0) as r2:
            assert r2.read(6) == b"UPPER!"
    # 2. a reader, a copy-up by chmod (no open), then a new reader and a writer
    with open(mnt / "b", "rb", buffering=0) as r:
        assert r.read(6) == b"lower "
        os.chmod(mnt / "b", 0o600)
        with open(mnt / "b", "rb", buffering=0) as r2, \
                open(mnt / "b", "r+b", buffering=0) as w:
            w.write(b"UPPER!")
            assert r2.read(6) == b"UPPER!"
        r.seek(0)
        assert r.read(6) == b"lower "
    # 3. a reader opens and closes the lower file, then writer and reader overlap: nothing
    #    to detach
    (mnt / "c").read_bytes()
    _rw_check(False, mnt, "c")
    # 4. truncate(2) of the path under a reader
    with open(mnt / "d", "rb", buffering=0) as r:
        os.truncate(mnt / "d", 3)
        assert os.stat(mnt / "d").st_size == 3
        assert (mnt / "d").read_bytes() == b"low"
        r.seek(0)
        assert r.read(6) == b"lower "

    after = _ops(lower_pt)
    assert after.get("READ", 0) == before.get("READ", 0), after
    assert after.get("WRITE", 0) == before.get("WRITE", 0), after
    assert {n: os.stat(mnt / n).st_ino for n in "abcd"} == ino
    assert (upper / "a").read_bytes()[:6] == b"UPPER!"
    assert (upper / "b").read_bytes()[:6] == b"UPPER!"
    assert stat.S_IMODE(os.stat(upper / "b").st_mode) == 0o600
    assert (upper / "d").read_bytes() == b"low"
    for name in "abcd":
        assert (lower / name).read_bytes() == b"lower " + name.encode() * 1000
    pt = _pt(lower_pt)
    assert pt["registered"] == 0 and pt["ids_opened"] == pt["ids_closed"] >= 4


def _write_while_readers_open(path: Path, mode: str, readers: list[BinaryIO]) -> None:
    """Open ``path`` with ``mode`` and write b"W" in a thread while opening readers of it
    (appended to ``readers``, closed by the caller) until the writer is done or there are
    500; the writer must succeed."""
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(path, mode, buffering=0) as w:
                w.write(b"W")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        while t.is_alive() and len(readers) < 500:
            readers.append(open(path, "rb", buffering=0))  # noqa: SIM115 - caller closes
            time.sleep(0.0005)
    finally:
        t.join(60)
    assert not errors, errors


@needs_passthrough
def test_lower_passthrough_readers_opening_during_a_copy_up(lower_pt: FuseTargetMount) -> None:
    # Readers that open the lower file while a writer's open copies it up register the
    # lower file after the writer's open checked for readers: the writer must still get the
    # upper copy (detached again, not EIO, never the lower file).
    mnt = lower_pt.root
    upper, lower = mnt.parent / "upper", mnt.parent / "lower"
    big = _payload(64 * MiB, seed=5)
    (lower / "big").write_bytes(big)
    os.stat(mnt / "big")
    readers: list[BinaryIO] = []
    try:
        _write_while_readers_open(mnt / "big", "r+b", readers)
        for r in readers:
            assert r.read(2) in (big[:2], b"W" + big[1:2])
    finally:
        for r in readers:
            r.close()
    with open(mnt / "big", "rb", buffering=0) as r:
        assert r.read(2) == b"W" + big[1:2]
    assert (upper / "big").read_bytes()[:2] == b"W" + big[1:2]
    assert (lower / "big").read_bytes()[:2] == big[:2]
    pt = _pt(lower_pt)
    assert pt["registered"] == 0 and pt["ids_opened"] == pt["ids_closed"]


@needs_passthrough
def test_lower_passthrough_twins_share_attribute_changes(lower_pt: FuseTargetMount) -> None:
    # An fd opened before the copy-up and the path are two kernel inodes of one upper file
    # (the detached one and its successor): a chmod, chown, utime or xattr change through
    # either shows through the other at once (the overlay's attribute timeout is unlimited).
    mnt = lower_pt.root
    f = mnt / "a"
    r = os.open(f, os.O_RDONLY)
    try:
        with open(f, "ab") as w:          # copies up and detaches the reader's inode
            w.write(b"+")
        assert os.fstat(r).st_ino == os.stat(f).st_ino
        os.fchmod(r, 0o600)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        os.chmod(f, 0o640)
        assert stat.S_IMODE(os.fstat(r).st_mode) == 0o640
        os.utime(f, ns=(1_000_000_000, 2_000_000_000))
        assert os.fstat(r).st_mtime_ns == 2_000_000_000
        os.chown(r, 1000, 1000)
        assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1000, 1000)
        os.setxattr(f, "user.k", b"v")
        assert os.getxattr(f"/proc/self/fd/{r}", "user.k") == b"v"
        assert os.pread(r, 7, 0) == b"lower a"   # still the lower file's data
    finally:
        os.close(r)


@needs_passthrough
def test_lower_passthrough_o_trunc_open_under_readers(lower_pt: FuseTargetMount) -> None:
    # An O_TRUNC open while lower passthrough readers last copies the whole file up (the
    # retried open truncates): a reader from before keeps the lower data, never zeroes or
    # a short file, whatever readers open meanwhile; the lower file is never touched.
    mnt = lower_pt.root
    upper, lower = mnt.parent / "upper", mnt.parent / "lower"
    big = _payload(64 * MiB, seed=6)
    (lower / "big").write_bytes(big)
    first = open(mnt / "big", "rb", buffering=0)  # noqa: SIM115 - closed below
    readers: list[BinaryIO] = [first]
    try:
        _write_while_readers_open(mnt / "big", "wb", readers)
        assert os.pread(first.fileno(), 2, 0) == big[:2]
        assert os.pread(first.fileno(), 2, len(big) - 2) == big[-2:]
        for r in readers[1:]:
            assert os.pread(r.fileno(), 2, 0) in (big[:2], b"", b"W")
    finally:
        for r in readers:
            r.close()
    assert (mnt / "big").read_bytes() == b"W"
    assert (upper / "big").read_bytes() == b"W"
    assert (lower / "big").read_bytes() == big
    pt = _pt(lower_pt)
    assert pt["registered"] == 0 and pt["ids_opened"] == pt["ids_closed"]


@needs_passthrough
def test_read_only_overlay_serves_lower_files_by_passthrough(tmp_path: Path) -> None:
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    data = _payload(4 * MiB, seed=3)
    (lower / "img").write_bytes(data)
    m = _mount(cli_argv("overlay", "-o", f"lowerdir={lower},session=native", str(mnt)), mnt)
    try:
        assert (mnt / "img").read_bytes() == data
        ops = _ops(m)
        assert ops.get("READ", 0) == 0, ops
        m.mount.unmount_clean()
    finally:
        m.mount.force_cleanup()


# --- unprivileged fallback ------------------------------------------------------------------------


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.fixture
def dev_fuse_for_users() -> Iterator[None]:
    """/dev/fuse is 0666 on a normal system (fusermount3 opens it as the user); some
    containers make it 0600. Open it up for the test and restore the mode after."""
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def _interpreter_for(user: pwd.struct_passwd) -> tuple[list[str], dict[str, str]] | None:
    """An interpreter ``user`` can run with our packages importable: ours, or else (ours
    may live under root's home) the system python of the same version, given our
    site-packages on PYTHONPATH."""
    drop = _as(user)
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    path = os.pathsep.join([REPO_ROOT, *site.getsitepackages()])
    for exe in candidates:
        probe = subprocess.run([*drop, exe, "-c", "import trio, backingfs.native"],
                               capture_output=True, env=dict(os.environ, PYTHONPATH=path),
                               cwd="/")
        if probe.returncode == 0:
            return [exe], {"PYTHONPATH": path}
    return None


def _as(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            "--"]


@pytest.mark.skipif(shutil.which("setpriv") is None or _nobody() is None,
                    reason="needs setpriv and a 'nobody' user")
def test_unprivileged_mount_falls_back_to_userspace_io(tmp_path: Path,
                                                       dev_fuse_for_users: None) -> None:
    """Mounted by 'nobody' through fusermount3: BACKING_OPEN is refused (no
    CAP_SYS_ADMIN), logged once, and files behave the same through the daemon."""
    nobody = _nobody()
    assert nobody is not None
    opened = _open_path_to(tmp_path)
    try:
        _unprivileged_mount_check(tmp_path, nobody)
    finally:
        for path, mode in opened:
            path.chmod(mode)


def _open_path_to(path: Path) -> list[tuple[Path, int]]:
    """Let other users traverse to ``path`` (pytest makes its base dir 0700); returns the
    modes to restore."""
    changed = []
    for p in (path, *path.parents):
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o055 != 0o055:
            changed.append((p, mode))
            p.chmod(mode | 0o055)
    return changed


def _unprivileged_mount_check(tmp_path: Path, nobody: pwd.struct_passwd) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    for p in (src, mnt):
        p.mkdir()
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    interp = _interpreter_for(nobody)
    if interp is None:
        pytest.skip("no interpreter with our packages that 'nobody' can run")
    exe, env = interp
    argv = [*_as(nobody), *exe, "-m", "passthru", "-f", "-o", "session=native", str(src),
            str(mnt)]
    mount = start_daemon(argv, str(mnt), env=env)
    try:
        mount.wait_live()
        path = mnt / "f"
        data = _payload(2 * MiB, seed=5)
        subprocess.run([*_as(nobody), "dd", f"of={path}", "bs=64k", "status=none"],
                       input=data, check=True)
        out = subprocess.run([*_as(nobody), "cat", str(path)], capture_output=True,
                             check=True).stdout
        assert out == data
        assert (src / "f").read_bytes() == data
        assert os.stat(src / "f").st_uid == nobody.pw_uid
        stats = mount.session_statistics()  # setpriv execs: the pid is the daemon's
        assert stats["requests"].get("WRITE", 0) > 0, stats
        assert stats["passthrough"]["ids_opened"] == 0
        if _kernel_has_passthrough():
            assert mount.stderr_text().count("kernel passthrough refused") == 1, \
                mount.stderr_text()
        subprocess.run([*_as(nobody), "fusermount3", "-u", str(mnt)], check=True)
        assert mount.wait_exit(10) == 0
    finally:
        mount.force_cleanup()


def test_passthrough_on_with_writeback_fails_the_mount(tmp_path: Path) -> None:
    """passthrough=on where the kernel cannot do it (here: with the writeback cache) is an
    error, not a silent fallback: the daemon logs why, unmounts and exits 1."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    mount = start_daemon(cli_argv("passthru", "-o", "session=native,passthrough=on,writeback",
                                  str(src), str(mnt)), str(mnt))
    try:
        assert mount.wait_exit(15) == 1
        assert "passthrough=on but kernel passthrough is unavailable" in mount.stderr_text()
        assert not is_fuse_mounted(str(mnt))
    finally:
        mount.force_cleanup()
