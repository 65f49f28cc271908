"""How backingfs-overlay is started and stopped by its real users.

- mount(8) and fstab: ``mount -t fuse.backingfs-overlay overlay MNT -o ...`` runs libfuse's
  mount.fuse3, which runs ``backingfs-overlay overlay MNT -o OPTS,dev,suid`` through
  ``/bin/sh`` *without the caller's PATH* (libmount drops it), so the program is found on
  sh's default path: the tests link it into /usr/local/bin for their duration (and skip if
  something of that name is already installed there). The argv mount.fuse3 really passes
  is recorded and checked.
- containers-storage: ``-o lowerdir=l/A:l/B,upperdir=..,workdir=..,context="..,.." MERGED``
  from the storage directory, lowers that are symlinks, AUFS whiteouts and opaque markers
  in the layers, read-only mounts with no upper, unmount by ``fusermount3 -u`` or lazily.
- SIGUSR1 logs inode, handle and in-flight counts.
"""

from __future__ import annotations

import ast
import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs.testing import (
    REPO_ROOT,
    Mount,
    cli_argv,
    cli_env,
    find_daemon_pid,
    is_fuse_mounted,
    mount_fstype,
    raises_errno,
    start_daemon,
)

pytestmark = pytest.mark.timeout(60)

PROGRAM = "backingfs-overlay"
LINK = Path("/usr/local/bin") / PROGRAM
FSTYPE = "fuse.backingfs-overlay"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ovl-mount8-"))
    for d in ("lower", "upper", "work", "mnt"):
        (path / d).mkdir()
    (path / "lower" / "f").write_text("from the lower layer")
    try:
        yield path
    finally:
        for mnt in [path / "mnt", *path.glob("home/*/merged")]:
            _force_unmount(mnt)
        if not any(is_fuse_mounted(str(p)) for p in [path / "mnt",
                                                     *path.glob("home/*/merged")]):
            shutil.rmtree(path, ignore_errors=True)


def _force_unmount(mnt: Path) -> None:
    """Whatever a failed test left: lazy unmount, then the daemon serving ``mnt`` (found by
    its unique mountpoint in its command line) is stopped."""
    if is_fuse_mounted(str(mnt)):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    pid = find_daemon_pid(str(mnt))
    if pid is not None:
        Mount(str(mnt), pid).force_cleanup()


def wait_gone(marker: str, timeout: float = 10.0) -> None:
    """The background daemon serving ``marker`` has exited."""
    deadline = time.monotonic() + timeout
    while find_daemon_pid(marker) is not None:
        assert time.monotonic() < deadline, f"daemon for {marker} still running"
        time.sleep(0.02)


