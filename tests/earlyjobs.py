"""Long subprocess jobs that a test module only waits for (fsx, the nested overlay suites).

A module holds an ``EarlyJobs`` and exposes its ``start``/``stop`` as ``start_early`` and
``stop_early``: conftest.py calls the first when collection ends, so the jobs run beside the
rest of the suite (which keeps about one of the two vCPUs busy) instead of after it, and the
second when the session ends, also when the run is interrupted. The module's fixture
(``serve``) starts them if the hook did not (a module run on its own) and stops whatever is
left at the end of the module.

Jobs run at a lower priority (``NICE``, inherited by the daemons they start): they use the
CPU the suite leaves idle, and do not slow its own tests, some of which time their work.

A job's directory is spared by tests/hangguard.py: a test of the main run that hangs aborts
its own FUSE connections, not those of a job running beside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import hangguard
import pytest

#: ``nice`` increment of the jobs: CFS then gives them about a tenth of a CPU the suite wants.
NICE = 10


def niced(argv: list[str]) -> list[str]:
    return ["nice", "-n", str(NICE), *argv]


class Job(Protocol):
    base: Path

    def stop(self) -> None:
        """End the job and whatever it mounted; a second call does nothing."""


J = TypeVar("J", bound=Job)


@dataclass
class ProcessJob:
    """A job run as its own process group (``start_new_session=True``) in ``base``, its
    output in ``log``."""

    base: Path
    log: Path
    proc: subprocess.Popen[bytes]
    started: float
    stopped: bool = field(default=False, init=False)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT first (fsx and pytest unmount on the way out), then SIGKILL to the process
        group (the job and the daemons it started), then a lazy unmount of whatever is
        left under ``base``. Once only: the group's id is not ours after that."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for mnt in mounted_under(self.base):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


def mounted_under(base: Path) -> list[str]:
    prefix = os.path.realpath(base).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def selected_ids(session: pytest.Session, module_name: str) -> set[str]:
    """The parametrize ids of ``module_name``'s selected tests."""
    return {item.callspec.id for item in session.items  # type: ignore[attr-defined]
            if getattr(getattr(item, "module", None), "__name__", None) == module_name
            and hasattr(item, "callspec")}


def temp_factory(session: pytest.Session) -> pytest.TempPathFactory:
    return session.config._tmp_path_factory  # type: ignore[attr-defined,no-any-return]


class EarlyJobs(Generic[J]):
    def __init__(self, launch: Callable[[pytest.Session, Callable[[str, J], None]], None]
                 ) -> None:
        self._launch = launch
        self.jobs: dict[str, J] | None = None

    def start(self, session: pytest.Session) -> dict[str, J]:
        if self.jobs is None:
            self.jobs = {}
            # Registered as they start: a launch that fails halfway stops what it started.
            self._launch(session, self._started)
        return self.jobs

    def _started(self, name: str, job: J) -> None:
        assert self.jobs is not None
        self.jobs[name] = job
        hangguard.spare(str(job.base), self.stop)

    def stop(self) -> None:
        for job in (self.jobs or {}).values():
            job.stop()

    def serve(self, session: pytest.Session) -> Iterator[dict[str, J]]:
        try:
            yield self.start(session)
        finally:
            self.stop()
