"""Permission checks for an unprivileged caller (uid/gid 65534) on objects root made.

The unprivileged side runs in a child under ``setpriv``: real and effective ids 65534, no
supplementary groups, no capabilities. Its outcomes come back as errno names.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backingfs import acl

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                       reason="needs root and setpriv to act as another user"),
]

NOBODY = 65534

_PRELUDE = """
import errno, json, os, sys
out = {}
def attempt(key, fn, *args, **kwargs):
    try:
        value = fn(*args, **kwargs)
    except OSError as e:
        out[key] = errno.errorcode[e.errno]
    else:
        out[key] = value.decode() if isinstance(value, bytes) else "ok"
def read(path):
    with open(path, "rb") as f:
        return f.read()
def write(path, data, flags=os.O_WRONLY):
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
"""


def as_nobody(code: str) -> dict[str, str]:
    """Run ``code`` (using ``attempt(key, fn, *args)``) as uid/gid 65534; the outcomes."""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-I", "-c", _PRELUDE + code + "\nprint(json.dumps(out))"]
    r = subprocess.run(argv, capture_output=True, cwd="/", timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return json.loads(r.stdout)


def test_nobody_reads_only_what_modes_allow(fs: Path) -> None:
    (fs / "secret").write_bytes(b"root only")
    os.chmod(fs / "secret", 0o600)
    (fs / "public").write_bytes(b"for all")
    os.chmod(fs / "public", 0o644)
    os.mkdir(fs / "closed", 0o700)
    (fs / "closed" / "f").write_bytes(b"hidden")
    os.chmod(fs / "closed" / "f", 0o644)
    out = as_nobody(f"""
d = {str(fs)!r}
attempt("read_secret", read, d + "/secret")
attempt("read_public", read, d + "/public")
attempt("write_public", write, d + "/public", b"x")
attempt("stat_in_closed", os.stat, d + "/closed/f")
attempt("list_closed", os.listdir, d + "/closed")
out["access_secret"] = str(os.access(d + "/secret", os.R_OK))
out["access_public"] = str(os.access(d + "/public", os.R_OK))
""")
    assert out == {"read_secret": "EACCES", "read_public": "for all",
                   "write_public": "EACCES", "stat_in_closed": "EACCES",
                   "list_closed": "EACCES", "access_secret": "False",
                   "access_public": "True"}
    assert (fs / "public").read_bytes() == b"for all"


def test_nobody_creates_objects_it_owns(fs: Path) -> None:
    os.mkdir(fs / "shared")
    os.chmod(fs / "shared", 0o777)
    out = as_nobody(f"""
