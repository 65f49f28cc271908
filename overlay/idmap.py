"""Ownership: id mapping, squashing and ownership kept in xattrs, at the attribute boundary.

fuse-overlayfs's ownership options (reference userspace-anchors §b.3), in one place:

- ``uidmapping=`` / ``gidmapping=`` ``CONT:HOST:LEN[:CONT:HOST:LEN...]`` (what
  containers-storage passes: its ``IDMap`` ContainerID, HostID, Size). The layers store the
  container's ids; the mount reports host ids, which the container's user namespace maps
  back. Out (stat, readdirplus, ACL xattrs): a layer id ``CONT+k`` reads as ``HOST+k``. In
  (chown, the owner of a new object, ACL xattrs): ``HOST+k`` is stored as ``CONT+k``. An id
  outside every range reads, and is stored, as the kernel's overflow id (65534), as
  fuse-overlayfs does. A kind without a mapping passes unchanged.
- ``squash_to_root`` / ``squash_to_uid=`` / ``squash_to_gid=``: every object reads as owned
  by that uid (gid); ``squash_to_uid``/``squash_to_gid`` win over ``squash_to_root`` field by
  field. The layers keep the real owners: new objects get the caller's, chown still
  reaches the upper, and its errors are ignored (a rootless daemon may not own those ids).
- ``xattr_permissions=1|2``: the upper layer's owner and mode live in an xattr instead of
  the inode (``security.fuseoverlayfs.override_stat`` / ``user.containers.override_stat``),
  so a daemon that cannot chown (rootless, NFS) still keeps them. The value is
  ``UID:GID:0MODE`` (decimal ids as stored on the layer, octal permission bits), what
  containers-storage writes with ``force_mask``; readers also accept fuse-overlayfs 1.10's
  ``UID:GID:MODE`` with file-type bits and a fourth, type field. Objects on such an upper
  belong to the daemon with a private mode (0700 directories, 0600 the rest); the mode we
  report is the xattr's. Reading: the upper honours the xattr with ``xattr_permissions``;
  a lower layer honours one when its root directory carries it (a containers-storage layer
  unpacked with ``force_mask``, or a former upper). An object without the xattr reports
  its inode's owner and mode. With ``xattr_permissions=2`` fuse-overlayfs 1.10's name
  ``user.fuseoverlayfs.override_stat`` is read too.

Order out: the layer's owner (the override xattr if the layer uses one, else the inode's),
then the mapping, then squashing. The override names this mount uses are bookkeeping:
never listed, read, written or copied up through the mount.

``Ownership.build`` answers None when no option is given, and callers skip every step then.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from backingfs import xattrs as bxattrs
from backingfs.attrs import Attr
from backingfs.fsapi import SetattrRequest

if TYPE_CHECKING:
    from .layers import LayerStack
    from .params import OvlParams

log = logging.getLogger(__name__)

OVERRIDE_PRIVILEGED = b"security.fuseoverlayfs.override_stat"  # xattr_permissions=1
OVERRIDE_CONTAINERS = b"user.containers.override_stat"  # xattr_permissions=2
OVERRIDE_FUSEOVERLAYFS = b"user.fuseoverlayfs.override_stat"  # what fuse-overlayfs 1.10 wrote
#: Names a lower layer's root is probed for, in order of preference.
OVERRIDE_NAMES = (OVERRIDE_CONTAINERS, OVERRIDE_FUSEOVERLAYFS, OVERRIDE_PRIVILEGED)

ACL_NAMES = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08
_ACL_ENTRY = struct.Struct("<HHI")

UPPER = 0  # Layer.index of the upper layer

DEFAULT_OVERFLOW = 65534


def overflow_id(kind: str) -> int:
    """The kernel's overflow uid/gid (``/proc/sys/kernel/overflow{uid,gid}``), 65534 if
    unreadable."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_OVERFLOW


@dataclass(frozen=True)
class IdRange:
    """One ``CONT:HOST:LEN`` triplet: layer ids ``cont..cont+length`` are host ids
    ``host..host+length``."""

    cont: int
    host: int
    length: int


