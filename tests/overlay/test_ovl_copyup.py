"""Copy-up: what triggers it, what it carries over, atomicity, handles following it."""

from __future__ import annotations

import os
import stat

import pytest
from ovl_layers import OvlLayers

pytestmark = pytest.mark.timeout(60)

T_ATIME = 1_500_000_000_000_000_000
T_MTIME = 1_600_000_000_123_456_789


def lower_file(ovl: OvlLayers, name: str = "f", data: bytes = b"lower data") -> None:
    p = ovl.lower1 / name
    p.write_bytes(data)
    os.chown(p, 1234, 5678)
    os.chmod(p, 0o640)
    os.setxattr(p, "user.tag", b"v")
    os.setxattr(p, "trusted.overlay.impure", b"y")  # private: never copied
    os.utime(p, ns=(T_ATIME, T_MTIME))


def assert_copied(ovl: OvlLayers, name: str = "f", data: bytes | None = b"lower data") -> None:
    up = ovl.upper / name
    st = os.lstat(up)
    if data is not None:
        assert up.read_bytes() == data
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert os.getxattr(up, "user.tag") == b"v"
    assert "trusted.overlay.impure" not in os.listxattr(up)
    assert ovl.work_entries() == []


def test_open_for_write_copies_up_everything(ovl: OvlLayers) -> None:
    lower_file(ovl)
    mnt = ovl.mount()
    fd = os.open(mnt / "f", os.O_WRONLY)
    os.close(fd)
    assert_copied(ovl)
    assert os.lstat(ovl.upper / "f").st_mtime_ns == T_MTIME
    assert (ovl.lower1 / "f").read_bytes() == b"lower data"


def test_read_only_open_does_not_copy_up(ovl: OvlLayers) -> None:
    lower_file(ovl)
    mnt = ovl.mount()
    assert (mnt / "f").read_bytes() == b"lower data"
    assert not (ovl.upper / "f").exists()


def test_o_trunc_copies_up_empty(ovl: OvlLayers) -> None:
    lower_file(ovl)
    mnt = ovl.mount()
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert (mnt / "f").read_bytes() == b"new"
    assert_copied(ovl, data=b"new")


@pytest.mark.parametrize("op", ["chmod", "chown", "utime", "truncate", "setxattr",
                                "removexattr"])
def test_setattr_and_xattr_changes_copy_up(ovl: OvlLayers, op: str) -> None:
    lower_file(ovl)
    mnt = ovl.mount()
    p = mnt / "f"
    if op == "chmod":
        os.chmod(p, 0o600)
        assert stat.S_IMODE(os.stat(ovl.upper / "f").st_mode) == 0o600
    elif op == "chown":
        os.chown(p, 42, 43)
        assert (os.stat(ovl.upper / "f").st_uid, os.stat(ovl.upper / "f").st_gid) == (42, 43)
    elif op == "utime":
        os.utime(p, ns=(T_ATIME, T_ATIME))
        assert os.stat(ovl.upper / "f").st_mtime_ns == T_ATIME
    elif op == "truncate":
        os.truncate(p, 5)
        assert (ovl.upper / "f").read_bytes() == b"lower"
        assert p.read_bytes() == b"lower"
    elif op == "setxattr":
        os.setxattr(p, "user.new", b"n")
        assert os.getxattr(ovl.upper / "f", "user.new") == b"n"
    else:
        os.removexattr(p, "user.tag")
        assert "user.tag" not in os.listxattr(ovl.upper / "f")
    assert (ovl.upper / "f").exists()
    assert ovl.work_entries() == []


#: security.capability of `setcap cap_net_raw=ep` (VFS_CAP_REVISION_2).
CAPS = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.mark.parametrize("op", ["chmod", "utime", "setxattr", "rename", "link", "open_w",
                                "chown", "truncate_same_size"])
def test_file_capability_survives_a_copy_up_that_changes_no_data(
        ovl: OvlLayers, op: str) -> None:
    """The kernel's copy-up sets the owner without ATTR_KILL_PRIV: the copy keeps the lower
    file's security.capability. Only a change of the data or owner through the mount
    (chown, truncate, write) removes it then, as on any filesystem; that removal used to
    copy up first, lose the xattr to the copy-up's chown, and fail with ENODATA."""
    lower_file(ovl)
    os.setxattr(ovl.lower1 / "f", "security.capability", CAPS)
    (ovl.lower1 / "d").mkdir()
    mnt = ovl.mount()
    p, name = mnt / "f", "f"
    if op == "chmod":
        os.chmod(p, 0o750)
    elif op == "utime":
        os.utime(p, ns=(T_ATIME, T_ATIME))
    elif op == "setxattr":
        os.setxattr(p, "user.new", b"n")
    elif op == "rename":
        os.rename(p, mnt / "d" / "g")
        name = "d/g"
    elif op == "link":
        os.link(p, mnt / "d" / "g")
    elif op == "open_w":
        os.close(os.open(p, os.O_WRONLY))
    elif op == "chown":
        os.chown(p, 42, 43)
    else:
        os.truncate(p, len(b"lower data"))
    up = ovl.upper / name
    assert up.exists()
    expected = [] if op in ("chown", "truncate_same_size") else ["security.capability"]
    assert [x for x in os.listxattr(up) if x.startswith("security.")] == expected
    assert [x for x in os.listxattr(mnt / name) if x.startswith("security.")] == expected
    if op == "chown":
        assert (os.stat(up).st_uid, os.stat(up).st_gid) == (42, 43)
    assert ovl.work_entries() == []


