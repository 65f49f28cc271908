"""lsattr/chattr through the mount: the file attributes of FS_IOC_GETFLAGS/SETFLAGS and of
FS_IOC_FSGETXATTR/FSSETXATTR on regular files and directories, and what +i and +a then
forbid.

On a FUSE mount the kernel turns both forms into FUSE_IOCTL (native session). ext4 and
the kernel's overlayfs agree on every outcome here, including the errors: ENOTTY for a
fifo (the VFS asks no filesystem), EOPNOTSUPP for a flag ext4 does not take on a file and for a
project id without project quotas. The one exception: what a handle opened before chattr
+i may still write (``_immutable_handle_outcomes``).

The pyfuse3 front-end has no FUSE_IOCTL handler: libfuse answers ENOSYS, and lsattr and
chattr fail with ENOTTY/EOPNOTSUPP there.

Every test that sets +i or +a takes them off again whatever happens (``protected``):
a flagged object left in the test directory could not be removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from frontend_gaps import differs_on_pyfuse3
from test_bhv_perms import as_nobody

from backingfs.syscalls import AT_FDCWD, RENAME_EXCHANGE, fallocate, renameat2
from backingfs.testing import raises_errno

pytestmark = pytest.mark.timeout(60)

F = TypeVar("F", bound=Callable[..., Any])

GETFLAGS, SETFLAGS = 0x80086601, 0x40086602
FSGETXATTR, FSSETXATTR = 0x801C581F, 0x401C5820
FSX = struct.Struct("=IIIII8x")
SYNC, IMMUTABLE, APPEND, NODUMP, NOATIME = 0x8, 0x10, 0x20, 0x40, 0x80
CASEFOLD = 0x40000000  # FS_CASEFOLD_FL: for directories only on ext4, refused on a file
X_IMMUTABLE, X_APPEND, X_SYNC, X_NOATIME, X_NODUMP = 0x8, 0x10, 0x20, 0x40, 0x80
#: The bits these tests set; the rest (extents, ...) are the filesystem's choice.
OURS = SYNC | IMMUTABLE | APPEND | NODUMP | NOATIME

_NO_IOCTL = ("pyfuse3 3.5 has no FUSE_IOCTL handler (libfuse answers ENOSYS): lsattr and "
             "chattr through the mount fail")


_differs_on_pyfuse3 = differs_on_pyfuse3(_NO_IOCTL)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def getflags(path: Path) -> int:
    fd = _open(path)
    try:
        return struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
    finally:
        os.close(fd)


def chattr(path: Path, add: int = 0, remove: int = 0) -> int:
    """chattr(1)'s read-modify-write; the flags read back afterwards."""
    fd = _open(path)
    try:
        flags = struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
        fcntl.ioctl(fd, SETFLAGS, struct.pack("=I", (flags | add) & ~remove))
        return struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
    finally:
        os.close(fd)


def fsx(path: Path) -> list[int]:
    fd = _open(path)
    try:
        return list(FSX.unpack(fcntl.ioctl(fd, FSGETXATTR, bytes(FSX.size))))
    finally:
        os.close(fd)


def set_fsx(path: Path, fields: list[int]) -> None:
    fd = _open(path)
    try:
        fcntl.ioctl(fd, FSSETXATTR, FSX.pack(*fields))
    finally:
        os.close(fd)


@contextlib.contextmanager
def protected(fs: Path, behind: Path | None, *names: str, flag: int) -> Iterator[None]:
    """Set ``flag`` (+i or +a) on ``names`` through the mount; take +i/+a off them again on
    the way out, through the mount, else behind it (chattr -ia on the backing object)."""
    try:
        for name in names:
            chattr(fs / name, add=flag)
        yield
    finally:
        for name in names:
            try:
                chattr(fs / name, remove=IMMUTABLE | APPEND)
            except OSError:
                for root in (behind, fs):
                    if root is not None and (root / name).exists():
                        subprocess.run(["chattr", "-ia", str(root / name)],
                                       capture_output=True, check=False)


def outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def write(path: Path, flags: int = os.O_WRONLY, data: bytes = b"w") -> None:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@_differs_on_pyfuse3
def test_new_objects_carry_none_of_these_flags(fs: Path) -> None:
    (fs / "f").write_bytes(b"data")
    (fs / "d").mkdir()
    assert getflags(fs / "f") & OURS == 0
    assert getflags(fs / "d") & OURS == 0
    assert fsx(fs / "f")[0] & (X_IMMUTABLE | X_APPEND | X_SYNC | X_NOATIME | X_NODUMP) == 0


@_differs_on_pyfuse3
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_nodump_noatime_sync_set_and_cleared(fs: Path, kind: str) -> None:
    path = fs / kind
    if kind == "dir":
        path.mkdir()
    else:
        path.write_bytes(b"data")
    assert chattr(path, add=NODUMP | NOATIME | SYNC) & OURS == NODUMP | NOATIME | SYNC
    assert getflags(path) & OURS == NODUMP | NOATIME | SYNC  # a fresh open sees them
    assert chattr(path, remove=NOATIME | SYNC) & OURS == NODUMP
    assert chattr(path, remove=NODUMP) & OURS == 0
    if kind == "file":
        assert path.read_bytes() == b"data"


@_differs_on_pyfuse3
def test_both_forms_show_the_same_flags(fs: Path) -> None:
    (fs / "f").write_bytes(b"data")
    chattr(fs / "f", add=NODUMP)
    fields = fsx(fs / "f")
    assert fields[0] & X_NODUMP
    fields[0] |= X_NOATIME
    set_fsx(fs / "f", fields)
    assert getflags(fs / "f") & OURS == NODUMP | NOATIME
    assert fsx(fs / "f")[0] & (X_NODUMP | X_NOATIME) == X_NODUMP | X_NOATIME


@_differs_on_pyfuse3
def test_immutable_file_refuses_changes_until_cleared(fs: Path, behind: Path | None,
                                                     target_name: str) -> None:
    (fs / "f").write_bytes(b"fixed")
    with protected(fs, behind, "f", flag=IMMUTABLE):
        assert getflags(fs / "f") & OURS == IMMUTABLE
        got = {
            "write": outcome(lambda: write(fs / "f")),
            "append": outcome(lambda: write(fs / "f", os.O_WRONLY | os.O_APPEND)),
            "truncate": outcome(lambda: os.truncate(fs / "f", 0)),
            "chmod": outcome(lambda: os.chmod(fs / "f", 0o600)),
            "utime": outcome(lambda: os.utime(fs / "f")),
            "setxattr": outcome(lambda: os.setxattr(fs / "f", "user.x", b"1")),
            "rename": outcome(lambda: os.rename(fs / "f", fs / "g")),
            "link": outcome(lambda: os.link(fs / "f", fs / "h")),
            "unlink": outcome(lambda: os.unlink(fs / "f")),
            "read": outcome(lambda: (fs / "f").read_bytes()),
            "chattr +d": outcome(lambda: chattr(fs / "f", add=NODUMP)),
        }
        # ext4 changes no other flag of an immutable file; the kernel's overlayfs keeps +i
        # in an xattr, and sets the others on an upper file that is not immutable.
        overlay = "overlay" in target_name
        assert got == {**dict.fromkeys(got, "EPERM"), "read": "ok",
                       "chattr +d": "ok" if overlay else "EPERM"}
        assert (fs / "f").read_bytes() == b"fixed"
        chattr(fs / "f", remove=IMMUTABLE)
        write(fs / "f", os.O_WRONLY | os.O_APPEND, b"!")
        assert (fs / "f").read_bytes() == b"fixed!"
    os.unlink(fs / "f")
    assert os.listdir(fs) == []


@_differs_on_pyfuse3
def test_append_only_file_takes_appends_only(fs: Path, behind: Path | None) -> None:
    (fs / "log").write_bytes(b"one\n")
    with protected(fs, behind, "log", flag=APPEND):
        write(fs / "log", os.O_WRONLY | os.O_APPEND, b"two\n")
        got = {
            "write": outcome(lambda: write(fs / "log")),
            "rdwr": outcome(lambda: write(fs / "log", os.O_RDWR)),
            "trunc": outcome(lambda: write(fs / "log", os.O_WRONLY | os.O_APPEND | os.O_TRUNC)),
            "truncate": outcome(lambda: os.truncate(fs / "log", 0)),
            "unlink": outcome(lambda: os.unlink(fs / "log")),
            "rename": outcome(lambda: os.rename(fs / "log", fs / "x")),
        }
        assert got == dict.fromkeys(got, "EPERM")
        assert (fs / "log").read_bytes() == b"one\ntwo\n"
    write(fs / "log", os.O_WRONLY | os.O_TRUNC, b"reset")
    assert (fs / "log").read_bytes() == b"reset"


