"""The last line of defence against a test run that never ends.

pytest-timeout raises in the test's thread with SIGALRM. That is not enough on FUSE: a
syscall waiting for a daemon that is stopped or deadlocked is interrupted (the kernel sends
FUSE_INTERRUPT) and then waits again, killable only by SIGKILL, so the alarm's exception
never arrives and the run hangs until CI's wall clock ends it, with nothing printed that says
which test it was (CI runs ``pytest -q``).

So every test item (setup, call and teardown) runs under a watchdog thread that fires
``GRACE`` seconds after the item's own pytest-timeout:

1. it names the test and dumps every thread's stack on stderr;
2. it aborts every FUSE connection that did not exist when the run started, but for those
   of the jobs running beside the suite (tests/earlyjobs.py; through the
   fusectl filesystem, mounted if needed): each waiting request fails with ENOTCONN, the
   daemon's next read of /dev/fuse fails with ENODEV and it exits, so the test's thread
   wakes, pytest-timeout's exception (or the test's own error) fails the test, and the
   fixtures clean up as usual (the guard unmounts the aborted mounts lazily itself, in case
   the timeout's exception cut a cleanup short);
3. if the item is still not done ``EXIT_AFTER`` seconds later (time for the fixtures'
   teardown: SIGTERM and SIGKILL graces), it stops pytest's output capture, says so and
   exits the whole run with status 3: a red run that says why beats a run that never ends.

A pytest plugin: tests/conftest.py registers it; ``-p hangguard`` loads it elsewhere.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

#: Seconds past the item's timeout before the abort, and again before the exit.
GRACE = float(os.environ.get("HANGGUARD_GRACE", "30"))
#: Seconds after the abort before the run is ended.
EXIT_AFTER = float(os.environ.get("HANGGUARD_EXIT_AFTER", "120"))
FUSECTL = "/sys/fs/fuse/connections"

_known_at_start: set[str] = set()
#: Mountpoints under these are left alone: the jobs that run beside the suite
#: (tests/earlyjobs.py). A nested run is given its own directory in ``HANGGUARD_ONLY_UNDER``
#: and aborts only what is mounted under it.
_spared: list[str] = []
_ONLY_UNDER = os.environ.get("HANGGUARD_ONLY_UNDER")
#: Called before the run is ended (``os._exit`` skips pytest's session finish): the jobs
#: beside the suite stop and unmount.
_before_exit: list[Callable[[], None]] = []


def _prefix(directory: str) -> str:
    # Mountinfo shows resolved paths.
    return os.path.realpath(directory).rstrip("/") + "/"


def spare(directory: str, stop: Callable[[], None] | None = None) -> None:
    _spared.append(_prefix(directory))
    if stop is not None and stop not in _before_exit:
        _before_exit.append(stop)


def _ours(mountpoint: str) -> bool:
    if any(mountpoint.startswith(d) for d in _spared):
        return False
    return _ONLY_UNDER is None or mountpoint.startswith(_prefix(_ONLY_UNDER))


def fuse_connections() -> dict[str, str]:
    """``{connection id: mountpoint}`` of the FUSE mounts visible to this process (the
    id is the minor of the mount's anonymous device, the name fusectl gives it)."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            fstype = post.split()[0] if post else ""
            if len(fields) > 4 and fstype.startswith("fuse") and fstype != "fusectl":
                major, _, minor = fields[2].partition(":")
                if major == "0":
                    found[minor] = fields[4]
    return found


def remember_existing() -> None:
    _known_at_start.update(fuse_connections())


def abort_new_connections() -> list[str]:
    """Abort the FUSE connections made since the run started (but not those of the jobs
    beside it, see ``spare``); the mountpoints aborted."""
    if not os.path.isdir(os.path.join(FUSECTL, ".")) or not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL],
                       capture_output=True, timeout=10)
    aborted = []
    for conn, mountpoint in fuse_connections().items():
        if conn in _known_at_start or not _ours(mountpoint):
            continue
        try:
            with open(os.path.join(FUSECTL, conn, "abort"), "w") as f:
                f.write("1")
            aborted.append(mountpoint)
        except OSError as e:
            print(f"hangguard: cannot abort connection {conn} ({mountpoint}): {e}",
                  file=sys.stderr, flush=True)
    return aborted


def item_timeout(item: pytest.Item) -> float:
    mark = item.get_closest_marker("timeout")
    if mark is not None and mark.args:
        return float(mark.args[0])
    if mark is not None and "timeout" in mark.kwargs:
        return float(mark.kwargs["timeout"])
    value = item.config.getini("timeout")
    return float(value) if value else 120.0


class Watchdog:
    def __init__(self, config: pytest.Config, nodeid: str, timeout: float) -> None:
        self.config = config
        self.nodeid = nodeid
        self.timeout = timeout
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hangguard", daemon=True)

    def __enter__(self) -> Watchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        if self.done.wait(self.timeout + GRACE):
            return
        print(f"\nhangguard: {self.nodeid} still running {self.timeout + GRACE:.0f}s after "
              f"it started (its timeout is {self.timeout:.0f}s); stacks:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            aborted = abort_new_connections()
        except Exception as e:  # the watchdog itself must never die quietly
            aborted = [f"(failed: {e!r})"]
        print(f"hangguard: aborted FUSE connections of {aborted}", file=sys.stderr,
              flush=True)
        for mountpoint in aborted:
            # A dead connection's mount stays until unmounted; a fixture that the timeout's
            # exception skipped would leave it behind.
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=10)
        if self.done.wait(EXIT_AFTER):
            return
        # What a test prints is captured and would be lost with the process: give the
        # terminal back first.
        capman = self.config.pluginmanager.getplugin("capturemanager")
        try:
            capman.suspend_global_capture(in_=False)
        except Exception:
            pass
        print(f"\nhangguard: {self.nodeid} did not end within {EXIT_AFTER:.0f}s of the abort "
              "of its FUSE connections; ending the run (exit status 3). Stacks:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for stop in _before_exit:
            try:
                stop()
            except Exception as e:
                print(f"hangguard: stopping a job failed: {e!r}", file=sys.stderr, flush=True)
        os._exit(3)


def pytest_configure(config: pytest.Config) -> None:
    remember_existing()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    with Watchdog(item.config, item.nodeid, item_timeout(item)):
        yield
