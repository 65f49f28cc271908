"""Benchmark: medians and speed ratios of passthru/overlay against native and their peers,
every target mounted by this script and measured in the same run.

Targets (``--targets``, comma-separated; ``NAME:OPT:OPT`` adds ``-o OPT,OPT`` to a FUSE CLI):
    native            a plain directory on the same filesystem (no mount)
    passthru          ``python -m passthru SRC MNT`` (its own defaults); variants
                      passthru-auto (-o cache=auto), passthru-always (-o cache=always),
                      passthru-never (-o cache=never), passthru-writeback (cache=always,writeback)
    pyfuse3-example   pyfuse3's examples/passthroughfs.py from the installed version's sdist
                      (pyfuse3-example-writeback adds --enable-writeback-cache)
    kernel-overlay    ``mount -t overlay`` (lowerdir = the data, fresh upperdir/workdir per run)
    fuse-overlayfs    /usr/bin/fuse-overlayfs, same layers
    overlay           ``python -m overlay -o lowerdir=,upperdir=,workdir= MNT``
    overlay-lpt       overlay with -o lower_passthrough (lower files by kernel passthrough;
                      fuse-overlayfs's copy-up semantics for files open at the copy-up)
    overlay-ro, kernel-overlay-ro, fuse-overlayfs-ro
                      the same without upperdir (the data over an empty second lower: a
                      read-only mount, where lower files can use kernel passthrough); read
                      workloads only
The directory targets mirror one data directory; the overlay targets use it as their single
lower layer, so read and copy-up workloads read lower files and every write lands in upper.
A target whose CLI does not exist yet (passthru, overlay) is skipped with a note.

Workloads (``--workloads``): seqwrite, seqread, randread, meta, tree, copyup (overlay targets
only), rtt (one request's round trip: statfs(2)). Each run of a (workload, target) pair gets a
fresh mount, and each run of a write workload a new ext4 filesystem for what it writes (a
loop device; ``ScratchFs`` says why; ``--shared-fs`` writes into --dir instead); runs are
interleaved across targets so background noise spreads evenly. Ratios are *speed* ratios
(>1 = faster than the reference), also for metrics measured in seconds.

Every mount is torn down in ``finally`` (fusermount3 -u / umount, then the lazy forms), and
only the daemon pids this script started are ever signalled; the daemons run in their own
session so a Ctrl-C reaches this script, which then unmounts them.

The timing drivers (``--driver``) run as a child interpreter so their Python work never
shares a GIL or a scheduler slot with this script's bookkeeping.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backingfs import fuse_uring  # noqa: E402
from backingfs.testing import (  # noqa: E402
    Mount,
    cli_argv,
    cli_env,
    drop_cache,
    is_fuse_mounted,
)

MiB = 1 << 20
DJANGO = "5.1.4"
GREP_ABSENT = "backingfs-bench-string-that-is-nowhere"
PEERS = ("pyfuse3-example", "kernel-overlay", "fuse-overlayfs", "kernel-overlay-ro",
         "fuse-overlayfs-ro")
DIR_FAMILY = "dir"
OVERLAY_FAMILY = "overlay"


# ---------------------------------------------------------------------------------------------
# progress and small helpers

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def run_quiet(argv: list[str], *, ok: tuple[int, ...] = (0,), timeout: float | None = None,
              cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, cwd=cwd)
    if r.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: "
                           f"{r.stderr.decode(errors='replace').strip()[-500:]}")
    return r


_OWN_DROPS = 0


def drop_caches() -> bool:
    """sync, then drop page cache, dentries and inodes (root only). False if refused."""
    global _OWN_DROPS
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    _OWN_DROPS += 1
    return True


def _vmstat_drops() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def external_drops() -> Iterator[list[int]]:
    """Counts drop_caches made by someone else while the block runs (into the yielded
    list): on a machine where something drops caches periodically, "warm" is not warm."""
    box: list[int] = []
    before, own = _vmstat_drops(), _OWN_DROPS
    try:
        yield box
    finally:
        box.append(_vmstat_drops() - before - (_OWN_DROPS - own))


def evict(*paths: Path) -> None:
    if not drop_caches():
        NOTES.add("drop_caches refused (not root?): cold runs rely on POSIX_FADV_DONTNEED only")
    for p in paths:
        drop_cache(p)


def ensure_apt(binary: str, package: str) -> bool:
    if shutil.which(binary):
        return True
    log(f"{binary} missing: apt-get install -y {package}")
    r = subprocess.run(["apt-get", "install", "-y", package], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        NOTES.add(f"apt-get install {package} failed: {r.stderr.decode(errors='replace')[-200:]}")
    return shutil.which(binary) is not None


class Notes:
    """Caveats collected during the run, printed once after the tables (deduplicated)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)
            log(f"note: {text}")


NOTES = Notes()


# ---------------------------------------------------------------------------------------------
# downloads into the cache directory (never into the repository)

def pip_download_sdist(name: str, version: str, cache: Path) -> Path | None:
    """The sdist of name==version in ``cache``, downloading it with pip when missing.
    ``--no-binary NAME`` rather than ``:all:``: the latter also builds pip's isolated
    build dependencies (setuptools, ...) from source, which takes many minutes."""
    cache.mkdir(parents=True, exist_ok=True)
    for pattern in (f"{name}-{version}.tar.gz", f"{name.capitalize()}-{version}.tar.gz"):
        hits = sorted(cache.glob(pattern))
        if hits:
            return hits[0]
    log(f"pip download {name}=={version} (sdist) into {cache}")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", name,
                        "--no-deps", "--disable-pip-version-check", "-q",
                        f"{name}=={version}", "-d", str(cache)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=600, cwd=str(cache))
    hits = sorted(p for p in cache.glob("*.tar.gz") if p.name.lower().startswith(
        f"{name.lower()}-{version}"))
    if r.returncode != 0 or not hits:
        NOTES.add(f"pip download {name}=={version} failed: "
                  f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        return None
    return hits[0]


def pyfuse3_example(cache: Path) -> Path | None:
    """examples/passthroughfs.py of the installed pyfuse3, extracted into the cache."""
    try:
        from importlib.metadata import version
        ver = version("pyfuse3")
    except Exception as e:  # noqa: BLE001 - any failure just means "no peer"
        NOTES.add(f"pyfuse3 not installed: {e}")
        return None
    dest = cache / f"pyfuse3-{ver}" / "passthroughfs.py"
    if dest.exists():
        return dest
    sdist = pip_download_sdist("pyfuse3", ver, cache)
    if sdist is None:
        return None
    with tarfile.open(sdist) as tar:
        member = tar.getmember(f"pyfuse3-{ver}/examples/passthroughfs.py")
        src = tar.extractfile(member)
        assert src is not None
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read())
    return dest


