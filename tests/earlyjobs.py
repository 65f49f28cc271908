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

from collections.abc import Callable, Iterator
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

    def stop(self) -> None: ...


J = TypeVar("J", bound=Job)


def selected_ids(session: pytest.Session, module_name: str) -> set[str]:
    """The parametrize ids of ``module_name``'s selected tests."""
    return {item.callspec.id for item in session.items  # type: ignore[attr-defined]
            if getattr(getattr(item, "module", None), "__name__", None) == module_name
            and hasattr(item, "callspec")}


def temp_factory(session: pytest.Session) -> pytest.TempPathFactory:
    return session.config._tmp_path_factory  # type: ignore[attr-defined,no-any-return]


class EarlyJobs(Generic[J]):
    def __init__(self, launch: Callable[[pytest.Session], dict[str, J]]) -> None:
        self._launch = launch
        self.jobs: dict[str, J] | None = None

    def start(self, session: pytest.Session) -> dict[str, J]:
        if self.jobs is None:
            self.jobs = self._launch(session)
            for job in self.jobs.values():
                hangguard.spare(str(job.base))
        return self.jobs

    def stop(self) -> None:
        for job in (self.jobs or {}).values():
            job.stop()

    def serve(self, session: pytest.Session) -> Iterator[dict[str, J]]:
        try:
            yield self.start(session)
        finally:
            self.stop()
