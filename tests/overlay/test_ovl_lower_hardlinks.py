"""Hard links inside a lower layer: copy-up breaks them (no index), so with an upper layer
each name is an overlay inode of its own, as the kernel's ``ovl_hash_bylower`` decides.

Found by the differential runner (tests/differential, overlay pair): with one shared inode,
copy-up copied whichever name the inode was last looked up as (a readdir elsewhere was
enough), so a write to ``a`` landed in another name's upper copy, and the kernel's cached
dentries of the other names showed the copy's data. These run with the default entry
timeout (the kernel keeps every dentry), unlike test_ovl_ino.py's timeout=0 case.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from ovl_layers import OvlLayers
from test_ovl_kernel import KernelMount, needs_kernel

pytestmark = pytest.mark.timeout(90)


def test_write_through_one_name_leaves_the_other_alone(ovl: OvlLayers) -> None:
    (ovl.lower1 / "a").write_text("x")
    os.link(ovl.lower1 / "a", ovl.lower1 / "b")
    mnt = ovl.mount()
    assert os.lstat(mnt / "a").st_nlink == os.lstat(mnt / "b").st_nlink == 2
    with open(mnt / "a", "a") as f:
        f.write("y")
    assert (mnt / "a").read_text() == "xy"
    assert (mnt / "b").read_text() == "x"
    assert sorted(os.listdir(ovl.upper)) == ["a"]


def test_copy_up_uses_the_name_written_not_the_last_looked_up(ovl: OvlLayers) -> None:
    (ovl.lower1 / "sub").mkdir()
    (ovl.lower1 / "a").write_text("x")
    os.link(ovl.lower1 / "a", ovl.lower1 / "sub" / "b")
    mnt = ovl.mount()
    os.lstat(mnt / "a")
    assert os.listdir(mnt / "sub") == ["b"]   # readdirplus looks "sub/b" up last
    with open(mnt / "a", "a") as f:
        f.write("y")
    assert (ovl.upper / "a").read_text() == "xy"
    assert not (ovl.upper / "sub" / "b").exists()
    mnt = ovl.remount()
    assert (mnt / "a").read_text() == "xy"
    assert (mnt / "sub" / "b").read_text() == "x"


def test_rename_onto_another_name_of_a_lower_hardlink_moves_it(ovl: OvlLayers) -> None:
    # Two inodes to the kernel's overlayfs, so not POSIX's "same file, nothing happens".
    (ovl.lower1 / "sub").mkdir()
    (ovl.lower1 / "a").write_text("x")
    os.link(ovl.lower1 / "a", ovl.lower1 / "sub" / "b")
    mnt = ovl.mount()
    os.rename(mnt / "a", mnt / "sub" / "b")
    assert sorted(os.listdir(mnt)) == ["sub"]
    assert (mnt / "sub" / "b").read_text() == "x"
    assert os.lstat(mnt / "sub" / "b").st_nlink == 1
    mnt = ovl.remount()
    assert sorted(os.listdir(mnt)) == ["sub"]
    assert (mnt / "sub" / "b").read_text() == "x"


def test_link_made_after_copy_up_is_the_same_inode(ovl: OvlLayers) -> None:
    (ovl.lower1 / "x").write_text("old data")
    os.link(ovl.lower1 / "x", ovl.lower1 / "y")
    mnt = ovl.mount("writeback=1")
    assert (mnt / "x").read_text() == "old data"     # x's pages are cached
    os.link(mnt / "x", mnt / "z")                     # copies x up, links it as z
    with open(mnt / "z", "r+") as f:
        f.write("NEW")
    assert (ovl.upper / "x").read_text() == "NEW data"
    assert os.lstat(mnt / "x").st_ino == os.lstat(mnt / "z").st_ino
    assert (mnt / "x").read_text() == "NEW data"


def test_copy_up_of_a_lower_hardlink_shows_nlink_1(ovl: OvlLayers) -> None:
    (ovl.lower1 / "x").write_text("data")
    os.link(ovl.lower1 / "x", ovl.lower1 / "y")
    mnt = ovl.mount()
    assert os.lstat(mnt / "x").st_nlink == 2
    os.close(os.open(mnt / "x", os.O_WRONLY))          # copies x up, changes nothing else
    assert os.lstat(ovl.upper / "x").st_nlink == 1
    assert os.lstat(mnt / "x").st_nlink == 1            # what kernel overlayfs reports


def test_copied_up_lower_hardlink_keeps_its_inode_until_remount_on_pyfuse3(
        ovl: OvlLayers) -> None:
    """pyfuse3 sends st_ino as the node id, so each name's number is its inode's: the copied
    name keeps its number while the mount holds it, the other name stays the lower file;
    after a remount the copy has the upper file's own number, distinct from the other
    name's, and keeps it across remounts."""
    (ovl.lower1 / "x").write_text("data")
    os.link(ovl.lower1 / "x", ovl.lower1 / "y")
    mnt = ovl.mount("session=pyfuse3")
    before = os.lstat(mnt / "x").st_ino
    with open(mnt / "x", "a") as f:
        f.write("+")
    assert os.lstat(mnt / "x").st_ino == before
    assert os.lstat(mnt / "x").st_nlink == 1
    assert os.lstat(mnt / "y").st_nlink == 2 and (mnt / "y").read_text() == "data"
    mnt = ovl.remount()
    x = os.lstat(mnt / "x")
    assert x.st_ino == os.lstat(ovl.upper / "x").st_ino != os.lstat(mnt / "y").st_ino
    assert (mnt / "x").read_text() == "data+"
    mnt = ovl.remount()
    assert os.lstat(mnt / "x").st_ino == x.st_ino