def test_parents_copied_first_and_parent_times_kept(ovl: OvlLayers) -> None:
    (ovl.lower1 / "a" / "b").mkdir(parents=True)
    lower_file(ovl, "a/b/f")
    os.chmod(ovl.lower1 / "a", 0o751)
    os.utime(ovl.lower1 / "a", ns=(T_ATIME, T_MTIME))
    os.utime(ovl.lower1 / "a" / "b", ns=(T_ATIME, T_MTIME))
    mnt = ovl.mount()
    with open(mnt / "a" / "b" / "f", "ab") as f:
        f.write(b"!")
    assert (ovl.upper / "a" / "b" / "f").read_bytes() == b"lower data!"
    assert stat.S_IMODE(os.stat(ovl.upper / "a").st_mode) == 0o751
    assert os.stat(ovl.upper / "a").st_mtime_ns == T_MTIME
    assert os.stat(ovl.upper / "a" / "b").st_mtime_ns == T_MTIME
    assert os.stat(mnt / "a" / "b").st_mtime_ns == T_MTIME


def test_create_in_lower_dir_copies_parent(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    (ovl.lower1 / "d" / "old").write_text("o")
    mnt = ovl.mount()
    (mnt / "d" / "new").write_text("n")
    assert (ovl.upper / "d" / "new").read_text() == "n"
    assert sorted(os.listdir(mnt / "d")) == ["new", "old"]


def test_link_copies_up_source(ovl: OvlLayers) -> None:
    lower_file(ovl)
    mnt = ovl.mount()
    os.link(mnt / "f", mnt / "g")
    assert_copied(ovl)
    assert os.stat(ovl.upper / "f").st_ino == os.stat(ovl.upper / "g").st_ino
    assert os.stat(mnt / "f").st_ino == os.stat(mnt / "g").st_ino
    assert os.stat(mnt / "g").st_nlink == 2


def test_symlink_and_special_files_copy_up(ovl: OvlLayers) -> None:
    os.symlink("target", ovl.lower1 / "sl")
    os.lchown(ovl.lower1 / "sl", 7, 8)
    os.mkfifo(ovl.lower1 / "fifo", 0o604)
    mnt = ovl.mount()
    os.chown(mnt / "fifo", 9, 9)
    os.lchown(mnt / "sl", 7, 9)
    assert os.readlink(ovl.upper / "sl") == "target"
    assert os.lstat(ovl.upper / "sl").st_gid == 9
    st = os.lstat(ovl.upper / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o604


def test_sparse_file_keeps_holes(ovl: OvlLayers) -> None:
    size = 64 << 20
    with open(ovl.lower1 / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"middle")
    mnt = ovl.mount()
    with open(mnt / "sparse", "r+b") as f:
        f.write(b"head")
    st = os.stat(ovl.upper / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20
    with open(mnt / "sparse", "rb") as f:
        f.seek(size // 2)
        assert f.read(6) == b"middle"


def test_read_handle_follows_copy_up(ovl: OvlLayers) -> None:
    lower_file(ovl, data=b"0123456789")
    mnt = ovl.mount("timeout=0")
    # direct I/O keeps the kernel page cache out of the way: every read reaches us
    reader = os.open(mnt / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        writer = os.open(mnt / "f", os.O_WRONLY)
        os.pwrite(writer, b"ABCD", 0)
        os.close(writer)
        import mmap
        m = mmap.mmap(-1, 4096)
        n = os.preadv(reader, [m], 0)
        assert bytes(m[:n]) == b"ABCD456789"
        m.close()
    finally:
        os.close(reader)


def test_concurrent_writers_copy_up_once(ovl: OvlLayers) -> None:
    import threading
    lower_file(ovl, data=b"x" * 100_000)
    mnt = ovl.mount()
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            fd = os.open(mnt / "f", os.O_WRONLY)
            os.pwrite(fd, b"%d" % i, i * 10)
            os.close(fd)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = (ovl.upper / "f").read_bytes()
    assert len(data) == 100_000
    for i in range(8):
        assert data[i * 10:i * 10 + 1] == b"%d" % i
    assert ovl.work_entries() == []


def test_fsync_zero_and_volatile_mount(ovl: OvlLayers) -> None:
    lower_file(ovl)
    mnt = ovl.mount("fsync=0", "volatile")
    with open(mnt / "f", "ab") as f:
        f.write(b"+")
        f.flush()
        os.fsync(f.fileno())
    assert (ovl.upper / "f").read_bytes() == b"lower data+"
