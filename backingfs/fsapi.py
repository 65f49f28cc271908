"""The operations interface overlay and passthru implement, in plain Python types.

Neither filesystem imports pyfuse3: ``bridge.py`` adapts a ``Filesystem`` to pyfuse3 (and a
native /dev/fuse session may adapt it to the kernel protocol directly, DESIGN §7).

Contracts every implementation keeps:
- Errors are ``OSError(errno, msg)``; the bridge turns them into replies. Any other
  exception is a bug: the bridge logs it with its traceback and answers EIO.
- Every ``Entry`` returned (lookup, mknod, mkdir, symlink, link, create, tmpfile) and every
  ``DirEntry`` handed to a readdir ``reply`` carries **one lookup reference** on its inode,
  taken by the filesystem (``InodeTable.lookup``/``ref``), except a *bare* DirEntry
  (``bare=True``: name, d_ino and type only, for when no inode can be made, e.g. out of
  fds), which carries none. The bridge gives back the reference of a readdir entry the
  kernel did not accept (``reply`` returned False) by calling ``forget``; a filesystem
  never counts entries itself.
- ``ino`` numbers are the kernel's node ids and the reported ``st_ino`` at once (pyfuse3
  ties them): never reuse one the kernel may still hold. The root is ``ROOT_INO`` (1).
- Methods not implemented raise ``OSError(ENOSYS)`` (the default below), except
  ``forget``/``release``/``releasedir``/``flush``/``fsync``/``fsyncdir`` whose defaults
  succeed, and ``destroy`` which does nothing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .attrs import Attr
from .fileattr import FileAttr

#: ``read_start``'s completion: the data read, or the error.
ReadDone = Callable[[memoryview | OSError], None]

if TYPE_CHECKING:
    from .notify import Notifier

ROOT_INO = 1

#: renameat2 flags, as the kernel defines them.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# The per-request records below are NamedTuples, not frozen dataclasses: they are built
# for every request and every readdirplus entry, where a tuple is several times cheaper.


class Caller(NamedTuple):
    """Who made the request (the FUSE request context)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


class Entry(NamedTuple):
    """An entry or attribute reply. ``attr.st_ino`` is the inode number, and the kernel's
    node id unless ``node`` gives another (native session only: pyfuse3 sends st_ino as
    the node id). Two node ids with one st_ino are one file seen as two kernel inodes
    (overlay's lower passthrough)."""

    attr: Attr
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    generation: int = 0
    node: int = 0

    @property
    def ino(self) -> int:
        """The node id."""
        return self.node or self.attr.st_ino


class DirEntry(NamedTuple):
    """One readdir entry; ``next_off`` is the offset to resume *after* this entry.

    ``bare``: the filesystem could not give the entry an inode (it ran out of file
    descriptors): it carries no lookup reference, only the name, ``attr.st_ino`` (d_ino)
    and the type bits of ``attr.st_mode``. A readdirplus reply sends it with node id 0,
    which the kernel lists without instantiating; it LOOKUPs the name when it needs more.
    """

    name: bytes
    entry: Entry
    next_off: int
    bare: bool = False


@dataclass(frozen=True, slots=True)
class OpenReply:
    """``backing``: an fd the kernel may serve this open's read/write from directly (FUSE
    passthrough, native session only), kept open by the handle; None when the data must go
    through the filesystem (e.g. an overlay file that a write could still copy up)."""

    fh: int
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    backing: int | None = None


