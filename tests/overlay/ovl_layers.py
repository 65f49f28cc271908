"""OvlLayers: the layer directories of one overlay test and the mounts made over them.

Its own module (not conftest.py) so tests can import it by a name no other test directory
uses: two conftest modules cannot both be imported as ``conftest``.
"""

from __future__ import annotations

from pathlib import Path

from backingfs.testing import Mount, cli_argv, start_daemon


class OvlLayers:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.lower1 = tmp_path / "lower1"
        self.lower2 = tmp_path / "lower2"
        self.upper = tmp_path / "upper"
        self.work = tmp_path / "work"
        self.mnt = tmp_path / "mnt"
        for d in (self.lower1, self.lower2, self.upper, self.work, self.mnt):
            d.mkdir()
        self.mounts: list[Mount] = []
        self._last: tuple[tuple[str, ...], int, bool, dict[str, str] | None] | None = None

    def options(self, *extra: str, lowers: int = 2, upper: bool = True) -> str:
        layers = [self.lower1, self.lower2][:lowers]
        opts = ["lowerdir=" + ":".join(str(p) for p in layers)]
        if upper:
            opts += [f"upperdir={self.upper}", f"workdir={self.work}"]
        return ",".join(opts + list(extra))

    def mount(self, *extra: str, lowers: int = 2, upper: bool = True,
              env: dict[str, str] | None = None) -> Path:
        self._last = (extra, lowers, upper, env)
        n = len(self.mounts)
        m = start_daemon(cli_argv("overlay", "-o", self.options(*extra, lowers=lowers,
                                                                 upper=upper), str(self.mnt)),
                         str(self.mnt), stderr_path=str(self.root / f"daemon{n}.stderr"),
                         env=env)
        self.mounts.append(m)
        m.wait_live(timeout=10)
        return self.mnt

    def unmount(self) -> None:
        m = self.mounts[-1]
        m.unmount_clean(timeout=20)
        assert "Traceback" not in m.stderr_text(), m.stderr_text()

    def remount(self) -> Path:
        assert self._last is not None
        extra, lowers, upper, env = self._last
        self.unmount()
        return self.mount(*extra, lowers=lowers, upper=upper, env=env)

    def work_entries(self) -> list[str]:
        return sorted(p.name for p in (self.work / "work").iterdir())
