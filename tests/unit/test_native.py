"""The native session without a mount: wire layouts, handlers called with hand-built
requests over a pipe standing in for /dev/fuse, passthrough accounting with fake ioctls,
and the mount option sorting."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from backingfs import fuse_abi as abi
from backingfs import native_ops, privs
from backingfs.attrs import Attr
from backingfs.fileattr import FileAttr
from backingfs.fsapi import (
    Caller,
    DirEntry,
    Entry,
    Filesystem,
    OpenReply,
    ReaddirReply,
    SetattrRequest,
)
from backingfs.fusemount import MS_NOATIME, MS_NODEV, MS_NOSUID, MS_RDONLY, mount_spec
from backingfs.native import NativeSession
from backingfs.passthrough import BackingIds, BackingMismatchError

# --- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("st", "size"), [
    (abi.IN_HEADER, 40), (abi.OUT_HEADER, 16), (abi.ATTR, 88), (abi.INIT_OUT, 64),
    (abi.OPEN_OUT, 16), (abi.SETATTR_IN, 88), (abi.READ_IN, 40), (abi.WRITE_IN, 40),
    (abi.RELEASE_IN, 24), (abi.FLUSH_IN, 24), (abi.KSTATFS, 80), (abi.CREATE_IN, 16),
    (abi.BACKING_MAP, 16), (abi.FORGET_ONE, 16), (abi.DIRENT_HEAD, 24),
    (abi.IOCTL_IN, 32), (abi.IOCTL_OUT, 16), (abi.STATX_IN, 24), (abi.STATX_OUT, 288),
])
def test_struct_sizes_match_the_kernel_header(st: struct.Struct, size: int) -> None:
    assert st.size == size


def test_ioctl_numbers() -> None:
    # _IOW(229, n, size) = (1 << 30) | (size << 16) | (229 << 8) | n
    assert abi.DEV_IOC_BACKING_OPEN == (1 << 30) | (16 << 16) | (229 << 8) | 1
    assert abi.DEV_IOC_BACKING_CLOSE == (1 << 30) | (4 << 16) | (229 << 8) | 2
    assert abi.PASSTHROUGH == 1 << 37


def test_entry_and_attr_encoding_round_trip() -> None:
    attr = Attr(st_ino=77, st_mode=stat.S_IFREG | 0o640, st_nlink=2, st_uid=1000, st_gid=100,
                st_size=1 << 40, st_blocks=9, st_atime_ns=-1, st_mtime_ns=1_500_000_001,
                st_ctime_ns=3)
    out = native_ops.entry_out(Entry(attr, entry_timeout=1.5, attr_timeout=0.0, generation=4))
    assert len(out) == abi.ENTRY_OUT_SIZE
    nodeid, gen, ev, av, evn, avn = abi.ENTRY_HEAD.unpack_from(out)
    assert (nodeid, gen, ev, av, evn, avn) == (77, 4, 1, 0, 500_000_000, 0)
    f = struct.unpack_from("=QQQqqqIIIIIIIIII", out, abi.ENTRY_HEAD.size)
    assert f[0:3] == (77, 1 << 40, 9)
    # a pre-epoch time: seconds floor, nanoseconds positive
    assert (f[3], f[6]) == (-1, 999_999_999)
    assert (f[4], f[7]) == (1, 500_000_001)
    assert f[9] == stat.S_IFREG | 0o640 and f[10:13] == (2, 1000, 100)


def test_dirent_size_is_padded_to_8() -> None:
    assert abi.dirent_size(1, False) == 32
    assert abi.dirent_size(8, False) == 32
    assert abi.dirent_size(9, False) == 40
    assert abi.dirent_size(1, True) == 32 + 128


# --- passthrough accounting ----------------------------------------------------------------------


class FakeIoctls:
    def __init__(self, refuse: int | None = None) -> None:
        self.next_id = 0
        self.open_ids: set[int] = set()
        self.log: list[tuple[str, int]] = []
        self.refuse = refuse

    def open(self, devfd: int, fd: int) -> int:
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        self.next_id += 1
        self.open_ids.add(self.next_id)
        self.log.append(("open", fd))
        return self.next_id

    def close(self, devfd: int, backing_id: int) -> None:
        self.open_ids.remove(backing_id)
        self.log.append(("close", backing_id))


def table(ioctls: FakeIoctls, enabled: bool = True) -> BackingIds:
    # Fake fds name files by their tens: 30 and 31 are two opens of one file, 40 another.
    return BackingIds(-1, enabled, open_ioctl=ioctls.open, close_ioctl=ioctls.close,
                      identify=lambda fd: (0, fd // 10))


def test_one_id_per_inode_closed_at_the_last_release_only() -> None:
    io = FakeIoctls()
    t = table(io)
    a = t.decide(5, fh=1, backing_fd=30)
    b = t.decide(5, fh=2, backing_fd=31)  # a second open reuses the id
    assert a == b == 1 and io.log == [("open", 30)]
    t.release(1)
    assert io.open_ids == {1}, "closed while an open remained"
    t.release(2)
    assert io.open_ids == set() and io.log[-1] == ("close", 1)
    # the next open registers anew
    assert t.decide(5, fh=3, backing_fd=32) == 2


def test_interleaved_open_release_storm_never_closes_early() -> None:
    io = FakeIoctls()
    t = table(io)
    live: list[int] = []
    for fh in range(1, 200):
        t.decide(9, fh, 40)
        live.append(fh)
        if fh % 3 == 0:  # release an older one
            t.release(live.pop(0))
        assert io.open_ids == {t.backing_id(9)}
    for fh in live:
        t.release(fh)
    assert io.open_ids == set()
    assert t.statistics().registered == 0


def test_cached_and_passthrough_opens_of_one_inode_never_mix() -> None:
    io = FakeIoctls()
    t = table(io)
    assert t.decide(5, fh=1, backing_fd=None) == 0   # cached (fs offered no backing)
    assert t.decide(5, fh=2, backing_fd=33) == 0     # still cached: the inode is in cached mode
    assert io.log == []
    t.release(1)
    t.release(2)
    assert t.decide(5, fh=3, backing_fd=33) == 1     # free again: passthrough
    # with a registration, even an open without an offer must be passthrough (same id)
    assert t.decide(5, fh=4, backing_fd=None) == 1


def test_an_open_offering_another_file_than_the_registered_one_fails() -> None:
    # overlay: an inode registered with its lower file must never get an open of its upper
    # copy answered with the lower file's id (writes would land in the lower layer).
    io = FakeIoctls()
    t = table(io)
    assert t.decide(5, fh=1, backing_fd=30) == 1
    with pytest.raises(BackingMismatchError) as exc:
        t.decide(5, fh=2, backing_fd=40)
    assert exc.value.errno == errno.EIO
    assert t.statistics().passthrough_opens == 1   # the refused open was not accounted
    t.release(2)   # its release (the caller undoes the open) changes nothing
    assert io.open_ids == {1}
    t.release(1)
    assert io.open_ids == set()


def test_refused_registration_falls_back_and_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    io = FakeIoctls(refuse=errno.EPERM)
    t = table(io)
    assert t.decide(5, 1, 30) == 0
    assert t.decide(6, 2, 31) == 0
    assert not t.enabled  # EPERM will not change for this connection
    warnings = [r for r in caplog.records if "passthrough refused" in r.getMessage()]
    assert len(warnings) == 1
    t.release(1)
    t.release(2)
    assert t.statistics().cached_opens == 0


def test_disabled_table_never_registers() -> None:
    io = FakeIoctls()
    t = table(io, enabled=False)
    assert t.decide(5, 1, 30) == 0 and io.log == []


# --- mount options -------------------------------------------------------------------------------


def test_mount_spec_sorts_flags_data_and_names() -> None:
    spec = mount_spec(["allow_other", "default_permissions", "ro", "noatime",
                       "fsname=/src", "subtype=backingfs-overlay", "suid", "max_read=131072"])
    assert spec.flags == MS_RDONLY | MS_NOATIME | MS_NODEV  # suid cleared the default nosuid
    assert spec.data == ["allow_other", "default_permissions", "max_read=131072"]
    assert spec.fsname == "/src" and spec.fstype == "fuse.backingfs-overlay"


def test_mount_spec_defaults_and_unknown() -> None:
    assert mount_spec([]).flags == MS_NOSUID | MS_NODEV
    assert mount_spec(["allow_root"]).data == ["allow_other"]
    with pytest.raises(ValueError, match="bogus"):
        mount_spec(["bogus"])


# --- handlers over a pipe --------------------------------------------------------------------


ROOT = Attr(st_ino=1, st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
FILE = Attr(st_ino=2, st_mode=stat.S_IFREG | 0o644, st_size=5)


class FakeFs(Filesystem):
    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int]] = []
        self.released: list[int] = []
        self.declined: list[int] = []
        self.calls: list[tuple[Any, ...]] = []
        self.xattrs: dict[bytes, bytes] = {}

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        self.calls.append(("lookup", parent, name, caller))
        if name != b"f":
            raise OSError(errno.ENOENT, "no")
        return Entry(FILE)

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.forgotten.extend(items)

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        return OpenReply(fh=10, keep_cache=True, backing=99)

    async def release(self, fh: int) -> None:
        self.released.append(fh)

    def backing_declined(self, fh: int) -> None:
        self.declined.append(fh)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b"hello"[off:off + size]

    async def write(self, fh: int, off: int, data: bytes) -> int:
        self.calls.append(("write", fh, off, data))
        return len(data)

    async def kill_suidgid(self, fh: int, caller: Caller) -> None:
        self.calls.append(("kill_suidgid", fh, caller))

    async def setattr(self, ino: int, changes: SetattrRequest, fh: int | None,
                      caller: Caller) -> Entry:
        self.calls.append(("setattr", ino, changes))
        return Entry(FILE)

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        entries = [DirEntry(b".", Entry(ROOT), 1), DirEntry(b"..", Entry(ROOT), 2)]
        entries += [DirEntry(b"n%03d" % i, Entry(FILE), 3 + i) for i in range(100)]
        for d in entries[off:]:
            if not reply(d):
                break

    async def getxattr(self, ino: int, name: bytes, caller: Caller) -> bytes:
        if name not in self.xattrs:
            raise OSError(errno.ENODATA, "none")
        return self.xattrs[name]

    async def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        self.xattrs[name] = value

    async def getattr(self, ino: int, caller: Caller) -> Entry:
        raise RuntimeError("a bug")

    async def fileattr_get(self, ino: int, fsx: bool, caller: Caller) -> FileAttr:
        self.calls.append(("fileattr_get", ino, fsx))
        return FileAttr(0x80010, (1, 2, 3, 4) if fsx else None)

    async def fileattr_set(self, ino: int, attr: FileAttr, caller: Caller) -> None:
        self.calls.append(("fileattr_set", ino, attr))


class PipeSession(NativeSession):
    """A session whose 'device' is a pipe we read replies from; a reply can be made to
    fail with ENOENT as the kernel does for an interrupted request."""

    def __init__(self, fs: Filesystem) -> None:
        super().__init__(fs)
        self.rfd, self.fd = os.pipe()
        self.interrupted = False
        self.backing = BackingIds(-1, True, open_ioctl=lambda d, f: 7,
                                  close_ioctl=lambda d, i: None, identify=lambda fd: (0, fd))

    def reply(self, unique: int, *payload: bytes | bytearray | memoryview) -> bool:
        if self.interrupted:
            return False
        return super().reply(unique, *payload)

    def take(self) -> tuple[int, int, bytes]:
        head = os.read(self.rfd, abi.OUT_HEADER.size)  # one message at a time
        size, error, unique = abi.OUT_HEADER.unpack(head)
        body = b""
        while len(body) < size - len(head):
            body += os.read(self.rfd, size - len(head) - len(body))
        return error, unique, body


def request(op: int, nodeid: int, args: bytes, unique: int = 5, pid: int = 42) -> bytes:
    return abi.IN_HEADER.pack(40 + len(args), op, unique, nodeid, 1000, 100, pid, 0, 0) + args


@pytest.fixture
def sess() -> Any:
    s = PipeSession(FakeFs())
    yield s
    os.close(s.rfd)
    os.close(s.fd)


def test_lookup_reply_and_errno(sess: PipeSession) -> None:
    trio.run(sess._dispatch, request(abi.Op.LOOKUP, 1, b"f\0"))
    error, unique, body = sess.take()
    assert (error, unique, len(body)) == (0, 5, abi.ENTRY_OUT_SIZE)
    assert sess.fs.calls[0] == ("lookup", 1, b"f", Caller(1000, 100, 42, 0))
    trio.run(sess._dispatch, request(abi.Op.LOOKUP, 1, b"nope\0", unique=6))
    assert sess.take()[:2] == (-errno.ENOENT, 6)


def test_unexpected_exception_is_eio_and_the_loop_survives(sess: PipeSession) -> None:
    trio.run(sess._dispatch, request(abi.Op.GETATTR, 2, abi.GETATTR_IN.pack(0, 0, 0)))
    assert sess.take()[0] == -errno.EIO


class BirthFs(FakeFs):
    async def getattr(self, ino: int, caller: Caller) -> Entry:
        return Entry(FILE._replace(st_rdev=os.makedev(300, 70000)), attr_timeout=2.5)

    async def birth_time(self, ino: int) -> int | None:
        return None if ino == 3 else -1_500_000_000  # before 1970: seconds -2, nsec 5e8


def test_statx_carries_the_birth_time_and_the_attributes() -> None:
    s = PipeSession(BirthFs())
    try:
        statx_in = abi.STATX_IN.pack(0, 0, 0, 0, 0xFFF)
        trio.run(s._dispatch, request(abi.Op.STATX, 2, statx_in))
        error, _, body = s.take()
        assert error == 0 and len(body) == abi.STATX_OUT.size
        (valid, valid_ns, _, mask, blksize, _, nlink, uid, gid, mode, ino, size, blocks, _,
         _, _, _, bsec, bnsec, _, _, _, _, msec, mnsec, _, rmaj, rmin, _, _) = \
            abi.STATX_OUT.unpack(body)
        assert (valid, valid_ns) == (2, 500_000_000)
        assert mask == 0xFFF  # the basic stats and STATX_BTIME
        assert (bsec, bnsec) == (-2, 500_000_000)
        assert (nlink, uid, gid, mode, ino, size, blocks, blksize) == (
            FILE.st_nlink, FILE.st_uid, FILE.st_gid, FILE.st_mode, FILE.st_ino, FILE.st_size,
            FILE.st_blocks, FILE.st_blksize)
        assert msec * 1_000_000_000 + mnsec == FILE.st_mtime_ns
        assert (rmaj, rmin) == (300, 70000)
        trio.run(s._dispatch, request(abi.Op.STATX, 3, statx_in, unique=7))
        error, _, body = s.take()
        assert error == 0 and abi.STATX_OUT.unpack(body)[3] == 0x7FF  # no birth time
    finally:
        os.close(s.rfd)
        os.close(s.fd)


def test_statx_without_birth_time_is_enosys(sess: PipeSession) -> None:
    # The kernel then stops sending STATX and uses GETATTR (fc->no_statx).
    trio.run(sess._dispatch, request(abi.Op.STATX, 2, abi.STATX_IN.pack(0, 0, 0, 0, 0xFFF)))
    assert sess.take()[0] == -errno.ENOSYS


def test_unknown_opcode_is_enosys(sess: PipeSession) -> None:
    trio.run(sess._dispatch, request(abi.Op.BMAP, 2, b"\0" * 16))
    assert sess.take()[0] == -errno.ENOSYS


def test_interrupted_lookup_reply_gives_the_reference_back(sess: PipeSession) -> None:
    sess.interrupted = True
    trio.run(sess._dispatch, request(abi.Op.LOOKUP, 1, b"f\0"))
    assert sess.fs.forgotten == [(2, 1)]


def test_open_reply_passthrough_drops_keep_cache(sess: PipeSession) -> None:
    trio.run(sess._dispatch, request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
    error, _, body = sess.take()
    fh, flags, backing_id = abi.OPEN_OUT.unpack(body)
    assert (error, fh, flags, backing_id) == (0, 10, abi.FOPEN_PASSTHROUGH, 7)
    trio.run(sess._dispatch, request(abi.Op.RELEASE, 2, abi.RELEASE_IN.pack(10, 0, 0, 0)))
    assert sess.take()[0] == 0 and sess.fs.released == [10]
    assert sess.backing.statistics().registered == 0


def test_interrupted_open_is_released(sess: PipeSession) -> None:
    sess.interrupted = True
    trio.run(sess._dispatch, request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
    assert sess.fs.released == [10]
    assert sess.backing.statistics().passthrough_opens == 0


def test_tmpfile_without_a_handler_is_enosys(sess: PipeSession) -> None:
    # ENOSYS: the kernel then answers EOPNOTSUPP to O_TMPFILE itself (fc->no_tmpfile).
    args = abi.CREATE_IN.pack(os.O_TMPFILE | os.O_RDWR, stat.S_IFREG | 0o600, 0o022, 0)
    trio.run(sess._dispatch, request(abi.Op.TMPFILE, 1, args + b"/\0"))
    assert sess.take()[0] == -errno.ENOSYS


class TmpfileFs(FakeFs):
    async def tmpfile(self, parent: int, mode: int, flags: int,
                      caller: Caller) -> tuple[OpenReply, Entry]:
        self.calls.append(("tmpfile", parent, mode, flags, caller))
        return OpenReply(fh=11, backing=98), Entry(FILE._replace(st_nlink=0))


def test_tmpfile_is_answered_as_create() -> None:
    s = PipeSession(TmpfileFs())
    try:
        flags = os.O_TMPFILE | os.O_RDWR | os.O_EXCL
        args = abi.CREATE_IN.pack(flags, stat.S_IFREG | 0o640, 0o022, 0) + b"/\0"
        trio.run(s._dispatch, request(abi.Op.TMPFILE, 1, args))
        error, _, body = s.take()
        assert error == 0 and len(body) == abi.ENTRY_OUT_SIZE + abi.OPEN_OUT.size
        assert abi.OPEN_OUT.unpack_from(body, abi.ENTRY_OUT_SIZE) == (
            11, abi.FOPEN_PASSTHROUGH, 7)
        assert s.fs.calls == [("tmpfile", 1, stat.S_IFREG | 0o640, flags,
                               Caller(1000, 100, 42, 0o022))]
        # Not taken by the kernel: the open is released and the reference given back.
        s.interrupted = True
        trio.run(s._dispatch, request(abi.Op.TMPFILE, 1, args, unique=6))
        assert s.fs.released == [11] and s.fs.forgotten == [(FILE.st_ino, 1)]
        assert s.backing.statistics().passthrough_opens == 1  # the first one's, still open
    finally:
        os.close(s.rfd)
        os.close(s.fd)


def test_write_passes_exactly_the_payload(sess: PipeSession) -> None:
    data = b"abcdef"
    trio.run(sess._dispatch, request(
        abi.Op.WRITE, 2, abi.WRITE_IN.pack(10, 4096, len(data), 0, 0, 0, 0) + data))
    error, _, body = sess.take()
    assert error == 0 and abi.WRITE_OUT.unpack(body)[0] == 6
    assert sess.fs.calls[-1] == ("write", 10, 4096, data)


def test_write_kill_suidgid_strips_before_writing(sess: PipeSession) -> None:
    trio.run(sess._dispatch, request(
        abi.Op.WRITE, 2, abi.WRITE_IN.pack(10, 0, 1, abi.WRITE_KILL_SUIDGID, 0, 0, 0) + b"x"))
    assert sess.take()[0] == 0
    assert sess.fs.calls[-2:] == [("kill_suidgid", 10, Caller(1000, 100, 42, 0)),
                                  ("write", 10, 0, b"x")]


def test_open_kill_suidgid_only_with_o_trunc(sess: PipeSession) -> None:
    for unique, flags in ((5, os.O_WRONLY), (6, os.O_WRONLY | os.O_TRUNC)):
        trio.run(sess._dispatch, request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(
            flags, abi.OPEN_KILL_SUIDGID), unique=unique))
        assert sess.take()[:2] == (0, unique)
    assert sess.fs.calls == [("kill_suidgid", 10, Caller(1000, 100, 42, 0))]


def _setattr(valid: int, size: int = 0) -> bytes:
    return abi.SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def test_setattr_kill_suidgid(sess: PipeSession) -> None:
    sess.flags = abi.HANDLE_KILLPRIV_V2
    caller = Caller(1000, 100, 42, 0)
    trio.run(sess._dispatch, request(abi.Op.SETATTR, 2, _setattr(
        abi.FATTR_SIZE | abi.FATTR_KILL_SUIDGID, 3)))
    assert sess.fs.calls[-1] == ("setattr", 2, SetattrRequest(size=3, kill_suidgid=caller))
    # Empty: file_remove_privs of a passthrough write; the caller's CapEff decides. A pid
    # that cannot exist counts as unprivileged; our own (root) keeps the bits.
    nobody = 2**31 - 1
    trio.run(sess._dispatch, request(abi.Op.SETATTR, 2, _setattr(abi.FATTR_FH), pid=nobody))
    assert sess.fs.calls[-1] == ("setattr", 2, SetattrRequest(
        kill_suidgid=Caller(1000, 100, nobody, 0)))
    if privs.caller_has_fsetid(os.getpid()):
        trio.run(sess._dispatch, request(abi.Op.SETATTR, 2, _setattr(0), pid=os.getpid()))
        assert sess.fs.calls[-1] == ("setattr", 2, SetattrRequest())
    trio.run(sess._dispatch, request(abi.Op.SETATTR, 2, _setattr(abi.FATTR_SIZE, 3)))
    assert sess.fs.calls[-1] == ("setattr", 2, SetattrRequest(size=3))
    sess.flags = 0
    trio.run(sess._dispatch, request(abi.Op.SETATTR, 2, _setattr(0)))
    assert sess.fs.calls[-1] == ("setattr", 2, SetattrRequest())


def test_readdirplus_fills_to_size_and_settles_references(sess: PipeSession) -> None:
    size = 4096
    trio.run(sess._dispatch, request(abi.Op.READDIRPLUS, 1,
                                     abi.READ_IN.pack(3, 0, size, 0, 0, 0, 0)))
    error, _, body = sess.take()
    assert error == 0 and 0 < len(body) <= size
    names, pos = [], 0
    while pos < len(body):
        namelen = struct.unpack_from("=I", body, pos + 128 + 16)[0]
        names.append(body[pos + 152:pos + 152 + namelen])
        pos += abi.dirent_size(namelen, True)
    assert names[:3] == [b".", b"..", b"n000"]
    assert 2 < len(names) < 102
    forgotten = dict(sess.fs.forgotten)
    # ".", ".." (ino 1) given back, and the one entry refused (the fs stops there)
    assert forgotten == {1: 2, 2: 1}


class BareFs(FakeFs):
    """Every odd entry is bare (no inode, no reference), as passthru makes them when it is
    out of file descriptors."""

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        for i in range(off, 100):
            if i % 2:
                attr = Attr(st_ino=500 + i, st_mode=stat.S_IFREG)
                d = DirEntry(b"b%03d" % i, Entry(attr, 0.0, 0.0), i + 1, bare=True)
            else:
                d = DirEntry(b"n%03d" % i, Entry(FILE), i + 1)
            if not reply(d):
                break


def _plus_entries(body: bytes) -> list[tuple[int, int, bytes]]:
    """(node id, d_ino, name) of each READDIRPLUS entry."""
    out, pos = [], 0
    while pos < len(body):
        nodeid = struct.unpack_from("=Q", body, pos)[0]
        d_ino, _, namelen = struct.unpack_from("=QQI", body, pos + 128)
        out.append((nodeid, d_ino, body[pos + 152:pos + 152 + namelen]))
        pos += abi.dirent_size(namelen, True)
    return out


@pytest.mark.parametrize(("size", "listed", "given_back", "undone"), [
    (4096, 25, 0, 13),      # 25 fit (160 bytes each), the bare 26th is refused: no reference
    (3900, 24, 1, 12 + 1),  # 24 fit, the 25th (an inode) is refused: its reference back
    (8 * 4096, 100, 0, 50),  # all fit
])
def test_readdirplus_bare_entries_carry_node_id_0_and_no_reference(
        size: int, listed: int, given_back: int, undone: int) -> None:
    s = PipeSession(BareFs())
    try:
        trio.run(s._dispatch, request(abi.Op.READDIRPLUS, 1,
                                      abi.READ_IN.pack(3, 0, size, 0, 0, 0, 0)))
        error, _, body = s.take()
        entries = _plus_entries(body)
        assert error == 0 and len(entries) == listed
        assert entries[:2] == [(2, 2, b"n000"), (0, 501, b"b001")]
        assert all((nodeid == 0) == name.startswith(b"b") for nodeid, _, name in entries)
        assert sum(n for _, n in s.fs.forgotten) == given_back
        # A reply the kernel did not take: the inode entries' references come back, and
        # the refused one's; bare entries had none.
        s.fs.forgotten.clear()
        s.interrupted = True
        trio.run(s._dispatch, request(abi.Op.READDIRPLUS, 1,
                                      abi.READ_IN.pack(3, 0, size, 0, 0, 0, 0)))
        assert sum(n for _, n in s.fs.forgotten) == undone
    finally:
        os.close(s.rfd)
        os.close(s.fd)


def test_getxattr_size_protocol_and_setxattr_flags(sess: PipeSession) -> None:
    sess.fs.xattrs[b"user.a"] = b"12345"
    trio.run(sess._dispatch, request(abi.Op.GETXATTR, 2, abi.GETXATTR_IN.pack(0, 0) + b"user.a\0"))
    assert abi.GETXATTR_OUT.unpack(sess.take()[2])[0] == 5
    trio.run(sess._dispatch, request(abi.Op.GETXATTR, 2, abi.GETXATTR_IN.pack(3, 0) + b"user.a\0"))
    assert sess.take()[0] == -errno.ERANGE
    trio.run(sess._dispatch, request(abi.Op.GETXATTR, 2, abi.GETXATTR_IN.pack(64, 0) + b"user.a\0"))
    assert sess.take()[2] == b"12345"
    create = abi.SETXATTR_IN.pack(1, native_ops.XATTR_CREATE) + b"user.a\0x"
    trio.run(sess._dispatch, request(abi.Op.SETXATTR, 2, create))
    assert sess.take()[0] == -errno.EEXIST
    replace = abi.SETXATTR_IN.pack(1, native_ops.XATTR_REPLACE) + b"user.b\0x"
    trio.run(sess._dispatch, request(abi.Op.SETXATTR, 2, replace))
    assert sess.take()[0] == -errno.ENODATA
    plain = abi.SETXATTR_IN.pack(2, 0) + b"user.b\0xy"
    trio.run(sess._dispatch, request(abi.Op.SETXATTR, 2, plain))
    assert sess.take()[0] == 0 and sess.fs.xattrs[b"user.b"] == b"xy"


def _ioctl(cmd: int, arg: bytes = b"", out_size: int = 0) -> bytes:
    return request(abi.Op.IOCTL, 2, abi.IOCTL_IN.pack(7, 0, cmd, 0, len(arg), out_size) + arg)


def test_ioctl_serves_the_fileattr_forms_only(sess: PipeSession) -> None:
    """The kernel's fuse_priv_ioctl: a 4-byte flags word or a 28-byte struct fsxattr, out
    after an ioctl_out with result 0; in for the setters. Any other command: ENOTTY."""
    trio.run(sess._dispatch, _ioctl(0x80086601, out_size=4))
    error, _, body = sess.take()
    assert (error, body) == (0, abi.IOCTL_OUT.pack(0, 0, 0, 0) + struct.pack("=I", 0x80010))
    trio.run(sess._dispatch, _ioctl(0x801C581F, out_size=28))
    error, _, body = sess.take()
    assert error == 0 and body[16:] == struct.pack("=IIIII8x", 0x80010, 1, 2, 3, 4)
    trio.run(sess._dispatch, _ioctl(0x40086602, struct.pack("=I", 0x40)))
    assert sess.take()[:2] == (0, 5)
    trio.run(sess._dispatch, _ioctl(0x401C5820, struct.pack("=IIIII8x", 0x80, 0, 0, 9, 0)))
    assert sess.take()[0] == 0
    assert sess.fs.calls == [("fileattr_get", 2, False), ("fileattr_get", 2, True),
                             ("fileattr_set", 2, FileAttr(0x40)),
                             ("fileattr_set", 2, FileAttr(0x80, (0, 0, 9, 0)))]
    trio.run(sess._dispatch, _ioctl(0x40086602, b"\1"))  # shorter than an int
    assert sess.take()[0] == -errno.EINVAL
    trio.run(sess._dispatch, _ioctl(0x80087601, out_size=8))  # FS_IOC_GETVERSION
    assert sess.take()[0] == -errno.ENOTTY
    assert len(sess.fs.calls) == 4


def test_init_negotiates_passthrough_only_without_writeback(sess: PipeSession) -> None:
    offered = abi.ASYNC_READ | abi.INIT_EXT | abi.MAX_PAGES | abi.PASSTHROUGH | \
        abi.WRITEBACK_CACHE
    init = abi.INIT_IN.pack(7, 45, 131072, offered & 0xFFFFFFFF, offered >> 32) + bytes(44)
    trio.run(sess._dispatch, request(abi.Op.INIT, 0, init))
    out = abi.INIT_OUT.unpack(sess.take()[2])
    flags = out[3] | out[10] << 32
    assert out[:2] == (7, 40) and flags & abi.PASSTHROUGH and out[11] == 1
    assert not flags & abi.WRITEBACK_CACHE and sess.fs.passthrough
    # with the writeback cache the kernel refuses passthrough: not asked for
    sess.fs.enable_writeback_cache = True
    trio.run(sess._dispatch, request(abi.Op.INIT, 0, init))
    out = abi.INIT_OUT.unpack(sess.take()[2])
    flags = out[3] | out[10] << 32
    assert flags & abi.WRITEBACK_CACHE and not flags & abi.PASSTHROUGH and out[11] == 0
    assert not sess.fs.passthrough


def test_notifier_messages(sess: PipeSession) -> None:
    from backingfs.native import NativeNotifier

    notifier = NativeNotifier(sess)

    async def main() -> None:
        await notifier.invalidate_inode(12, attr_only=True)
        await notifier.invalidate_inode(13)
        async with trio.open_nursery() as nursery:
            sess._nursery = nursery
            notifier.invalidate_entry(1, b"name")
            notifier.invalidate_entry(1, b"gone", deleted_ino=14)
        sess._nursery = None

    trio.run(main)
    msgs = []
    for _ in range(4):
        error, unique, body = sess.take()
        assert unique == 0
        msgs.append((error, body))
    assert msgs[0] == (abi.NOTIFY_INVAL_INODE, abi.NOTIFY_INVAL_INODE_OUT.pack(12, -1, 0))
    assert msgs[1] == (abi.NOTIFY_INVAL_INODE, abi.NOTIFY_INVAL_INODE_OUT.pack(13, 0, 0))
    assert sorted(msgs[2:]) == sorted([
        (abi.NOTIFY_INVAL_ENTRY, abi.NOTIFY_INVAL_ENTRY_OUT.pack(1, 4, 0) + b"name\0"),
        (abi.NOTIFY_DELETE, abi.NOTIFY_DELETE_OUT.pack(1, 14, 4, 0) + b"gone\0")])


def test_prune_message_from_the_loop_and_from_a_thread(sess: PipeSession) -> None:
    from backingfs.native import NativeNotifier

    notifier = NativeNotifier(sess)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sess._nursery = nursery
            notifier.prune([5, 1 << 40, 7])       # on the loop: written by a worker
        sess._nursery = None
        await trio.to_thread.run_sync(notifier.prune, [9])   # a worker: written at once
        notifier.prune([])                        # nothing to ask: no message

    trio.run(main)
    for inos in ([5, 1 << 40, 7], [9]):
        error, unique, body = sess.take()
        assert (error, unique) == (abi.NOTIFY_PRUNE, 0)
        assert body == abi.NOTIFY_PRUNE_OUT.pack(len(inos), 0, 0) + struct.pack(
            f"={len(inos)}Q", *inos)
    os.set_blocking(sess.rfd, False)
    with pytest.raises(BlockingIOError):
        os.read(sess.rfd, 1)


def test_prune_refused_by_an_old_kernel_is_not_asked_again(
        sess: PipeSession, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from backingfs import native
    from backingfs.native import NativeNotifier

    writes: list[bytes] = []

    def refuse(fd: int, data: bytes) -> int:
        writes.append(data)
        raise OSError(errno.EINVAL, "unknown notify code")

    monkeypatch.setattr(native.os, "write", refuse)
    notifier = NativeNotifier(sess)
    caplog.set_level(logging.INFO, logger="backingfs.native")
    trio.run(trio.to_thread.run_sync, notifier.prune, [5])
    assert not notifier.can_prune and len(writes) == 1
    assert "cannot prune" in caplog.text
    trio.run(trio.to_thread.run_sync, notifier.prune, [6])
    assert len(writes) == 1


def test_frontend_choice_takes_session_passthrough_and_uring_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from backingfs.options import UsageError
    from backingfs.runner import DEFAULT_SESSION, frontend_choice

    for var in ("BACKINGFS_SESSION", "BACKINGFS_PASSTHROUGH", "BACKINGFS_URING"):
        monkeypatch.delenv(var, raising=False)
    choice, rest = frontend_choice(["ro", "session=pyfuse3", "passthrough=off", "fsname=x"])
    assert choice == {"session": "pyfuse3", "passthrough": "off", "uring": "auto"}
    assert rest == ["ro", "fsname=x"]
    assert frontend_choice([])[0] == {"session": DEFAULT_SESSION, "passthrough": "auto",
                                      "uring": "auto"}
    assert frontend_choice(["uring=off"])[0]["uring"] == "off"
    monkeypatch.setenv("BACKINGFS_SESSION", "pyfuse3")
    assert frontend_choice([])[0]["session"] == "pyfuse3"
    monkeypatch.setenv("BACKINGFS_PASSTHROUGH", "off")
    monkeypatch.setenv("BACKINGFS_URING", "off")
    assert frontend_choice([])[0] == {"session": "pyfuse3", "passthrough": "off",
                                      "uring": "off"}
    assert frontend_choice(["passthrough=on"])[0]["passthrough"] == "on"
    monkeypatch.setenv("BACKINGFS_URING", "on")  # a default: an explicit pyfuse3 wins
    assert frontend_choice(["session=pyfuse3"])[0]["uring"] == "off"
    monkeypatch.setenv("BACKINGFS_PASSTHROUGH", "sometimes")
    with pytest.raises(UsageError):
        frontend_choice([])
    monkeypatch.delenv("BACKINGFS_PASSTHROUGH")
    for bad in (["session=kernel"], ["passthrough=maybe"], ["session"], ["uring=maybe"],
                ["uring"], ["session=pyfuse3", "uring=on"]):
        with pytest.raises(UsageError):
            frontend_choice(bad)


class SlowReadFs(FakeFs):
    """READ suspends (as a cold read waiting for its I/O does); LOOKUP never does."""

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await trio.sleep(0.01)
        return b"slow"


def test_request_loop_serves_inline_and_suspending_requests() -> None:
    """The whole loop over a SEQPACKET socketpair (message boundaries as /dev/fuse): lookups
    are served inline by the reader, reads that suspend are finished by their own task while
    the next reader goes on; every request gets its one answer; terminate() ends serve()."""
    s = NativeSession(SlowReadFs())
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.fd = ours.fileno()
    lookups, reads = 40, 5
    sent: dict[int, int] = {}
    unique = 100
    for i in range(lookups + reads):
        unique += 2
        if i % 9 == 4 and len([v for v in sent.values() if v == abi.Op.READ]) < reads:
            sent[unique] = abi.Op.READ
            peer.send(request(abi.Op.READ, 2, abi.READ_IN.pack(10, 0, 4096, 0, 0, 0, 0),
                              unique=unique))
        else:
            sent[unique] = abi.Op.LOOKUP
            peer.send(request(abi.Op.LOOKUP, 1, b"f\0" if i % 2 else b"nope\0",
                              unique=unique))
    answers: dict[int, tuple[int, bytes]] = {}

    async def main() -> None:
        with trio.fail_after(20):
            await serve_and_collect()

    async def serve_and_collect() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.serve, 1, 8)

            def collect() -> None:
                peer.settimeout(10)
                while len(answers) < len(sent):
                    msg = peer.recv(1 << 16)
                    _, error, u = abi.OUT_HEADER.unpack_from(msg)
                    assert u not in answers, f"request {u} answered twice"
                    answers[u] = (error, msg[abi.OUT_HEADER.size:])

            await trio.to_thread.run_sync(collect)
            s.terminate()

    try:
        trio.run(main)
    finally:
        ours.close()
        peer.close()
    assert set(answers) == set(sent)
    for u, op in sent.items():
        error, body = answers[u]
        if op == abi.Op.READ:
            assert (error, body) == (0, b"slow")
        else:
            assert error in (0, -errno.ENOENT)
    n_reads = sum(1 for op in sent.values() if op == abi.Op.READ)
    assert s.suspended[abi.Op.READ] == n_reads
    assert s.counts[abi.Op.LOOKUP] == len(sent) - n_reads
    assert not s.suspended[abi.Op.LOOKUP]


def test_enodev_while_polling_ends_the_session_quietly(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """The device goes away (unmount) while an idle reader polls it: serve() returns, no
    traceback, no error logged."""
    with caplog.at_level("WARNING"):
        s, empties = _serve_script(monkeypatch, [], empty_polls=50)
    assert empties >= 50
    assert not s._mounted
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_open_offering_another_backing_file_fails_and_is_released(
        sess: PipeSession, monkeypatch: pytest.MonkeyPatch) -> None:
    trio.run(sess._dispatch, request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
    assert sess.take()[0] == 0   # fh 10, backing file 99 registered for inode 2

    async def other_file(ino: int, flags: int, caller: Caller) -> OpenReply:
        return OpenReply(fh=11, backing=98)

    monkeypatch.setattr(sess.fs, "open", other_file)
    trio.run(sess._dispatch, request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(os.O_RDWR, 0)))
    assert sess.take()[0] == -errno.EIO
    assert sess.fs.released == [11]   # the refused open's handle was given back
    assert sess.backing.statistics().passthrough_opens == 1


def test_a_refused_backing_is_told_to_the_filesystem(sess: PipeSession) -> None:
    # overlay's lower passthrough counts the opens the kernel serves from a lower file: an
    # open the kernel refused (EPERM in a user namespace) must not count.
    def refuse(devfd: int, fd: int) -> int:
        raise OSError(errno.EPERM, "no CAP_SYS_ADMIN")

    sess.backing = BackingIds(-1, True, open_ioctl=refuse, close_ioctl=lambda d, i: None,
                              identify=lambda fd: (0, fd))
    trio.run(sess._dispatch, request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
    error, _, body = sess.take()
    assert error == 0 and abi.OPEN_OUT.unpack(body)[2] == 0   # no backing id
    assert sess.fs.declined == [10]


class NoFdsOnceFs(FakeFs):
    """Every handle I/O fails once with EMFILE (overlay's reopen of the upper copy at the
    fd limit), then works; ``relieve_fds`` counts the prunes asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.prunes = 0
        self.failed: set[str] = set()

    def relieve_fds(self) -> bool:
        self.prunes += 1
        return True

    def _once(self, what: str) -> None:
        if what not in self.failed:
            self.failed.add(what)
            raise OSError(errno.EMFILE, "Too many open files")

    def read_start(self, fh: int, off: int, size: int, done: Any) -> memoryview | None:
        self._once("read")
        return memoryview(b"hello")[off:off + size]

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._once("read")
        return b"hello"[off:off + size]

    async def write(self, fh: int, off: int, data: bytes) -> int:
        self._once("write")
        return await super().write(fh, off, data)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._once("fsync")


