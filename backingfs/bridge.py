"""The bridge: a ``fsapi.Filesystem`` served as a ``pyfuse3.Operations``.

This is the one module that speaks pyfuse3 for the filesystems (``runner.py`` also imports
it, only for init/main/close/terminate). Every handler has the same three steps: convert
pyfuse3's arguments to fsapi types, await the filesystem, convert the result.

Error boundary (``_boundary``, applied to every handler): ``OSError`` becomes
``FUSEError(errno or EIO)``; ``FUSEError`` passes; any other ``Exception`` is a bug, logged
with its traceback, answered EIO. ``trio.Cancelled`` (a BaseException) propagates. This
matters more than usual: pyfuse3 replies only on FUSEError, and any other exception escapes
its session loop and takes the whole mount down.

What pyfuse3 (3.5.0, libfuse 3.14) does that the filesystems rely on:
- readdir is always readdirplus (``fuse_init`` clears READDIRPLUS_AUTO): the kernel takes a
  lookup reference on every entry it receives, except ``.`` and ``..``. The filesystem gives
  each ``DirEntry`` one reference (fsapi); the bridge gives back those the kernel did not
  take: entries ``readdir_reply`` refused, and accepted ``.``/``..``.
- UTIME_NOW arrives already resolved: pyfuse3 reads CLOCK_REALTIME and stores it in the
  attributes with ``update_atime``/``update_mtime`` set, so ``SetattrRequest`` holds
  absolute times only.
- ``forget`` and ``init`` have no reply; an exception there would kill the session, so they
  log and swallow.
- setxattr has no flags argument: pyfuse3 emulates XATTR_CREATE/REPLACE by calling
  ``getxattr`` first (so getxattr must answer ENODATA for a missing name).
- INIT as negotiated on this stack (seen with ``-o debug``): ASYNC_READ, ATOMIC_O_TRUNC,
  BIG_WRITES, AUTO_INVAL_DATA, DO_READDIRPLUS, ASYNC_DIO, MAX_PAGES; *not* PARALLEL_DIROPS
  (the kernel serialises lookups/creates within one directory), HANDLE_KILLPRIV (the kernel
  clears suid/sgid itself, by a SETATTR of the mode, before writes), EXPORT_SUPPORT, SPLICE,
  FLOCK/POSIX locks; max_background 0 (kernel default 12). None of this is settable from
  Python in pyfuse3 3.5.
- Requests run concurrently as trio tasks on one thread, up to ``runner.MAX_TASKS``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import pyfuse3
import trio

from . import fsapi, privs
from .fsapi import Caller, DirEntry, Entry, OpenReply, SetattrRequest, Statfs
from .pressure import PRESSURE, find_device_fd

log = logging.getLogger(__name__)

_DOTS = (b".", b"..")

T = TypeVar("T")


class _ContextLike(Protocol):
    uid: int
    gid: int
    pid: int
    umask: int


# --- conversions (pure; unit-tested without a mount) ------------------------------------

def caller_of(ctx: _ContextLike) -> Caller:
    """pyfuse3.RequestContext (or anything with uid/gid/pid/umask) -> Caller."""
    return Caller(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


def entry_attributes(entry: Entry) -> pyfuse3.EntryAttributes:
    """Entry -> EntryAttributes. ``st_ino`` sets the kernel node id and st_ino at once."""
    a = entry.attr
    ea = pyfuse3.EntryAttributes()
    ea.st_ino = a.st_ino
    ea.generation = entry.generation
    ea.entry_timeout = entry.entry_timeout
    ea.attr_timeout = entry.attr_timeout
    ea.st_mode = a.st_mode
    ea.st_nlink = a.st_nlink
    ea.st_uid = a.st_uid
    ea.st_gid = a.st_gid
    ea.st_rdev = a.st_rdev
    ea.st_size = a.st_size
    ea.st_blocks = a.st_blocks
    ea.st_blksize = a.st_blksize
    ea.st_atime_ns = a.st_atime_ns
    ea.st_mtime_ns = a.st_mtime_ns
    ea.st_ctime_ns = a.st_ctime_ns
    return ea


def file_info(reply: OpenReply) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(fh=reply.fh, direct_io=reply.direct_io,
                            keep_cache=reply.keep_cache, nonseekable=reply.nonseekable)


def statvfs_data(st: Statfs) -> pyfuse3.StatvfsData:
    d = pyfuse3.StatvfsData()
    d.f_bsize = st.f_bsize
    d.f_frsize = st.f_frsize
    d.f_blocks = st.f_blocks
    d.f_bfree = st.f_bfree
    d.f_bavail = st.f_bavail
    d.f_files = st.f_files
    d.f_ffree = st.f_ffree
    d.f_favail = st.f_favail
    d.f_namemax = st.f_namemax
    return d


def setattr_request(attr: Any, fields: Any) -> SetattrRequest:
    """EntryAttributes + SetattrFields -> SetattrRequest.

    UTIME_NOW needs no work here: pyfuse3 has already stored the current CLOCK_REALTIME
    time in ``attr`` and set ``update_atime``/``update_mtime`` (a zero time is a real
    request for the epoch, not a missing value).
    """
    return SetattrRequest(
        mode=attr.st_mode if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        size=attr.st_size if fields.update_size else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
    )


# --- request log and error boundary ------------------------------------------------------

def _fmt(v: object) -> str:
    if isinstance(v, bytes | bytearray | memoryview) and len(v) > 64:
        return f"<{len(v)} bytes>"
    if hasattr(v, "uid") and hasattr(v, "pid"):
        return f"ctx(uid={v.uid},gid={v.gid},pid={v.pid})"  # type: ignore[attr-defined]
    if isinstance(v, pyfuse3.EntryAttributes):
        return f"attr(ino={v.st_ino},mode={v.st_mode:o},size={v.st_size})"
    if isinstance(v, pyfuse3.FileInfo):
        return f"fi(fh={v.fh},direct_io={v.direct_io},keep_cache={v.keep_cache})"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return repr(v)


def _boundary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wrap a handler in the request log and the error boundary (module docstring)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self: Bridge, *args: Any) -> T:
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("-> %s(%s)", name, ", ".join(_fmt(a) for a in args))
        try:
            result = await fn(self, *args)
        except pyfuse3.FUSEError as e:
            if debug:
                log.debug("<- %s: %s", name, errno.errorcode.get(e.errno, e.errno))
            raise
        except OSError as e:
            err = e.errno or errno.EIO
            if debug:
                log.debug("<- %s: %s (%s)", name, errno.errorcode.get(err, err), e)
            raise pyfuse3.FUSEError(err) from None
        except Exception:
            log.exception("%s(%s) failed with an unexpected exception; answering EIO",
                          name, ", ".join(_fmt(a) for a in args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        if debug:
            log.debug("<- %s: %s", name, _fmt(result))
        return result

    return handler


# --- the Operations ----------------------------------------------------------------------

class Bridge(pyfuse3.Operations):
    """Serves ``fs`` through pyfuse3. Holds no state of its own besides ``fs``.

    ``supports_dot_lookup`` (FUSE_CAP_EXPORT_SUPPORT: the kernel may look up ``.`` and
    ``..``) is off unless the filesystem sets it, since fsapi does not ask filesystems to
    answer those names.
    """

    def __init__(self, fs: fsapi.Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.enable_writeback_cache = fs.enable_writeback_cache
        self.enable_acl = fs.enable_acl
        self.supports_dot_lookup = bool(getattr(fs, "supports_dot_lookup", False))
        #: Called (on the loop, inside the INIT request, before its reply) after fs.init();
        #: the runner uses it to schedule connection tuning. Must not block.
        self.init_hooks: list[Callable[[], None]] = []

    def init(self) -> None:
        # Called synchronously from libfuse's init callback: nothing may escape.
        try:
            self.fs.init()
        except Exception:
            log.exception("filesystem init() raised; continuing")
        for hook in self.init_hooks:
            try:
                hook()
            except Exception:
                log.exception("init hook %r raised; continuing", hook)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # No reply exists for FORGET, and an exception would end pyfuse3's session loop.
        items = list(inode_list)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> forget(%r)", items)
        try:
            await self.fs.forget(items)
        except Exception:
            log.exception("forget(%r) failed; lookup counts may be off", items)

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.fs.lookup(parent_inode, name, caller_of(ctx)))

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.fs.getattr(inode, caller_of(ctx)))

    @_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = await self.fs.setattr(inode, setattr_request(attr, fields), fh, caller_of(ctx))
        return entry_attributes(entry)

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return bytes(await self.fs.readlink(inode, caller_of(ctx)))

    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(
            await self.fs.mknod(parent_inode, name, mode, rdev, caller_of(ctx)))

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.fs.mkdir(parent_inode, name, mode, caller_of(ctx)))

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name, caller_of(ctx))

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name, caller_of(ctx))

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(
            await self.fs.symlink(parent_inode, name, target, caller_of(ctx)))

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                             caller_of(ctx))

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(
            await self.fs.link(inode, new_parent_inode, new_name, caller_of(ctx)))

    @_boundary
    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        caller = caller_of(ctx)
        reply = await self.fs.open(inode, flags, caller)
        if flags & os.O_TRUNC and not privs.caller_has_fsetid(caller.pid):
            # The kernel leaves an atomic O_TRUNC's set-id stripping to us (fuse_setattr
            # returns early for ATTR_OPEN) and libfuse 3.14 passes no OPEN_KILL_SUIDGID.
            try:
                await self.fs.kill_suidgid(reply.fh, caller)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.fs.release(reply.fh)
                raise
        return file_info(reply)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        reply, entry = await self.fs.create(parent_inode, name, mode, flags, caller_of(ctx))
        return file_info(reply), entry_attributes(entry)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        # Any contiguous buffer will do: pyfuse3 takes it through the buffer protocol.
        return await self.fs.read(fh, off, size)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_boundary
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_boundary
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.fs.opendir(inode, caller_of(ctx))

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """Feed the fs a ``reply`` over ``readdir_reply`` and settle lookup references.

        Every DirEntry but a bare one (which pyfuse3 cannot send: the listing ends there)
        arrives with one reference. The kernel keeps it for each accepted
        entry except ``.``/``..``; the bridge forgets the rest: the first refused entry and,
        should the fs keep producing, every later one (never offered to the kernel, so the
        listing cannot skip an entry). If the fs fails after entries were accepted, the
        partial listing is still sent: an errno would discard entries the references were
        counted for (a bug is still logged with its traceback). The forget is shielded so a
        cancellation cannot leak the refused references; a cancelled readdir sends no reply,
        so its accepted entries' references stay until ``destroy`` (only at shutdown).
        """
        returned: Counter[int] = Counter()
        accepted = 0
        full = False
        bare = False

        def reply(d: DirEntry) -> bool:
            nonlocal accepted, full, bare
            if d.bare:
                # pyfuse3 sends st_ino as the node id too: an entry without an inode cannot
                # be expressed. End the listing here; the kernel asks again from this offset.
                bare = full = True
                return False
            if full or not pyfuse3.readdir_reply(token, d.name, entry_attributes(d.entry),
                                                 d.next_off):
                full = True
                returned[d.entry.ino] += 1
                return False
            accepted += 1
            if d.name in _DOTS:
                returned[d.entry.ino] += 1
            return True

        try:
            await self.fs.readdir(fh, start_id, reply)
            if bare and not accepted:
                raise OSError(errno.EMFILE, "no file descriptor left for a directory entry")
        except Exception as e:
            if not accepted:
                raise
            if isinstance(e, OSError):
                log.debug("readdir(%d, %d) failed after %d entries (%s); sending those",
                          fh, start_id, accepted, e)
            else:
                log.exception("readdir(%d, %d) failed after %d entries; sending those",
                              fh, start_id, accepted)
        finally:
            if returned:
                with trio.CancelScope(shield=True):
                    await self.forget(list(returned.items()))

    @_boundary
    async def releasedir(self, fh: int) -> None:
        await self.fs.releasedir(fh)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsyncdir(fh, datasync)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statvfs_data(await self.fs.statfs(caller_of(ctx)))

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self.fs.setxattr(inode, name, value, caller_of(ctx))

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # pyfuse3 reads the value with PyBytes_AsStringAndSize: it must be bytes exactly.
        return bytes(await self.fs.getxattr(inode, name, caller_of(ctx)))

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(await self.fs.listxattr(inode, caller_of(ctx)))

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name, caller_of(ctx))

    @_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        try:
            await self.fs.access(inode, mode, caller_of(ctx))
        except OSError as e:
            if e.errno == errno.EACCES:
                return False
            raise
        return True


# --- notifications -----------------------------------------------------------------------

class Pyfuse3Notifier:
    """``notify.Notifier`` over pyfuse3's invalidation calls (lives here: pyfuse3 stays in
    the bridge). Invalidations are advisory: failures are logged, never raised.

    ``invalidate_entry`` queues to pyfuse3's notify thread (``invalidate_entry_async``)
    because the kernel blocks the notification until related requests finish, which would
    deadlock if called from one of them. ``invalidate_inode`` with data may block on
    writeback of dirty pages, i.e. on our own WRITE requests, so it runs in a worker
    thread; attribute-only invalidation does not wait for requests and runs inline.
    """

    #: libfuse 3.14 and pyfuse3 have no FUSE_NOTIFY_PRUNE.
    can_prune = False

    def prune(self, inos: Sequence[int]) -> None:
        pass

    def invalidate_entry(self, parent_ino: int, name: bytes,
                         deleted_ino: int | None = None) -> None:
        pyfuse3.invalidate_entry_async(parent_ino, name, deleted_ino or 0, ignore_enoent=True)

    async def invalidate_inode(self, ino: int, attr_only: bool = False) -> None:
        try:
            if attr_only:
                pyfuse3.invalidate_inode(ino, True)
            else:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as e:
            # ENOENT: the kernel does not hold the inode, nothing to invalidate.
            if e.errno not in (errno.ENOENT, errno.ENOSYS):
                log.warning("invalidate_inode(%d) failed: %s", ino, e)


class _ReplyRaceFilter(logging.Filter):
    """pyfuse3 logs ERROR when a reply finds its request gone (ENOENT: interrupted, or the
    connection ending, e.g. the last RELEASE after ``umount -l``). Nothing is lost then:
    keep it for -d only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "fuse_reply_" in msg and "No such file or directory" in msg:
            return log.isEnabledFor(logging.DEBUG)
        return True


