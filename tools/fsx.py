"""fsx: a data-integrity exerciser that hammers ONE file through a mount with a random mix of
reads, writes, appends, truncates, shared-mmap writes and fsyncs, checking every result
against an in-memory model of what the file must hold.

    python tools/fsx.py [--target passthru|overlay-lower|native|...] [--opts OPTS]
                        [--seed N] [--ops N] [--maxlen BYTES] [--maxop BYTES]
                        [--check-every N] [--dir DIR] [--trace FILE] [--keep]
    python tools/fsx.py --path FILE ...            exercise FILE directly (no mount)
    python tools/fsx.py --replay TRACE [--trace FILE]   re-run a recorded trace

The target is mounted by this script through ``backingfs.testing`` (its own daemon only,
always unmounted in ``finally``); ``--opts`` adds ``-o OPTS`` to a FUSE target's daemon
(passthru: ``writeback``, ``cache=always``...; overlay: ``writeback=1``...). For targets with
a tree behind the mount (passthru's source, an overlay's lower layer) the file starts there
with random content, so the overlay targets exercise copy-up on the first open for write.

Operations (the model is a ``bytearray``; the trace names them):
    read      pread at a random offset (may start past EOF); compared with the model
    write     pwrite at a random offset (may leave a hole past EOF)
    append    write on a second fd opened O_APPEND: must land at the current EOF
    ftruncate / truncate   shrink or grow, via the fd or via the path
    mapwrite  MAP_SHARED mmap of the range (growing the file first with ftruncate when the
              range passes EOF), store bytes, optionally msync, munmap
    mapread   MAP_SHARED mmap of a range inside the file, compared with the model
    fsync     fsync or fdatasync
    reopen    close both fds and open them again (sometimes with O_SYNC)
Every ``--check-every`` ops (and at the end) the whole file is read back and its size
checked via fstat and via stat(path).

Written data comes from one random buffer built from the seed: each op records where in it
its bytes start, so a trace (a JSON header line with the seed and sizes, then one JSON line
per op) replays exactly. At the first mismatch the run stops with a report: op number, op,
offset, length, expected vs got around the first differing byte, the recent ops that
touched that byte, whether a re-read still differs, and (for our FUSE targets) what the
backing file holds.

Exit status: 0 clean, 1 corruption or an unexpected I/O error, 2 usage error, 3 the target
could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import random
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backingfs.testing import (  # noqa: E402
    TARGETS,
    Target,
    TargetMount,
    with_options,
)

PAGE = mmap.PAGESIZE
EXIT_OK, EXIT_CORRUPT, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
PROGRESS_EVERY = 10_000
TRACE_VERSION = 1
FILE_NAME = "fsx.data"

#: Relative frequency of each operation.
WEIGHTS: dict[str, int] = {
    "read": 20, "write": 20, "append": 8, "ftruncate": 5, "truncate": 5,
    "mapwrite": 8, "mapread": 5, "fsync": 3, "reopen": 2,
}


class Corruption(Exception):
    """The file disagreed with the model (or an op failed); ``report`` says how."""

    def __init__(self, report: str) -> None:
        super().__init__(report)
        self.report = report


# --- targets with extra -o options ---------------------------------------------------------
#
# testing.py's FUSE targets build their argv inside start(); these subclasses build the same
# layout with the extra options appended, so testing.py's API stays as it is.


def target_with_opts(name: str, opts: str | None) -> Target:
    """The registered target ``name``, with ``-o opts`` added when given."""
    base = TARGETS[name]
    if not opts:
        return base
    try:
        return with_options(base, tuple(opts.split(",")))
    except ValueError:
        raise UsageError(f"--opts applies to FUSE targets only, not {name}") from None


class UsageError(Exception):
    pass


# --- configuration, trace --------------------------------------------------------------------


@dataclass
class Config:
    seed: int
    ops: int
    maxlen: int
    maxop: int
    check_every: int
    initial_len: int
    target: str | None = None
    opts: str | None = None
    corrupt_after: int | None = None   # self-test: flip a model byte after this op

    def header(self) -> dict[str, Any]:
        return {"fsx_trace": TRACE_VERSION, "seed": self.seed, "ops": self.ops,
                "maxlen": self.maxlen, "maxop": self.maxop, "check_every": self.check_every,
                "initial_len": self.initial_len, "target": self.target, "opts": self.opts}


def data_pool(seed: int, maxlen: int) -> bytes:
    """The random bytes every written range is cut from (2x maxlen: any start < maxlen
    has room for any op length)."""
    return random.Random(f"fsx-data-{seed}").randbytes(2 * maxlen)


def initial_content(seed: int, length: int) -> bytes:
    return random.Random(f"fsx-initial-{seed}").randbytes(length)


def fmt_op(op: dict[str, Any]) -> str:
    extra = "".join(f" {k}={v}" for k, v in op.items() if k not in ("n", "op", "off", "len"))
    where = ""
    if "off" in op:
        where = f" off={op['off']:#x} len={op.get('len', 0):#x}"
        if op.get("len"):
            where += f" (to {op['off'] + op['len']:#x})"
    elif "len" in op:
        where = f" len={op['len']:#x}"
    return f"#{op['n']} {op['op']}{where}{extra}"


# --- op generation ---------------------------------------------------------------------------


class Generator:
    """Draws the next op from the seed and the current model size (both deterministic, so
    the same seed always yields the same op list)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.names = list(WEIGHTS)
        self.weights = [WEIGHTS[n] for n in self.names]

    def offset(self, size: int) -> int:
        """Mostly uniform, but a third of the time near EOF or a page boundary, where the
        bugs live."""
        r, m = self.rng.random(), self.cfg.maxlen
        if r < 0.15 and size:
            off = size + self.rng.randint(-64, 64)
        elif r < 0.3:
            off = self.rng.randrange(0, m, PAGE) + self.rng.choice((0, 0, -1, 1, -512))
        else:
            off = self.rng.randrange(m)
        return max(0, min(off, m - 1))

    def length(self, limit: int) -> int:
        r = self.rng.random()
        if r < 0.2:
            n = self.rng.randint(1, 16)
        elif r < 0.35:
            n = PAGE * self.rng.randint(1, 4)
        else:
            n = self.rng.randint(1, self.cfg.maxop)
        return max(1, min(n, limit))

    def next(self, n: int, size: int) -> dict[str, Any]:
        cfg = self.cfg
        name = self.rng.choices(self.names, self.weights)[0]
        op: dict[str, Any] = {"n": n, "op": name}
        if name in ("read", "write", "mapwrite"):
            op["off"] = off = self.offset(size)
            op["len"] = self.length(cfg.maxlen - off)
        if name == "mapread":
            if size == 0:
                op["op"] = "read"
                op["off"], op["len"] = 0, self.length(cfg.maxlen)
            else:
                op["off"] = off = self.rng.randrange(size)
                op["len"] = self.length(size - off)
        if name == "append":
            room = cfg.maxlen - size
            if room <= 0:
                op["op"] = "ftruncate"
                op["size"] = self.rng.randrange(cfg.maxlen)
            else:
                op["len"] = self.length(room)
        if name in ("ftruncate", "truncate"):
            r = self.rng.random()
            if r < 0.3 and size:
                new = size - self.rng.randint(1, min(size, PAGE * 2))
            elif r < 0.5:
                new = size + self.rng.randint(1, PAGE * 2)
            else:
                new = self.rng.randrange(cfg.maxlen + 1)
            op["size"] = max(0, min(new, cfg.maxlen))
        if op["op"] in ("write", "append", "mapwrite"):
            op["data"] = self.rng.randrange(cfg.maxlen)
        if name == "mapwrite":
            op["msync"] = self.rng.random() < 0.5
        if name == "fsync":
            op["datasync"] = self.rng.random() < 0.5
        if name == "reopen":
            op["sync"] = self.rng.random() < 0.2
        return op


