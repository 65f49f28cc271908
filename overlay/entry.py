"""OvlInode: one overlay inode and the stack of backing objects behind it.

An overlay inode is its name's resolution through the layers (namei.py): an optional upper
object and, for a directory, the lower directories merged under it (top first), or, for a
non-directory still on a lower layer, the one lower object. Each backing object is held by
an O_PATH fd owned by the inode and closed at eviction.

``key`` and ``ino`` are the reported st_ino (layers.LayerStack.st_ino of the copy-up origin,
or of the upper object when it has no origin), so they do not change when the object is
copied up: copy-up only fills in ``upper``.

``parent``/``name`` are the name the inode was last looked up, created or renamed as (what
a dentry knows): copy-up needs the parent's upper directory. A child holds one lookup
reference on its parent (taken by namei, given back at eviction), so the parent's fds stay
open while any child is in the table, as a dentry pins its parent.

Locks: ``lock`` (backingfs) serialises writes and attribute updates; ``copy_up_lock`` makes
copy-up happen once (copyup.py re-checks ``upper`` after taking it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backingfs.closing import close_fd
from backingfs.dirents import DirSnapshot
from backingfs.fsapi import ROOT_INO
from backingfs.inodes import Inode
from backingfs.locks import QuickLock

if TYPE_CHECKING:
    from backingfs.inodes import InodeTable

    from .layers import Layer, LayerStack

ROOT_KEY = "root"


@dataclass(eq=False)
class LowerRef:
    """One lower backing object of an inode."""

    layer: Layer
    fd: int  # O_PATH fd, owned by the inode
    has_xwhiteouts: bool = False  # directory whose opaque xattr is "x"


class OvlInode(Inode):
    def __init__(self, ino: int, key: Hashable, *, mode: int, upper: int | None,
                 upper_xwhiteouts: bool, lowers: list[LowerRef], is_opaque: bool,
                 parent: OvlInode | None, name: bytes) -> None:
        super().__init__(ino, key)
        self.mode = mode  # file type bits are what matter; never changes
        self.upper = upper  # O_PATH fd of the upper object, once it exists
        self.upper_xwhiteouts = upper_xwhiteouts
        self.lowers = lowers
        self.is_opaque = is_opaque
        self.parent = parent
        self.name = name
        self._copy_up_lock: QuickLock | None = None
        self.table: InodeTable[OvlInode] | None = None  # for the parent reference
        self.holds_parent_ref = False
        #: What stat reports: ``ino``, but a successor of an inode detached for lower
        #: passthrough (file.py) keeps its predecessor's number, unchanged by the copy-up,
        #: and every name of a lower hard link reports the lower file's (namei.adopt)
        #: until its copy-up gives it the upper file's (copyup._broke_hard_link).
        self.st_ino = ino
        #: Open handles whose reads the kernel serves from the lower file (file.py).
        self.lower_passthrough_opens = 0
        #: Marked stale by an open that could not share the lower backing file (file.py).
        self.detached_for_passthrough = False
        #: The other kernel inode of the same file across such a detachment (the detached
        #: one and its successor, namei.adopt): an attribute change through one must
        #: reach the other's cached attributes (inode.tell_twin).
        self.twin: OvlInode | None = None
        #: Merged listings being read without a handle, by generation (readdir.py)
        self.listings: dict[int, DirSnapshot[int]] | None = None
        #: No name leads to it any more: an unlink, or a rename over it, took its last
        #: name (dir.py) while it had no upper object. Its name in the upper directory is
        #: a whiteout or another object now, so it can never be copied up (inode.setattr).
        self.unlinked = False
        #: chattr +i/+a as the kernel's overlayfs sees them, once known (protattr.py)
        self.prot: int | None = None

    @classmethod
    def make_root(cls, layers: LayerStack) -> OvlInode:
        """The root: the layer roots, merged (opacity of the roots is not honoured, as in
        the kernel, since there is nothing under a root to hide)."""
        # Duplicates of the layer fds, so that eviction code never closes a layer root.
        upper = os.dup(layers.upper.fd) if layers.upper else None
        lowers = [LowerRef(layer, os.dup(layer.fd)) for layer in layers.lowers]
        return cls(ROOT_INO, ROOT_KEY, mode=stat.S_IFDIR, upper=upper, upper_xwhiteouts=False,
                   lowers=lowers, is_opaque=False, parent=None, name=b"")

    @property
    def copy_up_lock(self) -> QuickLock:
        # Made on first use, as backingfs makes ``lock``: few inodes a listing makes are
        # ever copied up. Only trio tasks on the loop thread take it, so this cannot race.
        lock = self._copy_up_lock
        if lock is None:
            lock = self._copy_up_lock = QuickLock()
        return lock

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_merged(self) -> bool:
        """A directory with more than one backing directory (nlink 1, readdir merge)."""
        return self.is_dir and (self.upper is not None) + len(self.lowers) > 1

    @property
    def has_lower(self) -> bool:
        return bool(self.lowers)

    @property
    def is_pure_upper(self) -> bool:
        return self.upper is not None and not self.lowers

    def data_fd(self) -> int:
        """The O_PATH fd of the object holding the data and attributes now: upper once it
        exists, else the top lower."""
        if self.upper is not None:
            return self.upper
        return self.lowers[0].fd

    def data_layer(self) -> Layer | None:
        """The lower layer holding the data, or None when it is the upper."""
        return None if self.upper is not None else self.lowers[0].layer

    def set_parent(self, parent: OvlInode, name: bytes) -> None:
        """Record a new name (rename); moves the parent reference."""
        old = self.parent
        self.name = name
        if old is parent:
            return
        self.parent = parent
        if self.table is not None and self.holds_parent_ref:
            self.table.ref(parent.ino)
            if old is not None:
                self.table.forget(old.ino, 1)

    def on_evict(self) -> None:
        self.listings = None
        twin, self.twin = self.twin, None
        if twin is not None and twin.twin is self:
            twin.twin = None
        fds = [self.upper] if self.upper is not None else []
        fds += [lower.fd for lower in self.lowers]
        self.upper = None
        self.lowers = []
        for fd in fds:
            close_fd(fd)
        parent, self.parent = self.parent, None
        if parent is not None and self.table is not None and self.holds_parent_ref:
            self.holds_parent_ref = False
            self.table.forget(parent.ino, 1)
