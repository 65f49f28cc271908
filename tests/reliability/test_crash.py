"""Crash consistency: SIGKILL of the daemon during copy-up and during fsync'd writes.

What a crash of the daemon (not of the machine) may and may not leave behind:

- copy-up (overlay): a lower file being copied up is built in ``workdir/work`` and published
  by one rename, so after the kill and a remount every file reads as its complete old or its
  complete new content, the upper layer holds no partial copy, and the leftovers in
  ``workdir/work`` are gone once the overlay mounts again. Kernel overlayfs over the same
  layers right after a crash sees the same tree as our remount.
- writes (passthru and overlay): the backing files live in the host's page cache, which
  outlives the daemon, so every write() the daemon acknowledged is in the backing file
  after a kill, fsync'd or not, and nothing but the writer's own bytes is there. With the
  FUSE writeback cache an acknowledged write may still sit in the mount's page cache (dead
  with the connection), so there only fsync'd data is promised. Also on the native session,
  whose kernel passthrough writes to the backing file without the daemon.

Kill moments are random with a fixed seed: a "mid" kill waits until the copy being built in
work/ has reached a random fraction of its length (so it lands inside the copy, unless the
copy got published in the instant between the look and the kill), a "delay" kill comes at a
random time up to twice what one copy-up took. Every kill is followed by a lazy unmount of
the dead mount and a remount over the same layers, which must be usable at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs.testing import Mount, cli_argv, is_fuse_mounted, mount_fstype

SEED = 20261122
MiB = 1 << 20

# --- deterministic content ----------------------------------------------------------------

BLOCK = 64 << 10
_POOL_SPAN = MiB
_pools: dict[int, bytes] = {}


def pattern(seed: int, start: int, length: int) -> bytes:
    """``length`` bytes of stream ``seed`` from absolute offset ``start``. The stream is made
    of 64 KiB blocks, each opening with its (seed, index) tag and going on with a slice of a
    seeded random pool picked by the index: any block moved, repeated, mixed with another
    stream or cut short is detected, and generating it costs a memcpy."""
    pool = _pools.get(seed)
    if pool is None:
        pool = _pools[seed] = random.Random(seed).randbytes(_POOL_SPAN + BLOCK)
    first = start // BLOCK
    last = (start + length + BLOCK - 1) // BLOCK
    parts = []
    for i in range(first, last):
        off = (i * 7919) % _POOL_SPAN
        parts.append(struct.pack("<QQ", seed, i))
        parts.append(pool[off:off + BLOCK - 16])
    skip = start - first * BLOCK
    data = b"".join(parts)
    return data if skip == 0 and len(data) == length else data[skip:skip + length]


def first_difference(got: bytes, want: bytes) -> str:
    for i in range(0, min(len(got), len(want)), 4096):
        if got[i:i + 4096] != want[i:i + 4096]:
            return f"first difference in the 4 KiB page at {i}"
    return f"sizes {len(got)} != {len(want)}" if len(got) != len(want) else "equal"


def fuse_argv(kind: str, data: Path, mnt: Path, options: tuple[str, ...] = ()) -> list[str]:
    """passthru over ``data/source`` or our overlay over ``data/{lower,upper,work}``."""
    if kind == "passthru":
        opts = ("-o", ",".join(options)) if options else ()
        return cli_argv("passthru", "-f", *opts, str(data / "source"), str(mnt))
    layers = f"lowerdir={data / 'lower'},upperdir={data / 'upper'},workdir={data / 'work'}"
    return cli_argv("overlay", "-f", "-o", ",".join((layers, *options)), str(mnt))


def kill_daemon(mount: Mount) -> None:
    """SIGKILL our daemon (its pid only), then take its dead mount away (lazy unmount)."""
    assert mount.process is not None
    os.kill(mount.pid or 0, signal.SIGKILL)
    mount.process.wait(10)
    mount.force_cleanup()
    assert not is_fuse_mounted(mount.mountpoint)


#: pyfuse3 logs at ERROR a reply the kernel no longer waits for (ENOENT): a RELEASE the
#: daemon answers just after the connection ended (the last close after a lazy unmount, or a
#: close racing an unmount). Nothing is lost; the bridge should log it at DEBUG.
BENIGN_ERRORS = re.compile(
    r"^.* pyfuse3 ERROR: fuse_\w+\(\): fuse_reply_\* failed with No such file or directory$",
    re.MULTILINE)


def assert_clean_stderr(mount: Mount) -> None:
    text = BENIGN_ERRORS.sub("", mount.stderr_text())
    for bad in ("Traceback", " ERROR", "EBADF", "Bad file descriptor"):
        assert bad not in text, f"daemon stderr has {bad!r}:\n{text}"


# --- copy-up killed -----------------------------------------------------------------------

#: Lower files: name -> size (64-128 MiB with unaligned tails); two below d/ so the parent
#: directory is copied up in the same window.
COPY_FILES = {"a.bin": 64 * MiB + 4097, "b.bin": 64 * MiB + 1, "c.bin": 64 * MiB + 70000,
              "d/e.bin": 64 * MiB + 12345, "d/f.bin": 128 * MiB + 333}
COPY_ITERATIONS = 6

#: The change that triggers the copy-up, run in a child so a hung request can be killed.
OP_SCRIPT = r"""
import os, sys
op, path, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
if op == "open_rw":
    os.close(os.open(path, os.O_RDWR))
