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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from earlyjobs import EarlyJobs, ProcessJob, mounted_under, niced, selected_ids

REPO = Path(__file__).resolve().parents[2]

FRONTENDS = {"pyfuse3": {"BACKINGFS_SESSION": "pyfuse3"},
             "native-passthrough-off": {"BACKINGFS_SESSION": "native",
                                        "BACKINGFS_PASSTHROUGH": "off"}}
#: Seconds a nested run may take from its start (alone it takes about a minute).
LIMIT = 840.0


def launch(session: pytest.Session, started: Callable[[str, ProcessJob], None]) -> None:
    # A run on a chosen front-end is itself one of these nested runs (or was asked for one
    # front-end by hand): nothing to nest.
    if os.environ.get("BACKINGFS_SESSION") or os.environ.get("BACKINGFS_PASSTHROUGH"):
        return
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
                stderr=subprocess.STDOUT, process_group=0)
        started(frontend, NestedRun(base, log, proc, time.monotonic()))


class NestedRun(ProcessJob):
    def stop(self) -> None:
        super().stop()
        if not mounted_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)


JOBS: EarlyJobs[ProcessJob] = EarlyJobs(launch)
start_early = JOBS.start
stop_early = JOBS.stop


@pytest.fixture(scope="module")
def nested_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, ProcessJob]]:
    yield from JOBS.serve(request.session)


@pytest.mark.timeout(LIMIT + 60)
@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_overlay_suite_on_frontend(frontend: str,
                                   nested_runs: dict[str, ProcessJob]) -> None:
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
