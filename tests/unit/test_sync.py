"""sync: fsync/fdatasync dispatch, the policy's dropped flags, volatile's sticky error."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from backingfs import sync
from backingfs.flags import SYNC_FLAGS, IocbFlags
from backingfs.sync import SyncPolicy, fsync


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(sync.os, "fsync", lambda fd: seen.append(("fsync", fd)))
    monkeypatch.setattr(sync.os, "fdatasync", lambda fd: seen.append(("fdatasync", fd)))
    return seen


def test_fsync_dispatch(calls: list[tuple[str, int]]) -> None:
    fsync(7, False, volatile=False)
    fsync(8, True, volatile=False)
    fsync(9, False, volatile=True)
    fsync(9, True, volatile=True)
    assert calls == [("fsync", 7), ("fdatasync", 8)]


def test_fsync_real_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        fsync(fd, False, volatile=False)
        fsync(fd, True, volatile=False)
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as exc:
        fsync(r, False, volatile=False)
    assert exc.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("do_fsync", "volatile", "syncing"),
    [(True, False, True), (False, False, False), (True, True, False), (False, True, False)],
)
def test_drop_flags(do_fsync: bool, volatile: bool, syncing: bool) -> None:
    policy = SyncPolicy(fsync=do_fsync, volatile=volatile)
    assert policy.is_syncing is syncing
    assert policy.drop_flags == (IocbFlags.NONE if syncing else SYNC_FLAGS)
    assert policy.drop_flags == IocbFlags.NONE or policy.drop_flags == (
        IocbFlags.DSYNC | IocbFlags.SYNC
    )


def test_policy_sync_calls_through_only_when_syncing(calls: list[tuple[str, int]]) -> None:
    SyncPolicy().sync(3, False)
    SyncPolicy().sync(4, True)
    SyncPolicy(fsync=False).sync(5, False)
    SyncPolicy(volatile=True).sync(6, True)
    assert calls == [("fsync", 3), ("fdatasync", 4)]


def test_volatile_remembers_first_error(calls: list[tuple[str, int]]) -> None:
    policy = SyncPolicy(volatile=True)
    policy.sync(3, False)  # no error yet: succeeds without syncing
    policy.record_error(errno.ENOSPC)
    policy.record_error(errno.EIO)  # only the first counts
    assert policy.error == errno.ENOSPC
    for datasync in (False, True, False):
        with pytest.raises(OSError) as exc:
            policy.sync(3, datasync)
        assert exc.value.errno == errno.ENOSPC
    assert calls == []


def test_record_error_ignored_without_volatile(calls: list[tuple[str, int]]) -> None:
    policy = SyncPolicy()
    policy.record_error(errno.EIO)
    assert policy.error is None
    policy.sync(3, False)
    assert calls == [("fsync", 3)]


def test_record_error_first_wins_across_threads() -> None:
    policy = SyncPolicy(volatile=True)
    barrier = threading.Barrier(8)

    def worker(err: int) -> None:
        barrier.wait()
        policy.record_error(err)

    threads = [threading.Thread(target=worker, args=(e,)) for e in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert policy.error in range(1, 9)
    with pytest.raises(OSError) as exc:
        policy.check_error()
    assert exc.value.errno == policy.error