def django_tar(cache: Path) -> Path | None:
    """The Django sdist, decompressed once, so extraction times the filesystem, not gzip."""
    plain = cache / f"django-{DJANGO}.tar"
    if plain.exists():
        return plain
    sdist = pip_download_sdist("django", DJANGO, cache)
    if sdist is None:
        return None
    import gzip
    tmp = plain.with_suffix(".tmp")
    with gzip.open(sdist, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, MiB)
    tmp.rename(plain)
    return plain


# ---------------------------------------------------------------------------------------------
# mounts

class KernelMount:
    """A kernel mount made by this script; ``teardown`` is idempotent."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint

    def _mounted(self) -> bool:
        return os.path.ismount(self.mountpoint)

    def teardown(self) -> None:
        if self._mounted():
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            if r.returncode != 0 and self._mounted():
                NOTES.add(f"umount {self.mountpoint} failed, lazy unmount used")
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


class FuseMount:
    """A FUSE daemon started by this script (foreground, own session). ``teardown`` unmounts
    with fusermount3 -u and waits for the daemon; on any failure it falls back to
    ``Mount.force_cleanup`` (lazy unmount, then SIGTERM/SIGKILL of this pid only)."""

    def __init__(self, name: str, argv: list[str], mountpoint: Path, log_path: Path,
                 cwd: Path) -> None:
        self.name = name
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env=cli_env(), cwd=str(cwd), start_new_session=True)
        self.mount = Mount(str(mountpoint), proc.pid, proc, str(log_path))

    def wait_live(self) -> None:
        self.mount.wait_live(timeout=30.0)

    def teardown(self) -> None:
        m = self.mount
        try:
            if is_fuse_mounted(m.mountpoint):
                r = subprocess.run(["fusermount3", "-u", m.mountpoint], capture_output=True)
                if r.returncode != 0:
                    NOTES.add(f"{self.name}: fusermount3 -u failed: "
                              f"{r.stderr.decode(errors='replace').strip()}")
            if m.process is not None and m.process.poll() is None:
                status = m.wait_exit(15.0)
            else:
                status = m.process.returncode if m.process is not None else None
            if status not in (0, None):
                NOTES.add(f"{self.name}: daemon exited with status {status} after unmount")
        except (TimeoutError, subprocess.TimeoutExpired):
            NOTES.add(f"{self.name}: daemon did not exit after unmount; killed")
        finally:
            m.force_cleanup()


class ScratchFs:
    """A new ext4 filesystem on a loop device for one run of a write workload, mounted on
    ``mountpoint``; ``teardown`` (idempotent) unmounts it, detaches the loop device and
    deletes the image.

    Why: ext4's inode allocator passes over inodes freed in the last minutes, reading the
    inode table block of each (``recently_deleted()``), so once a run has unlinked 10,000
    files, creates on the same filesystem cost up to 0.7 ms instead of 20 µs for minutes
    (measured 2026-12-04, perf: 70% of create time in recently_deleted; a plain-directory
    create loop fell from 52,000/s to 1,800/s over six runs). On a shared filesystem the
    order of the targets decided their create, extract and copy-up figures."""

    def __init__(self, image: Path, mountpoint: Path, size: int) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.size = size
        self.device: str | None = None

    def setup(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size)  # sparse
        run_quiet(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                   str(self.image)], timeout=300)
        r = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(self.image)],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"losetup failed: {r.stderr.decode(errors='replace').strip()}")
        self.device = r.stdout.decode().strip()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        run_quiet(["mount", "-t", "ext4", self.device, str(self.mountpoint)], timeout=60)

    def teardown(self) -> None:
        if os.path.ismount(self.mountpoint):
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            if r.returncode != 0 and os.path.ismount(self.mountpoint):
                NOTES.add(f"umount {self.mountpoint} failed, lazy unmount used")
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if self.device is not None:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
            self.device = None
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()


def cpuidle_note() -> str | None:
    """How this machine's idle CPUs wake, when that is known: it sets the price of every
    FUSE request. A request wakes the daemon and its reply wakes the caller; when the
    CPU the woken task lands on has halted, the wake-up is an IPI plus, on a VM, an exit
    to the host. A guest's haltpoll driver polls before halting (guest_halt_poll_ns)."""
    base = Path("/sys/devices/system/cpu/cpuidle")
    try:
        driver = (base / "current_driver").read_text().strip()
    except OSError:
        return None
    note = f"cpuidle driver {driver}"
    try:
        ns = int(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text())
    except (OSError, ValueError):
        return note
    note += f", guest_halt_poll_ns={ns}"
    if ns == 0:
        note += (" (idle vCPUs halt at once: each wake-up of the daemon or of the caller "
                 "costs an IPI and a VM exit, paid twice per FUSE request unless the daemon "
                 "polls; see the rtt workload)")
    return note


HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


