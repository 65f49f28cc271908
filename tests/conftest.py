"""The target matrix of the behaviour battery: ``--targets``, the ``fs`` fixture, ``differs``.

Every test under tests/behaviour takes ``fs``, a fresh directory on one target (and may take
``behind``, the same directory behind the mount), and is run once per selected target
(``--targets native,passthru``; default: every target that can run here, see
``backingfs.testing.TARGETS``). A target is mounted once per session and shared by
its tests, each in its own subdirectory; after each test the daemon must still be alive (a
test that killed it fails, and the next test gets a new mount). The mount is always torn
down, even when tests fail.

Markers:
- ``@pytest.mark.tree({"f": b"data", "d/": None})``: the test's directory starts with this
  tree, written behind the mount where the target has a backing place for it (passthru's
  source, an overlay's lower layer), so the test meets it as pre-existing objects.
- ``@pytest.mark.differs("kernel-overlay", reason="...")``: the one legitimate way for a
  target to differ from the outcome the test states: a strict xfail with a written reason.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hangguard
import pytest

from backingfs.testing import TARGETS, Target, TargetMount, mount_fstype


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--targets", default=None,
        help="comma-separated behaviour targets (default: every available one): "
             + ", ".join(TARGETS))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "tree(spec): files and dirs the test directory starts with")
    config.addinivalue_line(
        "markers", "differs(target, reason): this target legitimately differs (strict xfail)")
    selected_targets(config)  # a bad --targets is a usage error before collection
    # A hung FUSE call outlives pytest-timeout's alarm: see tests/hangguard.py.
    if not config.pluginmanager.has_plugin("hangguard"):
        config.pluginmanager.register(hangguard, "hangguard")


def selected_targets(config: pytest.Config) -> list[Target]:
    option = config.getoption("--targets")
    if option is None:
        return [t for t in TARGETS.values() if t.unavailable() is None]
    names = [n.strip() for n in option.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise pytest.UsageError(f"unknown target(s) {', '.join(unknown)}; "
                                f"known: {', '.join(TARGETS)}")
    return [TARGETS[n] for n in names]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = ["behaviour targets: " + ", ".join(t.name for t in selected_targets(config))]
    for t in TARGETS.values():
        reason = t.unavailable()
        if reason:
            lines.append(f"  {t.name} unavailable: {reason}")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target_session" in metafunc.fixturenames:
        targets = selected_targets(metafunc.config)
        # Session scope: pytest groups the tests by target, so each target mounts once.
        metafunc.parametrize("target_session", targets, ids=[t.name for t in targets],
                             indirect=True, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "target_session" not in callspec.params:
            continue
        name = callspec.params["target_session"].name
        for mark in item.iter_markers("differs"):
            if mark.args and mark.args[0] == name:
                reason = mark.kwargs.get("reason") or (mark.args[1] if len(mark.args) > 1
                                                       else "")
                assert reason, f"{item.nodeid}: differs({name!r}) needs a written reason"
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"{name}: {reason}"))


class TargetSession:
    """The mount of one target shared by the tests of a session, restarted after a test
    that killed it (or for every test when the target asks for ``per_test``)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        # Not under pytest's tmp_path: its 0700 parents would keep the unprivileged user of
        # the permission tests out. A short path also keeps AF_UNIX socket paths legal.
        self.base = Path(tempfile.mkdtemp(prefix="bfs-"))
        os.chmod(self.base, 0o755)
        self.mount: TargetMount | None = None
        self.generation = 0
        self.count = 0

    def current(self) -> TargetMount:
        if self.mount is None:
            self.generation += 1
            base = self.base / f"g{self.generation}"
            base.mkdir(mode=0o755)
            self.mount = self.target.start(base)
        return self.mount

    def workdir(self, test_name: str, tree: dict[str, bytes | None] | None) -> Path:
        self.count += 1
        short = re.sub(r"[^A-Za-z0-9]+", "_", test_name.removeprefix("test_"))[:24]
        return self.current().workdir(f"{self.count}_{short}", tree)

    def after_test(self) -> None:
        """Fail the test if it left the target dead; recycle per-test mounts."""
        mount = self.mount
        if mount is None:
            return
        dead = mount.check_alive()
        if dead is not None or self.target.per_test:
            self.mount = None
            try:
                mount.close()
            finally:
                if dead is not None:
                    pytest.fail(f"{self.target.name} failed during this test: {dead}",
                                pytrace=False)

    def close(self) -> None:
        mount, self.mount = self.mount, None
        try:
            if mount is not None:
                mount.close()
        finally:
            # Never delete through a mount that is somehow still there.
            if not any(mount_fstype(str(p)) for p in self.base.glob("g*/*")):
                shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def target_session(request: pytest.FixtureRequest) -> Iterator[TargetSession]:
    # request.param comes from the parametrisation in pytest_generate_tests.
    target: Target = request.param
    reason = target.unavailable()
    if reason is not None:
        pytest.skip(f"{target.name}: {reason}")
    session = TargetSession(target)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def target_name(target_session: TargetSession) -> str:
    return target_session.target.name


@pytest.fixture
def fs(request: pytest.FixtureRequest, target_session: TargetSession) -> Iterator[Path]:
    """A fresh, empty (or ``tree``-seeded) directory on the target under test."""
    mark = request.node.get_closest_marker("tree")
    tree = mark.args[0] if mark else None
    path = target_session.workdir(request.node.originalname, tree)
    try:
        yield path
    finally:
        target_session.after_test()


@pytest.fixture
def behind(fs: Path, target_session: TargetSession) -> Path | None:
    """``fs`` as seen behind the mount, where what a test makes there lands (passthru's
    source, an overlay's upper layer: ``TargetMount.upper``); None where that is ``fs``
    itself (native). It may not exist yet (an overlay directory not copied up)."""
    mount = target_session.mount
    assert mount is not None
    return None if mount.upper is None else mount.upper / fs.name


# --- Early jobs (tests/earlyjobs.py) ---------------------------------------------------------

def _early_modules(session: pytest.Session) -> list[object]:
    seen: dict[str, object] = {}
    for item in getattr(session, "items", ()):  # none if collection failed
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_early"):
            seen.setdefault(module.__name__, module)
    return list(seen.values())


def pytest_collection_finish(session: pytest.Session) -> None:
    opt = session.config.option
    listing = (opt.collectonly or getattr(opt, "showfixtures", False)
               or getattr(opt, "show_fixtures_per_test", False) or getattr(opt, "setupplan", False))
    if listing or session.testsfailed:  # nothing will run, or collection failed
        return
    for module in _early_modules(session):
        module.start_early(session)  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for module in _early_modules(session):
        module.stop_early()  # type: ignore[attr-defined]
