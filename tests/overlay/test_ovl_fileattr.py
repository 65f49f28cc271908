"""lsattr/chattr through the overlay (FUSE_IOCTL, overlay/fileattr.py), step by step as the
kernel's overlayfs does them: the attributes read from the object holding the data (no
copy-up), a change copied up first, +i/+a kept in ``overlay.protattr`` and never on the
upper object, sync and noatime copied up with the object. Each step's outcome and the
upper layer's state afterwards are a table taken from the kernel's overlayfs (6.18 over
ext4), checked against it in the same run where it is available.

The pyfuse3 front-end has no FUSE_IOCTL handler: lsattr and chattr fail there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(90)

#: FUSE_IOCTL is served on the native session only (the nested pyfuse3 run of this
#: directory skips these; the last test states what pyfuse3 gives instead).
native_only = pytest.mark.skipif(os.environ.get("BACKINGFS_SESSION", "native") != "native",
                                 reason="lsattr/chattr need the native session (FUSE_IOCTL)")

GETFLAGS, SETFLAGS = 0x80086601, 0x40086602
FSGETXATTR, FSSETXATTR = 0x801C581F, 0x401C5820
FSX = struct.Struct("=IIIII8x")
#: The bits shown, in lsattr's order; the filesystem's own (extents...) are left out.
LETTERS = ((0x8, "S"), (0x10, "i"), (0x20, "a"), (0x40, "d"), (0x80, "A"))
XLETTERS = ((0x20, "S"), (0x8, "i"), (0x10, "a"), (0x80, "d"), (0x40, "A"))
PROTATTR = "trusted.overlay.protattr"

#: (step, outcome): the kernel's overlayfs 6.18 over ext4, layers as ``layers`` makes them.
EXPECTED = [
    ("lsattr f", "-"),
    ("lsattr sf", "S"),
    ("lsattr imm", "i"),
    ("lsattr app", "a"),
    ("lsattr sd", "A"),
    ("lsattr idir", "i"),
    ("fsgetxattr imm", "i"),
    ("fsgetxattr sf", "S"),
    ("upper after reading", ""),
    ("chattr +d f", "ok"),
    ("lsattr f", "d"),
    ("append to sf", "ok"),
    ("create in sd", "ok"),
    ("chattr -i imm", "ok"),
    ("lsattr imm", "-"),
    ("write imm", "ok"),
    ("chattr +ia f", "ok"),
    ("lsattr f", "iad"),
    ("write f", "EPERM"),
    ("fsgetxattr f", "iad"),
    ("chattr -ia f", "ok"),
    ("write f", "ok"),
    ("fssetxattr +i app", "ok"),
    ("lsattr app", "ia"),
    ("open app WRONLY|APPEND", "EPERM"),
    ("chattr +i idir (set again)", "ok"),
    ("create in idir", "EPERM"),
    ("chattr -i idir", "ok"),
    ("create in idir", "ok"),
    ("chattr +a sd", "ok"),
    ("unlink in sd", "EPERM"),
    ("lsattr sd", "aA"),
    ("chattr fifo", "ENOTTY"),
    ("upper f", "d protattr=None"),
    ("upper sf", "S protattr=None"),
    ("upper imm", "- protattr=None"),
    ("upper app", "- protattr=ai"),
    ("upper sd", "A protattr=a"),
    ("upper idir", "- protattr=None"),
]


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def _unprotect(root: Path) -> None:
    """Take +i/+a off everything under ``root`` (or its directories could not be removed)."""
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink() and (p.is_file() or p.is_dir()):
            with contextlib.suppress(subprocess.CalledProcessError):
                _chattr("-ia", p)


@pytest.fixture
def layers(ovl: OvlLayers) -> Iterator[OvlLayers]:
    low = ovl.lower1
    for name in ("f", "sf", "imm", "app"):
        (low / name).write_bytes(b"lower\n")
    for d in ("sd", "idir"):
        (low / d).mkdir()
        (low / d / "x").write_bytes(b"x")
    os.mkfifo(low / "fifo")
    try:
        _chattr("+S", low / "sf")
        _chattr("+A", low / "sd")
        _chattr("+i", low / "imm", low / "idir")
        _chattr("+a", low / "app")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr not possible here: {e}")
    try:
        yield ovl
    finally:
        for root in (ovl.lower1, ovl.upper, ovl.root / "kupper"):
            if root.exists():
                _unprotect(root)


def _letters(flags: int, table: tuple[tuple[int, str], ...] = LETTERS) -> str:
    return "".join(c for bit, c in table if flags & bit) or "-"


def _getflags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
    finally:
        os.close(fd)


def _setflags(path: Path, add: int = 0, remove: int = 0) -> None:
    """chattr(1)'s read-modify-write."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
        fcntl.ioctl(fd, SETFLAGS, struct.pack("=I", (flags | add) & ~remove))
    finally:
        os.close(fd)


