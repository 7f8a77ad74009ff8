"""A fixed-width text table for long listings (the report of a run: thousands of rows).

rich's ``Table`` measures and wraps every cell through its segment machinery, about 0.7 ms a row here (a
3,000-job report took over 2 s); this writer lays out columns of known widths with ``textwrap`` and
writes plain lines, about 30 times faster. Nothing is interpreted: outside text is written as it is,
except control characters (an ESC from a cloud message must not recolour the terminal), which are shown
as ``\\xNN``. Cells of ``clip`` columns (ids, times) are never wrapped: a line longer than its column is
shortened at the end with an ellipsis; in wrapping columns a word longer than the column (an id quoted in a
reason) is shortened the same way, never broken across lines.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from orchestrator.reporting.text import shorten

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str) -> str:
    """``text`` with control characters (all but newline and tab) spelled ``\\xNN``; tabs become a space."""
    text = text.replace("\t", " ")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text


class Clipped(str):
    """A line of a wrapping column that must not wrap (an id under a reason): shortened instead."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Column:
    """A column: ``header``; ``width`` in characters; ``clip`` (never wrap: shorten lines with an
    ellipsis) or wrap at spaces; ``right`` aligned."""

    header: str
    width: int
    clip: bool = True
    right: bool = False


class PlainTable:
    """Writes rows of cells (each cell a list of lines) under a header, columns two spaces apart."""

    GAP = "  "

    def __init__(self, columns: Sequence[Column], out: TextIO) -> None:
        self.columns = list(columns)
        self.out = out

    def _lines(self, col: Column, cell: Sequence[str]) -> list[str]:
        lines: list[str] = []
        for raw in cell:
            for line in printable(raw).split("\n"):
                if col.clip or len(line) <= col.width or isinstance(raw, Clipped):
                    lines.append(shorten(line, col.width))
                else:
                    # a word longer than the column (an id in a reason) is shortened like an id in its own
                    # column, never broken across lines
                    wrapped = textwrap.wrap(line, col.width, break_on_hyphens=False, break_long_words=False)
                    lines.extend(shorten(w, col.width) for w in wrapped or [""])
        return lines

    def _emit(self, cells: Sequence[list[str]]) -> str:
        height = max((len(c) for c in cells), default=1) or 1
        out = []
        for i in range(height):
            parts = []
            for col, lines in zip(self.columns, cells, strict=True):
                text = lines[i] if i < len(lines) else ""
                parts.append(text.rjust(col.width) if col.right else text.ljust(col.width))
            out.append(self.GAP.join(parts).rstrip())
        return "\n".join(out) + "\n"

    def header(self) -> None:
        """Write the header (wrapped to the column widths) and a rule under it."""
        cells = [textwrap.wrap(c.header, c.width) or [""] for c in self.columns]
        rule = self.GAP.join("─" * c.width for c in self.columns)
        self.out.write(self._emit(cells) + rule + "\n")

    def row(self, cells: Sequence[Sequence[str]]) -> None:
        """Write one row: ``cells[i]`` is the list of lines of column ``i`` (a :class:`Clipped` line is
        shortened, never wrapped, whatever its column)."""
        self.out.write(
            self._emit([self._lines(col, cell) for col, cell in zip(self.columns, cells, strict=True)])
        )
