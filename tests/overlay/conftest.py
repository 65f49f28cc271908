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
from ovl_layers import OvlLayers

from backingfs.testing import is_fuse_mounted


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
