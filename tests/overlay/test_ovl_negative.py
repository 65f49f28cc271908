"""Negative lookups are cached by the kernel for the entry timeout, as on passthru: a name
looked up again and again costs one LOOKUP; a name made through the mount is seen at once;
with timeout=0 every lookup asks the daemon."""

from __future__ import annotations

import os

import pytest
from ovl_layers import OvlLayers

pytestmark = [
    pytest.mark.timeout(60),
    # The LOOKUP counts come from the native session's statistics (SIGUSR1).
    pytest.mark.skipif(os.environ.get("BACKINGFS_SESSION", "native") != "native",
                       reason="counts requests through the native session's statistics"),
]


def lookups(ovl: OvlLayers) -> int:
    return int(ovl.mounts[-1].session_statistics()["requests"].get("LOOKUP", 0))


def test_repeated_misses_cost_one_lookup(ovl: OvlLayers) -> None:
    (ovl.lower1 / "d").mkdir()
    mnt = ovl.mount()
    os.listdir(mnt / "d")
    before = lookups(ovl)
    for _ in range(20):
        assert not os.path.exists(mnt / "d" / "missing")
    assert lookups(ovl) - before == 1
    # Made through the mount: the kernel replaces its negative entry, no timeout to wait.
    (mnt / "d" / "missing").write_bytes(b"now")
    assert (mnt / "d" / "missing").read_bytes() == b"now"
    os.unlink(mnt / "d" / "missing")
    assert not os.path.exists(mnt / "d" / "missing")


def test_a_whiteout_is_a_cached_miss_too(ovl: OvlLayers) -> None:
    (ovl.lower1 / "gone").write_bytes(b"x")
    mnt = ovl.mount()
    os.unlink(mnt / "gone")
    before = lookups(ovl)
    for _ in range(5):
        assert not os.path.exists(mnt / "gone")
    assert lookups(ovl) - before <= 1
    (mnt / "gone").write_bytes(b"back")
    assert (mnt / "gone").read_bytes() == b"back"


def test_timeout_zero_asks_every_time(ovl: OvlLayers) -> None:
    mnt = ovl.mount("timeout=0")
    before = lookups(ovl)
    for _ in range(5):
        assert not os.path.exists(mnt / "missing")
    assert lookups(ovl) - before == 5
    # and a name made behind the mount is found at once
    (ovl.upper / "late").write_bytes(b"l")
    assert (mnt / "late").read_bytes() == b"l"
