"""fsx in CI: tools/fsx.py runs 200,000 random data operations on one file through passthru
and through overlay (the file in the lower layer, so the first write copies it up), each with
and without the kernel's writeback cache, and every run must end clean (exit 0).

The four runs are started together as soon as collection ends (``start_early``, called by
conftest.py), so they run beside the rest of the suite, and each test waits for its own.
The cost is the daemon's (fsx itself is ~6% of the CPU). Side by side the four took about
150 s of wall time on an idle 2-vCPU VM (2026-12-04), 309-548 s on a loaded one
(2026-11-22), about 550 CPU-seconds in all.
Each fsx mounts and unmounts its own daemon; a run still going at the deadline is
interrupted (SIGINT: fsx unmounts in ``finally``), then its process group is killed, and
anything left mounted under its directory is lazily unmounted.

On failure the test shows fsx's own report (op number, expected vs got, recent ops touching
the byte, what the backing file holds) and the path of the replayable trace:
``python tools/fsx.py --replay TRACE``. ``FSX_CI_OPS`` overrides the op count for a quick
local run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from earlyjobs import EarlyJobs, ProcessJob, niced, selected_ids, temp_factory

from backingfs.testing import REPO_ROOT, TARGETS

FSX = str(Path(REPO_ROOT) / "tools" / "fsx.py")
OPS = int(os.environ.get("FSX_CI_OPS", "200000"))
#: Wall-clock limit for all four runs together (they run side by side, and beside the rest
#: of the suite): a hang guard, not the expected time (about 3-5 minutes on 2 vCPUs).
DEADLINE = 1200.0
#: (test id, fsx --target, fsx --opts, seed)
CONFIGS = [
    ("passthru", "passthru", None, 2026_1122_1),
    ("passthru-writeback", "passthru", "writeback", 2026_1122_2),
    ("overlay-lower", "overlay-lower", None, 2026_1122_3),
    ("overlay-lower-writeback", "overlay-lower", "writeback=1", 2026_1122_4),
]


@dataclass
class FsxRun(ProcessJob):
    name: str = ""
    argv: list[str] = field(default_factory=list)
    trace: Path = Path()

    def output(self, lines: int = 80) -> str:
        return self.tail(lines)


def launch(session: pytest.Session, started: Callable[[str, FsxRun], None]) -> None:
    """Every selected configuration, all at once."""
    wanted = selected_ids(session, __name__)
    for name, target, opts, seed in CONFIGS:
        if name not in wanted or TARGETS[target].unavailable():
            continue
        base = temp_factory(session).mktemp(f"fsx-{name}")
        trace, log = base / "trace.jsonl", base / "fsx.log"
        argv = [sys.executable, FSX, "--target", target, "--seed", str(seed),
                "--ops", str(OPS), "--dir", str(base), "--trace", str(trace)]
        if opts:
            argv += ["--opts", opts]
        with open(log, "wb") as out:
            # Its own session: the process group holds fsx and the daemon it starts.
            proc = subprocess.Popen(niced(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                    start_new_session=True)
        started(name, FsxRun(base, log, proc, time.monotonic(), name=name, argv=argv,
                             trace=trace))


JOBS: EarlyJobs[FsxRun] = EarlyJobs(launch)
start_early = JOBS.start
stop_early = JOBS.stop


@pytest.fixture(scope="module")
def fsx_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, FsxRun]]:
    yield from JOBS.serve(request.session)


@pytest.mark.timeout(DEADLINE + 60)
@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_fsx_200k_ops_clean(name: str, fsx_runs: dict[str, FsxRun]) -> None:
    target = next(c[1] for c in CONFIGS if c[0] == name)
    why = TARGETS[target].unavailable()
    if why:
        pytest.skip(why)
    run = fsx_runs[name]
    left = max(1.0, DEADLINE - (time.monotonic() - run.started))
    try:
        status = run.proc.wait(left)
    except subprocess.TimeoutExpired:
        run.stop()
        pytest.fail(f"fsx {name} still running after {DEADLINE:.0f}s; its output:\n"
                    f"{run.output()}\ntrace so far: {run.trace}\ncommand: {' '.join(run.argv)}",
                    pytrace=False)
    if status != 0:
        pytest.fail(f"fsx {name} exited {status}:\n{run.output()}\n"
                    f"trace: {run.trace} (replay: python tools/fsx.py --replay {run.trace})",
                    pytrace=False)
    assert f"OK {OPS} ops" in run.output(5), run.output()
    run.trace.unlink()   # ~15 MB; kept only when the run failed
