"""Layer and LayerStack: the overlay's backing directories, as O_PATH fds, and st_ino mapping.

A ``Layer`` is one root directory: the upper (index 0, writable) or a lower (index 1 is the
top lower). Roots are opened once, at mount, as O_PATH directory fds; a lowerdir given as a
symlink (containers-storage passes ``l/SHORTID`` links) is resolved then, so a later change
of the link does not move the layer.

Inode numbers (the kernel's xino, reference §B.11): layers are grouped by filesystem
(``st_dev``); fsid 0 is the upper's filesystem (the top lower's without upper). When every
layer shares one filesystem the reported st_ino is the backing st_ino itself; otherwise
``real_ino | fsid << XINO_SHIFT``, which keeps numbers unique across filesystems and
persistent. A backing ino using the high bits cannot be mapped: ``st_ino`` returns None and
the inode table hands out a non-persistent number instead.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from backingfs.syscalls import O_PATH_NOFOLLOW

#: Bit position of the filesystem id in a mapped st_ino: below the inode table's reserved
#: range (1 << 62), above any ext4/xfs/btrfs inode number seen in practice.
XINO_SHIFT = 56
_MAX_FSID = (1 << (62 - XINO_SHIFT)) - 1


@dataclass(eq=False)
class Layer:
    index: int  # 0: upper; 1..N: lowers, top first
    path: str  # as resolved at mount
    fd: int  # O_PATH directory fd of the layer root
    st_dev: int
    fsid: int = 0

    @property
    def is_upper(self) -> bool:
        return self.index == 0

    def __repr__(self) -> str:
        return f"<Layer {self.index} {self.path!r}>"


def open_layer(index: int, path: str) -> Layer:
    """Open ``path`` (symlinks resolved once, here) as a layer root. OSError as raised;
    NotADirectoryError if it is not a directory."""
    real = os.path.realpath(path)
    fd = os.open(real, O_PATH_NOFOLLOW | os.O_DIRECTORY)
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):  # O_DIRECTORY already says so; kept for clarity
        os.close(fd)
        raise NotADirectoryError(real)
    return Layer(index, real, fd, st.st_dev)


class LayerStack:
    """The upper (optional) and lower layers of one mount, with the xino mapping."""

    def __init__(self, upper: Layer | None, lowers: list[Layer]) -> None:
        self.upper = upper
        self.lowers = lowers
        devs: list[int] = []
        for layer in self.all():
            if layer.st_dev not in devs:
                devs.append(layer.st_dev)
        for layer in self.all():
            layer.fsid = devs.index(layer.st_dev)
        self.is_single_fs = len(devs) == 1
        if len(devs) - 1 > _MAX_FSID:
            raise ValueError(f"too many distinct filesystems among the layers ({len(devs)})")

    def all(self) -> list[Layer]:
        return ([self.upper] if self.upper else []) + self.lowers

    def by_index(self, index: int) -> Layer:
        if index == 0:
            if self.upper is None:
                raise KeyError(index)
            return self.upper
        return self.lowers[index - 1]

    def st_ino(self, layer: Layer, real_ino: int) -> int | None:
        """The persistent overlay st_ino of backing inode ``real_ino`` on ``layer``."""
        if self.is_single_fs or layer.fsid == 0:
            return real_ino if real_ino >> XINO_SHIFT == 0 or self.is_single_fs else None
        if real_ino >> XINO_SHIFT:
            return None
        return real_ino | (layer.fsid << XINO_SHIFT)

    def close(self) -> None:
        for layer in self.all():
            try:
                os.close(layer.fd)
            except OSError:
                pass
