"""Bridge without a mount: handlers called directly inside trio with a fake filesystem."""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from backingfs.attrs import Attr
from backingfs.bridge import (
    Bridge,
    caller_of,
    entry_attributes,
    file_info,
    setattr_request,
    statvfs_data,
)
from backingfs.fsapi import (
    Caller,
    DirEntry,
    Entry,
    Filesystem,
    OpenReply,
    ReaddirReply,
    Statfs,
)
from backingfs.notify import RecordingNotifier

CTX = SimpleNamespace(uid=1000, gid=100, pid=4242, umask=0o027)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


def file_entry(ino: int) -> Entry:
    return Entry(Attr(st_ino=ino, st_mode=stat.S_IFREG | 0o644))


class FakeFs(Filesystem):
    """Raises whatever ``self.error`` holds; records forgets; lists ``count`` entries."""

    def __init__(self, count: int = 10) -> None:
        self.error: BaseException | None = None
        self.forgotten: list[tuple[int, int]] = []
        self.count = count
        self.stop_on_false = True
        self.fail_after: int | None = None
        self.callers: list[Caller] = []
        self.access_error: OSError | None = None

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        self.callers.append(caller)
        if self.error is not None:
            raise self.error
        return file_entry(2)

    async def getattr(self, ino: int, caller: Caller) -> Entry:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        if self.error is not None:
            raise self.error
        self.forgotten.extend(items)

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        for i in range(off, self.count):
            if self.fail_after is not None and i == self.fail_after:
                raise OSError(errno.EIO, "backing readdir failed")
            name = {0: b".", 1: b".."}.get(i, b"f%d" % i) if self.dots else b"f%d" % i
            bare = self.bare_from is not None and i >= self.bare_from
            if not reply(DirEntry(name, file_entry(100 + i), i + 1, bare=bare)) \
                    and self.stop_on_false:
                return

    bare_from: int | None = None

    dots = False

    async def access(self, ino: int, mode: int, caller: Caller) -> None:
        if self.access_error is not None:
            raise self.access_error

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        return OpenReply(fh=77, direct_io=True, keep_cache=False, nonseekable=True)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[OpenReply, Entry]:
        return OpenReply(fh=5, keep_cache=True), file_entry(9)

    async def getxattr(self, ino: int, name: bytes, caller: Caller) -> bytes:
        return bytearray(b"value")  # type: ignore[return-value]


def lookup_errno(fs: FakeFs, error: BaseException) -> int:
    fs.error = error
    bridge = Bridge(fs)

    async def go() -> int:
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await bridge.lookup(1, b"x", CTX)
        return ei.value.errno

    return run(go)


def test_oserror_becomes_fuseerror_with_its_errno() -> None:
    assert lookup_errno(FakeFs(), OSError(errno.ENOENT, "nope")) == errno.ENOENT
    assert lookup_errno(FakeFs(), FileExistsError(errno.EEXIST, "x")) == errno.EEXIST


def test_oserror_without_errno_is_eio() -> None:
    assert lookup_errno(FakeFs(), OSError("no errno")) == errno.EIO


def test_fuseerror_passes_through() -> None:
    assert lookup_errno(FakeFs(), pyfuse3.FUSEError(errno.EROFS)) == errno.EROFS


def test_bug_is_eio_with_logged_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="backingfs.bridge")
    assert lookup_errno(FakeFs(), ValueError("bug")) == errno.EIO
    (rec,) = [r for r in caplog.records if r.name == "backingfs.bridge"]
    assert rec.exc_info is not None and rec.exc_info[0] is ValueError
    assert "lookup" in rec.getMessage()
    assert "Traceback" in caplog.text


def test_cancellation_propagates() -> None:
    bridge = Bridge(FakeFs())

    async def go() -> bool:
        with trio.CancelScope() as cs:
            cs.cancel()
            await bridge.getattr(1, CTX)  # sleeps forever in the fs: only Cancelled ends it
        return cs.cancelled_caught

    assert run(go) is True


def test_request_log_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="backingfs.bridge")
    lookup_errno(FakeFs(), OSError(errno.ENOENT, "nope"))
    text = caplog.text
    assert "-> lookup(1, b'x', ctx(uid=1000,gid=100,pid=4242))" in text
    assert "<- lookup: ENOENT" in text


def test_no_request_log_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backingfs.bridge")
    lookup_errno(FakeFs(), OSError(errno.ENOENT, "nope"))
    assert caplog.records == []