# --- the exerciser ---------------------------------------------------------------------------


def hexline(b: bytes) -> str:
    return " ".join(f"{x:02x}" for x in b) or "(nothing)"


def first_diff(a: bytes, b: bytes) -> int | None:
    """The first index where a and b differ (a length difference counts), or None."""
    n = min(len(a), len(b))
    if a[:n] != b[:n]:
        lo, hi = 0, n
        # Bisect on slices: C-speed compares instead of a Python byte loop.
        while hi - lo > 64:
            mid = (lo + hi) // 2
            if a[lo:mid] != b[lo:mid]:
                hi = mid
            else:
                lo = mid
        for i in range(lo, hi):
            if a[i] != b[i]:
                return i
    return None if len(a) == len(b) else n


def diff_window(expected: bytes, got: bytes, base: int, i: int) -> str:
    """Expected vs got, 16 bytes either side of the first differing index ``i``."""
    lo = max(0, ((base + i - 16) & ~15) - base)   # rows start at 16-aligned file offsets
    hi = i + 16
    last_bad = i
    n = min(len(expected), len(got))
    j = i
    while j < n and j < i + 4096:
        if expected[j] != got[j]:
            last_bad = j
        j += 1
    lines = [f"  first difference at file offset {base + i:#x} "
             f"(last in the next 4 KiB at {base + last_bad:#x})",
             f"  expected [{base + lo:#x}..]: {hexline(expected[lo:hi])}",
             f"  got      [{base + lo:#x}..]: {hexline(got[lo:hi])}"]
    if len(expected) != len(got):
        lines.append(f"  lengths: expected {len(expected)}, got {len(got)}")
    return "\n".join(lines)


