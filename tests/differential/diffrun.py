"""Differential runs: one random sequence of namespace and data operations applied to a FUSE
target and to its reference side by side, every outcome compared.

Pairs:
    passthru   our passthru over ``source/``  vs  a plain directory ``ref/`` (native)
    overlay    our overlay over lower1:lower2 + upper  vs  kernel overlayfs over identical
               copies of the same layers (``redirect_dir=off,index=off,metacopy=off``: what
               our overlay implements)

Both sides start from the same tree (built twice by the same code, owners and user xattrs
included; for the overlay pair a merged directory spanning both lowers, an opaque directory
and a whiteout in the upper; ``--lower-hardlink`` adds a hard-link pair in a lower
layer). Paths are drawn from a four-name pool
(``a b c d``, up to three levels), mostly from what the reference currently holds, so
ENOENT/EEXIST/ENOTEMPTY/ENOTDIR/EISDIR/EXDEV come up often. Operations: create, mkfifo,
write at offsets (holes), append, truncate, read, mkdir, rmdir, unlink, rename (plain,
RENAME_NOREPLACE, RENAME_EXCHANGE through renameat2), link, symlink (relative, never
leaving the tree), readlink, stat, lstat, chmod, utime, set/get/remove/listxattr on user.*,
readdir, lsattr and chattr (+i, +a, +d, +A, +S set and cleared; +i only while no fd is
held, see ``Generator.next``), and up to three fds held open across other ops (open, pread,
pwrite, ftruncate, fallocate in five modes, copy_file_range between them, fstat, close).
Every open is O_NONBLOCK so a FIFO never blocks. Each starting tree holds protected
objects (an append-only file; in the overlay pair an immutable lower file too), and
everything is made removable again (``unprotect``) before a clean run's directory is
deleted.

After each operation the runner compares: the outcome (success value or errno), then for
every path the op named and its parent directory: the lstat subset (type, permission bits,
size and nlink of non-directories, uid, gid; directory nlink for passthru), the user.*
xattrs, the lsattr flags above of files and directories, a regular file's bytes, a
symlink's target, a directory's readdir set (name, type). One difference in errno is
accepted, ``same_refusal``: both sides refuse to remove a protected object, in another order.
Every ``remount_every`` ops, open fds are closed, the FUSE target (and the kernel overlay) is
unmounted cleanly and mounted again over the same source/layers, and the whole trees are
compared; once more at the end. For the overlay pair, while ours is unmounted, kernel
overlayfs is also mounted read-only over *our* layers (our upper as the top lower) and must
show the reference's tree: what we left on disk means the same to the kernel (flags
excepted: the kernel reads overlay.protattr only from an upper layer).

What is never compared, and why (legitimate differences, not bugs):
- st_ino / st_dev values: ours are FUSE node ids on the FUSE device; the kernel overlay
  reports real inode numbers of the layer (xino off). Stability of ours is tested in
  tests/overlay. Which names share one st_ino (hard links) is compared with the trees.
- directory st_size (ext4 sizes depend on each directory's block history) and, for the
  overlay pair, directory nlink (kernel overlayfs reports 1 for merged directories and the
  upper's count otherwise, from a different layer history than ours).
- atime/mtime/ctime: wall-clock dependent. Only after ``utime`` is the mtime set by the op
  compared (it is an exact value on both sides).
- the uppers byte for byte: kernel overlayfs marks every directory it creates in a merged
  parent opaque (``ovl_create_upper``: "just an optimization"), ours only where something
  below must be hidden; origin/impure xattrs hold layer-specific file handles. The
  kernel-over-our-layers view above is the on-disk check instead.

Run from the repository root:

    python -m tests.differential.diffrun --pair passthru --seed 5 --ops 2000
    python -m tests.differential.diffrun --pair overlay --seed 5 --ops 2000 --remount-every 50
    python -m tests.differential.diffrun --pair overlay --seed 5 --opts writeback=1
    python -m pytest tests/differential --diff-seed 5 --diff-ops 2000   (both pairs)

On a mismatch the report names the pair, seed, op index and op, both outcomes, and the last
20 ops with their outcomes; every op is in ``ops.log`` in the kept base directory. The run
with the same seed, op count and remount interval replays it exactly (generation depends
only on the seed and the reference's state). Exit status: 0 same, 1 mismatch, 3 a side could
not be set up (2: usage, from argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backingfs.syscalls import fallocate  # noqa: E402
from backingfs.testing import (  # noqa: E402
    Mount,
    cli_argv,
    fuse_unavailable,
    mount_fstype,
    start_daemon,
)

NAMES = ("a", "b", "c", "d")
MAX_DEPTH = 3
SLOTS = 3                 # open-fd slots an op sequence may hold at once
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
GETFLAGS, SETFLAGS = 0x80086601, 0x40086602
FL_SYNC, FL_IMMUTABLE, FL_APPEND, FL_NODUMP, FL_NOATIME = 0x8, 0x10, 0x20, 0x40, 0x80
#: The file attributes the ops set and the observations compare (the rest, extents and
#: such, are the filesystem's own).
FLAGS = FL_SYNC | FL_IMMUTABLE | FL_APPEND | FL_NODUMP | FL_NOATIME
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
KERNEL_OVERLAY_OPTS = "redirect_dir=off,index=off,metacopy=off"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def fileattr(path: str, add: int = 0, remove: int = 0) -> int:
    """lsattr (and chattr's read-modify-write when asked): the FLAGS bits afterwards."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
        if add or remove:
            fcntl.ioctl(fd, SETFLAGS, struct.pack("=I", (flags | add) & ~remove))
            flags = struct.unpack("=I", fcntl.ioctl(fd, GETFLAGS, bytes(4)))[0]
        return flags & FLAGS
    finally:
        os.close(fd)


def unprotect(base: Path) -> None:
    """Take +i/+a off everything under ``base`` (behind any mount), so it can be removed."""
    subprocess.run(["chattr", "-R", "-f", "-ia", str(base)], capture_output=True,
                   check=False)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


class Mismatch(Exception):
    def __init__(self, report: str) -> None:
        super().__init__(report)
        self.report = report


class SetupError(Exception):
    pass


# --- the initial trees ---------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
               xattrs: dict[str, bytes] | None = None) -> None:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(path, k, v)