def test_caller_conversion_passes_uid_gid_pid_umask() -> None:
    fs = FakeFs()
    run(lambda: Bridge(fs).lookup(1, b"x", CTX))
    assert fs.callers == [Caller(uid=1000, gid=100, pid=4242, umask=0o027)]
    assert caller_of(CTX) == Caller(1000, 100, 4242, 0o027)


class FakeReply:
    """Stands in for pyfuse3.readdir_reply: accepts until ``reject_at`` (0-based call)."""

    def __init__(self, reject_at: int) -> None:
        self.reject_at = reject_at
        self.calls: list[tuple[bytes, int, int]] = []

    def __call__(self, token: object, name: bytes, attr: pyfuse3.EntryAttributes,
                 next_id: int) -> bool:
        self.calls.append((name, attr.st_ino, next_id))
        return len(self.calls) - 1 < self.reject_at


def readdir(fs: FakeFs, monkeypatch: pytest.MonkeyPatch, reject_at: int,
            start: int = 0) -> FakeReply:
    fake = FakeReply(reject_at)
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake)
    run(lambda: Bridge(fs).readdir(7, start, object()))
    return fake


def test_readdir_forgets_exactly_the_rejected_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeFs(count=10)
    fake = readdir(fs, monkeypatch, reject_at=3)
    assert [c[0] for c in fake.calls] == [b"f0", b"f1", b"f2", b"f3"]
    assert [c[2] for c in fake.calls] == [1, 2, 3, 4]
    assert fs.forgotten == [(103, 1)]


def test_readdir_all_accepted_forgets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeFs(count=10)
    fake = readdir(fs, monkeypatch, reject_at=100, start=4)
    assert len(fake.calls) == 6
    assert fs.forgotten == []