@pytest.mark.parametrize("callback", [True, False], ids=["read_start", "read"])
def test_handle_io_at_the_fd_limit_waits_for_a_prune(callback: bool) -> None:
    s = PipeSession(NoFdsOnceFs())
    try:
        s.read_start = s.fs.read_start if callback else None
        trio.run(s._dispatch, request(abi.Op.READ, 2, abi.READ_IN.pack(10, 1, 3, 0, 0, 0, 0)))
        assert s.take()[::2] == (0, b"ell")
        trio.run(s._dispatch, request(abi.Op.WRITE, 2,
                                      abi.WRITE_IN.pack(10, 0, 2, 0, 0, 0, 0) + b"hi"))
        error, _, body = s.take()
        assert error == 0 and abi.WRITE_OUT.unpack(body)[0] == 2
        trio.run(s._dispatch, request(abi.Op.FSYNC, 2, abi.FSYNC_IN.pack(10, 0, 0)))
        assert s.take()[0] == 0
        assert s.fs.prunes == 3
    finally:
        os.close(s.rfd)
        os.close(s.fd)


def test_runnable_check_counts_what_trio_reports() -> None:
    """The polling loop's cheap count of runnable tasks (trio's run queue) is the number
    ``current_statistics`` reports, before and after tasks become runnable."""
    from backingfs.native import _runnable_check

    async def main() -> None:
        check = _runnable_check()
        assert check() == trio.lowlevel.current_statistics().tasks_runnable == 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            nursery.start_soon(trio.sleep, 0)
            assert check() == trio.lowlevel.current_statistics().tasks_runnable == 2
        assert check() == 0

    trio.run(main)


