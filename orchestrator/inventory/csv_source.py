"""CSV inventories: a header row naming the columns, then one proxy per record, read one record at a time.

Lines are decoded one by one, so a bad byte is reported on its own line; ``#`` comments and blank lines
are skipped between records (not inside a quoted cell); the line of a record is the physical line where it
starts (``csv.reader``'s ``line_num`` would give the last one).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
from collections.abc import Generator, Iterator
from functools import partial
from typing import IO

from orchestrator.inventory.errors import Problems, close
from orchestrator.inventory.fields import REQUIRED_FIELDS, EntryBuilder, Val
from orchestrator.inventory.files import not_utf8
from orchestrator.inventory.model import ENTRY_FIELDS, ProxyEntry
from orchestrator.inventory.strict_yaml import key_label

__all__ = ["scan_csv"]


def scan_csv(path: str, errs: Problems, builder: EntryBuilder) -> Generator[ProxyEntry, None, str]:
    """Yield the valid entries of the CSV inventory at ``path`` in file order; return the hex SHA-256 of
    the bytes read. Problems go to ``errs`` (the caller raises them when the generator is done); a bad
    header, a bad byte or broken CSV quoting raise at once."""
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            yield from _entries(fh, hasher, errs, builder)
    except OSError as exc:
        errs.fatal(None, None, f"cannot read the file: {exc.strerror or exc}")
    return hasher.hexdigest()


class _State:
    def __init__(self) -> None:
        self.at_boundary = True
        self.record_start = 0


def _lines(fh: IO[bytes], hasher: hashlib._Hash, state: _State, errs: Problems) -> Iterator[str]:
    """Physical lines decoded one by one (so a bad byte has an exact line); comments only between records."""
    for lineno, raw in enumerate(fh, 1):
        hasher.update(raw)
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errs.fatal(lineno, None, not_utf8(raw[exc.start], exc.start + 1))
        if state.at_boundary:
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            state.record_start = lineno
            state.at_boundary = False
        yield text


def _records(fh: IO[bytes], hasher: hashlib._Hash, errs: Problems) -> Iterator[tuple[int, list[str]]]:
    state = _State()
    reader = csv.reader(_lines(fh, hasher, state, errs), strict=True)
    try:
        for row in reader:
            state.at_boundary = True
            yield state.record_start, [cell.strip(" \t") for cell in row]
    except csv.Error as exc:
        errs.fatal(state.record_start or None, None, f"not valid CSV: {exc}")


def _header(line: int, names: list[str], errs: Problems, override: str | None) -> list[str]:
    meant: set[str] = set()
    for i, name in enumerate(names):
        if name not in ENTRY_FIELDS:
            label = key_label(name) if name else f"column {i + 1}"
            found = close(name, ENTRY_FIELDS)
            meant.add(found or "")
            errs.add(line, label, "unknown column" + (f"; did you mean {found!r}?" if found else ""))
        elif names.index(name) != i:
            errs.add(line, name, f"column appears twice (columns {names.index(name) + 1} and {i + 1})")
    for name in REQUIRED_FIELDS:
        if name not in names and name not in meant:
            errs.add(line, name, "required column missing")
    if "region" not in names and "endpoint" not in names and override is None:
        errs.add(line, "region", "needs a region or endpoint column (or --endpoint)")
    errs.raise_if_any()
    return names


def _origins(header: list[str], row: list[str], line: int) -> dict[str, Val]:
    return {name: Val(cell or None, line, name) for name, cell in zip(header, row, strict=True)}


def _entries(
    fh: IO[bytes], hasher: hashlib._Hash, errs: Problems, builder: EntryBuilder
) -> Iterator[ProxyEntry]:
    header: list[str] | None = None
    for line, row in _records(fh, hasher, errs):
        if header is None:
            header = _header(line, row, errs, builder.override)
            continue
        if len(row) != len(header):
            errs.add(line, None, f"has {len(row)} cells but the header has {len(header)} columns")
            continue
        data = {name: cell for name, cell in zip(header, row, strict=True) if cell}
        entry = builder.build(data, line, None, partial(_origins, header, row, line))
        if entry is not None:
            yield entry
    if header is None:
        errs.fatal(None, None, "file is empty; expected a header row naming the columns")