def parse_mapping(value: str) -> tuple[IdRange, ...]:
    """``CONT:HOST:LEN[:CONT:HOST:LEN...]`` -> ranges. ValueError on anything else.

    Empty fields are skipped, as fuse-overlayfs's strtok does: containers-storage (podman
    4.3) writes every triplet with a leading colon, ``uidmapping=:0:100000:65536``."""
    parts = [p for p in value.split(":") if p]
    if len(parts) % 3 or not parts:
        raise ValueError(f"invalid mapping specified: {value}")
    try:
        nums = [int(p, 10) for p in parts]
    except ValueError:
        raise ValueError(f"invalid mapping specified: {value}") from None
    if any(n < 0 or n > 0xFFFFFFFF for n in nums):
        raise ValueError(f"invalid mapping specified: {value}")
    ranges = tuple(IdRange(*nums[i:i + 3]) for i in range(0, len(nums), 3))
    if any(r.length == 0 for r in ranges):
        raise ValueError(f"invalid mapping specified: {value} (zero length)")
    return ranges


class IdMap:
    """One kind of id (uids or gids) shifted between the layers and the mount."""

    def __init__(self, ranges: Sequence[IdRange], overflow: int) -> None:
        self.ranges = tuple(ranges)
        self.overflow = overflow

    def to_host(self, layer_id: int) -> int:
        """The id reported for ``layer_id``."""
        for r in self.ranges:
            if r.cont <= layer_id < r.cont + r.length:
                return r.host + (layer_id - r.cont)
        return self.overflow

    def to_layer(self, host_id: int) -> int:
        """The id stored for ``host_id`` given by a caller."""
        for r in self.ranges:
            if r.host <= host_id < r.host + r.length:
                return r.cont + (host_id - r.host)
        return self.overflow


class Override(NamedTuple):
    """Owner and permission bits as stored on a layer (ids not mapped)."""

    uid: int
    gid: int
    perm: int  # S_IMODE bits


def parse_override(value: bytes) -> Override | None:
    """``UID:GID:MODE[:TYPE]`` (octal mode, file-type bits ignored) or None if garbled."""
    fields = value.rstrip(b"\0").split(b":")
    if len(fields) < 3:
        return None
    try:
        return Override(int(fields[0]), int(fields[1]), stat.S_IMODE(int(fields[2], 8)))
    except ValueError:
        return None


def format_override(uid: int, gid: int, mode: int) -> bytes:
    return b"%d:%d:0%o" % (uid, gid, stat.S_IMODE(mode))


