"""DirSnapshot: the stable-offset listing of one open directory, and exact readdirplus filling.

An open directory lists a snapshot taken once (at opendir or first readdir), so offsets mean
the same thing for the life of the handle: seekdir/telldir and a readdir resumed after a
full buffer neither skip nor repeat entries while the directory changes underneath.
Offsets are 1-based positions in the snapshot: offset 0 is the start, and the entry at
index ``i`` (0-based) carries ``next_off == i + 1``, the offset to resume *after* it.

The snapshot never holds ``.`` or ``..`` (the constructor refuses them): the kernel takes
no lookup reference for them in READDIRPLUS (libfuse a83041fa), so they cannot go through
``fill``, whose entries each carry one. A filesystem that lists them does so on its own.

``fill`` hands entries to the kernel's reply one by one, each carrying the one lookup
reference ``make_entry`` took (fsapi contract). It stops at the first entry the kernel
rejected and does *not* give that entry's reference back: the bridge does that.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, NamedTuple, TypeVar

from . import fdpressure
from .fsapi import DirEntry, Entry, ReaddirReply

P = TypeVar("P")

DOTS = (b".", b"..")

#: "." and ".." take the listing offsets 1 and 2, ahead of a DirSnapshot whose own offsets
#: are shifted by DOT_ENTRIES. The kernel takes no lookup reference for them, but a
#: filesystem hands them to ``reply`` with one like any entry and the bridge gives it back.
DOT_ENTRIES = 2


def reply_dots(off: int, dot_entry: Callable[[bytes], Entry | DirEntry],
               reply: Callable[[DirEntry], bool], shift: int = 0) -> int | None:
    """Reply the dot entries not yet delivered at listing offset ``off``.

    ``dot_entry(name)`` builds the Entry of ``b"."`` or ``b".."`` and takes its lookup
    reference (the fsapi rule), or returns a bare DirEntry (no reference). Their
    ``next_off`` is 1 and 2, plus ``shift`` (a generation a filesystem keeps in the high
    bits of its offsets). Returns the snapshot offset to go on from, or None when the
    kernel's buffer is full (the bridge then gives back the rejected entry's reference)."""
    for i, name in enumerate(DOTS):
        if i < off:
            continue
        made = dot_entry(name)
        d = (made._replace(next_off=i + 1 + shift) if isinstance(made, DirEntry)
             else DirEntry(name, made, i + 1 + shift))
        if not reply(d):
            return None
    return max(off - DOT_ENTRIES, 0)


class DirItem(NamedTuple, Generic[P]):
    name: bytes
    payload: P  # whatever the producer needs to build the entry (d_ino, d_type, layer...)
    next_off: int  # the offset that resumes after this item


class DirSnapshot(Generic[P]):
    """An immutable, ordered listing of ``(name, payload)`` items with stable offsets.

    ``ValueError`` if an item is named ``.`` or ``..`` or a name is not bytes. Duplicate
    names are kept as given (merging layers is the producer's job).
    """

    def __init__(self, items: Iterable[tuple[bytes, P]]) -> None:
        self._items: tuple[tuple[bytes, P], ...] = tuple(items)
        for name, _ in self._items:
            if not isinstance(name, bytes):
                raise ValueError(f"directory entry names are bytes, not {name!r}")
            if name in DOTS:
                raise ValueError(f"{name!r} does not belong in a DirSnapshot")

    def entries_from(self, off: int) -> Iterator[DirItem[P]]:
        """The items after offset ``off`` (0: from the start; past the end: none).
        ``ValueError`` for a negative offset."""
        if off < 0:
            raise ValueError(f"negative directory offset {off}")
        for index in range(off, len(self._items)):
            name, payload = self._items[index]
            yield DirItem(name, payload, index + 1)

    @property
    def items(self) -> tuple[tuple[bytes, P], ...]:
        """``(name, payload)`` in order; item ``i`` has offset ``i + 1`` (resumes after it)."""
        return self._items

    def names(self) -> list[bytes]:
        return [name for name, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)


MakeEntry = Callable[[bytes, P], Entry | DirEntry | Awaitable[Entry | DirEntry]]


async def fill(snapshot: DirSnapshot[P], off: int, make_entry: MakeEntry[P],
               reply: ReaddirReply, relieve: Callable[[], bool] | None = None,
               shift: int = 0) -> int:
    """Reply with the snapshot's entries from ``off`` until ``reply`` returns False.

    For each item, ``make_entry(name, payload)`` (plain or async) builds its ``Entry`` (or
    a ``DirEntry``, e.g. a bare one) and takes one lookup reference on its inode; ``fill``
    makes the ``DirEntry`` with the item's ``next_off`` plus ``shift`` (whatever a given
    DirEntry had there is replaced) and passes it to ``reply``. The entry ``reply``
    rejects keeps its reference: the caller (the bridge) gives it back.

    An item whose ``make_entry`` raises ENOENT vanished since the snapshot and is skipped.
    Any other ``OSError`` is raised if nothing was replied yet; after partial output ``fill``
    stops and returns instead, since an error reply would lose the references already
    delivered (libfuse passthrough_hp's readdir rule). Out of fds (EMFILE/ENFILE) on the
    first item, ``relieve`` (see fdpressure) may free some and the item is tried again.

    Returns the number of entries ``reply`` accepted.
    """
    accepted = 0
    # Runs once per entry of every listing: no per-item tuple, one DirEntry built.
    items = snapshot.items
    for index in range(max(off, 0), len(items)):
        name, payload = items[index]
        try:
            made = make_entry(name, payload)
            if made.__class__ is not Entry and made.__class__ is not DirEntry:
                made = await made  # type: ignore[misc]
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            if accepted:
                return accepted
            if relieve is None or exc.errno not in fdpressure.NO_FDS:
                raise
            try:
                made = await fdpressure.retry(
                    relieve, functools.partial(make_entry, name, payload), exc)
            except OSError as again:
                if again.errno == errno.ENOENT:
                    continue
                raise
        next_off = index + 1 + shift
        if made.__class__ is Entry:
            entry = DirEntry(name, made, next_off)  # type: ignore[arg-type]
        else:
            entry = made._replace(next_off=next_off)  # type: ignore[union-attr]
        if not reply(entry):
            break
        accepted += 1
    return accepted


def _d_type(entry: os.DirEntry[str]) -> int:
    """The entry's DT_* value: from d_type when the fs gives it, else from an lstat."""
    try:
        if entry.is_symlink():
            return stat.S_IFLNK >> 12
        if entry.is_dir(follow_symlinks=False):
            return stat.S_IFDIR >> 12
        if entry.is_file(follow_symlinks=False):
            return stat.S_IFREG >> 12
        # fifo, socket, device (an overlay whiteout is char 0/0): only a stat tells which.
        return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
    except OSError:
        return 0  # DT_UNKNOWN: the entry vanished meanwhile


def scandir_names(fd: int) -> list[tuple[bytes, int, int]]:
    """List the directory ``fd`` as ``(name, d_ino, d_type)``, without ``.`` and ``..``.

    ``fd`` may be an O_PATH fd. It is neither closed nor moved: the listing reads through
    a fresh open of the same directory (``openat(fd, ".")``), which has its own offset, so
    concurrent listings of one fd do not disturb each other. Blocking: run it in a worker.
    """
    dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        with os.scandir(dir_fd) as it:
            return [(os.fsencode(entry.name), entry.inode(), _d_type(entry)) for entry in it]
    finally:
        os.close(dir_fd)
