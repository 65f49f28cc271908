"""Inode numbers: one st_dev, st_ino unique across layers, stable across copy-up/remount."""

from __future__ import annotations

import os

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(90)


def test_st_ino_stable_across_copy_up_and_remount(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("x")
    (ovl.lower1 / "d").mkdir()
    (ovl.lower2 / "g").write_text("y")
    mnt = ovl.mount()
    before = {n: os.lstat(mnt / n).st_ino for n in ("f", "d", "g")}
    with open(mnt / "f", "a") as f:
        f.write("more")
    (mnt / "d" / "new").write_text("n")  # copies d up
    os.chmod(mnt / "g", 0o600)
    assert (ovl.upper / "f").exists() and (ovl.upper / "d").exists()
    assert {n: os.lstat(mnt / n).st_ino for n in before} == before
    mnt = ovl.remount()
    assert {n: os.lstat(mnt / n).st_ino for n in before} == before
    with os.scandir(mnt) as it:
        assert {e.name: e.inode() for e in it if e.name in before} == before


def test_one_st_dev_and_unique_st_ino(ovl: OvlLayers) -> None:
    for i in range(20):
        (ovl.lower1 / f"a{i}").write_text("x")
        (ovl.lower2 / f"b{i}").write_text("x")
        (ovl.upper / f"c{i}").write_text("x")
    mnt = ovl.mount()
    sts = [os.lstat(mnt / n) for n in os.listdir(mnt)]
    assert len({st.st_dev for st in sts}) == 1
    assert sts[0].st_dev == os.stat(mnt).st_dev
    assert len({st.st_ino for st in sts}) == len(sts) == 60


def test_new_upper_object_keeps_its_number_over_remount(ovl: OvlLayers) -> None:
    mnt = ovl.mount()
    (mnt / "new").write_text("x")
    ino = os.lstat(mnt / "new").st_ino
    mnt = ovl.remount()
    assert os.lstat(mnt / "new").st_ino == ino


def test_hard_links_in_a_layer_share_an_inode(ovl: OvlLayers) -> None:
    # Only where nothing can copy them up: with an upper, copy-up breaks lower hard links,
    # so each name is an inode of its own (test_ovl_lower_hardlinks.py).
    (ovl.lower1 / "a").write_text("x")
    os.link(ovl.lower1 / "a", ovl.lower1 / "b")
    mnt = ovl.mount(upper=False)
    assert os.lstat(mnt / "a").st_ino == os.lstat(mnt / "b").st_ino
    assert os.lstat(mnt / "a").st_nlink == 2


def test_copy_up_of_lower_hardlink_breaks_it(ovl: OvlLayers) -> None:
    (ovl.lower1 / "a").write_text("x")
    os.link(ovl.lower1 / "a", ovl.lower1 / "b")
    mnt = ovl.mount("timeout=0")
    with open(mnt / "a", "a") as f:
        f.write("y")
    assert (mnt / "a").read_text() == "xy"
    assert (mnt / "b").read_text() == "x"  # the kernel's non-index behaviour
    assert os.lstat(mnt / "a").st_ino != os.lstat(mnt / "b").st_ino
