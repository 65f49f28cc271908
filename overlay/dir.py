"""Namespace operations: create/tmpfile/mknod/mkdir/symlink/link/unlink/rmdir/rename,
whiteouts.

Every change happens on the upper layer, after the parent (and, for link and rename, the
object) has been copied up (reference §B.3, §B.4, §B.10, the kernel's ``dir.c``):

- **create over a whiteout**: the object is built in work/ and swapped with the whiteout by
  ``RENAME_EXCHANGE`` (a directory cannot replace a char device by plain rename), then the
  whiteout is removed from work/; a directory made there is opaque, so what the whiteout
  hid stays hidden. New objects belong to the caller (``backingfs.creds``).
- **unlink/rmdir** of a name that exists on a lower layer leaves a whiteout (char 0/0 swapped
  in atomically with RENAME_EXCHANGE, or ``.wh.NAME`` when mknod is refused). A merged
  directory may be removed only if it lists nothing (whiteouts only); those are removed
  with it.
- **rename**: RENAME_NOREPLACE and RENAME_EXCHANGE; a directory with lower parts gives EXDEV
  (no redirect_dir), so ``mv`` falls back to copying; a whiteout is left at the source when
  the name exists below (``RENAME_WHITEOUT``); a directory moved into a merged parent is
  made opaque first.

Namespace syscalls run inline on the loop, as passthru's do: each is one quick metadata
operation on a cached directory, and a worker round trip costs more than the call (100-200
µs per hop on a small VM). Copy-up of data (copyup.py) and fsync stay in workers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import TYPE_CHECKING

from backingfs import acl
from backingfs import xattrs as bxattrs
from backingfs.creds import caller_groups, chown_new, new_mode, new_owner
from backingfs.fsapi import RENAME_EXCHANGE, RENAME_NOREPLACE, Caller, Entry, OpenReply
from backingfs.syscalls import RENAME_WHITEOUT, open_path, proc_path, renameat2

from . import protattr
from . import whiteout as wo
from .copyup import copy_up
from .entry import OvlInode
from .file import backing_flags, open_new
from .inode import check_writable, make_entry
from .namei import Resolved, adopt, find_upper, lower_positive, resolve
from .readdir import is_empty, remove_upper_whiteouts
from .superblock import remove_tree_at

if TYPE_CHECKING:
    from .superblock import Superblock

KIND_REG = "reg"
KIND_DIR = "dir"
KIND_LNK = "lnk"
KIND_NODE = "node"
KIND_LINK = "link"


def _check_new_name(name: bytes) -> None:
    if wo.is_aufs_name(name):
        raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts", name)


async def _make(sb: Superblock, parent: OvlInode, name: bytes, caller: Caller, kind: str,
                mode: int = 0, rdev: int = 0, target: bytes = b"",
                link_src: OvlInode | None = None,
                keep_open: tuple[int, list[int]] | None = None) -> OvlInode:
    """Create ``name`` in ``parent`` on the upper layer; returns its inode with one lookup
    reference. ``keep_open`` (create): ``(flags, out)``: a regular file made in place is
    opened with the backing ``flags`` as it is made, and that fd goes into ``out`` (the
    caller's to close), sparing the reopen of an open that follows."""
    check_writable(sb)
    _check_new_name(name)
    res = resolve(sb, parent, name)
    exists, over_whiteout = res.exists, res.upper_whiteout
    res.close()
    if exists:
        raise OSError(errno.EEXIST, "file exists", name)
    protattr.check_add(sb, parent)
    if link_src is not None:
        protattr.check_change(sb, link_src)  # vfs_link: not of a +i or +a file
    await copy_up(sb, parent)
    if link_src is not None:
        await copy_up(sb, link_src)
    assert parent.upper is not None
    parent_fd = parent.upper
    uid, gid, final_mode, acls = _new_owner_mode(sb, parent_fd, caller, kind, mode)
    src_fd = link_src.upper if link_src is not None else None
    path_fd, made_st = _make_sync(sb, parent_fd, name, kind, final_mode, rdev, target, uid,
                                  gid, over_whiteout, src_fd, keep_open, acls)
    if path_fd is not None:
        # What a resolve would find now, known without asking: an upper object, ours, with
        # no origin record; a directory with nothing merged below (a lower one of that name
        # would have made the name exist), opaque when made over a whiteout. Its identity
        # is the object we made even if the name changed meanwhile.
        assert sb.layers.upper is not None
        res = Resolved(st=made_st, upper=path_fd,
                       is_opaque=kind == KIND_DIR and over_whiteout,
                       st_ino=sb.layers.st_ino(sb.layers.upper, made_st.st_ino))
        made = adopt(sb, parent, name, res)
        if kind != KIND_LINK:
            protattr.mark_new(made)
        return made
    try:
        res = resolve(sb, parent, name)
    except BaseException:
        # Out of fds looking at what we made: take it back, so the request fails whole.
        _unmake_sync(sb, parent, name, made_st)
        raise
    if not res.exists:
        res.close()
        raise OSError(errno.ENOENT, "created entry vanished", name)
    return adopt(sb, parent, name, res)


def _new_owner_mode(sb: Superblock, parent_fd: int, caller: Caller, kind: str, mode: int
                    ) -> tuple[int, int, int, tuple[bytes | None, bytes | None] | None]:
    """``(uid, gid, mode, acls)`` of a new ``kind`` object in the upper directory
    ``parent_fd``, as the layer keeps them: the caller's owner (the parent's group under
    set-gid), the requested mode with set-gid dropped where the kernel drops it, and, when
    the kernel left the umask to us, the umask or the parent's default ACL (``_inherit``)."""
    pst = os.fstat(parent_fd)
    cuid, cgid = caller.uid, caller.gid
    owners = sb.owners
    if owners is not None:  # the caller's ids and the parent's owner as the layer keeps them
        pst = owners.layer_stat(parent_fd, 0, pst)
        cuid, cgid = owners.uid_in(cuid), owners.gid_in(cgid)
    uid, gid = new_owner(cuid, cgid, pst)
    is_dir = kind == KIND_DIR
    in_group = cgid == pst.st_gid or pst.st_gid in (
        caller_groups(caller.pid) if owners is None
        else owners.groups_in(caller_groups(caller.pid)))
    final_mode = new_mode(mode, caller.umask, pst, is_dir, cgid, in_group or
                          caller.uid == 0, apply_umask=False)
    acls = None
    if sb.dont_mask and kind in (KIND_REG, KIND_DIR, KIND_NODE):
        final_mode, acls = _inherit(parent_fd, final_mode, caller.umask, is_dir)
    return uid, gid, final_mode, acls


def _inherit(parent_fd: int, mode: int, umask: int, is_dir: bool
             ) -> tuple[int, tuple[bytes | None, bytes | None] | None]:
    """The mode of a new object in the upper directory ``parent_fd`` when the kernel left
    the umask to us, and the (access, default) ACL xattrs it inherits, if any: the
    kernel's ``posix_acl_create`` (backingfs.acl). Made in place, the upper filesystem
    inherits them itself; made in the work directory, ``_make_sync`` sets them."""
    dacl = acl.default_acl(parent_fd)
    if dacl is None:
        return mode & ~(umask & 0o777), None
    mode, access, default = acl.inherit(dacl, mode, is_dir)
    return mode, (access, default)


def _make_sync(sb: Superblock, parent_fd: int, name: bytes, kind: str, mode: int, rdev: int,
               target: bytes, uid: int, gid: int, over_whiteout: bool,
               src_fd: int | None, keep_open: tuple[int, list[int]] | None = None,
               acls: tuple[bytes | None, bytes | None] | None = None,
               ) -> tuple[int | None, os.stat_result]:
    """Make the object; returns its stat (what a failure later takes back, whatever the
    name holds by then) and its O_PATH fd, or None (a hard link, whose identity is its
    source's; or the name no longer holds what we made): the caller resolves the name.
    ``acls``: the (access, default) ACL xattrs it inherits from ``parent_fd`` (``_inherit``),
    set here when it is made in the work directory, which has none to inherit."""
    # resolve() reports an upper .wh.NAME as a whiteout: only then can one be there.
    aufs = over_whiteout and wo.has_aufs_whiteout(parent_fd, name)
    entry_whiteout = over_whiteout and not aufs  # an object sits at ``name`` on the upper
    opaque = kind == KIND_DIR and over_whiteout
    in_work = entry_whiteout or opaque
    assert sb.work_fd is not None
    dir_fd, nm = (sb.work_fd, sb.tmp_name()) if in_work else (parent_fd, name)
    if kind == KIND_REG and not in_work and sb.owners is None:
        return _make_file_sync(sb, parent_fd, name, mode, uid, gid, aufs, keep_open)
    if kind == KIND_REG:
        os.close(os.open(nm, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd))
    elif kind == KIND_DIR:
        os.mkdir(nm, 0o700, dir_fd=dir_fd)
    elif kind == KIND_LNK:
        os.symlink(target, nm, dir_fd=dir_fd)
    elif kind == KIND_NODE:
        os.mknod(nm, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=dir_fd)
    else:
        assert src_fd is not None
        os.link(proc_path(src_fd), nm, dst_dir_fd=dir_fd, follow_symlinks=True)
    try:
        if in_work and acls is not None:
            for xname, value in zip((acl.ACCESS, acl.DEFAULT), acls, strict=True):
                if value is not None:
                    bxattrs.setxattrat(dir_fd, nm, xname, value)
        # SHARE: same as passthru/dir.py:give_owner (new object -> caller's uid/gid, then the
        # final mode, since chown clears set-id bits).
        if kind != KIND_LINK:
            perm = None if kind == KIND_LNK else stat.S_IMODE(mode)
            if sb.owners is None:
                chown_new(nm, uid, gid, dir_fd=dir_fd, mode=perm)
            else:
                fd = open_path(dir_fd, nm)
                try:
                    sb.owners.set_owner(fd, uid, gid, perm, os.fstat(fd))
                finally:
                    os.close(fd)
        if opaque:
            bxattrs.setxattrat(dir_fd, nm, sb.prefix + b"opaque", b"y")
        made_st = os.lstat(nm, dir_fd=dir_fd)
        if in_work:
            if entry_whiteout:
                renameat2(sb.work_fd, nm, parent_fd, name, RENAME_EXCHANGE)
            else:
                renameat2(sb.work_fd, nm, parent_fd, name, RENAME_NOREPLACE)
    except BaseException:
        _discard(dir_fd, nm)
        raise
    if in_work and entry_whiteout:
        _discard(sb.work_fd, nm)  # the whiteout, swapped out
    if aufs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(wo.aufs_name(name), dir_fd=parent_fd)
    return (None if kind == KIND_LINK else _open_made(parent_fd, name, made_st)), made_st


def _open_made(parent_fd: int, name: bytes, made: os.stat_result) -> int | None:
    """An O_PATH fd of the object we just made at ``name``, or None when the name no
    longer holds it (or no fd is left): the caller's resolve sorts that out."""
    try:
        fd = open_path(parent_fd, name)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if (st.st_dev, st.st_ino) != (made.st_dev, made.st_ino):
        os.close(fd)
        return None
    return fd


def _make_file_sync(sb: Superblock, parent_fd: int, name: bytes, mode: int, uid: int,
                    gid: int, aufs: bool, keep_open: tuple[int, list[int]] | None = None,
                    ) -> tuple[int, os.stat_result]:
    """A regular file made in place, owner and mode set through the fd that created it
    (chown first: it clears set-id bits). Returns its O_PATH fd and stat; with
    ``keep_open``, the creating fd (opened with those flags) goes into its list."""
    access = os.O_WRONLY
    if keep_open is not None:
        access = keep_open[0] & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
    fd = os.open(name, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                 dir_fd=parent_fd)
    kept = False
    try:
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
            st = os.fstat(fd)
            path_fd = os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent_fd)
            raise
        if aufs:
            try:
                os.unlink(wo.aufs_name(name), dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            except BaseException:
                # The old whiteout stays: the new file must not (nor its fds)
                os.close(path_fd)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=parent_fd)
                raise
        if keep_open is not None:
            keep_open[1].append(fd)
            kept = True
    finally:
        if not kept:
            os.close(fd)
    return path_fd, st


