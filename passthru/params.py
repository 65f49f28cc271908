"""Params: passthru's option table (``cache=``, ``writeback``, ``timeout=``, ``noacl``) and what
it implies.

The CLI splits ``-o`` tokens with ``backingfs.options.split_fuse_options``: libfuse's own
options (allow_other, ro, fsname=, ...) pass through untouched, the rest come here. An
option not in this table is a ``UsageError`` (exit 2): a typo must not mount with defaults.

Cache modes (entry/attr timeouts in seconds, and whether open keeps the page cache):

    never   0       no keep_cache   every access revalidates: SOURCE changes are seen at once
    auto    1       no keep_cache   the kernel drops cached data when mtime/size change
    always  86400   keep_cache      SOURCE is assumed to change only through the mount

``timeout=SEC`` overrides the timeouts of the mode (negative entries included).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from backingfs.options import UsageError

CACHE_MODES = ("never", "auto", "always")

_TIMEOUTS = {"never": 0.0, "auto": 1.0, "always": 86400.0}

#: The FUSE options every passthru mount gets. default_permissions is not optional: the
#: daemon makes every backing syscall as root, so only the kernel can check the caller.
DEFAULT_FUSE_OPTIONS = frozenset({"default_permissions", "subtype=backingfs-passthru"})


@dataclass(frozen=True)
class Params:
    cache: str = "auto"
    writeback: bool = False
    timeout: float | None = None  # overrides the cache mode's timeouts
    #: The kernel enforces SOURCE's POSIX ACLs and new objects inherit default ACLs
    #: (``noacl``: mode bits only, ACL xattrs stored as any other).
    acl: bool = True

    @property
    def entry_timeout(self) -> float:
        return _TIMEOUTS[self.cache] if self.timeout is None else self.timeout

    @property
    def attr_timeout(self) -> float:
        return self.entry_timeout

    @property
    def negative_timeout(self) -> float:
        """How long the kernel may remember that a name does not exist."""
        return self.entry_timeout

    @property
    def keep_cache(self) -> bool:
        return self.cache == "always"


def parse(options: Iterable[tuple[str, str | None]]) -> Params:
    """Build Params from ``(key, value)`` pairs (later ones win). Raises UsageError."""
    cache = "auto"
    writeback = False
    timeout: float | None = None
    acl = True
    for key, value in options:
        if key == "cache":
            if value not in CACHE_MODES:
                raise UsageError(f"cache= must be one of {', '.join(CACHE_MODES)}, "
                                 f"not {value!r}")
            cache = value
        elif key in ("writeback", "nowriteback"):
            if value is not None:
                raise UsageError(f"option {key!r} takes no value")
            writeback = key == "writeback"
        elif key in ("acl", "noacl"):
            if value is not None:
                raise UsageError(f"option {key!r} takes no value")
            acl = key == "acl"
        elif key == "timeout":
            timeout = _seconds(value)
        else:
            shown = key if value is None else f"{key}={value}"
            raise UsageError(f"unknown option {shown!r}")
    return Params(cache=cache, writeback=writeback, timeout=timeout, acl=acl)


def _seconds(value: str | None) -> float:
    try:
        seconds = float(value or "")
    except ValueError:
        raise UsageError(f"timeout= needs a number of seconds, not {value!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise UsageError(f"timeout= must be a finite number >= 0, not {value!r}")
    return seconds
