"""Fixtures for overlay-only tests: layers in tmp_path, mounts through the real CLI.

``ovl`` is an ``OvlLayers``: ``lower1``/``lower2``/``upper``/``work`` directories to fill
behind the mount, and ``mount(*options, lowers=2, upper=True)`` which starts
``python -m overlay -f -o lowerdir=...,upperdir=...,workdir=... MNT`` as our child
(``backingfs.testing.start_daemon``) and waits until it is live. After the test every mount
is unmounted with ``fusermount3 -u`` (the daemon must exit 0, with no traceback logged);
``force_cleanup`` then runs in any case and kills only the pid we started. ``remount()``
unmounts cleanly and mounts again with the same options.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs.testing import Mount, cli_argv, is_fuse_mounted, start_daemon


class OvlLayers:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.lower1 = tmp_path / "lower1"
        self.lower2 = tmp_path / "lower2"
        self.upper = tmp_path / "upper"
        self.work = tmp_path / "work"
        self.mnt = tmp_path / "mnt"
        for d in (self.lower1, self.lower2, self.upper, self.work, self.mnt):
            d.mkdir()
        self.mounts: list[Mount] = []
        self._last: tuple[tuple[str, ...], int, bool, dict[str, str] | None] | None = None

    def options(self, *extra: str, lowers: int = 2, upper: bool = True) -> str:
        layers = [self.lower1, self.lower2][:lowers]
        opts = ["lowerdir=" + ":".join(str(p) for p in layers)]
        if upper:
            opts += [f"upperdir={self.upper}", f"workdir={self.work}"]
        return ",".join(opts + list(extra))

    def mount(self, *extra: str, lowers: int = 2, upper: bool = True,
              env: dict[str, str] | None = None) -> Path:
        self._last = (extra, lowers, upper, env)
        n = len(self.mounts)
        m = start_daemon(cli_argv("overlay", "-o", self.options(*extra, lowers=lowers,
                                                                 upper=upper), str(self.mnt)),
                         str(self.mnt), stderr_path=str(self.root / f"daemon{n}.stderr"),
                         env=env)
        self.mounts.append(m)
        m.wait_live(timeout=10)
        return self.mnt

    def unmount(self) -> None:
        m = self.mounts[-1]
        m.unmount_clean(timeout=20)
        assert "Traceback" not in m.stderr_text(), m.stderr_text()

    def remount(self) -> Path:
        assert self._last is not None
        extra, lowers, upper, env = self._last
        self.unmount()
        return self.mount(*extra, lowers=lowers, upper=upper, env=env)

    def work_entries(self) -> list[str]:
        return sorted(p.name for p in (self.work / "work").iterdir())


@pytest.fixture
def ovl(tmp_path: Path) -> Iterator[OvlLayers]:
    yield from layers_at(tmp_path)


@pytest.fixture
def ovl_public() -> Iterator[OvlLayers]:
    """Like ``ovl``, under a directory every user may traverse (pytest's tmp_path is 0700),
    for tests that act as another user."""
    base = Path(tempfile.mkdtemp(prefix="ovl-public-"))
    os.chmod(base, 0o755)
    try:
        yield from layers_at(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def layers_at(path: Path) -> Iterator[OvlLayers]:
    layers = OvlLayers(path)
    try:
        yield layers
        for m in layers.mounts:
            if is_fuse_mounted(m.mountpoint) and m.process is not None \
                    and m.process.poll() is None:
                m.unmount_clean(timeout=20)
            assert "Traceback" not in m.stderr_text(), m.stderr_text()
    finally:
        for m in layers.mounts:
            m.force_cleanup()
