"""Mounting a FUSE connection without libfuse: mount(2) as root, fusermount3 otherwise.

What libfuse 3.14's ``fuse_kern_mount`` does, in the parts our CLIs use:
- Option tokens are sorted into mount(2) flags (``ro``, ``nosuid``, ``noatime``, ...; the
  defaults are ``nosuid,nodev`` as in libfuse, ``suid``/``dev`` clear them), kernel data
  options (``allow_other``, ``default_permissions``, ``max_read=``, SELinux contexts) and the
  two naming options: ``fsname=`` (the mount source) and ``subtype=`` (fstype ``fuse.X``).
- As root the device is opened here and mounted with ``fd=N,rootmode=...,user_id=...,
  group_id=...``; otherwise ``fusermount3 -o OPTS -- MNT`` mounts it and hands the device fd
  back over the unix socket named by ``_FUSE_COMMFD`` (SCM_RIGHTS).
- Unmount: ``umount2(MNT_DETACH)`` as root, ``fusermount3 -u -q -z`` otherwise; a mount the
  kernel already ended (``fusermount3 -u`` from outside) is not touched again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import syscalls
from .options import parse_option

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

#: flag option -> (bits set, bits cleared)
_FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0), "nolazytime": (0, MS_LAZYTIME),
}
#: Options the kernel's fuse mount parser takes in its data string.
_KERNEL_FLAGS = frozenset({"allow_other", "default_permissions"})
_KERNEL_VALUES = frozenset({"max_read", "blksize", "context", "fscontext", "defcontext",
                            "rootcontext"})
#: libfuse-level options that mean nothing to mount(2) (fusermount3 understands them).
_FUSERMOUNT_ONLY = frozenset({"auto_unmount", "allow_root", "blkdev", "nonempty"})


@dataclass
class MountSpec:
    """What to mount: the result of sorting the option tokens."""

    flags: int = MS_NOSUID | MS_NODEV
    data: list[str] = field(default_factory=list)
    fsname: str = ""
    subtype: str = ""
    allow_root: bool = False
    tokens: list[str] = field(default_factory=list)  # as given, for fusermount3

    @property
    def fstype(self) -> str:
        return f"fuse.{self.subtype}" if self.subtype else "fuse"


def mount_spec(options: Iterable[str]) -> MountSpec:
    """Sort libfuse option tokens (unescaped) into a MountSpec; ValueError on unknown."""
    spec = MountSpec()
    for tok in options:
        key, value = parse_option(tok)
        spec.tokens.append(tok)
        if value is None and key in _FLAG_OPTIONS:
            set_bits, clear_bits = _FLAG_OPTIONS[key]
            spec.flags = (spec.flags | set_bits) & ~clear_bits
        elif value is None and key in _KERNEL_FLAGS:
            spec.data.append(key)
        elif value is not None and key in _KERNEL_VALUES:
            spec.data.append(f"{key}={value}")
        elif key == "fsname" and value is not None:
            spec.fsname = value
        elif key == "subtype" and value is not None:
            spec.subtype = value
        elif value is None and key in _FUSERMOUNT_ONLY:
            if key == "allow_root":
                spec.allow_root = True
        else:
            raise ValueError(f"unknown mount option {tok!r}")
    if spec.allow_root and "allow_other" not in spec.data:
        spec.data.append("allow_other")  # the kernel only knows allow_other
    return spec


def mount_device(mountpoint: str, spec: MountSpec) -> int:
    """Open /dev/fuse and mount it on ``mountpoint``; returns the device fd (CLOEXEC).

    As root with mount(2); otherwise through fusermount3. Raises OSError with a message.
    """
    if os.geteuid() == 0:
        return _mount_root(mountpoint, spec)
    return _mount_fusermount(mountpoint, spec)


def _mount_root(mountpoint: str, spec: MountSpec) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.stat(mountpoint)
        data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}",
                         f"user_id={os.getuid()}", f"group_id={os.getgid()}", *spec.data])
        source = spec.fsname or spec.fstype
        libc = syscalls.libc
        res = libc.mount(source.encode(), mountpoint.encode(), spec.fstype.encode(),
                         ctypes.c_ulong(spec.flags), data.encode())
        if res != 0:
            err = ctypes.get_errno()
            if err == errno.ENODEV and spec.subtype:
                # A kernel without subtype support: plain "fuse", subtype in the source.
                res = libc.mount(f"{spec.subtype}#{source}".encode(), mountpoint.encode(),
                                 b"fuse", ctypes.c_ulong(spec.flags), data.encode())
                err = ctypes.get_errno() if res != 0 else 0
            if err:
                raise OSError(err, f"mount(2) failed: {os.strerror(err)}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _mount_fusermount(mountpoint: str, spec: MountSpec) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = ",".join(t.replace(",", "\\,") for t in spec.tokens)
        argv = ["fusermount3", *(("-o", opts) if opts else ()), "--", mountpoint]
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            proc = subprocess.run(argv, env=env, pass_fds=(theirs.fileno(),),
                                  capture_output=True, timeout=60)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "fusermount3 not found on PATH") from None
        theirs.close()
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
            raise OSError(errno.EPERM, f"fusermount3 failed: {msg}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError(errno.EIO, "fusermount3 did not pass the /dev/fuse fd")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def unmount(mountpoint: str) -> None:
    """Lazily detach our mount. Raises OSError when that fails."""
    if os.geteuid() == 0:
        libc = syscalls.libc
        if libc.umount2(mountpoint.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                return
            raise OSError(err, f"umount2({mountpoint}) failed: {os.strerror(err)}")
        return
    proc = subprocess.run(["fusermount3", "-u", "-q", "-z", "--", mountpoint],
                          capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise OSError(errno.EIO, proc.stderr.decode(errors="replace").strip())
