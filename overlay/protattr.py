"""Immutable and append-only objects (chattr +i/+a) of the lower layers, as the kernel's
overlayfs enforces them (its ``ovl_copyflags``, ``OVL_XATTR_PROTATTR``).

The kernel's VFS refuses changes to such an inode before any filesystem code runs
(``may_open``, ``notify_change``, ``may_delete``, ``vfs_link``, ``xattr_permission``), but
a FUSE inode carries no such flags, and the daemon works on the layers as root: a lower
file with +i would be copied up and changed. So the overlay checks them itself, with the
same outcome (EPERM) and no copy-up:

- an object with no upper copy: the flags of its lower object (statx ``stx_attributes``,
  once per inode: lower layers do not change under a mount);
- one with an upper object: the flags a copy-up recorded in ``<prefix>protattr`` on it,
  in the kernel's format (``"a"``, ``"i"``), read once per inode (one getxattr at the
  first change, none for an object made through this mount: ``mark_new``). Flags set
  on an upper object itself are the upper filesystem's to enforce, and it does, for the
  daemon too.

Not covered: an upper object made by our overlay over a lower protected one is never
changed, so the record matters only after an allowed copy-up (an O_APPEND open of a +a
file, a create in a +a directory). On the pyfuse3 front-end ``touch`` of a +a file is
refused like explicit times: libfuse hands UTIME_NOW over already resolved.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING

from backingfs import xattrs as bxattrs
from backingfs.syscalls import STATX_ATTR_APPEND, STATX_ATTR_IMMUTABLE, statx_attributes

if TYPE_CHECKING:
    from .entry import OvlInode
    from .superblock import Superblock

IMMUTABLE = STATX_ATTR_IMMUTABLE
APPEND = STATX_ATTR_APPEND
PROTECTED = IMMUTABLE | APPEND
FALLOC_FL_KEEP_SIZE = 0x01
_CHARS = ((APPEND, b"a"), (IMMUTABLE, b"i"))


def xattr_name(sb: Superblock) -> bytes:
    return sb.prefix + b"protattr"


def of_fd(fd: int) -> int:
    """The IMMUTABLE/APPEND bits of the object of ``fd`` (0 where statx cannot tell)."""
    try:
        return statx_attributes(fd) & PROTECTED
    except OSError:
        return 0


def encode(flags: int) -> bytes:
    return b"".join(c for bit, c in _CHARS if flags & bit)


def decode(value: bytes) -> int:
    return sum(bit for bit, c in _CHARS if c in value)


def flags(sb: Superblock, inode: OvlInode) -> int:
    """IMMUTABLE/APPEND of ``inode`` as the kernel's overlayfs would see them."""
    if inode.prot is not None:
        return inode.prot
    if inode.upper is None:
        prot = of_fd(inode.lowers[0].fd) if inode.lowers else 0
    else:  # the kernel reads it at every upper inode's instantiation (ovl_check_protattr)
        prot = 0
        with contextlib.suppress(OSError):
            prot = decode(bxattrs.fgetxattr(inode.upper, xattr_name(sb)))
    inode.prot = prot
    return prot


def mark_new(inode: OvlInode) -> None:
    """``inode`` was just made through the mount: nothing protects it."""
    inode.prot = 0


def record(sb: Superblock, src_fd: int, dst_fd: int) -> None:
    """At a copy-up: keep the lower object's flags on its upper copy (``dst_fd``), in the
    kernel's xattr. Not on the upper object itself, as the kernel does not either: the
    copy-up's own metadata steps, and every later allowed change, would fail."""
    prot = of_fd(src_fd)
    if prot:
        with contextlib.suppress(OSError):
            bxattrs.fsetxattr(dst_fd, xattr_name(sb), encode(prot))


def _refuse(what: str) -> OSError:
    return OSError(errno.EPERM, f"{what}: immutable or append-only (chattr)")


def check_change(sb: Superblock, inode: OvlInode) -> None:
    """A change of metadata or xattrs (``notify_change``, ``xattr_permission``)."""
    if flags(sb, inode) & PROTECTED:
        raise _refuse("change")


def check_open(sb: Superblock, inode: OvlInode, open_flags: int) -> None:
    """``may_open``: no write and no O_TRUNC on +i; on +a writes only with O_APPEND."""
    prot = flags(sb, inode)
    if not prot:
        return
    writes = open_flags & os.O_ACCMODE != os.O_RDONLY
    if prot & IMMUTABLE and (writes or open_flags & os.O_TRUNC):
        raise _refuse("open for writing")
    if prot & APPEND and (open_flags & os.O_TRUNC or (writes and not open_flags & os.O_APPEND)):
        raise _refuse("open for writing without O_APPEND")


def check_setattr(sb: Superblock, inode: OvlInode, *, times_now: bool) -> None:
    """``notify_change``: nothing on +i; on +a only the times, set to the current time
    (touch(1); ``times_now`` is False on the pyfuse3 front-end, which cannot tell)."""
    prot = flags(sb, inode)
    if prot & IMMUTABLE or (prot & APPEND and not times_now):
        raise _refuse("setattr")


def check_fallocate(sb: Superblock, inode: OvlInode, mode: int) -> None:
    """``vfs_fallocate``, at every call (the handle may predate the flag): nothing on +i;
    on +a only an allocation that keeps the size, which changes no byte."""
    prot = flags(sb, inode)
    if prot & IMMUTABLE or (prot & APPEND and mode & ~FALLOC_FL_KEEP_SIZE):
        raise _refuse("fallocate")


def check_add(sb: Superblock, parent: OvlInode) -> None:
    """A new name in ``parent`` (``may_create``: write permission, EPERM on +i)."""
    if flags(sb, parent) & IMMUTABLE:
        raise _refuse("create in directory")


def check_remove(sb: Superblock, parent: OvlInode, victim: OvlInode | None) -> None:
    """A name taken from ``parent`` (``may_delete``): EPERM when the directory or the object
    is +i or +a."""
    if flags(sb, parent) & PROTECTED or (victim is not None and flags(sb, victim) & PROTECTED):
        raise _refuse("remove")


def store(sb: Superblock, inode: OvlInode, prot: int) -> None:
    """chattr through the mount: the +i/+a of ``inode``'s upper copy become ``prot``, kept
    in the xattr (set when any, removed when none), as the kernel's ``ovl_set_protattr``.
    An upper layer without xattrs cannot keep them: EPERM, as the kernel."""
    assert inode.upper is not None
    if prot:
        try:
            bxattrs.fsetxattr(inode.upper, xattr_name(sb), encode(prot))
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            raise OSError(errno.EPERM, "upper layer has no xattrs for chattr +i/+a") from e
    elif flags(sb, inode) & PROTECTED:
        try:
            bxattrs.fremovexattr(inode.upper, xattr_name(sb))
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
    inode.prot = prot