def _get(fd: int, name: bytes) -> bytes | None:
    try:
        return bxattrs.fgetxattr(fd, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise


class Ownership:
    """The ownership policy of one mount (see the module docstring)."""

    def __init__(self, *, uids: IdMap | None = None, gids: IdMap | None = None,
                 squash_uid: int | None = None, squash_gid: int | None = None,
                 write_name: bytes | None = None,
                 read_names: dict[int, tuple[bytes, ...]] | None = None) -> None:
        self.uids = uids
        self.gids = gids
        self.squash_uid = squash_uid
        self.squash_gid = squash_gid
        self.squashes = squash_uid is not None or squash_gid is not None
        self.write_name = write_name  # the upper's override xattr (xattr_permissions)
        self.read_names = read_names or {}  # Layer.index -> override names honoured there
        self.private_names = frozenset(n for names in self.read_names.values() for n in names)

    @classmethod
    def build(cls, params: OvlParams, layers: LayerStack) -> Ownership | None:
        """The policy for ``params`` over ``layers``; None when there is nothing to do.
        Probes the lower roots for override xattrs and, with ``xattr_permissions``, gives
        the upper root one if it has none (so the layer describes itself when it becomes
        a lower). Blocking."""
        read_names: dict[int, tuple[bytes, ...]] = {}
        for layer in layers.lowers:
            for name in OVERRIDE_NAMES:
                if _get(layer.fd, name) is not None:
                    read_names[layer.index] = (name,)
                    break
        write_name = None
        if params.xattr_permissions and layers.upper is not None:
            if params.xattr_permissions == 1:
                write_name = OVERRIDE_PRIVILEGED
                read_names[UPPER] = (write_name,)
            else:
                write_name = OVERRIDE_CONTAINERS
                read_names[UPPER] = (write_name, OVERRIDE_FUSEOVERLAYFS)
            root = layers.upper.fd
            if all(_get(root, n) is None for n in read_names[UPPER]):
                st = os.fstat(root)
                bxattrs.fsetxattr(root, write_name, format_override(st.st_uid, st.st_gid,
                                                                     st.st_mode))
        squash_uid = params.squash_to_uid
        squash_gid = params.squash_to_gid
        if params.squash_to_root:
            squash_uid = 0 if squash_uid is None else squash_uid
            squash_gid = 0 if squash_gid is None else squash_gid
        uids = IdMap(params.uid_mapping, overflow_id("uid")) if params.uid_mapping else None
        gids = IdMap(params.gid_mapping, overflow_id("gid")) if params.gid_mapping else None
        if (uids is None and gids is None and squash_uid is None and squash_gid is None
                and not read_names):
            return None
        return cls(uids=uids, gids=gids, squash_uid=squash_uid, squash_gid=squash_gid,
                   write_name=write_name, read_names=read_names)

    # --- out: what the mount reports ---------------------------------------------------

    def override(self, fd: int, layer_index: int) -> Override | None:
        """The override record of the object ``fd`` on layer ``layer_index``, if that layer
        keeps them and the object has one. Blocking (one getxattr)."""
        names = self.read_names.get(layer_index)
        if not names:
            return None
        for name in names:
            value = _get(fd, name)
            if value is not None:
                ov = parse_override(value)
                if ov is None:
                    log.warning("ignoring a garbled %s: %r", name.decode(), value)
                return ov
        return None

    def attr_out(self, attr: Attr, fd: int, layer_index: int) -> Attr:
        """``attr`` (the backing object's, behind O_PATH ``fd`` on layer ``layer_index``)
        as the mount reports it."""
        uid, gid, mode = attr.st_uid, attr.st_gid, attr.st_mode
        ov = self.override(fd, layer_index)
        if ov is not None:
            uid, gid, mode = ov.uid, ov.gid, stat.S_IFMT(mode) | ov.perm
        if self.uids is not None:
            uid = self.uids.to_host(uid)
        if self.gids is not None:
            gid = self.gids.to_host(gid)
        if self.squash_uid is not None:
            uid = self.squash_uid
        if self.squash_gid is not None:
            gid = self.squash_gid
        return attr._replace(st_uid=uid, st_gid=gid, st_mode=mode)

    def layer_owner(self, fd: int, layer_index: int, st: os.stat_result) -> Override:
        """The owner and permission bits the layer records for the object ``fd`` (stat
        ``st``): its override record, else its inode's; ids not mapped. What copy-up
        carries over."""
        ov = self.override(fd, layer_index)
        return ov if ov is not None else Override(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))

    def layer_stat(self, fd: int, layer_index: int, st: os.stat_result) -> os.stat_result:
        """``st`` with ``layer_owner``'s owner and mode: what a new child inherits from
        (setgid directory). Only the first ten (integer) stat fields are kept."""
        ov = self.override(fd, layer_index)
        if ov is None:
            return st
        fields = list(st[:10])
        fields[0] = stat.S_IFMT(st.st_mode) | ov.perm
        fields[4], fields[5] = ov.uid, ov.gid
        return os.stat_result(fields)

    # --- in: what callers ask for ------------------------------------------------------

    def uid_in(self, uid: int) -> int:
        return uid if self.uids is None else self.uids.to_layer(uid)

    def gid_in(self, gid: int) -> int:
        return gid if self.gids is None else self.gids.to_layer(gid)

    def groups_in(self, groups: Iterable[int]) -> frozenset[int]:
        return frozenset(self.gid_in(g) for g in groups)

    @property
    def keeps_owner_in_xattr(self) -> bool:
        return self.write_name is not None

    def set_owner(self, fd: int, uid: int, gid: int, mode: int | None,
                  current: os.stat_result) -> None:
        """Give the upper object ``fd`` (O_PATH) layer-space owner ``uid``/``gid`` and, if
        given, permission bits ``mode``: in the override xattr with xattr_permissions
        (falling back to the inode where the xattr is refused: ``user.*`` on a symlink or
        device), else on the inode. ``current`` is its stat before. Errors of chown are
        ignored when squashing. Blocking."""
        if self.write_name is not None:
            keep = mode if mode is not None else self._current_perm(fd, current)
            try:
                bxattrs.fsetxattr(fd, self.write_name, format_override(uid, gid, keep))
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        path = f"/proc/self/fd/{fd}"
        try:
            os.chown(path, uid, gid)
        except OSError:
            if not self.squashes and self.write_name is None:
                raise
        if mode is not None and not stat.S_ISLNK(current.st_mode):
            os.chmod(path, stat.S_IMODE(mode))

    def _current_perm(self, fd: int, st: os.stat_result) -> int:
        ov = self.override(fd, UPPER)
        return ov.perm if ov is not None else stat.S_IMODE(st.st_mode)

    def setattr_in(self, fd: int, changes: SetattrRequest,
                   current: os.stat_result) -> SetattrRequest:
        """Apply the owner/mode part of ``changes`` to the upper object ``fd`` the way this
        mount keeps them, and return the rest for the inode (size, times, and owner/mode
        when they stay on the inode). Blocking."""
        uid, gid, mode = changes.uid, changes.gid, changes.mode
        if uid is None and gid is None and (mode is None or self.write_name is None):
            return changes
        if uid is not None:
            uid = self.uid_in(uid)
        if gid is not None:
            gid = self.gid_in(gid)
        if self.write_name is None and not self.squashes:
            return _replace_ids(changes, uid, gid)
        ov = self.override(fd, UPPER) if self.write_name is not None else None
        cur_uid = ov.uid if ov is not None else current.st_uid
        cur_gid = ov.gid if ov is not None else current.st_gid
        self.set_owner(fd, cur_uid if uid is None else uid, cur_gid if gid is None else gid,
                       mode if self.write_name is not None else None, current)
        rest = _replace_ids(changes, None, None)
        if self.write_name is not None:
            rest = dataclasses.replace(rest, mode=None)
        return rest

    # --- xattrs ------------------------------------------------------------------------

    def is_private(self, name: bytes) -> bool:
        """An override name this mount keeps for itself (hidden from clients)."""
        return name in self.private_names

    def acl_out(self, name: bytes, value: bytes) -> bytes:
        if name in ACL_NAMES:
            return self._shift_acl(value, out=True)
        return value

    def acl_in(self, name: bytes, value: bytes) -> bytes:
        if name in ACL_NAMES:
            return self._shift_acl(value, out=False)
        return value

    def _shift_acl(self, value: bytes, *, out: bool) -> bytes:
        """The ids of ACL_USER and ACL_GROUP entries of a POSIX ACL xattr, shifted."""
        if (self.uids is None and self.gids is None) or len(value) < 4 \
                or (len(value) - 4) % _ACL_ENTRY.size \
                or struct.unpack_from("<I", value)[0] != _ACL_VERSION:
            return value
        buf = bytearray(value)
        for off in range(4, len(buf), _ACL_ENTRY.size):
            tag, perm, ident = _ACL_ENTRY.unpack_from(buf, off)
            if tag == _ACL_USER and self.uids is not None:
                ident = self.uids.to_host(ident) if out else self.uids.to_layer(ident)
            elif tag == _ACL_GROUP and self.gids is not None:
                ident = self.gids.to_host(ident) if out else self.gids.to_layer(ident)
            else:
                continue
            _ACL_ENTRY.pack_into(buf, off, tag, perm, ident)
        return bytes(buf)


def _replace_ids(changes: SetattrRequest, uid: int | None, gid: int | None) -> SetattrRequest:
    return dataclasses.replace(changes, uid=uid, gid=gid)

