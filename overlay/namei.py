"""Lookup through the layers: whiteouts, opaque directories, origin, the inode it names.

``resolve(sb, parent, name)`` finds what ``name`` is in the overlay directory ``parent``
(reference §B.3, §B.4, the kernel's ``ovl_lookup``), walking the parent's backing
directories top-down:

- the upper directory first, then each lower directory merged into the parent;
- a whiteout (char 0/0, ``.wh.NAME``, or the xattr form in an ``opaque=x`` directory) ends
  the walk: the name does not exist, whatever lies below;
- the first object found decides the type: a non-directory ends the walk (it hides
  anything below, a lower directory included); a directory goes on merging lower
  directories until an opaque one, and stops at the first lower non-directory (a
  directory hides a non-directory below it);
- ``.wh.*`` names themselves never exist.

The reported st_ino (``key`` of the inode) is persistent and does not change on copy-up:
a lower object's own (xino-mapped) st_ino; an upper non-directory's origin record
(xattrs.origin_name, written by copy-up) or else its own st_ino; a merged directory's top
lower st_ino (what copy-up recorded too, and what the kernel reports), else the upper's.

Runs inline on the loop: a handful of fstatat/getxattr calls on directories we hold open.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backingfs.syscalls import check_name, open_path

from . import whiteout as wo
from .entry import LowerRef, OvlInode
from .xattrs import origin_name

if TYPE_CHECKING:
    from .superblock import Superblock


@dataclass(eq=False)
class Resolved:
    st: os.stat_result | None = None  # the top object; None: the name does not exist
    upper: int | None = None  # O_PATH fd (owned until adopted or closed)
    upper_xwhiteouts: bool = False
    lowers: list[LowerRef] = field(default_factory=list)
    is_opaque: bool = False
    upper_whiteout: bool = False  # negative because of a whiteout on the upper layer
    st_ino: int | None = None

    @property
    def exists(self) -> bool:
        return self.st is not None

    @property
    def is_dir(self) -> bool:
        return self.st is not None and stat.S_ISDIR(self.st.st_mode)

    def close(self) -> None:
        fds = ([self.upper] if self.upper is not None else []) + [lo.fd for lo in self.lowers]
        self.upper, self.lowers = None, []
        for fd in fds:
            os.close(fd)


#: ``resolve``'s ``upper_st`` when nobody has looked at the upper layer yet.
UNSEEN: Any = object()


def resolve(sb: Superblock, parent: OvlInode, name: bytes,
            upper_st: os.stat_result | None = UNSEEN) -> Resolved:
    """What ``name`` is in ``parent`` (see the module docstring). Blocking; OSError on
    backing errors. The caller owns the fds in the result (adopt or close).
    ``upper_st``: the name's lstat on the parent's upper directory (None: absent) when the
    caller just took it (``find_upper``), which spares taking it again."""
    check_name(name)
    res = Resolved()
    if not parent.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory", name)
    if wo.is_aufs_name(name):
        return res
    prefix = sb.prefix
    try:
        done = False
        if parent.upper is not None:
            st = wo.lstat_at(parent.upper, name) if upper_st is UNSEEN else upper_st
            if st is not None and wo.is_whiteout(parent.upper, name, st, prefix,
                                                 parent.upper_xwhiteouts):
                res.upper_whiteout = True
                return res
            if st is None and wo.has_aufs_whiteout(parent.upper, name):
                res.upper_whiteout = True
                return res
            if st is not None:
                # A .wh.NAME hides NAME in the layers below only, never an object beside
                # it in its own layer (OCI layers; and how lower layers are read here).
                res.st = st
                res.upper = open_path(parent.upper, name)
                if stat.S_ISDIR(st.st_mode):
                    res.is_opaque, res.upper_xwhiteouts = wo.dir_state(res.upper, prefix)
                    if not res.is_opaque and wo.has_aufs_whiteout(parent.upper, name):
                        res.is_opaque = True  # a new directory over a deleted one
                    done = res.is_opaque
                else:
                    done = True
        if not done:
            _resolve_lowers(sb, parent, name, res)
        if res.st is not None:
            res.st_ino = _st_ino(sb, res)
        return res
    except BaseException:
        res.close()
        raise


def known_upper(sb: Superblock, parent: OvlInode,
                name: bytes) -> tuple[OvlInode, os.stat_result] | None:
    """``find_upper`` without what it saw."""
    return find_upper(sb, parent, name)[0]


def find_upper(sb: Superblock, parent: OvlInode, name: bytes,
               ) -> tuple[tuple[OvlInode, os.stat_result] | None, os.stat_result | None]:
    """The inode ``name`` names, with one new lookup, and the upper object's stat, when
    that object is on the upper layer and already has an inode keyed by its own st_ino;
    else None: ``resolve`` it, passing the second item (the name's lstat on the upper
    layer, None when absent there, UNSEEN when not looked at) as its ``upper_st``.
    Blocking.

    The common case of every repeated lookup (a listing of a directory made through the
    mount, an entry revalidated): one fstatat and one fstat instead of an O_PATH open, an
    origin xattr read and, for a directory, its opacity (an xattr and two ``.wh.`` names).
    Those decide the key, which the table already holds: an upper object keyed by its own
    number has no origin record (an origin would be its key), and a directory keyed so has
    no lower directory (a merged one is keyed by its top lower's number); its opacity and
    lowers were found when its inode was made, and only this mount changes them since.
    A whiteout (an xattr whiteout can be a hard link of a file that has an inode) and a
    name whose object differs from the inode's (replaced behind the mount) take the long
    way."""
    upper_layer = sb.layers.upper
    if parent.upper is None or upper_layer is None or wo.is_aufs_name(name):
        return None, UNSEEN
    check_name(name)
    st = wo.lstat_at(parent.upper, name)
    if st is None or wo.is_whiteout(parent.upper, name, st, sb.prefix,
                                    parent.upper_xwhiteouts):
        # An xattr whiteout may be a hard link of a file with an inode (found in review).
        return None, st
    st_ino = sb.layers.st_ino(upper_layer, st.st_ino)
    if st_ino is None:
        return None, st
    inode = sb.inodes.lookup_existing(st_ino)
    if inode is None:
        return None, st
    try:
        fd = inode.upper
        same = fd is not None and not inode.is_stale
        if same:
            ust = os.fstat(fd)  # type: ignore[arg-type]
            same = (ust.st_ino, ust.st_dev) == (st.st_ino, st.st_dev)
    except BaseException:
        sb.inodes.forget(inode.ino, 1)
        raise
    if not same:
        sb.inodes.forget(inode.ino, 1)
        return None, st
    if inode.parent is not parent or inode.name != name:
        inode.set_parent(parent, name)
    return (inode, st), st


def _resolve_lowers(sb: Superblock, parent: OvlInode, name: bytes, res: Resolved) -> None:
    bottom = len(parent.lowers) - 1
    for i, lower in enumerate(parent.lowers):
        st = wo.lstat_at(lower.fd, name)
        if st is None:
            if wo.has_aufs_whiteout(lower.fd, name):
                return
            continue
        if wo.is_whiteout(lower.fd, name, st, sb.prefix, lower.has_xwhiteouts):
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if res.st is not None and not is_dir:
            return  # a directory above hides a non-directory below
        fd = open_path(lower.fd, name)
        try:
            # The walk ends after the bottom lower anyway: its opacity is not needed there.
            opaque, xwh = (wo.dir_state(fd, sb.prefix, i == bottom) if is_dir
                           else (False, False))
            if is_dir and not opaque and i != bottom and wo.has_aufs_whiteout(lower.fd, name):
                opaque = True  # a new directory over a deleted one, as in the upper layer
        except BaseException:
            os.close(fd)
            raise
        res.lowers.append(LowerRef(lower.layer, fd, xwh))
        if res.st is None:
            res.st = st
        if not is_dir or opaque:
            return


def _st_ino(sb: Superblock, res: Resolved) -> int | None:
    assert res.st is not None
    layers = sb.layers
    if res.upper is not None:
        if res.is_dir:
            if res.lowers:
                return layers.st_ino(res.lowers[0].layer, os.fstat(res.lowers[0].fd).st_ino)
        else:
            origin = wo.get_xattr_fd(res.upper, origin_name(sb.prefix))
            if origin is not None:
                try:
                    return int(origin)
                except ValueError:
                    pass
        assert layers.upper is not None
        return layers.st_ino(layers.upper, res.st.st_ino)
    return layers.st_ino(res.lowers[0].layer, res.st.st_ino)


def upper_file_key(sb: Superblock, st: os.stat_result) -> object:
    """The inode key ``adopt`` gives an upper non-directory without an origin record (a
    copied-up lower hard link): its own mapped st_ino, or a non-persistent one."""
    assert sb.layers.upper is not None
    st_ino = sb.layers.st_ino(sb.layers.upper, st.st_ino)
    return st_ino if st_ino is not None else ("nomap", 0, st.st_dev, st.st_ino)


def lower_positive(sb: Superblock, parent: OvlInode, name: bytes) -> bool:
    """Whether ``name`` exists on a lower layer of ``parent`` (so removing or renaming it
    away on the upper must leave a whiteout). The upper is not consulted. Blocking."""
    for lower in parent.lowers:
        st = wo.lstat_at(lower.fd, name)
        if st is None:
            if wo.has_aufs_whiteout(lower.fd, name):
                return False
            continue
        return not wo.is_whiteout(lower.fd, name, st, sb.prefix, lower.has_xwhiteouts)
    return False


def adopt(sb: Superblock, parent: OvlInode, name: bytes, res: Resolved) -> OvlInode:
    """The inode for a positive ``res``, with one new lookup reference. Takes ownership of
    the fds in ``res`` (kept by a new inode, closed or merged into an existing one)."""
    assert res.st is not None
    if res.st_ino is not None:
        key: object = res.st_ino
    else:  # unmappable backing ino: a non-persistent number, unique per backing object
        layer = res.lowers[0].layer.index if res.upper is None else 0
        key = ("nomap", layer, res.st.st_dev, res.st.st_ino)
    link_st_ino: int | None = None
    if (res.upper is None and not res.is_dir and res.st.st_nlink > 1
            and not sb.is_read_only):
        # A lower hard link that copy-up will break (no index): each name is an inode of
        # its own, as the kernel's ovl_hash_bylower() decides. One shared inode would copy
        # up whichever name it was last looked up as, and the kernel's cached dentries of
        # the other names would see the copy's data. Where node ids may differ from st_ino
        # every name reports the lower file's number, as the kernel's do (tar, rsync -H
        # and du tell hard links by it); under pyfuse3 a name's number is its node id.
        key = ("lower-link", key, parent.ino, name)
        if sb.node_ids:
            link_st_ino = res.st_ino
    elif res.upper is not None and not res.is_dir:
        copying = sb.copying_links.get((parent.ino, name))
        if copying is not None and sb.inodes.find(key) is None:
            # The copy of a lower hard link under this name was renamed into place and
            # the copy-up has not re-keyed its inode yet: this is that inode, or its
            # open handles would go stale under a second one (copyup._broke_hard_link).
            sb.inodes.rekey(copying, key)
    created: list[OvlInode] = []
    # An inode detached for lower passthrough (file.py) still holds the persistent number:
    # its successor reports it too, so stat sees no change across the copy-up.
    holder = (sb.inodes.peek(res.st_ino) if sb.lower_passthrough and res.st_ino is not None
              else None)
    keep_st_ino = (holder is not None and holder.detached_for_passthrough
                   and holder.key == key)

    def make(ino: int) -> OvlInode:
        inode = OvlInode(ino, key, mode=res.st.st_mode, upper=res.upper,
                         upper_xwhiteouts=res.upper_xwhiteouts, lowers=res.lowers,
                         is_opaque=res.is_opaque, parent=parent, name=name)
        if keep_st_ino and holder is not None:
            inode.st_ino = holder.st_ino
            inode.twin, holder.twin = holder, inode
        elif link_st_ino is not None:
            inode.st_ino = link_st_ino
        created.append(inode)
        return inode

    inode = sb.inodes.lookup(key, make, preferred_ino=res.st_ino)
    if created:
        res.upper, res.lowers = None, []  # now the inode's
        inode.table = sb.inodes
        sb.inodes.ref(parent.ino)
        inode.holds_parent_ref = True
        return inode
    if inode.upper is None and res.upper is not None and not inode.is_stale:
        inode.upper, res.upper = res.upper, None  # copied up behind our back
        inode.upper_xwhiteouts = res.upper_xwhiteouts
    res.close()
    if inode.parent is not parent or inode.name != name:
        inode.set_parent(parent, name)
    return inode
