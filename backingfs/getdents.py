"""getdents64 from a directory offset: the backing filesystem's own listing cookies.

``os.scandir`` neither starts at an offset nor reports ``d_off``. A listing that resumes
at a cookie the backing filesystem gave out (its ``telldir`` value: a hash on ext4, a
position on tmpfs) needs both: seek the directory fd to the cookie, read on, and hand out
each entry's own ``d_off`` as the offset that resumes after it. That is what makes a
directory listable without a handle (the native session's FUSE_NO_OPENDIR_SUPPORT, see
``fsapi.Filesystem.handleless_dirs``): the offsets mean the same thing in every call, and
they stay valid while the directory changes exactly as the backing filesystem's do.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Iterator
from typing import NamedTuple

from .syscalls import libc

#: getdents64 by number (glibc has no wrapper before 2.30, and ctypes needs none).
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}.get(platform.machine())
# struct linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, char d_name[].
_HEAD = struct.Struct("=QqHB")

#: Bytes asked of the kernel per call: about a hundred short names, a little more than a
#: FUSE reply page of readdirplus entries, so a resumed listing reads little it drops.
BUFSIZE = 8192


class Dirent(NamedTuple):
    name: bytes
    ino: int
    dtype: int  # DT_* (the S_IFMT bits >> 12), DT_UNKNOWN = 0
    next_off: int  # the cookie to seek to for the entries after this one


def supported() -> bool:
    return _SYS_GETDENTS64 is not None


def iter_from(fd: int, off: int, bufsize: int = BUFSIZE) -> Iterator[Dirent]:
    """The entries of the directory open on ``fd`` (O_RDONLY|O_DIRECTORY, not shared)
    after cookie ``off`` (0: from the start), ``.`` and ``..`` included, in the backing
    filesystem's order. Reads lazily, ``bufsize`` bytes at a time. Raises OSError."""
    if _SYS_GETDENTS64 is None:
        raise OSError(95, f"getdents64 not known on {platform.machine()}")
    if off:
        os.lseek(fd, off, os.SEEK_SET)
    buf = ctypes.create_string_buffer(bufsize)
    while True:
        n = libc.syscall(_SYS_GETDENTS64, fd, buf, bufsize)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"getdents64: {os.strerror(err)}")
        if n == 0:
            return
        data = buf.raw[:n]
        pos = 0
        while pos < n:
            ino, next_off, reclen, dtype = _HEAD.unpack_from(data, pos)
            start = pos + _HEAD.size
            end = data.index(b"\0", start, pos + reclen)
            yield Dirent(data[start:end], ino, dtype, next_off)
            pos += reclen
