"""PassthruMount: a live passthru mount in a test, and how to read its statistics."""

from __future__ import annotations

import ast
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backingfs.testing import Mount


@dataclass
class PassthruMount:
    mount: Mount
    source: Path
    mnt: Path

    def statistics(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGUSR1, then the daemon's freshly logged ``statistics: {...}`` line."""
        marker = "statistics: "
        before = self.mount.stderr_text().count(marker)
        os.kill(self.mount.pid, signal.SIGUSR1)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout
        while (text := self.mount.stderr_text()).count(marker) <= before:
            assert time.monotonic() < deadline, f"no statistics logged:\n{text}"
            time.sleep(0.01)
        line = text.split(marker)[before + 1].splitlines()[0]
        return ast.literal_eval(line)


StartPassthru = Callable[..., PassthruMount]
