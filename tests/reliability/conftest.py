"""Fixtures shared by the reliability tests: daemons that are always torn down.

``daemons`` starts our CLIs as children (``backingfs.testing.start_daemon``), each with its
stderr kept in the test's tmp_path, and after the test runs ``force_cleanup`` on every one of
them, whatever happened: lazy unmount, then SIGTERM/SIGKILL of *only* the pid it started.
Tests that want a clean exit assert it themselves (``Mount.unmount_clean`` or their own
checks) before the fixture's teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backingfs.testing import Mount, fuse_unavailable, is_fuse_mounted, start_daemon


class Daemons:
    """The daemons one test started, in order."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounts: list[Mount] = []

    def start(self, argv: list[str], mountpoint: Path | str, *,
              env: dict[str, str] | None = None, timeout: float = 20.0) -> Mount:
        """Start ``argv`` and wait until ``mountpoint`` is live; stderr in base/daemonN.stderr."""
        stderr_path = self.base / f"daemon{len(self.mounts)}.stderr"
        mount = start_daemon(argv, str(mountpoint), stderr_path=str(stderr_path), env=env)
        self.mounts.append(mount)
        mount.wait_live(timeout)
        return mount


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tracker = Daemons(tmp_path)
    try:
        yield tracker
    finally:
        for mount in reversed(tracker.mounts):
            mount.force_cleanup()
        left = [m.mountpoint for m in tracker.mounts if is_fuse_mounted(m.mountpoint)]
        assert not left, f"still mounted after cleanup: {left}"
