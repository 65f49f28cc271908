"""Hard links inside a lower layer: copy-up breaks them (no index), so with an upper layer
each name is an overlay inode of its own, as the kernel's ``ovl_hash_bylower`` decides.

Found by the differential runner (tests/differential, overlay pair): with one shared inode,
copy-up copied whichever name the inode was last looked up as (a readdir elsewhere was
enough), so a write to ``a`` landed in another name's upper copy, and the kernel's cached
dentries of the other names showed the copy's data. These run with the default entry
timeout (the kernel keeps every dentry), unlike test_ovl_ino.py's timeout=0 case.
"""

from __future__ import annotations

import os

import pytest
from ovl_layers import OvlLayers

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


def test_copied_up_lower_hardlink_keeps_its_inode_until_remount(ovl: OvlLayers) -> None:
    """The copied name keeps its kernel inode (st_ino included) while the mount holds it;
    the other name stays the lower file; after a remount the copy has the upper file's
    own number, distinct from the other name's, and keeps it across remounts."""
    (ovl.lower1 / "x").write_text("data")
    os.link(ovl.lower1 / "x", ovl.lower1 / "y")
    mnt = ovl.mount()
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
