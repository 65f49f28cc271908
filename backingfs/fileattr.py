"""chattr(1)'s file attributes (the kernel's "fileattr": FS_IOC_GETFLAGS/SETFLAGS and
FS_IOC_FSGETXATTR/FSSETXATTR) on backing objects.

A FUSE mount gets them as FUSE_IOCTL: the kernel's ``fuse_fileattr_get``/``_set`` open the
inode (O_RDONLY, regular files and directories only), send the one ioctl in the form the
caller used, and release. The VFS has checked the caller already (owner or
CAP_FOWNER; CAP_LINUX_IMMUTABLE to change +i/+a), so the daemon applies the change with
its own rights. ``FileAttr`` keeps the form, as the kernel's ``struct fileattr`` does, so
that a filesystem which adjusts some bits (overlay: +i/+a live in an xattr) can do it in
either form with the same code.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import NamedTuple

from .syscalls import reopen

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820

#: The flags word is a C int whatever the ioctl number's "long" says (the kernel and
#: e2fsprogs both pass an int).
FLAGS = struct.Struct("=I")
#: struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 bytes of padding.
FSXATTR = struct.Struct("=IIIII8x")

# FS_IOC_GETFLAGS bits and their FS_IOC_FSGETXATTR twins, for the flags treated apart.
FS_SYNC_FL = 0x8
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
FS_NOATIME_FL = 0x80
FS_XFLAG_IMMUTABLE = 0x8
FS_XFLAG_APPEND = 0x10
FS_XFLAG_SYNC = 0x20
FS_XFLAG_NOATIME = 0x40


class FileAttr(NamedTuple):
    """One object's attributes in the form the caller used: ``fsx`` None for the flags word
    of FS_IOC_GETFLAGS (in ``flags``), else the other fields of a struct fsxattr (extsize,
    nextents, projid, cowextsize) with ``flags`` its fsx_xflags."""

    flags: int
    fsx: tuple[int, int, int, int] | None = None

    @classmethod
    def unpack(cls, data: bytes, fsx: bool) -> FileAttr:
        if not fsx:
            return cls(FLAGS.unpack_from(data)[0])
        xflags, *rest = FSXATTR.unpack_from(data)
        return cls(xflags, (rest[0], rest[1], rest[2], rest[3]))

    def pack(self) -> bytes:
        if self.fsx is None:
            return FLAGS.pack(self.flags)
        return FSXATTR.pack(self.flags, *self.fsx)

    def _bits(self, fl: int, xfl: int) -> int:
        return xfl if self.fsx is not None else fl

    @property
    def immutable(self) -> int:
        return self._bits(FS_IMMUTABLE_FL, FS_XFLAG_IMMUTABLE)

    @property
    def append(self) -> int:
        return self._bits(FS_APPEND_FL, FS_XFLAG_APPEND)

    @property
    def copied_up(self) -> int:
        """The bits the kernel's overlayfs copies to an upper object (``ovl_copy_fileattr``):
        sync and noatime."""
        return self._bits(FS_SYNC_FL | FS_NOATIME_FL, FS_XFLAG_SYNC | FS_XFLAG_NOATIME)

    def with_flags(self, flags: int) -> FileAttr:
        return self._replace(flags=flags & 0xFFFFFFFF)


def getflags_fd(fd: int, fsx: bool = False) -> FileAttr:
    """The attributes of the object open as ``fd`` (a real open: ioctls refuse O_PATH)."""
    if fsx:
        return FileAttr.unpack(fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(FSXATTR.size)), True)
    return FileAttr.unpack(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(FLAGS.size)), False)


def setflags_fd(fd: int, attr: FileAttr) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS if attr.fsx is None else FS_IOC_FSSETXATTR, attr.pack())


def open_for_ioctl(path_fd: int, fmt: int) -> int:
    """A real fd of the object behind O_PATH ``path_fd`` (a regular file or a directory):
    read-only, which is all these ioctls ask, and never blocking or becoming a tty."""
    if fmt not in (stat.S_IFREG, stat.S_IFDIR):
        raise OSError(errno.ENOTTY, "file attributes are for regular files and directories")
    return reopen(path_fd, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
                  | (os.O_DIRECTORY if fmt == stat.S_IFDIR else 0))


def get_at(path_fd: int, fmt: int, fsx: bool) -> FileAttr:
    fd = open_for_ioctl(path_fd, fmt)
    try:
        return getflags_fd(fd, fsx)
    finally:
        os.close(fd)


def set_at(path_fd: int, fmt: int, attr: FileAttr) -> None:
    fd = open_for_ioctl(path_fd, fmt)
    try:
        setflags_fd(fd, attr)
    finally:
        os.close(fd)


def copy_up_flags(src_fd: int, dst_fd: int) -> None:
    """At a copy-up: give ``dst_fd`` the sync and noatime flags of ``src_fd`` (both real
    fds), as the kernel's overlayfs does; the rest (+i/+a aside) stay the upper
    filesystem's defaults. Best effort, where the kernel fails the copy-up: an upper
    filesystem without these flags still takes the copy, as fuse-overlayfs's does."""
    try:
        src = getflags_fd(src_fd)
        if src.flags & src.copied_up:
            dst = getflags_fd(dst_fd)
            setflags_fd(dst_fd, dst.with_flags((dst.flags & ~dst.copied_up)
                                               | (src.flags & src.copied_up)))
    except OSError:
        pass
