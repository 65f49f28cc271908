"""Overlay-private xattr names: which are hidden, and the ``overlay.overlay.`` escape.

Overlay keeps its bookkeeping in ``trusted.overlay.*`` (``user.overlay.*`` with userxattr):
``opaque``, ``whiteout``, ``origin``, ``impure``, ``redirect``... and our own
``ORIGIN_NAME``. Those are never listed, read, written or copied up through the overlay
(reference §B.5). Nesting (kernel 6.7+): a client's ``<prefix>X`` is stored on the layer as
``<prefix>overlay.X``, so an overlay whose layers are themselves overlay layers keeps both
levels apart; reading strips one ``overlay.`` again.

Our origin record (documented in overlay/__init__.py): ``<prefix>bfs.origin`` holds the
decimal st_ino the object had before copy-up. It lives under the private prefix, so the
kernel's overlayfs hides it too and never copies it.
"""

from __future__ import annotations

import errno

ESCAPE = b"overlay."


def origin_name(prefix: bytes) -> bytes:
    return prefix + b"bfs.origin"


def is_private(name: bytes, prefix: bytes) -> bool:
    """A backing xattr name that belongs to overlay itself (not an escaped client one)."""
    return name.startswith(prefix) and not name.startswith(prefix + ESCAPE)


def to_client(name: bytes, prefix: bytes) -> bytes | None:
    """The name a client sees for backing xattr ``name``; None if it is hidden."""
    if name.startswith(prefix + ESCAPE):
        return prefix + name[len(prefix) + len(ESCAPE):]
    if name.startswith(prefix):
        return None
    return name


def to_backing(name: bytes, prefix: bytes) -> bytes:
    """The backing name of a client's xattr ``name`` (escaped if in the private space).
    EINVAL for an empty name."""
    if not name:
        raise OSError(errno.EINVAL, "empty xattr name")
    if name.startswith(prefix):
        return prefix + ESCAPE + name[len(prefix):]
    return name


def filter_list(names: list[bytes], prefix: bytes) -> list[bytes]:
    out = []
    for name in names:
        client = to_client(name, prefix)
        if client is not None:
            out.append(client)
    return out


def is_copied_up(name: bytes, prefix: bytes) -> bool:
    """Whether copy-up carries backing xattr ``name`` over: everything but private ones."""
    return not is_private(name, prefix)
