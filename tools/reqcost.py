"""reqcost: what one FUSE request costs the daemon in Python, without the kernel.

    python tools/reqcost.py [--fs passthru|overlay] [--n N] [--ops OP,OP...] [--profile OP]
                            [--dir DIR] [--between none|poll|wake|sleep] [--gap US]

Builds the filesystem over a scratch tree, serves it with a ``NativeSession`` whose device
is /dev/null (replies are written and dropped), and feeds the session's own dispatch the
bytes of real requests, timing each kind: the decode, the handler, the filesystem's
syscalls and the reply encoding, with none of the transport. Set against the live
figures (``bench.py --workloads rtt`` for a whole round trip), it says how much of a
request is ours to make faster. ``--profile OP`` runs that one under cProfile.

Requests (all on inodes the table already holds, as in a warm tree):
    getattr, lookup (an existing name), lookup-enoent (in the root; for overlay a merged
    directory), lookup-enoent-sub (in a subdirectory; for overlay one of the upper layer
    alone, as every directory a tar extract makes), setattr-mode, setattr-chown,
    setattr-times, getxattr (absent: ENODATA, as the kernel's security.capability probe),
    readdirplus (3 files and the dots), readdirplus-eof (the empty call that ends a
    listing), lookup-forget (a name whose inode is made and then evicted each time),
    create and mkdir (in a subdirectory; each made object is removed again, untimed, by
    the filesystem's own unlink/rmdir), read (4 KiB of a file open read-only, its data in
    the page cache: a READ the daemon serves, as for a lower file of a writable overlay;
    one the io_uring serves is timed to its completion's reply, one that goes to a worker
    thread, rare, is not).

``--between`` says what happens, untimed, between two timed requests, so that the figures
can be set against those of a live daemon (2-3x these, on a VM, unless ``--between``):
    none   nothing: back to back, everything warm (the default);
    poll   a busy wait of ``--gap`` µs: the daemon's poll for the next request;
    wake   a write to a pipe that a process pinned to another CPU sleeps on, then the busy
           wait: the reply that wakes the caller, on another CPU, as in a live run;
    sleep  a sleep of ``--gap`` µs: the daemon's CPU goes idle, as when its poll runs out.
On a VM whose idle vCPUs halt (guest_halt_poll_ns=0), waking a halted vCPU costs the waker
a VM exit, and a vCPU that halted comes back with cold caches: on the 2-vCPU VM of
2026-12-05 (overlay, µs) getattr 8.8 / 10.9 / 15.0 / 31.1 and setattr-chown 21.6 / 28.0 /
31.0 / 70.8 for none / poll / wake / sleep. The waker runs on the other CPU (it pins
itself and this process); ``wake`` needs two CPUs.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from backingfs import fuse_abi as abi  # noqa: E402
from backingfs import uring  # noqa: E402
from backingfs.fsapi import ROOT_INO, DirEntry, Filesystem  # noqa: E402
from backingfs.native import NativeSession  # noqa: E402

OPS = ("getattr", "lookup", "lookup-enoent", "lookup-enoent-sub", "setattr-mode",
       "setattr-chown", "setattr-times", "getxattr", "readdirplus", "readdirplus-eof",
       "lookup-forget", "create", "mkdir", "read")


def request(op: int, nodeid: int, body: bytes = b"") -> bytes:
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), op, 1, nodeid, 0, 0,
                              os.getpid(), 0, 0) + body


def setattr_body(valid: int, *, mode: int = 0, atime: int = 0, mtime: int = 0) -> bytes:
    return abi.SETATTR_IN.pack(valid, 0, 0, 0, 0, atime, mtime, 0, 0, 0, 0, mode, 0, 0, 0, 0)


def make_fs(kind: str, scratch: Path) -> tuple[Filesystem, Path]:
    """The filesystem and the directory its root shows (where the test tree goes)."""
    if kind == "passthru":
        from passthru.superblock import PassthruFs
        src = scratch / "src"
        src.mkdir()
        return PassthruFs(str(src)), src
    from overlay.ops import OverlayFs
    from overlay.params import parse_params
    from overlay.superblock import Superblock
    for d in ("lower", "upper", "work", "mnt"):
        (scratch / d).mkdir()
    params = parse_params([("lowerdir", str(scratch / "lower")),
                           ("upperdir", str(scratch / "upper")),
                           ("workdir", str(scratch / "work"))], lambda _: None)
    return OverlayFs(Superblock.mount(params, str(scratch / "mnt"))), scratch / "upper"


def run_inline(s: NativeSession, data: bytes) -> None:
    """Dispatch one request and run its handler to completion, as the session's reader
    does, and its io_uring completion if it queued one (a READ the page cache could not
    serve at once); a handler that suspends is not what this tool measures."""
    coro = s._dispatch(data)
    try:
        coro.send(None)
    except StopIteration:
        ring = uring.ACTIVE
        while ring is not None and ring.pending:
            ring.reap()
        return
    coro.close()
    raise RuntimeError("the handler suspended: not a request the reader runs inline")


BETWEEN = ("none", "poll", "wake", "sleep")


class Between:
    """What happens between two timed requests (module docstring); ``__call__`` returns
    the seconds it took, which the loops leave out of their figures."""

    def __init__(self, mode: str, gap_us: float) -> None:
        self.mode, self.gap = mode, gap_us / 1e6
        self.waker: subprocess.Popen[bytes] | None = None
        if mode == "wake":
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})
            self.waker = subprocess.Popen(
                [sys.executable, "-c", "import os\n"
                 f"os.sched_setaffinity(0, {{{cpus[1]}}})\n"
                 "while os.read(0, 1):\n    pass\n"], stdin=subprocess.PIPE)

    def __call__(self) -> float:
        if self.mode == "none":
            return 0.0  # before the clock: this call is all that a "none" run adds
        t0 = time.perf_counter()
        if self.mode == "sleep":
            time.sleep(self.gap)
            return time.perf_counter() - t0
        if self.waker is not None:
            assert self.waker.stdin is not None
            os.write(self.waker.stdin.fileno(), b"x")
        end = t0 + self.gap
        while time.perf_counter() < end:
            pass
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.waker is not None:
            assert self.waker.stdin is not None
            self.waker.stdin.close()
            self.waker.wait()


def dispatch_loop(s: NativeSession, datas: tuple[bytes, ...], between: Between,
                  n: int) -> float:
    """Seconds for ``n`` rounds of dispatching ``datas``, ``between`` after each request
    and not counted."""
    t0 = time.perf_counter()
    left_out = 0.0
    for _ in range(n):
        for data in datas:
            run_inline(s, data)
            left_out += between()
    return time.perf_counter() - t0 - left_out


class Maker:
    """CREATE (and RELEASE) or MKDIR of a new name in directory ``parent``, timed; then,
    untimed, the object removed again by the filesystem itself and its inode forgotten,
    so that every round makes a new object in the same small directory."""

    def __init__(self, s: NativeSession, parent: int, kind: str, between: Between) -> None:
        self.s, self.parent, self.kind, self.between = s, parent, kind, between
        self.replies: list[bytes] = []
        send = s.reply

        def reply(unique: int, *payload: bytes | bytearray | memoryview) -> bool:
            self.replies.append(b"".join(bytes(p) for p in payload))
            return send(unique, *payload)
        s.reply = reply  # type: ignore[method-assign]

    def loop(self, n: int) -> float:
        s, name = self.s, b"made"
        if self.kind == "create":
            body = abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0, 0)
            make = request(abi.Op.CREATE, self.parent, body + name + b"\0")
        else:
            make = request(abi.Op.MKDIR, self.parent, abi.MKDIR_IN.pack(0o40755, 0)
                           + name + b"\0")
        spent = 0.0
        for _ in range(n):
            self.replies.clear()
            self.between()
            t0 = time.perf_counter()
            run_inline(s, make)
            spent += time.perf_counter() - t0
            if self.kind == "create":
                self.between()
                (fh,) = struct.unpack_from("=Q", self.replies[-1], abi.ENTRY_OUT_SIZE)
                t0 = time.perf_counter()
                run_inline(s, request(abi.Op.RELEASE, 0, abi.RELEASE_IN.pack(fh, 0, 0, 0)))
                spent += time.perf_counter() - t0
            (ino,) = struct.unpack_from("=Q", self.replies[0])
            op = abi.Op.UNLINK if self.kind == "create" else abi.Op.RMDIR
            run_inline(s, request(op, self.parent, name + b"\0"))
            run_inline(s, request(abi.Op.FORGET, ino, struct.pack("=Q", 1)))
        return spent


async def measure(kind: str, n: int, ops: list[str], profile: str | None,
                  where: str, between: Between) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="reqcost-", dir=where))
    try:
        fs, tree = make_fs(kind, scratch)
        (tree / "x").write_bytes(b"")
        (tree / "y").write_bytes(b"")
        (tree / "r").write_bytes(os.urandom(4096))
        (tree / "d").mkdir()
        for i in range(3):
            (tree / "d" / f"f{i}").write_bytes(b"")
        s = NativeSession(fs)
        s.fd = os.open(os.devnull, os.O_WRONLY)
        s.flags = abi.HANDLE_KILLPRIV_V2
        s.handleless_dirs = fs.handleless_dirs and fs.cache_dirs  # as INIT decides
        fs.node_ids = fs.bare_dots = True  # what the native session's INIT sets
        fs.init()
        x = (await fs.lookup(ROOT_INO, b"x", None)).ino
        d = (await fs.lookup(ROOT_INO, b"d", None)).ino
        for i in range(3):
            await fs.lookup(d, b"f%d" % i, None)
        y = (await fs.lookup(ROOT_INO, b"y", None)).ino
        await fs.forget([(y, 1)])
        r = (await fs.lookup(ROOT_INO, b"r", None)).ino
        opened: list[bytes] = []
        send = s.reply

        def keep(unique: int, *payload: bytes | bytearray | memoryview) -> bool:
            opened.append(b"".join(bytes(p) for p in payload))
            return True
        s.reply = keep  # type: ignore[method-assign]
        run_inline(s, request(abi.Op.OPEN, r, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
        s.reply = send  # type: ignore[method-assign]
        (fh,) = struct.unpack_from("=Q", opened[0])
        listing = abi.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)
        reqs: dict[str, tuple[bytes, ...]] = {
            "getattr": (request(abi.Op.GETATTR, x, abi.GETATTR_IN.pack(0, 0, 0)),),
            "lookup": (request(abi.Op.LOOKUP, ROOT_INO, b"x\0"),),
            "lookup-enoent": (request(abi.Op.LOOKUP, ROOT_INO, b"absent\0"),),
            "lookup-enoent-sub": (request(abi.Op.LOOKUP, d, b"absent\0"),),
            "setattr-mode": (request(abi.Op.SETATTR, x,
                                     setattr_body(abi.FATTR_MODE, mode=0o100644)),),
            "setattr-chown": (request(abi.Op.SETATTR, x,
                                      setattr_body(abi.FATTR_UID | abi.FATTR_GID)),),
            "setattr-times": (request(abi.Op.SETATTR, x,
                                      setattr_body(abi.FATTR_ATIME | abi.FATTR_MTIME,
                                                   atime=5, mtime=6)),),
            "getxattr": (request(abi.Op.GETXATTR, x, abi.GETXATTR_IN.pack(0, 0)
                                 + b"security.capability\0"),),
            "readdirplus": (request(abi.Op.READDIRPLUS, d, listing),),
            "read": (request(abi.Op.READ, r, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),),
            # y is made again by each lookup (a new inode number each time for overlay
            # would break the FORGET: both filesystems reuse y's number for its key).
            "lookup-forget": (request(abi.Op.LOOKUP, ROOT_INO, b"y\0"),
                              request(abi.Op.FORGET, y, struct.pack("=Q", 1))),
        }
        print(f"{kind}: µs per request in the daemon's Python (no kernel transport), "
              f"{n:,} each, best of 3"
              + ("" if between.mode == "none" else
                 f", {between.mode} {between.gap * 1e6:g} µs between requests"))
        async def listing_end() -> int:
            """The offset after the last entry of a fresh listing of d, as the filesystem
            numbers its listings (a backing cookie for passthru, a snapshot and position
            for overlay): what the kernel sends in the READDIRPLUS that ends it."""
            offs: list[int] = []

            def collect(entry: DirEntry) -> bool:
                offs.append(entry.next_off)
                return True
            await fs.readdir_inode(d, 0, collect)  # its references stay, as the inodes do
            return offs[-1]

        for op in ops:
            if op == "readdirplus-eof":  # right after its listing, as from the kernel
                reqs[op] = (request(abi.Op.READDIRPLUS, d, abi.READ_IN.pack(
                    0, await listing_end(), 4096, 0, 0, 0, 0)),)
            if op in ("create", "mkdir"):
                loop: Callable[[int], float] = Maker(s, d, op, between).loop
            else:
                datas = reqs[op]
                loop = functools.partial(dispatch_loop, s, datas, between)
            loop(max(1, n // 10))  # warm-up
            best = min(loop(n) for _ in range(3))
            print(f"  {op:16s} {1e6 * best / n:7.2f}", flush=True)
            if op == profile:
                prof = cProfile.Profile()
                prof.runcall(loop, n)
                stats = pstats.Stats(prof, stream=sys.stdout)
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
        # A READ the page cache could not serve at once went to a worker thread; its
        # completion comes through trio's loop, which the timed loops never yield to.
        await trio.sleep(0.2)
        os.close(s.fd)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reqcost.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__[__doc__.index("``--between``"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fs", choices=("passthru", "overlay"), default="passthru")
    p.add_argument("--n", type=int, default=20_000, help="requests per kind (default 20000)")
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument("--profile", metavar="OP", help="also run OP under cProfile")
    p.add_argument("--dir", default="/dev/shm",
                   help="where the scratch tree goes (default /dev/shm: a tmpfs, whose "
                        "speed does not drift the way ext4's creates do after many "
                        "unlinks)")
    p.add_argument("--between", choices=BETWEEN, default="none",
                   help="what happens, untimed, between two timed requests (below)")
    p.add_argument("--gap", type=float, default=30.0, metavar="US",
                   help="µs of --between poll/wake/sleep (default 30)")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS] + (
        [args.profile] if args.profile and args.profile not in OPS else [])
    if unknown:
        print(f"reqcost: unknown request kind {unknown[0]!r}; known: {', '.join(OPS)}",
              file=sys.stderr)
        return 2
    if args.n < 1:
        print("reqcost: --n must be at least 1", file=sys.stderr)
        return 2
    if not os.path.isdir(args.dir):
        print(f"reqcost: --dir {args.dir}: not a directory", file=sys.stderr)
        return 2
    if not 0 < args.gap <= 1e6:
        print("reqcost: --gap must be more than 0 and at most 1000000 µs", file=sys.stderr)
        return 2
    if args.between == "wake" and len(os.sched_getaffinity(0)) < 2:
        print("reqcost: --between wake needs two CPUs", file=sys.stderr)
        return 2
    between = Between(args.between, args.gap)
    try:
        trio.run(measure, args.fs, args.n, ops, args.profile, args.dir, between)
    finally:
        between.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