@contextlib.contextmanager
def guest_halt_polling(ns: int | None) -> Iterator[None]:
    """With ``ns``: idle vCPUs poll that long before halting, for the ``with`` block, then
    the machine's own value again (restored in ``finally``, also after Ctrl-C).

    Why: on a VM whose idle vCPUs halt at once (cpuidle_note), every FUSE request pays
    for waking a halted vCPU, on the daemon's side and on the caller's, and that wake-up
    costs more than a whole request's work in a C daemon. Which peer wins then depends on
    how often the scheduler happens to put caller and daemon on one vCPU. With polling,
    a wake-up costs about what it does on bare metal, and the figures compare what each
    daemon itself spends (measured 2026-12-05: passthru creates 3,177 → 6,790/s,
    fuse-overlayfs 2,199 → 9,637/s). It changes the whole machine: a measurement
    option, never a default."""
    if ns is None:
        yield
        return
    try:
        old = HALT_POLL_NS.read_text().strip()
        HALT_POLL_NS.write_text(str(ns))
    except OSError as e:
        raise SystemExit(f"bench: --halt-poll-ns: cannot set {HALT_POLL_NS}: "
                         f"{e.strerror or e}") from None
    NOTES.add(f"guest_halt_poll_ns set to {ns} for this run (machine value {old}, restored "
              "after it)")
    try:
        yield
    finally:
        HALT_POLL_NS.write_text(old)


def fresh_fs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in ("mkfs.ext4", "losetup", "mount") if shutil.which(t) is None]
    return f"missing {', '.join(missing)}" if missing else None


@contextlib.contextmanager
def fresh_fs(base: Path, size: int) -> Iterator[Path]:
    """A ScratchFs under ``base`` for the ``with`` block; its mounted root is yielded."""
    fs = ScratchFs(base / "fresh.img", base / "fresh", size)
    _LIVE.append(fs)
    try:
        fs.setup()
        yield fs.mountpoint
    finally:
        fs.teardown()
        _LIVE.remove(fs)


_LIVE: list[KernelMount | FuseMount | ScratchFs] = []


def teardown_all() -> None:
    while _LIVE:
        _LIVE.pop().teardown()


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# targets

@dataclass
class RunDirs:
    """Where one run of one workload happens. ``root`` is what the workload sees; ``data`` the
    backing copy of the prepared read data (the passthru source / the overlay lower layer)."""
    root: Path
    data: Path


@dataclass
class Target:
    name: str
    family: str                       # DIR_FAMILY or OVERLAY_FAMILY
    kind: str                         # native, passthru, pyfuse3, kernel-overlay, ...
    options: list[str] = field(default_factory=list)   # extra -o options (FUSE CLIs)
    skip: str | None = None           # why it cannot run here
    read_only: bool = False           # overlay over the lower layer alone, no upper

    @contextlib.contextmanager
    def mounted(self, data: Path, scratch: Path,
                fresh: Path | None = None) -> Iterator[RunDirs]:
        """Mount over ``data`` (fresh mountpoint/upper/work under ``scratch``), yield, always
        tear down; then remove whatever the run wrote (``data/out``, or the upper layer).

        ``fresh``: a new filesystem (ScratchFs) for what the run writes: the plain directory
        and the passthru source are there (write workloads read no prepared data), the
        overlays' upper and work dirs too, over a lower layer ``data`` the caller made
        there (``Workload.lower_data``)."""
        scratch.mkdir(parents=True, exist_ok=True)
        mnt = scratch / "mnt"
        layers = ""
        layer_dir = scratch if fresh is None else fresh
        if fresh is not None and self.family == DIR_FAMILY:
            data = fresh
        try:
            if self.kind == "native":
                yield RunDirs(data, data)
                return
            mnt.mkdir(exist_ok=True)
            if self.family == OVERLAY_FAMILY and self.read_only:
                # The kernel wants two lower layers when there is no upper: an empty one.
                (scratch / "empty").mkdir(exist_ok=True)
                layers = f"lowerdir={data}:{scratch / 'empty'}"
            elif self.family == OVERLAY_FAMILY:
                upper, work = layer_dir / "upper", layer_dir / "work"
                upper.mkdir()
                work.mkdir()
                layers = f"lowerdir={data},upperdir={upper},workdir={work}"
            handle: KernelMount | FuseMount
            if self.kind == "kernel-overlay":
                handle = KernelMount(mnt)
                _LIVE.append(handle)
                run_quiet(["mount", "-t", "overlay", "overlay", "-o", layers, str(mnt)])
            else:
                argv = self._fuse_argv(data, mnt, layers)
                handle = FuseMount(self.name, argv, mnt, scratch / "daemon.log", scratch)
                with (fuse_uring.kernel_offers_uring() if "uring=on" in self.options
                      else contextlib.nullcontext()):
                    _LIVE.append(handle)
                    handle.wait_live()
                    os.stat(mnt)  # returns once INIT is answered: io_uring negotiated
            try:
                yield RunDirs(mnt, data)
            finally:
                handle.teardown()
                _LIVE.remove(handle)
        finally:
            shutil.rmtree(data / "out", ignore_errors=True)
            for sub in ("upper", "work", "mnt", "empty"):
                p = scratch / sub
                if p.exists() and not os.path.ismount(p):
                    shutil.rmtree(p, ignore_errors=True)

    def _fuse_argv(self, data: Path, mnt: Path, layers: str) -> list[str]:
        opts = ",".join(([layers] if layers else []) + self.options)
        o = ["-o", opts] if opts else []
        if self.kind == "passthru":
            return cli_argv("passthru", "-f", *o, str(data), str(mnt))
        if self.kind == "overlay":
            return cli_argv("overlay", "-f", *o, str(mnt))
        if self.kind == "fuse-overlayfs":
            return ["fuse-overlayfs", "-f", *o, str(mnt)]
        if self.kind == "pyfuse3":
            # The example takes SOURCE MOUNTPOINT [--enable-writeback-cache] and always runs
            # in the foreground; it has no -o.
            example = str(ARGS_CACHE["pyfuse3-example"])
            flags = ["--enable-writeback-cache"] if "writeback" in self.options else []
            return [sys.executable, example, str(data), str(mnt), *flags]
        raise ValueError(self.kind)


ARGS_CACHE: dict[str, Path] = {}

