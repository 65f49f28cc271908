"""The overlay suite (tests/overlay) on the other front-ends: pyfuse3, and the native
session without kernel passthrough. The battery covers both already (its targets); the
overlay suite's copy-up, whiteout, rename and interop cases run on the default front-end in
the main run, and here, nested, on the others: a behaviour that only the native session's
passthrough got right (or wrong) shows up as a failure of this test, with the nested
run's failures in its message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FRONTENDS = {"pyfuse3": {"BACKINGFS_SESSION": "pyfuse3"},
             "native-passthrough-off": {"BACKINGFS_SESSION": "native",
                                        "BACKINGFS_PASSTHROUGH": "off"}}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_overlay_suite_on_frontend(frontend: str) -> None:
    if os.environ.get("BACKINGFS_SESSION") or os.environ.get("BACKINGFS_PASSTHROUGH"):
        pytest.skip("already a run on a chosen front-end")
    env = {**os.environ, **FRONTENDS[frontend]}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "tests/overlay"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    tail = "\n".join(r.stdout.splitlines()[-40:])
    assert r.returncode == 0, f"tests/overlay on {frontend}: exit {r.returncode}\n{tail}"
    assert " passed" in tail
