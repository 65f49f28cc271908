"""Data copy for copy-up: reflink, then extent-wise copy_file_range, then pread/pwrite.

The contract of :func:`copy_data`: afterwards ``dst`` holds the first ``size`` bytes of
``src`` and is exactly ``size`` bytes long, and every hole of the source stays a hole (no
byte of a hole is ever read or written, so a sparse 5 GiB image costs only its data blocks).
The cheapest method that works is used, in this order:

1. ``FICLONE``: one ioctl shares every extent (btrfs, xfs with reflink, bcachefs). Only for a
   whole-file copy, since the ioctl cannot clone a prefix.
2. ``copy_file_range`` over each data extent found with ``SEEK_DATA``/``SEEK_HOLE``: the
   kernel copies (or reflinks, or server-side copies) without the data entering userspace.
3. ``sendfile`` over the same extents when the kernel refuses copy_file_range (EXDEV
   between filesystems of different types or superblocks, e.g. a lower layer on the root
   ext4 and the upper on another; EOPNOTSUPP, ENOSYS, EINVAL): the kernel's splice, as
   overlayfs itself copies there (``do_splice_direct``), no byte through userspace.
   Measured 2026-12-04, 256 MiB from the root ext4 to a loop-mounted ext4: 77 ms against
   about 250 ms for step 4.
4. ``pread``/``pwrite`` in 1 MiB chunks, when sendfile is refused too.
   A switch can happen mid-file: what was already copied is kept.

Blocking: call from a worker thread. ``dst`` should be a fresh, empty regular file opened for
writing (FICLONE replaces its content, and holes are only kept if nothing was there).
Side effect: moves the file offset of ``src`` (SEEK_DATA/SEEK_HOLE are lseeks); copy-up opens
its own source fd, so nobody else sees it. Errors other than the fallback ones propagate as
OSError; ``dst`` is then partly written and the caller discards it (copy-up builds in work/).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass

from .syscalls import start_writeback

#: _IOW(0x94, 9, int): share all extents of the source fd with the destination fd.
FICLONE = 0x40049409

#: Chunk for both copy_file_range calls and the pread/pwrite fallback.
CHUNK = 1 << 20

#: Errnos meaning "this method is not available here", not "the copy failed".
FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

#: FICLONE additionally answers ENOTTY on filesystems without the ioctl, and EBADF/EPERM
#: for some file kinds; none of those mean the plain copy would fail.
_CLONE_FALLBACK_ERRNOS = FALLBACK_ERRNOS | {errno.ENOTTY, errno.EBADF, errno.EPERM}

METHOD_CLONE = "clone"
METHOD_COPY_FILE_RANGE = "copy_file_range"
METHOD_SENDFILE = "sendfile"
METHOD_READ_WRITE = "read_write"


@dataclass
class CopyStats:
    """What :func:`copy_data` did.

    ``method`` is the last method used: ``"clone"``, ``"copy_file_range"``, ``"sendfile"``
    or ``"read_write"`` (also when an earlier one was abandoned part-way). ``bytes_copied``
    counts data bytes moved (holes excluded; for a clone, the whole size). ``extents`` counts
    the data extents visited.
    """

    method: str = METHOD_COPY_FILE_RANGE
    bytes_copied: int = 0
    extents: int = 0


#: The most one ``copy_range`` copies: the FUSE reply counts bytes in 32 bits, and
#: copy_file_range(2) may always copy less than asked (callers loop).
MAX_COPY_RANGE = 1 << 30


def copy_range(src_fd: int, dst_fd: int, off_in: int, off_out: int, length: int) -> int:
    """copy_file_range(2) of a caller's between two backing files: the backing filesystem
    copies in the kernel (or reflinks: xfs, btrfs), as the kernel's overlayfs has the real
    files do. Bytes copied; 0 at the source's EOF. Blocking: call from a worker thread.

    EXDEV and EOPNOTSUPP (files on two filesystems, a filesystem that cannot) go back to
    the FUSE kernel, which then copies through the mount itself (splice); ENOSYS becomes
    EOPNOTSUPP, so that one refusal does not turn the request off for the whole mount."""
    try:
        return os.copy_file_range(src_fd, dst_fd, min(length, MAX_COPY_RANGE), off_in, off_out)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise OSError(errno.EOPNOTSUPP, "copy_file_range: not supported here") from e
        raise


def copy_data(src_fd: int, dst_fd: int, size: int | None = None, *,
              writeback: bool = False) -> CopyStats:
    """Copy the first ``size`` bytes (default: all) of ``src_fd`` to ``dst_fd``, keeping holes.

    ``writeback``: the caller will fsync ``dst_fd``; start the disk writes of each chunk as
    soon as it is copied, so that they overlap the rest of the copy instead of all waiting
    for the fsync. See the module docstring for the method order and the contract on
    ``dst_fd``.
    """
    src_st = os.fstat(src_fd)
    src_size = src_st.st_size
    if size is None:
        size = src_size
    if size < 0:
        raise ValueError(f"negative size {size}")
    stats = CopyStats()
    if size == 0:
        os.ftruncate(dst_fd, 0)
        return stats
    if size == src_size and _try_clone(src_fd, dst_fd):
        stats.method = METHOD_CLONE
        stats.bytes_copied = size
        stats.extents = 1
        return stats
    # Blocks for every byte: no hole to find (most files), so no SEEK_DATA/SEEK_HOLE. (Only
    # a file with blocks allocated past its end, fallocate KEEP_SIZE, and a hole inside
    # could pass for dense: its hole is then copied as zeros, the content the same.)
    dense = src_st.st_blocks * 512 >= src_size
    extents = [(0, size)] if dense else data_extents(src_fd, size)
    use_copy_file_range = use_sendfile = True
    pos = 0
    for start, end in extents:
        stats.extents += 1
        pos = start
        if use_copy_file_range:
            pos, use_copy_file_range = _copy_range_kernel(src_fd, dst_fd, pos, end,
                                                          writeback)
        if not use_copy_file_range and use_sendfile:
            stats.method = METHOD_SENDFILE
            pos, use_sendfile = _copy_range_sendfile(src_fd, dst_fd, pos, end, writeback)
        if not use_copy_file_range and not use_sendfile:
            stats.method = METHOD_READ_WRITE
            pos = _copy_range_rw(src_fd, dst_fd, pos, end, writeback)
        stats.bytes_copied += pos - start
    if pos != size:
        # A trailing hole has no data extent to write (or the source shrank under us):
        # only the size records it. A fresh dst written up to ``size`` has that size.
        os.ftruncate(dst_fd, size)
    return stats


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` data ranges of ``fd`` below ``size``, found by SEEK_DATA/HOLE.

    A filesystem without hole reporting (EINVAL) yields one extent covering everything,
    which is what SEEK_DATA's generic implementation reports anyway.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                break
            if e.errno == errno.EINVAL and pos == 0:
                return [(0, size)]
            raise
        if start >= size:
            break
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:  # the file shrank under us; copy what is there
                raise
            end = size
        end = min(end, size)
        extents.append((start, end))
        pos = end
    return extents


def _try_clone(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in _CLONE_FALLBACK_ERRNOS:
            return False
        raise
    return True


def _copy_range_kernel(src_fd: int, dst_fd: int, pos: int, end: int,
                       writeback: bool) -> tuple[int, bool]:
    """copy_file_range over ``[pos, end)``; returns (position reached, still usable)."""
    return _copy_in_kernel(lambda p, n: os.copy_file_range(src_fd, dst_fd, n, p, p),
                           dst_fd, pos, end, writeback)


def _copy_range_sendfile(src_fd: int, dst_fd: int, pos: int, end: int,
                         writeback: bool) -> tuple[int, bool]:
    """sendfile over ``[pos, end)``; returns (position reached, still usable). sendfile
    writes at ``dst_fd``'s file offset (the source's is left alone), so it is set first."""
    try:
        os.lseek(dst_fd, pos, os.SEEK_SET)
    except OSError as e:
        if e.errno in FALLBACK_ERRNOS | {errno.ESPIPE}:
            return pos, False
        raise
    return _copy_in_kernel(lambda p, n: os.sendfile(dst_fd, src_fd, p, n),
                           dst_fd, pos, end, writeback)


def _copy_in_kernel(copy: Callable[[int, int], int], dst_fd: int, pos: int, end: int,
                    writeback: bool) -> tuple[int, bool]:
    """``copy(pos, n)`` chunk by chunk over ``[pos, end)``: (position reached, whether
    the method still works; False on a FALLBACK_ERRNOS refusal)."""
    while pos < end:
        try:
            n = copy(pos, min(CHUNK, end - pos))
        except OSError as e:
            if e.errno in FALLBACK_ERRNOS:
                return pos, False
            raise
        if n == 0:  # source truncated under us: nothing more to copy
            return pos, True
        if writeback:
            _start_writeback(dst_fd, pos, n)
        pos += n
    return pos, True


def _copy_range_rw(src_fd: int, dst_fd: int, pos: int, end: int, writeback: bool) -> int:
    """pread/pwrite over ``[pos, end)``; returns the position reached."""
    while pos < end:
        chunk = os.pread(src_fd, min(CHUNK, end - pos), pos)
        if not chunk:  # source truncated under us
            return pos
        view = memoryview(chunk)
        start = pos
        while view:
            n = os.pwrite(dst_fd, view, pos)
            view = view[n:]
            pos += n
        if writeback:
            _start_writeback(dst_fd, start, pos - start)
    return pos


def _start_writeback(fd: int, offset: int, length: int) -> None:
    try:
        start_writeback(fd, offset, length)
    except OSError:
        pass  # only a head start: the caller's fsync writes and reports everything
