"""POSIX ACLs in their xattr form: what a new object inherits from its directory.

With FUSE_POSIX_ACL the kernel enforces ACLs itself (it reads ``system.posix_acl_access``
through GETXATTR and caches it), but inheritance is the filesystem's job: the kernel sends
the requested mode and, with FUSE_DONT_MASK, the caller's umask unapplied, and a native
filesystem would now do what ``posix_acl_create`` does (fs/posix_acl.c):

* the directory has no default ACL: ``mode & ~umask``, no ACL;
* it has one: the umask is ignored; the new object's access ACL is the default ACL with
  each class's permissions cut down to the requested mode, and the mode's group bits to the
  mask (``posix_acl_create_masq``); a directory also inherits the default ACL itself.

A backing object made directly in the backing directory gets all of this from the backing
filesystem (when the daemon applies no umask of its own); :func:`inherit` computes it for
an object made elsewhere (overlay's work directory) or to know the mode it will get.

The xattr value (``posix_acl_xattr_header``/``_entry``): a little-endian u32 version 2,
then per entry u16 tag, u16 perm, u32 id, sorted by tag then id.
"""

from __future__ import annotations

import errno
import struct

from . import xattrs as bxattrs

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

USER_OBJ = 0x01
USER = 0x02
GROUP_OBJ = 0x04
GROUP = 0x08
MASK = 0x10
OTHER = 0x20

Entry = tuple[int, int, int]  # (tag, perm, id)


def parse(value: bytes) -> list[Entry]:
    """The entries of an ACL xattr value. Raises OSError: EINVAL for a malformed value,
    EOPNOTSUPP for another version than 2."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EINVAL, "malformed ACL xattr")
    if _HEADER.unpack_from(value)[0] != VERSION:
        raise OSError(errno.EOPNOTSUPP, "unknown ACL xattr version")
    return [e for e in _ENTRY.iter_unpack(value[_HEADER.size:])]  # type: ignore[misc]


def serialize(entries: list[Entry]) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def create_masq(entries: list[Entry], mode: int) -> tuple[list[Entry], int, bool]:
    """``posix_acl_create_masq``: the access ACL and mode of a new object made with
    ``mode`` under a directory whose default ACL is ``entries``; and whether that ACL says
    more than the mode does (named users or groups, or a mask), i.e. must be stored.
    Raises OSError(EIO) on an ACL without its required entries, as the kernel does."""
    out = list(entries)
    perms = mode & 0o777
    not_equiv = False
    group_obj = mask_obj = -1
    for i, (tag, perm, eid) in enumerate(out):
        if tag == USER_OBJ:
            perm &= (perms >> 6) & 7
            perms &= (perm << 6) | ~0o700
        elif tag in (USER, GROUP):
            not_equiv = True
        elif tag == GROUP_OBJ:
            group_obj = i
        elif tag == OTHER:
            perm &= perms & 7
            perms &= perm | ~0o007
        elif tag == MASK:
            mask_obj = i
            not_equiv = True
        else:
            raise OSError(errno.EIO, f"ACL entry with unknown tag {tag:#x}")
        out[i] = (tag, perm, eid)
    cut = mask_obj if mask_obj >= 0 else group_obj
    if cut < 0:
        raise OSError(errno.EIO, "ACL without a group or mask entry")
    tag, perm, eid = out[cut]
    perm &= (perms >> 3) & 7
    perms &= (perm << 3) | ~0o070
    out[cut] = (tag, perm, eid)
    return out, (mode & ~0o777) | (perms & 0o777), not_equiv


def default_acl(fd: int) -> bytes | None:
    """The default ACL xattr of the directory of ``fd`` (O_PATH allowed), or None when it
    has none (or its filesystem has no ACLs)."""
    try:
        value = bxattrs.fgetxattr(fd, DEFAULT)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    return value or None


def inherit(dir_default: bytes, mode: int, is_dir: bool
            ) -> tuple[int, bytes | None, bytes | None]:
    """``posix_acl_create`` for a directory whose default ACL is ``dir_default``: the new
    object's mode, its access ACL xattr (None: the mode says it all) and, for a directory,
    its default ACL xattr."""
    entries, new_mode, not_equiv = create_masq(parse(dir_default), mode)
    return (new_mode, serialize(entries) if not_equiv else None,
            dir_default if is_dir else None)


def create_mode(parent_fd: int, mode: int, umask: int) -> int:
    """The mode to make an object with in the backing directory ``parent_fd`` (the backing
    filesystem then inherits its default ACL itself, the daemon's own umask being 0):
    ``mode`` untouched under a default ACL, else ``mode & ~umask``. No syscall when the
    umask would change nothing."""
    if not mode & umask & 0o777 or default_acl(parent_fd) is not None:
        return mode
    return mode & ~(umask & 0o777)


def supported(fd: int) -> bool:
    """Whether the filesystem of ``fd`` keeps POSIX ACLs (mounted without ``noacl``, a
    type that has them): without, asking the kernel to enforce them would only cost a
    GETXATTR round trip per inode and refresh for nothing."""
    try:
        bxattrs.fgetxattr(fd, ACCESS)
    except OSError as e:
        return e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP)
    return True
