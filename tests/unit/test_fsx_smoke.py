"""tools/fsx.py smoke check: the data-integrity exerciser runs clean on native and on our
FUSE targets with a fixed seed, and its checker does notice a file that disagrees with the
model (a deliberate model corruption must end the run with exit 1 and a report).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backingfs.testing import REPO_ROOT, TARGETS, mount_fstype

FSX = str(Path(REPO_ROOT) / "tools" / "fsx.py")
SEED = "4242"
OPS = "3000"


def run_fsx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, FSX, *args], capture_output=True, text=True,
                          timeout=90, cwd=REPO_ROOT)


def nothing_mounted_under(base: Path) -> bool:
    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return not any(line.split()[4].startswith(prefix) for line in f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", ["native", "passthru", "overlay-lower"])
def test_fixed_seed_runs_clean(target: str, tmp_path: Path) -> None:
    why = TARGETS[target].unavailable()
    if why:
        pytest.skip(why)
    trace = tmp_path / "trace.jsonl"
    r = run_fsx("--target", target, "--seed", SEED, "--ops", OPS, "--dir", str(tmp_path),
                "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    assert f"OK {OPS} ops" in r.stderr
    lines = trace.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["seed"] == int(SEED) and head["target"] == target
    assert len(lines) == 1 + int(OPS)
    ops = {json.loads(line)["op"] for line in lines[1:]}
    # Every kind of operation the tool promises was exercised.
    assert {"read", "write", "append", "ftruncate", "truncate", "mapwrite", "mapread",
            "fsync", "reopen"} <= ops
    assert nothing_mounted_under(tmp_path)
    assert list(tmp_path.glob("fsx-*")) == []   # the mount base is removed after a clean run


@pytest.mark.timeout(120)
def test_checker_detects_a_model_mismatch_and_replays(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    r = run_fsx("--target", "native", "--seed", SEED, "--ops", "1000", "--dir",
                str(tmp_path), "--trace", str(trace), "--self-test-corrupt", "300")
    assert r.returncode == 1, r.stderr
    assert "CORRUPTION at op #300 full-check" in r.stderr
    assert "expected [" in r.stderr and "got      [" in r.stderr
    assert f"replay: python tools/fsx.py --replay {trace}" in r.stderr
    # The trace stops at the failing op; replaying it (without the injected flip) is clean.
    assert len(trace.read_text().splitlines()) == 1 + 300
    r = run_fsx("--replay", str(trace), "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "OK 300 ops" in r.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_fsx("--no-such-flag").returncode == 2
    assert run_fsx("--target", "no-such-target").returncode == 2
    assert run_fsx("--target", "native", "--opts", "writeback").returncode == 2
    (tmp_path / "bad.jsonl").write_text("{}\n")
    assert run_fsx("--replay", str(tmp_path / "bad.jsonl")).returncode == 2


def test_path_mode_needs_no_mount(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x" * 5000)     # adopted as the model's starting content
    r = run_fsx("--path", str(f), "--seed", SEED, "--ops", "500")
    assert r.returncode == 0, r.stderr
    assert "initial size 5000" in r.stderr
    assert mount_fstype(str(tmp_path)) is None
