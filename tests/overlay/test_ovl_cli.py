"""The fuse-overlayfs command line and every mount-time validation error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ovl_layers import OvlLayers

from backingfs.options import UsageError, parse_argv, split_fuse_options
from backingfs.testing import cli_env, find_daemon_pid, is_fuse_mounted
from overlay.cli import fuse_options_for
from overlay.params import parse_params

pytestmark = pytest.mark.timeout(60)


def params_of(*argv: str, warnings: list[str] | None = None):
    args = parse_argv(list(argv), positional=1, prog="t")
    _, fs_opts = split_fuse_options(args.options)
    return parse_params(fs_opts, (warnings if warnings is not None else []).append)


def run_cli(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlay", *argv], env=cli_env(),
                          capture_output=True, text=True, timeout=30, cwd=cwd)


# --- grammar (no mount) --------------------------------------------------------------------

def test_repeated_and_attached_o_are_concatenated() -> None:
    p = params_of("-olowerdir=/a:/b", "-o", "upperdir=/u", "-o", "workdir=/w", "/mnt")
    assert (p.lowerdirs, p.upperdir, p.workdir) == (["/a", "/b"], "/u", "/w")


def test_leading_source_is_ignored() -> None:
    args = parse_argv(["overlay", "/mnt", "-o", "lowerdir=/a"], positional=1, prog="t")
    assert args.positionals == ["/mnt"] and args.ignored == ["overlay"]


def test_colon_and_comma_escapes() -> None:
    p = params_of("-o", r"lowerdir=/a\:b:/c\,d,upperdir=/u\:x,workdir=/w", "/mnt")
    assert p.lowerdirs == ["/a:b", "/c,d"]
    assert p.upperdir == "/u:x"


def test_quoted_context_is_tolerated_and_not_passed_to_fuse() -> None:
    args = parse_argv(["-o", 'lowerdir=/a,context="system_u:object_r:c:s0:c1,c2"', "/m"],
                      positional=1, prog="t")
    fuse, fs = split_fuse_options(args.options)
    warnings: list[str] = []
    assert parse_params(fs, warnings.append).lowerdirs == ["/a"]
    assert warnings == []
    assert not any(o.startswith("context") for o in fuse_options_for(fuse, is_root=True))


def test_unknown_option_warns_and_goes_on() -> None:
    warnings: list[str] = []
    p = params_of("-o", "lowerdir=/a,frobnicate,level=3", "/m", warnings=warnings)
    assert p.lowerdirs == ["/a"]
    assert warnings == ["frobnicate", "level=3"]


def test_known_options_parse() -> None:
    p = params_of("-o", "lowerdir=/a,upperdir=/u,workdir=/w,userxattr,volatile,fsync=0,"
                  "timeout=2.5,writeback=1,redirect_dir=off,noacl,static_nlink", "/m")
    assert p.userxattr and p.volatile and not p.fsync and p.timeout == 2.5
    assert p.writeback and p.noacl and p.static_nlink
    assert p.xattr_prefix == b"user.overlay."


def test_relative_paths_are_made_absolute() -> None:
    p = params_of("-o", "lowerdir=rel", "/m")
    assert p.lowerdirs == [os.path.abspath("rel")]


@pytest.mark.parametrize("opts, message", [
    ("upperdir=/u", "no lowerdir"),
    ("lowerdir=/a,upperdir=/u", "workdir not specified"),
    ("lowerdir=/a,redirect_dir=on", "redirect_dir"),
    ("lowerdir=/a,fsync=2", "fsync"),
    ("lowerdir=/a,writeback=yes", "writeback"),
    ("lowerdir=/a,timeout=soon", "timeout"),
    ("lowerdir=/a,uidmapping=0:1000", "uidmapping"),
    ("lowerdir=" + ":".join(f"/l{i}" for i in range(501)), "too many lower"),
])
def test_bad_options_are_usage_errors(opts: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        params_of("-o", opts, "/m")


def test_root_defaults() -> None:
    assert fuse_options_for(set(), is_root=True) >= {
        "default_permissions", "allow_other", "suid", "noatime"}
    assert "allow_other" not in fuse_options_for(set(), is_root=False)


# --- the command ---------------------------------------------------------------------------

def test_version_on_stdout() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and "version" in r.stdout and r.stderr == ""


def test_help_on_stdout() -> None:
    r = run_cli("-h")
    assert r.returncode == 0 and "lowerdir=" in r.stdout


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case, needle", [
    ("no_lowerdir", "no lowerdir"),
    ("no_workdir", "workdir not specified"),
    ("work_other_fs", "same filesystem"),
    ("work_in_upper", "separate subtrees"),
    ("upper_in_work", "separate subtrees"),
    ("lowers_overlap", "overlapping"),
    ("lower_is_upper", "overlapping"),
    ("mountpoint_in_layer", "contains the mountpoint"),
    ("too_many", "too many lower"),
    ("not_a_dir", "not a directory"),
    ("missing", "no such directory"),
])
def test_validation_errors(ovl: OvlLayers, case: str, needle: str) -> None:
    l1, l2, up, wk = ovl.lower1, ovl.lower2, ovl.upper, ovl.work
    mnt = str(ovl.mnt)
    f = ovl.root / "file"
    f.write_text("x")
    inner = l1 / "sub"
    inner.mkdir()
    shm = Path("/dev/shm") / f"ovl-test-{os.getpid()}-{case}"
    opts = {
        "no_lowerdir": f"upperdir={up},workdir={wk}",
        "no_workdir": f"lowerdir={l1},upperdir={up}",
        "work_other_fs": f"lowerdir={l1},upperdir={up},workdir={shm}",
        "work_in_upper": f"lowerdir={l1},upperdir={up},workdir={up}",
        "upper_in_work": f"lowerdir={l1},upperdir={wk}/u,workdir={wk}",
        "lowers_overlap": f"lowerdir={l1}:{inner}",
        "lower_is_upper": f"lowerdir={l1}:{l2},upperdir={l2},workdir={wk}",
        "mountpoint_in_layer": f"lowerdir={l1}",
        "too_many": "lowerdir=" + ":".join([str(l1)] * 501),
        "not_a_dir": f"lowerdir={f}",
        "missing": f"lowerdir={ovl.root}/nope",
    }[case]
    if case == "upper_in_work":
        (wk / "u").mkdir()
    if case == "mountpoint_in_layer":
        mnt = str(inner)
    if case == "work_other_fs":
        shm.mkdir()
    try:
        _one_line_error(run_cli("-f", "-o", opts, mnt), needle)
    finally:
        if case == "work_other_fs":
            shm.rmdir()
    assert not is_fuse_mounted(mnt)


def test_work_is_created_and_emptied(ovl: OvlLayers) -> None:
    (ovl.work / "work").mkdir()
    (ovl.work / "work" / "#leftover").write_text("junk")
    (ovl.work / "work" / "#dir").mkdir()
    (ovl.work / "work" / "#dir" / "f").write_text("junk")
    ovl.mount()
    assert ovl.work_entries() == []
    assert (ovl.work / "work").stat().st_mode & 0o777 == 0o700


def test_unknown_option_and_source_then_mounts(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("hello")
    mnt = ovl.mount("frobnicate", 'context="a:b:c,d"')
    assert (mnt / "f").read_text() == "hello"
    assert "unknown argument ignored: frobnicate" in ovl.mounts[-1].stderr_text()


def test_symlinked_lowerdir_is_resolved(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("via link")
    link = ovl.root / "l-short"
    link.symlink_to(ovl.lower1)
    from backingfs.testing import cli_argv, start_daemon
    m = start_daemon(cli_argv("overlay", "-o", f"lowerdir={link}", str(ovl.mnt)),
                     str(ovl.mnt), stderr_path=str(ovl.root / "d.stderr"))
    ovl.mounts.append(m)
    m.wait_live()
    assert (ovl.mnt / "f").read_text() == "via link"


def test_background_returns_once_live(ovl: OvlLayers) -> None:
    (ovl.lower1 / "f").write_text("bg")
    marker = str(ovl.mnt)
    r = run_cli("-o", ovl.options(), "overlay", marker)
    pid = find_daemon_pid(marker)
    try:
        assert r.returncode == 0, r.stderr
        assert is_fuse_mounted(marker)  # live when the command returned
        assert (ovl.mnt / "f").read_text() == "bg"
    finally:
        subprocess.run(["fusermount3", "-u", marker], capture_output=True)
        if pid is not None:
            from backingfs.testing import Mount
            Mount(marker, pid).force_cleanup()