_VARIANTS = {
    "passthru": ("passthru", []),
    "passthru-auto": ("passthru", ["cache=auto"]),
    "passthru-always": ("passthru", ["cache=always"]),
    "passthru-never": ("passthru", ["cache=never"]),
    "passthru-writeback": ("passthru", ["cache=always", "writeback"]),
    "pyfuse3-example": ("pyfuse3", []),
    "pyfuse3-example-writeback": ("pyfuse3", ["writeback"]),
    "native": ("native", []),
    "kernel-overlay": ("kernel-overlay", []),
    "fuse-overlayfs": ("fuse-overlayfs", []),
    "overlay": ("overlay", []),
    # the other front-end and the native one without kernel passthrough, for comparison
    "passthru-pyfuse3": ("passthru", ["cache=auto", "session=pyfuse3"]),
    "passthru-nopt": ("passthru", ["cache=auto", "passthrough=off"]),
    "overlay-pyfuse3": ("overlay", ["session=pyfuse3"]),
    "overlay-nopt": ("overlay", ["passthrough=off"]),
    "overlay-lpt": ("overlay", ["lower_passthrough"]),
    # FUSE over io_uring (the bench turns the fuse module's enable_uring on for the mount)
    "passthru-uring": ("passthru", ["cache=auto", "uring=on"]),
    "overlay-uring": ("overlay", ["uring=on"]),
    "overlay-ro": ("overlay", []),
    "kernel-overlay-ro": ("kernel-overlay", []),
    "fuse-overlayfs-ro": ("fuse-overlayfs", []),
}
DEFAULT_TARGETS = ("native,passthru-auto,passthru-always,passthru-pyfuse3,pyfuse3-example,"
                   "kernel-overlay,fuse-overlayfs,overlay,overlay-pyfuse3")


def make_target(spec: str, cache: Path) -> Target:
    """``NAME`` or ``NAME:OPT:OPT`` (extra -o options for a FUSE CLI)."""
    base, *extra = spec.split(":")
    if base not in _VARIANTS:
        raise SystemExit(f"bench: unknown target {base!r}; known: {', '.join(_VARIANTS)}")
    kind, opts = _VARIANTS[base]
    if extra and kind in ("native", "kernel-overlay"):
        raise SystemExit(f"bench: target {base} takes no options")
    family = OVERLAY_FAMILY if kind in ("kernel-overlay", "fuse-overlayfs", "overlay") \
        else DIR_FAMILY
    t = Target(spec, family, kind, [*opts, *extra], read_only=base.endswith("-ro"))
    if kind in ("passthru", "overlay"):
        if importlib.util.find_spec(f"{kind}.__main__") is None:
            t.skip = f"`python -m {kind}` does not exist yet ({kind}/__main__.py missing)"
    elif kind == "pyfuse3":
        example = pyfuse3_example(cache)
        if example is None:
            t.skip = "pyfuse3 example unavailable (see notes)"
        else:
            ARGS_CACHE["pyfuse3-example"] = example
    elif kind == "fuse-overlayfs":
        if not ensure_apt("fuse-overlayfs", "fuse-overlayfs"):
            t.skip = "fuse-overlayfs not installed"
    elif kind == "kernel-overlay" and os.geteuid() != 0:
        t.skip = "mount -t overlay needs root"
    return t


# ---------------------------------------------------------------------------------------------
# timing drivers (run in a child interpreter: `bench.py --driver NAME ...`, JSON on stdout)

def _fill_block(seed: int) -> bytes:
    block = bytearray(os.urandom(MiB))
    block[:8] = seed.to_bytes(8, "little")
    return bytes(block)


def driver_seqwrite(path: str, size: int, bs: int) -> dict[str, float]:
    block = _fill_block(0)[:bs]
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        next_report = 256 * MiB
        while done < size:
            done += os.write(fd, block[: min(bs, size - done)])
            if done >= next_report:
                log(f"  seqwrite {fmt_size(done)} / {fmt_size(size)}")
                next_report += 256 * MiB
        t_written = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    t_end = time.perf_counter()
    return {"seconds": t_end - t0, "write_seconds": t_written - t0, "bytes": done}


def driver_seqread(path: str, bs: int) -> dict[str, float]:
    buf = bytearray(bs)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    done = 0
    try:
        while n := os.readv(fd, [buf]):
            done += n
    finally:
        os.close(fd)
    return {"seconds": time.perf_counter() - t0, "bytes": done}


def driver_meta(directory: str, n: int, passes: int) -> dict[str, float]:
    d = Path(directory)
    d.mkdir(parents=True)
    names = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for p in names:
        os.close(os.open(p, flags, 0o644))
    out["create"] = time.perf_counter() - t0
    for p in names:             # warm-up pass: the stat workload is the warm, repeated case
        os.stat(p)
    t0 = time.perf_counter()
    for _ in range(passes):
        for p in names:
            os.stat(p)
    out["stat"] = (time.perf_counter() - t0) / passes
    listed = len(os.listdir(directory))
    assert listed == n, (listed, n)
    t0 = time.perf_counter()
    for _ in range(passes):
        os.listdir(directory)
    out["readdir"] = (time.perf_counter() - t0) / passes
    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    out["unlink"] = time.perf_counter() - t0
    return out


def driver_copyup(small_dir: str, big: str) -> dict[str, float]:
    names = sorted(os.listdir(small_dir))
    t0 = time.perf_counter()
    for name in names:
        fd = os.open(os.path.join(small_dir, name), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"+")
        finally:
            os.close(fd)
    append = time.perf_counter() - t0
    t0 = time.perf_counter()
    fd = os.open(big, os.O_WRONLY)
    try:
        os.pwrite(fd, b"+", 0)
    finally:
        os.close(fd)
    return {"append": append, "files": len(names), "first_write": time.perf_counter() - t0}