@pytest.fixture
def helper(base: Path) -> Iterator[Path]:
    """``backingfs-overlay`` on sh's default PATH for mount.fuse3: a wrapper that records
    its argv (one argument per line, then ``--``) and runs this checkout. Yields the
    record file."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) needs root")
    if shutil.which("mount.fuse3", path="/sbin:/usr/sbin") is None:
        pytest.skip("no mount.fuse3 (fuse3 package)")
    if LINK.is_symlink() and "/ovl-mount8-" in os.readlink(LINK) and not LINK.exists():
        LINK.unlink()  # left by an interrupted run of this test: its wrapper is gone
    if os.path.lexists(LINK):
        pytest.skip(f"{LINK} exists already; not replacing it")
    record = base / "argv"
    wrapper = base / PROGRAM
    wrapper.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" -- >> {shlex.quote(str(record))}\n"
        f"PYTHONPATH={shlex.quote(REPO_ROOT)} exec {shlex.quote(sys.executable)} "
        "-m overlay \"$@\"\n")
    wrapper.chmod(0o755)
    LINK.symlink_to(wrapper)
    try:
        yield record
    finally:
        if LINK.is_symlink() and os.readlink(LINK) == str(wrapper):
            LINK.unlink()


def calls(record: Path) -> list[list[str]]:
    text = record.read_text() if record.exists() else ""
    out, cur = [], []
    for line in text.splitlines():
        if line == "--":
            out.append(cur)
            cur = []
        else:
            cur.append(line)
    return out


def run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, cwd=cwd)


def layer_opts(base: Path) -> str:
    return f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work"


def umount_and_check(mnt: Path) -> None:
    r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not is_fuse_mounted(str(mnt))
    wait_gone(str(mnt))


# --- mount(8) ------------------------------------------------------------------------------

def test_mount_t_fuse_type(base: Path, helper: Path) -> None:
    mnt = base / "mnt"
    r = run("mount", "-t", FSTYPE, "overlay", str(mnt), "-o", layer_opts(base), cwd=base)
    assert r.returncode == 0, r.stderr
    assert mount_fstype(str(mnt)) == FSTYPE
    # what mount.fuse3 really runs: the source first, libmount's rw, its own dev,suid
    assert calls(helper) == [["overlay", str(mnt), "-o", f"rw,{layer_opts(base)},dev,suid"]]
    assert (mnt / "f").read_text() == "from the lower layer"
    (mnt / "new").write_text("through mount(8)")
    assert (base / "upper" / "new").read_text() == "through mount(8)"
    umount_and_check(mnt)


def test_fstab_line(base: Path, helper: Path) -> None:
    mnt = base / "mnt"
    fstab = base / "fstab"
    fstab.write_text(f"# a test fstab\noverlay {mnt} {FSTYPE} {layer_opts(base)},defaults,"
                     "noauto,nofail,_netdev,x-systemd.requires=/ 0 0\n")
    r = run("mount", "-T", str(fstab), str(mnt), cwd=base)
    assert r.returncode == 0, r.stderr
    assert mount_fstype(str(mnt)) == FSTYPE
    # fstab bookkeeping never reaches the program
    assert calls(helper) == [["overlay", str(mnt), "-o", f"rw,{layer_opts(base)},dev,suid"]]
    assert (mnt / "f").read_text() == "from the lower layer"
    umount_and_check(mnt)


def _mount_flags(mnt: Path) -> set[str]:
    flags: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                flags = set(fields[5].split(","))
    return flags


def test_ro_nosuid_nodev_win_over_the_defaults(base: Path, helper: Path) -> None:
    """As root we add fuse-overlayfs's ``suid`` default; a given ``nosuid`` must win, and
    mount.fuse3 adds ``dev,suid`` only when nothing says otherwise."""
    mnt = base / "mnt"
    r = run("mount", "-t", FSTYPE, "overlay", str(mnt), "-o",
            f"ro,nodev,nosuid,lowerdir={base}/lower", cwd=base)
    assert r.returncode == 0, r.stderr
    assert calls(helper) == [["overlay", str(mnt), "-o",
                              f"ro,nodev,nosuid,lowerdir={base}/lower"]]
    assert {"ro", "nodev", "nosuid"} <= _mount_flags(mnt)
    with raises_errno(errno.EROFS):
        (mnt / "x").write_text("no")
    umount_and_check(mnt)


# --- what containers-storage hands us ------------------------------------------------------

def build_storage(base: Path) -> tuple[Path, list[str]]:
    """A containers-storage overlay home: layers A (top) over B in ``ID/diff``, reached
    through ``l/SHORT`` symlinks; A carries AUFS whiteouts for B's content."""
    home = base / "home"
    (home / "l").mkdir(parents=True)
    diffs = {}
    for layer in ("B", "A", "C"):
        d = home / layer / "diff"
        d.mkdir(parents=True)
        (home / layer / "work").mkdir()
        (home / layer / "merged").mkdir()
        (home / layer / "empty").mkdir()
        (home / "l" / f"SHORT{layer}").symlink_to(f"../{layer}/diff")
        diffs[layer] = d
    b, a = diffs["B"], diffs["A"]
    (b / "gone").write_text("deleted in A")
    (b / "kept").write_text("from B")
    (b / "dir").mkdir()
    (b / "dir" / "old").write_text("hidden by A's opaque marker")
    (a / ".wh.gone").write_text("")
    (a / "dir").mkdir()
    (a / "dir" / ".wh..wh..opq").write_text("")
    (a / "dir" / "new").write_text("from A")
    return home, [str(home / "l" / "SHORTA"), str(home / "l" / "SHORTB")]