def build_plain_tree(root: Path, rng: random.Random) -> None:
    """The passthru pair's starting tree (built twice from equal generators)."""
    (root / "a" / "c").mkdir(parents=True)
    (root / "d").mkdir()
    write_file(root / "a" / "b", rng.randbytes(5000), xattrs={"user.k": b"v1"})
    write_file(root / "a" / "c" / "d", b"")
    write_file(root / "b", rng.randbytes(70_000), mode=0o640, uid=1000, gid=1000)
    os.link(root / "b", root / "a" / "d")
    os.symlink("a/b", root / "c")
    os.setxattr(root / "a", "user.dir", b"x")
    fileattr(str(root / "a" / "c" / "d"), add=FL_APPEND | FL_NODUMP)


def build_layers(lower1: Path, lower2: Path, upper: Path, rng: random.Random,
                 lower_hardlink: bool = False) -> None:
    """The overlay pair's layers (built twice from equal generators): lower2 at the bottom
    holds most of the tree, lower1 adds to the merged directory ``a`` and a symlink, the
    upper holds an opaque ``d`` and a whiteout over ``a/c/d``. ``a/d`` is a copy of ``b``,
    or with ``lower_hardlink`` a hard link to it (tests/overlay/test_ovl_lower_hardlinks.py
    has the cases this found; CI runs one seed of it)."""
    (lower2 / "a" / "c").mkdir(parents=True)
    (lower2 / "d").mkdir()
    write_file(lower2 / "a" / "b", rng.randbytes(5000), xattrs={"user.k": b"v1"})
    write_file(lower2 / "a" / "c" / "d", rng.randbytes(100))
    write_file(lower2 / "b", rng.randbytes(70_000), mode=0o640, uid=1000, gid=1000)
    if lower_hardlink:
        os.link(lower2 / "b", lower2 / "a" / "d")
    else:
        shutil.copy2(lower2 / "b", lower2 / "a" / "d")
        os.chown(lower2 / "a" / "d", 1000, 1000)
    write_file(lower2 / "d" / "a", b"hidden by the opaque upper d")
    (lower1 / "a").mkdir()
    write_file(lower1 / "a" / "a", rng.randbytes(300))
    os.symlink("a/b", lower1 / "c")
    os.setxattr(lower1 / "a", "user.dir", b"x")
    # Protected lower objects: their flags come from the lower inode until a copy-up
    # records them in the upper's overlay.protattr.
    fileattr(str(lower1 / "a" / "a"), add=FL_APPEND | FL_NODUMP)
    fileattr(str(lower2 / "a" / "b"), add=FL_IMMUTABLE)
    (upper / "a" / "c").mkdir(parents=True)
    os.mknod(upper / "a" / "c" / "d", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "d").mkdir()
    os.setxattr(upper / "d", "trusted.overlay.opaque", b"y")
    write_file(upper / "d" / "b", rng.randbytes(10))


# --- the two sides -----------------------------------------------------------------------------


