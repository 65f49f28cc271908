"""passthru's command line: one-line errors with their exit codes, background mode, options."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from backingfs import acl
from backingfs.testing import (
    Mount,
    cli_argv,
    cli_env,
    find_daemon_pid,
    is_fuse_mounted,
    start_daemon,
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv("passthru", *args), env=cli_env(), capture_output=True,
                          text=True, timeout=30)


def _assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert r.returncode == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("backingfs-passthru: ")
    assert text in lines[0]
    assert "Traceback" not in r.stderr


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, mnt = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    return source, mnt


@pytest.mark.timeout(60)
def test_missing_source(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, mnt = dirs
    _assert_one_line_error(_run(str(tmp_path / "nope"), str(mnt)), 1, "does not exist")
    assert not is_fuse_mounted(str(mnt))


@pytest.mark.timeout(60)
def test_source_is_a_file(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, mnt = dirs
    f = tmp_path / "file"
    f.write_bytes(b"x")
    _assert_one_line_error(_run(str(f), str(mnt)), 1, "is not a directory")
    assert not is_fuse_mounted(str(mnt))


@pytest.mark.timeout(60)
def test_missing_mountpoint(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = dirs
    _assert_one_line_error(_run(str(source), str(tmp_path / "nope")), 1, "does not exist")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", ["bogus", "cache=sometimes", "timeout=soon",
                                    "writeback=1"])
def test_bad_option_is_a_usage_error(dirs: tuple[Path, Path], option: str) -> None:
    source, mnt = dirs
    _assert_one_line_error(_run("-o", option, str(source), str(mnt)), 2, option.split("=")[0])
    assert not is_fuse_mounted(str(mnt))


@pytest.mark.timeout(60)
def test_wrong_argument_count_is_a_usage_error(dirs: tuple[Path, Path]) -> None:
    source, _ = dirs
    _assert_one_line_error(_run(str(source)), 2, "expected 2 argument(s)")


@pytest.mark.timeout(60)
def test_help_and_version_exit_0() -> None:
    r = _run("--help")
    assert r.returncode == 0 and "SOURCE MOUNTPOINT" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("backingfs-passthru ")


@pytest.mark.timeout(60)
def test_background_returns_only_once_live(dirs: tuple[Path, Path]) -> None:
    source, mnt = dirs
    (source / "f").write_bytes(b"data")
    m = Mount(str(mnt), pid=None)
    try:
        r = _run("-o", "cache=never", str(source), str(mnt))
        assert r.returncode == 0, r.stderr
        # No polling: the exit status promised a live mount.
        assert is_fuse_mounted(str(mnt))
        m.pid = find_daemon_pid(str(mnt))
        assert m.pid is not None
        assert (mnt / "f").read_bytes() == b"data"
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if f" {mnt} " in ln)
        assert "fuse.backingfs-passthru" in line and str(source) in line
        assert "default_permissions" in line
        m.unmount_clean(timeout=20)
    finally:
        if m.pid is None:
            m.pid = find_daemon_pid(str(mnt))
        m.force_cleanup()


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv")
@pytest.mark.parametrize("noacl", [False, True], ids=["acl", "noacl"])
def test_noacl_leaves_the_mode_bits_in_charge(noacl: bool) -> None:
    """SOURCE's ACLs are enforced by default (FUSE_POSIX_ACL); ``noacl`` turns that off."""
    base = Path(tempfile.mkdtemp(prefix="bfs-acl-"))   # tmp_path's 0700 keeps nobody out
    m: Mount | None = None
    try:
        os.chmod(base, 0o755)
        source, mnt = base / "source", base / "mnt"
        source.mkdir()
        mnt.mkdir()
        (source / "f").write_bytes(b"data")
        os.chmod(source / "f", 0o644)
        os.setxattr(source / "f", acl.ACCESS, acl.serialize([
            (acl.USER_OBJ, 6, 0xFFFFFFFF), (acl.USER, 0, 65534),
            (acl.GROUP_OBJ, 4, 0xFFFFFFFF), (acl.MASK, 4, 0xFFFFFFFF),
            (acl.OTHER, 4, 0xFFFFFFFF)]))
        opts = "allow_other,noacl" if noacl else "allow_other"
        m = start_daemon(cli_argv("passthru", "-o", opts, str(source), str(mnt)), str(mnt),
                         stderr_path=str(base / "daemon.stderr"))
        m.wait_live(timeout=10)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "cat", str(mnt / "f")], capture_output=True, timeout=30)
        assert (r.returncode == 0) is noacl, r.stderr
        m.unmount_clean(timeout=20)
    finally:
        if m is not None:
            m.force_cleanup()
        if not is_fuse_mounted(str(base / "mnt")):
            shutil.rmtree(base, ignore_errors=True)