@dataclass
class Exerciser:
    cfg: Config
    path: str
    backing: list[str] = field(default_factory=list)   # where the bytes live behind a mount
    mount: TargetMount | None = None
    trace: TextIO | None = None
    model: bytearray = field(default_factory=bytearray)
    fd: int = -1
    afd: int = -1
    #: (op, file size before it): the recent past a report quotes.
    history: deque[tuple[dict[str, Any], int]] = field(
        default_factory=lambda: deque(maxlen=2000))
    counts: dict[str, int] = field(default_factory=dict)
    mmap_ok: bool = True
    pool: bytes = b""

    def __post_init__(self) -> None:
        self.pool = data_pool(self.cfg.seed, self.cfg.maxlen)

    # -- fds

    def open(self, sync: bool = False) -> None:
        extra = os.O_SYNC if sync else 0
        self.fd = os.open(self.path, os.O_RDWR | extra)
        self.afd = os.open(self.path, os.O_WRONLY | os.O_APPEND | extra)

    def close(self) -> None:
        for fd in (self.fd, self.afd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.afd = -1

    # -- execution

    def data_for(self, op: dict[str, Any]) -> bytes:
        return self.pool[op["data"]:op["data"] + op["len"]]

    def apply(self, op: dict[str, Any]) -> None:
        """Run ``op`` on the file and on the model, checking what it returns."""
        name, m = op["op"], self.model
        if name == "read":
            off, n = op["off"], op["len"]
            got = os.pread(self.fd, n, off)
            self.compare(op, bytes(m[off:off + n]), got, off)
        elif name == "write":
            data, off = self.data_for(op), op["off"]
            self.check_count(op, os.pwrite(self.fd, data, off), len(data))
            if off > len(m):
                m.extend(bytes(off - len(m)))
            m[off:off + len(data)] = data
        elif name == "append":
            data = self.data_for(op)
            self.check_count(op, os.write(self.afd, data), len(data))
            m.extend(data)
        elif name == "ftruncate":
            os.ftruncate(self.fd, op["size"])
            self.resize(op["size"])
        elif name == "truncate":
            os.truncate(self.path, op["size"])
            self.resize(op["size"])
        elif name == "mapwrite":
            self.mapwrite(op)
        elif name == "mapread":
            self.mapread(op)
        elif name == "fsync":
            (os.fdatasync if op["datasync"] else os.fsync)(self.fd)
        elif name == "reopen":
            self.close()
            self.open(op["sync"])
        else:
            raise UsageError(f"unknown op in trace: {name}")

    def resize(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def check_count(self, op: dict[str, Any], got: int, want: int) -> None:
        if got != want:
            raise Corruption(f"op {fmt_op(op)}: short write: {got} of {want} bytes")

    def map_range(self, off: int, n: int) -> tuple[int, int]:
        """The page-aligned mmap offset and length covering [off, off+n)."""
        start = off - off % PAGE
        return start, off + n - start

    def mapwrite(self, op: dict[str, Any]) -> None:
        off, data = op["off"], self.data_for(op)
        end = off + len(data)
        if not self.mmap_ok:
            return
        if end > len(self.model):
            # Pages past EOF would SIGBUS: grow the file first, as a real program must.
            os.ftruncate(self.fd, end)
            self.resize(end)
        start, length = self.map_range(off, len(data))
        try:
            mm = mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except OSError as e:
            if e.errno == errno.ENODEV:   # direct_io without shared-mmap support
                self.mmap_disabled(op)
                return
            raise
        try:
            mm[off - start:off - start + len(data)] = data
            if op["msync"]:
                mm.flush()
        finally:
            mm.close()
        self.model[off:end] = data

    def mapread(self, op: dict[str, Any]) -> None:
        off, n = op["off"], op["len"]
        if not self.mmap_ok:
            return
        start, length = self.map_range(off, n)
        try:
            mm = mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                           offset=start)
        except OSError as e:
            if e.errno == errno.ENODEV:
                self.mmap_disabled(op)
                return
            raise
        try:
            got = mm[off - start:off - start + n]
        finally:
            mm.close()
        self.compare(op, bytes(self.model[off:off + n]), got, off)

    def mmap_disabled(self, op: dict[str, Any]) -> None:
        self.mmap_ok = False
        print(f"fsx: op {op['n']}: mmap MAP_SHARED gives ENODEV (direct I/O?); "
              "mmap ops are skipped from here on", file=sys.stderr)

    # -- checks

    def compare(self, op: dict[str, Any], expected: bytes, got: bytes, base: int) -> None:
        i = first_diff(expected, got)
        if i is None:
            return
        raise Corruption(self.report(op, expected, got, base, i))

    def full_check(self, op: dict[str, Any]) -> None:
        size = len(self.model)
        fst = os.fstat(self.fd).st_size
        pst = os.stat(self.path).st_size
        if fst != size or pst != size:
            raise Corruption(
                f"size mismatch after {fmt_op(op)}:\n  model {size:#x}, fstat {fst:#x}, "
                f"stat(path) {pst:#x}\n" + self.recent_ops(None))
        got = self.read_all(self.fd, size + 1)
        i = first_diff(bytes(self.model), got)
        if i is not None:
            check = {"n": op["n"], "op": "full-check", "off": 0, "len": size}
            raise Corruption(self.report(check, bytes(self.model), got, 0, i))

    @staticmethod
    def read_all(fd: int, n: int) -> bytes:
        parts, off = [], 0
        while off < n:
            b = os.pread(fd, n - off, off)
            if not b:
                break
            parts.append(b)
            off += len(b)
        return b"".join(parts)

    def recent_ops(self, offset: int | None) -> str:
        """The last ops, or those that touched ``offset`` (writers and size changes)."""
        if offset is None:
            picked = [o for o, _ in self.history][-12:]
            title = "last ops"
        else:
            picked = [o for o, size in self.history if touches(o, size, offset)][-12:]
            title = f"recent ops touching {offset:#x} (of the last {len(self.history)})"
        return f"  {title}:\n" + "\n".join(f"    {fmt_op(o)}" for o in picked)

    def report(self, op: dict[str, Any], expected: bytes, got: bytes, base: int,
               i: int) -> str:
        lines = [f"CORRUPTION at op {fmt_op(op)}", f"  model size {len(self.model):#x}",
                 diff_window(expected, got, base, i), self.recent_ops(base + i)]
        lines.append(self.diagnose(base, len(expected)))
        return "\n".join(lines)

    def diagnose(self, base: int, n: int) -> str:
        """Post-mortem: does a re-read through the mount still differ, and what does the
        backing file hold (before and after an fsync)?"""
        out = []
        want = bytes(self.model[base:base + n])
        try:
            again = os.pread(self.fd, n, base)
            out.append("  re-read through the mount: "
                       + ("now matches (transient)" if again == want else "still differs"))
        except OSError as e:
            out.append(f"  re-read through the mount failed: {e}")
        for label in ("backing file", "backing file after fsync"):
            if label.endswith("fsync"):
                with contextlib.suppress(OSError):
                    os.fsync(self.fd)
            for path in self.backing:
                if not os.path.exists(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        whole = f.read()
                except OSError as e:
                    out.append(f"  {label} {path}: {e}")
                    break
                j = first_diff(bytes(self.model), whole)
                verdict = "matches the model" if j is None else f"first differs at {j:#x}"
                out.append(f"  {label} {path}: size {len(whole):#x}, {verdict}")
                break
        return "\n".join(out)

    # -- driving

    def setup_file(self) -> None:
        """Create or adopt the file; the model starts as what it holds."""
        try:
            with open(self.path, "rb") as f:
                self.model = bytearray(f.read())
        except FileNotFoundError:
            with open(self.path, "wb"):
                pass
            self.model = bytearray()

    def run(self, ops: Iterator[dict[str, Any]]) -> int:
        """Run every op; the number run. Raises Corruption at the first mismatch."""
        self.open()
        t0 = last = time.monotonic()
        done = 0
        try:
            for op in ops:
                self.history.append((op, len(self.model)))
                if self.trace is not None:
                    self.trace.write(json.dumps(op, separators=(",", ":")) + "\n")
                try:
                    self.apply(op)
                except OSError as e:
                    raise Corruption(f"op {fmt_op(op)} failed: {e}\n"
                                     + self.recent_ops(None)) from e
                done += 1
                self.counts[op["op"]] = self.counts.get(op["op"], 0) + 1
                if self.cfg.corrupt_after is not None and op["n"] >= self.cfg.corrupt_after \
                        and self.model:
                    # Self-test: the checker must notice a model that no longer matches.
                    k = op["n"] % len(self.model)
                    self.model[k] ^= 0xFF
                    self.cfg.corrupt_after = None
                    self.full_check(op)
                if done % self.cfg.check_every == 0:
                    self.full_check(op)
                if done % PROGRESS_EVERY == 0:
                    now = time.monotonic()
                    print(f"fsx: {done} ops, {PROGRESS_EVERY / (now - last):.0f} ops/s, "
                          f"size {len(self.model)}", file=sys.stderr, flush=True)
                    last = now
                    if self.trace is not None:
                        self.trace.flush()
                    self.check_daemon()
            if self.history:
                self.full_check(self.history[-1][0])
            self.check_daemon()
        finally:
            self.close()
        self.elapsed = time.monotonic() - t0
        return done

    def check_daemon(self) -> None:
        if self.mount is not None:
            why = self.mount.check_alive()
            if why:
                raise Corruption(f"daemon trouble: {why}")


def touches(op: dict[str, Any], size_before: int, offset: int) -> bool:
    """Whether ``op`` (run on a file of ``size_before`` bytes) set the byte at ``offset``:
    wrote it, or zero-filled it by growing the file past it, or cut it off."""
    name, end = op["op"], size_before
    if name in ("ftruncate", "truncate"):
        return min(size_before, op["size"]) <= offset
    if name == "append":
        return size_before <= offset < size_before + op["len"]
    if name in ("write", "mapwrite"):
        end = op["off"] + op["len"]
        return op["off"] <= offset < end or size_before <= offset < end
    return False


# --- main ------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text}") from None


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"fsx: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> Parser:
    p = Parser(prog="fsx.py", description="fsx-style data-integrity exerciser (see the "
               "module docstring).")
    p.add_argument("--target", help=f"one of {', '.join(TARGETS)} (default passthru)")
    p.add_argument("--opts", help="extra -o options for a FUSE target's daemon")
    p.add_argument("--path", help="exercise this file directly instead of mounting")
    p.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    p.add_argument("--ops", type=int, default=10_000, help="number of ops (default 10000)")
    p.add_argument("--maxlen", type=parse_size, default=256 * 1024,
                   help="maximum file size (default 256K)")
    p.add_argument("--maxop", type=parse_size, default=64 * 1024,
                   help="maximum length of one op (default 64K)")
    p.add_argument("--check-every", type=int, default=50,
                   help="full read-back and size check every N ops (default 50)")
    p.add_argument("--dir", help="base directory for the mount (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep --dir's contents afterwards")
    p.add_argument("--trace", help="write the replayable trace (JSON lines) here")
    p.add_argument("--replay", help="re-run the ops of this trace")
    p.add_argument("--self-test-corrupt", type=int, metavar="K", help=argparse.SUPPRESS)
    return p


def load_trace(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read trace {path}: {e}") from None
    if not lines or lines[0].get("fsx_trace") != TRACE_VERSION:
        raise UsageError(f"{path} is not an fsx trace (version {TRACE_VERSION})")
    return lines[0], lines[1:]


def make_config(args: argparse.Namespace) -> tuple[Config, list[dict[str, Any]] | None]:
    if args.replay:
        head, ops = load_trace(args.replay)
        cfg = Config(seed=head["seed"], ops=len(ops), maxlen=head["maxlen"],
                     maxop=head["maxop"], check_every=head["check_every"],
                     initial_len=head["initial_len"],
                     target=args.target or head.get("target"),
                     opts=args.opts if args.opts is not None else head.get("opts"))
        return cfg, ops
    if args.ops < 0 or args.maxlen < 1 or args.maxop < 1 or args.check_every < 1:
        raise UsageError("--ops must be >= 0; --maxlen, --maxop, --check-every >= 1")
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 1_000_000_007
    init = random.Random(f"fsx-initlen-{seed}").randrange(args.maxlen + 1)
    return Config(seed=seed, ops=args.ops, maxlen=args.maxlen, maxop=min(args.maxop, args.maxlen),
                  check_every=args.check_every, initial_len=init, target=args.target,
                  opts=args.opts), None


def generated(cfg: Config, ex: Exerciser) -> Iterator[dict[str, Any]]:
    gen = Generator(cfg)
    for n in range(1, cfg.ops + 1):
        yield gen.next(n, len(ex.model))


def replay_cmd(trace: str | None, cfg: Config) -> str:
    if trace:
        return f"python tools/fsx.py --replay {trace}"
    cmd = f"python tools/fsx.py --seed {cfg.seed} --ops {cfg.ops} --maxlen {cfg.maxlen} " \
          f"--maxop {cfg.maxop} --check-every {cfg.check_every}"
    if cfg.target:
        cmd += f" --target {cfg.target}"
    if cfg.opts:
        cmd += f" --opts {cfg.opts}"
    return cmd


def backing_candidates(base: Path, mount: TargetMount, rel: str) -> list[str]:
    """Where the file's bytes live behind the mount: an overlay's upper copy wins over the
    lower original; passthru's source."""
    out = [str(base / "upper" / rel)]
    if mount.data is not None:
        out.append(str(mount.data / rel))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, replay_ops = make_config(args)
        if args.path and (cfg.target or args.opts or args.dir):
            raise UsageError("--path runs without a mount: no --target, --opts or --dir")
        if not args.path:
            cfg.target = cfg.target or "passthru"
            if cfg.target not in TARGETS:
                raise UsageError(f"unknown target {cfg.target} (known: {', '.join(TARGETS)})")
            target = target_with_opts(cfg.target, cfg.opts)
    except UsageError as e:
        print(f"fsx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    cfg.corrupt_after = args.self_test_corrupt
    with open(args.trace, "w") if args.trace else contextlib.nullcontext() as trace:
        if trace is not None:
            trace.write(json.dumps(cfg.header()) + "\n")
        return run_target(args, cfg, None if args.path else target, trace, replay_ops)


def run_target(args: argparse.Namespace, cfg: Config, target: Target | None,
               trace: TextIO | None, replay_ops: list[dict[str, Any]] | None) -> int:
    """Set up the file (mounting ``target`` unless ``--path``), run, report, tear down."""
    ops_desc = f"seed {cfg.seed}, {cfg.ops} ops, maxlen {cfg.maxlen}, maxop {cfg.maxop}"
    mount: TargetMount | None = None
    base: Path | None = None
    made_base = False
    status = EXIT_OK
    try:
        if target is None:
            ex = Exerciser(cfg, os.path.abspath(args.path), trace=trace)
            where = args.path
        else:
            why = target.unavailable()
            if why:
                print(f"fsx: target {cfg.target} unavailable: {why}", file=sys.stderr)
                return EXIT_SETUP
            if args.dir:
                base = Path(args.dir).resolve() / f"fsx-{cfg.target}-{cfg.seed}-{os.getpid()}"
                base.mkdir(parents=True)
            else:
                base = Path(tempfile.mkdtemp(prefix=f"fsx-{cfg.target}-"))
            made_base = True
            try:
                mount = target.start(base)
            except Exception as e:
                print(f"fsx: cannot start target {cfg.target}: {e}", file=sys.stderr)
                return EXIT_SETUP
            initial = initial_content(cfg.seed, cfg.initial_len)
            workdir = mount.workdir("fsx", {FILE_NAME: initial} if mount.data else {})
            path = workdir / FILE_NAME
            if mount.data is None:
                path.write_bytes(initial)
            ex = Exerciser(cfg, str(path), mount=mount, trace=trace,
                           backing=backing_candidates(base, mount, f"fsx/{FILE_NAME}"))
            where = f"{cfg.target}{' -o ' + cfg.opts if cfg.opts else ''} ({path})"
        ex.setup_file()
        print(f"fsx: {where}: {ops_desc}, initial size {len(ex.model)}", file=sys.stderr,
              flush=True)
        ops = iter(replay_ops) if replay_ops is not None else generated(cfg, ex)
        try:
            done = ex.run(ops)
        except Corruption as c:
            status = EXIT_CORRUPT
            print(c.report, file=sys.stderr)
            print(f"fsx: FAILED ({ops_desc}); replay: {replay_cmd(args.trace, cfg)}",
                  file=sys.stderr, flush=True)
        else:
            rate = done / ex.elapsed if ex.elapsed > 0 else 0.0
            mix = ", ".join(f"{k} {v}" for k, v in sorted(ex.counts.items()))
            print(f"fsx: OK {done} ops in {ex.elapsed:.1f}s ({rate:.0f} ops/s), final size "
                  f"{len(ex.model)}; {mix}", file=sys.stderr, flush=True)
    finally:
        if mount is not None:
            try:
                mount.close()
            except Exception as e:
                print(f"fsx: unmount was not clean: {e}", file=sys.stderr)
                status = status or EXIT_CORRUPT
        if made_base and base is not None and not args.keep and mount_free(base):
            shutil.rmtree(base, ignore_errors=True)
    return status


def mount_free(base: Path) -> bool:
    """Nothing is still mounted under ``base`` (never rmtree through a live mount)."""
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo") as f:
        return not any(line.split()[4].startswith(prefix) for line in f)


if __name__ == "__main__":
    sys.exit(main())