class Side:
    """One tree the ops run on. ``root`` is where ops work; ``restart()`` unmounts and
    mounts again over the same backing state (a no-op for a plain directory)."""

    label = ""

    def __init__(self) -> None:
        self.root = Path("/nonexistent")
        self.fds: dict[int, int] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def restart(self) -> None:
        self.close_fds()
        self.stop()
        self.start()

    def close_fds(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def trouble(self) -> str | None:
        """Why this side is no longer trustworthy (daemon died, logged a traceback)."""
        return None

    def cleanup(self) -> None:
        """Always safe: leave nothing mounted or running."""
        self.close_fds()


class PlainSide(Side):
    label = "native"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root


class FuseSide(Side):
    """A daemon of ours started with ``argv_fn()``; stderr kept across mounts."""

    def __init__(self, label: str, mnt: Path, argv_fn: Callable[[], list[str]],
                 log_dir: Path) -> None:
        super().__init__()
        self.label = label
        self.root = mnt
        self.argv_fn = argv_fn
        self.log_dir = log_dir
        self.mount: Mount | None = None
        self.generation = 0

    def start(self) -> None:
        self.generation += 1
        log = self.log_dir / f"{self.label}-{self.generation}.stderr"
        m = start_daemon(self.argv_fn(), str(self.root), stderr_path=str(log))
        self.mount = m
        try:
            m.wait_live(timeout=20)
        except BaseException:
            self.mount = None
            m.force_cleanup()
            raise

    def stop(self) -> None:
        m, self.mount = self.mount, None
        if m is None:
            return
        try:
            why = self._trouble(m)
            m.unmount_clean(timeout=20)
            if why:
                raise Mismatch(f"{self.label}: {why}")
        finally:
            m.force_cleanup()

    @staticmethod
    def _trouble(m: Mount) -> str | None:
        text = m.stderr_text()
        if m._exited():
            return f"daemon {m.pid} exited:\n{text}"
        if "Traceback" in text:
            return f"daemon {m.pid} logged a traceback:\n{text}"
        return None

    def trouble(self) -> str | None:
        return None if self.mount is None else self._trouble(self.mount)

    def cleanup(self) -> None:
        super().cleanup()
        m, self.mount = self.mount, None
        if m is not None:
            m.force_cleanup()


class KernelOverlaySide(Side):
    label = "kernel-overlay"

    def __init__(self, mnt: Path, opts: str) -> None:
        super().__init__()
        self.root = mnt
        self.opts = opts

    def start(self) -> None:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", self.opts,
                            str(self.root)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"mount -t overlay failed: {r.stderr.strip()}")

    def stop(self) -> None:
        if mount_fstype(str(self.root)) is not None:
            subprocess.run(["umount", str(self.root)], check=True, capture_output=True)

    def cleanup(self) -> None:
        super().cleanup()
        if mount_fstype(str(self.root)) is not None:
            r = subprocess.run(["umount", str(self.root)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


@dataclass
class Pair:
    name: str
    base: Path
    target: Side
    ref: Side
    #: Kernel overlayfs over the target's layers, mounted while the target is not (see
    #: Runner.compare_layers), or None.
    layer_view: Side | None = None
    opts: str = ""
    #: Compare directory link counts (passthru must show the source's own).
    dir_nlink: bool = False
    lower_hardlink: bool = False

    def sides(self) -> tuple[Side, Side]:
        return self.target, self.ref

    def known_limit(self, op: dict[str, Any]) -> str | None:
        """Why ``op`` is not run on this pair (a documented limit of the target), or None.

        passthru under ``writeback`` refuses write opens of an append-only file: the
        kernel's page flushes may rewrite bytes before EOF, which an O_APPEND backing fd
        would move to the end (README). On the pyfuse3 front-end there is no ioctl and no
        fallocate handler (ENOTTY/EOPNOTSUPP): those ops are not run there."""
        opts = self.opts.split(",")
        if "session=pyfuse3" in opts and op["op"] in ("chattr", "lsattr", "fallocate"):
            return "pyfuse3: no FUSE_IOCTL or FALLOCATE handler"
        if self.name != "passthru" or "writeback" not in opts:
            return None
        writes = op["op"] in ("write", "append", "truncate") or (
            op["op"] == "open" and op["flags"] & os.O_ACCMODE != os.O_RDONLY)
        if not writes:
            return None
        try:
            flags = fileattr(str(self.ref.root / op["path"]))
        except OSError:
            return None
        return "passthru+writeback: no write open of a +a file" if flags & FL_APPEND else None


def overlay_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (kernel overlayfs, chown in the layers)"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return "no kernel overlayfs"
    except OSError:
        return "cannot read /proc/filesystems"
    return fuse_unavailable()


def unavailable(pair: str) -> str | None:
    if pair == "overlay":
        return overlay_available()
    if os.geteuid() != 0:
        return "needs root (files owned by another uid in the tree)"
    return fuse_unavailable()


def make_pair(name: str, base: Path, seed: int, opts: str = "",
              lower_hardlink: bool = False) -> Pair:
    """Build the backing trees under ``base`` (not yet mounted); ``opts`` are added to the
    daemon's ``-o``."""
    extra = f",{opts}" if opts else ""
    logs = base / "logs"
    logs.mkdir()
    if name == "passthru":
        src, ref, mnt = base / "source", base / "ref", base / "mnt"
        for d in (src, ref, mnt):
            d.mkdir(mode=0o755)
        build_plain_tree(src, random.Random(f"tree-{seed}"))
        build_plain_tree(ref, random.Random(f"tree-{seed}"))
        target = FuseSide("passthru", mnt,
                          lambda: cli_argv("passthru", "-o", "allow_other" + extra, str(src),
                                           str(mnt)),
                          logs)
        return Pair(name, base, target, PlainSide(ref), opts=opts, dir_nlink=True)
    if name == "overlay":
        dirs: dict[str, dict[str, Path]] = {}
        for side in ("ours", "kern"):
            d = {n: base / side / n for n in ("lower1", "lower2", "upper", "work", "mnt")}
            for p in d.values():
                p.mkdir(mode=0o755, parents=True)
            build_layers(d["lower1"], d["lower2"], d["upper"], random.Random(f"tree-{seed}"),
                         lower_hardlink)
            dirs[side] = d

        def layer_opts(d: dict[str, Path]) -> str:
            return (f"lowerdir={d['lower1']}:{d['lower2']},upperdir={d['upper']},"
                    f"workdir={d['work']}")

        o, k = dirs["ours"], dirs["kern"]
        target = FuseSide("overlay", o["mnt"],
                          lambda: cli_argv("overlay", "-o", layer_opts(o) + extra, str(o["mnt"])),
                          logs)
        ref = KernelOverlaySide(k["mnt"], f"{layer_opts(k)},{KERNEL_OVERLAY_OPTS}")
        (base / "view").mkdir()
        view = KernelOverlaySide(base / "view", f"ro,lowerdir={o['upper']}:{o['lower1']}:"
                                                f"{o['lower2']},{KERNEL_OVERLAY_OPTS}")
        return Pair(name, base, target, ref, layer_view=view, opts=opts,
                    lower_hardlink=lower_hardlink)
    raise ValueError(f"unknown pair {name!r} (passthru, overlay)")


# --- observations ----------------------------------------------------------------------------


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def stat_subset(st: os.stat_result, dir_nlink: bool = False) -> tuple[Any, ...]:
    """What must agree (see the module docstring for what is left out and why)."""
    kind = stat.filemode(st.st_mode)[0]   # "d", "-", "l", "p", ...
    if kind == "d":
        return (kind, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                st.st_nlink if dir_nlink else None)
    return (kind, oct(stat.S_IMODE(st.st_mode)), st.st_size, st.st_nlink, st.st_uid,
            st.st_gid)


def user_xattrs(path: str) -> dict[str, bytes] | str:
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                       if n.startswith("user."))
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    except OSError as e:
        return errname(e)


def dir_listing(path: str) -> list[tuple[str, str]] | str:
    try:
        with os.scandir(path) as it:
            out = []
            for e in it:
                kind = ("dir" if e.is_dir(follow_symlinks=False) else
                        "lnk" if e.is_symlink() else
                        "reg" if e.is_file(follow_symlinks=False) else "other")
                out.append((e.name, kind))
        return sorted(out)
    except OSError as e:
        return errname(e)


def observe(root: Path, rel: str, dir_nlink: bool = False,
            flags: bool = True) -> dict[str, Any]:
    """Everything compared about one path (``flags``: lsattr's, of files and directories)."""
    path = str(root / rel) if rel else str(root)
    try:
        st = os.lstat(path)
    except OSError as e:
        return {"lstat": errname(e)}
    obs: dict[str, Any] = {"lstat": stat_subset(st, dir_nlink),
                           "xattrs": user_xattrs(path)}
    if flags and (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        try:
            obs["flags"] = fileattr(path)
        except OSError as e:
            obs["flags"] = errname(e)
    if stat.S_ISDIR(st.st_mode):
        obs["readdir"] = dir_listing(path)
    elif stat.S_ISLNK(st.st_mode):
        obs["readlink"] = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        try:
            with open(path, "rb") as f:
                obs["data"] = f.read()
        except OSError as e:
            obs["data"] = errname(e)
    return obs


def walk(root: Path) -> list[str]:
    """Every path under ``root`` (relative, sorted), not following symlinks."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            out.append(n if rel == "." else f"{rel}/{n}")
    return sorted(out)


def link_groups(root: Path, rels: list[str]) -> list[list[str]]:
    """The non-directories of ``rels`` that report one st_ino, in groups of two or more:
    the numbers differ between the sides, which names share one must not (tar, rsync -H
    and du tell hard links so)."""
    by_ino: dict[int, list[str]] = {}
    for rel in rels:
        try:
            st = os.lstat(root / rel)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault(st.st_ino, []).append(rel)
    return sorted(sorted(g) for g in by_ino.values() if len(g) > 1)


def short(v: Any, limit: int = 160) -> str:
    if isinstance(v, bytes | bytearray):
        if len(v) > 32:
            return f"<{len(v)} bytes sha1 {hashlib.sha1(v).hexdigest()[:12]} " \
                   f"head {bytes(v[:16]).hex()}>"
        return repr(bytes(v))
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {short(x, 80)}" for k, x in v.items()) + "}"
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def first_data_diff(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return f"first differing byte at {i} (of {len(a)} vs {len(b)})"
    return f"lengths {len(a)} vs {len(b)}"


def describe_diff(o1: dict[str, Any], o2: dict[str, Any]) -> str:
    lines = []
    for k in sorted(set(o1) | set(o2)):
        a, b = o1.get(k), o2.get(k)
        if a != b:
            extra = ""
            if isinstance(a, bytes) and isinstance(b, bytes):
                extra = f" ({first_data_diff(a, b)})"
            lines.append(f"    {k}: target {short(a)}\n    {' ' * len(k)}  ref    {short(b)}"
                         f"{extra}")
    return "\n".join(lines)


# --- operations --------------------------------------------------------------------------------


def parent(rel: str) -> str:
    return rel.rpartition("/")[0]


@dataclass
class Generator:
    """Draws ops from the seed and the reference's current tree."""

    rng: random.Random
    weights: dict[str, int] = field(default_factory=lambda: dict(WEIGHTS))

    def any_path(self) -> str:
        depth = self.rng.choices((1, 2, 3), (5, 4, 2))[0]
        return "/".join(self.rng.choice(NAMES) for _ in range(depth))

    def path(self, tree: list[tuple[str, str]], want: str = "any") -> str:
        """An existing path of kind ``want`` (file, dir, any) most of the time, else a
        name in an existing directory, else anything from the pool."""
        r = self.rng.random()
        pool = [p for p, k in tree if want == "any" or k == want]
        if r < 0.6 and pool:
            return self.rng.choice(pool)
        if r < 0.9:
            dirs = [""] + [p for p, k in tree if k == "dir" and p.count("/") < MAX_DEPTH - 1]
            d = self.rng.choice(dirs)
            return f"{d}/{self.rng.choice(NAMES)}" if d else self.rng.choice(NAMES)
        return self.any_path()

    def data(self) -> bytes:
        r = self.rng.random()
        n = (self.rng.randint(1, 100) if r < 0.4 else self.rng.randint(1, 8192) if r < 0.85
             else self.rng.randint(8192, 140_000))
        return self.rng.randbytes(n)

    def offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.3:
            return 0
        if r < 0.6:
            return max(0, size + self.rng.randint(-100, 100))
        return self.rng.randrange(150_000)

    def next(self, tree: list[tuple[str, str]], sizes: dict[str, int],
             slots: set[int]) -> dict[str, Any]:
        names = [n for n in self.weights if n not in FD_OPS or slots or n == "open"]
        if len(slots) >= SLOTS:
            names.remove("open")
        kind = self.rng.choices(names, [self.weights[n] for n in names])[0]
        op: dict[str, Any] = {"op": kind}
        rng = self.rng
        if kind in ("create", "mkdir", "mkfifo"):
            op["path"] = self.path(tree, "none")
            op["mode"] = rng.choice((0o644, 0o600, 0o755, 0o4755, 0o1777 if kind == "mkdir"
                                     else 0o640))
            if kind == "create":
                op["excl"] = rng.random() < 0.5
        elif kind in ("write", "append", "read", "truncate"):
            p = op["path"] = self.path(tree, "reg")
            size = sizes.get(p, 0)
            if kind == "write":
                op["off"] = self.offset(size)
                op["data"] = self.data()
                op["creat"] = rng.random() < 0.2
            elif kind == "append":
                op["data"] = self.data()
            elif kind == "read":
                op["off"] = self.offset(size)
                op["len"] = rng.choice((1, 100, 4096, 70_000, 200_000))
            else:
                op["size"] = rng.choice((0, 1, 4096, max(0, size - rng.randint(1, 5000)),
                                         size + rng.randint(1, 5000), 100_000))
        elif kind in ("rmdir", "readdir"):
            op["path"] = self.path(tree, "dir")
        elif kind in ("unlink", "stat", "lstat", "readlink", "chmod", "utime",
                      "getxattr", "removexattr", "listxattr", "setxattr"):
            op["path"] = self.path(tree, "lnk" if kind == "readlink" else "any")
            if kind == "chmod":
                op["mode"] = rng.choice((0o644, 0o600, 0o755, 0o2755, 0o000, 0o777))
            if kind == "utime":
                op["mtime_ns"] = rng.randrange(10**9, 2 * 10**18)
                op["atime_ns"] = rng.randrange(10**9, 2 * 10**18)
                op["follow"] = rng.random() < 0.7
            if kind in ("getxattr", "removexattr", "setxattr"):
                op["name"] = rng.choice(("user.k", "user.m", "user.dir"))
            if kind == "setxattr":
                op["value"] = rng.randbytes(rng.choice((0, 3, 100)))
                op["flags"] = rng.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
        elif kind in ("rename", "link"):
            op["src"] = self.path(tree, "any")
            op["dst"] = self.path(tree, "any" if kind == "rename" else "none")
            if kind == "rename":
                op["flags"] = rng.choices((0, RENAME_NOREPLACE, RENAME_EXCHANGE), (6, 2, 2))[0]
        elif kind == "symlink":
            op["path"] = self.path(tree, "none")
            # Relative, without "..": resolves inside each side's own tree.
            op["target"] = self.any_path() if rng.random() < 0.8 else "nothing/here"
        elif kind in ("chattr", "lsattr"):
            op["path"] = self.path(tree, rng.choice(("reg", "dir")))
            if kind == "chattr":
                # +i only with no fd open: an fd opened for write before it is the one
                # known difference (ftruncate: kernel overlayfs allows it, ext4 and we
                # refuse; tests/behaviour/test_bhv_fileattr.py).
                adds = (FL_APPEND, FL_NODUMP, FL_NOATIME, FL_SYNC)
                if not slots:
                    adds += (FL_IMMUTABLE,)
                op["add"] = rng.choice(adds) if rng.random() < 0.5 else 0
                op["remove"] = rng.choice((0, FL_IMMUTABLE | FL_APPEND, FL_IMMUTABLE,
                                           FL_APPEND, FL_NODUMP | FL_SYNC | FL_NOATIME))
        elif kind == "open":
            op["slot"] = rng.choice([s for s in range(SLOTS) if s not in slots])
            op["path"] = self.path(tree, "reg")
            op["flags"] = rng.choice(OPEN_FLAGS)
        else:   # fd ops
            op["slot"] = rng.choice(sorted(slots))
            if kind == "fdwrite":
                op["off"] = self.offset(0)
                op["data"] = self.data()
            elif kind == "fdread":
                op["off"] = self.offset(0)
                op["len"] = rng.choice((10, 4096, 100_000))
            elif kind == "fdtruncate":
                op["size"] = rng.choice((0, 5, 8192, 90_000))
            elif kind == "fdcopy":   # copy_file_range from a slot (maybe this one) into it
                op["src_slot"] = rng.choice(sorted(slots))
                op["off_in"] = self.offset(0)
                op["off"] = self.offset(0)
                op["len"] = rng.choice((1, 4096, 70_000, 300_000))
            elif kind == "fallocate":
                op["mode"] = rng.choice((0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE,
                                         ZERO_RANGE | KEEP_SIZE))
                op["off"] = rng.choice((0, 100, 4096, 70_000))
                op["len"] = rng.choice((1, 4096, 10_000, 100_000))
        return op


WEIGHTS: dict[str, int] = {
    "create": 6, "mkfifo": 1, "write": 10, "append": 4, "truncate": 4, "read": 8, "mkdir": 6,
    "rmdir": 4, "unlink": 5, "rename": 9, "link": 3, "symlink": 3, "readlink": 1, "stat": 2,
    "lstat": 2, "chmod": 3, "utime": 3, "setxattr": 4, "getxattr": 3, "removexattr": 2,
    "listxattr": 2, "readdir": 4, "open": 3, "fdwrite": 3, "fdread": 3, "fdtruncate": 1,
    "fdstat": 2, "close": 2, "chattr": 3, "lsattr": 1, "fallocate": 2, "fdcopy": 3,
}
FD_OPS = {"fdwrite", "fdread", "fdtruncate", "fdstat", "close", "fallocate", "fdcopy"}
OPEN_FLAGS = (os.O_RDONLY, os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_APPEND,
              os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_CREAT)

#: Every open is non-blocking: a FIFO (mkfifo, or a symlink to one) would otherwise wait
#: for a partner forever; with it, both sides answer at once and alike (ENXIO, EOF).
NB = os.O_NONBLOCK

# The paths each op names, for the post-op observations.
PATH_KEYS = ("path", "src", "dst")


def apply(side: Side, op: dict[str, Any]) -> Any:
    """Run ``op`` on ``side``: its result (compared as is); OSError propagates."""
    kind, root = op["op"], side.root

    def p(key: str = "path") -> str:
        return str(root / op[key])

    if kind == "create":
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if op["excl"] else 0)
        os.close(os.open(p(), flags | NB, op["mode"]))
        return None
    if kind == "write":
        fd = os.open(p(), os.O_WRONLY | NB | (os.O_CREAT if op["creat"] else 0), 0o644)
        try:
            return os.pwrite(fd, op["data"], op["off"])
        finally:
            os.close(fd)
    if kind == "append":
        fd = os.open(p(), os.O_WRONLY | os.O_APPEND | NB)
        try:
            return (os.write(fd, op["data"]), os.fstat(fd).st_size)
        finally:
            os.close(fd)
    if kind == "read":
        fd = os.open(p(), os.O_RDONLY | NB)
        try:
            return os.pread(fd, op["len"], op["off"])
        finally:
            os.close(fd)
    if kind == "truncate":
        return os.truncate(p(), op["size"])
    if kind == "mkdir":
        os.mkdir(p(), op["mode"])
        return None
    if kind == "mkfifo":
        os.mkfifo(p(), op["mode"])
        return None
    if kind == "rmdir":
        return os.rmdir(p())
    if kind == "unlink":
        return os.unlink(p())
    if kind == "rename":
        return renameat2(p("src"), p("dst"), op["flags"])
    if kind == "link":
        return os.link(p("src"), p("dst"), follow_symlinks=False)
    if kind == "symlink":
        return os.symlink(op["target"], p())
    if kind == "readlink":
        return os.readlink(p())
    if kind in ("stat", "lstat"):
        st = os.stat(p(), follow_symlinks=kind == "stat")
        return stat_subset(st)
    if kind == "chmod":
        return os.chmod(p(), op["mode"])
    if kind == "utime":
        os.utime(p(), ns=(op["atime_ns"], op["mtime_ns"]), follow_symlinks=op["follow"])
        return os.stat(p(), follow_symlinks=op["follow"]).st_mtime_ns
    if kind == "setxattr":
        return os.setxattr(p(), op["name"], op["value"], op["flags"], follow_symlinks=False)
    if kind == "getxattr":
        return os.getxattr(p(), op["name"], follow_symlinks=False)
    if kind == "removexattr":
        return os.removexattr(p(), op["name"], follow_symlinks=False)
    if kind == "listxattr":
        return sorted(n for n in os.listxattr(p(), follow_symlinks=False)
                      if n.startswith("user."))
    if kind == "readdir":
        return sorted(os.listdir(p()))
    if kind == "chattr":
        return fileattr(p(), op["add"], op["remove"])
    if kind == "lsattr":
        return fileattr(p())
    if kind == "open":
        side.fds[op["slot"]] = os.open(p(), op["flags"] | NB, 0o644)
        return None
    fd = side.fds.get(op["slot"])
    if fd is None:
        raise OSError(errno.EBADF, "slot not open on this side")
    if kind == "close":
        del side.fds[op["slot"]]
        return os.close(fd)
    if kind == "fdwrite":
        return os.pwrite(fd, op["data"], op["off"])
    if kind == "fdread":
        return os.pread(fd, op["len"], op["off"])
    if kind == "fdtruncate":
        return os.ftruncate(fd, op["size"])
    if kind == "fdstat":
        return stat_subset(os.fstat(fd))
    if kind == "fallocate":
        fallocate(fd, op["mode"], op["off"], op["len"])
        return os.fstat(fd).st_size
    if kind == "fdcopy":
        src = side.fds.get(op["src_slot"])
        if src is None:
            raise OSError(errno.EBADF, "slot not open on this side")
        done = os.copy_file_range(src, fd, op["len"], op["off_in"], op["off"])
        return done, os.fstat(fd).st_size
    raise ValueError(f"unknown op {kind}")


def outcome(side: Side, op: dict[str, Any]) -> tuple[str, Any]:
    try:
        return ("ok", apply(side, op))
    except OSError as e:
        return ("err", errname(e))


def same_refusal(op: dict[str, Any], target: tuple[str, Any], ref: tuple[str, Any],
                 pyfuse3: bool = False) -> bool:
    """Both sides refused, in another order. Removing an immutable or append-only object,
    or a name from an append-only directory, is EPERM in the VFS's ``may_delete`` before
    its type checks (ENOTDIR, EISDIR). A FUSE inode carries no S_IMMUTABLE/S_APPEND, so on
    our mount the VFS answers the type check itself and the daemon is never asked."""
    if target[0] != "err" or ref != ("err", "EPERM"):
        return False
    if pyfuse3 and op["op"] == "setxattr" and op["flags"]:
        # pyfuse3 checks XATTR_CREATE/REPLACE itself (a getxattr first) before the
        # filesystem can say EPERM: the front-end's limit (backingfs/bridge.py).
        return target[1] in ("ENODATA", "EEXIST")
    return op["op"] in ("rename", "unlink", "rmdir") and target[1] in ("ENOTDIR", "EISDIR")


def fmt_op(i: int, op: dict[str, Any]) -> str:
    args = " ".join(f"{k}={oct(v) if k == 'mode' else short(v, 60)}"
                    for k, v in op.items() if k != "op")
    return f"#{i} {op['op']} {args}"


def fmt_outcome(o: tuple[str, Any]) -> str:
    return f"{o[0]} {short(o[1])}" if o[1] is not None or o[0] == "err" else o[0]


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Runner:
    pair: Pair
    seed: int
    ops: int
    remount_every: int = 100
    log: Callable[[str], None] = lambda s: None
    history: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    done: int = 0
    oplog: Any = None   # every op and both outcomes, written to <base>/ops.log

    def fail(self, i: int, op: dict[str, Any] | None, what: str) -> Mismatch:
        head = (f"DIFFERENCE in pair {self.pair.name}, seed {self.seed}, "
                + (f"op {fmt_op(i, op)}" if op is not None else f"after op #{i}"))
        past = "\n".join(f"    {h}" for h in self.history) or "    (none)"
        rerun = (f"python -m tests.differential.diffrun --pair {self.pair.name} "
                 f"--seed {self.seed} --ops {self.ops} --remount-every {self.remount_every}"
                 + (f" --opts {self.pair.opts}" if self.pair.opts else "")
                 + (" --lower-hardlink" if self.pair.lower_hardlink else ""))
        if self.oplog is not None:
            self.oplog.flush()
        trouble = self.pair.target.trouble()
        if trouble:
            what += f"\n  and the target daemon: {trouble}"
        return Mismatch(f"{head}\n{what}\n  last {len(self.history)} ops (op: target | ref):\n"
                        f"{past}\n  rerun: {rerun}\n  layers, daemon logs, every op "
                        f"(ops.log): {self.pair.base}")

    def ref_state(self) -> tuple[list[tuple[str, str]], dict[str, int]]:
        tree, sizes = [], {}
        root = self.pair.ref.root
        for rel in walk(root):
            try:
                st = os.lstat(root / rel)
            except OSError:
                continue
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "lnk" if stat.S_ISLNK(st.st_mode)
                    else "reg" if stat.S_ISREG(st.st_mode) else "other")
            tree.append((rel, kind))
            if kind == "reg":
                sizes[rel] = st.st_size
        return tree, sizes

    def compare_paths(self, i: int, op: dict[str, Any] | None, rels: list[str],
                      what: str, target_root: Path | None = None) -> None:
        t_root = target_root or self.pair.target.root
        r_root = self.pair.ref.root
        # Kernel overlayfs over our layers (``compare_layers``) reads no overlay.protattr
        # from a lower layer, so +i/+a of copied-up objects are compared on our mount only.
        flags = t_root == self.pair.target.root and "session=pyfuse3" not in \
            self.pair.opts.split(",")
        for rel in rels:
            dn = self.pair.dir_nlink
            ot, orf = observe(t_root, rel, dn, flags), observe(r_root, rel, dn, flags)
            if ot != orf:
                raise self.fail(i, op, f"  {what} of {rel or '/'!r} differs:\n"
                                       + describe_diff(ot, orf))

    def compare_trees(self, i: int, why: str, target_root: Path | None = None) -> None:
        t_root = target_root or self.pair.target.root
        wt, wr = walk(t_root), walk(self.pair.ref.root)
        if wt != wr:
            only_t, only_r = sorted(set(wt) - set(wr)), sorted(set(wr) - set(wt))
            raise self.fail(i, None, f"  {why}: trees differ: only in target {only_t}, "
                                     f"only in ref {only_r}")
        self.compare_paths(i, None, ["", *wt], why, t_root)
        lt, lr = link_groups(t_root, wt), link_groups(self.pair.ref.root, wr)
        if lt != lr:
            raise self.fail(i, None, f"  {why}: hard links differ (names of one st_ino): "
                                     f"target {lt}, ref {lr}")

    def compare_layers(self, i: int) -> None:
        """What our layers mean to the kernel: kernel overlayfs mounted read-only over our
        upper (as the top lower layer) and our lowers must show the reference's tree.

        This, not a byte-for-byte comparison of the two uppers, is the on-disk check: the
        uppers legitimately differ in bookkeeping, e.g. kernel overlayfs marks every
        directory it creates in a merged parent opaque (``ovl_create_upper``: "just an
        optimization"), ours only where something below must be hidden; origin/impure
        xattrs hold layer-specific file handles."""
        view = self.pair.layer_view
        if view is None:
            return
        view.start()
        try:
            self.compare_trees(i, f"kernel overlayfs over our layers at op #{i}", view.root)
        finally:
            view.cleanup()

    def check_target(self, i: int, op: dict[str, Any] | None) -> None:
        why = self.pair.target.trouble()
        if why:
            raise self.fail(i, op, f"  target trouble: {why}")

    def remount(self, i: int) -> None:
        self.check_target(i, None)
        t, r = self.pair.sides()
        t.close_fds()
        try:
            t.stop()
        except Exception as e:
            raise self.fail(i, None, f"  unmounting the target was not clean: {e}") from e
        r.restart()
        self.compare_layers(i)
        t.start()
        self.compare_trees(i, f"after remount at op #{i}")

    def step(self, i: int, op: dict[str, Any]) -> None:
        """Run ``op`` on both sides and compare the outcomes and the paths it names."""
        t, r = self.pair.sides()
        ot, orf = outcome(t, op), outcome(r, op)
        line = f"{fmt_op(i, op)}: {fmt_outcome(ot)} | {fmt_outcome(orf)}"
        self.history.append(line)
        if self.oplog is not None:
            self.oplog.write(line + "\n")
        if op["op"] == "open" and (op["slot"] in t.fds) != (op["slot"] in r.fds):
            # keep the fd tables in step before reporting
            for side in (t, r):
                fd = side.fds.pop(op["slot"], None)
                if fd is not None:
                    os.close(fd)
        if ot != orf and not same_refusal(op, ot, orf,
                                          "session=pyfuse3" in self.pair.opts.split(",")):
            raise self.fail(i, op, f"  outcomes differ:\n    target: {fmt_outcome(ot)}\n"
                                   f"    ref:    {fmt_outcome(orf)}")
        rels: list[str] = []
        for k in PATH_KEYS:
            if k in op:
                rels += [op[k], parent(op[k])]
        self.compare_paths(i, op, sorted(set(rels)), "after the op, the state")

    def run(self) -> None:
        rng = random.Random(self.seed)
        gen = Generator(rng)
        t, r = self.pair.sides()
        self.compare_trees(0, "initial trees")
        for i in range(1, self.ops + 1):
            tree, sizes = self.ref_state()
            op = gen.next(tree, sizes, set(r.fds))
            limit = self.pair.known_limit(op)
            if limit:
                self.history.append(f"{fmt_op(i, op)}: skipped ({limit})")
            else:
                self.step(i, op)
            self.done = i
            if i % 50 == 0:
                self.check_target(i, op)
            if self.remount_every and i % self.remount_every == 0 and i < self.ops:
                self.remount(i)
        self.remount(self.ops)


