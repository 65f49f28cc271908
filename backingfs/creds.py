"""Credential policy: whose credentials backing syscalls run under, and who owns new objects.

The kernel's backing-file helpers run each backing call under ``ctx->cred``: overlayfs the
mounter's, FUSE passthrough the daemon's. Python cannot switch credentials per request
(``setresuid`` applies to every thread), so both filesystems follow overlayfs: **every backing
syscall runs as the daemon** (:class:`MounterCreds`), caller permissions are enforced on the
stacked inode (ideally by the kernel through ``default_permissions``), and a new object is
given the caller's ownership explicitly after it is made.

Making an object as the daemon differs from making it as the caller in three ways, which the
helpers here put back the way the kernel would have done it for the caller:

* **owner** (:func:`new_owner`, the kernel's ``inode_init_owner``): uid is the caller's
  fsuid; gid is the parent's gid when the parent directory is setgid, else the caller's fsgid.
* **mode** (:func:`new_mode`, the kernel's ``vfs_prepare_mode`` then ``inode_init_owner``):
  S_ISGID is dropped from a group-executable non-directory created in a setgid directory by a
  caller outside that directory's group (``mode_strip_sgid``; the daemon, being root, would
  keep it); then the umask; then a directory in a setgid directory gets S_ISGID.
* **chown clears set-id bits**: ``chown`` of a non-directory clears S_ISUID (and S_ISGID
  when group-exec) even for root, so :func:`chown_new` chowns first and sets the final mode
  after.

Over FUSE the kernel usually applies the umask before the request reaches us (unless the
filesystem negotiated FUSE_DONT_MASK) and has already run ``mode_strip_sgid``; applying them
again is harmless, and ``apply_umask=False`` skips the umask. The daemon's own process umask
also masks what it creates, so pass the computed mode to :func:`chown_new` (or run with
umask 0) to land exactly on :func:`new_mode`'s answer.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MounterCreds:
    """The default (and only) policy: backing syscalls run with the daemon's credentials.

    ``uid``/``gid`` record the daemon's effective ids at construction, for logging and for
    the owner checks overlayfs makes against the mounter (e.g. O_NOATIME needs ownership or
    CAP_FOWNER). Switching credentials is a no-op: there is nothing to override.
    """

    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)

    @property
    def is_privileged(self) -> bool:
        """Whether the daemon runs as root (may chown, mknod, set trusted.* xattrs)."""
        return self.uid == 0


def new_owner(caller_uid: int, caller_gid: int, parent_st: os.stat_result) -> tuple[int, int]:
    """``(uid, gid)`` a new object gets when the caller creates it in ``parent_st``'s dir.

    The kernel's ``inode_init_owner``: the caller's uid; the parent's gid if the parent is a
    setgid directory (BSD group semantics), else the caller's gid. Pure.
    """
    if parent_st.st_mode & stat.S_ISGID:
        return caller_uid, parent_st.st_gid
    return caller_uid, caller_gid


def new_mode(
    mode: int,
    umask: int,
    parent_st: os.stat_result,
    is_dir: bool,
    caller_gid: int,
    caller_in_group: bool,
    *,
    apply_umask: bool = True,
) -> int:
    """The mode a new object gets, as the kernel computes it for the creating caller.

    ``mode`` is the requested mode (file-type bits, if present, are kept unchanged).
    ``caller_in_group`` is whether the caller is in the parent directory's group through a
    supplementary group, or has CAP_FSETID (the kernel's ``in_group_or_capable``); the
    caller's own ``caller_gid`` equal to the parent's gid counts as in the group too. Steps:
    ``mode_strip_sgid`` (S_ISGID dropped from a non-directory with S_ISGID|S_IXGRP, in a
    setgid parent, by a caller outside the parent's group), then ``mode & ~umask`` when
    ``apply_umask``, then S_ISGID added to a directory made in a setgid parent. Pure.
    """
    parent_setgid = bool(parent_st.st_mode & stat.S_ISGID)
    sgid_exec = stat.S_ISGID | stat.S_IXGRP
    if (
        not is_dir
        and parent_setgid
        and (mode & sgid_exec) == sgid_exec
        and not (caller_in_group or caller_gid == parent_st.st_gid)
    ):
        mode &= ~stat.S_ISGID
    if apply_umask:
        mode &= ~(umask & 0o777)
    if is_dir and parent_setgid:
        mode |= stat.S_ISGID
    return mode


def caller_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of process ``pid`` (``Groups:`` in /proc/PID/status).

    Empty on any error (the process exited): the caller then counts as in no extra group,
    which errs towards stripping S_ISGID. Blocking (a small procfs read).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        return frozenset()
    return frozenset()


def chown_new(
    target: int | str | bytes,
    uid: int,
    gid: int,
    *,
    dir_fd: int | None = None,
    mode: int | None = None,
) -> None:
    """Give a freshly created object its owner, then (if ``mode`` is given) its final mode.

    ``target`` is either an fd of the object (O_PATH allowed) or a name relative to
    ``dir_fd``; a name is never followed, so symlinks, device nodes and fifos are covered.
    ``mode`` (permission and set-id bits; any file-type bits are ignored) is applied after
    the chown because chown clears S_ISUID/S_ISGID on non-directories; it is skipped for
    symlinks, whose mode means nothing. Errors propagate as OSError. Blocking.
    """
    if isinstance(target, int):
        _chown_fd(target, uid, gid, mode)
        return
    if dir_fd is None:
        raise ValueError("chown_new by name needs dir_fd")
    os.chown(target, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    if mode is None:
        return
    # Open the object itself (never following) so the chmod cannot land on a symlink target.
    fd = os.open(target, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))
    finally:
        os.close(fd)


def _chown_fd(fd: int, uid: int, gid: int, mode: int | None) -> None:
    try:
        os.fchown(fd, uid, gid)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        # O_PATH fd: its /proc magic link reaches the object itself; the kernel does not
        # follow it further even when the object is a symlink.
        os.chown(f"/proc/self/fd/{fd}", uid, gid)
    if mode is None or stat.S_ISLNK(os.fstat(fd).st_mode):
        return
    try:
        os.fchmod(fd, stat.S_IMODE(mode))
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))


def check_access(st: os.stat_result, mode: int, uid: int, gid: int, pid: int) -> None:
    """access(2) by mode bits: raise OSError(EACCES) unless ``uid``/``gid`` (and the
    supplementary groups of ``pid``) may access an object with ``st`` for ``mode``.

    Root passes every check except X on a non-directory no one may execute, as the kernel's
    generic_permission does. Both filesystems use it only as a fallback: with
    default_permissions the kernel checks for itself and never sends ACCESS.
    """
    want = mode & (os.R_OK | os.W_OK | os.X_OK)
    if not want:
        return
    if uid == 0:
        if (want & os.X_OK and not stat.S_ISDIR(st.st_mode)
                and not st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)):
            raise OSError(errno.EACCES, "no execute bit")
        return
    if uid == st.st_uid:
        bits = (st.st_mode >> 6) & 7
    elif gid == st.st_gid or st.st_gid in caller_groups(pid):
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    if want & ~bits:
        raise OSError(errno.EACCES, "permission denied")
