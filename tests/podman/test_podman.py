"""podman with backingfs-overlay as containers-storage's ``mount_program``, and fuse-overlayfs
as the oracle for the same flow.

Every podman call uses a storage.conf (``CONTAINERS_STORAGE_CONF``) with ``driver =
"overlay"`` and ``mount_program`` set, under a temporary graphroot/runroot, plus
``--tmpdir``/``--network-config-dir``/``--events-backend=none`` so podman's own state stays
there too. The mount program is a small wrapper that records the argv containers-storage
passes and runs this checkout's overlay (or /usr/bin/fuse-overlayfs).

The flow, once per mount program: ``podman import`` a busybox root filesystem; ``create``,
``mount``; write, change, delete (files, a directory, a directory replaced: opaque) in the
mounted tree; ``podman diff`` lists exactly those; ``commit`` (containers-storage stores the
layer in AUFS format: ``.wh.`` whiteouts, ``.wh..wh..opq``); a container of the new image,
mounted, honours the deletions and shows the new content; a name whited out below is
created again; ``podman export`` equals the merged tree; a container with ``--uidmap``
(the program gets ``uidmapping=``); ``podman umount`` leaves no mount and no daemon. Nothing
starts a container (no runtime needed): mount/diff/commit/export exercise the mount
program fully. Afterwards ``podman umount -a -f`` and ``podman system reset -f``, and the
temporary directory goes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backingfs.testing import REPO_ROOT, Mount, find_daemon_pid, fuse_unavailable

PODMAN = shutil.which("podman")
BUSYBOX = "/bin/busybox"
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"


def _why_not() -> str | None:
    if PODMAN is None:
        return "podman is not installed (apt-get install podman busybox-static)"
    if not os.path.exists(BUSYBOX):
        return "busybox is not installed (apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "the podman flow runs rootful (root needed)"
    return fuse_unavailable()


pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


# --- the image -----------------------------------------------------------------------------

IMAGE_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/motd": b"hello\n",
    "tmp/scratch": b"scratch\n",
    "usr/share/doc/readme": b"doc\n",
    "opt/app/config": b"old config\n",
    "opt/app/data/blob": b"old data\n",
}
APPLETS = ("sh", "ls", "cat", "echo", "mkdir", "rm", "true")


def make_rootfs_tar(path: Path) -> None:
    """A busybox root filesystem: bin/busybox, applet symlinks, a few files."""
    root = path.parent / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for rel, data in IMAGE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    with tarfile.open(path, "w") as tar:
        for p in sorted(root.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(root)), recursive=False)


def _tar_bytes(entries: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_layered_archive(path: Path) -> None:
    """A two-layer docker-archive for ``podman load``: the top layer deletes etc/motd
    (``.wh.motd``) and replaces opt/app (``.wh..wh..opq``), as image layers do."""
    base = _tar_bytes([("etc", None), ("etc/motd", b"hi\n"), ("etc/keep", b"k\n"),
                       ("opt", None), ("opt/app", None), ("opt/app/old", b"old\n")])
    top = _tar_bytes([("etc", None), ("etc/.wh.motd", b""), ("opt", None), ("opt/app", None),
                      ("opt/app/.wh..wh..opq", b""), ("opt/app/new", b"new\n")])
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in (base, top)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": "base"}, {"created_by": "top"}]})
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["localhost/bfs-layered:1"],
                            "Layers": ["base.tar", "top.tar"]}])
    with tarfile.open(path, "w") as tar:
        for name, data in (("base.tar", base), ("top.tar", top),
                           ("config.json", config.encode()),
                           ("manifest.json", manifest.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --- podman under a temporary root ---------------------------------------------------------

class Podman:
    def __init__(self, base: Path, program: str) -> None:
        self.base = base
        self.argv_log = base / "mount_program.argv"
        wrapper = base / "mount_program"
        if program == "ours":
            run = (f"PYTHONPATH={shlex.quote(REPO_ROOT)} exec {shlex.quote(sys.executable)} "
                   "-m overlay \"$@\"")
        else:
            run = f"exec {FUSE_OVERLAYFS} \"$@\""
        wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" -- >> "
                           f"{shlex.quote(str(self.argv_log))}\n{run}\n")
        wrapper.chmod(0o755)
        conf = base / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/graph"\n'
                        f'runroot = "{base}/run"\n[storage.options.overlay]\n'
                        f'mount_program = "{wrapper}"\n')
        for d in ("tmp", "networks"):
            (base / d).mkdir()
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), TMPDIR=str(base / "tmp"))
        self.flags = ["--tmpdir", str(base / "tmp"), "--network-config-dir",
                      str(base / "networks"), "--events-backend", "none"]

    def __call__(self, *args: str, check: bool = True) -> str:
        r = subprocess.run([PODMAN or "podman", *self.flags, *args], env=self.env,
                           capture_output=True, text=True, timeout=90)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stderr}")
        return r.stdout

    def calls(self) -> list[list[str]]:
        """Every argv the mount program got, in order (the version probe included)."""
        text = self.argv_log.read_text() if self.argv_log.exists() else ""
        out, cur = [], []
        for line in text.splitlines():
            if line == "--":
                out.append(cur)
                cur = []
            else:
                cur.append(line)
        return out

    def fuse_mounts(self) -> list[str]:
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                point = pre.split()[4]
                if point.startswith(str(self.base)) and post.startswith("fuse"):
                    found.append(point)
        return found

    def daemons(self) -> list[int]:
        pids = []
        for point in self.fuse_mounts() + [str(self.base / "graph")]:
            pid = find_daemon_pid(point)
            if pid is not None:
                pids.append(pid)
        return pids

    def teardown(self) -> None:
        """Unmount everything, drop the storage, stop any daemon left (found by our unique
        storage path in its command line), remove the directory unless still mounted."""
        self("umount", "--all", "--force", check=False)
        self("system", "reset", "--force", check=False)
        for point in self.fuse_mounts():
            subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
        for pid in set(self.daemons()):
            Mount(str(self.base), pid).force_cleanup()
        with open("/proc/self/mountinfo") as f:
            busy = any(str(self.base) in line for line in f)
        if not busy:
            shutil.rmtree(self.base, ignore_errors=True)


# --- trees ---------------------------------------------------------------------------------

Tree = dict[str, tuple]


def _entry(kind: str, mode: int, uid: int, gid: int, data: bytes | None = None,
           link: str | None = None) -> tuple:
    digest = hashlib.sha256(data).hexdigest()[:16] if data is not None else None
    return (kind, stat.S_IMODE(mode), uid, gid, digest, link)


def tree_of_dir(root: Path) -> Tree:
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = _entry("l", st.st_mode, st.st_uid, st.st_gid, link=os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = _entry("d", st.st_mode, st.st_uid, st.st_gid)
            else:
                out[rel] = _entry("f", st.st_mode, st.st_uid, st.st_gid, p.read_bytes())
    return out


def tree_of_tar(path: Path) -> Tree:
    out: Tree = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            rel = m.name.removeprefix("./").rstrip("/")
            if not rel or rel == ".":
                continue
            if m.issym():
                out[rel] = _entry("l", m.mode, m.uid, m.gid, link=m.linkname)
            elif m.isdir():
                out[rel] = _entry("d", m.mode, m.uid, m.gid)
            else:
                f = tar.extractfile(m)
                out[rel] = _entry("f", m.mode, m.uid, m.gid, f.read() if f else b"")
    return out


def change_container(mnt: Path) -> None:
    """Write, change and delete in a mounted container (as a build step would)."""
    (mnt / "etc" / "newfile").write_text("new file\n")
    (mnt / "etc" / "motd").write_text("changed\n")
    os.chmod(mnt / "etc" / "passwd", 0o600)
    (mnt / "etc" / "motd.link").symlink_to("motd")
    (mnt / "usr" / "share" / "doc" / "readme").unlink()
    shutil.rmtree(mnt / "tmp")
    (mnt / "newdir").mkdir()
    (mnt / "newdir" / "x").write_text("x\n")
    shutil.rmtree(mnt / "opt" / "app")  # replaced: the new directory is opaque
    (mnt / "opt" / "app").mkdir()
    (mnt / "opt" / "app" / "config").write_text("fresh config\n")


EXPECTED_DIFF = {
    "C /etc", "A /etc/newfile", "C /etc/motd", "C /etc/passwd", "A /etc/motd.link",
    "C /usr", "C /usr/share", "C /usr/share/doc", "D /usr/share/doc/readme",
    "D /tmp", "A /newdir", "A /newdir/x",
    "C /opt", "C /opt/app", "C /opt/app/config", "D /opt/app/data",
}


def diff_lines(podman: Podman, cid: str) -> set[str]:
    return {line.strip() for line in podman("diff", cid).splitlines() if line.strip()}


def run_flow(base: Path, program: str) -> dict[str, object]:
    """The whole flow with one mount program; returns what it saw, for the comparison."""
    base.mkdir(mode=0o700)
    podman = Podman(base, program)
    try:
        tarball = base / "busybox.tar"
        make_rootfs_tar(tarball)
        podman("import", "-q", str(tarball), "localhost/bfs-test:1")

        c1 = podman("create", "localhost/bfs-test:1", "/bin/sh").strip()
        m1 = Path(podman("mount", c1).strip())
        assert m1.name == "merged" and (m1 / "etc" / "motd").read_text() == "hello\n"
        change_container(m1)
        diff1 = diff_lines(podman, c1)
        podman("commit", "-q", c1, "localhost/bfs-test:2")

        c2 = podman("create", "localhost/bfs-test:2", "/bin/sh").strip()
        m2 = Path(podman("mount", c2).strip())
        merged2 = tree_of_dir(m2)
        (m2 / "tmp").mkdir()  # a name whited out in a lower layer, created again
        (m2 / "tmp" / "again").write_text("again\n")
        diff2 = diff_lines(podman, c2)
        exported = base / "export.tar"
        podman("export", "-o", str(exported), c2)
        export_tree = tree_of_tar(exported)
        final2 = tree_of_dir(m2)

        c3 = podman("create", "--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536",
                    "localhost/bfs-test:1", "/bin/sh").strip()
        m3 = Path(podman("mount", c3).strip())
        shifted = {rel: e[2:4] for rel, e in tree_of_dir(m3).items()}

        archive = base / "layered.tar"
        make_layered_archive(archive)
        podman("load", "-q", "-i", str(archive))
        c4 = podman("create", "localhost/bfs-layered:1", "/bin/sh").strip()
        layered = sorted(tree_of_dir(Path(podman("mount", c4).strip())))

        podman("umount", c1, c2, c3, c4)
        left = podman.fuse_mounts()
        deadline = time.monotonic() + 10
        while podman.daemons() and time.monotonic() < deadline:
            time.sleep(0.05)
        daemons = podman.daemons()
        layers = list((base / "graph" / "overlay").glob("*/diff"))
        # the layer formats containers-storage wrote with a mount program: AUFS
        aufs = {"committed": any((d / "usr/share/doc/.wh.readme").exists() for d in layers),
                "loaded": any((d / "opt/app/.wh..wh..opq").exists()
                              and (d / "etc/.wh.motd").exists() for d in layers)}
        version = podman("info", "--format", "{{.Store.GraphOptions}}")
        return {"diff1": diff1, "merged2": merged2, "diff2": diff2, "export": export_tree,
                "final2": final2, "shifted": shifted, "layered": layered, "left_mounted": left,
                "left_daemons": daemons, "aufs": aufs, "calls": podman.calls(),
                "version": version}
    finally:
        podman.teardown()


Flow = Callable[[str], dict[str, object]]


@pytest.fixture(scope="module")
def flow() -> Iterator[Flow]:
    """``flow(program)``: that program's flow results, run once per module (a failure is
    remembered and raised again)."""
    base = Path(tempfile.mkdtemp(prefix="bfs-podman-"))
    results: dict[str, dict[str, object] | BaseException] = {}

    def get(program: str) -> dict[str, object]:
        if program not in results:
            try:
                results[program] = run_flow(base / program, program)
            except Exception as e:
                results[program] = e
        got = results[program]
        if isinstance(got, BaseException):
            raise AssertionError(f"the {program} flow failed: {got}") from got
        return got

    try:
        yield get
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_podman_flow_with_backingfs_overlay(flow: Flow) -> None:
    r = flow("ours")
    assert r["diff1"] == EXPECTED_DIFF
    assert r["aufs"] == {"committed": True, "loaded": True}
    # an image layer's .wh. whiteout and .wh..wh..opq opaque marker, honoured
    assert r["layered"] == ["etc", "etc/keep", "opt", "opt/app", "opt/app/new"]
    merged = r["merged2"]
    assert "usr/share/doc/readme" not in merged and "tmp" not in merged  # whiteouts honoured
    assert "opt/app/data" not in merged and "opt/app/config" in merged  # opaque honoured
    assert merged["etc/motd"][4] == hashlib.sha256(b"changed\n").hexdigest()[:16]
    assert merged["etc/motd.link"][5] == "motd" and merged["etc/passwd"][1] == 0o600
    assert r["diff2"] == {"A /tmp", "A /tmp/again"}
    assert r["export"] == r["final2"]
    assert r["left_mounted"] == [] and r["left_daemons"] == []
    assert "backingfs-overlay: version" in str(r["version"])  # --version read from stdout
    mounts = [c for c in r["calls"] if "--version" not in c]
    assert mounts and all(c[0] == "-o" and len(c) == 3 for c in mounts), mounts
    assert any("uidmapping=:0:100000:65536" in c[1] for c in mounts)  # podman 4.3's form


@pytest.mark.skipif(not os.access(FUSE_OVERLAYFS, os.X_OK), reason="fuse-overlayfs missing")
def test_podman_flow_matches_fuse_overlayfs(flow: Flow) -> None:
    ours, peer = flow("ours"), flow("fo")
    for key in ("diff1", "merged2", "diff2", "export", "final2", "shifted", "layered",
                "aufs"):
        assert ours[key] == peer[key], key
    assert peer["left_mounted"] == [] and peer["left_daemons"] == []
    # containers-storage called both programs with the same argv, paths aside
    assert [len(c) for c in ours["calls"]] == [len(c) for c in peer["calls"]]