@_differs_on_pyfuse3
@pytest.mark.parametrize("flag", [IMMUTABLE, APPEND], ids=["immutable", "append-only"])
def test_xattr_create_and_replace_refused_before_their_own_checks(
        fs: Path, behind: Path | None, flag: int) -> None:
    """xattr_permission's EPERM comes before XATTR_CREATE's EEXIST and XATTR_REPLACE's
    ENODATA (the FUSE front-end checks those itself: the daemon must refuse first)."""
    (fs / "f").write_bytes(b"x")
    os.setxattr(fs / "f", "user.there", b"1")
    with protected(fs, behind, "f", flag=flag):
        got = {
            "replace missing": outcome(lambda: os.setxattr(fs / "f", "user.gone", b"2",
                                                           os.XATTR_REPLACE)),
            "create existing": outcome(lambda: os.setxattr(fs / "f", "user.there", b"2",
                                                           os.XATTR_CREATE)),
            "replace existing": outcome(lambda: os.setxattr(fs / "f", "user.there", b"2",
                                                            os.XATTR_REPLACE)),
            "remove": outcome(lambda: os.removexattr(fs / "f", "user.there")),
        }
        assert got == dict.fromkeys(got, "EPERM")
        assert os.getxattr(fs / "f", "user.there") == b"1"


@_differs_on_pyfuse3
@pytest.mark.tree({"d/": None, "d/x": b"x", "f": b"data"})
@pytest.mark.parametrize("flag", [IMMUTABLE, APPEND], ids=["immutable", "append-only"])
def test_exchange_with_a_protected_file_is_refused_first(fs: Path, behind: Path | None,
                                                         flag: int) -> None:
    """may_delete's EPERM comes before the filesystem's own refusals: on an overlay whose
    ``d`` is a lower directory, before the EXDEV of renaming it."""
    with protected(fs, behind, "f", flag=flag):
        for a, b in (("d", "f"), ("f", "d")):
            with raises_errno(errno.EPERM):
                renameat2(AT_FDCWD, os.fsencode(fs / a), AT_FDCWD, os.fsencode(fs / b),
                          RENAME_EXCHANGE)
    assert sorted(os.listdir(fs)) == ["d", "f"]
    assert (fs / "f").read_bytes() == b"data"


KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


@_differs_on_pyfuse3
@pytest.mark.parametrize("flag", [IMMUTABLE, APPEND], ids=["immutable", "append-only"])
def test_fallocate_on_a_handle_opened_before_the_flag(fs: Path, behind: Path | None,
                                                      flag: int) -> None:
    """vfs_fallocate checks the flags at every call, not at open: on +i nothing, on +a
    only what changes no byte (plain allocation, with or without KEEP_SIZE)."""
    (fs / "f").write_bytes(b"x" * 8192)
    fd = os.open(fs / "f", os.O_RDWR | os.O_CLOEXEC)
    try:
        with protected(fs, behind, "f", flag=flag):
            got = {
                "allocate": outcome(lambda: fallocate(fd, 0, 0, 16384)),
                "keep size": outcome(lambda: fallocate(fd, KEEP_SIZE, 16384, 4096)),
                "punch hole": outcome(lambda: fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 4096)),
                "zero range": outcome(lambda: fallocate(fd, ZERO_RANGE, 0, 4096)),
            }
            assert (fs / "f").read_bytes()[:8192] == b"x" * 8192
        if flag == IMMUTABLE:
            assert got == dict.fromkeys(got, "EPERM")
            assert os.stat(fs / "f").st_size == 8192
        else:
            assert got == {"allocate": "ok", "keep size": "ok", "punch hole": "EPERM",
                           "zero range": "EPERM"}
            assert os.stat(fs / "f").st_size == 16384
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 4096)  # the flag is off again
        assert os.pread(fd, 8, 0) == bytes(8)
    finally:
        os.close(fd)