def run_pair(pair_name: str, seed: int, ops: int, *, remount_every: int = 100, opts: str = "",
             lower_hardlink: bool = False, base: Path | None = None, keep: bool = False,
             log: Callable[[str], None] = lambda s: None) -> Runner:
    """Build, mount, run and tear down one pair. Raises Mismatch (with the report) or
    SetupError. The base directory is removed unless ``keep`` or a mismatch (kept for the
    post-mortem; its path is in the report)."""
    made = base is None
    base = Path(tempfile.mkdtemp(prefix=f"bfs-diff-{pair_name}-")) if base is None else base
    os.chmod(base, 0o755)
    pair = make_pair(pair_name, base, seed, opts, lower_hardlink)
    runner = Runner(pair, seed, ops, remount_every, log)
    ok = False
    runner.oplog = open(base / "ops.log", "w")  # noqa: SIM115 (closed in finally)
    try:
        for side in pair.sides():
            side.start()
        t0 = time.monotonic()
        runner.run()
        log(f"diffrun: {pair_name} seed {seed}: {ops} ops same on both sides "
            f"({time.monotonic() - t0:.1f}s, remount every {remount_every})")
        try:
            for side in pair.sides():
                side.stop()
        except Exception as e:
            raise runner.fail(ops, None, f"  the final unmount was not clean: {e}") from e
        ok = True
    finally:
        runner.oplog.close()
        for side in (*pair.sides(), pair.layer_view):
            if side is not None:
                side.cleanup()
        if made and ok and not keep and nothing_mounted_under(base):
            unprotect(base)
            shutil.rmtree(base, ignore_errors=True)
    return runner


