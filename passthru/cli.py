"""The ``backingfs-passthru`` command: argv -> Params -> PassthruFs -> ``runner.run``.

    backingfs-passthru [-f] [-d] [-o OPT[,OPT...]] SOURCE MOUNTPOINT

Exit status: 0 once the mount is live (background) or after a clean unmount (``-f``);
1 when SOURCE or MOUNTPOINT is unusable, /dev/fuse cannot be opened, or the mount fails;
2 for a command-line error (unknown option, wrong argument count). Every error is one
line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence

from backingfs.options import parse_argv, split_fuse_options
from backingfs.runner import QuietError, cli_main, run

from . import params
from .superblock import PassthruFs

PROG = "backingfs-passthru"

USAGE = f"""\
usage: {PROG} [-f] [-d] [-o OPT[,OPT...]] SOURCE MOUNTPOINT

Mirror the directory SOURCE at MOUNTPOINT.

  -f          stay in the foreground
  -d          log every request (implies -f)
  -o OPTS     cache=never|auto|always   kernel caching (default auto)
              writeback | nowriteback   kernel writeback cache (default nowriteback)
              timeout=SEC               entry/attr timeout, overriding the cache mode
              acl | noacl               enforce SOURCE's POSIX ACLs, inherit default
                                        ACLs (default acl; noacl: mode bits only)
              session=native|pyfuse3    front-end (default native)
              passthrough=auto|on|off   kernel passthrough of file data (native)
              uring=auto|on|off         FUSE over io_uring when the kernel offers it
                                        (native; the fuse module's enable_uring)
              and FUSE options: allow_other, ro, fsname=..., ...
"""


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("backingfs")
    except Exception:
        return "unknown"


def open_source(source: str, p: params.Params) -> PassthruFs:
    """Build the filesystem, turning a bad SOURCE into a one-line QuietError."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise QuietError(f"source {source} does not exist") from None
    except OSError as e:
        raise QuietError(f"cannot access source {source}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise QuietError(f"source {source} is not a directory")
    try:
        return PassthruFs(os.path.abspath(source), p)
    except OSError as e:
        raise QuietError(f"cannot open source {source}: {e.strerror}") from None


def _main(argv: Sequence[str]) -> int:
    args = parse_argv(argv, positional=2, prog=PROG, ignore_leading=0)
    if args.help:
        print(USAGE, end="")
        return 0
    if args.version:
        print(f"{PROG} {_version()}")
        return 0
    fuse_options, fs_options = split_fuse_options(args.options)
    p = params.parse(fs_options)
    source, mountpoint = args.positionals
    fs = open_source(source, p)
    fuse_options |= params.DEFAULT_FUSE_OPTIONS
    return run(fs, mountpoint, fuse_options, foreground=args.foreground, debug=args.debug,
               fsname=fs.source)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; ``argv`` without the program name (default sys.argv)."""
    return cli_main(PROG, lambda: _main(list(sys.argv[1:] if argv is None else argv)))
