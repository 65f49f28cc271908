"""A mount without upperdir is read-only: every change is EROFS, reads merge the lowers."""

from __future__ import annotations

import errno
import os

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("op", ["create", "open_write", "truncate", "chmod", "mkdir",
                                "unlink", "rmdir", "rename", "symlink", "link",
                                "setxattr", "removexattr", "utime", "tmpfile"])
def test_every_write_is_erofs(ovl: OvlLayers, op: str) -> None:
    (ovl.lower1 / "f").write_text("x")
    os.setxattr(ovl.lower1 / "f", "user.a", b"1")
    (ovl.lower2 / "d").mkdir()
    mnt = ovl.mount(upper=False)
    f, d = mnt / "f", mnt / "d"
    actions = {
        "create": lambda: (mnt / "new").write_text("x"),
        "open_write": lambda: os.open(f, os.O_WRONLY),
        "truncate": lambda: os.truncate(f, 0),
        "chmod": lambda: os.chmod(f, 0o600),
        "mkdir": lambda: os.mkdir(mnt / "nd"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d),
        "rename": lambda: os.rename(f, mnt / "g"),
        "symlink": lambda: os.symlink("f", mnt / "s"),
        "link": lambda: os.link(f, mnt / "h"),
        "setxattr": lambda: os.setxattr(f, "user.b", b"2"),
        "removexattr": lambda: os.removexattr(f, "user.a"),
        "utime": lambda: os.utime(f, (1, 1)),
        # as kernel overlayfs without upperdir: the read-only mount refuses it in the VFS
        "tmpfile": lambda: os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600),
    }
    with pytest.raises(OSError) as e:
        actions[op]()
    assert e.value.errno == errno.EROFS
    assert f.read_text() == "x" and sorted(os.listdir(mnt)) == ["d", "f"]
    assert os.listdir(ovl.upper) == [] and os.listdir(ovl.work) == []


def test_mount_without_upper_is_a_read_only_mount(ovl: OvlLayers) -> None:
    # As kernel overlayfs without upperdir: the VFS refuses writes itself, and statvfs and
    # mount(8) say ro.
    (ovl.lower1 / "f").write_text("x")
    mnt = ovl.mount(upper=False)
    assert os.statvfs(mnt).f_flag & os.ST_RDONLY
    assert (mnt / "f").read_text() == "x"
