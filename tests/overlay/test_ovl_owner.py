"""allow_other and default_permissions as root, and new objects owned by the caller."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
from ovl_layers import OvlLayers

from backingfs import acl

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                       reason="needs root and setpriv"),
]

NOBODY = 65534


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *cmd], capture_output=True, text=True,
                          timeout=30)


def test_other_users_see_the_mount_and_permissions_apply(ovl_public: OvlLayers) -> None:
    ovl = ovl_public
    (ovl.lower1 / "public").write_text("hello")
    (ovl.lower1 / "secret").write_text("no")
    os.chmod(ovl.lower1 / "secret", 0o600)
    mnt = ovl.mount()
    r = as_nobody("cat", str(mnt / "public"))
    assert r.returncode == 0 and r.stdout == "hello", r.stderr
    r = as_nobody("cat", str(mnt / "secret"))
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_new_objects_belong_to_the_caller(ovl_public: OvlLayers) -> None:
    ovl = ovl_public
    (ovl.lower1 / "shared").mkdir()
    os.chmod(ovl.lower1 / "shared", 0o777)
    mnt = ovl.mount()
    d = mnt / "shared"
    r = as_nobody("sh", "-c", f"umask 022; echo x > {d}/file && mkdir {d}/dir && "
                              f"ln -s file {d}/sl && mkfifo {d}/fifo")
    assert r.returncode == 0, r.stderr
    for name, mode in (("file", 0o644), ("dir", 0o755), ("fifo", 0o644)):
        st = os.lstat(ovl.upper / "shared" / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
        assert st.st_mode & 0o7777 == mode, name
        assert os.lstat(d / name).st_uid == NOBODY
    assert os.lstat(ovl.upper / "shared" / "sl").st_uid == NOBODY
    # the copied-up parent keeps its lower owner and mode
    st = os.stat(ovl.upper / "shared")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o777)


def _deny_nobody(path: os.PathLike[str] | str) -> None:
    """An access ACL that shuts uid 65534 out of ``path``, whose mode lets everyone read."""
    os.setxattr(path, acl.ACCESS, acl.serialize([
        (acl.USER_OBJ, 6, 0xFFFFFFFF), (acl.USER, 0, NOBODY), (acl.GROUP_OBJ, 4, 0xFFFFFFFF),
        (acl.MASK, 4, 0xFFFFFFFF), (acl.OTHER, 4, 0xFFFFFFFF)]))


@pytest.mark.parametrize("noacl", [False, True], ids=["acl", "noacl"])
def test_lower_acls_are_enforced_unless_noacl(ovl_public: OvlLayers, noacl: bool) -> None:
    """The kernel checks the layers' ACLs (FUSE_POSIX_ACL), on a lower file and on its
    copy-up alike; ``noacl`` leaves the mode bits alone in charge, as in fuse-overlayfs."""
    ovl = ovl_public
    for name in ("lowerfile", "copied"):
        (ovl.lower1 / name).write_text("data")
        os.chmod(ovl.lower1 / name, 0o644)
        _deny_nobody(ovl.lower1 / name)
    mnt = ovl.mount(*(["noacl"] if noacl else []))
    os.utime(mnt / "copied")  # a metadata copy-up: the ACL comes along
    assert os.getxattr(ovl.upper / "copied", acl.ACCESS) == \
        os.getxattr(ovl.lower1 / "copied", acl.ACCESS)
    for name in ("lowerfile", "copied"):
        r = as_nobody("cat", str(mnt / name))
        if noacl:
            assert r.returncode == 0 and r.stdout == "data", (name, r.stderr)
        else:
            assert r.returncode != 0 and "Permission denied" in r.stderr, (name, r.stdout)


@pytest.mark.skipif(os.environ.get("BACKINGFS_SESSION", "native") != "native",
                    reason="pyfuse3 (libfuse 3.14) does not ask for FUSE_DONT_MASK: the kernel "
                           "applies the umask first, also under a default ACL")
def test_objects_made_over_whiteouts_inherit_the_default_acl(ovl: OvlLayers) -> None:
    """Over a whiteout (and as an opaque directory) an object is made in the work directory,
    which has no default ACL: it must get the merged parent's, as the kernel's overlay sets
    it (ovl_create_object), and the mode that ACL gives, not the umask's."""
    default = acl.serialize([
        (acl.USER_OBJ, 7, 0xFFFFFFFF), (acl.USER, 7, NOBODY), (acl.GROUP_OBJ, 5, 0xFFFFFFFF),
        (acl.MASK, 7, 0xFFFFFFFF), (acl.OTHER, 0, 0xFFFFFFFF)])
    (ovl.lower1 / "dd").mkdir()
    os.setxattr(ovl.lower1 / "dd", acl.DEFAULT, default)
    (ovl.lower1 / "dd" / "file").write_text("lower")
    (ovl.lower1 / "dd" / "dir").mkdir()
    mnt = ovl.mount()
    os.unlink(mnt / "dd" / "file")
    os.rmdir(mnt / "dd" / "dir")
    old = os.umask(0o022)
    try:
        os.close(os.open(mnt / "dd" / "file", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(mnt / "dd" / "dir", 0o777)
        os.mkdir(mnt / "dd" / "new", 0o777)
    finally:
        os.umask(old)
    assert os.getxattr(ovl.upper / "dd", acl.DEFAULT) == default  # copied up
    up = ovl.upper / "dd"
    assert (stat.S_IMODE(os.stat(up / "file").st_mode), stat.S_IMODE(os.stat(up / "dir").st_mode),
            stat.S_IMODE(os.stat(up / "new").st_mode)) == (0o660, 0o770, 0o770)
    assert acl.parse(os.getxattr(up / "file", acl.ACCESS)) == [
        (acl.USER_OBJ, 6, 0xFFFFFFFF), (acl.USER, 7, NOBODY), (acl.GROUP_OBJ, 5, 0xFFFFFFFF),
        (acl.MASK, 6, 0xFFFFFFFF), (acl.OTHER, 0, 0xFFFFFFFF)]
    for d in ("dir", "new"):
        assert os.getxattr(up / d, acl.DEFAULT) == default, d
    assert os.getxattr(up / "dir", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(mnt / "dd" / "file", acl.ACCESS) == os.getxattr(up / "file", acl.ACCESS)
