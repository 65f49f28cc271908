"""Overlay mount parameters: the option table (fuse-overlayfs and kernel names), then verify.

Shaped like the kernel's ``params.c``: one table says, per option name, how its value is
parsed and where it lands in ``OvlParams``; ``verify`` then checks combinations. Values are
raw ``-o`` tokens from ``backingfs.options.split_options``: backslash pairs other than
``\\,`` are still there, so ``lowerdir`` splits on unescaped colons and the single paths
unescape themselves.

Unknown options are not errors (fuse-overlayfs prints ``unknown argument ignored: OPT`` and
goes on, and mount helpers and podman rely on that): ``parse_params`` reports them through
``warn``, and so it does fuse-overlayfs's tuning knobs we do not implement (``plugins=``,
``threaded=``, ``fast_ino=``). Options we know but cannot honour (redirect_dir=on, ...) are
refused. Ownership options (``uidmapping=``, ``squash_to_*``, ``xattr_permissions=``) are
parsed here and applied by idmap.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from backingfs.options import UsageError, split_colon_list, unescape

from .idmap import IdRange, parse_mapping

#: The kernel's OVL_MAX_STACK.
MAX_LOWERS = 500


@dataclass
class OvlParams:
    lowerdirs: list[str] = field(default_factory=list)  # top lower first, absolute
    upperdir: str | None = None
    workdir: str | None = None
    userxattr: bool = False  # overlay xattrs in user.overlay.* instead of trusted.overlay.*
    volatile: bool = False
    fsync: bool = True
    timeout: float = 1e9  # entry and attribute cache timeout, seconds (fuse-overlayfs: 1e9)
    writeback: bool = False
    noacl: bool = False
    static_nlink: bool = False
    #: Serve lower files of a writable mount by kernel passthrough (file.py): a file
    #: opened read-only before a copy-up keeps reading the lower file, as fuse-overlayfs.
    lower_passthrough: bool = False
    debug: bool = False
    # Ownership (idmap.py).
    uid_mapping: tuple[IdRange, ...] = ()
    gid_mapping: tuple[IdRange, ...] = ()
    squash_to_root: bool = False
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    xattr_permissions: int = 0  # 0: owner/mode on the inode; 1, 2: in an xattr

    @property
    def xattr_prefix(self) -> bytes:
        """``trusted.overlay.`` or ``user.overlay.``: the namespace of overlay-private xattrs."""
        return b"user.overlay." if self.userxattr else b"trusted.overlay."

    @property
    def is_read_only(self) -> bool:
        return self.upperdir is None


def _path(value: str) -> str:
    # Relative paths are relative to the caller's cwd (podman runs us in the storage home).
    return os.path.abspath(unescape(value))


def _bool01(key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise UsageError(f"invalid value for {key}: {value!r} (expected 0 or 1)")
    return value == "1"


def _set_lowerdir(p: OvlParams, key: str, value: str | None) -> None:
    if not value:
        raise UsageError("lowerdir needs a value")
    parts = split_colon_list(value)
    for part in parts:
        if part.startswith("//"):
            raise UsageError(f"lowerdir plugins are not supported: {part!r}")
    p.lowerdirs = [os.path.abspath(part) for part in parts]


def _set_path(attr: str) -> Callable[[OvlParams, str, str | None], None]:
    def setter(p: OvlParams, key: str, value: str | None) -> None:
        if not value:
            raise UsageError(f"{key} needs a value")
        setattr(p, attr, _path(value))
    return setter


def _set_flag(attr: str) -> Callable[[OvlParams, str, str | None], None]:
    def setter(p: OvlParams, key: str, value: str | None) -> None:
        if value is not None:
            raise UsageError(f"{key} takes no value")
        setattr(p, attr, True)
    return setter


def _set_bool(attr: str) -> Callable[[OvlParams, str, str | None], None]:
    def setter(p: OvlParams, key: str, value: str | None) -> None:
        setattr(p, attr, _bool01(key, value or ""))
    return setter


def _set_timeout(p: OvlParams, key: str, value: str | None) -> None:
    try:
        t = float(value or "")
    except ValueError:
        raise UsageError(f"invalid value for timeout: {value!r}") from None
    if not t >= 0:
        raise UsageError(f"invalid value for timeout: {value!r}")
    p.timeout = t


def _only(allowed: str) -> Callable[[OvlParams, str, str | None], None]:
    """An option we implement only in one setting (the kernel's own default for us)."""
    def setter(p: OvlParams, key: str, value: str | None) -> None:
        if value != allowed:
            raise UsageError(f"unsupported {key}={value} (only {key}={allowed})")
    return setter


def _accept(p: OvlParams, key: str, value: str | None) -> None:
    """Accepted and dropped: options with no meaning here."""


def _set_mapping(attr: str) -> Callable[[OvlParams, str, str | None], None]:
    def setter(p: OvlParams, key: str, value: str | None) -> None:
        try:
            setattr(p, attr, parse_mapping(value or ""))
        except ValueError as e:
            raise UsageError(f"{key}: {e}") from None
    return setter


def _set_id(attr: str) -> Callable[[OvlParams, str, str | None], None]:
    def setter(p: OvlParams, key: str, value: str | None) -> None:
        try:
            n = int(value or "", 10)
        except ValueError:
            raise UsageError(f"invalid value for {key}: {value!r}") from None
        if not 0 <= n <= 0xFFFFFFFE:
            raise UsageError(f"invalid value for {key}: {value!r}")
        setattr(p, attr, n)
    return setter


def _set_xattr_permissions(p: OvlParams, key: str, value: str | None) -> None:
    if value not in ("0", "1", "2"):
        raise UsageError(f"invalid value for xattr_permissions: {value!r} (0, 1 or 2)")
    p.xattr_permissions = int(value)


def _set_debug(p: OvlParams, key: str, value: str | None) -> None:
    p.debug = True


_TABLE: dict[str, Callable[[OvlParams, str, str | None], None]] = {
    "lowerdir": _set_lowerdir,
    "upperdir": _set_path("upperdir"),
    "workdir": _set_path("workdir"),
    "userxattr": _set_flag("userxattr"),
    "volatile": _set_flag("volatile"),
    "fsync": _set_bool("fsync"),
    "timeout": _set_timeout,
    "writeback": _set_bool("writeback"),
    "noacl": _set_flag("noacl"),
    "static_nlink": _set_flag("static_nlink"),
    "lower_passthrough": _set_flag("lower_passthrough"),
    "redirect_dir": _only("off"),
    "index": _only("off"),
    "metacopy": _only("off"),
    "debug": _set_debug,
    "xino": _accept,  # st_ino is always persistent and unique (inode.py)
    "uidmapping": _set_mapping("uid_mapping"),
    "gidmapping": _set_mapping("gid_mapping"),
    "squash_to_root": _set_flag("squash_to_root"),
    "squash_to_uid": _set_id("squash_to_uid"),
    "squash_to_gid": _set_id("squash_to_gid"),
    "xattr_permissions": _set_xattr_permissions,
}

#: fuse-overlayfs options we do not implement and that are safe to ignore (tuning, the C
#: version's lower-layer plugins): a warning, and the mount goes on.
UNSUPPORTED = frozenset({"plugins", "threaded", "fast_ino", "fast_ino_check"})


def parse_params(options: Iterable[tuple[str, str | None]],
                 warn: Callable[[str], None]) -> OvlParams:
    """Build OvlParams from ``(key, value)`` filesystem options (``split_fuse_options``'
    second result), then ``verify`` them. ``warn(token)`` is called for each ignored option
    (unknown, or in ``UNSUPPORTED``)."""
    p = OvlParams()
    for key, value in options:
        setter = _TABLE.get(key)
        if setter is None:
            warn(key if value is None else f"{key}={value}")
            continue
        setter(p, key, value)
    verify(p)
    return p


def verify(p: OvlParams) -> None:
    """Combination checks that need no filesystem access (superblock.py does the rest)."""
    if not p.lowerdirs:
        raise UsageError("no lowerdir specified")
    if len(p.lowerdirs) > MAX_LOWERS:
        raise UsageError(f"too many lower directories ({len(p.lowerdirs)}), "
                         f"the limit is {MAX_LOWERS}")
    if p.upperdir is not None and p.workdir is None:
        raise UsageError("workdir not specified (needed with upperdir)")
    if p.upperdir is None and p.workdir is not None:
        p.workdir = None  # the kernel ignores workdir on a read-only overlay
