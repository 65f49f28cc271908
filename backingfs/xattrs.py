"""Extended attributes on backing objects, by fd or by (dir_fd, name), never following symlinks.

Two ways to name the object, matching how backing objects are held:

* ``f*xattr(fd, ...)``: an fd of the object itself, O_PATH included (what lookups hold,
  and the only fd a symlink or device node can have without opening it). The f*xattr
  syscalls answer EBADF for an O_PATH fd, so every call goes through the fd's /proc magic
  link ``/proc/self/fd/N``, which reaches the object for any kind of fd: one syscall, where
  trying the fd first cost three (the call, an fcntl to tell why it failed, the retry) for
  the O_PATH fds that are most of ours. The magic link is *followed* (that is the jump to
  the fd's object) and the kernel does not then follow the object even if it is a symlink,
  so this reaches a symlink's own xattrs; with follow_symlinks=False the call would act on
  the procfs link itself and fail with ENODATA/EOPNOTSUPP.
* ``*xattrat(dir_fd, name, ...)``: an entry in a directory held by fd (any kind, O_PATH
  included), reached as ``/proc/self/fd/DIR/NAME`` with follow_symlinks=False (the l*xattr
  syscalls), so a symlink entry is never followed. ``name`` must be one path component.

Values are bytes; names may be str or bytes; listings are ``list[bytes]``. Errors are the
kernel's, as OSError: ENODATA for a missing name (also what XATTR_REPLACE on a missing name
gives), EEXIST for XATTR_CREATE on an existing one, ERANGE for a value or list over the
64 KiB xattr limit, E2BIG for a value the kernel refuses as too big, ENOTSUP (== EOPNOTSUPP)
where the filesystem or namespace has no xattrs, EPERM for user.* on symlinks and devices.
All functions block (they are syscalls); call them from worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import TypeVar

#: setxattr flags: fail with EEXIST if the name exists / with ENODATA if it does not.
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE

Name = str | bytes
T = TypeVar("T")


def fgetxattr(fd: int, name: Name) -> bytes:
    """The value of ``name`` on the object of ``fd`` (O_PATH fds allowed)."""
    return _on_fd(os.getxattr, fd, name)


def flistxattr(fd: int) -> list[bytes]:
    """The xattr names on the object of ``fd`` (O_PATH fds allowed), in kernel order."""
    return [os.fsencode(n) for n in _on_fd(os.listxattr, fd)]


def fsetxattr(fd: int, name: Name, value: bytes, flags: int = 0) -> None:
    """Set ``name`` to ``value`` on the object of ``fd``; ``flags`` is 0, XATTR_CREATE or
    XATTR_REPLACE."""
    _on_fd(os.setxattr, fd, name, value, flags)


def fremovexattr(fd: int, name: Name) -> None:
    """Remove ``name`` from the object of ``fd`` (ENODATA if it is not there)."""
    _on_fd(os.removexattr, fd, name)


def _on_fd(call: Callable[..., T], fd: int, *args: object) -> T:
    try:
        return call(b"/proc/self/fd/%d" % fd, *args, follow_symlinks=True)
    except FileNotFoundError:
        # No such magic link means fd is not open (an open fd's link reaches its object even
        # after the object was unlinked); an open fd's ENOENT is the filesystem's own answer
        # (a FUSE or network filesystem below us may give it) and goes up as it is.
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None
        raise


def getxattrat(dir_fd: int, entry: Name, name: Name) -> bytes:
    """The value of ``name`` on ``entry`` in the directory ``dir_fd``, not following it."""
    return os.getxattr(_proc_entry(dir_fd, entry), name, follow_symlinks=False)


def listxattrat(dir_fd: int, entry: Name) -> list[bytes]:
    """The xattr names on ``entry`` in the directory ``dir_fd``, not following it."""
    names = os.listxattr(_proc_entry(dir_fd, entry), follow_symlinks=False)
    return [os.fsencode(n) for n in names]


def setxattrat(dir_fd: int, entry: Name, name: Name, value: bytes, flags: int = 0) -> None:
    """Set ``name`` on ``entry`` in the directory ``dir_fd``, not following it."""
    os.setxattr(_proc_entry(dir_fd, entry), name, value, flags, follow_symlinks=False)


def removexattrat(dir_fd: int, entry: Name, name: Name) -> None:
    """Remove ``name`` from ``entry`` in the directory ``dir_fd``, not following it."""
    os.removexattr(_proc_entry(dir_fd, entry), name, follow_symlinks=False)


def _proc_entry(dir_fd: int, entry: Name) -> bytes:
    raw = os.fsencode(entry)
    if not raw or b"/" in raw or raw in (b".", b".."):
        raise OSError(errno.EINVAL, f"not a single path component: {entry!r}")
    return b"/proc/self/fd/%d/%s" % (dir_fd, raw)