d = {str(fs / "shared")!r}
attempt("create", write, d + "/file", b"mine", os.O_CREAT | os.O_WRONLY)
attempt("mkdir", os.mkdir, d + "/dir")
attempt("symlink", os.symlink, "file", d + "/link")
attempt("mkfifo", os.mkfifo, d + "/fifo")
attempt("chmod_own", os.chmod, d + "/file", 0o600)
attempt("read_own", read, d + "/file")
""")
    assert out == {"create": "ok", "mkdir": "ok", "symlink": "ok", "mkfifo": "ok",
                   "chmod_own": "ok", "read_own": "mine"}
    for name in ("file", "dir", "link", "fifo"):
        st = os.lstat(fs / "shared" / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(fs / "shared" / "file").st_mode) == 0o600


_NO_TMPFILE = ("pyfuse3 3.5 has no FUSE_TMPFILE handler (libfuse answers ENOSYS): the kernel "
               "gives EOPNOTSUPP to every O_TMPFILE open")


@pytest.mark.differs("passthru-pyfuse3", reason=_NO_TMPFILE)
@pytest.mark.differs("overlay-lower-pyfuse3", reason=_NO_TMPFILE)
def test_nobody_tmpfile_is_its_own_and_it_may_link_it(fs: Path) -> None:
    """O_TMPFILE by an unprivileged caller: the file is the caller's, nlink 0; the caller
    links it through the magic link (AT_SYMLINK_FOLLOW) and, as its opener, by
    AT_EMPTY_PATH (allowed without CAP_DAC_READ_SEARCH since Linux 6.10); a directory it
    may not write refuses the open (EACCES)."""
    os.mkdir(fs / "shared")
    os.chmod(fs / "shared", 0o777)
    os.mkdir(fs / "closed", 0o755)
    out = as_nobody(f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
d = {str(fs / "shared")!r}
def empty_path(fd, dfd, name):
    if libc.linkat(fd, b"", dfd, name, 0x1000) != 0:
        raise OSError(ctypes.get_errno(), "linkat")
os.umask(0o022)
fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o640)
os.write(fd, b"mine")
st = os.fstat(fd)
out["fstat"] = f"{{st.st_uid}}:{{st.st_gid}} nlink={{st.st_nlink}} {{st.st_mode & 0o7777:o}}"
dfd = os.open(d, os.O_PATH)
attempt("link", os.link, f"/proc/self/fd/{{fd}}", "named", dst_dir_fd=dfd)
attempt("read_named", read, d + "/named")
attempt("empty_path", empty_path, fd, dfd, b"flinked")
out["nlink"] = str(os.fstat(fd).st_nlink)
attempt("closed", os.open, {str(fs / "closed")!r}, os.O_TMPFILE | os.O_RDWR, 0o600)
""")
    assert out == {"fstat": f"{NOBODY}:{NOBODY} nlink=0 640", "link": "ok",
                   "read_named": "mine", "empty_path": "ok", "nlink": "2",
                   "closed": "EACCES"}
    for name in ("named", "flinked"):
        st = os.stat(fs / "shared" / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert (fs / "shared" / "flinked").read_bytes() == b"mine"
    assert os.listdir(fs / "closed") == []


def test_nobody_cannot_change_roots_file(fs: Path) -> None:
    os.mkdir(fs / "shared")
    os.chmod(fs / "shared", 0o777)
    (fs / "shared" / "rootfile").write_bytes(b"r")
    os.chmod(fs / "shared" / "rootfile", 0o666)
    out = as_nobody(f"""
d = {str(fs / "shared")!r}
attempt("chmod", os.chmod, d + "/rootfile", 0o777)
attempt("chown", os.chown, d + "/rootfile", {NOBODY}, {NOBODY})
attempt("utime_explicit", os.utime, d + "/rootfile", ns=(1, 1))
attempt("utime_now", os.utime, d + "/rootfile")
attempt("setxattr", os.setxattr, d + "/rootfile", "user.x", b"1")
write(d + "/own", b"", os.O_CREAT | os.O_WRONLY)
attempt("chown_own_to_root", os.chown, d + "/own", 0, 0)
attempt("chgrp_own_to_root", os.chown, d + "/own", -1, 0)
""")
    assert out == {"chmod": "EPERM", "chown": "EPERM", "utime_explicit": "EPERM",
                   "utime_now": "ok", "setxattr": "ok", "chown_own_to_root": "EPERM",
                   "chgrp_own_to_root": "EPERM"}
    st = os.stat(fs / "shared" / "rootfile")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o666, 0)


def test_nobody_cannot_write_into_roots_dir(fs: Path) -> None:
    os.mkdir(fs / "ro", 0o755)
    os.chmod(fs / "ro", 0o755)
    (fs / "ro" / "f").write_bytes(b"f")
    # Writable by all, so protected_hardlinks lets the link attempt reach the dir check.
    os.chmod(fs / "ro" / "f", 0o666)
    os.mkdir(fs / "ro" / "sub")
    out = as_nobody(f"""
d = {str(fs / "ro")!r}
attempt("create", write, d + "/new", b"", os.O_CREAT | os.O_WRONLY)
attempt("mkdir", os.mkdir, d + "/newdir")
attempt("unlink", os.unlink, d + "/f")
attempt("rmdir", os.rmdir, d + "/sub")
attempt("rename", os.rename, d + "/f", d + "/g")
attempt("symlink", os.symlink, "f", d + "/l")
attempt("link", os.link, d + "/f", d + "/h")
""")
    assert out == {"create": "EACCES", "mkdir": "EACCES", "unlink": "EACCES",
                   "rmdir": "EACCES", "rename": "EACCES", "symlink": "EACCES",
                   "link": "EACCES"}
    assert sorted(os.listdir(fs / "ro")) == ["f", "sub"]


