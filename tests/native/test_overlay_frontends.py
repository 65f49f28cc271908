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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FRONTENDS = {"pyfuse3": {"BACKINGFS_SESSION": "pyfuse3"},
             "native-passthrough-off": {"BACKINGFS_SESSION": "native",
                                        "BACKINGFS_PASSTHROUGH": "off"}}
#: Seconds a nested run may take from its start (alone it takes about a minute).
LIMIT = 840.0


@dataclass
class NestedRun:
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


_runs: dict[str, NestedRun] | None = None


def _nested() -> bool:
    """A run on a chosen front-end is itself one of these nested runs (or was asked for
    one front-end by hand): nothing to nest."""
    return bool(os.environ.get("BACKINGFS_SESSION") or os.environ.get("BACKINGFS_PASSTHROUGH"))


def start_early(session: pytest.Session) -> None:
    global _runs
    if _runs is not None:
        return
    _runs = {}
    if _nested():
        return
    wanted = {item.callspec.id for item in session.items  # type: ignore[attr-defined]
              if getattr(item, "module", None) is not None
              and item.module.__name__ == __name__ and hasattr(item, "callspec")}
    factory: pytest.TempPathFactory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    for frontend in sorted(wanted & FRONTENDS.keys()):
        base = factory.mktemp(f"nested-{frontend}")
        log = base / "pytest.log"
        env = {**os.environ, **FRONTENDS[frontend]}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "-o", "addopts=", "--basetemp", str(base / "tmp"), "tests/overlay"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        _runs[frontend] = NestedRun(proc, log, time.monotonic())


def stop_early() -> None:
    for run in (_runs or {}).values():
        run.stop()


@pytest.fixture(scope="module")
def nested_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, NestedRun]]:
    try:
        start_early(request.session)
        assert _runs is not None
        yield _runs
    finally:
        stop_early()


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
