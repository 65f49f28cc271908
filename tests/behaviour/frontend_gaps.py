"""What the pyfuse3 front-end cannot do that the native session does: a ``differs`` mark
for both of its battery targets at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

#: The battery's targets on the pyfuse3 front-end (backingfs.testing).
PYFUSE3_TARGETS = ("passthru-pyfuse3", "overlay-lower-pyfuse3")


def differs_on_pyfuse3(reason: str) -> Callable[[F], F]:
    """Mark a test as legitimately different on the pyfuse3 targets, for ``reason``
    (a strict xfail there: tests/conftest.py)."""
    def mark(fn: F) -> F:
        for name in PYFUSE3_TARGETS:
            fn = pytest.mark.differs(name, reason=reason)(fn)
        return fn
    return mark