async def mknod(sb: Superblock, parent: OvlInode, name: bytes, mode: int, rdev: int,
                caller: Caller) -> Entry:
    if stat.S_ISCHR(mode) and rdev == 0:
        # A whiteout, which would hide the name: the kernel's ovl_mknod refuses it too.
        raise OSError(errno.EPERM, "a character device 0/0 is a whiteout", name)
    kind = KIND_REG if stat.S_ISREG(mode) else KIND_NODE
    inode = await _make(sb, parent, name, caller, kind, mode, rdev)
    return _entry(sb, inode)


async def mkdir(sb: Superblock, parent: OvlInode, name: bytes, mode: int,
                caller: Caller) -> Entry:
    inode = await _make(sb, parent, name, caller, KIND_DIR, stat.S_IFDIR | mode)
    return _entry(sb, inode)


async def symlink(sb: Superblock, parent: OvlInode, name: bytes, target: bytes,
                  caller: Caller) -> Entry:
    inode = await _make(sb, parent, name, caller, KIND_LNK, stat.S_IFLNK | 0o777,
                        target=target)
    return _entry(sb, inode)


async def link(sb: Superblock, inode: OvlInode, parent: OvlInode, name: bytes,
               caller: Caller) -> Entry:
    if inode.is_dir:
        raise OSError(errno.EPERM, "hard link to a directory")
    new = await _make(sb, parent, name, caller, KIND_LINK, link_src=inode)
    return _entry(sb, new)