def storage_call(home: Path, opts: str, merged: Path) -> subprocess.CompletedProcess[str]:
    """As containers-storage runs a mount program: ``-o OPTS MERGED``, from the storage
    home, in the background (it returns once the mount is live)."""
    return subprocess.run([*cli_argv("overlay"), "-o", opts, str(merged)], env=cli_env(),
                          capture_output=True, text=True, timeout=30, cwd=home)


def test_storage_shaped_read_write_mount(base: Path) -> None:
    home, lowers = build_storage(base)
    merged = home / "C" / "merged"
    opts = (f"lowerdir={':'.join(lowers)},upperdir={home}/C/diff,workdir={home}/C/work,"
            'nodev,context="system_u:object_r:container_file_t:s0:c1,c2"')
    r = storage_call(home, opts, merged)
    try:
        assert r.returncode == 0, r.stderr
        assert is_fuse_mounted(str(merged))  # live when the call returned
        assert sorted(os.listdir(merged)) == ["dir", "kept"]
        assert sorted(os.listdir(merged / "dir")) == ["new"]
        assert not os.path.lexists(merged / "gone") and not os.path.lexists(merged / ".wh.gone")
        (merged / "kept").write_text("changed")
        (merged / "dir" / "new").unlink()
        assert (home / "C" / "diff" / "kept").read_text() == "changed"
        assert os.listdir(merged / "dir") == []
    finally:
        subprocess.run(["fusermount3", "-u", str(merged)], capture_output=True)
    assert not is_fuse_mounted(str(merged))
    wait_gone(str(merged))


def test_storage_shaped_read_only_mount(base: Path) -> None:
    """A committed layer: ``lowerdir=ID/diff:ID/empty`` and nothing else (no upper)."""
    home, _ = build_storage(base)
    merged = home / "A" / "merged"
    r = storage_call(home, f"lowerdir={home}/A/diff:{home}/A/empty", merged)
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(merged)) == ["dir"]
        with raises_errno(errno.EROFS):
            (merged / "x").write_text("no")
    finally:
        subprocess.run(["fusermount3", "-u", str(merged)], capture_output=True)
    wait_gone(str(merged))


@needs_root
def test_lazy_unmount_ends_the_daemon(base: Path) -> None:
    """containers-storage's last resort when fusermount fails: umount2(MNT_DETACH). The
    daemon goes once the last user of the detached mount is gone."""
    mnt = base / "mnt"
    r = subprocess.run([*cli_argv("overlay"), "-o", layer_opts(base), str(mnt)],
                       env=cli_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert subprocess.run(["umount", "-l", str(mnt)]).returncode == 0
        assert not is_fuse_mounted(str(mnt))
        assert find_daemon_pid(str(mnt)) is not None  # still serving the open directory
        assert "f" in os.listdir(fd)
    finally:
        os.close(fd)
    wait_gone(str(mnt))


# --- SIGUSR1 -------------------------------------------------------------------------------

def statistics(m: Mount, timeout: float = 10.0) -> dict[str, int]:
    marker = "statistics: "
    before = m.stderr_text().count(marker)
    assert m.pid is not None
    os.kill(m.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while (text := m.stderr_text()).count(marker) <= before:
        assert time.monotonic() < deadline, f"no statistics logged:\n{text}"
        time.sleep(0.01)
    return ast.literal_eval(text.split(marker)[before + 1].splitlines()[0])


def test_sigusr1_logs_inode_handle_and_io_counts(base: Path) -> None:
    mnt = base / "mnt"
    m = start_daemon(cli_argv("overlay", "-o", layer_opts(base), str(mnt)), str(mnt),
                     stderr_path=str(base / "daemon.stderr"))
    try:
        m.wait_live()
        idle = statistics(m)
        assert {"inodes", "handles", "in_flight", "lookups", "opens"} <= idle.keys()
        assert idle["handles"] == 0 and idle["in_flight"] == 0
        with open(mnt / "f") as f:
            busy = statistics(m)
            assert busy["handles"] == 1 and busy["opens"] >= 1
            assert busy["inodes"] >= 2  # the root and f
            assert f.read() == "from the lower layer"
        deadline = time.monotonic() + 10
        while statistics(m)["handles"] != 0:  # RELEASE is asynchronous
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m.unmount_clean()
    finally:
        m.force_cleanup()