def _fd_getflags(fd: int) -> int:
    return struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]


def setflags(path: Path, flags: int) -> None:
    """SETFLAGS alone on an open of its own, no read-back (chattr(1) reads on that open
    first; here the value comes from another open)."""
    fd = _open(path)
    try:
        fcntl.ioctl(fd, SETFLAGS, struct.pack("=I", flags))
    finally:
        os.close(fd)


#: What a handle opened before +i can still do to the file (the calls not refused). ext4
#: checks +i on the inode at every write and truncate (ext4_write_checks, ext4_setattr),
#: and so for passthru's targets, whose backing file carries the flag. The kernel's
#: overlayfs keeps +i on its own inode (``overlay.protattr``), not on the upper file, and
#: checks it where the VFS does: at open (may_open), in notify_change for mode/owner/times,
#: in xattr_permission, in vfs_fallocate; write(2) through an open file and ftruncate(2)
#: (ovl_setattr -> notify_change on the upper inode, size only) then reach an upper file
#: without the flag. Our overlay keeps +i the same way, so writes pass too (through kernel
#: passthrough, or the daemon's write to the upper file), but ftruncate(2) comes as
#: FUSE_SETATTR, which the daemon checks against +i like any setattr
#: (protattr.check_setattr): EPERM, as ext4.
_DATA_OPS = ("write", "pwrite", "append write")


def _immutable_handle_outcomes(target_name: str) -> dict[str, str]:
    if target_name == "kernel-overlay":
        return dict.fromkeys((*_DATA_OPS, "ftruncate"), "ok")
    if target_name.startswith("overlay-"):
        return dict.fromkeys(_DATA_OPS, "ok")
    return {}  # native, passthru*: refused like every change


@_differs_on_pyfuse3
@pytest.mark.tree({"old": b"0123456789"})
@pytest.mark.parametrize("name", ["new", "old"], ids=["made", "pre-existing"])
@pytest.mark.parametrize("flag", [IMMUTABLE, APPEND], ids=["immutable", "append-only"])
def test_handles_opened_before_the_flag(fs: Path, behind: Path | None, target_name: str,
                                        flag: int, name: str) -> None:
    """Handles opened (for write, and for append) before chattr +i/+a: what each call
    through them may still do. On +a every target agrees: data writes anywhere through
    the old handle (the O_APPEND rule is may_open's), and of the metadata only times set
    to now (touch). On +i the targets differ for the data: ``_immutable_handle_outcomes``."""
    if name == "new":
        (fs / name).write_bytes(b"0123456789")
    path = fs / name
    uid = os.stat(path).st_uid
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # an old file: copied up here
    afd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        with protected(fs, behind, name, flag=flag):
            got = {
                "write": outcome(lambda: os.write(fd, b"w")),
                "pwrite": outcome(lambda: os.pwrite(fd, b"p", 2)),
                "append write": outcome(lambda: os.write(afd, b"A")),
                "ftruncate": outcome(lambda: os.ftruncate(fd, 4)),
                "fchmod": outcome(lambda: os.fchmod(fd, 0o600)),
                "fchown": outcome(lambda: os.fchown(fd, uid, -1)),
                "futimens now": outcome(lambda: os.utime(fd)),
                "futimens set": outcome(lambda: os.utime(fd, (1, 1))),
                "fsetxattr": outcome(lambda: os.setxattr(fd, "user.x", b"1")),
            }
            assert _fd_getflags(fd) & OURS == flag
            data = path.read_bytes()
        if flag == APPEND:
            allowed = dict.fromkeys((*_DATA_OPS, "futimens now"), "ok")
        else:
            allowed = _immutable_handle_outcomes(target_name)
        assert got == {**dict.fromkeys(got, "EPERM"), **allowed}
        written = b"w1p3456789A" if "write" in allowed else b"0123456789"
        assert data == (written[:4] if "ftruncate" in allowed else written)
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.ftruncate(fd, 0)  # the flag is off again
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
        os.close(afd)