async def create(sb: Superblock, parent: OvlInode, name: bytes, mode: int, flags: int,
                 caller: Caller) -> tuple[OpenReply, Entry]:
    kept: list[int] = []
    try:
        inode = await _make(sb, parent, name, caller, KIND_REG, stat.S_IFREG | mode,
                            keep_open=(backing_flags(sb, flags), kept))
        assert inode.upper is not None and parent.upper is not None
        made = os.fstat(inode.upper)
        try:
            entry = _entry(sb, inode)  # gives the lookup back itself if it fails
            try:
                reply = open_new(sb, inode, flags, kept[0] if kept else None)
            except BaseException:
                sb.inodes.forget(inode.ino, 1)
                raise
            kept.clear()  # the handle's now
            return reply, entry
        except BaseException:
            # As on a local filesystem, a failed create leaves no file (EMFILE opening the
            # handle, under a small fd limit): a retry with O_EXCL must not meet EEXIST.
            _unmake_sync(sb, parent, name, made)
            raise
    finally:
        for fd in kept:  # not taken by a handle: the request failed
            os.close(fd)


async def tmpfile(sb: Superblock, parent: OvlInode, mode: int, flags: int,
                  caller: Caller) -> tuple[OpenReply, Entry]:
    """O_TMPFILE: an unnamed file in the upper copy of ``parent``, and opened (the kernel's
    ``ovl_tmpfile``). The parent is copied up first, as for create, so that a link(2) of
    the file publishes it in place: ``link`` links the upper file as it links any upper
    object. The owner and mode are create's (``_new_owner_mode``; a default ACL of the
    upper directory is inherited by the upper filesystem itself). O_EXCL reaches the
    upper file, which is then never linkable either. Nothing is left in the upper layer
    when it is closed unlinked, not even in work/: only the copied-up parent remains, as
    with the kernel's. EROFS on a mount without upper (the kernel refuses first: the
    mount is read-only).

    The inode has no name (``b""``): a name is only needed to copy an inode up, and this
    one is upper from the start; a link gives it its first (``namei.adopt``)."""
    check_writable(sb)
    protattr.check_add(sb, parent)
    await copy_up(sb, parent)
    assert parent.upper is not None and sb.layers.upper is not None
    parent_fd = parent.upper
    flags &= ~os.O_TMPFILE  # the stacked open's flags, as a create's would be
    uid, gid, perm, _ = _new_owner_mode(sb, parent_fd, caller, KIND_REG, stat.S_IFREG | mode)
    perm = stat.S_IMODE(perm)
    bflags = backing_flags(sb, flags)
    fd = os.open(".", bflags | os.O_TMPFILE | (flags & os.O_EXCL) | os.O_CLOEXEC, 0o600,
                 dir_fd=parent_fd)
    path_fd = -1
    try:
        path_fd = os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC)
        if sb.owners is None:
            chown_new(fd, uid, gid, mode=perm)
        else:
            sb.owners.set_owner(path_fd, uid, gid, perm, os.fstat(path_fd))
        made_st = os.fstat(fd)
        res = Resolved(st=made_st, upper=path_fd,
                       st_ino=sb.layers.st_ino(sb.layers.upper, made_st.st_ino))
        path_fd = -1  # the resolution's, then the inode's
        try:
            inode = adopt(sb, parent, b"", res)
            protattr.mark_new(inode)
        except BaseException:
            res.close()
            raise
        entry = _entry(sb, inode)  # gives the lookup back itself if it fails
        try:
            reply = open_new(sb, inode, flags, fd)
        except BaseException:
            sb.inodes.forget(inode.ino, 1)
            raise
        fd = -1  # the handle's now
        return reply, entry
    finally:
        # Not taken: the request failed, and the unnamed file goes with its last fd.
        for left in (fd, path_fd):
            if left >= 0:
                os.close(left)


