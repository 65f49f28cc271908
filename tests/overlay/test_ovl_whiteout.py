"""Whiteouts and opaque directories in every form, read and written; private xattrs."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from ovl_layers import OvlLayers

from backingfs.syscalls import RENAME_EXCHANGE, renameat2

AT_FDCWD = -100

pytestmark = pytest.mark.timeout(60)


def chr_whiteout(path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, 0)


def is_chr_whiteout(path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# --- read forms ------------------------------------------------------------------------------

def test_char_whiteout_in_lower_hides_below(ovl: OvlLayers) -> None:
    (ovl.lower2 / "gone").write_text("hidden")
    chr_whiteout(ovl.lower1 / "gone")
    (ovl.lower2 / "kept").write_text("k")
    mnt = ovl.mount()
    assert not (mnt / "gone").exists()
    assert sorted(os.listdir(mnt)) == ["kept"]


def test_aufs_whiteout_hides_below_and_is_invisible(ovl: OvlLayers) -> None:
    (ovl.lower2 / "gone").write_text("hidden")
    (ovl.lower1 / ".wh.gone").write_text("")
    mnt = ovl.mount()
    assert not (mnt / "gone").exists()
    assert not (mnt / ".wh.gone").exists()
    assert os.listdir(mnt) == []


def test_aufs_opaque_marker(ovl: OvlLayers) -> None:
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "below").write_text("b")
    (ovl.lower1 / "d").mkdir()
    (ovl.lower1 / "d" / ".wh..wh..opq").write_text("")
    (ovl.lower1 / "d" / "above").write_text("a")
    mnt = ovl.mount()
    assert sorted(os.listdir(mnt / "d")) == ["above"]
    assert not (mnt / "d" / "below").exists()


def test_opaque_xattr_dir(ovl: OvlLayers) -> None:
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "below").write_text("b")
    (ovl.lower1 / "d").mkdir()
    os.setxattr(ovl.lower1 / "d", "trusted.overlay.opaque", b"y")
    (ovl.lower1 / "d" / "above").write_text("a")
    mnt = ovl.mount()
    assert sorted(os.listdir(mnt / "d")) == ["above"]


def test_xattr_whiteout_in_opaque_x_dir(ovl: OvlLayers) -> None:
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "gone").write_text("hidden")
    (ovl.lower2 / "d" / "kept").write_text("k")
    (ovl.lower1 / "d").mkdir()
    os.setxattr(ovl.lower1 / "d", "trusted.overlay.opaque", b"x")
    (ovl.lower1 / "d" / "gone").write_bytes(b"")
    os.setxattr(ovl.lower1 / "d" / "gone", "trusted.overlay.whiteout", b"")
    mnt = ovl.mount()
    assert sorted(os.listdir(mnt / "d")) == ["kept"]  # merged, "x" is not opaque
    assert not (mnt / "d" / "gone").exists()


def test_upper_xattr_whiteout_linked_to_a_looked_up_file_stays_a_whiteout(
        ovl: OvlLayers) -> None:
    # Review of namei.known_upper: the whiteout's object has an inode (through its other
    # name), which the short way of a repeated lookup must not hand out for the whiteout.
    (ovl.lower1 / "D").mkdir()
    (ovl.lower1 / "D" / "w").write_text("lower")
    for d in ("D", "E"):
        (ovl.upper / d).mkdir()
    os.setxattr(ovl.upper / "D", "trusted.overlay.opaque", b"x")
    (ovl.upper / "D" / "w").write_bytes(b"")
    os.setxattr(ovl.upper / "D" / "w", "trusted.overlay.whiteout", b"y")
    os.link(ovl.upper / "D" / "w", ovl.upper / "E" / "f")
    mnt = ovl.mount()
    ino = os.lstat(mnt / "E" / "f").st_ino
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.lstat(mnt / "D" / "w")
        assert os.listdir(mnt / "D") == []
    assert os.lstat(mnt / "E" / "f").st_ino == ino


def test_userxattr_opaque(ovl: OvlLayers) -> None:
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "below").write_text("b")
    (ovl.lower1 / "d").mkdir()
    os.setxattr(ovl.lower1 / "d", "user.overlay.opaque", b"y")
    os.setxattr(ovl.lower2 / "d", "trusted.overlay.opaque", b"y")  # ignored with userxattr
    mnt = ovl.mount("userxattr")
    assert os.listdir(mnt / "d") == []
    assert "user.overlay.opaque" not in os.listxattr(mnt / "d")


def test_upper_file_hides_lower_dir_and_vice_versa(ovl: OvlLayers) -> None:
    (ovl.lower2 / "a").mkdir()
    (ovl.lower2 / "a" / "inside").write_text("x")
    (ovl.lower1 / "a").write_text("file on top")
    (ovl.lower2 / "b").write_text("file below")
    (ovl.lower1 / "b").mkdir()
    mnt = ovl.mount()
    assert (mnt / "a").read_text() == "file on top"
    assert (mnt / "b").is_dir() and os.listdir(mnt / "b") == []


def test_private_xattrs_hidden_and_escaped(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("x")
    os.setxattr(ovl.lower1 / "f", "trusted.overlay.origin", b"secret")
    os.setxattr(ovl.lower1 / "f", "trusted.overlay.overlay.mine", b"nested")
    os.setxattr(ovl.lower1 / "f", "user.plain", b"p")
    mnt = ovl.mount()
    names = os.listxattr(mnt / "f")
    assert "trusted.overlay.origin" not in names
    assert "trusted.overlay.mine" in names and "user.plain" in names
    assert os.getxattr(mnt / "f", "trusted.overlay.mine") == b"nested"
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "f", "trusted.overlay.overlay.mine")
    assert e.value.errno == errno.ENODATA
    os.setxattr(mnt / "f", "trusted.overlay.opaque", b"client value")
    assert os.getxattr(ovl.upper / "f", "trusted.overlay.overlay.opaque") == b"client value"
    assert "trusted.overlay.opaque" not in os.listxattr(ovl.upper / "f")


# --- written forms ---------------------------------------------------------------------------

def test_unlink_lower_leaves_char_whiteout(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("x")
    mnt = ovl.mount()
    os.unlink(mnt / "f")
    assert not (mnt / "f").exists()
    assert is_chr_whiteout(ovl.upper / "f")
    assert os.listdir(mnt) == []


def test_unlink_pure_upper_leaves_nothing(ovl: OvlLayers) -> None:
    mnt = ovl.mount()
    (mnt / "new").write_text("x")
    os.unlink(mnt / "new")
    assert os.listdir(ovl.upper) == []


def test_unlink_copied_up_leaves_whiteout(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("x")
    mnt = ovl.mount()
    with open(mnt / "f", "a") as f:
        f.write("more")
    os.unlink(mnt / "f")
    assert is_chr_whiteout(ovl.upper / "f")
    assert ovl.work_entries() == []


def test_rmdir_merged_with_only_whiteouts(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    (ovl.lower1 / "d" / "a").write_text("x")
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "b").write_text("y")
    mnt = ovl.mount()
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(mnt / "d" / "a")
    os.unlink(mnt / "d" / "b")
    os.rmdir(mnt / "d")
    assert not (mnt / "d").exists()
    assert is_chr_whiteout(ovl.upper / "d")
    assert ovl.work_entries() == []


def test_rmdir_pure_upper(ovl: OvlLayers) -> None:
    mnt = ovl.mount()
    (mnt / "d").mkdir()
    os.rmdir(mnt / "d")
    assert os.listdir(ovl.upper) == []


def test_rmdir_pure_upper_holding_only_whiteouts(ovl: OvlLayers) -> None:
    # An upper directory with no lower one whose rmdir(2) on the layer fails: it holds
    # whiteouts (as an OCI layer unpacked into the upper leaves them), so it is empty
    # through the mount, and goes whole; then one with a visible entry stays (ENOTEMPTY).
    (ovl.upper / "d").mkdir()
    os.mknod(ovl.upper / "d" / "x", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (ovl.upper / "d" / ".wh.y").write_text("")
    (ovl.upper / "e").mkdir()
    (ovl.upper / "e" / "kept").write_text("k")
    mnt = ovl.mount()
    assert os.listdir(mnt / "d") == []
    os.rmdir(mnt / "d")
    assert not (mnt / "d").exists()
    assert sorted(os.listdir(ovl.upper)) == ["e"]
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "e")
    assert e.value.errno == errno.ENOTEMPTY
    assert (ovl.upper / "e" / "kept").read_text() == "k"
    assert ovl.work_entries() == []


def test_rmdir_upper_dir_over_lower_file_leaves_whiteout(ovl: OvlLayers) -> None:
    # The upper directory has no lower directory, but its name hides a lower file: the
    # removal must leave a whiteout, not just remove the directory.
    (ovl.lower1 / "n").write_text("lower file")
    (ovl.upper / "n").mkdir()
    mnt = ovl.mount()
    assert stat.S_ISDIR(os.lstat(mnt / "n").st_mode)
    os.rmdir(mnt / "n")
    assert not os.path.lexists(mnt / "n")
    assert is_chr_whiteout(ovl.upper / "n")
    assert ovl.work_entries() == []


def test_mkdir_over_whiteout_is_opaque(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    (ovl.lower1 / "d" / "old").write_text("x")
    mnt = ovl.mount()
    os.unlink(mnt / "d" / "old")
    os.rmdir(mnt / "d")
    os.mkdir(mnt / "d")
    assert os.listdir(mnt / "d") == []
    assert os.getxattr(ovl.upper / "d", "trusted.overlay.opaque") == b"y"
    assert ovl.work_entries() == []


def test_create_file_over_whiteout(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("old")
    mnt = ovl.mount()
    os.unlink(mnt / "f")
    (mnt / "f").write_text("new")
    assert (mnt / "f").read_text() == "new"
    assert stat.S_ISREG(os.lstat(ovl.upper / "f").st_mode)


def test_aufs_whiteouts_written_when_asked(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("x")
    (ovl.lower1 / "d").mkdir()
    mnt = ovl.mount(env={"FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT": "1"})
    os.unlink(mnt / "f")
    os.rmdir(mnt / "d")
    assert sorted(os.listdir(ovl.upper)) == [".wh.d", ".wh.f"]
    assert os.listdir(mnt) == []
    (mnt / "f").write_text("back")
    assert sorted(os.listdir(ovl.upper)) == [".wh.d", "f"]
    assert os.listdir(mnt) == ["f"]


def test_aufs_whiteout_hides_only_the_layers_below_its_own(ovl: OvlLayers) -> None:
    # OCI: a whiteout applies to lower layers only; an object beside it in its own layer
    # stays. In the upper layer that is also what a crash leaves between making .wh.NAME
    # and the rename or removal it goes with (overlay/dir.py makes the whiteout first).
    (ovl.lower2 / "a").write_text("lower a")
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "old").write_text("o")
    (ovl.lower1 / "b").write_text("lower1 b")
    (ovl.lower1 / ".wh.b").write_text("")
    (ovl.lower2 / "b").write_text("lower2 b")
    (ovl.upper / "a").write_text("upper a")
    (ovl.upper / ".wh.a").write_text("")
    (ovl.upper / "d").mkdir()
    (ovl.upper / "d" / "new").write_text("n")
    (ovl.upper / ".wh.d").write_text("")
    mnt = ovl.mount(env={"FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT": "1"})
    assert (mnt / "a").read_text() == "upper a"
    assert (mnt / "b").read_text() == "lower1 b"
    assert os.listdir(mnt / "d") == ["new"]   # a new directory over a deleted one: opaque
    assert sorted(os.listdir(mnt)) == ["a", "b", "d"]
    # and the names work as any other: rename, unlink, create again
    os.rename(mnt / "a", mnt / "a2")
    assert sorted(os.listdir(mnt)) == ["a2", "b", "d"]
    os.unlink(mnt / "a2")
    (mnt / "a").write_text("again")
    assert (mnt / "a").read_text() == "again"
    assert sorted(os.listdir(mnt)) == ["a", "b", "d"]
    ovl.unmount()
    mnt = ovl.mount(env={"FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT": "1"})
    assert (mnt / "a").read_text() == "again"
    assert os.listdir(mnt / "d") == ["new"]


def test_directory_opaque_by_a_whiteout_beside_it_stays_opaque_when_moved(
        ovl: OvlLayers) -> None:
    # Its opacity comes from its parent's .wh.d, which does not move with it: a rename
    # (or exchange) must give it a marker of its own.
    for name in ("d", "e", "x"):
        (ovl.lower2 / name).mkdir()
        (ovl.lower2 / name / f"lower_{name}").write_text("l")
    (ovl.upper / "d").mkdir()
    (ovl.upper / "d" / "new").write_text("n")
    (ovl.upper / ".wh.d").write_text("")
    (ovl.upper / ".wh.e").write_text("")
    for name in ("x", "a"):
        (ovl.upper / name).mkdir()
        (ovl.upper / name / f"upper_{name}").write_text("u")
        (ovl.upper / f".wh.{name}").write_text("")
    (ovl.lower2 / "a").mkdir()
    (ovl.lower2 / "a" / "lower_a").write_text("l")
    (ovl.lower2 / "b").mkdir()
    (ovl.lower2 / "b" / "lower_b").write_text("l")
    (ovl.upper / "b").mkdir()
    (ovl.upper / "b" / "upper_b").write_text("u")
    os.setxattr(ovl.upper / "b", "trusted.overlay.opaque", b"y")
    (ovl.lower1 / "m").mkdir()        # a lower directory beside its own .wh. (layer 1)
    (ovl.lower1 / "m" / "l1new").write_text("1")
    (ovl.lower1 / ".wh.m").write_text("")
    (ovl.lower2 / "m").mkdir()
    (ovl.lower2 / "m" / "l2old").write_text("2")
    env = {"FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT": "1"}
    mnt = ovl.mount(env=env)
    assert os.listdir(mnt / "m") == ["l1new"]
    os.rename(mnt / "d", mnt / "e")   # onto a name whited out by .wh.e
    assert os.listdir(mnt / "e") == ["new"]
    os.rename(mnt / "x", mnt / "z")   # onto a new name
    assert os.listdir(mnt / "z") == ["upper_x"]
    renameat2(AT_FDCWD, bytes(mnt / "a"), AT_FDCWD, bytes(mnt / "b"), RENAME_EXCHANGE)
    assert os.listdir(mnt / "b") == ["upper_a"]
    assert os.listdir(mnt / "a") == ["upper_b"]
    ovl.unmount()
    mnt = ovl.mount(env=env)
    assert os.listdir(mnt / "e") == ["new"]
    assert os.listdir(mnt / "z") == ["upper_x"]
    assert os.listdir(mnt / "b") == ["upper_a"]
    assert os.listdir(mnt / "a") == ["upper_b"]
    assert sorted(os.listdir(mnt)) == ["a", "b", "e", "m", "z"]


def test_mknod_of_a_whiteout_device_is_refused(ovl: OvlLayers) -> None:
    # As the kernel's ovl_mknod: a char device 0/0 would be a whiteout, hiding the name.
    (ovl.lower1 / "x").write_text("lower")
    mnt = ovl.mount()
    with pytest.raises(PermissionError):
        os.mknod(mnt / "new", stat.S_IFCHR | 0o600, 0)
    with pytest.raises(FileExistsError):  # the VFS answers before the filesystem is asked
        os.mknod(mnt / "x", stat.S_IFCHR | 0o600, 0)
    assert (mnt / "x").read_text() == "lower"
    assert not (mnt / "new").exists()
    assert sorted(os.listdir(ovl.upper)) == []
    os.mknod(mnt / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert os.lstat(mnt / "dev").st_rdev == os.makedev(1, 3)


def test_names_starting_with_wh_are_refused(ovl: OvlLayers) -> None:
    mnt = ovl.mount()
    with pytest.raises(OSError) as e:
        (mnt / ".wh.x").write_text("no")
    assert e.value.errno == errno.EINVAL
