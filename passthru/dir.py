"""Namespace operations: mknod/mkdir/symlink/link/unlink/rmdir/rename in SOURCE directories.

Every call names one component relative to the parent's O_PATH fd (``*at`` syscalls, never
following a final symlink), so nothing is created or removed outside SOURCE.

Ownership and mode of new objects: the daemon creates them as root, then gives them the
caller's owner (``creds.new_owner``: the caller's uid, and the parent's gid under a setgid
parent). The kernel has already applied ``mode_strip_sgid`` to the requested mode, and the
caller's umask too unless the session negotiated FUSE_DONT_MASK (``fs.dont_mask``, with
ACLs on): the umask is then applied here, only where the SOURCE directory has no default
ACL (``acl.create_mode``). The daemon runs with umask 0 (``PassthruFs.init``), so SOURCE's
filesystem gives the new object that mode, or inherits the default ACL onto it as it would
for a local caller. A chown of a non-directory clears S_ISUID/S_ISGID, so those bits are
set again after it, on the permissions the object was given. A caller with the daemon's
own uid and gid needs no chown at all (the fast path).

These syscalls run inline on the trio loop: on a local filesystem they touch cached
metadata only, and a thread hop per call would cost more than the call.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from backingfs import acl, creds, syscalls
from backingfs.fsapi import RENAME_EXCHANGE, RENAME_NOREPLACE, Caller, Entry

from .inode import PassthruInode, install, make_entry

if TYPE_CHECKING:
    from .superblock import PassthruFs

_SETID = stat.S_ISUID | stat.S_ISGID


def give_owner(fs: PassthruFs, parent: PassthruInode, target: int | str, mode: int | None,
               caller: Caller) -> None:
    """Give a new object the caller's ownership (see the module docstring).

    ``target`` is a real fd of the object or the ``proc_path`` of an O_PATH fd; ``mode``
    is its final mode (None for symlinks). No-op for a caller with the daemon's ids, and
    for a daemon not running as root (new objects then stay the daemon's).
    """
    if (caller.uid == fs.uid and caller.gid == fs.gid) or fs.uid != 0:
        return  # the daemon's own ids already; or an unprivileged daemon, which cannot chown
    uid, gid = creds.new_owner(caller.uid, caller.gid, os.fstat(parent.fd))
    if isinstance(target, int):
        os.fchown(target, uid, gid)
    else:
        os.chown(target, uid, gid)  # /proc/self/fd/N: followed to the object itself
    if mode is not None and mode & _SETID and not stat.S_ISDIR(mode):
        # The permissions it was made with (a default ACL may have cut them), not the
        # requested ones: a chmod to those would widen the ACL mask again.
        if isinstance(target, int):
            os.fchmod(target, (os.fstat(target).st_mode & 0o777) | (mode & _SETID))
        else:
            os.chmod(target, (os.stat(target).st_mode & 0o777) | (mode & _SETID))


def made_mode(fs: PassthruFs, parent: PassthruInode, mode: int, caller: Caller) -> int:
    """The mode to make a new object in ``parent`` with (see the module docstring)."""
    if not fs.dont_mask:
        return mode
    return acl.create_mode(parent.fd, mode, caller.umask)


def _finish(fs: PassthruFs, parent: PassthruInode, name: bytes, mode: int | None,
            caller: Caller, remove: bool) -> Entry:
    """Look up the object just made as ``name``, give it its owner, return its entry.

    If that fails the object is removed again (``remove``: by unlink, or rmdir when the
    mode says directory), so a failed request leaves nothing behind.
    """
    try:
        fd = syscalls.open_path(parent.fd, name)
        try:
            give_owner(fs, parent, syscalls.proc_path(fd), mode, caller)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        if remove:
            try:
                if mode is not None and stat.S_ISDIR(mode):
                    os.rmdir(name, dir_fd=parent.fd)
                else:
                    os.unlink(name, dir_fd=parent.fd)
            except OSError:
                pass
        raise
    return make_entry(fs, install(fs, fd, st), st)


async def mknod(fs: PassthruFs, parent_ino: int, name: bytes, mode: int, rdev: int,
                caller: Caller) -> Entry:
    parent = fs.live(parent_ino)
    syscalls.check_name(name)
    if stat.S_IFMT(mode) == 0:
        mode |= stat.S_IFREG
    mode = made_mode(fs, parent, mode, caller)
    os.mknod(name, mode, rdev, dir_fd=parent.fd)
    return _finish(fs, parent, name, mode, caller, remove=True)


async def mkdir(fs: PassthruFs, parent_ino: int, name: bytes, mode: int,
                caller: Caller) -> Entry:
    parent = fs.live(parent_ino)
    syscalls.check_name(name)
    mode = made_mode(fs, parent, mode, caller)
    os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
    return _finish(fs, parent, name, stat.S_IFDIR | stat.S_IMODE(mode), caller, remove=True)


async def symlink(fs: PassthruFs, parent_ino: int, name: bytes, target: bytes,
                  caller: Caller) -> Entry:
    parent = fs.live(parent_ino)
    syscalls.check_name(name)
    os.symlink(target, name, dir_fd=parent.fd)
    return _finish(fs, parent, name, None, caller, remove=True)


async def link(fs: PassthruFs, ino: int, new_parent_ino: int, new_name: bytes,
               caller: Caller) -> Entry:
    inode = fs.live(ino)
    parent = fs.live(new_parent_ino)
    syscalls.check_name(new_name)
    if inode.fmt == stat.S_IFDIR:
        raise OSError(errno.EPERM, "cannot link a directory")
    # linkat(AT_SYMLINK_FOLLOW) on the magic link: the object itself, even a symlink.
    os.link(syscalls.proc_path(inode.fd), new_name, dst_dir_fd=parent.fd,
            follow_symlinks=True)
    st = os.fstat(inode.fd)
    fs.inodes.ref(inode.ino)
    return make_entry(fs, inode, st)


async def unlink(fs: PassthruFs, parent_ino: int, name: bytes, caller: Caller) -> None:
    parent = fs.live(parent_ino)
    syscalls.check_name(name)
    os.unlink(name, dir_fd=parent.fd)


async def rmdir(fs: PassthruFs, parent_ino: int, name: bytes, caller: Caller) -> None:
    parent = fs.live(parent_ino)
    syscalls.check_name(name)
    os.rmdir(name, dir_fd=parent.fd)


async def rename(fs: PassthruFs, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                 new_name: bytes, flags: int, caller: Caller) -> None:
    old_parent = fs.live(old_parent_ino)
    new_parent = fs.live(new_parent_ino)
    syscalls.check_name(old_name)
    syscalls.check_name(new_name)
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise OSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
    if flags:
        syscalls.renameat2(old_parent.fd, old_name, new_parent.fd, new_name, flags)
    else:
        os.rename(old_name, new_name, src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd)
