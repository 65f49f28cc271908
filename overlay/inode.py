"""Inode operations: getattr/setattr/access/readlink/xattrs/statfs, st_ino and nlink.

Attributes come from the backing object that holds the data now (upper once copied up,
else the top lower), with the overlay's identity: ``st_ino`` is the inode's persistent
number (namei.py), the one st_dev is the FUSE mount's; merged directories report nlink 1
(reference §B.12; every directory does with ``static_nlink``). The attribute cache
(``inode.attrs``) is merged in so a stat racing a write's copyattr cannot go backwards.

Every change copies the object up first (copyup.py), then applies to the upper object
under ``inode.lock``. Overlay-private xattrs are invisible (xattrs.py). With no upper
layer every change is EROFS.

Ownership options (idmap.py: id mapping, squashing, owner/mode in xattrs) apply at this
boundary: ``make_entry`` for every attribute going out, ``setattr`` for owner and mode
coming in, and the ACL xattrs' ids both ways.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import TYPE_CHECKING

from backingfs import privs
from backingfs import xattrs as bxattrs
from backingfs.attrs import Attr
from backingfs.creds import check_access
from backingfs.fsapi import Caller, Entry, SetattrRequest, Statfs
from backingfs.setattr import setattr_backing
from backingfs.syscalls import proc_path

from . import protattr
from . import xattrs as oxattrs
from .copyup import copy_up
from .entry import OvlInode

if TYPE_CHECKING:
    from .superblock import Superblock


def check_writable(sb: Superblock) -> None:
    if sb.is_read_only:
        raise OSError(errno.EROFS, "read-only overlay (no upperdir)")


def make_attr(sb: Superblock, inode: OvlInode, st: os.stat_result) -> Attr:
    nlink = st.st_nlink
    if inode.is_dir and (inode.is_merged or sb.params.static_nlink):
        nlink = 1
    # Built in one go (not from_stat().replace()): one runs for every entry listed.
    return Attr(inode.st_ino, st.st_mode, nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


def data_layer_index(inode: OvlInode) -> int:
    layer = inode.data_layer()
    return 0 if layer is None else layer.index


def make_entry(sb: Superblock, inode: OvlInode, st: os.stat_result | None = None) -> Entry:
    """The entry reply for ``inode`` (``st``: a fresh stat of its data object, if known)."""
    version = inode.attrs.version
    if st is None:
        st = os.fstat(inode.data_fd())
    attr = inode.attrs.merge(make_attr(sb, inode, st), version)
    owners = sb.owners
    if owners is not None:  # after the merge: the cache holds the backing inode's values
        attr = owners.attr_out(attr, inode.data_fd(), data_layer_index(inode))
    timeout = sb.params.timeout
    return Entry(attr, entry_timeout=timeout, attr_timeout=timeout,
                 node=inode.ino if inode.st_ino != inode.ino else 0)


async def getattr(sb: Superblock, inode: OvlInode) -> Entry:
    return make_entry(sb, inode)


async def setattr(sb: Superblock, inode: OvlInode, changes: SetattrRequest,
                  fh_fd: int | None, *, by_handle: bool = False) -> Entry:
    """``fh_fd``: the upper fd of the handle a truncate names; ``by_handle``: the request
    names a handle at all (FATTR_FH)."""
    check_writable(sb)
    if inode.unlinked and inode.upper is None and changes.only_cmtime():
        # The writeback cache's flush of the times the kernel keeps (it sets the ctime of
        # a file it unlinks, or renames another over, and sends it at once): the file has
        # no name, so no copy-up (it would fail EEXIST on the whiteout after copying the
        # data, and the kernel would turn that into EIO for close(2) and fsync(2) of every
        # fd still open on it). Nothing is changed, as the kernel's overlayfs changes no
        # times on an unlink.
        return make_entry(sb, inode)
    if not (by_handle and changes.only_cmtime()):
        # With a handle and nothing but the c/mtime, this is the writeback cache's flush
        # of the times of writes it made through that handle (fuse_flush_times, at close
        # and fsync); a caller's utimensat(2) never names a handle. Writes allowed on a
        # +a file (appends), or through a handle opened before +i (as the kernel's
        # overlayfs), must not make close(2) fail.
        protattr.check_setattr(sb, inode, times_now=changes.times_now and changes.mode is None
                               and changes.uid is None and changes.gid is None
                               and changes.size is None)
    await copy_up(sb, inode, size=changes.size)
    async with inode.lock:
        assert inode.upper is not None
        upper = inode.upper

        async def truncate(size: int) -> None:
            if fh_fd is not None:
                os.ftruncate(fh_fd, size)
            else:
                os.truncate(proc_path(upper), size)

        if sb.owners is not None:
            if changes.kill_suidgid is not None and changes.mode is None:
                # The set-id bits the kernel saw are those we report (an override record
                # under xattr_permissions): strip them there, as a mode change.
                cur = make_entry(sb, inode).attr
                kill = privs.kill_mask(cur, changes.kill_suidgid.gid, changes.kill_suidgid.pid)
                changes = dataclasses.replace(
                    changes, kill_suidgid=None,
                    mode=stat.S_IMODE(cur.st_mode & ~kill) if kill else None)
            changes = sb.owners.setattr_in(upper, changes, os.fstat(upper))
        st = await setattr_backing(upper, stat.S_IFMT(inode.mode), changes, truncate)
        inode.attrs.copyattr(st)
        entry = make_entry(sb, inode, st)
    await tell_twin(sb, inode)
    return entry


async def tell_twin(sb: Superblock, inode: OvlInode) -> None:
    """After an attribute change of ``inode``: the kernel's cached attributes of its twin
    (the other kernel inode of the same upper file across a lower passthrough detachment,
    file.py) are dropped, so fstat of an fd opened before the copy-up and stat of the
    path agree on mode, owner, times and xattrs. Without it they never would, the
    overlay's attribute timeout being unlimited by default."""
    twin = inode.twin
    if twin is not None and sb.notifier is not None and sb.inodes.peek(twin.ino) is twin:
        twin.attrs.invalidate()
        await sb.notifier.invalidate_inode(twin.ino, attr_only=True)