def _hardlink_story(mnt: Path, lower: Path, upper: Path) -> list[tuple[str, object]]:
    """st_ino and d_ino of three names of one lower file (two in ``d``, one in the root)
    before and after a write through one of them, as relations that hold on any disk."""
    d = mnt / "d"

    def ino(path: Path) -> int:
        return os.lstat(path).st_ino

    def d_inos() -> dict[str, int]:
        return {e.name: e.inode() for e in os.scandir(d)}

    low = ino(lower / "d" / "a")
    out: list[tuple[str, object]] = [
        ("every name reports the lower st_ino",
         [ino(d / "a") == low, ino(d / "b") == low, ino(mnt / "c") == low]),
        ("d_ino too", [v == low for _, v in sorted(d_inos().items())]),
        ("nlink", [os.lstat(p).st_nlink for p in (d / "a", d / "b", mnt / "c")]),
    ]
    with open(d / "a", "a") as f:
        f.write("+")
    up = ino(upper / "d" / "a")
    out += [
        ("the written name reports its upper file's st_ino", ino(d / "a") == up != low),
        ("the others keep the lower's", [ino(d / "b") == low, ino(mnt / "c") == low]),
        ("d_ino follows", d_inos() == {"a": up, "b": low}),
        ("nlink after", [os.lstat(p).st_nlink for p in (d / "a", d / "b", mnt / "c")]),
        ("data", [(d / "a").read_text(), (d / "b").read_text(), (mnt / "c").read_text()]),
    ]
    return out


def _hardlink_layers(lower: Path) -> None:
    (lower / "d").mkdir()
    (lower / "d" / "a").write_text("x")
    os.link(lower / "d" / "a", lower / "d" / "b")
    os.link(lower / "d" / "a", lower / "c")


@needs_kernel
@pytest.mark.skipif(os.environ.get("BACKINGFS_SESSION", "native") != "native",
                    reason="pyfuse3 sends st_ino as the node id: one number per inode")
def test_names_of_a_lower_hardlink_share_its_st_ino_as_in_the_kernel(
        ovl: OvlLayers, tmp_path: Path) -> None:
    """Tools tell hard links by (st_dev, st_ino) and nlink (tar, rsync -H, du): each name
    of a lower hard link is an inode of its own (copy-up breaks the link), but all report
    the lower file's number until their copy-up, as in the kernel's overlayfs. Before the
    native session could give node ids apart from st_ino, the second name looked up got a
    number of its own (1 << 62 and up) while reporting nlink 2."""
    _hardlink_layers(ovl.lower1)
    mnt = ovl.mount()
    ours = _hardlink_story(mnt, ovl.lower1, ovl.upper)
    (tmp_path / "kernel").mkdir()
    kl = OvlLayers(tmp_path / "kernel")
    _hardlink_layers(kl.lower1)
    with KernelMount(kl) as kmnt:
        theirs = _hardlink_story(kmnt, kl.lower1, kl.upper)
    assert ours == theirs
    assert all(v not in (False, [False]) for _, v in ours), ours
    up, low = os.lstat(ovl.upper / "d" / "a").st_ino, os.lstat(ovl.lower1 / "c").st_ino
    mnt = ovl.remount()
    assert [os.lstat(mnt / p).st_ino for p in ("d/a", "d/b", "c")] == [up, low, low]
    assert {e.name: e.inode() for e in os.scandir(mnt / "d")} == {"a": up, "b": low}


def _failing_xattr_flags_story(mnt: Path, upper: Path) -> list[object]:
    out: list[object] = []
    for name, flag in (("a", os.XATTR_REPLACE), ("c", os.XATTR_CREATE)):
        try:
            os.setxattr(mnt / name, "user.k", b"v", flag)
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
        out.append([os.lstat(mnt / n).st_nlink for n in ("a", "b", "c", "d")])
    out.append(sorted(os.listdir(upper)))
    return out


@needs_kernel
@pytest.mark.skipif(os.environ.get("BACKINGFS_SESSION", "native") != "native",
                    reason="pyfuse3 checks XATTR_CREATE/REPLACE itself, before any copy-up")
def test_a_setxattr_failing_its_flags_copies_up_as_in_the_kernel(
        ovl: OvlLayers, tmp_path: Path) -> None:
    """The kernel copies up before the upper filesystem checks XATTR_CREATE/REPLACE, so a
    failing one breaks a lower hard link too (found by diffrun --lower-hardlink, seed 11)."""
    def layers(lower: Path) -> None:
        (lower / "a").write_text("x")
        os.link(lower / "a", lower / "b")
        (lower / "c").write_text("y")
        os.setxattr(lower / "c", "user.k", b"old")
        os.link(lower / "c", lower / "d")

    layers(ovl.lower1)
    ours = _failing_xattr_flags_story(ovl.mount(), ovl.upper)
    (tmp_path / "kernel").mkdir()
    kl = OvlLayers(tmp_path / "kernel")
    layers(kl.lower1)
    with KernelMount(kl) as kmnt:
        theirs = _failing_xattr_flags_story(kmnt, kl.upper)
    assert ours == theirs
    assert ours == ["ENODATA", [1, 2, 2, 2], "EEXIST", [1, 2, 1, 2], ["a", "c"]]
