"""Command-line options of the differential runs (tests/differential).

    pytest tests/differential --diff-seed N [--diff-ops N] [--diff-remount-every N]

``--diff-seed`` replaces the fixed CI seeds with one seed, ``--diff-ops`` the op count.
The options are registered here, not in tests/conftest.py, under names of their own; pass
them with a tests/differential path on the command line (pytest reads a directory's
conftest options only when that directory is named).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("differential", "differential runs (tests/differential)")
    group.addoption("--diff-seed", type=int, default=None,
                    help="run the differential pairs with this seed only")
    group.addoption("--diff-ops", type=int, default=None,
                    help="operations per differential run (default 400)")
    group.addoption("--diff-remount-every", type=int, default=None,
                    help="remount both sides every N ops (default 100; 0: only at the end)")
