"""privs: which set-id bits a write clears, security.capability removal, CAP_FSETID probe."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs import privs
from backingfs.privs import caller_has_fsetid, needs_kill_privs, strip_privs

SUID, SGID, XGRP = stat.S_ISUID, stat.S_ISGID, stat.S_IXGRP
REG, DIR = stat.S_IFREG, stat.S_IFDIR

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (security.* xattrs)")


# -- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "has_fsetid", "kill"),
    [
        (REG | 0o4755, False, SUID),  # suid always goes
        (REG | 0o4644, False, SUID),  # even on a non-executable file
        (REG | 0o2755, False, SGID),  # sgid with group-exec: a setgid binary
        (REG | 0o2745, False, 0),  # sgid without group-exec: kept for a group member
        (REG | 0o6755, False, SUID | SGID),
        (REG | 0o6745, False, SUID),
        (REG | 0o0755, False, 0),
        (REG | 0o6755, True, 0),  # CAP_FSETID keeps everything
        (REG | 0o4755, True, 0),
        (0o6755, False, SUID | SGID),  # bare permission bits: taken as a regular file
        (DIR | 0o2775, False, 0),  # directories are never stripped
        (stat.S_IFLNK | 0o6777, False, 0),
    ],
)
def test_needs_kill_privs(mode: int, has_fsetid: bool, kill: int) -> None:
    assert needs_kill_privs(mode, 1000, 1000, has_fsetid) == kill


@pytest.mark.parametrize(("caller_uid", "owner_uid"), [(1000, 1000), (1000, 2000), (0, 1000)])
def test_owner_and_root_get_no_exemption(caller_uid: int, owner_uid: int) -> None:
    """Kernel rule: ownership is never consulted; only CAP_FSETID saves the bits."""
    assert needs_kill_privs(REG | 0o6755, caller_uid, owner_uid, False) == SUID | SGID
    assert needs_kill_privs(REG | 0o6755, caller_uid, owner_uid, True) == 0


def test_sgid_without_group_exec_for_non_member() -> None:
    """v6.2+ setattr_should_drop_sgid: a non-member loses S_ISGID even without S_IXGRP."""
    assert needs_kill_privs(REG | 0o2745, 1000, 2000, False, caller_in_group=False) == SGID
    assert needs_kill_privs(REG | 0o2745, 1000, 2000, False, caller_in_group=True) == 0
    assert needs_kill_privs(REG | 0o2745, 1000, 2000, True, caller_in_group=False) == 0


# -- applying it to a backing file ------------------------------------------------------------


def _vfs_cap_v2(permitted: int) -> bytes:
    """A valid VFS_CAP_REVISION_2 security.capability value (effective flag set)."""
    return struct.pack("<IIIII", 0x02000000 | 1, permitted & 0xFFFFFFFF, 0, permitted >> 32, 0)


@pytest.fixture
def backing(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "bin"
    path.write_bytes(b"\x7fELF")
    fd = os.open(path, os.O_RDWR)
    try:
        yield path, fd
    finally:
        os.close(fd)


def _set_cap(path: Path) -> None:
    try:
        os.setxattr(path, privs.CAPABILITY_XATTR, _vfs_cap_v2(1 << 10))
    except OSError as e:
        pytest.skip(f"cannot set security.capability here: {e}")


@needs_root
def test_strip_clears_bits_and_capability(backing: tuple[Path, int]) -> None:
    path, fd = backing
    os.chmod(path, 0o6755)
    _set_cap(path)
    new = strip_privs(fd, os.fstat(fd), 1000, False)
    assert new == REG | 0o755
    assert os.stat(path).st_mode == REG | 0o755
    assert _errno_getxattr(path) == errno.ENODATA


@needs_root
def test_capability_removed_even_with_fsetid(backing: tuple[Path, int]) -> None:
    """Root with CAP_FSETID keeps the set-id bits but never the file capability."""
    path, fd = backing
    os.chmod(path, 0o6755)
    _set_cap(path)
    assert strip_privs(fd, os.fstat(fd), 0, True) == REG | 0o6755
    assert os.stat(path).st_mode == REG | 0o6755
    assert _errno_getxattr(path) == errno.ENODATA


def test_strip_without_capability_xattr(backing: tuple[Path, int]) -> None:
    path, fd = backing
    os.chmod(path, 0o4744)
    assert strip_privs(fd, os.fstat(fd), 1000, False) == REG | 0o744
    assert os.stat(path).st_mode == REG | 0o744


def test_strip_keeps_unrelated_mode(backing: tuple[Path, int]) -> None:
    path, fd = backing
    os.chmod(path, 0o2640)  # sgid without group-exec, member writing: nothing to do
    assert strip_privs(fd, os.fstat(fd), 1000, False) == REG | 0o2640
    assert os.stat(path).st_mode == REG | 0o2640


@needs_root
def test_strip_through_o_path_fd(backing: tuple[Path, int]) -> None:
    path, _ = backing
    os.chmod(path, 0o6755)
    _set_cap(path)
    fd = os.open(path, os.O_PATH)
    try:
        assert strip_privs(fd, os.fstat(fd), 1000, False) == REG | 0o755
    finally:
        os.close(fd)
    assert os.stat(path).st_mode == REG | 0o755
    assert _errno_getxattr(path) == errno.ENODATA


def test_strip_ignores_directories(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o2775)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert strip_privs(fd, os.fstat(fd), 1000, False) == DIR | 0o2775
    finally:
        os.close(fd)
    assert os.stat(d).st_mode == DIR | 0o2775


def _errno_getxattr(path: Path) -> int:
    with pytest.raises(OSError) as exc:
        os.getxattr(path, privs.CAPABILITY_XATTR)
    return exc.value.errno


# -- CAP_FSETID probe --------------------------------------------------------------------------


def _own_cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff line")


def test_fsetid_of_self_matches_capeff() -> None:
    assert caller_has_fsetid(os.getpid()) == bool(_own_cap_eff() & (1 << privs.CAP_FSETID))


def test_fsetid_of_missing_process_is_false() -> None:
    # Beyond pid_max (at most 2**22), so never a live process.
    assert caller_has_fsetid(1 << 23) is False


def _fsetid_of_child(argv: list[str], **kwargs: object) -> bool:
    # The child blocks on stdin until we close it: no sleeps, and it is alive while we look.
    # Its CapEff is final once it has printed (exec is done by then).
    child = subprocess.Popen(
        [*argv, "sh", "-c", "echo ready; cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kwargs,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        return caller_has_fsetid(child.pid)
    finally:
        child.kill()
        child.wait()


@needs_root
def test_fsetid_of_unprivileged_child_is_false() -> None:
    assert _fsetid_of_child([], user=65534) is False


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_fsetid_dropped_from_bounding_set() -> None:
    if not _own_cap_eff() & (1 << privs.CAP_FSETID):
        pytest.skip("we lack CAP_FSETID ourselves")
    assert _fsetid_of_child([]) is True
    assert _fsetid_of_child(["setpriv", "--bounding-set=-fsetid"]) is False


def test_kill_suidgid_clears_what_an_unprivileged_write_clears(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDWR)
    try:
        for mode, gid, want in ((0o6777, 65534, 0o777), (0o644, 65534, None),
                                (0o2767, os.getgid(), None), (0o2767, 65534, 0o767),
                                (0o2777, os.getgid(), 0o777), (0o4700, os.getgid(), 0o700)):
            os.chmod(path, mode)
            # pid 0 has no /proc entry: no supplementary groups.
            st = privs.kill_suidgid(fd, gid, 0)
            got = None if st is None else stat.S_IMODE(st.st_mode)
            assert got == want, oct(mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == (mode if want is None else want)
    finally:
        os.close(fd)
