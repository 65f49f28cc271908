"""The overlay suite (tests/overlay) on the other front-ends: pyfuse3, and the native
session without kernel passthrough. The battery covers both already (its targets); the
overlay suite's copy-up, whiteout, rename and interop cases run on the default front-end in
the main run, and here, nested, on the others: a behaviour that only the native session's
passthrough got right (or wrong) shows up as a failure of this test, with the nested
run's failures in its message.

The nested runs start when collection ends (``start_early``, called by conftest.py) and run
beside the rest of the suite; each test waits for its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from earlyjobs import EarlyJobs, niced, selected_ids

REPO = Path(__file__).resolve().parents[2]

FRONTENDS = {"pyfuse3": {"BACKINGFS_SESSION": "pyfuse3"},
             "native-passthrough-off": {"BACKINGFS_SESSION": "native",
                                        "BACKINGFS_PASSTHROUGH": "off"}}
#: Seconds a nested run may take from its start (alone it takes about a minute).
LIMIT = 840.0


@dataclass
class NestedRun:
    base: Path
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT first: the nested pytest then tears its mounts down."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not is_mounted_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)


def is_mounted_under(base: Path) -> bool:
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].startswith(prefix) for line in f)


def launch(session: pytest.Session) -> dict[str, NestedRun]:
    # A run on a chosen front-end is itself one of these nested runs (or was asked for one
    # front-end by hand): nothing to nest.
    if os.environ.get("BACKINGFS_SESSION") or os.environ.get("BACKINGFS_PASSTHROUGH"):
        return {}
    runs = {}
    for frontend in sorted(selected_ids(session, __name__) & FRONTENDS.keys()):
        # Its own TMPDIR (the suite's mounts live in tempfile directories, readable by the
        # unprivileged user of the permission tests, so not under pytest's 0700 tmp_path):
        # its hang guard aborts only what is mounted there, ours spares it.
        base = Path(tempfile.mkdtemp(prefix=f"nested-{frontend}-"))
        os.chmod(base, 0o755)
        log = base / "pytest.log"
        env = {**os.environ, **FRONTENDS[frontend], "TMPDIR": str(base),
               "HANGGUARD_ONLY_UNDER": str(base)}
        with open(log, "wb") as out:
            proc = subprocess.Popen(niced(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "-o", "addopts=", "--basetemp", str(base / "pytest"), "tests/overlay"]),
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        runs[frontend] = NestedRun(base, proc, log, time.monotonic())
    return runs


JOBS: EarlyJobs[NestedRun] = EarlyJobs(launch)
start_early = JOBS.start
stop_early = JOBS.stop


@pytest.fixture(scope="module")
def nested_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, NestedRun]]:
    yield from JOBS.serve(request.session)


@pytest.mark.timeout(LIMIT + 60)
@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_overlay_suite_on_frontend(frontend: str, nested_runs: dict[str, NestedRun]) -> None:
    if frontend not in nested_runs:
        pytest.skip("already a run on a chosen front-end")
    run = nested_runs[frontend]
    try:
        status = run.proc.wait(max(1.0, LIMIT - (time.monotonic() - run.started)))
    except subprocess.TimeoutExpired:
        run.stop()
        pytest.fail(f"tests/overlay on {frontend}: still running after {LIMIT:.0f} s\n"
                    f"{run.tail()}", pytrace=False)
    tail = run.tail()
    assert status == 0, f"tests/overlay on {frontend}: exit {status}\n{tail}"
    assert " passed" in tail