@_differs_on_pyfuse3
@pytest.mark.tree({"f": b"data", "d/": None, "d/x": b"x"})
def test_flags_set_on_one_open_are_seen_by_the_next(fs: Path) -> None:
    """SETFLAGS with no GETFLAGS on its open, on objects older than the mount (an
    overlay's lower layer): a new open reads the flags back; an untouched one has none."""
    assert getflags(fs / "f") & OURS == 0
    assert getflags(fs / "d") & OURS == 0
    for name in ("f", "d"):
        setflags(fs / name, getflags(fs / name) | NODUMP | NOATIME)
        assert getflags(fs / name) & OURS == NODUMP | NOATIME
    setflags(fs / "f", getflags(fs / "f") & ~NOATIME)
    assert getflags(fs / "f") & OURS == NODUMP
    assert getflags(fs / "d" / "x") & OURS == 0
    assert (fs / "f").read_bytes() == b"data"
    assert os.listdir(fs / "d") == ["x"]


@_differs_on_pyfuse3
@pytest.mark.tree({"f": b"data", "d/": None})
def test_flags_read_back_on_the_open_that_set_them(fs: Path) -> None:
    """chattr's read-modify-write and a read-back, all on one open, of objects older than
    the mount: on an overlay the SETFLAGS copies the object up under that open."""
    assert chattr(fs / "f", add=NODUMP) & OURS == NODUMP
    assert chattr(fs / "d", add=NODUMP) & OURS == NODUMP
    assert chattr(fs / "f", remove=NODUMP) & OURS == 0
    assert (fs / "f").read_bytes() == b"data"


@_differs_on_pyfuse3
@pytest.mark.tree({"f": b"old", "d/": None, "d/x": b"x"})
@pytest.mark.parametrize("flag", [IMMUTABLE, APPEND], ids=["immutable", "append-only"])
def test_pre_existing_objects_take_the_flags(fs: Path, behind: Path | None,
                                             flag: int) -> None:
    with protected(fs, behind, "f", "d", flag=flag):
        assert getflags(fs / "f") & OURS == flag
        assert getflags(fs / "d") & OURS == flag
        got = {
            "write": outcome(lambda: write(fs / "f")),
            "append": outcome(lambda: write(fs / "f", os.O_WRONLY | os.O_APPEND, b"+")),
            "chmod": outcome(lambda: os.chmod(fs / "f", 0o600)),
            "unlink": outcome(lambda: os.unlink(fs / "f")),
            "create in dir": outcome(lambda: write(fs / "d" / "n", os.O_WRONLY | os.O_CREAT)),
            "unlink in dir": outcome(lambda: os.unlink(fs / "d" / "x")),
        }
        appends = {"append": "ok", "create in dir": "ok"} if flag == APPEND else {}
        assert got == {**dict.fromkeys(got, "EPERM"), **appends}
        assert (fs / "f").read_bytes() == (b"old+" if appends else b"old")
    assert getflags(fs / "f") & OURS == 0
    write(fs / "f", os.O_WRONLY | os.O_TRUNC, b"new")
    os.unlink(fs / "d" / "x")
    assert (fs / "f").read_bytes() == b"new"


@_differs_on_pyfuse3
@pytest.mark.tree({"f": b"data", "g": b"data"})
@pytest.mark.parametrize("copy_up", ["write open", "chmod"])
def test_lsattr_through_a_handle_opened_before_a_copy_up(fs: Path, copy_up: str) -> None:
    """A read-only open of an object older than the mount (on an overlay: of its lower
    file), then a copy-up by another caller: GETFLAGS and SETFLAGS through the first
    open still work, on the object as it now is."""
    fd = _open(fs / "f")
    try:
        assert _fd_getflags(fd) & OURS == 0
        if copy_up == "write open":
            write(fs / "f", os.O_WRONLY | os.O_APPEND, b"+")
        else:
            os.chmod(fs / "f", 0o600)
        assert _fd_getflags(fd) & OURS == 0
        fcntl.ioctl(fd, SETFLAGS, struct.pack("=I", _fd_getflags(fd) | NODUMP))
        assert _fd_getflags(fd) & OURS == NODUMP
        assert getflags(fs / "f") & OURS == NODUMP
    finally:
        os.close(fd)
    assert getflags(fs / "g") & OURS == 0


