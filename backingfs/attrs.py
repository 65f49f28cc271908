"""Attr (a plain stat record) and AttrCache (versioned size/mtime/ctime/mode of a stacked inode).

The cache is what overlay's ``copyattr`` and passthru's size update write into. Its version
is FUSE's ``attr_version``: a getattr that started before a local update (an extending
write's ``end_write``, a truncate) must not overwrite the newer values with its older stat.
So a getattr takes ``version()`` before its ``fstat`` and hands both to ``merge()``.

Not thread-safe by design: it is touched only on the trio loop thread (queued write
completions are punted there), which is what serialises attribute updates.
"""

from __future__ import annotations

import os
import stat as stat_mod
from typing import NamedTuple


class Attr(NamedTuple):
    """What a stat reports, in plain types; times in nanoseconds.

    A NamedTuple rather than a frozen dataclass: one is built for every entry of every
    lookup and readdirplus reply, and a tuple is several times cheaper to make.
    """

    st_ino: int
    st_mode: int
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blocks: int = 0
    st_blksize: int = 4096
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int | None = None) -> Attr:
        return cls(st.st_ino if ino is None else ino, st.st_mode, st.st_nlink, st.st_uid,
                   st.st_gid, st.st_rdev, st.st_size, st.st_blocks, st.st_blksize,
                   st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def replace(self, **changes: int) -> Attr:
        return self._replace(**changes)

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.st_mode)

    @property
    def is_reg(self) -> bool:
        return stat_mod.S_ISREG(self.st_mode)


class AttrCache:
    """Size, mtime, ctime and mode of one stacked inode, with a version.

    Every local update bumps ``version``; ``merge(attr, version)`` accepts a stat result
    only if no update happened since ``version`` was read, and otherwise overlays the
    cached (newer) fields on it. Sizes only grow through ``grow_size``; ``set_size`` is the
    explicit truncate.
    """

    __slots__ = ("version", "size", "mtime_ns", "ctime_ns", "mode", "valid")

    def __init__(self) -> None:
        self.version = 0
        self.valid = False  # nothing cached yet: any stat is accepted
        self.size = 0
        self.mtime_ns = 0
        self.ctime_ns = 0
        self.mode = 0

    def _store(self, size: int, mtime_ns: int, ctime_ns: int, mode: int) -> None:
        self.size, self.mtime_ns, self.ctime_ns, self.mode = size, mtime_ns, ctime_ns, mode
        self.valid = True

    def grow_size(self, pos: int) -> None:
        """After an extending write ended at ``pos`` (passthru's end_write)."""
        self.version += 1
        if pos > self.size:
            self.size = pos

    def set_size(self, size: int) -> None:
        """After a truncate to ``size``."""
        self.version += 1
        self.size = size

    def copyattr(self, st: os.stat_result) -> None:
        """Copy size, mtime, ctime and mode from a fresh stat of the backing inode
        (overlay's end_write, the kernel's ovl_copyattr). Callers hold the inode's lock."""
        self.version += 1
        self._store(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    def invalidate(self) -> None:
        """Forget the cached values (the backing inode changed in ways we did not see)."""
        self.version += 1
        self.valid = False

    def merge(self, attr: Attr, version: int) -> Attr:
        """The attributes to report, given a stat result taken after ``version()``."""
        if version == self.version or not self.valid:
            self._store(attr.st_size, attr.st_mtime_ns, attr.st_ctime_ns, attr.st_mode)
            return attr
        # A local update raced the stat: the cached fields are newer than the stat's.
        return attr.replace(
            st_size=self.size,
            st_mtime_ns=max(self.mtime_ns, attr.st_mtime_ns),
            st_ctime_ns=max(self.ctime_ns, attr.st_ctime_ns),
            st_mode=self.mode if self.mode else attr.st_mode,
        )