def test_poll_is_long_only_in_a_burst_of_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader polls SPIN_SECONDS when the last BURST_REQUESTS requests came within
    BURST_SECONDS, else SPIN_SHORT_SECONDS: a caller that sends a request or two now and
    then costs the daemon the short poll, a tar extract gets the long one."""
    from backingfs import native

    clock = [100.0]

    def perf_counter() -> float:
        clock[0] += 1e-6  # each look at the clock is one µs of polling
        return clock[0]

    arrived = [False]
    polls = [0]

    def readv(fd: int, buffers: Any) -> int:
        polls[0] += 1
        if arrived[0]:
            return 64
        raise BlockingIOError(errno.EAGAIN, "nothing yet")

    monkeypatch.setattr(native.time, "perf_counter", perf_counter)
    monkeypatch.setattr(native.os, "readv", readv)
    monkeypatch.setattr(native, "SPIN_SECONDS", 200e-6)
    monkeypatch.setattr(native, "SPIN_SHORT_SECONDS", 20e-6)
    monkeypatch.setattr(native, "BURST_SECONDS", 1e-3)
    s = NativeSession(FakeFs())
    s._runnable = lambda: 0

    def poll() -> tuple[int, int]:
        polls[0] = 0
        return s._spin(-1, bytearray(64), None), polls[0]

    def arrivals(spacing: float) -> None:
        s._arrivals.clear()
        for i in range(native.BURST_REQUESTS):
            s._arrivals.append(clock[0] - (native.BURST_REQUESTS - i) * spacing)

    n, count = poll()
    assert n == 0 and 15 <= count <= 20  # no requests yet: the short poll
    arrivals(100e-6)  # 8 requests in 0.8 ms: a burst
    n, count = poll()
    assert n == 0 and 190 <= count <= 200
    arrivals(300e-6)  # 8 requests in 2.4 ms: none
    n, count = poll()
    assert n == 0 and 15 <= count <= 20
    arrived[0] = True
    before = clock[0]
    assert poll() == (64, 1)
    assert s._arrivals[-1] > before  # the request the poll found counts


class OrderFs(FakeFs):
    """Records lookups and forgets in one list, in the order they ran."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.replies: list[int] = []  # the unique of each reply, in the order written

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        self.order.append("lookup")
        return await super().lookup(parent, name, caller)

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.order.extend("forget" for _ in items)
        await super().forget(items)

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        self.order.append("open")
        return await super().open(ino, flags, caller)

    async def release(self, fh: int) -> None:
        self.order.append("release")
        await super().release(fh)

    async def releasedir(self, fh: int) -> None:
        self.order.append("releasedir")


