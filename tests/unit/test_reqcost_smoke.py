"""tools/reqcost.py smoke check: every request kind runs through the native session's
dispatch on both filesystems, with no mount, and a bad argument is a one-line error.

No timing assertions (the figures are whatever the machine gives).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backingfs.testing import REPO_ROOT

REQCOST = str(Path(REPO_ROOT) / "tools" / "reqcost.py")
sys.path.insert(0, str(Path(REPO_ROOT) / "tools"))
from reqcost import OPS  # noqa: E402


def run_reqcost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, REQCOST, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


@pytest.mark.parametrize("fs", ["passthru", "overlay"])
def test_every_request_kind_runs_inline(fs: str, tmp_path: Path) -> None:
    r = run_reqcost("--fs", fs, "--n", "30", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{fs}: µs per request")
    timed = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert set(timed) == set(OPS)
    assert all(v > 0 for v in timed.values())
    assert "failed" not in r.stderr  # no reply after the end: completions are waited for
    assert list(tmp_path.iterdir()) == []  # its scratch tree is removed


def test_unknown_kind_is_a_one_line_error(tmp_path: Path) -> None:
    r = run_reqcost("--ops", "getattr,nosuch", "--dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"reqcost: unknown request kind 'nosuch'; known: "
                                f"{', '.join(OPS)}")


@pytest.mark.parametrize("between", ["poll", "sleep", "wake"])
def test_between_modes_run_and_say_so(between: str, tmp_path: Path) -> None:
    if between == "wake" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--between wake needs two CPUs")
    r = run_reqcost("--fs", "overlay", "--n", "20", "--ops", "getattr,create", "--between",
                    between, "--gap", "10", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith(f", {between} 10 µs between requests")
    assert [line.split()[0] for line in lines[1:]] == ["getattr", "create"]
    assert r.stderr == ""  # the waker is ended quietly; nothing replies after the end
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gap", ["0", "-5", "2000000"])
def test_bad_gap_is_a_one_line_error(gap: str, tmp_path: Path) -> None:
    r = run_reqcost("--between", "poll", "--gap", gap, "--dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == "reqcost: --gap must be more than 0 and at most 1000000 µs"
