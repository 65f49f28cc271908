"""AttrCache: a stat that began before a local update cannot overwrite the newer values."""

import os

from backingfs.attrs import Attr, AttrCache


def _attr(size: int, mtime: int = 1) -> Attr:
    return Attr(st_ino=5, st_mode=0o100644, st_size=size, st_mtime_ns=mtime, st_ctime_ns=mtime)


def test_fresh_stat_is_accepted() -> None:
    cache = AttrCache()
    v = cache.version
    assert cache.merge(_attr(10), v).st_size == 10
    assert cache.size == 10


def test_stale_stat_cannot_shrink_after_extending_write() -> None:
    cache = AttrCache()
    cache.merge(_attr(10), cache.version)
    v = cache.version  # a getattr starts its fstat here ...
    cache.grow_size(4096)  # ... an extending write completes meanwhile ...
    reported = cache.merge(_attr(10), v)  # ... and the old stat arrives
    assert reported.st_size == 4096
    assert cache.merge(_attr(4096, 2), cache.version).st_size == 4096


def test_grow_only_grows_and_truncate_sets() -> None:
    cache = AttrCache()
    versions = [cache.version]
    for pos in (100, 50, 300):
        cache.grow_size(pos)
        versions.append(cache.version)
    assert cache.size == 300
    cache.set_size(7)
    versions.append(cache.version)
    assert cache.size == 7
    assert versions == sorted(set(versions))


def test_copyattr_takes_backing_values(tmp_path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 123)
    cache = AttrCache()
    cache.copyattr(os.stat(p))
    assert (cache.size, cache.mode) == (123, os.stat(p).st_mode)
    assert Attr.from_stat(os.stat(p), ino=9).st_ino == 9
