"""On-disk format interop with the kernel's overlayfs, both ways."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(90)


def kernel_overlay_available() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f)
    except OSError:
        return False


needs_kernel = pytest.mark.skipif(os.geteuid() != 0 or not kernel_overlay_available(),
                                  reason="needs root and kernel overlayfs")


class KernelMount:
    def __init__(self, ovl: OvlLayers) -> None:
        self.ovl = ovl
        self.mnt = ovl.root / "kmnt"
        self.work = ovl.root / "kwork"
        self.mnt.mkdir(exist_ok=True)
        self.work.mkdir(exist_ok=True)
        self.mounted = False

    def __enter__(self) -> Path:
        o = self.ovl
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={o.lower1}:{o.lower2},upperdir={o.upper},"
                        f"workdir={self.work}", str(self.mnt)], check=True)
        self.mounted = True
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mnt)], check=True)
            self.mounted = False


def tree(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else (
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                n: os.getxattr(p, n) for n in sorted(os.listxattr(p))}
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, data, xattrs)
    return out


def make_lowers(ovl: OvlLayers) -> None:
    (ovl.lower2 / "d").mkdir()
    (ovl.lower2 / "d" / "below").write_text("b")
    (ovl.lower2 / "d" / "gone").write_text("g")
    (ovl.lower1 / "d").mkdir()
    (ovl.lower1 / "d" / "above").write_text("a")
    (ovl.lower1 / "f").write_text("file")
    (ovl.lower1 / "rm").write_text("to remove")
    (ovl.lower1 / "old").mkdir()
    (ovl.lower1 / "old" / "x").write_text("x")
    os.symlink("f", ovl.lower1 / "sl")


def mutate(mnt: Path) -> None:
    with open(mnt / "f", "a") as f:
        f.write(" appended")
    os.chmod(mnt / "f", 0o600)
    os.chown(mnt / "f", 11, 12)
    os.setxattr(mnt / "f", "user.k", b"v")
    os.unlink(mnt / "rm")
    os.unlink(mnt / "d" / "gone")
    (mnt / "d" / "new").write_text("n")
    os.unlink(mnt / "old" / "x")
    os.rmdir(mnt / "old")
    os.mkdir(mnt / "old")  # opaque
    (mnt / "old" / "fresh").write_text("f")
    os.rename(mnt / "d" / "above", mnt / "moved")
    os.symlink("moved", mnt / "sl2")


@needs_kernel
def test_kernel_reads_our_upper(ovl: OvlLayers) -> None:
    make_lowers(ovl)
    mnt = ovl.mount()
    mutate(mnt)
    ours = tree(mnt)
    ovl.unmount()
    with KernelMount(ovl) as kmnt:
        theirs = tree(kmnt)
    assert theirs == ours
    assert "rm" not in ours and "old/x" not in ours and "d/gone" not in ours
    assert ours["f"][1:4] == (0o600, 11, 12)


@needs_kernel
def test_we_read_kernel_upper(ovl: OvlLayers) -> None:
    make_lowers(ovl)
    with KernelMount(ovl) as kmnt:
        mutate(kmnt)
        theirs = tree(kmnt)
    mnt = ovl.mount()
    ours = tree(mnt)
    assert ours == theirs