@dataclass(frozen=True, slots=True)
class SetattrRequest:
    """The fields to change; ``None`` leaves one alone. Times are absolute nanoseconds:
    the bridge resolves UTIME_NOW to the current time before calling."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    #: Also clear the set-id bits this caller's write or truncate clears (it lacks
    #: CAP_FSETID and the kernel leaves the stripping to us: HANDLE_KILLPRIV_V2).
    kill_suidgid: Caller | None = None
    #: The times set are the current time because the caller gave none (UTIME_NOW,
    #: touch(1)), not times it chose: a chattr +a file allows the one, not the other.
    #: Known on the native session only (pyfuse3 resolves UTIME_NOW before we see it).
    times_now: bool = False

    def only_cmtime(self) -> bool:
        """Whether this sets the ctime, perhaps the mtime, and nothing else: what the
        kernel's writeback cache sends for the times it keeps (fuse_flush_times, naming a
        handle at close and fsync), and, under that cache only, for a caller's
        utimensat(2) of the mtime alone (naming none)."""
        return (self.ctime_ns is not None and self.mode is None and self.uid is None
                and self.gid is None and self.size is None and self.atime_ns is None
                and self.kill_suidgid is None)


@dataclass(frozen=True, slots=True)
class Statfs:
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_favail: int = 0
    f_namemax: int = 255

    @classmethod
    def from_statvfs(cls, sv: os.statvfs_result) -> Statfs:
        return cls(f_bsize=sv.f_bsize, f_frsize=sv.f_frsize, f_blocks=sv.f_blocks,
                   f_bfree=sv.f_bfree, f_bavail=sv.f_bavail, f_files=sv.f_files,
                   f_ffree=sv.f_ffree, f_favail=sv.f_favail, f_namemax=sv.f_namemax)


#: ``reply(entry) -> bool``: False once the kernel's buffer is full; stop producing then.
ReaddirReply = Callable[[DirEntry], bool]


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, "operation not implemented")


class Filesystem:
    """Base class of a filesystem served through the bridge. See the module docstring."""

    #: Ask the kernel for its writeback cache (FUSE_CAP_WRITEBACK_CACHE).
    enable_writeback_cache: bool = False
    #: Let the kernel enforce POSIX ACLs (FUSE_CAP_POSIX_ACL). Inheriting a directory's
    #: default ACL stays the filesystem's job: see ``dont_mask``.
    enable_acl: bool = False
    #: Let the kernel keep directory listings in its page cache across opens (native
    #: session: FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE on OPENDIR). It drops them when the
    #: directory changes through the mount, or when a revalidated mtime differs, so the
    #: staleness is that of the attribute timeout.
    cache_dirs: bool = False
    #: Directories need no handle (native session, with ``cache_dirs``): OPENDIR is
    #: answered ENOSYS once, after which the kernel opens directories without asking
    #: (FUSE_NO_OPENDIR_SUPPORT: no OPENDIR or RELEASEDIR round trips, listings kept in
    #: its page cache as with ``cache_dirs``) and lists them with ``readdir_inode`` and
    #: syncs them with ``fsyncdir_inode``, by node id. Offsets must then mean the same in
    #: every call (getdents.py). ``opendir`` and friends still serve the other front-ends.
    handleless_dirs: bool = False
    #: Set by the front-end before ``init``: the kernel may serve opens that offer a
    #: ``backing`` fd itself. Their writes then never reach the filesystem, so attributes
    #: must come from the backing file (getattr stats it), not from a cache of our writes.
    passthrough: bool = False
    #: Set by the front-end before ``init``: an ``Entry.node`` apart from ``attr.st_ino``
    #: is honoured (the native session; pyfuse3 sends st_ino as the node id).
    node_ids: bool = False
    #: Set by the front-end before ``init``: readdir may give ``.`` and ``..`` as bare
    #: entries (d_ino and type only, no reference). The native session: the kernel lists
    #: the dots of a READDIRPLUS but never instantiates them (fuse_direntplus_link skips
    #: them), so their attributes and references were work thrown away on every listing.
    #: pyfuse3 cannot send a bare entry.
    bare_dots: bool = False
    #: Set by the front-end before ``init``: the kernel leaves the umask to us
    #: (FUSE_DONT_MASK, asked for with ``enable_acl``): the modes of mknod, mkdir and
    #: create come unmasked, with ``Caller.umask``, which applies only where the parent
    #: directory has no default ACL (``backingfs.acl``). Otherwise the kernel has applied
    #: it already, and applying it again changes nothing.
    dont_mask: bool = False
    #: Set by the front-end before ``init``: how to tell the kernel that a cached entry or
    #: inode changed behind its back (``notify.Notifier``); None outside a session.
    notifier: Notifier | None = None

    def init(self) -> None:
        """Called once the session is up, before the first request. Must not raise."""

    def relieve_fds(self) -> bool:
        """A request met EMFILE/ENFILE: have the kernel drop unused inodes (and so their
        fds). True if that was asked, so a retry after a moment may succeed."""
        return False

    def backing_declined(self, fh: int) -> None:
        """The open ``fh`` offered a ``backing`` fd but is answered without passthrough
        (refused by the kernel, or the inode has cached opens): its data goes through
        read/write. Called before the open's reply. Must not raise."""

    async def destroy(self) -> None:
        """Called at unmount, after the last request: drain I/O, forget every inode."""

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        raise _enosys()

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """Drop ``n`` lookup references from each ``(ino, n)``."""

    async def getattr(self, ino: int, caller: Caller) -> Entry:
        raise _enosys()

    async def birth_time(self, ino: int) -> int | None:
        """The birth time (ns) of ``ino``'s backing object; None where that filesystem
        keeps none. Native session only: the kernel asks (FUSE_STATX, with the rest of
        ``getattr``) when a statx(2) wants STATX_BTIME, and keeps the answer with the
        other attributes. Without it (ENOSYS, and always through pyfuse3) statx reports
        no birth time."""
        raise _enosys()

    async def setattr(self, ino: int, changes: SetattrRequest, fh: int | None,
                      caller: Caller) -> Entry:
        raise _enosys()

    async def readlink(self, ino: int, caller: Caller) -> bytes:
        raise _enosys()

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> Entry:
        raise _enosys()

    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        raise _enosys()

    async def unlink(self, parent: int, name: bytes, caller: Caller) -> None:
        raise _enosys()

    async def rmdir(self, parent: int, name: bytes, caller: Caller) -> None:
        raise _enosys()

    async def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        raise _enosys()

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int, caller: Caller) -> None:
        raise _enosys()

    async def link(self, ino: int, new_parent: int, new_name: bytes, caller: Caller) -> Entry:
        raise _enosys()

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        raise _enosys()

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[OpenReply, Entry]:
        raise _enosys()

    async def tmpfile(self, parent: int, mode: int, flags: int,
                      caller: Caller) -> tuple[OpenReply, Entry]:
        """open(2) with O_TMPFILE in directory ``parent``: make an unnamed regular file and
        open it, answered as ``create`` is (the entry carries one lookup reference; its
        nlink is 0). ``flags`` are the open's, O_TMPFILE and O_EXCL included: without
        O_EXCL a later link(2) of the file arrives as ``link`` of its ino and must publish
        it; with O_EXCL the kernel refuses such a link itself (ENOENT, its I_LINKABLE
        rule), and the backing file should be made unlinkable too. The file goes away
        when its last open and lookup reference are gone.

        Native session only (FUSE_TMPFILE, protocol 7.37; pyfuse3 has no handler). Not
        implemented: ENOSYS, which the kernel remembers for the connection and answers
        EOPNOTSUPP to every O_TMPFILE open from then on, without asking again."""
        raise _enosys()

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        raise _enosys()

    def read_start(self, fh: int, off: int, size: int, done: ReadDone) -> memoryview | None:
        """``read`` without a coroutine, for a front-end that can finish a request from a
        callback (the native session): the data when the read completed at once, else
        None, and ``done(data or OSError)`` runs later on the loop thread, exactly once.
        Raises OSError for a request that fails before any I/O. A queued read then costs
        no task and no wake-up of one: the completion replies itself.

        Optional: a filesystem that does not override it is read through ``read``."""
        raise NotImplementedError

    async def write(self, fh: int, off: int, data: bytes) -> int:
        raise _enosys()

    async def kill_suidgid(self, fh: int, caller: Caller) -> None:
        """Clear the set-id bits ``caller``'s write clears (``privs.kill_mask``) of the file
        open as ``fh``: the kernel asks for it before a write or at an O_TRUNC open by a
        caller without CAP_FSETID once FUSE_HANDLE_KILLPRIV_V2 is negotiated (native
        session)."""
        raise _enosys()

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on an open file (``mode``: FALLOC_FL_* bits)."""
        raise _enosys()

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int) -> int:
        """copy_file_range(2) from open file ``fh_in`` to open file ``fh_out`` (both of
        this mount; the kernel has checked modes, ranges and overlap): bytes copied, at
        most ``length``. Native session only; without it the kernel copies through read
        and write."""
        raise _enosys()

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE on an open file: the next data/hole offset at or after
        ``off`` (the kernel resolves SEEK_SET/CUR/END itself)."""
        raise _enosys()

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def opendir(self, ino: int, caller: Caller) -> int:
        raise _enosys()

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        raise _enosys()

    async def releasedir(self, fh: int) -> None:
        pass

    async def readdir_inode(self, ino: int, off: int, reply: ReaddirReply) -> None:
        """``readdir`` of directory ``ino`` without a handle (``handleless_dirs``)."""
        raise _enosys()

    async def fsyncdir_inode(self, ino: int, datasync: bool) -> None:
        """``fsyncdir`` of directory ``ino`` without a handle (``handleless_dirs``)."""
        raise _enosys()

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, caller: Caller) -> Statfs:
        raise _enosys()

    async def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        raise _enosys()

    async def setxattr_prepare(self, ino: int, name: bytes, caller: Caller) -> None:
        """Before a SETXATTR's XATTR_CREATE/XATTR_REPLACE check (``getxattr``), which the
        front-end makes since ``setxattr`` takes no flags: what the filesystem does for a
        setxattr even when that check fails (overlay: the copy-up, as the kernel's
        ``ovl_xattr_set`` copies up before the upper filesystem checks the flags)."""

    async def getxattr(self, ino: int, name: bytes, caller: Caller) -> bytes:
        raise _enosys()

    async def listxattr(self, ino: int, caller: Caller) -> list[bytes]:
        raise _enosys()

    async def removexattr(self, ino: int, name: bytes, caller: Caller) -> None:
        raise _enosys()

    async def fileattr_get(self, ino: int, fsx: bool, caller: Caller) -> FileAttr:
        """lsattr(1): the attributes of regular file or directory ``ino``, as a flags word
        (FS_IOC_GETFLAGS) or, with ``fsx``, a struct fsxattr (FS_IOC_FSGETXATTR).

        Native session only (FUSE_IOCTL; pyfuse3 has no handler): not implemented, the
        kernel answers ENOTTY/EOPNOTSUPP to lsattr and chattr."""
        raise _enosys()

    async def fileattr_set(self, ino: int, attr: FileAttr, caller: Caller) -> None:
        """chattr(1): set the attributes of ``ino`` to ``attr`` (its form says which ioctl).
        The kernel has checked the caller (owner, CAP_LINUX_IMMUTABLE for +i/+a) and read
        the old attributes through ``fileattr_get`` first."""
        raise _enosys()

    async def access(self, ino: int, mode: int, caller: Caller) -> None:
        """Raise OSError(EACCES) when ``caller`` may not access ``ino`` with ``mode``."""
        raise _enosys()

    def statistics(self) -> dict[str, object]:
        """Counts for the SIGUSR1 dump (inodes, handles, in-flight I/O)."""
        return {}