def test_sticky_directory(fs: Path) -> None:
    os.mkdir(fs / "tmp")
    os.chmod(fs / "tmp", 0o1777)
    (fs / "tmp" / "rootfile").write_bytes(b"")
    os.chmod(fs / "tmp" / "rootfile", 0o666)
    out = as_nobody(f"""
d = {str(fs / "tmp")!r}
attempt("unlink_root", os.unlink, d + "/rootfile")
attempt("rename_root", os.rename, d + "/rootfile", d + "/x")
attempt("create_own", write, d + "/own", b"", os.O_CREAT | os.O_WRONLY)
attempt("unlink_own", os.unlink, d + "/own")
""")
    assert out == {"unlink_root": "EPERM", "rename_root": "EPERM", "create_own": "ok",
                   "unlink_own": "ok"}
    assert os.listdir(fs / "tmp") == ["rootfile"]


def test_write_by_non_owner_clears_setuid(fs: Path) -> None:
    (fs / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(fs / "suid", 0o6777)
    out = as_nobody(f"""
attempt("write", write, {str(fs / "suid")!r}, b"X")
""")
    assert out == {"write": "ok"}
    # set-group-ID with group-execute is cleared too, for a caller outside the group.
    assert stat.S_IMODE(os.stat(fs / "suid").st_mode) == 0o777
    assert (fs / "suid").read_bytes() == b"X!/bin/sh\n"


def test_truncate_and_o_trunc_by_non_owner_clear_setuid(fs: Path) -> None:
    for name in ("trunc", "otrunc"):
        (fs / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(fs / name, 0o6777)
    out = as_nobody(f"""
d = {str(fs)!r}
attempt("truncate", os.truncate, d + "/trunc", 2)
attempt("o_trunc", write, d + "/otrunc", b"", os.O_WRONLY | os.O_TRUNC)
""")
    assert out == {"truncate": "ok", "o_trunc": "ok"}
    assert stat.S_IMODE(os.stat(fs / "trunc").st_mode) == 0o777
    assert os.stat(fs / "trunc").st_size == 2
    assert stat.S_IMODE(os.stat(fs / "otrunc").st_mode) == 0o777
    assert os.stat(fs / "otrunc").st_size == 0


def test_every_write_by_non_owner_clears_setuid_set_again(fs: Path) -> None:
    # The kernel skips the privilege check of a file it has seen without set-id bits
    # (S_NOSEC); a chmod between two writes must bring the check back.
    (fs / "f").write_bytes(b"0123456789")
    os.chmod(fs / "f", 0o777)
    code = f"""
fd = os.open({str(fs / "f")!r}, os.O_WRONLY)
os.write(fd, b"a")
print(json.dumps(out), flush=True)
sys.stdin.readline()
os.write(fd, b"b")
os.close(fd)
"""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-I", "-c", _PRELUDE + code]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          cwd="/") as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == b"{}"
        os.chmod(fs / "f", 0o4777)
        child.stdin.write(b"\n")
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    assert stat.S_IMODE(os.stat(fs / "f").st_mode) == 0o777
    assert (fs / "f").read_bytes() == b"ab23456789"


def test_root_write_keeps_setuid(fs: Path) -> None:
    (fs / "f").write_bytes(b"0123456789")
    os.chmod(fs / "f", 0o6755)
    with open(fs / "f", "r+b") as f:
        f.write(b"X")
    os.truncate(fs / "f", 5)
    with open(fs / "f", "r+b") as f:
        f.truncate(0)
    assert stat.S_IMODE(os.stat(fs / "f").st_mode) == 0o6755


_FUSE_SGID_RULE = ("without HANDLE_KILLPRIV_V2 (libfuse 3.14 cannot ask for it) the FUSE kernel "
                   "module clears S_ISGID only together with S_IXGRP (fuse_setattr), not "
                   "the v6.2 rule for a writer outside the file's group")


@pytest.mark.differs("passthru-pyfuse3", reason=_FUSE_SGID_RULE)
@pytest.mark.differs("overlay-lower-pyfuse3", reason=_FUSE_SGID_RULE)
def test_write_by_non_member_clears_setgid_without_group_exec(fs: Path) -> None:
    (fs / "f").write_bytes(b"data")
    os.chmod(fs / "f", 0o2767)
    out = as_nobody(f"""
attempt("write", write, {str(fs / "f")!r}, b"X")
""")
    assert out == {"write": "ok"}
    assert stat.S_IMODE(os.stat(fs / "f").st_mode) == 0o767


# --- POSIX ACLs ------------------------------------------------------------------------------

def _acl(*entries: tuple[int, int, int]) -> bytes:
    return acl.serialize(sorted(entries, key=lambda e: (e[0], e[2])))


def _base_acl(user: int, group: int, other: int, *named: tuple[int, int, int],
              mask: int | None = None) -> bytes:
    entries = [(acl.USER_OBJ, user, 0xFFFFFFFF), (acl.GROUP_OBJ, group, 0xFFFFFFFF),
               (acl.OTHER, other, 0xFFFFFFFF), *named]
    if mask is not None:
        entries.append((acl.MASK, mask, 0xFFFFFFFF))
    return _acl(*entries)


def test_acl_entries_decide_access_for_a_named_user(fs: Path) -> None:
    """The kernel checks a named-user entry before the mode's other bits: it can deny
    what the mode allows and grant what the mode denies."""
    (fs / "denied").write_bytes(b"no")
    os.chmod(fs / "denied", 0o644)
    os.setxattr(fs / "denied", acl.ACCESS,
                _base_acl(6, 4, 4, (acl.USER, 0, NOBODY), mask=4))
    (fs / "granted").write_bytes(b"yes")
    os.chmod(fs / "granted", 0o600)
    os.setxattr(fs / "granted", acl.ACCESS,
                _base_acl(6, 0, 0, (acl.USER, 4, NOBODY), mask=4))
    os.mkdir(fs / "closed", 0o755)
    (fs / "closed" / "f").write_bytes(b"inside")
    os.setxattr(fs / "closed", acl.ACCESS,
                _base_acl(7, 5, 5, (acl.USER, 0, NOBODY), mask=5))
    assert stat.S_IMODE(os.stat(fs / "granted").st_mode) == 0o640  # group bits = the mask
    out = as_nobody(f"""
d = {str(fs)!r}
attempt("read_denied", read, d + "/denied")
attempt("read_granted", read, d + "/granted")
attempt("write_granted", write, d + "/granted", b"x")
attempt("list_closed", os.listdir, d + "/closed")
attempt("stat_in_closed", os.stat, d + "/closed/f")
out["access_denied"] = str(os.access(d + "/denied", os.R_OK))
out["access_granted"] = str(os.access(d + "/granted", os.R_OK))
""")
    assert out == {"read_denied": "EACCES", "read_granted": "yes", "write_granted": "EACCES",
                   "list_closed": "EACCES", "stat_in_closed": "EACCES",
                   "access_denied": "False", "access_granted": "True"}
    # Removing the entry gives the mode bits back their say.
    os.removexattr(fs / "denied", acl.ACCESS)
    assert as_nobody(f"attempt('read', read, {str(fs / 'denied')!r})") == {"read": "no"}


_PYFUSE3_UMASK = ("libfuse 3.14 does not ask for FUSE_DONT_MASK, so the kernel applies the "
                  "umask before the request reaches us, also under a default ACL, which "
                  "then keeps only the bits the umask left (0640, not 0660)")


@pytest.mark.differs("passthru-pyfuse3", reason=_PYFUSE3_UMASK)
@pytest.mark.differs("overlay-lower-pyfuse3", reason=_PYFUSE3_UMASK)
def test_default_acl_shapes_new_objects(fs: Path) -> None:
    """posix_acl_create: under a default ACL the umask is ignored, the new object's mode
    and access ACL are the default ACL cut down to the requested mode, and a new directory
    inherits the default ACL itself. Elsewhere the umask applies as usual."""
    default = _base_acl(7, 5, 0, (acl.USER, 7, NOBODY), mask=7)
    os.mkdir(fs / "inherit")
    os.setxattr(fs / "inherit", acl.DEFAULT, default)
    old = os.umask(0o022)
    try:
        os.close(os.open(fs / "inherit" / "file", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(fs / "inherit" / "dir", 0o777)
        os.mkfifo(fs / "inherit" / "fifo", 0o666)
        os.close(os.open(fs / "inherit" / "private", os.O_CREAT | os.O_WRONLY, 0o600))
        os.close(os.open(fs / "plain", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(fs / "plaindir", 0o777)
    finally:
        os.umask(old)

    def mode(name: str) -> int:
        return stat.S_IMODE(os.stat(fs / name).st_mode)

    def xattr(name: str, key: bytes) -> list[tuple[int, int, int]] | None:
        try:
            return acl.parse(os.getxattr(fs / name, key))
        except OSError as e:
            assert e.errno == errno.ENODATA, e
            return None

    assert (mode("inherit/file"), mode("inherit/dir"), mode("inherit/fifo"),
            mode("inherit/private"), mode("plain"), mode("plaindir")) == (
        0o660, 0o770, 0o660, 0o600, 0o644, 0o755)
    assert xattr("inherit/file", acl.ACCESS) == acl.parse(
        _base_acl(6, 5, 0, (acl.USER, 7, NOBODY), mask=6))
    assert xattr("inherit/private", acl.ACCESS) == acl.parse(
        _base_acl(6, 5, 0, (acl.USER, 7, NOBODY), mask=0))
    assert xattr("inherit/dir", acl.ACCESS) == acl.parse(
        _base_acl(7, 5, 0, (acl.USER, 7, NOBODY), mask=7))
    assert xattr("inherit/dir", acl.DEFAULT) == acl.parse(default)
    assert xattr("inherit/file", acl.DEFAULT) is None
    assert xattr("plain", acl.ACCESS) is None
    # The inherited entry works: nobody may write the file the mode alone closes to it.
    out = as_nobody(f"attempt('write', write, {str(fs / 'inherit' / 'file')!r}, b'x')")
    assert out == {"write": "ok"}


_PYFUSE3_KILL_SGID = ("libfuse 3.14 does not ask for FUSE_SETXATTR_EXT, so the kernel cannot "
                      "tell us that the caller may not keep S_ISGID, and the backing "
                      "filesystem keeps it for the daemon")


@pytest.mark.differs("passthru-pyfuse3", reason=_PYFUSE3_KILL_SGID)
@pytest.mark.differs("overlay-lower-pyfuse3", reason=_PYFUSE3_KILL_SGID)
def test_acl_set_by_an_owner_outside_the_group_clears_setgid(fs: Path) -> None:
    """posix_acl_update_mode: setting an access ACL drops S_ISGID when the caller is not
    in the file's group (nor has CAP_FSETID), as a chmod would."""
    os.mkdir(fs / "d", 0o777)
    os.chmod(fs / "d", 0o777)
    for name in ("f", "keep"):
        (fs / "d" / name).write_bytes(b"x")
        os.chown(fs / "d" / name, NOBODY, 0)
        os.chmod(fs / "d" / name, 0o2775)
    value = _base_acl(7, 7, 5, (acl.USER, 5, 0), mask=7)
    out = as_nobody(f"""
attempt("setacl", os.setxattr, {str(fs / "d" / "f")!r}, {acl.ACCESS!r}, {value!r})
""")
    assert out == {"setacl": "ok"}
    assert stat.S_IMODE(os.stat(fs / "d" / "f").st_mode) == 0o775
    os.setxattr(fs / "d" / "keep", acl.ACCESS, value)  # root may keep it
    assert stat.S_IMODE(os.stat(fs / "d" / "keep").st_mode) == 0o2775