def driver_rtt(path: str, n: int) -> dict[str, float]:
    for _ in range(n // 10):  # warm-up: the daemon's caches, the CPUs' frequency
        os.statvfs(path)
    t0 = time.perf_counter()
    for _ in range(n):
        os.statvfs(path)
    return {"seconds": time.perf_counter() - t0}


DRIVERS: dict[str, Callable[..., dict[str, float]]] = {
    "rtt": lambda p, n: driver_rtt(p, int(n)),
    "seqwrite": lambda p, size, bs: driver_seqwrite(p, int(size), int(bs)),
    "seqread": lambda p, bs: driver_seqread(p, int(bs)),
    "meta": lambda d, n, passes: driver_meta(d, int(n), int(passes)),
    "copyup": driver_copyup,
}


def run_driver(name: str, *args: object) -> dict[str, float]:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--driver", name,
                        *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       check=True)
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------
# workloads

@dataclass
class Metric:
    name: str
    unit: str
    higher_is_better: bool


@dataclass
class Config:
    size: int
    files: int
    runs: int
    fio_runtime: int
    copyup_files: int
    copyup_big: int
    stat_passes: int
    cache: Path
    #: fio's fadvise_hint (FADV_RANDOM for randread). Kernel passthrough does not pass
    #: fadvise on to the backing file, whose readahead then reads large folios per miss:
    #: cold passthrough reads look faster than native. 0 compares everyone without it.
    fadvise: bool = True
    #: Bytes of the new filesystem each run of a write workload gets (ScratchFs); 0: runs
    #: write into --dir, on the filesystem it is on.
    fresh_fs: int = 0


class Workload:
    name = ""
    families: tuple[str, ...] = (DIR_FAMILY, OVERLAY_FAMILY)
    writes = True  # False: runs on the read-only targets too
    metrics: tuple[Metric, ...] = ()
    #: Subtrees of the data an overlay run on a new filesystem (ScratchFs) needs in its
    #: lower layer: copied there, so that all layers share one filesystem as usual (a
    #: copy-up across filesystems can use neither copy_file_range nor a reflink).
    lower_data: tuple[str, ...] = ()

    def describe(self, cfg: Config) -> str:
        return ""

    def prepare(self, data: Path, cfg: Config) -> None:
        """Create the read data in the shared data directory (idempotent)."""

    def available(self, cfg: Config) -> str | None:
        return None

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        raise NotImplementedError


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"preparing {path} ({fmt_size(size)})")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for i in range(0, size, MiB):
            f.write(_fill_block(i)[: min(MiB, size - i)])
            if i and i % (256 * MiB) == 0:
                log(f"  {fmt_size(i)} / {fmt_size(size)}")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


class SeqWrite(Workload):
    name = "seqwrite"
    metrics = (Metric("write+fsync", "MiB/s", True), Metric("write", "MiB/s", True))

    def describe(self, cfg: Config) -> str:
        return (f"create a new file, write {fmt_size(cfg.size)} in 1 MiB write(2)s, fsync, "
                "close; timed open..close, and open..last write (pyfuse3's example implements "
                "no fsync: ENOSYS makes the kernel skip it, so compare it on \"write\")")

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        out = dirs.root / "out"
        out.mkdir()
        r = run_driver("seqwrite", out / "seq.bin", cfg.size, MiB)
        return {"write+fsync": r["bytes"] / MiB / r["seconds"],
                "write": r["bytes"] / MiB / r["write_seconds"]}


class SeqRead(Workload):
    name = "seqread"
    writes = False
    metrics = (Metric("cold", "MiB/s", True), Metric("warm", "MiB/s", True))

    def describe(self, cfg: Config) -> str:
        return (f"read a {fmt_size(cfg.size)} file (lower layer for overlays) with 1 MiB "
                "read(2)s; cold = after sync + drop_caches + FADV_DONTNEED on backing and "
                "mounted file; warm = the same read again after an untimed full read")

    def prepare(self, data: Path, cfg: Config) -> None:
        make_file(data / "big.bin", cfg.size)

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        path = dirs.root / "big.bin"
        evict(dirs.data / "big.bin", path)
        cold = run_driver("seqread", path, MiB)
        run_driver("seqread", path, MiB)
        warm = run_driver("seqread", path, MiB)
        return {"cold": cold["bytes"] / MiB / cold["seconds"],
                "warm": warm["bytes"] / MiB / warm["seconds"]}


def run_fio(path: Path, size: int, engine: str, depth: int, runtime: int,
            cold: bool, fadvise: bool = True) -> dict[str, float]:
    argv = ["fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread",
            f"--fadvise_hint={int(fadvise)}",
            "--bs=4k", f"--size={size}", f"--ioengine={engine}", f"--iodepth={depth}",
            "--direct=0", f"--invalidate={1 if cold else 0}", f"--runtime={runtime}",
            "--randrepeat=0", "--output-format=json"]
    # Cold: a random map, so no block is read twice and every read misses the page cache
    # (fadvise_hint=1, fio's default, also turns readahead off, except on a kernel
    # passthrough file: see Config.fadvise); the job ends after one pass
    # or the runtime, whichever comes first. Warm: time-based, repeats allowed.
    argv += [] if cold else ["--time_based", "--norandommap"]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=runtime * 10
                       + 120)
    text = r.stdout.decode(errors="replace")
    if r.returncode != 0 or "{" not in text:
        raise RuntimeError(f"fio failed ({r.returncode}): "
                           f"{r.stderr.decode(errors='replace')[-400:]}{text[-400:]}")
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    return {"iops": float(job["read"]["iops"]), "bw": float(job["read"]["bw_bytes"])}


