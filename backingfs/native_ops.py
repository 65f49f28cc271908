"""The native session's request handlers: decode a FUSE request, await the filesystem,
encode the reply (the native twin of ``bridge.Bridge``; same contracts, fsapi docstring).

Each handler is ``async (session, unique, nodeid, (uid, gid, pid), data)``; ``data`` is the
whole request, its arguments at ``ARGS`` (no request extensions are negotiated). It replies
itself (``session.reply``) or raises OSError, which the session turns into ``-errno``.

Lookup references: an entry reply (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK, CREATE, TMPFILE)
carries one reference taken by the filesystem; when the kernel did not take the reply
(interrupted), it is forgotten again. READDIRPLUS works as in the bridge: every DirEntry
but a bare one carries a reference, given back for entries that did not fit and for
``.``/``..`` (the kernel never counts those); a bare entry goes out with node id 0, and the
kernel instantiates nothing.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from . import fdpressure, fileattr, privs
from . import fuse_abi as abi
from .attrs import Attr
from .fsapi import Caller, DirEntry, Entry, OpenReply, SetattrRequest
from .passthrough import BackingMismatchError
from .syscalls import STATX_BTIME

if TYPE_CHECKING:
    from .native import NativeSession

log = logging.getLogger(__name__)

ARGS = abi.IN_HEADER.size
_ATTR_FMT = "QQQqqqIIIIIIIIII"
_ENTRY_OUT = abi.struct.Struct("=QQQQII" + _ATTR_FMT)
_ATTR_OUT = abi.struct.Struct("=QII" + _ATTR_FMT)
_DIRENTPLUS_HEAD = abi.struct.Struct("=QQQQII" + _ATTR_FMT + "QQII")
_DOTS = (b".", b"..")
#: statx's STATX_TYPE ... STATX_BLOCKS: what GETATTR reports, and what the kernel needs in
#: a STATX reply's mask to take its attributes.
_STATX_BASIC_STATS = 0x7FF
_NS = 1_000_000_000
XATTR_CREATE = 1
XATTR_REPLACE = 2

#: Largest WRITE payload asked for (max_pages * 4 KiB): 1 MiB, as passthrough_hp.
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
#: Kernel-side cap on background requests (readahead, async direct I/O, RELEASE...).
MAX_BACKGROUND = 64
#: Always asked for when offered. DO_READDIRPLUS without READDIRPLUS_AUTO: every READDIR is a
#: READDIRPLUS (fsapi readdir entries carry their attributes and a lookup reference).
WANTED = (abi.ASYNC_READ | abi.ATOMIC_O_TRUNC | abi.BIG_WRITES | abi.AUTO_INVAL_DATA
          | abi.DO_READDIRPLUS | abi.ASYNC_DIO | abi.PARALLEL_DIROPS | abi.MAX_PAGES
          | abi.CACHE_SYMLINKS | abi.INIT_EXT | abi.HAS_EXPIRE_ONLY
          # The kernel then stops asking GETXATTR security.capability before every
          # write(2) (it marks the superblock SB_NOSEC) and leaves set-id stripping to us:
          # WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID, OPEN_KILL_SUIDGID below, and for a
          # passthrough write the empty SETATTR its privilege check sends (``_CHANGES``).
          | abi.HANDLE_KILLPRIV_V2)

Ids = tuple[int, int, int]
Handler = Callable[["NativeSession", int, int, Ids, bytes], Awaitable[None]]
HANDLERS: dict[int, Handler] = {}


def handler(op: abi.Op, *, fails_whole: bool = False) -> Callable[[Handler], Handler]:
    """Register ``fn`` for ``op``. ``fails_whole``: a request that fails leaves nothing
    behind (what it made is taken back, copy-up aside, which is idempotent), so one that
    runs out of fds between two prunes (inodes.py) may prune now, wait for the FORGETs and
    run again (fdpressure): no caller sees EMFILE while the kernel holds unused inodes.
    RENAME too: overlay makes an AUFS-form whiteout (the one step that takes an fd)
    before the rename itself, so a rename that failed moved nothing, and running it
    again cannot copy the lower object up over the moved one. And the I/O on a handle
    (WRITE, FSYNC, FLUSH, FALLOCATE, LSEEK; READ on its own): the one fd they may take is
    overlay's reopen of the upper copy after a copy-up, before any I/O."""
    def register(fn: Handler) -> Handler:
        HANDLERS[op] = _retried(fn) if fails_whole else fn
        return fn
    return register


