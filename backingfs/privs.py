"""Privilege stripping (the kernel's file_remove_privs) before a write or truncate.

What we implement, rule by rule, with the kernel function it mirrors (fs/attr.c, fs/inode.c,
security/commoncap.c as of v6.x):

* Only regular files are touched (``file_remove_privs_flags`` returns early otherwise).
* **S_ISUID** is cleared whenever it is set (``setattr_should_drop_suidgid``: "suid always
  must be killed").
* **S_ISGID** is cleared when S_IXGRP is also set (a real setgid executable). Without
  S_IXGRP the bit marks mandatory locking on old kernels, and since v6.2
  (``setattr_should_drop_sgid``) it is cleared too, but only when the writer is not in the
  file's group; pass ``caller_in_group=False`` to get that rule, the default keeps the bit.
* Both bits are kept if the writer has **CAP_FSETID** (``capable(CAP_FSETID)``).
* **The owner gets no exemption**: the kernel never compares the writer's uid with the
  owner's. An owner writing its own setuid file loses the bit. ``caller_uid``/``owner_uid``
  are accepted so callers state who writes, but they do not change the answer; root without
  CAP_FSETID (e.g. in a user namespace that dropped it) also loses the bits.
* **security.capability** is removed on every write or truncate, by anyone, root included
  and CAP_FSETID regardless: ``dentry_needs_remove_privs`` asks
  ``security_inode_need_killpriv`` → ``cap_inode_need_killpriv``, which is true whenever the
  xattr exists, and ``cap_inode_killpriv`` removes it. A file capability must never survive
  a change of the binary it blesses.

Callers hold the stacked inode's lock (the kernel holds ``inode_lock``) so the mode they pass
is current and no concurrent chmod is lost. The daemon runs as root (mounter credentials), so
it may fchmod and remove security.* regardless of the file's owner.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Protocol

from backingfs import xattrs
from backingfs.creds import caller_groups

#: Name of the file-capabilities xattr (VFS_CAP_* format).
CAPABILITY_XATTR = b"security.capability"

#: Bit number of CAP_FSETID in the capability sets of /proc/PID/status.
CAP_FSETID = 4

#: Errnos meaning "there is no capability xattr to remove": absent, or xattrs unsupported.
_NO_CAPABILITY = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


def needs_kill_privs(
    mode: int,
    caller_uid: int,
    owner_uid: int,
    caller_has_fsetid: bool,
    *,
    caller_in_group: bool = True,
) -> int:
    """The mode bits (a subset of S_ISUID|S_ISGID) a write by this caller must clear.

    ``mode`` is an ``st_mode``; if it carries a file type, non-regular files give 0 (bare
    permission bits are taken as a regular file). ``caller_uid`` and ``owner_uid`` do not
    affect the result (see the module docstring: the kernel gives owners no exemption).
    ``caller_in_group`` is whether the writer is in the file's group; it only matters for
    S_ISGID without S_IXGRP (the v6.2+ rule). Pure; never blocks.
    """
    del caller_uid, owner_uid  # the kernel's rule does not look at ownership
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        return 0
    if caller_has_fsetid:
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not caller_in_group):
        kill |= stat.S_ISGID
    return kill


def strip_privs(
    fd: int,
    st: os.stat_result,
    caller_uid: int,
    caller_has_fsetid: bool,
    *,
    caller_in_group: bool = True,
) -> int:
    """Apply :func:`needs_kill_privs` and the security.capability rule to a backing file.

    ``fd`` is the backing file (a read/write fd or an O_PATH fd); ``st`` its current stat.
    Clears the bits with fchmod when there are any, and removes ``security.capability``
    when present (missing, or xattrs unsupported, is fine). Returns the new ``st_mode``, so
    the caller can update the stacked inode's cached mode. Other errors propagate as
    OSError. Blocking: run in a worker thread, under the stacked inode's lock.
    """
    if not stat.S_ISREG(st.st_mode):
        return st.st_mode
    mode = st.st_mode
    kill = needs_kill_privs(
        mode, caller_uid, st.st_uid, caller_has_fsetid, caller_in_group=caller_in_group
    )
    if kill:
        mode &= ~kill
        _fchmod(fd, stat.S_IMODE(mode))
    try:
        xattrs.fremovexattr(fd, CAPABILITY_XATTR)
    except OSError as e:
        if e.errno not in _NO_CAPABILITY:
            raise
    return mode


class StatLike(Protocol):
    @property
    def st_mode(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...


def kill_mask(st: StatLike, gid: int, pid: int) -> int:
    """The set-id bits of ``st`` a write or truncate by a caller without CAP_FSETID clears,
    the caller's primary group being ``gid`` and its process ``pid`` (read for the
    supplementary groups only when the answer depends on them: S_ISGID without S_IXGRP)."""
    mode = st.st_mode
    if not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    in_group = True
    if mode & stat.S_ISGID and not mode & stat.S_IXGRP:
        in_group = st.st_gid == gid or st.st_gid in caller_groups(pid)
    return needs_kill_privs(mode, 0, st.st_uid, False, caller_in_group=in_group)


def kill_suidgid(fd: int, gid: int, pid: int) -> os.stat_result | None:
    """Clear what a write by a caller without CAP_FSETID clears (``kill_mask``) on the
    regular file behind ``fd``: the daemon's part of FUSE_HANDLE_KILLPRIV_V2, where the
    kernel leaves it to us. Returns the new stat when a bit was cleared, else None (nothing
    to do costs one fstat). security.capability is not touched: the backing filesystem
    removes it itself when the write or truncate that follows reaches it."""
    st = os.fstat(fd)
    kill = kill_mask(st, gid, pid)
    if not kill:
        return None
    _fchmod(fd, stat.S_IMODE(st.st_mode & ~kill))
    return os.fstat(fd)


def caller_has_fsetid(pid: int) -> bool:
    """Whether process ``pid`` has CAP_FSETID in its effective set (False on any error).

    Reads ``CapEff`` from /proc/PID/status. A process that exited (or a pid we cannot read)
    is treated as unprivileged, which errs on the side of clearing the bits. Blocking (a
    small procfs read).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def _fchmod(fd: int, mode: int) -> None:
    try:
        os.fchmod(fd, mode)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        # An O_PATH fd cannot be fchmod'ed; its /proc magic link reaches the same inode.
        os.chmod(f"/proc/self/fd/{fd}", mode)
