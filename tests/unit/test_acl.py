"""backingfs.acl: the xattr form, and inheritance checked against the kernel's own
posix_acl_create on a local directory (no mount)."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path

import pytest

from backingfs import acl

ANY = 0xFFFFFFFF


def _default(user: int, group: int, other: int, *named: tuple[int, int, int],
             mask: int | None = None) -> bytes:
    entries = [(acl.USER_OBJ, user, ANY), *[e for e in named if e[0] == acl.USER],
               (acl.GROUP_OBJ, group, ANY), *[e for e in named if e[0] == acl.GROUP]]
    if mask is not None:
        entries.append((acl.MASK, mask, ANY))
    entries.append((acl.OTHER, other, ANY))
    return acl.serialize(entries)


DEFAULTS = [
    _default(7, 5, 0),                                              # base entries only
    _default(7, 5, 0, (acl.USER, 7, 65534), mask=7),
    _default(6, 0, 4, (acl.USER, 5, 1000), (acl.GROUP, 6, 1000), mask=5),
    _default(7, 7, 7, (acl.GROUP, 0, 100), mask=0),
]


def _supports_acls(path: Path) -> bool:
    try:
        os.setxattr(path, acl.DEFAULT, DEFAULTS[0])
    except OSError:
        return False
    os.removexattr(path, acl.DEFAULT)
    return True


@pytest.mark.parametrize("default", DEFAULTS, ids=range(len(DEFAULTS)))
def test_inherit_matches_the_kernel(tmp_path: Path, default: bytes) -> None:
    if not _supports_acls(tmp_path):
        pytest.skip("the filesystem of tmp_path has no POSIX ACLs")
    d = tmp_path / "d"
    d.mkdir()
    os.setxattr(d, acl.DEFAULT, default)
    assert acl.default_acl(os.open(d, os.O_PATH)) == default
    old = os.umask(0o077)  # ignored under a default ACL, by the kernel and by inherit()
    try:
        for i, (mode, is_dir) in enumerate(itertools.product(
                (0o777, 0o666, 0o640, 0o2755, 0o1701, 0o000), (False, True))):
            path = d / str(i)
            if is_dir:
                os.mkdir(path, mode)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
            # mkdir(2) keeps no S_ISGID of its own (the parent's setgid gives it): not
            # inherit()'s business.
            asked = mode & 0o1777 if is_dir else mode
            want_mode, want_access, want_default = acl.inherit(default, asked, is_dir)
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == want_mode, (oct(mode), is_dir)
            for name, want in ((acl.ACCESS, want_access), (acl.DEFAULT, want_default)):
                try:
                    got = os.getxattr(path, name)
                except OSError as e:
                    assert e.errno == errno.ENODATA
                    got = None
                assert got == want, (oct(mode), is_dir, name)
    finally:
        os.umask(old)


def test_create_mode_applies_the_umask_only_without_a_default_acl(tmp_path: Path) -> None:
    if not _supports_acls(tmp_path):
        pytest.skip("the filesystem of tmp_path has no POSIX ACLs")
    plain, inherit = tmp_path / "plain", tmp_path / "inherit"
    plain.mkdir()
    inherit.mkdir()
    os.setxattr(inherit, acl.DEFAULT, DEFAULTS[1])
    fd_plain, fd_inherit = os.open(plain, os.O_PATH), os.open(inherit, os.O_PATH)
    try:
        assert acl.create_mode(fd_plain, 0o666, 0o022) == 0o644
        assert acl.create_mode(fd_plain, 0o100644, 0o022) == 0o100644
        assert acl.create_mode(fd_inherit, 0o666, 0o022) == 0o666
        assert acl.default_acl(fd_plain) is None
    finally:
        os.close(fd_plain)
        os.close(fd_inherit)


def test_malformed_values_are_refused() -> None:
    with pytest.raises(OSError) as e:
        acl.parse(b"\x02\x00\x00\x00\x01\x00")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        acl.parse(b"\x01\x00\x00\x00")
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as e:   # no group entry, no mask: the kernel says EIO
        acl.create_masq([(acl.USER_OBJ, 7, ANY), (acl.OTHER, 0, ANY)], 0o644)
    assert e.value.errno == errno.EIO


def test_round_trip() -> None:
    for value in DEFAULTS:
        assert acl.serialize(acl.parse(value)) == value


def test_supported_tells_filesystems_without_acls(tmp_path: Path) -> None:
    fd = os.open("/proc", os.O_PATH)   # procfs keeps no xattrs at all
    try:
        assert acl.supported(fd) is False
    finally:
        os.close(fd)
    fd = os.open(tmp_path, os.O_PATH)
    try:
        assert acl.supported(fd) is _supports_acls(tmp_path)
    finally:
        os.close(fd)