class RandRead(Workload):
    name = "randread"
    writes = False
    metrics = (Metric("psync qd1 cold", "IOPS", True), Metric("io_uring qd16 cold", "IOPS", True),
               Metric("psync qd1 warm", "IOPS", True), Metric("io_uring qd16 warm", "IOPS", True))

    def describe(self, cfg: Config) -> str:
        return (f"fio 4 KiB randread, buffered (direct=0), over a {fmt_size(cfg.size)} file "
                "(lower layer for overlays); cold = sync + drop_caches + FADV_DONTNEED on "
                "backing and mounted file, then fio --invalidate=1 with a random map (each "
                f"block read at most once: every read misses), one pass or {cfg.fio_runtime} s; "
                f"warm = after an untimed full read, --invalidate=0, {cfg.fio_runtime} s "
                "time-based; " + ("FADV_RANDOM (fio's fadvise_hint=1), which kernel "
                                  "passthrough does not pass on to the backing file"
                                  if cfg.fadvise else "no FADV_RANDOM (--no-fadvise)"))

    def available(self, cfg: Config) -> str | None:
        return None if ensure_apt("fio", "fio") else "fio not installed"

    def prepare(self, data: Path, cfg: Config) -> None:
        make_file(data / "big.bin", cfg.size)

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        path = dirs.root / "big.bin"
        out: dict[str, float] = {}
        for engine, depth in (("psync", 1), ("io_uring", 16)):
            evict(dirs.data / "big.bin", path)
            out[f"{engine} qd{depth} cold"] = run_fio(path, cfg.size, engine, depth,
                                                      cfg.fio_runtime, True,
                                                      cfg.fadvise)["iops"]
        run_driver("seqread", path, MiB)
        for engine, depth in (("psync", 1), ("io_uring", 16)):
            out[f"{engine} qd{depth} warm"] = run_fio(path, cfg.size, engine, depth,
                                                      cfg.fio_runtime, False,
                                                      cfg.fadvise)["iops"]
        return out


class Meta(Workload):
    name = "meta"
    metrics = (Metric("create", "files/s", True), Metric("stat", "stats/s", True),
               Metric("readdir", "entries/s", True), Metric("unlink", "files/s", True))

    def describe(self, cfg: Config) -> str:
        return (f"in a new directory: create (open O_CREAT|O_EXCL + close) {cfg.files} empty "
                f"files; stat each by path, warm: one untimed pass then {cfg.stat_passes} "
                f"timed passes; readdir: os.listdir of the {cfg.files}-entry dir, one untimed "
                f"then {cfg.stat_passes} timed; unlink each")

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        (dirs.root / "out").mkdir()
        r = run_driver("meta", dirs.root / "out" / "meta", cfg.files, cfg.stat_passes)
        return {k: cfg.files / r[k] for k in ("create", "stat", "readdir", "unlink")}


class Tree(Workload):
    name = "tree"
    metrics = (Metric("extract", "s", False), Metric("find", "s", False),
               Metric("du -s", "s", False), Metric("grep -r", "s", False),
               Metric("rm -rf", "s", False), Metric("total", "s", False))

    def describe(self, cfg: Config) -> str:
        return (f"Django {DJANGO} sdist (decompressed .tar): tar -xf into a new dir, sync "
                "(untimed), then find DIR, du -s DIR, grep -r ABSENT-STRING DIR (reads every "
                "file), rm -rf DIR; all warm, outputs to /dev/null")

    def available(self, cfg: Config) -> str | None:
        return None if django_tar(cfg.cache) else "Django sdist unavailable (see notes)"

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        tar = django_tar(cfg.cache)
        assert tar is not None
        out = dirs.root / "out"
        out.mkdir()
        tree = out / f"django-{DJANGO}"
        res: dict[str, float] = {}

        def timed(metric: str, argv: list[str], ok: tuple[int, ...] = (0,)) -> None:
            t0 = time.perf_counter()
            run_quiet(argv, ok=ok, timeout=3600)
            res[metric] = time.perf_counter() - t0

        timed("extract", ["tar", "-xf", str(tar), "-C", str(out)])
        if not tree.is_dir():
            tree = next(p for p in out.iterdir() if p.is_dir())
        os.sync()
        timed("find", ["find", str(tree)])
        timed("du -s", ["du", "-s", str(tree)])
        timed("grep -r", ["grep", "-r", GREP_ABSENT, str(tree)], ok=(1,))
        timed("rm -rf", ["rm", "-rf", str(tree)])
        res["total"] = sum(res.values())
        return res


class Rtt(Workload):
    """The floor under every metadata figure: what one request costs a target end to end.

    statfs(2) is answered by no kernel cache on a FUSE mount (each call is one STATFS
    request), every daemon implements it with one statvfs of its backing fs, and on a
    plain directory or kernel overlayfs it is one syscall. Its rate is therefore the
    round trip of each daemon (kernel transport, wake-ups, per-request overhead) against
    the same syscall without FUSE. GETXATTR would do as well but pyfuse3's example has no
    xattr handlers (ENOSYS: the kernel then answers xattr calls itself)."""
    name = "rtt"
    writes = False
    metrics = (Metric("statfs", "calls/s", True),)
    calls = 20_000

    def describe(self, cfg: Config) -> str:
        return (f"{self.calls:,} statfs(2) of the mount root after {self.calls // 10:,} "
                "untimed: each is one STATFS request on a FUSE mount, so this is the "
                "round trip of a request through each daemon, the floor under every "
                "metadata figure (1e6 / rate = µs per request)")

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        r = run_driver("rtt", dirs.root, self.calls)
        return {"statfs": self.calls / r["seconds"]}


class CopyUp(Workload):
    name = "copyup"
    families = (OVERLAY_FAMILY,)
    lower_data = ("copyup",)
    metrics = (Metric("append 1 B", "files/s", True), Metric("first write big", "s", False))

    def describe(self, cfg: Config) -> str:
        return (f"overlay targets only; lower files warm in the page cache: open O_APPEND + "
                f"write 1 byte + close on each of {cfg.copyup_files} 16 KiB lower files; then "
                f"open O_WRONLY + pwrite 1 byte at 0 + close on a {fmt_size(cfg.copyup_big)} "
                "lower file (the copy-up of the whole file)")

    def prepare(self, data: Path, cfg: Config) -> None:
        small = data / "copyup" / "small"
        if not small.is_dir() or len(os.listdir(small)) != cfg.copyup_files:
            shutil.rmtree(small, ignore_errors=True)
            small.mkdir(parents=True)
            log(f"preparing {cfg.copyup_files} lower files in {small}")
            block = os.urandom(16 << 10)
            for i in range(cfg.copyup_files):
                (small / f"f{i:05d}").write_bytes(block)
        make_file(data / "copyup" / "big.bin", cfg.copyup_big)

    def run(self, dirs: RunDirs, cfg: Config) -> dict[str, float]:
        # Warm: copy-up speed, not disk speed (the disk is shared and noisy here).
        run_quiet(["cat", *map(str, (dirs.data / "copyup" / "small").iterdir()),
                   str(dirs.data / "copyup" / "big.bin")])
        r = run_driver("copyup", dirs.root / "copyup" / "small", dirs.root / "copyup" / "big.bin")
        return {"append 1 B": r["files"] / r["append"], "first write big": r["first_write"]}


