"""tools/bench.py smoke check: the CLI runs a tiny workload end to end and reports it.

Native target and the meta workload only: no mount, no network, no timing assertions (the
numbers are whatever the machine gives; only their presence and shape are checked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from backingfs.testing import REPO_ROOT

BENCH = str(Path(REPO_ROOT) / "tools" / "bench.py")


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)


def test_quick_meta_on_native_reports_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = run_bench("--quick", "--targets", "native", "--workloads", "meta", "--files", "50",
                  "--dir", str(tmp_path / "work"), "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "### meta: create (files/s, higher is better)" in r.stdout
    assert "| native |" in r.stdout
    assert "meta run 1/1: native" in r.stderr          # progress goes to stderr
    data = json.loads(out.read_text())
    assert data["config"]["files"] == 50 and data["config"]["runs"] == 1
    for metric in ("create", "stat", "readdir", "unlink"):
        values = data["results"]["meta"][metric]["native"]["values"]
        assert len(values) == 1 and values[0] > 0
    # The work directory (data and per-run scratch) is removed without --keep-data.
    assert not (tmp_path / "work" / "data").exists()
    assert list((tmp_path / "work").glob("run-*")) == []


def test_unknown_target_is_a_one_line_error(tmp_path: Path) -> None:
    r = run_bench("--quick", "--targets", "nosuchfs", "--dir", str(tmp_path))
    assert r.returncode != 0
    assert "unknown target 'nosuchfs'" in r.stderr


def test_rtt_workload_times_statfs_calls(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = run_bench("--quick", "--targets", "native", "--workloads", "rtt",
                  "--dir", str(tmp_path / "work"), "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "### rtt: statfs (calls/s, higher is better)" in r.stdout
    values = json.loads(out.read_text())["results"]["rtt"]["statfs"]["native"]["values"]
    assert len(values) == 1 and values[0] > 0


def test_halt_poll_ns_is_set_for_the_run_and_restored(tmp_path: Path) -> None:
    knob = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    before = knob.read_text() if knob.exists() else None
    r = run_bench("--quick", "--targets", "native", "--workloads", "rtt", "--halt-poll-ns",
                  "12345", "--dir", str(tmp_path / "work"))
    if before is None or not os.access(knob, os.W_OK):
        assert r.returncode != 0
        assert r.stderr.strip().splitlines()[-1].startswith("bench: --halt-poll-ns: cannot set")
        return
    assert r.returncode == 0, r.stderr
    assert f"guest_halt_poll_ns set to 12345 for this run (machine value {before.strip()}" \
        in r.stdout
    assert knob.read_text() == before


def test_negative_halt_poll_ns_is_refused(tmp_path: Path) -> None:
    r = run_bench("--quick", "--targets", "native", "--halt-poll-ns", "-1",
                  "--dir", str(tmp_path))
    assert r.returncode != 0
    assert "--halt-poll-ns must be 0 or more" in r.stderr