elif op == "append":
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.close(fd)
elif op == "truncate":
    os.truncate(path, arg)
print("done", flush=True)
"""


def file_seed(name: str) -> int:
    return SEED ^ int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def file_digest(path: Path, limit: int | None = None) -> tuple[int, str]:
    """(size read, sha256) of ``path``, or of its first ``limit`` bytes."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            chunk = f.read(4 * MiB if limit is None else min(4 * MiB, limit - size))
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class Versions:
    """The two contents a file may show after a crash, as (size, sha256): its ``old`` one
    (in the lower layer) and the ``new`` one the interrupted operation was making."""

    def __init__(self, lower: Path, name: str, op: str, arg: int) -> None:
        self.name = name
        self.old = file_digest(lower / name)
        if op == "append":
            with open(lower / name, "rb") as f:
                h = hashlib.sha256(f.read())
            h.update(b"!")
            self.new = (self.old[0] + 1, h.hexdigest())
        elif op == "truncate":
            self.new = file_digest(lower / name, arg)
        else:
            self.new = self.old

    def which(self, path: Path) -> str:
        got = file_digest(path)
        if got == self.old:
            return "old"
        if got == self.new:
            return "new"
        content = path.read_bytes()
        raise AssertionError(f"{path} holds neither the old nor the new {self.name}: "
                             f"size {len(content)}, "
                             + first_difference(content, old_content(self.name)))


def old_content(name: str) -> bytes:
    return pattern(file_seed(name), 0, COPY_FILES[name])


def copy_length(name: str, op: str, arg: int) -> int:
    """How many bytes the copy-up writes in work/ (a truncate copies only what it keeps)."""
    return arg if op == "truncate" else COPY_FILES[name]


class OverlayLayers:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.lower, self.upper = base / "lower", base / "upper"
        self.work, self.mnt = base / "work", base / "mnt"
        for d in (self.lower, self.upper, self.work, self.mnt):
            d.mkdir()

    @property
    def work_dir(self) -> Path:
        return self.work / "work"

    def work_entries(self) -> list[str]:
        try:
            return sorted(os.listdir(self.work_dir))
        except FileNotFoundError:
            return []

    def upper_entries(self) -> set[str]:
        """Every entry of the upper layer, directories included, as relative paths."""
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.upper):
            for n in dirnames + filenames:
                out.add(str((Path(dirpath) / n).relative_to(self.upper)))
        return out


