"""backingfs: the shared backing-file layer, the userspace twin of the kernel's fs/backing-file.c.

Layering: overlay/ and passthru/ import backingfs, never each other; within backingfs only
``bridge`` imports pyfuse3 (so this package imports without it), and ``runner`` drives it.

Modules (one concept each):
    flags        IocbFlags, BACKING_IOCB_MASK, open flags -> request flags -> os.RWF_*
    request      Request (the iocb): target file, position, flags, completion; clone()
    backing_file BackingFile: refcounted backing fd (get/put), never O_APPEND
    inflight     InFlight: in-flight request counts per handle/inode/mount, wait_drained()
    context      BackingFileCtx: accessed, end_write, credential policy, dropped flags
    workers      Workers: threads for blocking backing syscalls; never abandons work
    pressure     LoopPressure: are requests waiting? (inline vs queued I/O)
    uring        Uring: io_uring backend for queued I/O, completions on the trio loop
    aio          BackingAio: one queued request, refcount 2, ordered completion
    rw           read_iter/write_iter (sync and queued) and the awaitable read/write helpers
    attrs        Attr (plain stat record), AttrCache (versioned size/mtime/ctime/mode)
    inodes       InodeTable/Inode: BackingId identity, exact lookup counts, stale inodes
    handles      HandleTable/Handle: fh -> handle, never reused, release drains in-flight I/O
    dirents      DirSnapshot: stable offsets per open directory; scandir of an O_PATH fd
    syscalls     renameat2, utimensat with UTIME_OMIT, O_PATH open/reopen helpers
    xattrs       xattr get/list/set/remove on fds (O_PATH too) and (dir fd, name)
    setattr      setattr_backing: owner, mode, size, times on an O_PATH fd, in native order
    copyfile     copy_data for copy-up: reflink -> copy_file_range -> read/write, holes kept
    privs        suid/sgid/security.capability stripping before a write or truncate
    creds        whose credentials backing syscalls use; owner and mode of new objects
    sync         SyncPolicy: fsync/fdatasync, fsync=0 and volatile, first-error memory
    fsapi        Filesystem: the operations interface in plain types (Entry, Caller, ...)
    notify       Notifier protocol (entry/inode invalidation) and a recording fake
    options      the shared argv grammar: -o tokenizer with escapes, -f, -d, --version
    bridge       Bridge: fsapi.Filesystem -> pyfuse3.Operations; Pyfuse3Session
    runner       mount lifecycle: checks, daemonize once live, signals, clean unmount
    testing      Target/Mount launchers shared by tests/ and tools/
"""

from .aio import QUEUED, BackingAio
from .attrs import Attr, AttrCache
from .backing_file import BackingFile
from .context import BackingFileCtx
from .flags import BACKING_IOCB_MASK, IocbFlags, from_open_flags, to_rwf
from .fsapi import Caller, DirEntry, Entry, Filesystem, OpenReply, SetattrRequest, Statfs
from .handles import Handle, HandleTable
from .inflight import InFlight
from .inodes import Inode, InodeTable
from .request import Request
from .rw import read, read_iter, write, write_iter
from .workers import Workers, default_workers

__all__ = [
    "BACKING_IOCB_MASK", "QUEUED", "Attr", "AttrCache", "BackingAio", "BackingFile",
    "BackingFileCtx", "Caller", "DirEntry", "Entry", "Filesystem", "Handle", "HandleTable",
    "InFlight", "Inode", "InodeTable", "IocbFlags", "OpenReply", "Request", "SetattrRequest",
    "Statfs", "Workers", "default_workers", "from_open_flags", "read", "read_iter", "to_rwf",
    "write", "write_iter",
]
