"""Fixtures for passthru-only tests: a mount through the real CLI, always torn down.

``passthru_mount(*options, source=None)`` starts ``python -m passthru -f [-o OPTS] SOURCE
MOUNTPOINT`` as our child (``backingfs.testing.start_daemon``) over ``source`` (default
``tmp_path/source``) and waits until it is live. After the test each mount is unmounted
with ``fusermount3 -u`` (the daemon must exit 0); ``force_cleanup`` then runs in any case
and kills only the pid we started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from passthru_helpers import PassthruMount, StartPassthru

from backingfs.testing import Mount, cli_argv, is_fuse_mounted, start_daemon


@pytest.fixture
def passthru_mount(tmp_path: Path) -> Iterator[StartPassthru]:
    mounts: list[Mount] = []

    def start(*options: str, source: Path | None = None) -> PassthruMount:
        if source is None:
            source = tmp_path / "source"
            source.mkdir(exist_ok=True)
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        opts = ["-o", ",".join(options)] if options else []
        m = start_daemon(cli_argv("passthru", *opts, str(source), str(mnt)), str(mnt),
                         stderr_path=str(tmp_path / f"daemon{len(mounts)}.stderr"))
        mounts.append(m)
        m.wait_live(timeout=10)
        return PassthruMount(m, source, mnt)

    try:
        yield start
        for m in reversed(mounts):  # a mount may be another's source
            if is_fuse_mounted(m.mountpoint):
                m.unmount_clean(timeout=20)
            assert "Traceback" not in m.stderr_text(), m.stderr_text()
    finally:
        for m in reversed(mounts):
            m.force_cleanup()
