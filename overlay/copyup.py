"""Copy-up: give a lower object an upper copy, built in work/ and published by one rename.

``copy_up(sb, inode)`` (reference §B.6, the kernel's ``copy_up.c``):

1. parents first: the parent directory is copied up (recursively) before the child;
2. one copy-up per inode: ``inode.copy_up_lock``, and "already up?" re-checked after it;
3. in a worker thread (on the loop when the object is small and no other request waits
   for it, with the fsync on the io_uring, see ``_INLINE_BYTES``), in ``workdir/work/#TMP``:
   the object (data via
   ``backingfs.copyfile.copy_data``: reflink, copy_file_range over data extents, holes
   kept; only the first ``size`` bytes when a truncate asked for it), fsync unless the
   mount does not sync, then xattrs (all but overlay-private ones; EOPNOTSUPP skipped
   only for names outside security.* and system.*), our origin record, owner, mode (after
   chown, which clears set-id bits), atime/mtime, and security.capability once more
   (chown removed it; the kernel's copy-up sets the owner without ATTR_KILL_PRIV);
4. ``renameat2(work/#TMP, parent_upper/NAME, RENAME_NOREPLACE)``: the copy appears whole or
   not at all, and a crash leaves junk only in work/ (emptied at mount);
5. the parent's atime/mtime are put back; the inode's ``upper`` is set.

Under the ownership options (idmap.py) the owner and mode carried over are the ones the
lower layer records (its override xattr, if it keeps them so), written the way the upper
keeps them (its override xattr with ``xattr_permissions``, else the inode); the override
xattrs themselves are not copied.

The origin record (xattrs.origin_name) is the st_ino the object had, so st_ino survives
copy-up and remounts. As the kernel does, it is not written for a file with more than one
link (the copy breaks the hard link, and two uppers must not claim one number). Each name
of a lower hard link is its own inode already (namei.adopt); the copied name's inode is
re-keyed to the new upper file (``_broke_hard_link``), keeping its kernel inode (one page
cache for the file and any link made to it), and the kernel's cached attributes (nlink 2)
are invalidated. On the native session it reports the upper file's st_ino from then on, as
the kernel's overlayfs does, while the other names keep the lower file's. Under pyfuse3
(node id = st_ino) its st_ino stays what it was until the kernel forgets the inode; a
later lookup, and a remount, report the upper file's own.

Handles opened before the copy-up notice it on their next I/O (file.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from backingfs import xattrs as bxattrs
from backingfs.copyfile import copy_data
from backingfs.fileattr import copy_up_flags
from backingfs.pressure import PRESSURE
from backingfs.privs import CAPABILITY_XATTR
from backingfs.sync import fsync_queued
from backingfs.syscalls import RENAME_NOREPLACE, open_path, renameat2, reopen, utimens

from . import protattr
from . import xattrs as oxattrs
from .entry import OvlInode
from .namei import upper_file_key

if TYPE_CHECKING:
    from .superblock import Superblock

#: A copy-up of at most this many bytes runs on the loop thread when no other request is
#: waiting (``PRESSURE``): a worker round trip costs 100-200 us on a small VM. Its fsync
#: (which may wait seconds for a journal commit) never blocks the loop: it goes to the
#: io_uring, or a worker (``fsync_queued``). A bigger copy-up, or one while others wait,
#: runs in a worker.
_INLINE_BYTES = 128 << 10

#: Xattr namespaces that must copy, or the copy-up fails (reference §B.6 step 4).
_MANDATORY_XATTRS = (b"security.", b"system.")


async def copy_up(sb: Superblock, inode: OvlInode, *, size: int | None = None) -> None:
    """Make sure ``inode`` has an upper object. ``size``: the caller will truncate to it
    (an O_TRUNC open or truncate), so no more data than that is copied. EROFS on a
    read-only mount."""
    if inode.upper is not None:
        return
    if sb.is_read_only:
        raise OSError(errno.EROFS, "read-only overlay")
    # Parents first, top-down, in a loop: a recursion would end in RecursionError (EIO)
    # for a file ~1,000 directories deep in a lower layer.
    while inode.upper is None:
        chain: list[OvlInode] = []
        node = inode
        while node.upper is None:
            chain.append(node)
            parent = node.parent
            if parent is None:
                raise OSError(errno.ESTALE, "copy-up of an inode without a parent")
            node = parent
        for node in reversed(chain):
            await _copy_up_one(sb, node, size if node is inode else None)


async def _copy_up_one(sb: Superblock, inode: OvlInode, size: int | None) -> None:
    """Copy up ``inode`` itself once its parent is up; returns without copying if the
    parent is not up (it moved meanwhile: ``copy_up`` walks the chain again)."""
    async with inode.copy_up_lock:
        parent = inode.parent
        if inode.upper is not None or parent is None or parent.upper is None:
            return
        assert inode.lowers
        origin = inode.key if isinstance(inode.key, int) else None
        args = (sb, parent.upper, inode.name, inode.lowers[0].fd,
                inode.lowers[0].layer.index, origin, size)
        link = (parent.ino, inode.name)
        if isinstance(inode.key, tuple) and inode.key[0] == "lower-link":
            sb.copying_links[link] = inode
        try:
            if not _is_small(inode.lowers[0].fd, size) or not PRESSURE.is_idle():
                upper, st = await trio.to_thread.run_sync(_copy_up_sync, *args)
            elif sb.sync.is_syncing:
                upper, st = await _copy_up_inline(*args)
            else:
                upper, st = _copy_up_sync(*args)
            if inode.upper is None:
                inode.upper = upper
            else:
                # A lookup adopted the new upper while our thread returned (namei.adopt
                # sets ``upper`` on the loop once the rename made it visible): the same
                # object. Keep the fd others may already use; ours was seen by no one.
                os.close(upper)
            inode.upper_xwhiteouts = False
            inode.attrs.invalidate()
            if (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
                    and inode is not sb.inodes.root):
                await _broke_hard_link(sb, inode)
            if sb.notifier is not None:
                # The object the kernel shows is now the copy, born now (ctime, btime,
                # and st_ino for a broken link): the kernel keeps attributes for long.
                await sb.notifier.invalidate_inode(inode.ino, attr_only=True)
        finally:
            if sb.copying_links.get(link) is inode:
                del sb.copying_links[link]


async def _broke_hard_link(sb: Superblock, inode: OvlInode) -> None:
    """The copy-up of a lower hard link made a new file with one link (no index, as the
    kernel): the inode now stands for that upper file. Same kernel inode, so handles,
    page cache and a link made to it stay one file; new key, so a lookup of the upper file
    finds it. The kernel's cached nlink and st_ino go with the attributes that every
    copy-up invalidates (``_copy_up_one``)."""
    assert inode.upper is not None
    key = upper_file_key(sb, os.fstat(inode.upper))
    if not sb.inodes.rekey(inode, key):
        # Another inode already adopted the upper file (a lookup raced the copy-up).
        sb.inodes.mark_stale(inode)
    elif sb.node_ids and isinstance(key, int) and key != inode.st_ino:
        # The lower number now belongs to the other names only: the copy reports its own
        # at once, as in the kernel (its node id stays: handles and page cache are kept),
        # in stat and in its parent's listing, which the kernel may hold cached (d_ino).
        inode.st_ino = key
        parent = inode.parent
        if sb.notifier is not None and parent is not None:
            await sb.notifier.invalidate_inode(parent.ino)


def _is_small(fd: int, size: int | None) -> bool:
    """Whether the copy-up of ``fd`` moves at most _INLINE_BYTES of data."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False  # let the worker meet the error
    if not stat.S_ISREG(st.st_mode):
        return True
    return min(st.st_size, size if size is not None else st.st_size) <= _INLINE_BYTES


