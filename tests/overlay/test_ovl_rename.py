"""rename: EXDEV for lower and merged directories, whiteouts left behind, flags, opacity."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(60)

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old, new, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def is_chr_whiteout(path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_lower_dir_rename_is_exdev(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    mnt = ovl.mount()
    with pytest.raises(OSError) as e:
        os.rename(mnt / "d", mnt / "e")
    assert e.value.errno == errno.EXDEV


def test_merged_dir_rename_is_exdev(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    mnt = ovl.mount()
    (mnt / "d" / "new").write_text("x")  # d now on upper too: merged
    with pytest.raises(OSError) as e:
        os.rename(mnt / "d", mnt / "e")
    assert e.value.errno == errno.EXDEV


def test_pure_upper_dir_rename(ovl: OvlLayers) -> None:
    mnt = ovl.mount()
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_text("x")
    os.rename(mnt / "d", mnt / "e")
    assert (mnt / "e" / "f").read_text() == "x"
    assert os.listdir(ovl.upper) == ["e"]


def test_rename_lower_file_leaves_whiteout(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("data")
    mnt = ovl.mount()
    os.rename(mnt / "f", mnt / "g")
    assert sorted(os.listdir(mnt)) == ["g"]
    assert (mnt / "g").read_text() == "data"
    assert is_chr_whiteout(ovl.upper / "f")
    assert ovl.work_entries() == []


def test_rename_pure_upper_file_leaves_no_whiteout(ovl: OvlLayers) -> None:
    mnt = ovl.mount()
    (mnt / "f").write_text("x")
    os.rename(mnt / "f", mnt / "g")
    assert os.listdir(ovl.upper) == ["g"]


def test_rename_over_lower_file(ovl: OvlLayers) -> None:
    (ovl.lower1 / "target").write_text("old")
    mnt = ovl.mount()
    (mnt / "src").write_text("new")
    os.rename(mnt / "src", mnt / "target")
    assert (mnt / "target").read_text() == "new"
    assert sorted(os.listdir(mnt)) == ["target"]


def test_noreplace(ovl: OvlLayers) -> None:
    (ovl.lower1 / "a").write_text("a")
    (ovl.lower2 / "b").write_text("b")
    mnt = ovl.mount()
    with pytest.raises(OSError) as e:
        renameat2(mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(mnt)) == ["b", "c"]


def test_exchange(ovl: OvlLayers) -> None:
    (ovl.lower1 / "a").write_text("a")
    (ovl.lower2 / "b").write_text("b")
    mnt = ovl.mount()
    renameat2(mnt / "a", mnt / "b", RENAME_EXCHANGE)
    assert (mnt / "a").read_text() == "b"
    assert (mnt / "b").read_text() == "a"
    (ovl.lower1 / "d").mkdir()


def test_exchange_with_lower_dir_is_exdev(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    mnt = ovl.mount()
    (mnt / "f").write_text("x")
    with pytest.raises(OSError) as e:
        renameat2(mnt / "f", mnt / "d", RENAME_EXCHANGE)
    assert e.value.errno == errno.EXDEV


def test_upper_dir_into_merged_parent_becomes_opaque(ovl: OvlLayers) -> None:
    (ovl.lower1 / "p").mkdir()
    (ovl.lower1 / "p" / "x").mkdir()
    (ovl.lower1 / "p" / "x" / "old").write_text("o")
    mnt = ovl.mount()
    (mnt / "d").mkdir()
    (mnt / "d" / "mine").write_text("m")
    os.unlink(mnt / "p" / "x" / "old")
    os.rmdir(mnt / "p" / "x")
    os.rename(mnt / "d", mnt / "p" / "x")
    assert os.listdir(mnt / "p" / "x") == ["mine"]
    assert os.getxattr(ovl.upper / "p" / "x", "trusted.overlay.opaque") == b"y"


def test_rename_dir_over_empty_merged_dir(ovl: OvlLayers) -> None:
    (ovl.lower1 / "t").mkdir()
    (ovl.lower1 / "t" / "gone").write_text("g")
    mnt = ovl.mount()
    os.unlink(mnt / "t" / "gone")
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_text("f")
    os.rename(mnt / "d", mnt / "t")
    assert os.listdir(mnt / "t") == ["f"]
    assert not (mnt / "d").exists()


def test_bad_flags_einval(ovl: OvlLayers) -> None:
    (ovl.lower1 / "a").write_text("a")
    mnt = ovl.mount()
    with pytest.raises(OSError) as e:
        renameat2(mnt / "a", mnt / "b", RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert e.value.errno == errno.EINVAL
