"""lsattr(1) and chattr(1) through the overlay, as the kernel's ``ovl_fileattr_get`` and
``ovl_fileattr_set`` do them.

- Reading: the attributes of the object holding the data now (upper, else the top
  lower), plus the +i/+a the overlay keeps for an upper copy (protattr.py), which its
  upper object never carries.
- Changing: the object is copied up first; +i and +a go to ``<prefix>protattr`` on the
  upper copy, never to the upper object (its later copy-ups, links and xattr changes by
  the daemon would fail), the rest to the upper object itself.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

from backingfs import fileattr as bfileattr
from backingfs.fileattr import FileAttr

from . import protattr
from .copyup import copy_up
from .inode import check_writable, tell_twin

if TYPE_CHECKING:
    from .entry import OvlInode
    from .superblock import Superblock


def _prot_bits(attr: FileAttr, prot: int) -> int:
    """``prot`` (protattr's IMMUTABLE/APPEND) as bits of ``attr``'s form."""
    return ((attr.immutable if prot & protattr.IMMUTABLE else 0)
            | (attr.append if prot & protattr.APPEND else 0))


async def lsattr(sb: Superblock, inode: OvlInode, fsx: bool) -> FileAttr:
    attr = bfileattr.get_at(inode.data_fd(), stat.S_IFMT(inode.mode), fsx)
    return attr.with_flags(attr.flags | _prot_bits(attr, protattr.flags(sb, inode)))


async def chattr(sb: Superblock, inode: OvlInode, attr: FileAttr) -> None:
    check_writable(sb)
    fmt = stat.S_IFMT(inode.mode)
    if fmt not in (stat.S_IFREG, stat.S_IFDIR):  # before any copy-up
        raise OSError(errno.ENOTTY, "file attributes are for regular files and directories")
    await copy_up(sb, inode)
    async with inode.lock:
        assert inode.upper is not None
        protattr.store(sb, inode, (protattr.IMMUTABLE if attr.flags & attr.immutable else 0)
                       | (protattr.APPEND if attr.flags & attr.append else 0))
        bfileattr.set_at(inode.upper, fmt,
                         attr.with_flags(attr.flags & ~(attr.immutable | attr.append)))
        inode.attrs.invalidate()
    if sb.notifier is not None:  # the new ctime: the kernel keeps attributes for long
        await sb.notifier.invalidate_inode(inode.ino, attr_only=True)
    await tell_twin(sb, inode)