def start_op(path: Path, op: str, arg: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", OP_SCRIPT, op, str(path), str(arg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_op(proc: subprocess.Popen[bytes]) -> bytes:
    """The op child's stdout; it must end by itself once the daemon is gone."""
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the op child hung after the daemon was killed") from None
    return out


def kill_mid_copy(layers: OverlayLayers, proc: subprocess.Popen[bytes], mount: Mount,
                  length: int, fraction: float) -> str:
    """Kill once the copy in work/ has reached ``fraction`` of ``length`` bytes (or once the
    op ended, when the copy went faster than we could look). Returns what was seen."""
    target = max(1, int(length * fraction))
    deadline = time.monotonic() + 30
    seen = "op ended first"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        done = False
        for name in layers.work_entries():
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(layers.work_dir / name, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size >= target:
                    seen = f"copy at {st.st_size}/{length}"
                    done = True
        if done:
            break
        time.sleep(0.0005)
    kill_daemon(mount)
    return seen


def read_tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """relative path -> (kind, size, sha256 of the content) for every entry below root."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", *file_digest(p))
            else:
                out[rel] = ("dir" if stat.S_ISDIR(st.st_mode) else oct(st.st_mode), 0, "")
    return out


def kernel_overlay_available() -> bool:
    if os.geteuid() != 0:
        return False
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


@contextlib.contextmanager
def kernel_overlay(layers: OverlayLayers) -> Iterator[Path]:
    """Kernel overlayfs over our layers (its own mountpoint), unmounted afterwards."""
    kmnt = layers.base / "kmnt"
    kmnt.mkdir(exist_ok=True)
    opts = f"lowerdir={layers.lower},upperdir={layers.upper},workdir={layers.work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(kmnt)], check=True,
                   capture_output=True)
    try:
        yield kmnt
    finally:
        if mount_fstype(str(kmnt)) is not None:
            r = subprocess.run(["umount", str(kmnt)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(kmnt)], capture_output=True)


@pytest.mark.timeout(240)
def test_overlay_copy_up_killed_is_old_or_new(tmp_path: Path, daemons) -> None:
    rng = random.Random(SEED)
    layers = OverlayLayers(tmp_path)
    (layers.lower / "d").mkdir()
    for name in COPY_FILES:
        (layers.lower / name).write_bytes(old_content(name))
    argv = fuse_argv("overlay", tmp_path, layers.mnt)
    mount = daemons.start(argv, layers.mnt)
    published: dict[str, tuple[int, str]] = {}  # files with an upper copy -> (size, sha256)

    # Positive control, and the time one copy-up takes here (the random delays scale on it).
    t0 = time.monotonic()
    assert finish_op(start_op(layers.mnt / "b.bin", "append", 0)) == b"done\n"
    copy_time = time.monotonic() - t0
    control = Versions(layers.lower, "b.bin", "append", 0)
    assert control.which(layers.mnt / "b.bin") == "new"
    published["b.bin"] = control.new
    assert layers.work_entries() == []

    log = [f"control: append b.bin took {copy_time:.3f}s"]
    mid_kills_inside = 0
    for it in range(COPY_ITERATIONS):
        last = it == COPY_ITERATIONS - 1
        candidates = sorted(set(COPY_FILES) - set(published))
        if not candidates:  # every file is up: back to lower-only, behind an unmounted overlay
            mount.unmount_clean(timeout=30)
            for name in published:
                os.unlink(layers.upper / name)
            published.clear()
            candidates = sorted(COPY_FILES)
            mount = daemons.start(argv, layers.mnt)
        name = rng.choice(candidates)
        op = rng.choice(("open_rw", "append", "truncate"))
        arg = rng.randrange(COPY_FILES[name] // 4, 3 * COPY_FILES[name] // 4) \
            if op == "truncate" else 0
        mode = "mid" if last else rng.choice(("mid", "mid", "delay"))
        fraction, delay = rng.uniform(0.02, 0.95), rng.uniform(0, 2 * copy_time)
        versions = Versions(layers.lower, name, op, arg)
        proc = start_op(layers.mnt / name, op, arg)
        if mode == "mid":
            seen = kill_mid_copy(layers, proc, mount, copy_length(name, op, arg), fraction)
        else:
            time.sleep(delay)
            seen = f"after {delay:.3f}s"
            kill_daemon(mount)
        finish_op(proc)

        # The layers as the crash left them, before anything mounts them again.
        leftovers = layers.work_entries()
        for entry in leftovers:
            st = os.lstat(layers.work_dir / entry)
            assert not stat.S_ISREG(st.st_mode) or st.st_size <= copy_length(name, op, arg)
        upper = layers.upper_entries()
        assert upper <= {"d", name, *published}, f"unexpected upper entries {sorted(upper)}"
        upper_state = versions.which(layers.upper / name) if name in upper else None
        if mode == "mid" and seen.startswith("copy at") and name not in upper:
            assert leftovers, "the copy being built vanished from work/"
            mid_kills_inside += 1

        before = None
        if last and kernel_overlay_available():
            # Kernel overlayfs on the crashed layers (it empties work/ itself).
            with kernel_overlay(layers) as kmnt:
                before = read_tree(kmnt)
        mount = daemons.start(argv, layers.mnt)
        assert layers.work_entries() == [], "work/ not emptied at mount"
        state = versions.which(layers.mnt / name)
        if upper_state is not None:
            assert state == upper_state
            published[name] = getattr(versions, state)
        else:
            assert state == "old"
        for other, size in COPY_FILES.items():
            want = published[other][0] if other in published else size
            assert os.stat(layers.mnt / other).st_size == want
        if before is not None:
            assert read_tree(layers.mnt) == before, "kernel overlayfs sees another tree"
            seen += ", kernel overlayfs: same tree"
        log.append(f"{it}: {op} {name} kill {mode} ({seen}) -> {state}, "
                   f"work/ had {len(leftovers)}")
    for name, digest in published.items():
        assert file_digest(layers.mnt / name) == digest
    mount.unmount_clean(timeout=30)
    for m in daemons.mounts:
        assert_clean_stderr(m)
    for layer in (layers.lower, layers.upper):
        shutil.rmtree(layer)  # 400 MiB: pytest keeps the last runs' tmp_path
    print("\n".join(log))
    assert mid_kills_inside >= 2, "too few kills landed inside a copy-up:\n" + "\n".join(log)


# --- writes and fsync killed --------------------------------------------------------------

WRITE_ITERATIONS = 3
#: The writer stops there, killed or not (disk bound).
WRITE_CAP = 192 * MiB
OLD_SIZE = 100_003


def _writer_main(path: str, seed: int, record: int, every: int, cap: int) -> None:
    """The writer child: appends records of stream ``seed`` (at their absolute offsets),
    fsyncs every ``every`` records, and reports on stdout ``B base`` after the open, ``W end``
    after each acknowledged write(), ``S end`` after each acknowledged fsync()."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    pos = os.fstat(fd).st_size
    out = sys.stdout
    out.write(f"B {pos}\n")
    out.flush()
    count = 0
    while pos < cap:
        data = pattern(seed, pos, record)
        n = os.write(fd, data)
        assert n == len(data)
        pos += n
        count += 1
        line = f"W {pos}\n"
        if count % every == 0:
            os.fsync(fd)
            line += f"S {pos}\n"
        out.write(line)
        out.flush()
    out.write("E\n")
    out.flush()


#: The child's program: the two functions above, verbatim (one definition of the stream),
#: without importing this module (pytest and all) in every child.
WRITER_SCRIPT = "\n".join((
    "import os, random, struct, sys",
    f"BLOCK, _POOL_SPAN, _pools = {BLOCK}, {_POOL_SPAN}, {{}}",
    inspect.getsource(pattern), inspect.getsource(_writer_main),
    "_writer_main(sys.argv[1], *map(int, sys.argv[2:]))"))


class Writer:
    """A writer child and a thread draining its stdout (the pipe must never fill)."""

    def __init__(self, path: Path, seed: int, record: int, every: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(path), str(seed), str(record),
             str(every), str(WRITE_CAP)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())
            self.started.set()
        self.started.set()

    def finish(self) -> tuple[int, int, int, str]:
        """(base, last acknowledged write end, last acknowledged fsync end, stderr)."""
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError("the writer hung after the daemon was killed") from None
        self.thread.join(10)
        base = written = synced = -1
        for line in self.lines:
            kind, _, value = line.partition(" ")
            if kind == "B":
                base = written = synced = int(value)
            elif kind == "W":
                written = int(value)
            elif kind == "S":
                synced = int(value)
        return base, written, synced, err.decode(errors="replace")


#: kind -> (filesystem, -o options, FUSE front-end). The native session's kernel passthrough
#: writes straight to the backing file, even after the daemon died.
WRITE_KINDS = {
    "passthru": ("passthru", (), "pyfuse3"),
    "overlay": ("overlay", (), "pyfuse3"),
    "passthru-writeback": ("passthru", ("writeback",), "pyfuse3"),
    "overlay-writeback": ("overlay", ("writeback=1",), "pyfuse3"),
    "overlay-native": ("overlay", (), "native"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(WRITE_KINDS))
def test_acknowledged_writes_survive_kill(kind: str, tmp_path: Path, daemons) -> None:
    fs, options, session = WRITE_KINDS[kind]
    env = {"BACKINGFS_SESSION": session}
    writeback = bool(options)
    rng = random.Random(f"{SEED}-{kind}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if fs == "passthru":
        data = backing = tmp_path / "source"
        data.mkdir()
    else:
        for d in ("lower", "upper", "work"):
            (tmp_path / d).mkdir()
        data, backing = tmp_path / "lower", tmp_path / "upper"  # appends copy the file up
    old = pattern(SEED, 0, OLD_SIZE)
    for it in range(WRITE_ITERATIONS):
        (data / f"log{it}").write_bytes(old)
    argv = fuse_argv(fs, tmp_path, mnt, options)

    log = []
    mount = daemons.start(argv, mnt, env=env)
    for it in range(WRITE_ITERATIONS):
        name = f"log{it}"
        seed = SEED + 1 + it
        record = rng.choice((4096, 65536 + 7, MiB))
        every = rng.choice((1, 4, 16))
        delay = rng.uniform(0.05, 0.6)
        writer = Writer(mnt / name, seed, record, every)
        assert writer.started.wait(20), "the writer never opened its file"
        time.sleep(delay)
        kill_daemon(mount)
        base, written, synced, err = writer.finish()
        assert base == OLD_SIZE, f"writer failed to start: {writer.lines} {err}"

        mount = daemons.start(argv, mnt, env=env)
        got = (mnt / name).read_bytes()
        assert (backing / name).read_bytes() == got
        assert got[:OLD_SIZE] == old
        want = old + pattern(seed, OLD_SIZE, max(len(got), written) - OLD_SIZE)
        assert len(got) >= synced, f"fsync'd data lost: size {len(got)} < {synced}"
        assert got[:synced] == want[:synced], "fsync'd data corrupted: " + \
            first_difference(got[:synced], want[:synced])
        if not writeback:
            # The backing file is in the host's page cache, which the daemon's death does
            # not touch: every acknowledged write() is there, fsync'd or not, and the
            # bytes beyond it (a write in flight at the kill) are the writer's own.
            assert len(got) >= written, f"acknowledged write lost: size {len(got)} < {written}"
            assert got == want[:len(got)], "file is not the writer's stream: " + \
                first_difference(got, want[:len(got)])
        log.append(f"{kind} {it}: record {record} fsync/{every} kill after {delay:.2f}s: "
                   f"written {written - base}, synced {synced - base}, "
                   f"file {len(got) - base}")
        os.unlink(mnt / name)  # disk: each iteration has its own file
    mount.unmount_clean(timeout=30)
    for m in daemons.mounts:
        assert_clean_stderr(m)
    print("\n".join(log))