@_differs_on_pyfuse3
def test_immutable_directory_keeps_its_names(fs: Path, behind: Path | None) -> None:
    (fs / "d").mkdir()
    (fs / "d" / "x").write_bytes(b"x")
    with protected(fs, behind, "d", flag=IMMUTABLE):
        got = {
            "create": outcome(lambda: write(fs / "d" / "new", os.O_WRONLY | os.O_CREAT)),
            "mkdir": outcome(lambda: os.mkdir(fs / "d" / "sub")),
            "unlink": outcome(lambda: os.unlink(fs / "d" / "x")),
            "rename in": outcome(lambda: os.rename(fs / "d" / "x", fs / "d" / "y")),
            "rmdir": outcome(lambda: os.rmdir(fs / "d")),
        }
        assert got == dict.fromkeys(got, "EPERM")
        assert os.listdir(fs / "d") == ["x"]
        write(fs / "d" / "x", os.O_WRONLY | os.O_APPEND)  # the file itself is not +i
    write(fs / "d" / "new", os.O_WRONLY | os.O_CREAT)
    assert sorted(os.listdir(fs / "d")) == ["new", "x"]


@_differs_on_pyfuse3
def test_append_only_directory_takes_new_names_only(fs: Path, behind: Path | None) -> None:
    (fs / "d").mkdir()
    (fs / "d" / "x").write_bytes(b"x")
    with protected(fs, behind, "d", flag=APPEND):
        write(fs / "d" / "new", os.O_WRONLY | os.O_CREAT)
        assert outcome(lambda: os.unlink(fs / "d" / "x")) == "EPERM"
        assert outcome(lambda: os.rename(fs / "d" / "x", fs / "x")) == "EPERM"
        assert sorted(os.listdir(fs / "d")) == ["new", "x"]
    os.unlink(fs / "d" / "x")


@_differs_on_pyfuse3
def test_refusals_of_the_filesystem_come_through(fs: Path) -> None:
    (fs / "f").write_bytes(b"data")
    with raises_errno(errno.EOPNOTSUPP):  # not a flag ext4 takes on a file
        chattr(fs / "f", add=CASEFOLD)
    fields = fsx(fs / "f")
    fields[3] = 5  # a project id, without project quotas
    with raises_errno(errno.EOPNOTSUPP):
        set_fsx(fs / "f", fields)
    assert getflags(fs / "f") & OURS == 0


def test_a_fifo_has_no_file_attributes(fs: Path) -> None:
    """The VFS answers ENOTTY itself: no target is asked, pyfuse3's included."""
    os.mkfifo(fs / "p")
    with raises_errno(errno.ENOTTY):
        getflags(fs / "p")
    with raises_errno(errno.ENOTTY):
        chattr(fs / "p", add=NODUMP)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@_differs_on_pyfuse3
def test_only_the_owner_and_only_with_cap_linux_immutable(fs: Path,
                                                          behind: Path | None) -> None:
    """The kernel checks the caller (inode_owner_or_capable, CAP_LINUX_IMMUTABLE) before
    the filesystem is asked, against the attributes the mount shows."""
    os.chmod(fs, 0o777)
    (fs / "roots").write_bytes(b"r")
    (fs / "theirs").write_bytes(b"t")
    os.chown(fs / "theirs", 65534, 65534)
    try:
        out = as_nobody(f"""
import fcntl, struct
def chattr(path, add):
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("=I", fcntl.ioctl(fd, {GETFLAGS}, bytes(4)))[0]
        fcntl.ioctl(fd, {SETFLAGS}, struct.pack("=I", flags | add))
    finally:
        os.close(fd)
attempt("nodump on root's", chattr, {str(fs / "roots")!r}, {NODUMP})
attempt("nodump on own", chattr, {str(fs / "theirs")!r}, {NODUMP})
attempt("immutable on own", chattr, {str(fs / "theirs")!r}, {IMMUTABLE})
""")
        assert out == {"nodump on root's": "EPERM", "nodump on own": "ok",
                       "immutable on own": "EPERM"}
        assert getflags(fs / "theirs") & OURS == NODUMP
        assert getflags(fs / "roots") & OURS == 0
    finally:
        with protected(fs, behind, "theirs", flag=0):
            pass