def _unmake_sync(sb: Superblock, parent: OvlInode, name: bytes, made: os.stat_result) -> None:
    """Take back the object ``made`` at ``name`` if it is still there (best effort): the
    name is then as before the request that made it, a whiteout where a lower layer has
    it. Local filesystems never fail such a request halfway (EMFILE comes first there)."""
    assert parent.upper is not None
    parent_fd = parent.upper
    with contextlib.suppress(OSError):
        now = wo.lstat_at(parent_fd, name)
        if now is None or (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
            return
        if lower_positive(sb, parent, name):
            _whiteout_sync(sb, parent_fd, name, True)
        else:
            _remove_upper_sync(sb, parent_fd, name)


def _entry(sb: Superblock, inode: OvlInode) -> Entry:
    try:
        return make_entry(sb, inode)
    except BaseException:
        sb.inodes.forget(inode.ino, 1)
        raise


# --- removal ------------------------------------------------------------------------------

def _whiteout_sync(sb: Superblock, parent_fd: int, name: bytes, has_upper: bool) -> None:
    """Replace (or occupy) ``name`` in the upper ``parent_fd`` with a whiteout."""
    assert sb.work_fd is not None
    if sb.whiteout_kind == wo.WHITEOUT_CHR:
        if not has_upper:
            wo.make_whiteout(parent_fd, name, wo.WHITEOUT_CHR)
            return
        tmp = sb.tmp_name()
        wo.make_whiteout(sb.work_fd, tmp, wo.WHITEOUT_CHR)
        try:
            renameat2(sb.work_fd, tmp, parent_fd, name, RENAME_EXCHANGE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=sb.work_fd)
            raise
        _discard(sb.work_fd, tmp)
        return
    # .wh.NAME first (it needs an fd): out of fds after the removal, the lower object
    # would show again. It hides nothing of the upper object beside it (namei.resolve).
    made = _make_aufs_whiteout(parent_fd, name)
    if has_upper:
        try:
            _remove_upper_sync(sb, parent_fd, name)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(wo.aufs_name(name), dir_fd=parent_fd)
            raise


def _make_aufs_whiteout(dir_fd: int, name: bytes) -> bool:
    """Make ``.wh.NAME``; False if one is there already (left by a crash between making
    it and the change it goes with: it hides the layers below, as it should)."""
    try:
        wo.make_whiteout(dir_fd, name, wo.WHITEOUT_AUFS)
    except FileExistsError:
        return False
    return True


def _remove_upper_sync(sb: Superblock, parent_fd: int, name: bytes) -> None:
    """Remove ``name`` from the upper dir: moved into work/ first, then deleted there, so
    a directory holding whiteouts disappears from the namespace in one step."""
    assert sb.work_fd is not None
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    tmp = sb.tmp_name()
    renameat2(parent_fd, name, sb.work_fd, tmp, RENAME_NOREPLACE)
    _discard(sb.work_fd, tmp)


def _discard(dir_fd: int, name: bytes) -> None:
    """Remove ``name`` (a tree) once the namespace change is done, best effort: the request
    has succeeded (a retry after an EMFILE here would meet ENOENT or EEXIST), and what is
    left in work/ is emptied at the next mount. An empty directory or a non-directory goes
    without an fd, so even out of fds nothing is left in the upper layer's namespace."""
    try:
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except NotADirectoryError:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError:
        with contextlib.suppress(OSError):
            remove_tree_at(dir_fd, name)


async def unlink(sb: Superblock, parent: OvlInode, name: bytes) -> None:
    await _remove(sb, parent, name, want_dir=False)


async def rmdir(sb: Superblock, parent: OvlInode, name: bytes) -> None:
    await _remove(sb, parent, name, want_dir=True)


def _check_kind(name: bytes, is_dir: bool, want_dir: bool) -> None:
    if want_dir and not is_dir:
        raise OSError(errno.ENOTDIR, "not a directory", name)
    if not want_dir and is_dir:
        raise OSError(errno.EISDIR, "is a directory", name)


def _victim(sb: Superblock, parent: OvlInode, name: bytes, want_dir: bool) -> OvlInode:
    """The inode ``name`` names, with one new lookup reference, checked to be of the kind
    the removal wants. An upper object that has its inode already (everything rm -rf meets
    after listing a tree made through the mount) costs an fstatat and an fstat, as in
    lookup; anything else is resolved."""
    known, upper_st = find_upper(sb, parent, name)
    if known is not None:
        inode, st = known
        try:
            _check_kind(name, stat.S_ISDIR(st.st_mode), want_dir)
        except BaseException:
            sb.inodes.forget(inode.ino, 1)
            raise
        return inode
    res = resolve(sb, parent, name, upper_st)
    try:
        if not res.exists:
            raise OSError(errno.ENOENT, "no such file or directory", name)
        _check_kind(name, res.is_dir, want_dir)
        return adopt(sb, parent, name, res)
    finally:
        res.close()


def _rmdir_plain(parent_fd: int, name: bytes) -> bool:
    """rmdir of an upper directory with no lower one: one syscall when it holds nothing,
    not even whiteouts (the kernel's ovl_remove_upper). False when it holds something:
    the caller then lists it, and one holding only whiteouts goes through work/."""
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return True  # gone behind the mount, as the slow path's lstat would find
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


async def _remove(sb: Superblock, parent: OvlInode, name: bytes, want_dir: bool) -> None:
    check_writable(sb)
    inode = _victim(sb, parent, name, want_dir)
    try:
        protattr.check_remove(sb, parent, inode)
        if (want_dir and not inode.lowers and inode.upper is not None
                and parent.upper is not None and not lower_positive(sb, parent, name)
                and _rmdir_plain(parent.upper, name)):
            return
        if want_dir and not is_empty(sb, inode):
            raise OSError(errno.ENOTEMPTY, "directory not empty", name)
        await copy_up(sb, parent)
        assert parent.upper is not None
        parent_fd = parent.upper
        below = lower_positive(sb, parent, name)
        has_upper = wo.lstat_at(parent_fd, name) is not None

        def work() -> None:
            if below:
                _whiteout_sync(sb, parent_fd, name, has_upper)
            elif has_upper:
                if want_dir:
                    _remove_upper_sync(sb, parent_fd, name)
                else:
                    os.unlink(name, dir_fd=parent_fd)

        work()
        if inode.upper is None:
            inode.unlinked = True
    finally:
        sb.inodes.forget(inode.ino, 1)


# --- rename -------------------------------------------------------------------------------

def _same_object(a: Resolved, b: Resolved) -> bool:
    assert a.st is not None and b.st is not None
    if a.upper is None and not a.is_dir and a.st.st_nlink > 1:
        return False  # lower hard links are inodes of their own (namei.adopt), as in the kernel
    return (a.st.st_dev, a.st.st_ino) == (b.st.st_dev, b.st.st_ino)


async def rename(sb: Superblock, old_parent: OvlInode, old_name: bytes,
                 new_parent: OvlInode, new_name: bytes, flags: int) -> None:
    check_writable(sb)
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE
                                                                  | RENAME_EXCHANGE):
        raise OSError(errno.EINVAL, "unsupported rename flags")
    _check_new_name(new_name)
    exchange = bool(flags & RENAME_EXCHANGE)
    held: list[OvlInode] = []
    src = resolve(sb, old_parent, old_name)
    try:
        dst = resolve(sb, new_parent, new_name)
    except BaseException:
        src.close()  # out of fds for the second name: the first one's must not leak
        raise
    try:
        if not src.exists:
            raise OSError(errno.ENOENT, "no such file or directory", old_name)
        if exchange and not dst.exists:
            raise OSError(errno.ENOENT, "no such file or directory", new_name)
        if flags & RENAME_NOREPLACE and dst.exists:
            raise OSError(errno.EEXIST, "file exists", new_name)
        # Refused after the VFS's own checks (protattr below: may_delete/may_create), as in
        # the kernel's ovl_rename.
        exdev = bool(src.is_dir and src.lowers or exchange and dst.is_dir and dst.lowers)
        if dst.exists and not exchange:
            if src.is_dir and not dst.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", new_name)
            if not src.is_dir and dst.is_dir:
                raise OSError(errno.EISDIR, "is a directory", new_name)
            if _same_object(src, dst):
                return  # POSIX: two names of one file, nothing happens
        src_is_dir, dst_is_dir, dst_exists = src.is_dir, dst.is_dir, dst.exists
        src_inode = adopt(sb, old_parent, old_name, src)
        held.append(src_inode)
        dst_inode = adopt(sb, new_parent, new_name, dst) if dst.exists else None
        if dst_inode is not None:
            held.append(dst_inode)
    except BaseException:
        for inode in held:
            sb.inodes.forget(inode.ino, 1)
        raise
    finally:
        src.close()
        dst.close()
    try:
        protattr.check_remove(sb, old_parent, src_inode)
        if dst_inode is None:
            protattr.check_add(sb, new_parent)
        else:
            protattr.check_remove(sb, new_parent, dst_inode)
        if exdev:
            raise OSError(errno.EXDEV, "cannot rename a lower or merged directory")
        if dst_inode is not None and dst_is_dir and not exchange and \
                not is_empty(sb, dst_inode):
            raise OSError(errno.ENOTEMPTY, "directory not empty", new_name)
        await copy_up(sb, old_parent)
        await copy_up(sb, new_parent)
        await copy_up(sb, src_inode)
        if exchange:
            assert dst_inode is not None
            await copy_up(sb, dst_inode)
        _rename_sync(sb, old_parent, old_name, new_parent, new_name, exchange,
                     src_inode, dst_inode if dst_exists else None, src_is_dir, dst_is_dir)
        src_inode.set_parent(new_parent, new_name)
        if exchange:
            assert dst_inode is not None
            dst_inode.set_parent(old_parent, old_name)
        elif dst_inode is not None and dst_inode.upper is None:
            dst_inode.unlinked = True  # replaced: its name is the moved object's now
    finally:
        for inode in held:
            sb.inodes.forget(inode.ino, 1)


