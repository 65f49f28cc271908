"""hellofs: a one-file filesystem and CLI, the smallest thing the runner can mount.

Used by test_runner.py as ``python -m tests.unit.hellofs [-f] [-d] [-o OPTS] MOUNTPOINT``
(run from the repository root). The root directory holds one file, ``hello``.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Sequence

from backingfs.attrs import Attr
from backingfs.fsapi import (
    ROOT_INO,
    Caller,
    DirEntry,
    Entry,
    Filesystem,
    OpenReply,
    ReaddirReply,
)
from backingfs.options import UsageError, parse_argv, split_fuse_options
from backingfs.runner import cli_main, run

HELLO_INO = 2
HELLO_NAME = b"hello"
CONTENT = b"hello, world\n"


class HelloFs(Filesystem):
    def __init__(self) -> None:
        self.reads = 0
        self.lookups = 0

    def _entry(self, ino: int) -> Entry:
        if ino == ROOT_INO:
            return Entry(Attr(st_ino=ROOT_INO, st_mode=stat.S_IFDIR | 0o755, st_nlink=2))
        if ino == HELLO_INO:
            return Entry(Attr(st_ino=HELLO_INO, st_mode=stat.S_IFREG | 0o644,
                              st_size=len(CONTENT)))
        raise OSError(errno.ENOENT, "no such inode")

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Entry:
        if parent != ROOT_INO or name != HELLO_NAME:
            raise OSError(errno.ENOENT, "no such entry")
        self.lookups += 1
        return self._entry(HELLO_INO)

    async def getattr(self, ino: int, caller: Caller) -> Entry:
        return self._entry(ino)

    async def open(self, ino: int, flags: int, caller: Caller) -> OpenReply:
        if ino != HELLO_INO:
            raise OSError(errno.EISDIR, "not a file")
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        return OpenReply(fh=HELLO_INO)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        return CONTENT[off:off + size]

    async def opendir(self, ino: int, caller: Caller) -> int:
        if ino != ROOT_INO:
            raise OSError(errno.ENOTDIR, "not a directory")
        return ROOT_INO

    async def readdir(self, fh: int, off: int, reply: ReaddirReply) -> None:
        if off == 0:
            self.lookups += 1  # the entry's lookup reference (fsapi)
            reply(DirEntry(HELLO_NAME, self._entry(HELLO_INO), 1))

    def statistics(self) -> dict[str, object]:
        return {"reads": self.reads}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_argv(list(sys.argv[1:] if argv is None else argv), positional=1,
                      prog="hellofs")
    if args.help or args.version:
        print("hellofs [-f] [-d] [-o OPTS] MOUNTPOINT")
        return 0
    fuse_options, fs_options = split_fuse_options(args.options)
    if fs_options:
        raise UsageError(f"unknown option {fs_options[0][0]!r}")
    return run(HelloFs(), args.positionals[0], fuse_options, foreground=args.foreground,
               debug=args.debug, fsname="hellofs")


if __name__ == "__main__":
    sys.exit(cli_main("hellofs", main))