def _retried(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def retried(s: NativeSession, unique: int, nodeid: int, ids: Ids,
                      data: bytes) -> None:
        try:
            await fn(s, unique, nodeid, ids, data)
        except OSError as err:
            if err.errno not in fdpressure.NO_FDS:
                raise
            await fdpressure.retry(s.fs.relieve_fds,
                                   lambda: fn(s, unique, nodeid, ids, data), err)
    return retried


# --- encoding ---------------------------------------------------------------------------------

def _attr_fields(a: Attr) -> tuple[int, ...]:
    asec, ansec = divmod(a.st_atime_ns, _NS)
    msec, mnsec = divmod(a.st_mtime_ns, _NS)
    csec, cnsec = divmod(a.st_ctime_ns, _NS)
    return (a.st_ino, a.st_size, a.st_blocks, asec, msec, csec, ansec, mnsec, cnsec,
            a.st_mode, a.st_nlink, a.st_uid & 0xFFFFFFFF, a.st_gid & 0xFFFFFFFF,
            a.st_rdev & 0xFFFFFFFF, a.st_blksize, 0)


def _entry_fields(e: Entry) -> tuple[int, ...]:
    es, ens = abi.split_timeout(e.entry_timeout)
    ats, atn = abi.split_timeout(e.attr_timeout)
    return (e.ino, e.generation, es, ats, ens, atn, *_attr_fields(e.attr))


def entry_out(e: Entry) -> bytes:
    return _ENTRY_OUT.pack(*_entry_fields(e))


def attr_out(e: Entry) -> bytes:
    ats, atn = abi.split_timeout(e.attr_timeout)
    return _ATTR_OUT.pack(ats, atn, 0, *_attr_fields(e.attr))


def statx_out(e: Entry, btime_ns: int | None) -> bytes:
    a = e.attr
    ats, atn = abi.split_timeout(e.attr_timeout)
    mask = _STATX_BASIC_STATS
    bsec = bnsec = 0
    if btime_ns is not None:
        mask |= STATX_BTIME
        bsec, bnsec = divmod(btime_ns, _NS)
    asec, ansec = divmod(a.st_atime_ns, _NS)
    msec, mnsec = divmod(a.st_mtime_ns, _NS)
    csec, cnsec = divmod(a.st_ctime_ns, _NS)
    return abi.STATX_OUT.pack(
        ats, atn, 0, mask, a.st_blksize, 0, a.st_nlink, a.st_uid & 0xFFFFFFFF,
        a.st_gid & 0xFFFFFFFF, a.st_mode & 0xFFFF, a.st_ino, a.st_size, a.st_blocks, 0,
        asec, ansec, 0, bsec, bnsec, 0, csec, cnsec, 0, msec, mnsec, 0,
        os.major(a.st_rdev), os.minor(a.st_rdev), 0, 0)


@functools.lru_cache(maxsize=16)
def _split_timeouts(entry_timeout: float, attr_timeout: float) -> tuple[int, int, int, int]:
    """``(entry_sec, attr_sec, entry_nsec, attr_nsec)``, in entry_out's order. Cached: the
    entries of a listing all carry the mount's one pair of timeouts."""
    es, ens = abi.split_timeout(entry_timeout)
    ats, atn = abi.split_timeout(attr_timeout)
    return es, ats, ens, atn


#: Zero padding by length, so that padding an entry to 8 bytes allocates nothing.
_PADS = tuple(bytes(n) for n in range(8))


def _name(data: bytes, start: int) -> bytes:
    end = data.find(b"\0", start)
    return data[start:] if end < 0 else data[start:end]


def _two_names(data: bytes, start: int) -> tuple[bytes, bytes]:
    mid = data.index(b"\0", start)
    return data[start:mid], _name(data, mid + 1)


def _caller(ids: Ids, umask: int = 0) -> Caller:
    return Caller(ids[0], ids[1], ids[2], umask)


async def _reply_entry(s: NativeSession, unique: int, e: Entry) -> None:
    if not s.reply(unique, entry_out(e)):
        await _forget_one(s, e.ino)


async def _forget_one(s: NativeSession, ino: int) -> None:
    with trio.CancelScope(shield=True):
        try:
            await s.fs.forget([(ino, 1)])
        except Exception:
            log.exception("forget(%d) after an unanswered reply failed", ino)


# --- INIT / DESTROY / FORGET --------------------------------------------------------------

@handler(abi.Op.INIT)
async def init(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    major, minor, max_readahead, flags, flags2 = abi.INIT_IN.unpack_from(data, ARGS)
    if major != abi.KERNEL_VERSION or minor < abi.MIN_MINOR_VERSION:
        log.error("kernel speaks FUSE %d.%d; need %d.%d or later", major, minor,
                  abi.KERNEL_VERSION, abi.MIN_MINOR_VERSION)
        if major > abi.KERNEL_VERSION:
            # The kernel retries INIT with our major when we answer with it.
            s.reply(unique, abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION,
                                              0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            return
        s.fail("unsupported FUSE protocol version")
        raise OSError(errno.EPROTO, "unsupported FUSE protocol version")
    offered = flags | (flags2 << 32 if flags & abi.INIT_EXT else 0)
    want = WANTED
    fs = s.fs
    if fs.enable_writeback_cache:
        want |= abi.WRITEBACK_CACHE
    if fs.enable_acl:
        # The kernel then checks ACLs; inheriting default ACLs is ours, and needs the
        # umask unapplied (fsapi dont_mask); SETXATTR_EXT carries ACL_KILL_SGID.
        want |= abi.POSIX_ACL | abi.DONT_MASK | abi.SETXATTR_EXT
    passthrough = False
    if s.passthrough_mode != "off":
        why = None
        if not offered & abi.PASSTHROUGH:
            why = "the kernel does not offer it (Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)"
        elif fs.enable_writeback_cache:
            why = "the writeback cache is on (the kernel refuses both together)"
        passthrough = _usable(s, "passthrough", s.passthrough_mode, "kernel passthrough", why)
        if passthrough:
            want |= abi.PASSTHROUGH
    ring = False
    if s.uring_mode != "off":
        if not offered & abi.OVER_IO_URING:
            why = ("the kernel does not offer it (Linux >= 6.14, and the fuse module's "
                   "enable_uring parameter on)")
        else:
            why = s.uring_unavailable()
            if why is None:
                try:
                    s.prepare_uring()
                except OSError as e:
                    why = f"cannot set up its rings: {e}"
        ring = _usable(s, "uring", s.uring_mode, "FUSE over io_uring", why,
                       quiet=not offered & abi.OVER_IO_URING)
        if ring:
            want |= abi.OVER_IO_URING
    got = want & offered
    s.flags = got
    s.proto_minor = min(minor, abi.KERNEL_MINOR_VERSION)
    s.backing.enabled = passthrough
    fs.passthrough = passthrough
    fs.node_ids = True
    fs.bare_dots = True
    fs.dont_mask = bool(got & abi.DONT_MASK)
    log.debug("INIT: kernel %d.%d offers %s; using %s", major, minor, abi.flag_names(offered),
              abi.flag_names(got))
    if passthrough:
        log.info("kernel passthrough on: read/write of files with a backing file bypass "
                 "the daemon")
    try:
        fs.init()
    except Exception:
        log.exception("filesystem init() raised; continuing")
    s.handleless_dirs = bool(fs.handleless_dirs and fs.cache_dirs
                             and offered & abi.NO_OPENDIR_SUPPORT)
    for hook in s.init_hooks:
        try:
            hook()
        except Exception:
            log.exception("init hook %r raised; continuing", hook)
    out = abi.INIT_OUT.pack(
        abi.KERNEL_VERSION, s.proto_minor, max_readahead, got & 0xFFFFFFFF,
        MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1,
        MAX_PAGES, 0, got >> 32, abi.MAX_STACK_DEPTH if passthrough else 0)
    s.reply(unique, out)
    if ring:
        # Only now: the queues' registration needs the connection initialized, which
        # this reply did; until they are registered the kernel holds requests back.
        await s.start_uring()


def _usable(s: NativeSession, option: str, mode: str, what: str, why: str | None, *,
            quiet: bool = False) -> bool:
    """Whether a feature asked for with ``-o OPTION=auto|on`` goes on: yes when nothing
    stands in the way (``why`` is None); else ``on`` fails the mount with the reason, and
    ``auto`` says it in the log (at debug level when ``quiet``: the usual case)."""
    if why is None:
        return True
    if mode == "on":
        s.fail(f"{option}=on but {what} is unavailable: {why}")
        raise OSError(errno.EPROTO, f"{what} unavailable")
    log.log(logging.DEBUG if quiet else logging.INFO, "%s off: %s", what, why)
    return False


@handler(abi.Op.DESTROY)
async def destroy(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    s.end()
    s.reply(unique)


@handler(abi.Op.FORGET)
async def forget(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    (n,) = abi.FORGET_IN.unpack_from(data, ARGS)
    await _forget(s, [(nodeid, n)])


@handler(abi.Op.BATCH_FORGET)
async def batch_forget(s: NativeSession, unique: int, nodeid: int, ids: Ids,
                       data: bytes) -> None:
    count, _ = abi.BATCH_FORGET_IN.unpack_from(data, ARGS)
    base = ARGS + abi.BATCH_FORGET_IN.size
    items = [abi.FORGET_ONE.unpack_from(data, base + i * abi.FORGET_ONE.size)
             for i in range(count)]
    await _forget(s, items)


async def _forget(s: NativeSession, items: list[tuple[int, int]]) -> None:
    # No reply exists for FORGET: an error can only be logged.
    try:
        await s.fs.forget(items)
    except Exception:
        log.exception("forget(%r) failed; lookup counts may be off", items)


@handler(abi.Op.INTERRUPT)
async def interrupt(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    # Requests run to completion (as with pyfuse3): nothing to do, and no reply exists.
    return


# --- attributes ---------------------------------------------------------------------------------

@handler(abi.Op.LOOKUP, fails_whole=True)
async def lookup(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    name = _name(data, ARGS)
    await _reply_entry(s, unique, await s.fs.lookup(nodeid, name, _caller(ids)))


@handler(abi.Op.GETATTR)
async def getattr_(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    s.reply(unique, attr_out(await s.fs.getattr(nodeid, _caller(ids))))


@handler(abi.Op.STATX)
async def statx(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    """GETATTR with the birth time, for a statx(2) that asks for it. The kernel's
    ``sx_mask`` and sync flags change nothing here: every answer is fresh and whole.
    A filesystem without ``birth_time`` answers ENOSYS, after which the kernel sends
    GETATTR instead (``fc->no_statx``)."""
    btime = await s.fs.birth_time(nodeid)
    s.reply(unique, statx_out(await s.fs.getattr(nodeid, _caller(ids)), btime))


@handler(abi.Op.SETATTR, fails_whole=True)
async def setattr_(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    (valid, _, fh, size, _, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, _,
     uid, gid, _) = abi.SETATTR_IN.unpack_from(data, ARGS)
    now = time.time_ns() if valid & (abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW) else 0
    times = valid & (abi.FATTR_ATIME | abi.FATTR_MTIME)
    nows = ((abi.FATTR_ATIME if valid & abi.FATTR_ATIME_NOW else 0)
            | (abi.FATTR_MTIME if valid & abi.FATTR_MTIME_NOW else 0))
    changes = SetattrRequest(
        mode=mode if valid & abi.FATTR_MODE else None,
        uid=uid if valid & abi.FATTR_UID else None,
        gid=gid if valid & abi.FATTR_GID else None,
        size=size if valid & abi.FATTR_SIZE else None,
        atime_ns=(now if valid & abi.FATTR_ATIME_NOW else _signed(atime) * _NS + atimensec)
        if valid & abi.FATTR_ATIME else None,
        mtime_ns=(now if valid & abi.FATTR_MTIME_NOW else _signed(mtime) * _NS + mtimensec)
        if valid & abi.FATTR_MTIME else None,
        ctime_ns=_signed(ctime) * _NS + ctimensec if valid & abi.FATTR_CTIME else None,
        times_now=bool(times) and nows == times,
        kill_suidgid=_caller(ids) if valid & abi.FATTR_KILL_SUIDGID or (
            not valid & _CHANGES and s.flags & abi.HANDLE_KILLPRIV_V2
            and not privs.caller_has_fsetid(ids[2])) else None,
    )
    entry = await s.fs.setattr(nodeid, changes, fh if valid & abi.FATTR_FH else None,
                               _caller(ids))
    s.reply(unique, attr_out(entry))


#: SETATTR valid bits that change something. One with none of them is, under
#: HANDLE_KILLPRIV_V2, the kernel's file_remove_privs for a write it serves itself (kernel
#: passthrough): it strips the kill bits before sending and leaves the request empty. A
#: caller without CAP_FSETID must then lose S_ISUID/S_ISGID, which the backing write, made
#: with the daemon's credentials, would keep (the battery's passthrough targets check it).
_CHANGES = (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_SIZE | abi.FATTR_ATIME
            | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW | abi.FATTR_CTIME)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@handler(abi.Op.READLINK)
async def readlink(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    s.reply(unique, bytes(await s.fs.readlink(nodeid, _caller(ids))))


@handler(abi.Op.ACCESS)
async def access(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    mask, _ = abi.ACCESS_IN.unpack_from(data, ARGS)
    await s.fs.access(nodeid, mask, _caller(ids))
    s.reply(unique)


#: The kernel's fileattr requests (``fuse_priv_ioctl``): ioctl number -> the fsxattr form.
_FILEATTR_GET = {fileattr.FS_IOC_GETFLAGS: False, fileattr.FS_IOC_FSGETXATTR: True}
_FILEATTR_SET = {fileattr.FS_IOC_SETFLAGS: False, fileattr.FS_IOC_FSSETXATTR: True}
_IOCTL_DONE = abi.IOCTL_OUT.pack(0, 0, 0, 0)


@handler(abi.Op.IOCTL, fails_whole=True)
async def ioctl(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    """lsattr/chattr only: the kernel turns them into FUSE_IOCTL on a private open of the
    inode, by node id, so the handle is not needed. Any other ioctl a program sends to a
    file of the mount is ENOTTY, as on the kernel's overlayfs: the daemon would run it on
    a backing file with root's rights, and no other is part of either filesystem."""
    _, _, cmd, _, in_size, out_size = abi.IOCTL_IN.unpack_from(data, ARGS)
    if cmd in _FILEATTR_GET:
        attr = await s.fs.fileattr_get(nodeid, _FILEATTR_GET[cmd], _caller(ids))
        s.reply(unique, _IOCTL_DONE, attr.pack()[:out_size])
    elif cmd in _FILEATTR_SET:
        fsx = _FILEATTR_SET[cmd]
        arg = data[ARGS + abi.IOCTL_IN.size:ARGS + abi.IOCTL_IN.size + in_size]
        if len(arg) < (fileattr.FSXATTR if fsx else fileattr.FLAGS).size:
            raise OSError(errno.EINVAL, "short fileattr argument")
        await s.fs.fileattr_set(nodeid, fileattr.FileAttr.unpack(arg, fsx), _caller(ids))
        s.reply(unique, _IOCTL_DONE)
    else:
        raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} not supported")


@handler(abi.Op.STATFS)
async def statfs(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    st = await s.fs.statfs(_caller(ids))
    s.reply(unique, abi.KSTATFS.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                                     st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize, 0))


# --- namespace ------------------------------------------------------------------------------

@handler(abi.Op.MKNOD, fails_whole=True)
async def mknod(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(data, ARGS)
    name = _name(data, ARGS + abi.MKNOD_IN.size)
    await _reply_entry(s, unique, await s.fs.mknod(nodeid, name, mode, rdev,
                                                   _caller(ids, umask)))


@handler(abi.Op.MKDIR, fails_whole=True)
async def mkdir(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    mode, umask = abi.MKDIR_IN.unpack_from(data, ARGS)
    name = _name(data, ARGS + abi.MKDIR_IN.size)
    await _reply_entry(s, unique, await s.fs.mkdir(nodeid, name, mode, _caller(ids, umask)))


@handler(abi.Op.SYMLINK, fails_whole=True)
async def symlink(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    name, target = _two_names(data, ARGS)
    await _reply_entry(s, unique, await s.fs.symlink(nodeid, name, target, _caller(ids)))


@handler(abi.Op.LINK, fails_whole=True)
async def link(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    (old,) = abi.LINK_IN.unpack_from(data, ARGS)
    name = _name(data, ARGS + abi.LINK_IN.size)
    await _reply_entry(s, unique, await s.fs.link(old, nodeid, name, _caller(ids)))


@handler(abi.Op.UNLINK, fails_whole=True)
async def unlink(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    await s.fs.unlink(nodeid, _name(data, ARGS), _caller(ids))
    s.reply(unique)


@handler(abi.Op.RMDIR, fails_whole=True)
async def rmdir(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    await s.fs.rmdir(nodeid, _name(data, ARGS), _caller(ids))
    s.reply(unique)


@handler(abi.Op.RENAME, fails_whole=True)
async def rename(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    (newdir,) = abi.RENAME_IN.unpack_from(data, ARGS)
    old, new = _two_names(data, ARGS + abi.RENAME_IN.size)
    await s.fs.rename(nodeid, old, newdir, new, 0, _caller(ids))
    s.reply(unique)


@handler(abi.Op.RENAME2, fails_whole=True)
async def rename2(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    newdir, flags, _ = abi.RENAME2_IN.unpack_from(data, ARGS)
    old, new = _two_names(data, ARGS + abi.RENAME2_IN.size)
    await s.fs.rename(nodeid, old, newdir, new, flags, _caller(ids))
    s.reply(unique)


# --- files ------------------------------------------------------------------------------------

def _open_flags(s: NativeSession, nodeid: int, reply: OpenReply) -> tuple[int, int]:
    """(open_flags, backing_id) for an open reply; accounts the open in ``s.backing``."""
    backing_id = s.backing.decide(nodeid, reply.fh, reply.backing)
    if reply.backing is not None and not backing_id:
        s.fs.backing_declined(reply.fh)
    if backing_id:
        # keep_cache and direct_io are meaningless (and keep_cache refused) in passthrough.
        return abi.FOPEN_PASSTHROUGH | (abi.FOPEN_NONSEEKABLE if reply.nonseekable else 0), \
            backing_id
    flags = ((abi.FOPEN_DIRECT_IO if reply.direct_io else 0)
             | (abi.FOPEN_KEEP_CACHE if reply.keep_cache else 0)
             | (abi.FOPEN_NONSEEKABLE if reply.nonseekable else 0))
    return flags, 0


async def _undo_open(s: NativeSession, fh: int) -> None:
    s.backing.release(fh)
    with trio.CancelScope(shield=True):
        try:
            await s.fs.release(fh)
        except Exception:
            log.exception("release(%d) of an unanswered open failed", fh)


@handler(abi.Op.OPEN, fails_whole=True)
async def open_(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    flags, kill = abi.OPEN_IN.unpack_from(data, ARGS)
    reply = await s.fs.open(nodeid, flags, _caller(ids))
    if kill & abi.OPEN_KILL_SUIDGID and flags & os.O_TRUNC:
        try:
            await s.fs.kill_suidgid(reply.fh, _caller(ids))
        except BaseException:
            await _undo_open(s, reply.fh)
            raise
    try:
        open_flags, backing_id = _open_flags(s, nodeid, reply)
    except BackingMismatchError:
        await _undo_open(s, reply.fh)
        raise
    if not s.reply(unique, abi.OPEN_OUT.pack(reply.fh, open_flags, backing_id)):
        await _undo_open(s, reply.fh)


@handler(abi.Op.CREATE, fails_whole=True)
async def create(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    flags, mode, umask, _ = abi.CREATE_IN.unpack_from(data, ARGS)
    name = _name(data, ARGS + abi.CREATE_IN.size)
    reply, entry = await s.fs.create(nodeid, name, mode, flags, _caller(ids, umask))
    await _reply_created(s, unique, reply, entry)


@handler(abi.Op.TMPFILE, fails_whole=True)
async def tmpfile(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    """O_TMPFILE in directory ``nodeid``: CREATE's arguments and reply, no name (the kernel
    sends its placeholder "/", ignored). A filesystem without ``tmpfile`` answers ENOSYS,
    after which the kernel gives EOPNOTSUPP without asking (``fc->no_tmpfile``). Retried
    whole at the fd limit: a failed one leaves nothing, an unnamed file has no name to
    take back."""
    flags, mode, umask, _ = abi.CREATE_IN.unpack_from(data, ARGS)
    reply, entry = await s.fs.tmpfile(nodeid, mode, flags, _caller(ids, umask))
    await _reply_created(s, unique, reply, entry)


async def _reply_created(s: NativeSession, unique: int, reply: OpenReply, entry: Entry) -> None:
    """CREATE's and TMPFILE's reply: entry_out + open_out. When the kernel does not take
    it (interrupted, or a backing file it refuses), the open is released and the entry's
    lookup reference forgotten."""
    try:
        open_flags, backing_id = _open_flags(s, entry.ino, reply)
    except BackingMismatchError:
        await _undo_open(s, reply.fh)
        await _forget_one(s, entry.ino)
        raise
    if not s.reply(unique, entry_out(entry), abi.OPEN_OUT.pack(reply.fh, open_flags,
                                                               backing_id)):
        await _undo_open(s, reply.fh)
        await _forget_one(s, entry.ino)


@handler(abi.Op.READ)
async def read(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, off, size, _, _, _, _ = abi.READ_IN.unpack_from(data, ARGS)
    start = s.read_start
    try:
        if start is None:
            got = await s.fs.read(fh, off, size)
        else:
            # No await: a read that queues is answered by its completion, and this handler
            # returns without suspending (no task, no lock hand-over, no wake-up of a task).
            got = start(fh, off, size, functools.partial(_read_done, s, unique))
    except OSError as e:
        if e.errno not in fdpressure.NO_FDS:
            raise
        # A handle that reopens its file first (overlay's switch to the upper copy after a
        # copy-up) met the fd limit: nothing was read, so wait for a prune, as fails_whole
        # requests do. A read never answers EMFILE: the caller's fd is open.
        got = await fdpressure.retry(s.fs.relieve_fds, lambda: s.fs.read(fh, off, size), e)
    if got is not None:
        s.reply(unique, got)


def _read_done(s: NativeSession, unique: int, result: memoryview | OSError) -> None:
    if isinstance(result, OSError):
        s.reply_error(unique, result.errno or errno.EIO)
    else:
        s.reply(unique, result)


@handler(abi.Op.WRITE, fails_whole=True)
async def write(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, off, size, write_flags, _, _, _ = abi.WRITE_IN.unpack_from(data, ARGS)
    if write_flags & abi.WRITE_KILL_SUIDGID:
        await s.fs.kill_suidgid(fh, _caller(ids))
    start = ARGS + abi.WRITE_IN.size
    n = await s.fs.write(fh, off, data[start:start + size])
    s.reply(unique, abi.WRITE_OUT.pack(n, 0))


@handler(abi.Op.FALLOCATE, fails_whole=True)
async def fallocate(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, off, length, mode, _ = abi.FALLOCATE_IN.unpack_from(data, ARGS)
    await s.fs.fallocate(fh, mode, off, length)
    s.reply(unique)


@handler(abi.Op.COPY_FILE_RANGE, fails_whole=True)
async def copy_file_range(s: NativeSession, unique: int, nodeid: int, ids: Ids,
                          data: bytes) -> None:
    fh_in, off_in, _, fh_out, off_out, length, flags = abi.COPY_FILE_RANGE_IN.unpack_from(
        data, ARGS)
    if flags:
        raise OSError(errno.EINVAL, "copy_file_range flags")
    done = await s.fs.copy_file_range(fh_in, off_in, fh_out, off_out, length)
    s.reply(unique, abi.WRITE_OUT.pack(done, 0))


@handler(abi.Op.LSEEK, fails_whole=True)
async def lseek(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, off, whence, _ = abi.LSEEK_IN.unpack_from(data, ARGS)
    s.reply(unique, abi.LSEEK_OUT.pack(await s.fs.lseek(fh, off, whence)))


@handler(abi.Op.FLUSH, fails_whole=True)
async def flush(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, _, _, _ = abi.FLUSH_IN.unpack_from(data, ARGS)
    await s.fs.flush(fh)
    s.reply(unique)


@handler(abi.Op.RELEASE)
async def release(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, _, _, _ = abi.RELEASE_IN.unpack_from(data, ARGS)
    try:
        await s.fs.release(fh)
    finally:
        s.backing.release(fh)
    s.reply(unique)


@handler(abi.Op.FSYNC, fails_whole=True)
async def fsync(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, flags, _ = abi.FSYNC_IN.unpack_from(data, ARGS)
    await s.fs.fsync(fh, bool(flags & abi.FSYNC_FDATASYNC))
    s.reply(unique)


# --- directories ------------------------------------------------------------------------------

@handler(abi.Op.OPENDIR, fails_whole=True)
async def opendir(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    if s.handleless_dirs:
        # FUSE_NO_OPENDIR_SUPPORT: the kernel stops asking, opens with fh 0 (readdir_inode)
        raise OSError(errno.ENOSYS, "directories need no handle")
    fh = await s.fs.opendir(nodeid, _caller(ids))
    flags = abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE if s.fs.cache_dirs else 0
    if not s.reply(unique, abi.OPEN_OUT.pack(fh, flags, 0)):
        with trio.CancelScope(shield=True):
            await s.fs.releasedir(fh)


@handler(abi.Op.RELEASEDIR)
async def releasedir(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, _, _, _ = abi.RELEASE_IN.unpack_from(data, ARGS)
    await s.fs.releasedir(fh)
    s.reply(unique)


@handler(abi.Op.FSYNCDIR)
async def fsyncdir(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    fh, flags, _ = abi.FSYNC_IN.unpack_from(data, ARGS)
    if s.handleless_dirs:
        await s.fs.fsyncdir_inode(nodeid, bool(flags & abi.FSYNC_FDATASYNC))
    else:
        await s.fs.fsyncdir(fh, bool(flags & abi.FSYNC_FDATASYNC))
    s.reply(unique)


@handler(abi.Op.READDIRPLUS)
async def readdirplus(s: NativeSession, unique: int, nodeid: int, ids: Ids,
                      data: bytes) -> None:
    await _readdir(s, unique, nodeid, data, plus=True)


@handler(abi.Op.READDIR)
async def readdir(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    await _readdir(s, unique, nodeid, data, plus=False)


async def _readdir(s: NativeSession, unique: int, nodeid: int, data: bytes, *,
                   plus: bool) -> None:
    """Fill up to the kernel's size; settle references as the module docstring says."""
    fh, off, size, _, _, _, _ = abi.READ_IN.unpack_from(data, ARGS)
    buf = bytearray()
    returned: Counter[int] = Counter()
    accepted = 0
    full = False

    def reply(d: DirEntry) -> bool:
        nonlocal accepted, full
        name = d.name
        namelen = len(name)
        e = d.entry
        a = e.attr
        if full or len(buf) + abi.dirent_size(namelen, plus) > size:
            full = True
            if not d.bare:
                returned[e.ino] += 1
            return False
        dtype = (a.st_mode >> 12) & 0o17
        if plus:
            # A bare entry: node id 0, the kernel lists it and instantiates nothing.
            nodeid = 0 if d.bare else e.ino
            buf.extend(_DIRENTPLUS_HEAD.pack(
                nodeid, e.generation, *_split_timeouts(e.entry_timeout, e.attr_timeout),
                *_attr_fields(a), a.st_ino, d.next_off, namelen, dtype))
        else:
            buf.extend(abi.DIRENT_HEAD.pack(a.st_ino, d.next_off, namelen, dtype))
        buf.extend(name)
        buf.extend(_PADS[-len(buf) & 7])
        accepted += 1
        if (name in _DOTS or not plus) and not d.bare:
            returned[d.entry.ino] += 1
        return True

    try:
        if s.handleless_dirs:
            await s.fs.readdir_inode(nodeid, off, reply)
        else:
            await s.fs.readdir(fh, off, reply)
    except Exception as e:
        if not accepted:
            raise
        if not isinstance(e, OSError):
            log.exception("readdir(%d, %d) failed after %d entries; sending those",
                          fh, off, accepted)
    finally:
        if returned:
            with trio.CancelScope(shield=True):
                await _forget(s, list(returned.items()))
    if not s.reply(unique, buf) and plus and accepted:
        # Not taken: the kernel holds none of the references these entries carried.
        given = Counter[int]()
        _count_plus_entries(buf, given)
        with trio.CancelScope(shield=True):
            await _forget(s, list(given.items()))


def _count_plus_entries(buf: bytearray, into: Counter[int]) -> None:
    pos = 0
    while pos < len(buf):
        fields = _DIRENTPLUS_HEAD.unpack_from(buf, pos)
        namelen = fields[-2]
        name = bytes(buf[pos + _DIRENTPLUS_HEAD.size:pos + _DIRENTPLUS_HEAD.size + namelen])
        if name not in _DOTS and fields[0]:  # node id 0: a bare entry, no reference
            into[fields[0]] += 1
        pos += abi.dirent_size(namelen, True)


# --- xattrs -------------------------------------------------------------------------------------

@handler(abi.Op.SETXATTR, fails_whole=True)
async def setxattr(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    kill_sgid = False
    if s.flags & abi.SETXATTR_EXT:
        st = abi.SETXATTR_IN_EXT
        size, flags, xflags, _ = st.unpack_from(data, ARGS)
        kill_sgid = bool(xflags & abi.SETXATTR_ACL_KILL_SGID)
    else:
        st = abi.SETXATTR_IN
        size, flags = st.unpack_from(data, ARGS)
    start = ARGS + st.size
    end = data.index(b"\0", start)
    name, value = data[start:end], data[end + 1:end + 1 + size]
    caller = _caller(ids)
    if flags & (XATTR_CREATE | XATTR_REPLACE):
        # fsapi has no flags (pyfuse3 has none either): check first, as pyfuse3 does.
        await s.fs.setxattr_prepare(nodeid, name, caller)
        try:
            await s.fs.getxattr(nodeid, name, caller)
            exists = True
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
            exists = False
        if flags & XATTR_CREATE and exists:
            raise OSError(errno.EEXIST, "xattr exists")
        if flags & XATTR_REPLACE and not exists:
            raise OSError(errno.ENODATA, "no such xattr")
    await s.fs.setxattr(nodeid, name, value, caller)
    if kill_sgid:
        await _kill_sgid(s, nodeid, caller)
    s.reply(unique)


async def _kill_sgid(s: NativeSession, nodeid: int, caller: Caller) -> None:
    """After an access ACL set by a caller outside the group: drop S_ISGID, which the
    backing filesystem kept (the daemon may keep it) and the kernel would have dropped."""
    attr = (await s.fs.getattr(nodeid, caller)).attr
    if attr.st_mode & stat.S_ISGID:
        await s.fs.setattr(nodeid, SetattrRequest(mode=stat.S_IMODE(attr.st_mode)
                                                  & ~stat.S_ISGID), None, caller)


def _sized(s: NativeSession, unique: int, value: bytes, size: int) -> None:
    if size == 0:
        s.reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
    elif len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    else:
        s.reply(unique, value)


@handler(abi.Op.GETXATTR, fails_whole=True)
async def getxattr(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    size, _ = abi.GETXATTR_IN.unpack_from(data, ARGS)
    name = _name(data, ARGS + abi.GETXATTR_IN.size)
    _sized(s, unique, bytes(await s.fs.getxattr(nodeid, name, _caller(ids))), size)


@handler(abi.Op.LISTXATTR, fails_whole=True)
async def listxattr(s: NativeSession, unique: int, nodeid: int, ids: Ids, data: bytes) -> None:
    size, _ = abi.GETXATTR_IN.unpack_from(data, ARGS)
    names = await s.fs.listxattr(nodeid, _caller(ids))
    _sized(s, unique, b"".join(bytes(n) + b"\0" for n in names), size)


@handler(abi.Op.REMOVEXATTR, fails_whole=True)
async def removexattr(s: NativeSession, unique: int, nodeid: int, ids: Ids,
                      data: bytes) -> None:
    await s.fs.removexattr(nodeid, _name(data, ARGS), _caller(ids))
    s.reply(unique)


