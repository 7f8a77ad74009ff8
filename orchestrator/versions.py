"""Proxy versions: the one place that says what a version string is and how two of them compare.

A GaussDB(for MySQL) proxy version is a dotted string of numbers such as ``2.24.03.000`` (the
``proxy-version`` API and the upgrade call's ``source_version``/``target_version`` use this form; see
``docs/api-contract`` in the shared docs). Versions compare part by part as integers, so
``2.24.03.000 > 2.23.12.000`` and ``2.10 > 2.9``, and trailing zero parts do not count, so
``2.24 == 2.24.0 == 2.24.00.000`` and ``2.24.3 == 2.24.03.000``.

The accepted shape is deliberately narrow (2 to 5 parts of 1 to 9 ASCII digits): the inventory uses the
same pattern, so anything an operator may write as a version has a key, and nothing exotic (full-width
digits, a trailing newline, a sign) sneaks through ``int()``.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "VERSION_PATTERN",
    "VersionKey",
    "is_version",
    "same_version",
    "try_version_key",
    "version_key",
]

VersionKey = tuple[int, ...]

# Plain ``re`` syntax that the Rust regex engine of pydantic-core reads the same way (no ``\d``: in Python
# it matches any Unicode digit).
VERSION_PATTERN = r"[0-9]{1,9}(?:\.[0-9]{1,9}){1,4}"
_VERSION = re.compile(VERSION_PATTERN)
_ECHO_MAX = 60


def is_version(v: str) -> bool:
    """True when ``v`` is a dotted version of 2 to 5 parts, each 1 to 9 ASCII digits (no other text)."""
    return _VERSION.fullmatch(v) is not None


@lru_cache(maxsize=1024)
def version_key(v: str) -> VersionKey:
    """The numeric comparison key of a dotted version: ``version_key("2.24.03.000") == (2, 24, 3)``.

    Trailing zero parts are dropped (at least one part is kept: ``"0.0" -> (0,)``), so equal versions
    spelled differently get equal keys. Raises ``ValueError`` (naming the value, cut to 60 characters)
    for anything that is not 2 to 5 dot-separated groups of 1 to 9 ASCII digits. Cached: a fleet repeats
    a handful of versions many thousand times.
    """
    if not _VERSION.fullmatch(v):
        shown = repr(v) if len(repr(v)) <= _ECHO_MAX else repr(v)[: _ECHO_MAX - 3] + "..."
        raise ValueError(f"not a dotted version like 2.23.12.000: {shown}")
    parts = [int(p) for p in v.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def try_version_key(v: str | None) -> VersionKey | None:
    """``version_key(v)``, or None when ``v`` is None or not a version (a spelling we cannot read is an
    unknown, which callers must not turn into a verdict)."""
    if v is None:
        return None
    try:
        return version_key(v)
    except ValueError:
        return None


def same_version(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name the same version: identical strings, or both parse to equal keys
    (``same_version("2.24", "2.24.00.000")``). Two different unparseable strings are not the same."""
    if a == b:
        return True
    ka, kb = try_version_key(a), try_version_key(b)
    return ka is not None and ka == kb
