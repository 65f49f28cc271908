"""The shared argv grammar: -o tokenizer escapes and quotes, flags, positionals."""

from __future__ import annotations

import pytest

from backingfs.options import (
    UsageError,
    escape_fuse_option,
    parse_argv,
    parse_option,
    split_colon_list,
    split_fuse_options,
    split_options,
    unescape,
)


@pytest.mark.parametrize(("s", "tokens"), [
    ("a,b,c", ["a", "b", "c"]),
    ("ro", ["ro"]),
    ("a,,b,", ["a", "b"]),
    ("", []),
    (r"lowerdir=/a\,b,upperdir=/u", ["lowerdir=/a,b", "upperdir=/u"]),
    (r"lowerdir=/a\:b:/c", [r"lowerdir=/a\:b:/c"]),
    (r"x=a\\,y", [r"x=a\\", "y"]),
    ('context="a,b",ro', ["context=a,b", "ro"]),
    ('context="system_u:object_r:t:s0:c1,c2"', ["context=system_u:object_r:t:s0:c1,c2"]),
    ('a="x,y"z,b', ["a=x,yz", "b"]),
])
def test_split_options(s: str, tokens: list[str]) -> None:
    assert split_options(s) == tokens


@pytest.mark.parametrize("bad", ['context="a,b', "a\\"])
def test_split_options_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        split_options(bad)


def test_escaped_colon_survives_to_lowerdir_split() -> None:
    (tok,) = split_options(r"lowerdir=/l\:1:/l2\,x:/l\\3")
    key, value = parse_option(tok)
    assert key == "lowerdir"
    assert split_colon_list(value) == ["/l:1", "/l2,x", "/l\\3"]


def test_split_colon_list_rejects_empty_element() -> None:
    with pytest.raises(UsageError):
        split_colon_list("/a::/b")
    with pytest.raises(UsageError):
        split_colon_list("")


def test_unescape() -> None:
    assert unescape(r"/a\:b\\c") == r"/a:b\c"


@pytest.mark.parametrize(("tok", "kv"), [
    ("ro", ("ro", None)),
    ("fsname=x", ("fsname", "x")),
    ("key=", ("key", "")),
    ("a=b=c", ("a", "b=c")),
])
def test_parse_option(tok: str, kv: tuple[str, str | None]) -> None:
    assert parse_option(tok) == kv


def test_parse_option_rejects_empty_key() -> None:
    with pytest.raises(UsageError):
        parse_option("=x")


def test_passthru_form() -> None:
    a = parse_argv(["-f", "-o", "ro,cache=never", "/src", "/mnt"], positional=2,
                   prog="p", ignore_leading=0)
    assert a.foreground and not a.debug
    assert a.positionals == ["/src", "/mnt"]
    assert a.options == ["ro", "cache=never"]


def test_repeated_and_attached_o_keep_order() -> None:
    a = parse_argv(["-oa,b", "/mnt", "-o", "c", "-od=1"], positional=1, prog="o")
    assert a.options == ["a", "b", "c", "d=1"]
    assert a.positionals == ["/mnt"]


def test_leading_source_ignored_for_overlay() -> None:
    a = parse_argv(["overlay", "/mnt", "-o", "lowerdir=/l"], positional=1, prog="o")
    assert a.positionals == ["/mnt"]
    assert a.ignored == ["overlay"]


def test_too_many_and_too_few_positionals() -> None:
    with pytest.raises(UsageError):
        parse_argv(["a", "b", "/mnt"], positional=1, prog="o")
    with pytest.raises(UsageError):
        parse_argv(["/src"], positional=2, prog="p")
    with pytest.raises(UsageError):
        parse_argv(["x", "/src", "/mnt"], positional=2, prog="p", ignore_leading=0)


def test_debug_implies_foreground_and_long_debug() -> None:
    a = parse_argv(["-d", "/mnt"], positional=1, prog="o")
    assert a.debug and a.foreground
    b = parse_argv(["--debug", "/mnt"], positional=1, prog="o")
    assert b.debug and b.foreground


def test_clustered_short_flags() -> None:
    a = parse_argv(["-fd", "/mnt"], positional=1, prog="o")
    assert a.foreground and a.debug
    b = parse_argv(["-fo", "ro", "/mnt"], positional=1, prog="o")
    assert b.foreground and b.options == ["ro"]


def test_version_and_help_skip_positional_check() -> None:
    assert parse_argv(["--version"], positional=1, prog="o").version
    assert parse_argv(["-V"], positional=2, prog="p").version
    assert parse_argv(["-h"], positional=2, prog="p").help
    assert parse_argv(["--help"], positional=1, prog="o").help


def test_double_dash_makes_rest_positional() -> None:
    a = parse_argv(["-f", "--", "-weird-src", "/mnt"], positional=2, prog="p",
                   ignore_leading=0)
    assert a.positionals == ["-weird-src", "/mnt"]


@pytest.mark.parametrize("argv", [["-x", "/mnt"], ["--bogus", "/mnt"], ["/mnt", "-o"]])
def test_unknown_flags_and_missing_o_argument(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_argv(argv, positional=1, prog="o")


def test_split_fuse_options() -> None:
    fuse, fs = split_fuse_options(
        ["allow_other", "ro", "fsname=x", "lowerdir=/l", "noauto", "x-systemd.automount",
         "defaults", "cache=never", "squash_to_root", "max_read=4096"])
    assert fuse == {"allow_other", "ro", "fsname=x", "max_read=4096"}
    assert fs == [("lowerdir", "/l"), ("cache", "never"), ("squash_to_root", None)]


def test_escape_fuse_option() -> None:
    assert escape_fuse_option("fsname=a,b\\c") == "fsname=a\\,b\\\\c"
