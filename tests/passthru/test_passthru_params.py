"""passthru.params: the option table (no mount)."""

from __future__ import annotations

import pytest

from backingfs.options import UsageError
from passthru import params


def test_defaults_are_auto_without_writeback() -> None:
    p = params.parse([])
    assert (p.cache, p.writeback, p.entry_timeout, p.keep_cache) == ("auto", False, 1.0, False)


@pytest.mark.parametrize(("mode", "timeout", "keep_cache"),
                         [("never", 0.0, False), ("auto", 1.0, False),
                          ("always", 86400.0, True)])
def test_cache_modes(mode: str, timeout: float, keep_cache: bool) -> None:
    p = params.parse([("cache", mode)])
    assert (p.entry_timeout, p.attr_timeout, p.negative_timeout) == (timeout,) * 3
    assert p.keep_cache is keep_cache


def test_timeout_overrides_the_mode_and_later_options_win() -> None:
    p = params.parse([("cache", "always"), ("timeout", "2.5"), ("writeback", None),
                      ("nowriteback", None)])
    assert (p.entry_timeout, p.keep_cache, p.writeback) == (2.5, True, False)


@pytest.mark.parametrize("option", [("cache", "sometimes"), ("cache", None),
                                    ("timeout", "x"), ("timeout", "-1"), ("timeout", "inf"),
                                    ("timeout", None), ("writeback", "1"), ("noacl", "1"),
                                    ("bogus", None)])
def test_bad_options(option: tuple[str, str | None]) -> None:
    with pytest.raises(UsageError):
        params.parse([option])


def test_default_permissions_is_always_requested() -> None:
    assert "default_permissions" in params.DEFAULT_FUSE_OPTIONS


def test_acl_is_on_unless_noacl() -> None:
    assert params.parse([]).acl is True
    assert params.parse([("noacl", None)]).acl is False
    assert params.parse([("noacl", None), ("acl", None)]).acl is True