async def readlink(sb: Superblock, inode: OvlInode) -> bytes:
    if not stat.S_ISLNK(inode.mode):
        raise OSError(errno.EINVAL, "not a symlink")
    return os.fsencode(os.readlink("", dir_fd=inode.data_fd()))


def access(sb: Superblock, inode: OvlInode, mode: int, caller: Caller) -> None:
    """The caller's permission on the overlay inode's attributes (§B.13, check 1), plus
    EROFS for W_OK on a read-only overlay. With default_permissions the kernel makes this
    check itself and never asks."""
    if mode & os.W_OK and sb.is_read_only and not stat.S_ISCHR(inode.mode) \
            and not stat.S_ISBLK(inode.mode) and not stat.S_ISFIFO(inode.mode):
        raise OSError(errno.EROFS, "read-only overlay")
    if sb.owners is None:
        check_access(os.fstat(inode.data_fd()), mode, caller.uid, caller.gid, caller.pid)
    else:  # the attributes the mount reports are the ones to check against
        attr = make_entry(sb, inode).attr
        check_access(attr, mode, caller.uid, caller.gid, caller.pid)  # type: ignore[arg-type]


def _check_client_name(sb: Superblock, name: bytes, errno_: int) -> None:
    if sb.owners is not None and sb.owners.is_private(name):
        raise OSError(errno_, "xattr reserved for ownership records", name)


async def getxattr(sb: Superblock, inode: OvlInode, name: bytes) -> bytes:
    _check_client_name(sb, name, errno.ENODATA)
    backing = oxattrs.to_backing(name, sb.prefix)
    value = bxattrs.fgetxattr(inode.data_fd(), backing)
    if sb.owners is not None:
        value = sb.owners.acl_out(name, value)
    return value


async def listxattr(sb: Superblock, inode: OvlInode) -> list[bytes]:
    names = oxattrs.filter_list(bxattrs.flistxattr(inode.data_fd()), sb.prefix)
    if sb.owners is not None:
        names = [n for n in names if not sb.owners.is_private(n)]
    return names


async def setxattr_prepare(sb: Superblock, inode: OvlInode, name: bytes) -> None:
    """A setxattr copies up before the upper filesystem sees its flags, so one that fails
    XATTR_CREATE/XATTR_REPLACE has copied up too (kernel ``ovl_xattr_set``): a lower hard
    link is broken and shows nlink 1 as there."""
    check_writable(sb)
    _check_client_name(sb, name, errno.EPERM)
    protattr.check_change(sb, inode)
    await copy_up(sb, inode)


async def setxattr(sb: Superblock, inode: OvlInode, name: bytes, value: bytes) -> None:
    check_writable(sb)
    _check_client_name(sb, name, errno.EPERM)
    if sb.owners is not None:
        value = sb.owners.acl_in(name, value)
    backing = oxattrs.to_backing(name, sb.prefix)
    protattr.check_change(sb, inode)
    await copy_up(sb, inode)
    async with inode.lock:
        assert inode.upper is not None
        bxattrs.fsetxattr(inode.upper, backing, value)
        inode.attrs.invalidate()
    await tell_twin(sb, inode)


async def removexattr(sb: Superblock, inode: OvlInode, name: bytes) -> None:
    check_writable(sb)
    _check_client_name(sb, name, errno.EPERM)
    backing = oxattrs.to_backing(name, sb.prefix)
    # Nothing to remove is ENODATA without a copy-up (the kernel checks first, too).
    protattr.check_change(sb, inode)
    bxattrs.fgetxattr(inode.data_fd(), backing)
    await copy_up(sb, inode)
    async with inode.lock:
        assert inode.upper is not None
        bxattrs.fremovexattr(inode.upper, backing)
        inode.attrs.invalidate()
    await tell_twin(sb, inode)


async def statfs(sb: Superblock) -> Statfs:
    layer = sb.layers.upper or sb.layers.lowers[0]
    return Statfs.from_statvfs(os.statvfs(layer.fd))  # fstatfs works on O_PATH fds
