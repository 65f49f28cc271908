"""Birth time: what statx(2) reports as STATX_BTIME (``stat``'s "Birth:", ``ls
--time=birth``, ``find -newerBt``).

ext4 and the kernel's overlayfs report the real object's; so do our mounts on the native
session, through FUSE_STATX (the kernel asks for it when a statx wants the birth time).
The birth time of an overlay object is its real object's: a copy-up is born at the
copy-up, on the kernel's overlayfs as on ours.

pyfuse3 3.5 has no FUSE_STATX handler (libfuse answers ENOSYS), so statx through its
front-end reports no birth time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from frontend_gaps import differs_on_pyfuse3

from backingfs.syscalls import AT_FDCWD, AT_SYMLINK_NOFOLLOW, STATX_BTIME, birth_time_ns

pytestmark = pytest.mark.timeout(30)

#: STATX_BASIC_STATS | STATX_BTIME: what ``stat`` asks for.
ALL = 0x7FF | STATX_BTIME
_NO_STATX = ("pyfuse3 3.5 has no FUSE_STATX handler (libfuse answers ENOSYS): statx "
             "through the mount reports no birth time")


_differs_on_pyfuse3 = differs_on_pyfuse3(_NO_STATX)


def btime(path: Path, mask: int = ALL) -> int | None:
    return birth_time_ns(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, mask)


@_differs_on_pyfuse3
def test_new_objects_have_their_backing_objects_birth_time(fs: Path,
                                                           behind: Path | None) -> None:
    t0 = time.time_ns() - 1_000_000_000  # file times come from a coarse clock
    (fs / "f").write_bytes(b"x")
    (fs / "d").mkdir()
    (fs / "s").symlink_to("nowhere")
    os.mkfifo(fs / "p")
    for name in ("f", "d", "s", "p"):
        for mask in (ALL, STATX_BTIME):
            born = btime(fs / name, mask)
            assert born is not None, (name, mask)
            assert t0 <= born <= time.time_ns(), name
            if behind is not None:
                assert born == btime(behind / name), name


@_differs_on_pyfuse3
def test_birth_time_stays_through_changes(fs: Path) -> None:
    (fs / "f").write_bytes(b"x")
    born = btime(fs / "f")
    assert born is not None
    time.sleep(0.02)
    with open(fs / "f", "ab") as f:
        f.write(b"more")
    os.chmod(fs / "f", 0o600)
    os.utime(fs / "f", ns=(1, 2))
    os.rename(fs / "f", fs / "g")
    os.link(fs / "g", fs / "h")
    assert btime(fs / "g") == born
    assert btime(fs / "h") == born
    assert btime(fs / "g", STATX_BTIME) == born


@_differs_on_pyfuse3
@pytest.mark.tree({"f": b"data"})
def test_birth_time_after_a_write(fs: Path, behind: Path | None) -> None:
    """On an overlay whose file is on a lower layer, the write copies it up: from then on
    the birth time is the upper copy's."""
    before = btime(fs / "f")
    assert before is not None
    time.sleep(0.02)
    with open(fs / "f", "ab") as f:
        f.write(b"x")
    after = btime(fs / "f")
    if behind is None:
        assert after == before
    else:
        assert after == btime(behind / "f")
