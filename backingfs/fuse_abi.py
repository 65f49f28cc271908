"""The kernel's FUSE wire protocol (include/uapi/linux/fuse.h): opcodes, flags and the
struct layouts the native session reads and writes.

Pure data and packing helpers, no I/O: unit-tested against the sizes the header states.
Every struct is little-endian-native (``=``, no padding: the header pads by hand).
Layouts follow protocol 7.40+ (``fuse_open_out.backing_id``, ``fuse_init_out.flags2`` and
``max_stack_depth``); older kernels read a prefix of the same structs.
"""

from __future__ import annotations

import struct
from enum import IntEnum

KERNEL_VERSION = 7
#: The minor we speak: 7.40 brought passthrough (backing_id in fuse_open_out).
KERNEL_MINOR_VERSION = 40
#: Below this the layouts used here differ (e.g. no fuse_init_out.max_pages before 7.28).
MIN_MINOR_VERSION = 31


class Op(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# --- INIT flags (64 bits; bits 32..63 travel in flags2, only with INIT_EXT) ----------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
#: Requests through io_uring per-CPU queues (7.42; offered only when the fuse module's
#: ``enable_uring`` parameter is on). See fuse_uring.py.
OVER_IO_URING = 1 << 41

INIT_FLAG_NAMES = {v: k for k, v in globals().items()
                   if k.isupper() and isinstance(v, int) and v > 0 and v & (v - 1) == 0
                   and k not in ("KERNEL_VERSION", "KERNEL_MINOR_VERSION", "MIN_MINOR_VERSION")}


def flag_names(flags: int) -> str:
    """``ASYNC_READ|BIG_WRITES|...`` for the debug log."""
    return "|".join(INIT_FLAG_NAMES.get(1 << b, f"bit{b}") for b in range(64) if flags >> b & 1)


# --- open reply flags ------------------------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# --- setattr valid bits ----------------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
#: OPEN_IN.open_flags: an O_TRUNC open by a caller without CAP_FSETID (HANDLE_KILLPRIV_V2).
OPEN_KILL_SUIDGID = 1 << 0
FSYNC_FDATASYNC = 1 << 0
RELEASE_FLUSH = 1 << 0
WRITE_KILL_SUIDGID = 1 << 2

# --- notifications (out header: unique 0, error = code) --------------------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6
#: 7.45 (Linux 6.18): drop the listed node ids' unused dentries and inodes, so the kernel
#: FORGETs them; ones in use are skipped. Older kernels answer EINVAL.
NOTIFY_PRUNE = 9

# --- /dev/fuse ioctls (_IOW(229, n, size)) ---------------------------------------------------
DEV_IOC_CLONE = 0x8004E500           # _IOR(229, 0, uint32_t)
DEV_IOC_BACKING_OPEN = 0x4010E501    # _IOW(229, 1, struct fuse_backing_map)
DEV_IOC_BACKING_CLOSE = 0x4004E502   # _IOW(229, 2, uint32_t)

#: A passthrough backing file may itself sit on a stack this deep (1: a plain fs only).
MAX_STACK_DEPTH = 1

# --- struct layouts ---------------------------------------------------------------------------
IN_HEADER = struct.Struct("=IIQQIIIHH")          # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")               # len error unique
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")        # fuse_attr (88)
ENTRY_HEAD = struct.Struct("=QQQQII")            # nodeid generation entry_valid attr_valid nsec*2
ATTR_OUT_HEAD = struct.Struct("=QII")            # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("=IIIII")                # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")     # 64 bytes
OPEN_IN = struct.Struct("=II")                   # flags open_flags
CREATE_IN = struct.Struct("=IIII")               # flags mode umask open_flags
OPEN_OUT = struct.Struct("=QIi")                 # fh open_flags backing_id
RELEASE_IN = struct.Struct("=QIIQ")              # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("=QIIQ")                # fh unused padding lock_owner
READ_IN = struct.Struct("=QQIIQII")              # fh offset size read_flags lock_owner flags pad
WRITE_IN = READ_IN                               # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("=II")
GETATTR_IN = struct.Struct("=IIQ")               # getattr_flags dummy fh
STATX_IN = struct.Struct("=IIQII")              # getattr_flags reserved fh sx_flags sx_mask
#: fuse_statx_out: attr_valid attr_valid_nsec flags spare[2], then struct fuse_statx: mask
#: blksize attributes nlink uid gid mode spare ino size blocks attributes_mask, the times
#: atime btime ctime mtime (sec nsec reserved), rdev and dev major/minor, spare[14].
STATX_OUT = struct.Struct("=QII16x" "IIQIIIHxxQQQQ" "qIiqIiqIiqIi" "IIII112x")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")  # 88 bytes
MKNOD_IN = struct.Struct("=IIII")                # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")                  # mode umask
RENAME_IN = struct.Struct("=Q")                  # newdir
RENAME2_IN = struct.Struct("=QII")               # newdir flags padding
LINK_IN = struct.Struct("=Q")                    # oldnodeid
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN = struct.Struct("=II")               # size flags
SETXATTR_IN_EXT = struct.Struct("=IIII")         # size flags setxattr_flags padding
#: setxattr_flags of SETXATTR_IN_EXT: the caller may not keep S_ISGID (not in the group,
#: no CAP_FSETID) while setting an access ACL: clear it, as posix_acl_update_mode does.
SETXATTR_ACL_KILL_SGID = 1 << 0
GETXATTR_IN = struct.Struct("=II")               # size padding
GETXATTR_OUT = struct.Struct("=II")
ACCESS_IN = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
KSTATFS = struct.Struct("=QQQQQIIII24x")          # 80 bytes
LSEEK_IN = struct.Struct("=QqII")              # fh offset(signed) whence padding
LSEEK_OUT = struct.Struct("=Q")
FALLOCATE_IN = struct.Struct("=QQQII")
#: fh_in off_in nodeid_out fh_out off_out len flags; answered with WRITE_OUT.
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")
IOCTL_IN = struct.Struct("=QIIQII")               # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("=iIII")               # result flags in_iovs out_iovs
DIRENT_HEAD = struct.Struct("=QQII")             # ino off namelen type
BACKING_MAP = struct.Struct("=iIQ")              # fd flags padding
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")   # parent namelen flags
NOTIFY_DELETE_OUT = struct.Struct("=QQII")       # parent child namelen padding
NOTIFY_PRUNE_OUT = struct.Struct("=IIQ")         # count padding spare; then count u64 node ids

ENTRY_OUT_SIZE = ENTRY_HEAD.size + ATTR.size     # 128
#: The smallest read buffer the kernel accepts, besides room for one max_write.
MIN_READ_BUFFER = 8192


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout in seconds -> (sec, nsec) as the kernel wants it; negative counts as 0."""
    if seconds <= 0:
        return 0, 0
    sec = int(seconds)
    return sec, int((seconds - sec) * 1e9)


def dirent_size(namelen: int, plus: bool) -> int:
    """Bytes one entry takes in a READDIR(PLUS) reply, padded to 8."""
    size = DIRENT_HEAD.size + namelen
    size = (size + 7) & ~7
    return size + ENTRY_OUT_SIZE if plus else size


# --- FUSE over io_uring (7.42) ------------------------------------------------------------
#: IORING_OP_URING_CMD ``cmd_op`` values.
URING_CMD_REGISTER = 1
URING_CMD_COMMIT_AND_FETCH = 2
#: struct fuse_uring_req_header: in_out (the in or out header), op_in (the request's first
#: argument, its fixed part), ring_ent_in_out (flags, commit_id, payload_sz, padding,
#: reserved).
URING_IN_OUT = 0
URING_OP_IN = 128
URING_ENT_IN_OUT = 256
URING_HEADER_SIZE = 288
URING_ENT_IN_OUT_FMT = struct.Struct("=QQIIQ")
#: struct fuse_uring_cmd_req, in the SQE's command area: flags, commit_id, qid, padding.
URING_CMD_REQ = struct.Struct("=QQH6x")