def _fsx(path: Path, add: int = 0) -> int:
    """FS_IOC_FSGETXATTR's xflags; with ``add``, FS_IOC_FSSETXATTR them with those bits."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fields = list(FSX.unpack(fcntl.ioctl(fd, FSGETXATTR, bytes(FSX.size))))
        if add:
            fields[0] |= add
            fcntl.ioctl(fd, FSSETXATTR, FSX.pack(*fields))
        return fields[0]
    finally:
        os.close(fd)


def _upper_state(upper: Path, name: str) -> str:
    try:
        prot: str | None = os.getxattr(upper / name, PROTATTR).decode()
    except OSError as e:
        assert e.errno == errno.ENODATA
        prot = None
    return f"{_letters(_getflags(upper / name))} protattr={prot}"


def _steps(m: Path, upper: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def t(what: str, f: Callable[[], object]) -> None:
        try:
            got = f()
            out.append((what, got if isinstance(got, str) else "ok"))
        except OSError as e:
            out.append((what, errno.errorcode[e.errno]))

    def write(path: Path, flags: int = os.O_WRONLY) -> None:
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            os.write(fd, b"w")
        finally:
            os.close(fd)

    for name in ("f", "sf", "imm", "app", "sd", "idir"):
        t(f"lsattr {name}", lambda n=name: _letters(_getflags(m / n)))
    for name in ("imm", "sf"):
        t(f"fsgetxattr {name}", lambda n=name: _letters(_fsx(m / n), XLETTERS))
    t("upper after reading", lambda: " ".join(sorted(os.listdir(upper))))
    t("chattr +d f", lambda: _setflags(m / "f", add=0x40))
    t("lsattr f", lambda: _letters(_getflags(m / "f")))
    t("append to sf", lambda: write(m / "sf", os.O_WRONLY | os.O_APPEND))
    t("create in sd", lambda: write(m / "sd" / "new", os.O_WRONLY | os.O_CREAT))
    t("chattr -i imm", lambda: _setflags(m / "imm", remove=0x10))
    t("lsattr imm", lambda: _letters(_getflags(m / "imm")))
    t("write imm", lambda: write(m / "imm"))
    t("chattr +ia f", lambda: _setflags(m / "f", add=0x30))
    t("lsattr f", lambda: _letters(_getflags(m / "f")))
    t("write f", lambda: write(m / "f"))
    t("fsgetxattr f", lambda: _letters(_fsx(m / "f"), XLETTERS))
    t("chattr -ia f", lambda: _setflags(m / "f", remove=0x30))
    t("write f", lambda: write(m / "f"))
    t("fssetxattr +i app", lambda: _fsx(m / "app", add=0x8) and None)
    t("lsattr app", lambda: _letters(_getflags(m / "app")))
    t("open app WRONLY|APPEND", lambda: write(m / "app", os.O_WRONLY | os.O_APPEND))
    t("chattr +i idir (set again)", lambda: _setflags(m / "idir", add=0x10))
    t("create in idir", lambda: write(m / "idir" / "new", os.O_WRONLY | os.O_CREAT))
    t("chattr -i idir", lambda: _setflags(m / "idir", remove=0x10))
    t("create in idir", lambda: write(m / "idir" / "new", os.O_WRONLY | os.O_CREAT))
    t("chattr +a sd", lambda: _setflags(m / "sd", add=0x20))
    t("unlink in sd", lambda: os.unlink(m / "sd" / "x"))
    t("lsattr sd", lambda: _letters(_getflags(m / "sd")))
    t("chattr fifo", lambda: _setflags(m / "fifo", add=0x40))
    for name in ("f", "sf", "imm", "app", "sd", "idir"):
        t(f"upper {name}", lambda n=name: _upper_state(upper, n))
    return out


@contextlib.contextmanager
def _kernel_overlay(ovl: OvlLayers, upper: Path) -> Iterator[Path]:
    kmnt, kwork = ovl.root / "kmnt", ovl.root / "kwork"
    for d in (kmnt, kwork, upper):
        d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ovl.lower1}:{ovl.lower2},upperdir={upper},workdir={kwork}",
                    str(kmnt)], check=True)
    try:
        yield kmnt
    finally:
        subprocess.run(["umount", str(kmnt)], check=True)


def _has_kernel_overlay() -> bool:
    return os.geteuid() == 0 and "overlay" in Path("/proc/filesystems").read_text()


@native_only
def test_chattr_and_lsattr_step_by_step(layers: OvlLayers) -> None:
    m = layers.mount()
    assert _steps(m, layers.upper) == EXPECTED
    # The flags live on: through a remount, and under the kernel's overlayfs.
    m = layers.remount()
    assert _letters(_getflags(m / "app")) == "ia"
    with pytest.raises(PermissionError):
        os.close(os.open(m / "app", os.O_WRONLY | os.O_APPEND))
    layers.unmount()
    if not _has_kernel_overlay():
        return
    with _kernel_overlay(layers, layers.upper) as kmnt:
        assert _letters(_getflags(kmnt / "app")) == "ia"
        assert _letters(_getflags(kmnt / "sd")) == "aA"
        with pytest.raises(PermissionError):
            os.unlink(kmnt / "sd" / "x")


@native_only
def test_kernel_overlay_gives_the_same_steps(layers: OvlLayers) -> None:
    """The table is the oracle's: checked against the kernel's overlayfs in this run."""
    if not _has_kernel_overlay():
        pytest.skip("needs root and kernel overlayfs")
    kupper = layers.root / "kupper"
    with _kernel_overlay(layers, kupper) as kmnt:
        assert _steps(kmnt, kupper) == EXPECTED
    # The upper the kernel wrote, under our overlay: the same attributes.
    layers.upper.rmdir()
    kupper.rename(layers.upper)
    m = layers.mount()
    assert _letters(_getflags(m / "app")) == "ia"
    assert _letters(_getflags(m / "f")) == "d"
    with pytest.raises(PermissionError):
        os.unlink(m / "sd" / "x")


@native_only
def test_chattr_on_a_read_only_overlay_is_erofs(layers: OvlLayers) -> None:
    m = layers.mount(upper=False)
    assert _letters(_getflags(m / "imm")) == "i"
    with pytest.raises(OSError) as e:
        _setflags(m / "f", add=0x40)
    assert e.value.errno == errno.EROFS


def test_pyfuse3_front_end_has_no_fileattr(layers: OvlLayers) -> None:
    """libfuse 3.14 answers FUSE_IOCTL with ENOSYS for pyfuse3, which has no handler."""
    m = layers.mount("session=pyfuse3")
    with pytest.raises(OSError) as e:
        _getflags(m / "f")
    assert e.value.errno in (errno.ENOTTY, errno.EOPNOTSUPP)


@native_only
def test_chattr_shows_its_new_ctime_at_once(layers: OvlLayers) -> None:
    """The overlay keeps attributes without a timeout: a chattr must drop them, as the
    kernel's overlayfs copies the upper ctime (``ovl_copyattr``)."""
    m = layers.mount()
    (m / "new").write_bytes(b"n")
    before = os.stat(m / "new").st_ctime_ns
    time.sleep(0.02)
    _setflags(m / "new", add=0x40)
    after = os.stat(m / "new").st_ctime_ns
    assert after > before
    assert after == os.stat(layers.upper / "new").st_ctime_ns