class Pyfuse3Session:
    """The pyfuse3 front-end's session control: mount, serve, terminate, unmount.

    Kept here so that the bridge stays the only module that touches pyfuse3; the runner
    drives a session without knowing which front-end it is (a native /dev/fuse session
    can offer the same four calls, DESIGN §7).
    """

    def __init__(self, fs: fsapi.Filesystem) -> None:
        self.ops = Bridge(fs)
        self.fs = fs
        fs.notifier = Pyfuse3Notifier()
        pyfuse3_log = logging.getLogger("pyfuse3")
        if not any(isinstance(f, _ReplyRaceFilter) for f in pyfuse3_log.filters):
            pyfuse3_log.addFilter(_ReplyRaceFilter())

    @property
    def init_hooks(self) -> list[Callable[[], None]]:
        return self.ops.init_hooks

    def mount(self, mountpoint: str, options: set[str]) -> None:
        """Mount; raises OSError(EIO, libfuse's message) when libfuse refuses."""
        try:
            pyfuse3.init(self.ops, mountpoint, options)
        except RuntimeError as e:
            raise OSError(errno.EIO, str(e)) from None
        # pyfuse3 does not expose its session fd; it is the /dev/fuse fd it just opened.
        device = find_device_fd()
        if device is not None:
            PRESSURE.watch(device)

    async def serve(self, min_tasks: int, max_tasks: int) -> None:
        """Serve requests until unmounted (``fusermount3 -u``) or ``terminate()``."""
        await pyfuse3.main(min_tasks, max_tasks)

    def terminate(self) -> None:
        pyfuse3.terminate()

    def unmount(self) -> None:
        PRESSURE.unwatch()
        pyfuse3.close(unmount=True)
