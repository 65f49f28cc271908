"""The shared argv grammar of our mount commands: ``-o`` tokenizer, flags, positionals.

Both CLIs accept what mount.fuse3 and fuse-overlayfs users type::

    PROG [-f] [-d|--debug] [-o OPTS]... [-h|--help] [-V|--version] [--] [SOURCE] ARGS...

- ``-o`` may repeat, be attached (``-oro``) or separate (``-o ro``); the options of every
  ``-o`` are concatenated in order (s3ql's parser expanded only the first one).
- ``OPTS`` is a comma list. ``\\,`` is a literal comma; a double-quoted stretch
  (``context="a,b"``) keeps its commas and loses its quotes; every other backslash pair
  (``\\:``, ``\\\\``) is kept verbatim for the option's own parser, e.g. ``split_colon_list``
  for ``lowerdir=``. This is the kernel's overlayfs convention (escapes survive the comma
  split, the colon split unescapes).
- ``-d`` implies ``-f``, as in libfuse.
- A program taking ``positional`` bare arguments also accepts ``ignore_leading`` more in
  front and drops them: mount.fuse3 passes the fstab "device" first (overlay's ``MOUNTPOINT``
  then arrives as ``none MOUNTPOINT``).

Option tables live with the filesystems (``overlay/params.py``, ``passthru/params.py``);
``split_fuse_options`` sorts what libfuse itself understands from what they must parse.
Errors are ``UsageError`` (exit status 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: Exit status of a command-line error.
USAGE_EXIT = 2


class UsageError(Exception):
    """Bad command line: the CLI prints ``prog: msg`` on one line and exits 2."""

    exitcode = USAGE_EXIT

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def split_options(s: str) -> list[str]:
    """Split one ``-o`` argument into option tokens (see the module docstring).

    Empty tokens (``a,,b``, a trailing comma) are dropped. An unterminated quote or a
    trailing lone backslash is a UsageError.
    """
    tokens: list[str] = []
    cur: list[str] = []
    in_quotes = False
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n:
                raise UsageError(f"trailing backslash in option string {s!r}")
            nxt = s[i + 1]
            # Only the comma is ours to unescape; the rest belongs to the option's parser.
            cur.append("," if nxt == "," else c + nxt)
            i += 2
            continue
        if c == '"':
            in_quotes = not in_quotes
        elif c == "," and not in_quotes:
            if cur:
                tokens.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if in_quotes:
        raise UsageError(f"unterminated quote in option string {s!r}")
    if cur:
        tokens.append("".join(cur))
    return tokens


def split_colon_list(s: str) -> list[str]:
    """Split a ``lowerdir=``-style value on unescaped colons and unescape each element
    (``\\:`` -> ``:``, ``\\\\`` -> ``\\``, ``\\X`` -> ``X``). Empty elements are an error:
    ``a::b`` most likely lost a directory."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n:
                raise UsageError(f"trailing backslash in {s!r}")
            cur.append(s[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    if any(not p for p in parts):
        raise UsageError(f"empty element in colon-separated list {s!r}")
    return parts


def unescape(s: str) -> str:
    """Resolve backslash pairs in a single-valued option (``upperdir=``, ``workdir=``)."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if s[i] == "\\" and i + 1 < n:
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_option(tok: str) -> tuple[str, str | None]:
    """``key=value`` -> (key, value); ``key`` -> (key, None); ``key=`` -> (key, "")."""
    key, sep, value = tok.partition("=")
    if not key:
        raise UsageError(f"option without a name: {tok!r}")
    return key, (value if sep else None)


@dataclass
class ParsedArgs:
    prog: str
    #: The program's bare arguments, exactly ``positional`` of them (unless help/version).
    positionals: list[str] = field(default_factory=list)
    #: Leading bare arguments dropped (mount.fuse3's source for overlay).
    ignored: list[str] = field(default_factory=list)
    #: Every ``-o`` token, in command-line order.
    options: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    help: bool = False
    version: bool = False


_SHORT_FLAGS = {"f": "foreground", "d": "debug", "h": "help", "V": "version"}
_LONG_FLAGS = {"--debug": "debug", "--help": "help", "--version": "version",
               "--foreground": "foreground"}


def parse_argv(argv: Sequence[str], *, positional: int, prog: str,
               ignore_leading: int = 1) -> ParsedArgs:
    """Parse ``argv`` (without the program name). Raises UsageError.

    With ``-h`` or ``-V`` the positional count is not checked: the caller prints and exits.
    Short flags may be clustered (``-fd``); ``-o`` takes the rest of its word or the next.
    """
    args = ParsedArgs(prog=prog)
    bare: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            bare.extend(argv[i:])
            break
        if a.startswith("--"):
            name = _LONG_FLAGS.get(a)
            if name is None:
                raise UsageError(f"unknown option {a!r}")
            setattr(args, name, True)
            continue
        if a.startswith("-") and a != "-":
            j = 1
            while j < len(a):
                c = a[j]
                if c == "o":
                    value = a[j + 1:]
                    if not value:
                        if i >= len(argv):
                            raise UsageError("option -o requires an argument")
                        value = argv[i]
                        i += 1
                    args.options.extend(split_options(value))
                    break
                name = _SHORT_FLAGS.get(c)
                if name is None:
                    raise UsageError(f"unknown option '-{c}'")
                setattr(args, name, True)
                j += 1
            continue
        bare.append(a)
    if args.debug:
        args.foreground = True
    if args.help or args.version:
        args.positionals = bare
        return args
    if not positional <= len(bare) <= positional + ignore_leading:
        if len(bare) < positional:
            raise UsageError(f"expected {positional} argument(s), got {len(bare)}")
        raise UsageError(f"unexpected argument {bare[0]!r}")
    cut = len(bare) - positional
    args.ignored, args.positionals = bare[:cut], bare[cut:]
    return args


#: Options libfuse (3.14) passes to the kernel or fusermount3 itself, without a value.
FUSE_FLAG_OPTIONS = frozenset({
    "allow_other", "allow_root", "auto_unmount", "default_permissions", "blkdev",
    "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
    "async", "sync", "dirsync", "atime", "noatime", "diratime", "nodiratime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
})
#: libfuse options that take ``=value``.
FUSE_VALUE_OPTIONS = frozenset({
    "fsname", "subtype", "max_read", "blksize",
    "context", "fscontext", "defcontext", "rootcontext",
})
#: Front-end choices the runner takes out before mounting (``runner.FRONTEND_OPTIONS``):
#: which session serves the mount, and whether it may use kernel passthrough.
FRONTEND_OPTIONS = frozenset({"session", "passthrough", "uring"})
#: fstab/mount(8) bookkeeping that reaches a helper but means nothing to a filesystem.
IGNORED_OPTIONS = frozenset({
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
    "_netdev", "nofail", "comment",
})


def is_fuse_option(tok: str) -> bool:
    key, value = parse_option(tok)
    if value is None:
        return key in FUSE_FLAG_OPTIONS
    return key in FUSE_VALUE_OPTIONS or key in FRONTEND_OPTIONS


def is_ignored_option(tok: str) -> bool:
    key, _ = parse_option(tok)
    return key in IGNORED_OPTIONS or key.startswith("x-")


def split_fuse_options(tokens: Iterable[str]) -> tuple[set[str], list[tuple[str, str | None]]]:
    """Sort tokens into (libfuse options for ``pyfuse3.init``, filesystem options in order).

    fstab bookkeeping (``defaults``, ``noauto``, ``x-*``, ...) is dropped. A filesystem
    that also wants to see a FUSE option (``ro``) reads it from the first set.
    """
    fuse: set[str] = set()
    fs: list[tuple[str, str | None]] = []
    for tok in tokens:
        if is_ignored_option(tok):
            continue
        if is_fuse_option(tok):
            fuse.add(tok)
        else:
            fs.append(parse_option(tok))
    return fuse, fs


def escape_fuse_option(tok: str) -> str:
    """Escape a token for libfuse's own ``-o`` parser, which splits on commas again."""
    return tok.replace("\\", "\\\\").replace(",", "\\,")
