"""chattr +a/+i files in SOURCE behave through the mount as on SOURCE itself: the backing
filesystem refuses what they forbid, and allows what they allow, although the daemon's
backing open and utimensat differ from the caller's (no O_APPEND; resolved times)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from passthru_helpers import StartPassthru

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def flagged(tmp_path: Path) -> Iterator[Path]:
    source = tmp_path / "source"
    source.mkdir()
    (source / "app").write_bytes(b"log\n")
    (source / "imm").write_bytes(b"fixed\n")
    try:
        subprocess.run(["chattr", "+a", str(source / "app")], check=True, capture_output=True)
        subprocess.run(["chattr", "+i", str(source / "imm")], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr +a/+i not possible here: {e}")
    try:
        yield source
    finally:
        for name in ("app", "imm"):
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["chattr", "-ia", str(source / name)], check=True)


@pytest.mark.parametrize("session", ["native", "pyfuse3"])
def test_append_only_file_takes_appends_only(passthru_mount: StartPassthru, flagged: Path,
                                             session: str) -> None:
    m = passthru_mount(f"session={session}").mnt
    with open(m / "app", "ab") as f:  # O_APPEND: allowed, as on SOURCE
        f.write(b"more\n")
    assert (flagged / "app").read_bytes() == b"log\nmore\n"
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.close(os.open(m / "app", flags))
    with pytest.raises(PermissionError):
        os.utime(m / "app", ns=(1, 1))
    if session == "native":  # pyfuse3 hands UTIME_NOW over resolved: explicit times
        os.utime(m / "app")
    assert (m / "app").read_bytes() == b"log\nmore\n"


def test_append_only_under_writeback_refuses_write_opens(passthru_mount: StartPassthru,
                                                         flagged: Path) -> None:
    """The writeback cache's page flushes may rewrite the last page: no write open."""
    m = passthru_mount("writeback").mnt
    with pytest.raises(PermissionError):
        os.close(os.open(m / "app", os.O_WRONLY | os.O_APPEND))
    assert (m / "app").read_bytes() == b"log\n"


def test_immutable_file_refuses_every_change(passthru_mount: StartPassthru,
                                             flagged: Path) -> None:
    m = passthru_mount().mnt
    for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.close(os.open(m / "imm", flags))
    for change in (lambda: os.utime(m / "imm"), lambda: os.chmod(m / "imm", 0o600),
                   lambda: os.unlink(m / "imm"), lambda: os.link(m / "imm", m / "l"),
                   lambda: os.setxattr(m / "imm", "user.x", b"1")):
        with pytest.raises(PermissionError):
            change()
    assert (m / "imm").read_bytes() == b"fixed\n"