def _serve_script(monkeypatch: pytest.MonkeyPatch, script: list[bytes],
                  empty_polls: int = 5) -> tuple[NativeSession, int]:
    """Serve the requests of ``script`` (on an OrderFs) from a device that has them all
    waiting, is then found empty ``empty_polls`` times, then goes away (it polls readable
    once it is gone, as the real one). Returns the session and how often it was empty; the
    uniques of the replies, in the order written, are on the OrderFs (``replies``)."""
    from backingfs import native

    fs = OrderFs()
    s = NativeSession(fs)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.fd = ours.fileno()
    queue = list(script)
    empties = 0
    real_readv = os.readv

    def readv(fd: int, buffers: Any) -> int:
        nonlocal empties
        if fd != s.fd:
            return real_readv(fd, buffers)
        if queue:
            data = queue.pop(0)
            buffers[0][:len(data)] = data
            return len(data)
        empties += 1
        if empties < empty_polls:
            raise BlockingIOError(errno.EAGAIN, "nothing yet")
        if empties == empty_polls:
            peer.send(b"x")
        raise OSError(errno.ENODEV, "unmounted")

    monkeypatch.setattr(native.os, "readv", readv)
    # Both polls: out of a burst the reader polls SPIN_SHORT_SECONDS (50 us), in which
    # the empty polls are not sure to fit (the test then waited for a device that never
    # became readable).
    monkeypatch.setattr(native, "SPIN_SECONDS", 0.5)
    monkeypatch.setattr(native, "SPIN_SHORT_SECONDS", 0.5)

    async def main() -> None:
        with trio.fail_after(10):
            await s.serve(1, 4)

    try:
        trio.run(main)
        peer.setblocking(False)
        while True:  # the replies, in the order written
            try:
                reply = peer.recv(1 << 16)
            except BlockingIOError:
                break
            fs.replies.append(abi.OUT_HEADER.unpack_from(reply)[2])
    finally:
        ours.close()
        peer.close()
    return s, empties