def _own_opaque(sb: Superblock, inode: OvlInode) -> bool:
    """Whether the upper directory is opaque by a marker of its own, which moves with it:
    one opaque only through a ``.wh.NAME`` beside it (namei.resolve) loses that in a rename."""
    assert inode.upper is not None
    return inode.is_opaque and wo.dir_state(inode.upper, sb.prefix)[0]


def _set_opaque(sb: Superblock, inode: OvlInode) -> None:
    assert inode.upper is not None
    bxattrs.fsetxattr(inode.upper, sb.prefix + b"opaque", b"y")
    inode.is_opaque = True


def _rename_sync(sb: Superblock, old_parent: OvlInode, old_name: bytes,
                 new_parent: OvlInode, new_name: bytes, exchange: bool,
                 src: OvlInode, dst: OvlInode | None, src_is_dir: bool,
                 dst_is_dir: bool) -> None:
    old_fd, new_fd = old_parent.upper, new_parent.upper
    assert old_fd is not None and new_fd is not None
    if exchange:
        assert dst is not None
        if src_is_dir and new_parent.lowers and not _own_opaque(sb, src):
            _set_opaque(sb, src)
        if dst_is_dir and old_parent.lowers and not _own_opaque(sb, dst):
            _set_opaque(sb, dst)
        renameat2(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
        return
    below = lower_positive(sb, old_parent, old_name)
    # A .wh.NAME whiteout is made first: it needs an fd, and out of fds after the rename
    # the lower name would show again (and a retry would copy it up over the moved file),
    # or after emptying the target below, its lower entries. An upper object beside its
    # .wh.NAME stays visible (namei.resolve), so this hides nothing yet.
    aufs_wh = below and sb.whiteout_kind != wo.WHITEOUT_CHR
    made_wh = aufs_wh and _make_aufs_whiteout(old_fd, old_name)
    try:
        if src_is_dir and new_parent.lowers and not _own_opaque(sb, src):
            _set_opaque(sb, src)
        if dst is not None and dst_is_dir and dst.upper is not None:
            remove_upper_whiteouts(sb, dst.upper)  # only whiteouts left: checked empty
    except BaseException:
        if made_wh:
            with contextlib.suppress(OSError):
                os.unlink(wo.aufs_name(old_name), dir_fd=old_fd)
        raise
    target = wo.lstat_at(new_fd, new_name)
    aufs_target = wo.has_aufs_whiteout(new_fd, new_name)
    try:
        if target is not None and wo.is_chr_whiteout(target) and src_is_dir:
            # A directory cannot replace a char device: swap, and the whiteout lands at
            # the source, which is where one is needed if the name exists below.
            renameat2(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
            swapped = True
        elif below and not aufs_wh:
            renameat2(old_fd, old_name, new_fd, new_name, RENAME_WHITEOUT)
            swapped = False
        else:
            renameat2(old_fd, old_name, new_fd, new_name, 0)
            swapped = False
    except BaseException:
        if made_wh:
            with contextlib.suppress(OSError):
                os.unlink(wo.aufs_name(old_name), dir_fd=old_fd)
        raise
    if swapped and (not below or aufs_wh):
        os.unlink(old_name, dir_fd=old_fd)  # the char whiteout swapped out; none needed
    if aufs_target:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(wo.aufs_name(new_name), dir_fd=new_fd)
