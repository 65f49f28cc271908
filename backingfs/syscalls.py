"""Syscalls Python's os module lacks or hides, for objects reached through O_PATH fds.

Both filesystems reach backing objects by O_PATH fds and ``*at`` calls relative to a parent
fd with O_NOFOLLOW (DESIGN §2), so a symlink in a source or layer never leads outside it.
Operations that need a real open or a path use the fd's ``/proc/self/fd/N`` magic link,
*followed*: following it lands on the fd's own object and stops there, even when that
object is a symlink.

All functions block (call them from a worker when they may touch the disk) and raise
OSError with the syscall's errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct


def _load_libc() -> ctypes.CDLL:
    # find_library("c") runs `ldconfig -p` in a subprocess: a fork of the daemon, which
    # must not happen at mount or unmount (a signal in that window hit trio's closed
    # wakeup fd). glibc's soname is fixed; the lookup is only a fallback.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


libc = _load_libc()
_libc = libc

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint]

#: sync_file_range(2): start writeback of the dirty pages of the range, do not wait.
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the range's dirty pages to disk without waiting (a later fsync then
    finds most of them done)."""
    _check(_libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE),
           "sync_file_range")


def _check(ret: int, what: str, name: bytes | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)


def proc_path(fd: int) -> str:
    """The magic link of ``fd``; follow it to act on the fd's own object."""
    return f"/proc/self/fd/{fd}"


def open_path(dir_fd: int, name: bytes) -> int:
    """``openat(dir_fd, name, O_PATH|O_NOFOLLOW)``: the object itself, never a symlink's target.

    ``name`` must be one path component; ``/`` in it is EINVAL (no walk can leave the tree).
    """
    check_name(name)
    return os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd)


def check_name(name: bytes) -> None:
    """Refuse names that are not a single component (the kernel never sends them)."""
    if not name or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "invalid name", name)
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long", name)


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    """renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    _check(_libc.renameat2(old_dir, old, new_dir, new, flags), "renameat2", old)


def utimens(fd: int, atime_ns: int | None, mtime_ns: int | None, *, now: bool = False) -> None:
    """Set the times of the object behind (O_PATH) ``fd``; ``None`` leaves one alone
    (UTIME_OMIT), which ``os.utime`` cannot express. Works on symlinks too. ``now``: the
    times not None are set to the current time (UTIME_NOW), which an append-only file
    allows and explicit times it refuses."""
    def ts(ns: int | None) -> _Timespec:
        if ns is None:
            return _Timespec(0, UTIME_OMIT)
        if now:
            return _Timespec(0, UTIME_NOW)
        return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)

    times = (_Timespec * 2)(ts(atime_ns), ts(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), "utimensat")


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, ...), which
    ``os.posix_fallocate`` cannot pass."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def reopen(fd: int, flags: int, mode: int = 0) -> int:
    """Open the object behind an O_PATH ``fd`` with real access ``flags`` (never O_CREAT)."""
    return os.open(proc_path(fd), (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))
                   | os.O_CLOEXEC, mode)


def fstat(fd: int) -> os.stat_result:
    """fstat that also works on O_PATH fds of symlinks (fstatat AT_EMPTY_PATH)."""
    return os.stat(fd)


#: statfs f_type of filesystems whose close(2) may report a write error (data is sent to
#: a server or another daemon at close). FLUSH is worth serving only for these; elsewhere a
#: filesystem answers ENOSYS once and the kernel stops sending FLUSH (one round trip fewer
#: per close; dirty writeback-cache pages are still written at close).
CLOSE_REPORTS_ERRORS = frozenset({
    0x6969,  # nfs
    0x65735546,  # fuse
    0xFF534D42,  # cifs
    0xFE534D42,  # smb2
    0x517B,  # smb
    0x00C36400,  # ceph
    0x01021997,  # 9p
    0x6B414653, 0x5346414F,  # afs
})


def fs_type(fd: int) -> int | None:
    """statfs ``f_type`` of the filesystem holding ``fd`` (O_PATH fine); None on error.

    ``os.statvfs`` does not report it. ``f_type`` is the first member of struct statfs,
    a native long on Linux."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every arch
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


#: ``stx_attributes`` bits (linux/stat.h): chattr's +i and +a.
STATX_ATTR_IMMUTABLE = 0x10
STATX_ATTR_APPEND = 0x20
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.c_char_p]


#: ``stx_mask`` bit of the birth time (linux/stat.h).
STATX_BTIME = 0x800
_STX_MASK = struct.Struct("=I")
_STX_ATTRIBUTES = struct.Struct("=Q")          # after stx_mask, stx_blksize
_STX_BTIME = struct.Struct("=qI")              # stx_btime: tv_sec, tv_nsec (offset 80)


def _statx(fd: int, path: bytes, flags: int, mask: int) -> bytes:
    buf = ctypes.create_string_buffer(256)  # struct statx
    _check(_libc.statx(fd, path, flags, mask, buf), "statx")
    return buf.raw


def statx_attributes(fd: int) -> int:
    """``stx_attributes`` of the object of ``fd`` (O_PATH fine): STATX_ATTR_* bits such as
    IMMUTABLE and APPEND, which stat(2) does not report and FS_IOC_GETFLAGS needs a real
    open for (not possible on a fifo or device without side effects)."""
    raw = _statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, 0)
    return _STX_ATTRIBUTES.unpack_from(raw, 8)[0]


def birth_time_ns(fd: int, path: bytes = b"",
                  flags: int = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW,
                  mask: int = STATX_BTIME) -> int | None:
    """The birth time (ns) of ``path`` under ``fd`` (by default the object of ``fd`` itself,
    O_PATH fine, never following a symlink), or None where its filesystem keeps none
    (FAT, FUSE without FUSE_STATX...). Python 3.11's ``os.stat`` does not report it.
    ``mask``: what statx(2) is asked for (a FUSE mount answers a request for the birth
    time alone from its cache while that holds one, even if the other attributes are
    stale)."""
    raw = _statx(fd, path, flags, mask)
    if not _STX_MASK.unpack_from(raw)[0] & STATX_BTIME:
        return None
    sec, nsec = _STX_BTIME.unpack_from(raw, 80)
    return sec * 1_000_000_000 + nsec


def close_reports_errors(fd: int) -> bool:
    """Whether close(2) on the filesystem holding ``fd`` may report a write error."""
    return fs_type(fd) in CLOSE_REPORTS_ERRORS
