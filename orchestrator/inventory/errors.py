"""One-line ``file:line: field: message`` errors for input files, and the collector that gathers them.

A loader reports every problem it can find in one read (sorted by line), so an operator fixes a file in one
round instead of one error per run; problems that make the rest unreadable (bad bytes, YAML syntax) stop
the read. Echoed values are ``repr``-escaped and cut, so a hostile value can neither break the one-line
shape nor flood the terminal.
"""

from __future__ import annotations

import difflib
from typing import NoReturn

from orchestrator.errors import InputErrors

__all__ = [
    "MAX_LISTED",
    "FileError",
    "FileErrors",
    "InventoryError",
    "InventoryErrors",
    "Problems",
    "close",
    "echo",
    "got",
    "suggest",
]

# A 100,000-entry file with one systematic mistake would print 100,000 lines: list this many, count the rest.
MAX_LISTED = 1000
_ECHO_MAX = 60


def one_line(text: str) -> str:
    """``text`` with its line breaks turned into spaces."""
    return " ".join(text.splitlines())


def echo(value: object) -> str:
    """``repr(value)`` cut to 60 characters: escapes newlines and invisible characters, and a hostile value
    cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= _ECHO_MAX else text[: _ECHO_MAX - 3] + "..."


def got(value: str) -> str:
    """``(got '...')``, naming the first non-ASCII character: a Cyrillic 'а' looks like 'a' when echoed."""
    odd = next((c for c in value if not c.isascii()), None)
    note = f", with non-ASCII U+{ord(odd):04X}" if odd else ""
    return f"(got {echo(value)}{note})"


def close(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    """The choice ``word`` was probably meant to be (case-insensitive, difflib ratio >= 0.6), if any."""
    found = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return found[0] if found else None


def suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    found = close(word, choices)
    return f"; did you mean {found!r}?" if found else ""


class FileError(InputErrors):
    """One problem in an input file; ``str()`` is the single line ``path:line: field: message`` (the line
    and field parts are left out when unknown: an empty file has no line, a bad byte no field)."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        super().__init__(path, line, field, message)
        self.path = path
        self.line = line
        self.field = field
        self.message = message

    @property
    def errors(self) -> list[FileError]:
        """Every problem found; lets a caller print one line each without caring which class it caught."""
        return [self]

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return one_line(": ".join(p for p in (where, self.field, self.message) if p))


class FileErrors(FileError):
    """All problems found in one file (at least one), in line order; ``str()`` is the first one plus
    ``(and N more)``. Its own path/line/field/message are the first problem's."""

    def __init__(self, errors: list[FileError]) -> None:
        if not errors:
            raise ValueError(f"{type(self).__name__} needs at least one error")
        first = errors[0]
        Exception.__init__(self, list(errors))
        self.path, self.line, self.field, self.message = first.path, first.line, first.field, first.message
        self._errors = list(errors)

    @property
    def errors(self) -> list[FileError]:
        """The problems, in line order (a copy)."""
        return list(self._errors)

    def __str__(self) -> str:
        more = len(self._errors) - 1
        first = str(self._errors[0])
        return f"{first} (and {more} more)" if more else first


class InventoryError(FileError):
    """One problem in an inventory file (see ``FileError``)."""


class InventoryErrors(FileErrors, InventoryError):
    """All problems found in one inventory file: what ``load_inventory`` raises (also an InventoryError)."""


class Problems:
    """Collects the problems of one file, deduplicated (a bad default reported through every entry shows
    once), and raises them as one ``group`` exception. ``fail_fast`` raises at the first problem (used when
    re-reading a file that was already validated). Past ``MAX_LISTED`` problems only a count is kept, so a
    huge file with a systematic mistake costs neither memory nor a screen per entry."""

    def __init__(
        self,
        path: str,
        *,
        fail_fast: bool = False,
        error: type[FileError] = InventoryError,
        group: type[FileErrors] = InventoryErrors,
    ) -> None:
        self.path = path
        self.fail_fast = fail_fast
        self.items: list[FileError] = []
        self.omitted = 0
        self._error = error
        self._group = group
        self._seen: set[tuple[int | None, str | None, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, line: int | None, field: str | None, message: str) -> None:
        """Record one problem (1-based ``line``, None when the problem has no line)."""
        key = (line, field, message)
        if key in self._seen:
            return
        if len(self.items) >= MAX_LISTED:
            self.omitted += 1
            return
        self._seen.add(key)
        self.items.append(self._error(self.path, line, field, message))
        if self.fail_fast:
            self.raise_if_any()

    def fatal(self, line: int | None, field: str | None, message: str) -> NoReturn:
        """Record one problem and raise everything gathered so far."""
        self.add(line, field, message)
        self.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover

    def only(self, line: int | None, field: str | None, message: str) -> NoReturn:
        """Raise this problem alone, forgetting the others: for a problem (YAML syntax, a second document)
        after which what was read so far may mean something else."""
        self.items.clear()
        self._seen.clear()
        self.omitted = 0
        self.fatal(line, field, message)

    def raise_if_any(self) -> None:
        """Raise the ``group`` exception (problems sorted by line) if any problem was recorded."""
        if not self.items:
            return
        items = sorted(self.items, key=lambda e: e.line or 0)
        if self.omitted:
            more = f"{self.omitted} more problem(s) not listed; fix the ones above and validate again"
            items.append(self._error(self.path, None, None, more))
        raise self._group(items)
