"""Differential runs in CI: random namespace and data operations on passthru vs a plain
directory and on our overlay vs kernel overlayfs over identical layers, every outcome and
the touched paths compared after each op, remounts every 100 ops (diffrun.py says what is
compared and what is not, and why).

Fixed seeds by default; ``pytest tests/differential --diff-seed N --diff-ops N`` runs any
other (see conftest.py). A difference fails the test with the runner's report: seed, op
index and op, both outcomes, the last 20 ops, and where the layers and the op log were kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import diffrun
import pytest

SEEDS = (101, 202, 303)
OPS = 400
REMOUNT_EVERY = 100


def option(config: pytest.Config, name: str) -> Any:
    # default= also covers a session where this directory's conftest was not read.
    return config.getoption(name, default=None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        seed = option(metafunc.config, "--diff-seed")
        metafunc.parametrize("seed", SEEDS if seed is None else (seed,))


@pytest.fixture
def ops(request: pytest.FixtureRequest) -> int:
    return option(request.config, "--diff-ops") or OPS


@pytest.fixture
def remount_every(request: pytest.FixtureRequest) -> int:
    value = option(request.config, "--diff-remount-every")
    return REMOUNT_EVERY if value is None else value


def run_or_fail(pair: str, seed: int, ops: int, remount_every: int,
                lower_hardlink: bool = False) -> None:
    why = diffrun.unavailable(pair)
    if why:
        pytest.skip(f"{pair}: {why}")
    try:
        diffrun.run_pair(pair, seed, ops, remount_every=remount_every,
                         lower_hardlink=lower_hardlink)
    except diffrun.Mismatch as m:
        report = m.report
    else:
        return
    pytest.fail(report, pytrace=False)   # outside the except: no chained traceback


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pair", ["passthru", "overlay"])
def test_same_as_reference(pair: str, seed: int, ops: int, remount_every: int) -> None:
    run_or_fail(pair, seed, ops, remount_every)


@pytest.mark.timeout(240)
def test_overlay_with_a_lower_hard_link_same_as_kernel(ops: int, remount_every: int) -> None:
    # One seed: the names of a lower hard link, copied up or not, renamed, linked again.
    run_or_fail("overlay", 404, ops, remount_every, lower_hardlink=True)


@pytest.mark.timeout(60)
def test_a_difference_is_reported_with_seed_op_and_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison is live: a target that writes other bytes than asked is caught at
    that op, and the report carries what is needed to replay it."""
    why = diffrun.unavailable("passthru")
    if why:
        pytest.skip(why)
    real_apply = diffrun.apply
    bad: list[int] = []

    def lying_apply(side: diffrun.Side, op: dict[str, Any]) -> Any:
        if isinstance(side, diffrun.FuseSide) and op["op"] == "write" and not bad:
            # zeros instead of the data, until one such write lands
            result = real_apply(side, dict(op, data=bytes(len(op["data"]))))
            bad.append(1)
            return result
        return real_apply(side, op)

    monkeypatch.setattr(diffrun, "apply", lying_apply)
    with pytest.raises(diffrun.Mismatch) as info:
        diffrun.run_pair("passthru", 7, 200, remount_every=50)
    report = info.value.report
    assert bad, "no write op was generated"
    assert "DIFFERENCE in pair passthru, seed 7, op #" in report
    assert " write path=" in report and "differs" in report and "data:" in report
    assert "last " in report and "rerun: python -m tests.differential.diffrun" in report
    base = Path(report.rsplit("(ops.log): ", 1)[1].strip())
    assert (base / "ops.log").exists()
    assert diffrun.nothing_mounted_under(base)   # torn down, layers kept for the post-mortem
    diffrun.unprotect(base)
    shutil.rmtree(base)


def test_lower_hard_link_on_pyfuse3_is_refused_as_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A documented difference (README) is not reported as a mismatch: the run refuses."""
    with pytest.raises(SystemExit) as exc:
        diffrun.main(["--pair", "overlay", "--ops", "1", "--opts", "session=pyfuse3",
                      "--lower-hardlink"])
    assert exc.value.code == 2
    assert "cannot be compared on session=pyfuse3" in capsys.readouterr().err