@dataclass
class _Copy:
    """A copy-up between its halves: the object made in work/ under ``tmp``, its data (a
    regular file on a syncing mount) still open in ``dst`` for the fsync."""

    work: int
    tmp: bytes
    st: os.stat_result
    parent_st: os.stat_result
    dst: int | None


def _copy_up_sync(sb: Superblock, parent_fd: int, name: bytes, src_fd: int, src_layer: int,
                  origin: int | None, size: int | None) -> tuple[int, os.stat_result]:
    """Steps 3-5 of the module docstring; returns (O_PATH fd of the new upper object, the
    source's stat). Blocking: a worker thread, or the loop for a small copy that is not
    synced."""
    copy = _make_copy(sb, parent_fd, src_fd, size, writeback=True)
    try:
        if copy.dst is not None:
            os.fsync(copy.dst)
        return _publish(sb, copy, parent_fd, name, src_fd, src_layer, origin)
    except BaseException:
        _discard(copy)
        raise


async def _copy_up_inline(sb: Superblock, parent_fd: int, name: bytes, src_fd: int,
                          src_layer: int, origin: int | None,
                          size: int | None) -> tuple[int, os.stat_result]:
    """``_copy_up_sync`` on the loop for a small object, the fsync off it (on the io_uring,
    else a worker): no thread round trip for the rest."""
    copy = _make_copy(sb, parent_fd, src_fd, size, writeback=False)
    try:
        if copy.dst is not None:
            await fsync_queued(copy.dst, False)
        return _publish(sb, copy, parent_fd, name, src_fd, src_layer, origin)
    except BaseException:
        _discard(copy)
        raise