def test_readdir_ends_at_a_bare_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyfuse3 cannot send an entry without an inode: the listing ends before it (the kernel
    # asks again from there), and a bare entry has no reference to give back.
    fs = FakeFs(count=10)
    fs.bare_from = 4
    fs.stop_on_false = False
    fake = readdir(fs, monkeypatch, reject_at=100)
    assert [c[0] for c in fake.calls] == [b"f0", b"f1", b"f2", b"f3"]
    assert fs.forgotten == []


def test_readdir_of_a_bare_entry_first_is_emfile(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeFs(count=10)
    fs.bare_from = 0
    with pytest.raises(pyfuse3.FUSEError) as exc:
        readdir(fs, monkeypatch, reject_at=100)
    assert exc.value.errno == errno.EMFILE
    assert fs.forgotten == []


def test_readdir_gives_back_dot_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel takes no lookup reference for "." and "..", even when accepted.
    fs = FakeFs(count=5)
    fs.dots = True
    readdir(fs, monkeypatch, reject_at=100)
    assert sorted(fs.forgotten) == [(100, 1), (101, 1)]


def test_readdir_never_offers_after_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    # A filesystem that ignores False: later entries are refused without reaching the
    # kernel (a shorter name might fit and the listing would skip one), and forgotten.
    fs = FakeFs(count=10)
    fs.stop_on_false = False
    fake = readdir(fs, monkeypatch, reject_at=3)
    assert len(fake.calls) == 4
    assert sorted(fs.forgotten) == [(103 + i, 1) for i in range(7)]


def test_readdir_partial_listing_survives_a_late_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeFs(count=10)
    fs.fail_after = 5
    fake = readdir(fs, monkeypatch, reject_at=100)  # no FUSEError: 5 entries are sent
    assert len(fake.calls) == 5
    assert fs.forgotten == []


def test_readdir_error_before_any_entry_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeFs(count=10)
    fs.fail_after = 0
    with pytest.raises(pyfuse3.FUSEError) as ei:
        readdir(fs, monkeypatch, reject_at=100)
    assert ei.value.errno == errno.EIO


def test_forget_swallows_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    fs = FakeFs()
    fs.error = RuntimeError("broken count")
    run(lambda: Bridge(fs).forget([(5, 1)]))  # must not raise: it would end the session
    assert "forget" in caplog.text and "RuntimeError" in caplog.text


def test_access_maps_eacces_to_false() -> None:
    fs = FakeFs()
    bridge = Bridge(fs)
    assert run(lambda: bridge.access(2, 4, CTX)) is True
    fs.access_error = OSError(errno.EACCES, "denied")
    assert run(lambda: bridge.access(2, 4, CTX)) is False
    fs.access_error = OSError(errno.EPERM, "other")

    async def go() -> None:
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await bridge.access(2, 4, CTX)
        assert ei.value.errno == errno.EPERM

    run(go)


def test_unimplemented_is_enosys() -> None:
    async def go() -> None:
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await Bridge(FakeFs()).mkdir(1, b"d", 0o755, CTX)
        assert ei.value.errno == errno.ENOSYS

    run(go)


def test_entry_conversion_keeps_every_field() -> None:
    attr = Attr(st_ino=1234, st_mode=stat.S_IFREG | 0o640, st_nlink=3, st_uid=11, st_gid=22,
                st_rdev=0x0801, st_size=1 << 40, st_blocks=77, st_blksize=8192,
                st_atime_ns=1_700_000_000_123_456_789, st_mtime_ns=1_600_000_000_000_000_001,
                st_ctime_ns=1_500_000_000_999_999_999)
    ea = entry_attributes(Entry(attr, entry_timeout=2.5, attr_timeout=0.5, generation=9))
    assert ea.st_ino == 1234 and ea.generation == 9
    assert ea.entry_timeout == 2.5 and ea.attr_timeout == 0.5
    for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                 "st_blocks", "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        assert getattr(ea, name) == getattr(attr, name), name


def test_open_create_getxattr_conversions() -> None:
    bridge = Bridge(FakeFs())
    fi = run(lambda: bridge.open(2, 0, CTX))
    assert (fi.fh, fi.direct_io, fi.keep_cache, fi.nonseekable) == (77, True, False, True)
    fi, ea = run(lambda: bridge.create(1, b"n", 0o644, 0, CTX))
    assert (fi.fh, fi.keep_cache, ea.st_ino) == (5, True, 9)
    value = run(lambda: bridge.getxattr(2, b"user.x", CTX))
    assert type(value) is bytes and value == b"value"
    assert file_info(OpenReply(fh=3)).keep_cache is False  # ours, not pyfuse3's default


def test_statfs_conversion() -> None:
    st = Statfs(f_bsize=512, f_frsize=1024, f_blocks=10, f_bfree=9, f_bavail=8, f_files=7,
                f_ffree=6, f_favail=5, f_namemax=200)
    d = statvfs_data(st)
    for name in st.__slots__:
        assert getattr(d, name) == getattr(st, name), name


def test_setattr_request_only_flagged_fields() -> None:
    attr = SimpleNamespace(st_mode=0o100600, st_uid=5, st_gid=6, st_size=99,
                           st_atime_ns=111, st_mtime_ns=222, st_ctime_ns=333)
    none = dict(update_mode=False, update_uid=False, update_gid=False, update_size=False,
                update_atime=False, update_mtime=False, update_ctime=False)
    req = setattr_request(attr, SimpleNamespace(**{**none, "update_size": True,
                                                   "update_mtime": True}))
    assert (req.size, req.mtime_ns) == (99, 222)
    assert req.mode is req.uid is req.gid is req.atime_ns is req.ctime_ns is None
    req = setattr_request(attr, SimpleNamespace(**{k: True for k in none}))
    assert (req.mode, req.uid, req.gid, req.atime_ns, req.ctime_ns) == (0o100600, 5, 6, 111, 333)


def test_setattr_request_from_real_pyfuse3_types() -> None:
    ea = pyfuse3.EntryAttributes()
    ea.st_atime_ns = 1_000_000_123
    fields = pyfuse3.SetattrFields.__new__(pyfuse3.SetattrFields)  # all False
    req = setattr_request(ea, fields)
    assert req == type(req)()


def test_capabilities_copied_from_fs() -> None:
    fs = FakeFs()
    fs.enable_writeback_cache = True
    fs.enable_acl = True
    b = Bridge(fs)
    assert b.enable_writeback_cache and b.enable_acl
    assert b.supports_dot_lookup is False


def test_init_calls_fs_init_and_hooks() -> None:
    seen: list[str] = []

    class InitFs(FakeFs):
        def init(self) -> None:
            seen.append("fs")

    b = Bridge(InitFs())
    b.init_hooks.append(lambda: seen.append("hook"))
    b.init()
    assert seen == ["fs", "hook"]


def test_recording_notifier_records_in_order() -> None:
    n = RecordingNotifier()
    n.invalidate_entry(1, b"a", 5)

    async def go() -> None:
        await n.invalidate_inode(5, attr_only=True)

    run(go)
    assert n.calls == [("entry", 1, b"a", 5), ("inode", 5, True)]


def test_readdir_partial_listing_survives_a_bug(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    class BuggyFs(FakeFs):
        async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
            reply(DirEntry(b"a", file_entry(100), 1))
            raise KeyError("bug")

    fs = BuggyFs()
    fake = readdir(fs, monkeypatch, reject_at=100)  # the accepted entry is still sent
    assert len(fake.calls) == 1 and fs.forgotten == []
    assert "KeyError" in caplog.text