def nothing_mounted_under(base: Path) -> bool:
    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return not any(line.split()[4].startswith(prefix) for line in f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.differential.diffrun",
                                 description="differential run of a FUSE target against its "
                                             "reference (see the module docstring)")
    ap.add_argument("--pair", choices=("passthru", "overlay", "both"), default="both")
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock")
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--remount-every", type=int, default=100, help="0: only at the end")
    ap.add_argument("--opts", default="", help="extra -o options for our daemon "
                    "(passthru: writeback,cache=always; overlay: writeback=1,...)")
    ap.add_argument("--lower-hardlink", action="store_true",
                    help="overlay: make a/d a hard link to b in the lower layer")
    ap.add_argument("--keep", action="store_true", help="keep the trees after a clean run")
    args = ap.parse_args(argv)
    if args.lower_hardlink and "session=pyfuse3" in args.opts.split(","):
        # Documented (README, hard links in a lower layer): on pyfuse3 each name of a lower
        # hard link has a number of its own; the kernel gives them one.
        ap.error("--lower-hardlink cannot be compared on session=pyfuse3: the names of a "
                 "lower hard link have st_ino of their own there (README)")
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    pairs = ("passthru", "overlay") if args.pair == "both" else (args.pair,)
    status = 0
    for name in pairs:
        why = unavailable(name)
        if why:
            print(f"diffrun: {name}: unavailable: {why}", file=sys.stderr)
            status = status or 3
            continue
        try:
            run_pair(name, seed, args.ops, remount_every=args.remount_every, opts=args.opts,
                     lower_hardlink=args.lower_hardlink, keep=args.keep,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
        except Mismatch as m:
            print(m.report, file=sys.stderr)
            status = 1
        except SetupError as e:
            print(f"diffrun: {name}: setup failed: {e}", file=sys.stderr)
            status = status or 3
    return status


if __name__ == "__main__":
    sys.exit(main())