def _make_copy(sb: Superblock, parent_fd: int, src_fd: int, size: int | None, *,
               writeback: bool) -> _Copy:
    """Step 3 up to the fsync: the object under a new name in work/. ``writeback``: start
    the disk writes of a big copy while it runs (copyfile.copy_data)."""
    assert sb.work_fd is not None
    work = sb.work_fd
    st = os.fstat(src_fd)
    copy = _Copy(work, sb.tmp_name(), st, os.fstat(parent_fd), None)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        src = reopen(src_fd, os.O_RDONLY)
        try:
            dst = os.open(copy.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                          0o600, dir_fd=work)
            try:
                length = st.st_size if size is None else min(size, st.st_size)
                copy_data(src, dst, length, writeback=writeback and sb.sync.is_syncing)
                copy_up_flags(src, dst)
            except BaseException:
                os.close(dst)
                with contextlib.suppress(OSError):
                    os.unlink(copy.tmp, dir_fd=work)
                raise
        finally:
            os.close(src)
        if sb.sync.is_syncing:
            copy.dst = dst
        else:
            os.close(dst)
    elif stat.S_ISDIR(mode):
        os.mkdir(copy.tmp, 0o700, dir_fd=work)
        _copy_dir_flags(src_fd, work, copy.tmp)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink("", dir_fd=src_fd), copy.tmp, dir_fd=work)
    else:
        os.mknod(copy.tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=work)
    return copy


def _copy_dir_flags(src_fd: int, work: int, tmp: bytes) -> None:
    """``copy_up_flags`` for a directory, which has no fd open yet (best effort: a
    directory the daemon may not open keeps none)."""
    with contextlib.ExitStack() as fds:
        try:
            src = reopen(src_fd, os.O_RDONLY | os.O_DIRECTORY)
            fds.callback(os.close, src)
            dst = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work)
            fds.callback(os.close, dst)
        except OSError:
            return
        copy_up_flags(src, dst)


def _publish(sb: Superblock, copy: _Copy, parent_fd: int, name: bytes, src_fd: int,
             src_layer: int, origin: int | None) -> tuple[int, os.stat_result]:
    """Steps 3 (after the fsync) to 5: metadata, the rename, the parent's times."""
    if copy.dst is not None:
        dst, copy.dst = copy.dst, None
        os.close(dst)
    st = copy.st
    fd = open_path(copy.work, copy.tmp)
    try:
        owners = sb.owners
        caps = copy_xattrs(src_fd, fd, sb.prefix,
                           skip=owners.private_names if owners is not None else frozenset())
        protattr.record(sb, src_fd, fd)
        if origin is not None and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1):
            bxattrs.fsetxattr(fd, oxattrs.origin_name(sb.prefix), b"%d" % origin)
        if owners is None:
            copy_owner_mode_times(fd, st)
        else:  # the owner the lower layer records (idmap.py), kept the way the upper keeps it
            owner = owners.layer_owner(src_fd, src_layer, st)
            owners.set_owner(fd, owner.uid, owner.gid,
                             None if stat.S_ISLNK(st.st_mode) else owner.perm, os.fstat(fd))
            utimens(fd, st.st_atime_ns, st.st_mtime_ns)
        if caps is not None:
            # chown(2) removed it (the kernel's chown_common asks for ATTR_KILL_PRIV); the
            # kernel's copy-up sets the owner by notify_change without it, so the copy keeps
            # the file capability of the lower file.
            bxattrs.fsetxattr(fd, CAPABILITY_XATTR, caps)
        renameat2(copy.work, copy.tmp, parent_fd, name, RENAME_NOREPLACE)
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # best effort, as the kernel
        utimens(parent_fd, copy.parent_st.st_atime_ns, copy.parent_st.st_mtime_ns)
    return fd, st


def _discard(copy: _Copy) -> None:
    """A copy-up that failed before its rename: nothing of it stays in work/."""
    if copy.dst is not None:
        os.close(copy.dst)
        copy.dst = None
    with contextlib.suppress(OSError):
        from .superblock import remove_tree_at
        remove_tree_at(copy.work, copy.tmp)


def copy_xattrs(src_fd: int, dst_fd: int, prefix: bytes,
                skip: frozenset[bytes] = frozenset()) -> bytes | None:
    """Every xattr of ``src_fd`` but overlay-private ones and ``skip`` onto ``dst_fd``
    (O_PATH fds). Returns the security.capability value copied, if any: a chown of the
    copy afterwards removes it, and the caller puts it back."""
    caps = None
    try:
        names = bxattrs.flistxattr(src_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    for name in names:
        if not oxattrs.is_copied_up(name, prefix) or name in skip:
            continue
        try:
            value = bxattrs.fgetxattr(src_fd, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue  # removed meanwhile
            raise
        try:
            bxattrs.fsetxattr(dst_fd, name, value)
        except OSError as e:
            if (e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)
                    and not name.startswith(_MANDATORY_XATTRS)):
                continue
            raise
        if name == CAPABILITY_XATTR:
            caps = value
    return caps


def copy_owner_mode_times(fd: int, st: os.stat_result) -> None:
    """uid/gid, then the mode (chown clears set-id bits), then atime/mtime."""
    path = f"/proc/self/fd/{fd}"
    os.chown(path, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    utimens(fd, st.st_atime_ns, st.st_mtime_ns)