def test_forgets_wait_for_the_device_to_be_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel hands the FORGET of an unlinked file out ahead of the caller's next
    # request: that request is answered first, and the FORGET applied once the device is
    # found empty (and never lost).
    forget = request(abi.Op.FORGET, 2, abi.FORGET_IN.pack(1), unique=0)
    batch = request(abi.Op.BATCH_FORGET, 0,
                    abi.BATCH_FORGET_IN.pack(2, 0) + abi.FORGET_ONE.pack(3, 1)
                    + abi.FORGET_ONE.pack(4, 2), unique=0)
    s, _ = _serve_script(monkeypatch, [forget, batch, request(abi.Op.LOOKUP, 1, b"f\0")])
    fs = s.fs
    assert isinstance(fs, OrderFs)
    assert fs.order == ["lookup", "forget", "forget", "forget"]
    assert fs.forgotten == [(2, 1), (3, 1), (4, 2)]


def test_held_forgets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from backingfs import native

    n = native.HOLD_MAX + 6
    forgets = [request(abi.Op.FORGET, 100 + i, abi.FORGET_IN.pack(1), unique=0)
               for i in range(n)]
    s, _ = _serve_script(monkeypatch, [*forgets, request(abi.Op.LOOKUP, 1, b"f\0")])
    fs = s.fs
    assert isinstance(fs, OrderFs)
    # The one past the bound applies those held and itself at once; the rest wait.
    first = fs.order.index("lookup")
    assert first == native.HOLD_MAX + 1
    assert sorted(fs.forgotten) == [(100 + i, 1) for i in range(n)]


