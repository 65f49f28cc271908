"""backingfs-overlay: the fuse-overlayfs command line -> OvlParams -> Superblock -> runner.

``backingfs-overlay [-f] [-d] [-o OPTS]... [SOURCE] MOUNTPOINT``, argv-compatible with
fuse-overlayfs (reference userspace-anchors §b) so podman/buildah can use it as
``mount_program``: the last bare argument is the mountpoint (mount.fuse3's leading source is
dropped), ``-o`` repeats, unknown options warn on stderr and the mount goes on, ``--version``
prints on stdout, and without ``-f`` the command returns only once the mount is live.

As root the FUSE defaults are fuse-overlayfs's: ``default_permissions,allow_other,suid,
noatime`` (otherwise ``default_permissions,noatime``); the kernel then enforces permissions
against the attributes we report, as overlayfs checks the caller against the overlay inode.
Every user error is one line on stderr and a non-zero exit (runner.cli_main).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from backingfs.options import parse_argv, parse_option, split_fuse_options
from backingfs.runner import cli_main, run

from .params import UNSUPPORTED, parse_params

PROG = "backingfs-overlay"
VERSION = "0.1.0"

HELP = f"""\
usage: {PROG} [-f] [-d] [-o OPTS]... [SOURCE] MOUNTPOINT

Mount a union of directories in the kernel overlayfs on-disk format.

  -f              stay in the foreground
  -d, --debug     log every request (implies -f)
  -o OPTS         comma-separated options (repeatable):
       lowerdir=A:B:C    lower layers, A on top (\\: escapes a colon); required
       upperdir=DIR      writable layer (without it the mount is read-only)
       workdir=DIR       scratch dir on upperdir's filesystem; required with upperdir
       userxattr         keep overlay xattrs in user.overlay.* instead of trusted.overlay.*
       volatile          never sync the upper layer
       fsync=0|1         whether fsync reaches the upper layer (default 1)
       timeout=SECONDS   kernel entry/attribute cache timeout (default 1e9)
       writeback=0|1     FUSE writeback cache (default 0)
       redirect_dir=off  accepted (the only supported value)
       uidmapping=CONT:HOST:LEN[:CONT:HOST:LEN...], gidmapping=...
                         layer ids CONT.. are reported as HOST.. (and stored back)
       squash_to_root, squash_to_uid=N, squash_to_gid=N
                         report every object as owned by root / N
       lower_passthrough kernel passthrough for lower files too (native session): faster
                         reads, but a file opened read-only before a copy-up keeps
                         reading the lower file, as with fuse-overlayfs
       xattr_permissions=0|1|2
                         keep owner and mode in security.fuseoverlayfs.override_stat (1)
                         or user.containers.override_stat (2) on the upper layer
       session=native|pyfuse3, passthrough=auto|on|off, uring=auto|on|off
                         front-end, kernel passthrough, FUSE over io_uring (README)
       noacl, static_nlink, context= (ignored), and the FUSE options (allow_other, ro,
       nodev, ...); plugins=, threaded=, fast_ino= are ignored with a warning
  -h, --help      this help
  -V, --version   print the version
"""

#: fuse-overlayfs injects these; the kernel then checks permissions on our attributes.
ROOT_DEFAULTS = ("default_permissions", "allow_other", "suid", "noatime")
USER_DEFAULTS = ("default_permissions", "noatime")

#: FUSE value options fuse-overlayfs accepts and drops rather than handing to the kernel:
#: podman's SELinux ``context="..."`` would make the mount fail where SELinux is off.
DROPPED_FUSE_OPTIONS = frozenset({"context", "fscontext", "defcontext", "rootcontext"})


def warn_unknown(token: str) -> None:
    kind = "unsupported" if parse_option(token)[0] in UNSUPPORTED else "unknown"
    print(f"{kind} argument ignored: {token}", file=sys.stderr)


#: The mount's fstype is ``fuse.backingfs-overlay`` (what ``mount -t`` and fstab name).
SUBTYPE = "subtype=backingfs-overlay"

#: A default is dropped when the user gave one of these: the options reach libfuse as a
#: set, so "the later one wins" cannot decide between ``suid`` and a given ``nosuid``.
_DEFAULT_YIELDS_TO = {
    "suid": frozenset({"nosuid"}),
    "noatime": frozenset({"atime", "relatime", "strictatime", "norelatime", "nostrictatime"}),
    "allow_other": frozenset({"allow_root"}),
}


def fuse_options_for(given: set[str], *, is_root: bool) -> set[str]:
    """The libfuse options to mount with: the defaults (unless the user gave their
    opposite) plus what was given, minus SELinux labels, with our subtype."""
    opts = {o for o in given if parse_option(o)[0] not in DROPPED_FUSE_OPTIONS}
    for default in ROOT_DEFAULTS if is_root else USER_DEFAULTS:
        if not opts & _DEFAULT_YIELDS_TO.get(default, frozenset()):
            opts.add(default)
    if not any(parse_option(o)[0] == "subtype" for o in opts):
        opts.add(SUBTYPE)
    return opts


def _main(argv: Sequence[str] | None) -> int:
    args = parse_argv(list(sys.argv[1:] if argv is None else argv), positional=1, prog=PROG)
    if args.help:
        print(HELP, end="")
        return 0
    if args.version:
        print(f"{PROG}: version {VERSION}")
        return 0
    fuse_given, fs_options = split_fuse_options(args.options)
    params = parse_params(fs_options, warn_unknown)
    debug = args.debug or params.debug
    mountpoint = os.path.abspath(args.positionals[0])

    # Imported late: --help/--version and usage errors need none of the machinery.
    from .ops import OverlayFs
    from .superblock import Superblock

    sb = Superblock.mount(params, mountpoint)  # QuietError: one line, exit 1
    fs = OverlayFs(sb)
    if params.is_read_only:
        # Without an upper layer the kernel mounts overlayfs read-only: the VFS refuses
        # writes before they reach us, and mount(8) shows ro.
        fuse_given = (fuse_given - {"rw"}) | {"ro"}
    return run(fs, mountpoint, fuse_options_for(fuse_given, is_root=os.geteuid() == 0),
               foreground=args.foreground or debug, debug=debug, fsname="backingfs-overlay")


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
