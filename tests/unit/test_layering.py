"""The package rules of DESIGN §1 and §7, checked on the source: backingfs imports neither
filesystem, the filesystems never import each other, and only the bridge imports pyfuse3."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_backingfs_imports_no_filesystem() -> None:
    for path in sources("backingfs"):
        assert not imported_top_modules(path) & {"overlay", "passthru"}, path


def test_filesystems_never_import_each_other() -> None:
    for pkg, other in (("overlay", "passthru"), ("passthru", "overlay")):
        for path in sources(pkg):
            assert other not in imported_top_modules(path), path


def test_only_the_bridge_imports_pyfuse3() -> None:
    importers = {path.relative_to(ROOT).as_posix()
                 for pkg in ("backingfs", "overlay", "passthru") for path in sources(pkg)
                 if "pyfuse3" in imported_top_modules(path)}
    assert importers == {"backingfs/bridge.py"}