def test_releases_wait_for_the_device_to_be_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    # close(2) returns before the kernel's RELEASE is answered, and the caller's next
    # request comes right behind it: that request is answered first.
    release = request(abi.Op.RELEASE, 2, abi.RELEASE_IN.pack(7, 0, 0, 0), unique=11)
    releasedir = request(abi.Op.RELEASEDIR, 1, abi.RELEASE_IN.pack(8, 0, 0, 0), unique=12)
    lookup = request(abi.Op.LOOKUP, 1, b"f\0", unique=13)
    s, _ = _serve_script(monkeypatch, [release, releasedir, lookup])
    fs = s.fs
    assert isinstance(fs, OrderFs)
    assert fs.order == ["lookup", "release", "releasedir"]
    assert fs.released == [7]
    assert fs.replies == [13, 11, 12]


def test_an_open_applies_the_releases_read_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # An open must not find the last handle's backing registration still there (overlay:
    # the lower file's, when this open copies up): held releases go first. FORGETs held
    # with them keep their place in the order read.
    release = request(abi.Op.RELEASE, 2, abi.RELEASE_IN.pack(7, 0, 0, 0), unique=11)
    forget = request(abi.Op.FORGET, 3, abi.FORGET_IN.pack(1), unique=0)
    lookup = request(abi.Op.LOOKUP, 1, b"f\0", unique=12)
    opened = request(abi.Op.OPEN, 2, abi.OPEN_IN.pack(os.O_RDONLY, 0), unique=13)
    s, _ = _serve_script(monkeypatch, [release, forget, lookup, opened])
    fs = s.fs
    assert isinstance(fs, OrderFs)
    assert fs.order == ["lookup", "release", "forget", "open"]
    assert fs.replies == [12, 11, 13]


def test_the_session_end_applies_what_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    # DESTROY ends the session; the runner calls the filesystem's destroy() only after
    # serve() has returned, by when the held release and forget have been applied.
    release = request(abi.Op.RELEASE, 2, abi.RELEASE_IN.pack(7, 0, 0, 0), unique=11)
    forget = request(abi.Op.FORGET, 3, abi.FORGET_IN.pack(1), unique=0)
    destroy = request(abi.Op.DESTROY, 0, b"", unique=12)
    s, _ = _serve_script(monkeypatch, [release, forget, destroy])
    fs = s.fs
    assert isinstance(fs, OrderFs)
    assert fs.order == ["release", "forget"]
    assert fs.released == [7] and fs.forgotten == [(3, 1)]
    assert fs.replies == [12, 11]
