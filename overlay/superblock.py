"""Superblock: one mount's layers, validated with the kernel's rules, its work dir and tables.

``Superblock.mount(params, mountpoint)`` runs before anything is mounted, in the CLI process,
so every user error is one line and a non-zero exit (``QuietError``), never a traceback.
Checks, as the kernel's ``super.c`` makes them (reference §B.2):

- every layer exists and is a directory; lowerdir symlinks are resolved once, here;
- with an upper: workdir on the upper's filesystem, workdir and upperdir separate
  subtrees, upper not on a read-only mount;
- no layer (upper, work or lower) is an ancestor of, descendant of, or the same directory
  as another, and none contains the mountpoint (lookups would loop through the mount);
- at most 500 lowers (params.verify).

Then ``workdir/work`` (mode 0700) is created and emptied of leftovers from an interrupted
copy-up, and we probe whether a char 0/0 whiteout can be made there; if mknod is refused
(or ``FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT`` is set, as fuse-overlayfs honours) new
whiteouts are AUFS ``.wh.NAME`` files instead (whiteout.py).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import stat
from collections.abc import Iterator

from backingfs.context import BackingFileCtx
from backingfs.handles import HandleTable
from backingfs.inodes import InodeTable
from backingfs.notify import Notifier
from backingfs.runner import QuietError
from backingfs.sync import SyncPolicy
from backingfs.syscalls import O_PATH_NOFOLLOW, close_reports_errors

from .entry import OvlInode
from .idmap import Ownership
from .layers import Layer, LayerStack, open_layer
from .params import OvlParams
from .whiteout import WHITEOUT_AUFS, WHITEOUT_CHR, probe_whiteout

log = logging.getLogger(__name__)

WORK_NAME = "work"


def _is_within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both real, absolute)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _open_checked(index: int, role: str, path: str) -> Layer:
    try:
        return open_layer(index, path)
    except FileNotFoundError:
        raise QuietError(f"{role} {path}: no such directory") from None
    except NotADirectoryError:
        raise QuietError(f"{role} {path}: not a directory") from None
    except OSError as e:
        raise QuietError(f"{role} {path}: {e.strerror}") from None


class Superblock:
    """Everything one mount shares: params, layers, work dir, inode and handle tables."""

    def __init__(self, params: OvlParams, layers: LayerStack, work_fd: int | None,
                 whiteout_kind: str) -> None:
        self.params = params
        self.layers = layers
        self.work_fd = work_fd  # O_PATH fd of workdir/work, None when read-only
        self.whiteout_kind = whiteout_kind
        self.prefix = params.xattr_prefix
        # uid/gid mapping, squashing, owner/mode in xattrs; None: ownership passes through.
        self.owners: Ownership | None = Ownership.build(params, layers)
        self.sync = SyncPolicy(fsync=params.fsync, volatile=params.volatile)
        #: The front-end's Notifier (set through OverlayFs.notifier); None outside a session.
        self.notifier: Notifier | None = None
        #: Copy-ups of lower hard links in flight, by (parent ino, name): the new upper file
        #: gets a key of its own (``copyup._broke_hard_link``), so a lookup that finds it
        #: before the copy-up re-keys the inode must take this inode (``namei.adopt``).
        self.copying_links: dict[tuple[int, bytes], OvlInode] = {}
        self.rw_ctx: BackingFileCtx | None = None  # built by file.py on first I/O
        #: Lower files of a writable mount served by kernel passthrough (file.py): the
        #: lower_passthrough option on a session that has passthrough (ops.init).
        self.lower_passthrough = False
        #: The session takes node ids apart from st_ino (ops.init): then the names of a
        #: lower hard link, separate inodes, all report its st_ino, as the kernel's do.
        self.node_ids = False
        #: Dots may be listed bare (ops.init; fsapi.Filesystem.bare_dots).
        self.bare_dots = False
        #: Modes of new objects come without the umask applied (ops.init;
        #: fsapi.Filesystem.dont_mask): dir._make applies it, or the default ACL.
        self.dont_mask = False
        # FLUSH is served only when the upper layer's close(2) can report errors (file.flush).
        self.flush_closes = layers.upper is not None and close_reports_errors(layers.upper.fd)
        root = OvlInode.make_root(layers)
        self.inodes: InodeTable[OvlInode] = InodeTable(root)
        self.handles: HandleTable = HandleTable(self.inodes)
        root.table = self.inodes
        self._tmp_names: Iterator[int] = itertools.count(1)
        self._listing_gen = 0

    @property
    def is_read_only(self) -> bool:
        return self.layers.upper is None

    def tmp_name(self) -> bytes:
        """A fresh name in work/ for an object being built (unique within this mount;
        work/ is emptied at every mount)."""
        return b"#%x.%d" % (os.getpid(), next(self._tmp_names))

    def next_listing(self) -> int:
        """A generation for a handle-less directory listing (readdir.py): 1 .. 2**31-1,
        so that ``generation << 32 | position`` stays a positive 64-bit offset."""
        self._listing_gen = self._listing_gen % 0x7FFFFFFF + 1
        return self._listing_gen

    @classmethod
    def mount(cls, params: OvlParams, mountpoint: str) -> Superblock:
        """Open and validate the layers of ``params`` for a mount on ``mountpoint``."""
        opened: list[Layer] = []
        work_fd: int | None = None
        try:
            upper: Layer | None = None
            roles: list[tuple[str, str]] = []
            if params.upperdir is not None:
                assert params.workdir is not None
                upper = _open_checked(0, "upperdir", params.upperdir)
                opened.append(upper)
                roles.append(("upperdir", upper.path))
            lowers = []
            for i, path in enumerate(params.lowerdirs, start=1):
                layer = _open_checked(i, "lowerdir", path)
                opened.append(layer)
                lowers.append(layer)
                roles.append(("lowerdir", layer.path))
            if upper is not None:
                assert params.workdir is not None
                work = _open_checked(-1, "workdir", params.workdir)
                opened.append(work)
                _check_upper_work(upper, work)
                roles.append(("workdir", work.path))
            _check_disjoint(roles, os.path.realpath(mountpoint))
            whiteout_kind = WHITEOUT_CHR
            if upper is not None:
                work_fd = _prepare_work(work.fd)
                if os.environ.get("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT"):
                    whiteout_kind = WHITEOUT_AUFS
                else:
                    whiteout_kind = probe_whiteout(work_fd)
                if whiteout_kind != WHITEOUT_CHR:
                    log.warning("cannot create char 0/0 whiteouts in %s: using .wh. files",
                                work.path)
                os.close(work.fd)
                opened.remove(work)
            try:
                return cls(params, LayerStack(upper, lowers), work_fd, whiteout_kind)
            except OSError as e:  # Ownership.build: the upper refuses the override xattr
                raise QuietError(f"cannot set up xattr_permissions on the upper layer: "
                                 f"{e.strerror}") from None
        except BaseException:
            for layer in opened:
                os.close(layer.fd)
            if work_fd is not None:
                os.close(work_fd)
            raise

    def close(self) -> None:
        self.layers.close()
        if self.work_fd is not None:
            os.close(self.work_fd)
            self.work_fd = None


def _check_upper_work(upper: Layer, work: Layer) -> None:
    if work.st_dev != upper.st_dev:
        raise QuietError(f"workdir {work.path} and upperdir {upper.path} must reside on "
                         "the same filesystem")
    if _is_within(work.path, upper.path) or _is_within(upper.path, work.path):
        raise QuietError(f"workdir {work.path} and upperdir {upper.path} must be "
                         "separate subtrees")
    if os.statvfs(f"/proc/self/fd/{upper.fd}").f_flag & os.ST_RDONLY:
        raise QuietError(f"upperdir {upper.path} is on a read-only filesystem; "
                         "mount without upperdir for a read-only overlay")


def _check_disjoint(roles: list[tuple[str, str]], mountpoint: str) -> None:
    for (role_a, a), (role_b, b) in itertools.combinations(roles, 2):
        if _is_within(a, b) or _is_within(b, a):
            raise QuietError(f"overlapping {role_a} path {a} and {role_b} path {b}")
    for role, path in roles:
        if _is_within(mountpoint, path):
            raise QuietError(f"{role} {path} contains the mountpoint {mountpoint}")


def _prepare_work(workdir_fd: int) -> int:
    """``workdir/work`` exists (0700) and is empty; returns an O_PATH fd of it."""
    try:
        os.mkdir(WORK_NAME, 0o700, dir_fd=workdir_fd)
    except FileExistsError:
        pass
    except OSError as e:
        raise QuietError(f"cannot create workdir/{WORK_NAME}: {e.strerror}") from None
    fd = os.open(WORK_NAME, O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=workdir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)  # private, whoever made it
        clean_work(fd)
    except OSError as e:
        os.close(fd)
        raise QuietError(f"cannot empty workdir/{WORK_NAME}: {e.strerror}") from None
    return fd


def clean_work(work_fd: int) -> None:
    """Remove everything in work/: leftovers of copy-ups or removals a crash interrupted."""
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work_fd)
    try:
        for name in os.listdir(dfd):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=dfd)
            else:
                os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)


# SHARE: generic (no passthru twin yet): remove an entry or a whole tree relative to an
# O_PATH directory fd.
def remove_tree_at(dir_fd: int, name: bytes) -> None:
    """Remove ``name`` (a directory tree or anything else) in ``dir_fd`` (O_PATH allowed)."""
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        try:
            os.unlink(name, dir_fd=dfd)
        except IsADirectoryError:
            shutil.rmtree(os.fsdecode(name), dir_fd=dfd)
        except OSError as e:
            if e.errno != errno.EISDIR:
                raise
            shutil.rmtree(os.fsdecode(name), dir_fd=dfd)
    finally:
        os.close(dfd)
