"""chattr +i/+a on lower objects: enforced as the kernel's overlayfs enforces them
(overlay/protattr.py). Every outcome is checked against a table taken from the kernel's
overlayfs and, where it is available, against the kernel's overlayfs over the same lower
layer in the same run."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(90)

#: (what, expected outcome): the kernel's overlayfs 6.18 over ext4 lower files
EXPECTED = [
    ("touch app (now)", "ok"),
    ("touch app (explicit)", "EPERM"),
    ("touch imm (now)", "EPERM"),
    ("open imm RDONLY|TRUNC", "EPERM"),
    ("open imm RDONLY", "ok"),
    ("open imm WRONLY", "EPERM"),
    ("open app WRONLY|APPEND|TRUNC", "EPERM"),
    ("open app WRONLY", "EPERM"),
    ("truncate app", "EPERM"),
    ("chown app", "EPERM"),
    ("chmod imm", "EPERM"),
    ("create in idir", "EPERM"),
    ("mkdir in idir", "EPERM"),
    ("symlink in idir", "EPERM"),
    ("unlink in idir", "EPERM"),
    ("link imm", "EPERM"),
    ("link app", "EPERM"),
    ("create in adir", "ok"),
    ("unlink in adir", "EPERM"),
    ("rename out of adir", "EPERM"),
    ("rename other over app", "EPERM"),
    ("rename app away", "EPERM"),
    ("unlink imm", "EPERM"),
    ("rmdir idir", "EPERM"),
    ("chmod idir", "EPERM"),
    ("setxattr imm", "EPERM"),
    ("removexattr app", "EPERM"),
    ("open app WRONLY|APPEND", "ok"),
    ("open app WRONLY (after copy-up)", "EPERM"),
    ("setxattr app (after copy-up)", "EPERM"),
    ("unlink new in adir (after copy-up)", "EPERM"),
    ("read imm", "ok"),
    ("write plain file", "ok"),
]


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@pytest.fixture
def protected(ovl: OvlLayers) -> Iterator[OvlLayers]:
    """lower1 with ``imm`` and ``idir`` (+i), ``app`` and ``adir`` (+a), ``other``; the
    flags are taken off again whatever happens, or the directory could not be removed."""
    low = ovl.lower1
    for name in ("imm", "app", "other"):
        (low / name).write_bytes(b"lower data\n")
    for d in ("idir", "adir"):
        (low / d).mkdir()
        (low / d / "x").write_bytes(b"x")
    flagged = [low / "imm", low / "idir", low / "app", low / "adir"]
    try:
        _chattr("+i", low / "imm", low / "idir")
        _chattr("+a", low / "app", low / "adir")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr +i/+a not possible here: {e}")
    try:
        yield ovl
    finally:
        for p in flagged:
            with contextlib.suppress(subprocess.CalledProcessError):
                _chattr("-ia", p)
        for p in ovl.upper.rglob("*"):  # the kernel's copies carry no flags, but be sure
            with contextlib.suppress(subprocess.CalledProcessError):
                _chattr("-ia", p)


def _outcomes(m: Path) -> list[tuple[str, str]]:
    results: list[tuple[str, str]] = []

    def t(what: str, f: Callable[[], object]) -> None:
        try:
            f()
            results.append((what, "ok"))
        except OSError as e:
            results.append((what, errno.errorcode[e.errno]))

    def opened(path: Path, flags: int) -> None:
        os.close(os.open(path, flags | os.O_CLOEXEC))

    t("touch app (now)", lambda: os.utime(m / "app"))
    t("touch app (explicit)", lambda: os.utime(m / "app", ns=(1, 1)))
    t("touch imm (now)", lambda: os.utime(m / "imm"))
    t("open imm RDONLY|TRUNC", lambda: opened(m / "imm", os.O_RDONLY | os.O_TRUNC))
    t("open imm RDONLY", lambda: opened(m / "imm", os.O_RDONLY))
    t("open imm WRONLY", lambda: opened(m / "imm", os.O_WRONLY))
    t("open app WRONLY|APPEND|TRUNC",
      lambda: opened(m / "app", os.O_WRONLY | os.O_APPEND | os.O_TRUNC))
    t("open app WRONLY", lambda: opened(m / "app", os.O_WRONLY))
    t("truncate app", lambda: os.truncate(m / "app", 0))
    t("chown app", lambda: os.chown(m / "app", 0, 0))
    t("chmod imm", lambda: os.chmod(m / "imm", 0o600))
    t("create in idir", lambda: opened(m / "idir" / "new", os.O_CREAT | os.O_WRONLY))
    t("mkdir in idir", lambda: os.mkdir(m / "idir" / "nd"))
    t("symlink in idir", lambda: os.symlink("x", m / "idir" / "sl"))
    t("unlink in idir", lambda: os.unlink(m / "idir" / "x"))
    t("link imm", lambda: os.link(m / "imm", m / "imm2"))
    t("link app", lambda: os.link(m / "app", m / "app2"))
    t("create in adir", lambda: opened(m / "adir" / "new", os.O_CREAT | os.O_WRONLY))
    t("unlink in adir", lambda: os.unlink(m / "adir" / "x"))
    t("rename out of adir", lambda: os.rename(m / "adir" / "x", m / "moved"))
    t("rename other over app", lambda: os.rename(m / "other", m / "app"))
    t("rename app away", lambda: os.rename(m / "app", m / "app3"))
    t("unlink imm", lambda: os.unlink(m / "imm"))
    t("rmdir idir", lambda: os.rmdir(m / "idir"))
    t("chmod idir", lambda: os.chmod(m / "idir", 0o700))
    t("setxattr imm", lambda: os.setxattr(m / "imm", "user.a", b"1"))
    t("removexattr app", lambda: os.removexattr(m / "app", "user.a"))
    t("open app WRONLY|APPEND", lambda: opened(m / "app", os.O_WRONLY | os.O_APPEND))
    t("open app WRONLY (after copy-up)", lambda: opened(m / "app", os.O_WRONLY))
    t("setxattr app (after copy-up)", lambda: os.setxattr(m / "app", "user.a", b"1"))
    t("unlink new in adir (after copy-up)", lambda: os.unlink(m / "adir" / "new"))
    t("read imm", lambda: (m / "imm").read_bytes())
    t("write plain file", lambda: (m / "other").write_bytes(b"changed\n"))
    return results


@contextlib.contextmanager
def _kernel_overlay(ovl: OvlLayers, tmp_path: Path) -> Iterator[Path]:
    """The kernel's overlayfs over ``ovl``'s layers, unmounted whatever happens."""
    kmnt, kwork = tmp_path / "kmnt", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ovl.lower1}:{ovl.lower2},upperdir={ovl.upper},"
                    f"workdir={kwork}", str(kmnt)], check=True)
    try:
        yield kmnt
    finally:
        subprocess.run(["umount", str(kmnt)], check=True)


@pytest.mark.parametrize("session", ["native", "pyfuse3"])
def test_protected_lower_objects_refuse_changes(protected: OvlLayers, session: str) -> None:
    m = protected.mount(f"session={session}")
    expected = dict(EXPECTED)
    if session == "pyfuse3":  # libfuse hands UTIME_NOW over resolved: explicit times
        expected["touch app (now)"] = "EPERM"
    assert _outcomes(m) == list(expected.items())
    assert (m / "imm").read_bytes() == b"lower data\n"
    assert (m / "app").read_bytes() == b"lower data\n"
    assert sorted(os.listdir(m / "idir")) == ["x"]
    assert sorted(os.listdir(m / "adir")) == ["new", "x"]
    # Nothing of the refused changes reached the upper layer: no copy of imm or idir.
    assert sorted(p.name for p in protected.upper.iterdir()) == ["adir", "app", "other"]
    assert os.getxattr(protected.upper / "app", "trusted.overlay.protattr") == b"a"


def test_protattr_survives_a_remount_and_the_kernel_honours_ours(protected: OvlLayers,
                                                                  tmp_path: Path) -> None:
    m = protected.mount()
    (m / "adir" / "new").write_bytes(b"n")  # copies adir up: it keeps its +a as protattr
    with open(m / "app", "ab") as f:  # copies app up, allowed: O_APPEND
        f.write(b"more\n")
    protected.unmount()
    m = protected.mount()
    with pytest.raises(PermissionError):
        os.close(os.open(m / "app", os.O_WRONLY))
    with pytest.raises(PermissionError):
        os.unlink(m / "adir" / "new")
    protected.unmount()
    if os.geteuid() != 0:
        return
    with _kernel_overlay(protected, tmp_path) as kmnt:
        assert (kmnt / "app").read_bytes() == b"lower data\nmore\n"
        with pytest.raises(PermissionError):
            os.close(os.open(kmnt / "app", os.O_WRONLY))
        with pytest.raises(PermissionError):
            os.unlink(kmnt / "adir" / "new")


def test_kernel_overlay_gives_the_same_outcomes(protected: OvlLayers, tmp_path: Path) -> None:
    """The table above is the oracle's: checked against the kernel's overlayfs in this run."""
    if os.geteuid() != 0 or "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("needs root and kernel overlayfs")
    with _kernel_overlay(protected, tmp_path) as kmnt:
        assert _outcomes(kmnt) == EXPECTED
    # The upper the kernel wrote (app and adir copied up, their +a kept as protattr)
    # under our overlay: still append-only.
    m = protected.mount()
    with pytest.raises(PermissionError):
        os.close(os.open(m / "app", os.O_WRONLY))
    with pytest.raises(PermissionError):
        os.unlink(m / "adir" / "new")
    with open(m / "app", "ab") as f:
        f.write(b"ours\n")
