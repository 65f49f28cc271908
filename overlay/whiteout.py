"""Whiteout and opaque formats: char 0/0, the xattr form, and the AUFS ``.wh.`` names.

Read, in every layer (reference §B.3, §B.4):
- a character device 0/0 is a whiteout (the kernel's format, which we write);
- a zero-size regular file carrying ``<prefix>whiteout`` is a whiteout (the xattr form tools
  write, e.g. for nested overlays), honoured in a directory whose ``<prefix>opaque`` is
  ``x`` as the kernel does;
- ``.wh.NAME`` beside ``NAME`` whites it out, ``.wh..wh..opq`` makes its directory opaque
  (containers-storage stores layers in this AUFS form when a mount program is used); the
  ``.wh.`` entries themselves are never shown;
- ``<prefix>opaque`` = ``y`` makes a directory opaque.

Written: char 0/0 (``WHITEOUT_CHR``), or ``.wh.NAME`` (``WHITEOUT_AUFS``) when mknod is
refused. Every function blocks (syscalls); ``dir_fd`` may be an O_PATH fd.
"""

from __future__ import annotations

import errno
import os
import stat

from backingfs import xattrs as bxattrs

WHITEOUT_CHR = "chr"
WHITEOUT_AUFS = "aufs"

AUFS_PREFIX = b".wh."
AUFS_OPAQUE = b".wh..wh..opq"

#: Errnos meaning "no such xattr here" (absent, or xattrs unsupported on that object).
_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})


def is_aufs_name(name: bytes) -> bool:
    """A ``.wh.`` bookkeeping name, never visible through the overlay."""
    return name.startswith(AUFS_PREFIX)


def aufs_name(name: bytes) -> bytes:
    return AUFS_PREFIX + name


def is_chr_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# SHARE: same as passthru/inode.py:lookup_fd's stat step (fstatat NOFOLLOW, None if absent).
def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """``fstatat(dir_fd, name, AT_SYMLINK_NOFOLLOW)``, or None if there is no such entry."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def get_xattr_at(dir_fd: int, name: bytes, xname: bytes) -> bytes | None:
    try:
        return bxattrs.getxattrat(dir_fd, name, xname)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise


def get_xattr_fd(fd: int, xname: bytes) -> bytes | None:
    # Straight through the fd's /proc magic link, where bxattrs.fgetxattr ends up for the
    # O_PATH fds namei holds: its fgetxattr try fails EBADF on them and costs an fcntl to
    # tell why, three syscalls and an exception per directory looked up instead of one.
    # The link reaches the same object for any other kind of fd.
    try:
        return os.getxattr(b"/proc/self/fd/%d" % fd, xname)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise


def is_whiteout(dir_fd: int, name: bytes, st: os.stat_result, prefix: bytes,
                dir_has_xwhiteouts: bool) -> bool:
    """Whether the entry ``name`` (stat ``st``) in ``dir_fd`` is a whiteout object."""
    if is_chr_whiteout(st):
        return True
    return (dir_has_xwhiteouts and stat.S_ISREG(st.st_mode) and st.st_size == 0
            and get_xattr_at(dir_fd, name, prefix + b"whiteout") is not None)


def has_aufs_whiteout(dir_fd: int, name: bytes) -> bool:
    if len(name) + len(AUFS_PREFIX) > 255:
        return False
    return lstat_at(dir_fd, aufs_name(name)) is not None


def opaque_value(dir_fd: int, prefix: bytes) -> bytes | None:
    """The ``<prefix>opaque`` xattr of the directory ``dir_fd`` (b"y", b"x"), or None."""
    return get_xattr_fd(dir_fd, prefix + b"opaque")


def dir_state(dir_fd: int, prefix: bytes, is_bottom: bool = False) -> tuple[bool, bool]:
    """``(is_opaque, has_xwhiteouts)`` of the layer directory ``dir_fd``.

    ``is_bottom``: nothing lies below the directory in its merge (it is in its parent's
    last layer), so its opacity cannot matter and the ``.wh..wh..opq`` marker is not looked
    for (is_opaque then reflects the xattr only). The xattr is still read: its ``x`` value
    decides whether the directory's own xattr whiteouts hide names."""
    value = opaque_value(dir_fd, prefix)
    if value == b"y":
        return True, False
    if not is_bottom and lstat_at(dir_fd, AUFS_OPAQUE) is not None:
        return True, value == b"x"
    return False, value == b"x"


def make_whiteout(dir_fd: int, name: bytes, kind: str) -> None:
    """Create a whiteout for ``name`` in ``dir_fd``: char 0/0 at ``name``, or ``.wh.NAME``.
    FileExistsError if the entry it would occupy exists."""
    if kind == WHITEOUT_CHR:
        os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=_real_dir(dir_fd))
        return
    fd = os.open(aufs_name(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o000,
                 dir_fd=_real_dir(dir_fd))
    os.close(fd)


def probe_whiteout(work_fd: int) -> str:
    """Try a char 0/0 mknod in work/ (then remove it): WHITEOUT_CHR, or WHITEOUT_AUFS if
    refused (EPERM in a user namespace, or a filesystem without device nodes)."""
    name = b"#whiteout-probe"
    try:
        os.mknod(name, stat.S_IFCHR, 0, dir_fd=work_fd)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL):
            return WHITEOUT_AUFS
        raise
    os.unlink(name, dir_fd=work_fd)
    return WHITEOUT_CHR


def _real_dir(dir_fd: int) -> int:
    # mknodat/openat accept an O_PATH dir fd as dirfd directly; kept as a seam for tests.
    return dir_fd
