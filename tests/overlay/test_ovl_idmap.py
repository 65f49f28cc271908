"""Ownership options (overlay/idmap.py): uid/gid mapping, squashing, owner/mode in xattrs.

fuse-overlayfs 1.10 (Debian's /usr/bin/fuse-overlayfs) is the oracle: the same operations on
the same layers, mounted once by each, must show the same owners through the mount and
leave the same owners on the upper layer. Where 1.10 has a known bug the test says so and
states our outcome instead. The parsing and ACL helpers are checked without a mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs.options import UsageError, parse_argv, split_fuse_options
from backingfs.testing import cli_argv, is_fuse_mounted, start_daemon
from overlay.cli import fuse_options_for, warn_unknown
from overlay.idmap import (
    IdMap,
    IdRange,
    Ownership,
    parse_mapping,
    parse_override,
)
from overlay.params import parse_params

pytestmark = pytest.mark.timeout(120)

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
OVERFLOW = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (chown to any id) and setpriv")
needs_peer = pytest.mark.skipif(not os.access(FUSE_OVERLAYFS, os.X_OK),
                                reason=f"{FUSE_OVERLAYFS} (Debian fuse-overlayfs) not installed")


def params_of(opts: str):
    args = parse_argv(["-o", opts, "/m"], positional=1, prog="t")
    _, fs = split_fuse_options(args.options)
    return parse_params(fs, [].append)


# --- parsing and the pure helpers (no mount) -----------------------------------------------

def test_mapping_forms() -> None:
    assert parse_mapping("0:1000:10") == (IdRange(0, 1000, 10),)
    # containers-storage (podman 4.3) writes each triplet with a leading colon
    assert parse_mapping(":0:100000:65536:65536:5:1") == (IdRange(0, 100000, 65536),
                                                         IdRange(65536, 5, 1))
    for bad in ("", "0:1000", "0:1000:10:1", "a:b:c", "0:-1:3", "0:1:0"):
        with pytest.raises(ValueError):
            parse_mapping(bad)


def test_idmap_shifts_both_ways_and_overflows() -> None:
    m = IdMap(parse_mapping("0:1000:10:10:2000:5"), OVERFLOW)
    assert [m.to_host(i) for i in (0, 9, 10, 14, 15, 1000)] == [1000, 1009, 2000, 2004,
                                                                 OVERFLOW, OVERFLOW]
    assert [m.to_layer(i) for i in (1000, 1009, 2000, 2004, 0, 1010)] == [0, 9, 10, 14,
                                                                          OVERFLOW, OVERFLOW]


def test_override_record_formats() -> None:
    assert parse_override(b"0:0:0755") == (0, 0, 0o755)  # ours, containers-storage's
    assert parse_override(b"9:10:100640") == (9, 10, 0o640)  # fuse-overlayfs 1.10's
    assert parse_override(b"0:0:44755") == (0, 0, 0o4755)
    assert parse_override(b"1000:1001:0600:char-10-11") == (1000, 1001, 0o600)  # typed
    assert parse_override(b"0:0") is None and parse_override(b"x:0:0644") is None


def test_params() -> None:
    p = params_of("lowerdir=/a,uidmapping=0:1:2,gidmapping=:3:4:5,squash_to_root,"
                  "squash_to_uid=42,xattr_permissions=2")
    assert p.uid_mapping == (IdRange(0, 1, 2),) and p.gid_mapping == (IdRange(3, 4, 5),)
    assert p.squash_to_root and p.squash_to_uid == 42 and p.squash_to_gid is None
    assert p.xattr_permissions == 2
    for bad in ("xattr_permissions=3", "squash_to_uid=-1", "squash_to_gid=x",
                "gidmapping=1:2"):
        with pytest.raises(UsageError):
            params_of("lowerdir=/a," + bad)


def test_unsupported_options_warn_and_go_on(capsys: pytest.CaptureFixture[str]) -> None:
    warnings: list[str] = []
    args = parse_argv(["-o", "lowerdir=/a,plugins=/x.so,threaded=1,fast_ino=1,bogus,"
                       'context="system_u:object_r:c:s0:c1,c2"', "/m"], positional=1,
                      prog="t")
    fuse, fs = split_fuse_options(args.options)
    assert parse_params(fs, warnings.append).lowerdirs == ["/a"]
    assert warnings == ["plugins=/x.so", "threaded=1", "fast_ino=1", "bogus"]
    for w in warnings:
        warn_unknown(w)
    err = capsys.readouterr().err.splitlines()
    assert err == ["unsupported argument ignored: plugins=/x.so",
                   "unsupported argument ignored: threaded=1",
                   "unsupported argument ignored: fast_ino=1",
                   "unknown argument ignored: bogus"]
    assert not any(o.startswith("context") for o in fuse_options_for(fuse, is_root=True))


def test_fuse_defaults_yield_to_what_was_given() -> None:
    opts = fuse_options_for({"nosuid", "relatime", "ro"}, is_root=True)
    assert "suid" not in opts and "noatime" not in opts
    assert {"nosuid", "relatime", "ro", "default_permissions", "allow_other",
            "subtype=backingfs-overlay"} <= opts
    assert fuse_options_for({"subtype=x"}, is_root=False) >= {"subtype=x"}
    assert "subtype=backingfs-overlay" not in fuse_options_for({"subtype=x"}, is_root=False)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_acl_ids_shift_both_ways() -> None:
    own = Ownership(uids=IdMap(parse_mapping("0:1000:2000"), OVERFLOW),
                    gids=IdMap(parse_mapping("0:5000:10"), OVERFLOW))
    on_disk = _acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x08, 4, 3), (0x20, 4, 0xFFFFFFFF))
    shown = own.acl_out(b"system.posix_acl_access", on_disk)
    assert shown == _acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 2234), (0x08, 4, 5003),
                         (0x20, 4, 0xFFFFFFFF))
    assert own.acl_in(b"system.posix_acl_default", shown) == on_disk
    assert own.acl_out(b"user.x", on_disk) == on_disk  # other names untouched


# --- mounts: ours and fuse-overlayfs 1.10 on identical layers ------------------------------

@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may traverse (the callers below are unprivileged)."""
    path = Path(tempfile.mkdtemp(prefix="ovl-idmap-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        # Mounted.close already tore every mount down; never delete through a live one.
        if not any(is_fuse_mounted(str(p)) for p in path.glob("*/mnt")):
            shutil.rmtree(path, ignore_errors=True)


class Layers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lower, self.upper, self.work, self.mnt = (root / n for n in
                                                       ("lower", "upper", "work", "mnt"))
        for d in (root, self.lower, self.upper, self.work, self.mnt):
            d.mkdir(mode=0o755, exist_ok=True)

    def options(self, extra: str) -> str:
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        return opts + ("," + extra if extra else "")


class Mounted:
    """A mount by ``program`` ("ours" or "fo") we started, torn down by ``close``."""

    def __init__(self, program: str, layers: Layers, extra: str) -> None:
        opts = layers.options(extra)
        if program == "ours":
            argv = cli_argv("overlay", "-o", opts, str(layers.mnt))
        else:
            argv = [FUSE_OVERLAYFS, "-o", opts, str(layers.mnt)]
        self.mount = start_daemon(argv, str(layers.mnt),
                                  stderr_path=str(layers.root / f"{program}.stderr"))
        try:
            self.mount.wait_live()
        except BaseException:
            self.mount.force_cleanup()
            raise

    def close(self) -> None:
        try:
            self.mount.unmount_clean(timeout=20)
            assert "Traceback" not in self.mount.stderr_text(), self.mount.stderr_text()
        finally:
            self.mount.force_cleanup()


def run_on(program: str, root: Path, extra: str, build, scenario):
    layers = Layers(root)
    build(layers)
    m = Mounted(program, layers, extra)
    try:
        return scenario(layers)
    finally:
        m.close()


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def as_user(uid: int, script: str) -> int:
    """Run ``sh -c script`` as uid:gid ``uid``; its exit status."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           "sh", "-c", script], capture_output=True, timeout=30).returncode


LOWER_OWNERS = (0, 3, 1003, 50000)


def build_owned(layers: Layers) -> None:
    for uid in LOWER_OWNERS:
        f = layers.lower / f"f{uid}"
        f.write_text("x")
        os.chown(f, uid, uid)
    (layers.lower / "pub").mkdir()
    os.chmod(layers.lower / "pub", 0o777)


def ownership_scenario(layers: Layers) -> dict[str, object]:
    """Owners seen through the mount, then after creating (as three callers) and chowning
    (to mapped and unmapped ids), and what the upper layer holds. Listing first: the
    readdirplus attributes are the ones the kernel caches."""
    mnt = layers.mnt
    listed = sorted(os.listdir(mnt))
    seen = {name: owner(mnt / name) for name in listed} | {".": owner(mnt)}
    (mnt / "new").write_text("")
    created = {n: as_user(uid, f": > {mnt}/pub/{n}") for n, uid in (("n1002", 1002),
                                                                     ("n7", 7))}
    chowned = {}
    for name, ids in (("f0", (1004, 1005)), ("f3", (4, 4)), ("f1003", (60000, 60000))):
        try:
            os.chown(mnt / name, *ids)
            chowned[name] = 0
        except OSError as e:
            chowned[name] = e.errno
    names = ["new", "pub/n1002", "pub/n7", "f0", "f3", "f1003"]
    after = {n: owner(mnt / n) for n in names if os.path.lexists(mnt / n)}
    upper = {n: owner(layers.upper / n) for n in names if os.path.lexists(layers.upper / n)}
    return {"seen": seen, "created": created, "chowned": chowned, "after": after,
            "upper": upper}


MAPPING_CASES = [
    "uidmapping=0:1000:10,gidmapping=0:1000:10",
    "uidmapping=:0:1000:10:10:2000:5,gidmapping=:0:1000:15",  # podman's form, two ranges
    "squash_to_root",
    "squash_to_uid=42,squash_to_gid=43",
    "squash_to_root,squash_to_uid=42",
    "uidmapping=0:1000:10,gidmapping=0:1000:10,squash_to_gid=9",
]


@needs_root
def test_mapping_as_stated(base: Path) -> None:
    """The contract spelled out (also where fuse-overlayfs is absent)."""
    got = run_on("ours", base / "ours", MAPPING_CASES[0], build_owned, ownership_scenario)
    assert got["seen"] == {".": (1000, 1000), "f0": (1000, 1000), "f3": (1003, 1003),
                           "f1003": (OVERFLOW, OVERFLOW), "f50000": (OVERFLOW, OVERFLOW),
                           "pub": (1000, 1000)}
    # created by root (unmapped in): stored and seen as the overflow id; by 1002: stored as 2
    assert got["after"]["new"] == (OVERFLOW, OVERFLOW)
    assert got["upper"]["pub/n1002"] == (2, 2) and got["after"]["pub/n1002"] == (1002, 1002)
    # chown to mapped ids lands shifted; to unmapped ids, as the overflow id
    assert got["upper"]["f0"] == (4, 5) and got["after"]["f0"] == (1004, 1005)
    assert got["upper"]["f3"] == (OVERFLOW, OVERFLOW)


@needs_root
def test_squash_as_stated(base: Path) -> None:
    got = run_on("ours", base / "ours", "squash_to_root,squash_to_uid=42", build_owned,
                 ownership_scenario)
    assert set(got["seen"].values()) == {(42, 0)}
    assert set(got["after"].values()) == {(42, 0)}
    # the layer keeps real owners: the caller's for new objects, chown's for changed ones
    assert got["upper"]["pub/n1002"] == (1002, 1002) and got["upper"]["f0"] == (1004, 1005)


def _layer_view(path: Path) -> tuple[int, int, int, dict[str, bytes]]:
    st = os.lstat(path)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode),
            {n: os.getxattr(path, n) for n in os.listxattr(path)})


@needs_root
@pytest.mark.skipif(os.environ.get("BACKINGFS_SESSION", "native") != "native",
                    reason="O_TMPFILE needs the native session (pyfuse3 has no FUSE_TMPFILE "
                           "handler: EOPNOTSUPP)")
@pytest.mark.parametrize("options", [MAPPING_CASES[0], "squash_to_uid=42,squash_to_gid=43",
                                     "xattr_permissions=2"])
def test_linked_tmpfile_is_owned_as_a_created_file(base: Path, options: str) -> None:
    """An O_TMPFILE file linked by uid 1002 gets what its create would: the same owner and
    mode through the mount, and the same owner, mode and records on the upper layer.
    Mode 0666: squashed, the file is seen as another user's, which protected_hardlinks
    lets the caller link only with read and write access."""
    script = """
import os, sys
os.umask(0)
d = sys.argv[1]
fd = os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o666)
dfd = os.open(d, os.O_PATH)
os.link(f"/proc/self/fd/{fd}", "tmp", dst_dir_fd=dfd)
os.close(os.open(d + "/made", os.O_CREAT | os.O_WRONLY, 0o666))
"""

    def scenario(layers: Layers) -> dict[str, object]:
        pub = layers.mnt / "pub"
        r = subprocess.run(["setpriv", "--reuid=1002", "--regid=1002", "--clear-groups",
                            sys.executable, "-I", "-c", script, str(pub)],
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return {n: (owner(pub / n), stat.S_IMODE(os.stat(pub / n).st_mode))
                for n in ("tmp", "made")}

    seen = run_on("ours", base / "ours", options, build_owned, scenario)
    assert seen["tmp"] == seen["made"]
    upper = base / "ours" / "upper" / "pub"
    assert _layer_view(upper / "tmp") == _layer_view(upper / "made")


@needs_root
@needs_peer
@pytest.mark.parametrize("options", MAPPING_CASES)
def test_same_ownership_as_fuse_overlayfs(base: Path, options: str) -> None:
    ours = run_on("ours", base / "ours", options, build_owned, ownership_scenario)
    peer = run_on("fo", base / "fo", options, build_owned, ownership_scenario)
    assert ours == peer


# --- xattr_permissions ---------------------------------------------------------------------

XP_NAME = {1: b"security.fuseoverlayfs.override_stat", 2: b"user.containers.override_stat"}


def build_xp(layers: Layers) -> None:
    f = layers.lower / "lf"
    f.write_text("x")
    os.chown(f, 5, 6)
    os.chmod(f, 0o640)
    (layers.lower / "ld").mkdir()
    (layers.lower / "pub").mkdir()
    os.chmod(layers.lower / "pub", 0o777)


def xp_changes(layers: Layers) -> None:
    mnt = layers.mnt
    assert as_user(1002, f"umask 022; : > {mnt}/pub/new") == 0
    os.chown(mnt / "pub/new", 7, 8)
    os.chmod(mnt / "pub/new", 0o604)
    os.chown(mnt / "lf", 9, 10)
    os.chmod(mnt / "ld", 0o4755)
    os.mkdir(mnt / "newd", 0o750)


def view(mnt: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(mnt))] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out


EXPECTED_XP_VIEW = {"lf": (9, 10, 0o640), "ld": (0, 0, 0o4755), "pub": (0, 0, 0o777),
                    "pub/new": (7, 8, 0o604), "newd": (0, 0, 0o750)}


@needs_root
@pytest.mark.parametrize("xp", [1, 2])
def test_xattr_permissions_keep_owner_and_mode_in_an_xattr(base: Path, xp: int) -> None:
    name = XP_NAME[xp]

    def scenario(layers: Layers) -> None:
        xp_changes(layers)
        assert view(layers.mnt) == EXPECTED_XP_VIEW
        # bookkeeping, not client data
        assert os.fsencode(name) not in [os.fsencode(n) for n in os.listxattr(layers.mnt / "lf")]
        with pytest.raises(OSError) as e:
            os.getxattr(layers.mnt / "lf", name)
        assert e.value.errno == errno.ENODATA
        with pytest.raises(OSError) as e:
            os.setxattr(layers.mnt / "lf", name, b"0:0:0777")
        assert e.value.errno == errno.EPERM

    run_on("ours", base / "ours", f"xattr_permissions={xp}", build_xp, scenario)
    upper = base / "ours" / "upper"
    for rel, (uid, gid, perm) in EXPECTED_XP_VIEW.items():
        st = os.lstat(upper / rel)
        # the inode belongs to the daemon, privately; the record holds the real owner
        assert (st.st_uid, st.st_gid) == (0, 0), rel
        assert stat.S_IMODE(st.st_mode) == (0o700 if stat.S_ISDIR(st.st_mode) else 0o600), rel
        assert os.getxattr(upper / rel, name) == b"%d:%d:0%o" % (uid, gid, perm)
    assert os.getxattr(upper, name) == b"0:0:0755"  # the root describes itself


@needs_root
@needs_peer
def test_xattr_permissions_upper_is_read_alike_by_fuse_overlayfs(base: Path) -> None:
    """An upper we wrote with xattr_permissions=1, mounted by fuse-overlayfs 1.10 with the
    same option, shows what ours showed; and an upper 1.10 wrote (chown and chmod on
    separate objects: 1.10 loses a chown followed by a chmod of a new file) reads the same
    through ours, for both names 1.10 writes."""
    ours_view = run_on("ours", base / "a", "xattr_permissions=1", build_xp,
                       lambda layers: (xp_changes(layers), view(layers.mnt))[1])
    peer_view = run_on("fo", base / "a", "xattr_permissions=1", lambda layers: None,
                       lambda layers: view(layers.mnt))
    assert ours_view == peer_view == EXPECTED_XP_VIEW

    def peer_changes(layers: Layers) -> dict[str, tuple[int, int, int]]:
        os.chown(layers.mnt / "lf", 9, 10)
        os.chmod(layers.mnt / "ld", 0o4755)
        return view(layers.mnt)

    for xp in (1, 2):
        written = run_on("fo", base / f"b{xp}", f"xattr_permissions={xp}", build_xp,
                         peer_changes)
        read = run_on("ours", base / f"b{xp}", f"xattr_permissions={xp}", lambda layers: None,
                      lambda layers: view(layers.mnt))
        assert read == written
        assert written["lf"] == (9, 10, 0o640) and written["ld"] == (0, 0, 0o4755)


def build_force_mask(layers: Layers) -> None:
    """A layer as containers-storage unpacks it with force_mask: real modes forced, the
    image's owner and mode in user.containers.override_stat, the root marked too."""
    os.setxattr(layers.lower, "user.containers.override_stat", b"0:0:0755")
    for name, record in (("a", b"11:12:0604"), ("b", b"13:14:0600")):
        (layers.lower / name).write_text(name)
        os.chmod(layers.lower / name, 0o700)
        os.setxattr(layers.lower / name, "user.containers.override_stat", record)


@needs_root
@needs_peer
def test_force_mask_lower_layer_reads_as_fuse_overlayfs(base: Path) -> None:
    def scenario(layers: Layers) -> dict[str, tuple[int, int, int]]:
        return view(layers.mnt)

    ours = run_on("ours", base / "ours", "", build_force_mask, scenario)
    peer = run_on("fo", base / "fo", "", build_force_mask, scenario)
    assert ours == peer == {"a": (11, 12, 0o604), "b": (13, 14, 0o600)}


@needs_root
def test_force_mask_lower_copy_up_carries_the_record(base: Path) -> None:
    def scenario(layers: Layers) -> None:
        (layers.lower / "plain").write_text("no record: the inode's owner is reported")
        os.chown(layers.lower / "plain", 21, 22)
        assert view(layers.mnt)["plain"] == (21, 22, 0o644)
        os.chmod(layers.mnt / "a", 0o640)  # copy-up
        assert view(layers.mnt)["a"] == (11, 12, 0o640)

    run_on("ours", base / "ours", "", build_force_mask, scenario)
    st = os.lstat(base / "ours" / "upper" / "a")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (11, 12, 0o640)
    assert "user.containers.override_stat" not in os.listxattr(base / "ours" / "upper" / "a")


@needs_root
@pytest.mark.skipif(shutil.which("setfacl") is None, reason="needs the acl tools")
def test_acl_ids_follow_the_mapping(base: Path) -> None:
    def build(layers: Layers) -> None:
        (layers.lower / "f").write_text("x")
        subprocess.run(["setfacl", "-m", "u:1234:r", str(layers.lower / "f")], check=True)

    def facl(path: Path) -> list[str]:
        out = subprocess.run(["getfacl", "-n", "-c", str(path)], check=True,
                             capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.startswith("user:") and
                not line.startswith("user::")]

    def scenario(layers: Layers) -> None:
        assert facl(layers.mnt / "f") == ["user:2234:r--"]
        subprocess.run(["setfacl", "-m", "u:1555:rw", str(layers.mnt / "f")], check=True)
        assert facl(layers.mnt / "f") == ["user:1555:rw-", "user:2234:r--"]

    run_on("ours", base / "ours", "uidmapping=0:1000:2000", build, scenario)
    assert facl(base / "ours" / "upper" / "f") == ["user:555:rw-", "user:1234:r--"]


@needs_root
def test_xattr_permissions_writes_by_others_clear_recorded_set_id_bits(base: Path) -> None:
    """Under xattr_permissions the set-id bits clients see live in the override record;
    an unprivileged write, truncate and O_TRUNC open must clear them there (the kernel
    leaves the stripping to the daemon: HANDLE_KILLPRIV_V2)."""

    def build(layers: Layers) -> None:
        (layers.lower / "pub").mkdir()
        os.chmod(layers.lower / "pub", 0o777)
        for name in ("w", "t", "o"):
            (layers.lower / "pub" / name).write_text("data")

    def scenario(layers: Layers) -> None:
        pub = layers.mnt / "pub"
        for name in ("w", "t", "o"):
            os.chmod(pub / name, 0o6777)
        assert as_user(1002, f"printf X >> {pub}/w && truncate -s 1 {pub}/t && : > {pub}/o") == 0
        modes = {n: stat.S_IMODE(os.stat(pub / n).st_mode) for n in ("w", "t", "o")}
        assert modes == {"w": 0o777, "t": 0o777, "o": 0o777}
        assert (pub / "w").read_text() == "dataX"
        assert os.stat(pub / "t").st_size == 1 and os.stat(pub / "o").st_size == 0

    run_on("ours", base / "ours", "xattr_permissions=2", build, scenario)