WORKLOADS: dict[str, Workload] = {w.name: w for w in (SeqWrite(), SeqRead(), RandRead(), Meta(),
                                                       Tree(), CopyUp(), Rtt())}


# ---------------------------------------------------------------------------------------------
# results

Results = dict[str, dict[str, dict[str, list[float]]]]   # workload -> metric -> target -> values
#: workload -> target -> external drop_caches seen during each run
disturbed: dict[str, dict[str, list[int]]] = {}


def speed_ratio(metric: Metric, value: float, ref: float) -> float:
    if metric.higher_is_better:
        return value / ref if ref else float("inf")
    return ref / value if value else float("inf")


def fmt_num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if x < 1 else f"{x:.2f}"


def render(results: Results, targets: list[Target], cfg: Config) -> str:
    lines: list[str] = []
    order = [t.name for t in targets]
    for wname, per_metric in results.items():
        w = WORKLOADS[wname]
        lines.append(f"## {wname}\n\n{w.describe(cfg)}\n")
        ext = {t: sum(v) for t, v in disturbed.get(wname, {}).items() if sum(v)}
        if ext:
            lines.append("External drop_caches during these runs (warm figures may be cold): "
                         + ", ".join(f"{t} {n}" for t, n in ext.items()) + ".\n")
        for metric in w.metrics:
            per_target = per_metric.get(metric.name, {})
            if not per_target:
                continue
            medians = {t: statistics.median(v) for t, v in per_target.items() if v}
            refs = [r for r in ("native", *PEERS) if r in medians]
            better = "higher" if metric.higher_is_better else "lower"
            lines.append(f"### {wname}: {metric.name} ({metric.unit}, {better} is better)\n")
            lines.append("| target | median | runs (min–max) | "
                         + " | ".join(f"× {r}" for r in refs) + " |")
            lines.append("|---" * (3 + len(refs)) + "|")
            for t in order:
                if t not in medians:
                    continue
                vals = per_target[t]
                spread = (f"{len(vals)} ({fmt_num(min(vals))}–{fmt_num(max(vals))})"
                          if len(vals) > 1 else "1")
                ratios = [f"{speed_ratio(metric, medians[t], medians[r]):.2f}" for r in refs]
                lines.append(f"| {t} | {fmt_num(medians[t])} | {spread} | "
                             + " | ".join(ratios) + " |")
            lines.append("")
    overlap = async_overlap(results)
    if overlap:
        lines.append("## async overlap (cold io_uring qd16 IOPS / cold psync qd1 IOPS; "
                     "target ≥ 3×)\n")
        lines.append("| target | psync qd1 | io_uring qd16 | ratio | ≥ 3× |")
        lines.append("|---|---|---|---|---|")
        for t in order:
            if t in overlap:
                p, u, ratio = overlap[t]
                lines.append(f"| {t} | {fmt_num(p)} | {fmt_num(u)} | {ratio:.2f} | "
                             f"{'yes' if ratio >= 3 else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def async_overlap(results: Results) -> dict[str, tuple[float, float, float]]:
    rr = results.get("randread", {})
    psync, uring = rr.get("psync qd1 cold", {}), rr.get("io_uring qd16 cold", {})
    out = {}
    for t in psync:
        if psync[t] and uring.get(t):
            p, u = statistics.median(psync[t]), statistics.median(uring[t])
            out[t] = (p, u, u / p if p else float("inf"))
    return out


# ---------------------------------------------------------------------------------------------
# main

def run_benchmark(targets: list[Target], workloads: list[Workload], cfg: Config,
                  data: Path, workdir: Path, results: Results) -> None:
    """Fill ``results`` as runs complete, so an interrupt still leaves the finished ones."""
    data.mkdir(parents=True, exist_ok=True)
    for w in workloads:
        why = w.available(cfg)
        if why:
            NOTES.add(f"workload {w.name} skipped: {why}")
            continue
        runnable = [t for t in targets if t.skip is None and t.family in w.families
                    and not (t.read_only and w.writes)]
        if not runnable:
            continue
        w.prepare(data, cfg)
        results[w.name] = {m.name: {} for m in w.metrics}
        failed: set[str] = set()
        for i in range(cfg.runs):
            for t in runnable:
                if t.name in failed:
                    continue
                log(f"{w.name} run {i + 1}/{cfg.runs}: {t.name}")
                try:
                    scratch = workdir / t.name.replace(":", "_")
                    with contextlib.ExitStack() as stack:
                        fresh = None
                        if cfg.fresh_fs and w.writes:
                            scratch.mkdir(parents=True, exist_ok=True)
                            try:
                                fresh = stack.enter_context(fresh_fs(scratch, cfg.fresh_fs))
                            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                                # No loop devices here (a container): on --dir's fs.
                                NOTES.add("write workloads ran on --dir's filesystem (a new "
                                          f"one per run failed: {str(e).strip()[-200:]})")
                                cfg.fresh_fs = 0
                        run_data = data
                        if fresh is not None and t.family == OVERLAY_FAMILY:
                            run_data = fresh / "lower"
                            run_data.mkdir()
                            for sub in w.lower_data:
                                shutil.copytree(data / sub, run_data / sub)
                        d = stack.enter_context(t.mounted(run_data, scratch, fresh))
                        ext = stack.enter_context(external_drops())
                        got = w.run(d, cfg)
                except Exception as e:  # noqa: BLE001 - one target failing must not stop the rest
                    failed.add(t.name)
                    NOTES.add(f"{t.name} failed {w.name}: {str(e).strip()[-400:]}")
                    continue
                for k, v in got.items():
                    results[w.name][k].setdefault(t.name, []).append(v)
                disturbed.setdefault(w.name, {}).setdefault(t.name, []).append(ext[0])
                log("  " + ", ".join(f"{k} {fmt_num(v)}" for k, v in got.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated; NAME[:OPT[:OPT]] (default: {DEFAULT_TARGETS})")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--size", help="sequential/random file size (default 1G; --quick 64M)")
    p.add_argument("--files", type=int, help="meta workload file count (default 10000)")
    p.add_argument("--runs", type=int, help="runs per target and workload (default 3)")
    p.add_argument("--fio-runtime", type=int, help="seconds per fio job (default 10)")
    p.add_argument("--no-fadvise", action="store_true",
                   help="fio --fadvise_hint=0: no FADV_RANDOM, which kernel passthrough "
                        "cannot pass on to its backing file (randread)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, 1 run: a smoke check, not a measurement")
    p.add_argument("--json", metavar="FILE", help="also write results and notes as JSON")
    p.add_argument("--shared-fs", action="store_true",
                   help="write workloads write into --dir's filesystem (default: a new ext4 "
                        "on a loop device per run, see ScratchFs)")
    p.add_argument("--dir", default="/var/tmp/backingfs-bench",
                   help="work directory (data, mountpoints; must be on the native fs)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "backingfs-bench"),
                   help="downloads (pyfuse3 and Django sdists)")
    p.add_argument("--keep-data", action="store_true",
                   help="keep DIR/data (the prepared files) for the next run")
    p.add_argument("--halt-poll-ns", type=int, metavar="NS",
                   help="idle vCPUs poll NS before halting during the run (cpuidle haltpoll "
                        "guests only; restored after): wake-ups at bare-metal cost")
    p.add_argument("--driver", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.driver:
        name, *rest = args.driver
        print(json.dumps(DRIVERS[name](*rest)))
        return 0

    q = args.quick
    cfg = Config(size=parse_size(args.size or ("64M" if q else "1G")),
                 files=args.files or (500 if q else 10_000),
                 runs=args.runs or (1 if q else 3),
                 fio_runtime=args.fio_runtime or (2 if q else 10),
                 copyup_files=200 if q else 2000,
                 copyup_big=(16 if q else 256) * MiB,
                 stat_passes=3,
                 cache=Path(args.cache_dir).expanduser(),
                 fadvise=not args.no_fadvise)
    if not args.shared_fs:
        why = fresh_fs_unavailable()
        if why:
            NOTES.add(f"write workloads ran on --dir's filesystem (no new one per run: {why})")
        else:
            cfg.fresh_fs = 2 * cfg.size + (1 << 30)
    wnames = [w for w in args.workloads.split(",") if w]
    for w in wnames:
        if w not in WORKLOADS:
            raise SystemExit(f"bench: unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    workloads = [WORKLOADS[w] for w in wnames]

    data = Path(args.dir).resolve() / "data"
    workdir = Path(args.dir).resolve() / f"run-{os.getpid()}"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    targets = [make_target(s, cfg.cache) for s in args.targets.split(",") if s]
    for t in targets:
        if t.skip:
            NOTES.add(f"target {t.name} skipped: {t.skip}")
    if os.geteuid() != 0:
        NOTES.add("not root: cold-cache runs cannot drop caches")
    if args.halt_poll_ns is not None and args.halt_poll_ns < 0:
        raise SystemExit("bench: --halt-poll-ns must be 0 or more")
    idle = cpuidle_note()
    if idle and args.halt_poll_ns is None:
        NOTES.add(idle)
    if "BACKINGFS_SPIN_US" in os.environ:
        NOTES.add(f"BACKINGFS_SPIN_US={os.environ['BACKINGFS_SPIN_US']}: our daemons poll "
                  "that long in a burst of requests (default 200)")
    log(f"targets: {', '.join(t.name for t in targets if not t.skip)}; workloads: "
        f"{', '.join(wnames)}; size {fmt_size(cfg.size)}, files {cfg.files}, runs {cfg.runs}; "
        f"workdir {workdir}")
    results: Results = {}
    try:
        with guest_halt_polling(args.halt_poll_ns):
            run_benchmark(targets, workloads, cfg, data, workdir, results)
    except KeyboardInterrupt:
        log("interrupted: unmounting")
        NOTES.add("interrupted: partial results")
    finally:
        teardown_all()
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)

    print(f"# backingfs bench ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"kernel {os.uname().release}{', QUICK: not a measurement' if q else ''})\n")
    print("Ratios are speed ratios (> 1 = faster than the column's reference), from medians.\n")
    print(render(results, targets, cfg))
    if NOTES.items:
        print("## notes\n")
        for n in NOTES.items:
            print(f"- {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": {"size": cfg.size, "files": cfg.files, "runs": cfg.runs,
                       "fio_runtime": cfg.fio_runtime, "copyup_files": cfg.copyup_files,
                       "copyup_big": cfg.copyup_big, "quick": q,
                       "targets": [{"name": t.name, "kind": t.kind, "options": t.options,
                                    "skip": t.skip} for t in targets]},
            "metrics": {w.name: {m.name: {"unit": m.unit, "higher_is_better":
                                          m.higher_is_better} for m in w.metrics}
                        for w in workloads},
            "results": {w: {m: {t: {"values": v, "median": statistics.median(v)}
                                for t, v in per_t.items() if v}
                            for m, per_t in per_m.items()}
                        for w, per_m in results.items()},
            "async_overlap": {t: {"psync_qd1": p, "io_uring_qd16": u, "ratio": r}
                              for t, (p, u, r) in async_overlap(results).items()},
            "external_drop_caches": disturbed,
            "notes": NOTES.items,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
