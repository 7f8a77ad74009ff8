"""CSV and JSON renderers. The report of a run is written as it streams from the job table (a 100,000-job
run never sits in memory); the other listings are small and are written from lists.

Every value is full (ids never shortened); times are ISO 8601 with their offset in the chosen zone (UTC by
default); durations are seconds as numbers. In CSV a text cell that a spreadsheet would run as a formula
gets a leading apostrophe (:func:`orchestrator.reporting.text.csv_cell`); JSON needs no such escape.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from orchestrator.reporting.text import Zone, csv_cell, csv_text, iso_formatter, iso_time
from orchestrator.store.reports import (
    HISTORY_COLUMNS,
    FlaggedGroup,
    HistoryEntry,
    ReportRow,
    RunSummary,
    WorkflowBrief,
    fill_hint,
)

#: report columns in csv (json has the same keys, ``workflows`` as an array of objects)
REPORT_CSV_COLUMNS = (
    "run_id",
    "job_id",
    "project_id",
    "instance_id",
    "proxy_id",
    "name",
    "wave",
    "status",
    "attempts",
    "current_version",
    "target_version",
    "inventory_version",
    "first_sent",
    "accepted",
    "workflow_ended",
    "duration_s",
    "reason",
    "hint",
    "rule",
    "workflows",
)
FORMATS = ("csv", "json")
_FLUSH_EVERY = 1000  # rows per write() call: fewer syscalls, bounded buffer


def _json_encoder() -> Callable[[Any], str]:
    """``json.dumps`` with its default options, as one encoder kept for a whole report: ``json.dumps``
    builds its C encoder again for every call, a quarter of its cost per 100,000-job report row. The C
    encoder is the standard library's (``json.encoder.c_make_encoder``); without it, ``json.dumps``."""
    make = getattr(json.encoder, "c_make_encoder", None)  # None on a Python without the C speedups
    if make is None:
        return json.dumps
    encode = make(
        None,  # markers: no cycle check (report records are fresh dicts and lists)
        json.JSONEncoder().default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        ": ",
        ", ",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
    return lambda value: "".join(encode(value, 0))


def report_record(
    row: ReportRow, tz: Zone = None, *, iso: Callable[[datetime | None], str] | None = None
) -> dict[str, Any]:
    """One report row as a JSON object: times ISO 8601 with offset (None when unknown), ``duration_s``
    seconds, ``workflows`` a list of ``{workflow_id, state, status, ended}``, the hint's ``{run}`` filled.
    ``iso``: a formatter from :func:`iso_formatter` (made from ``tz`` when not given)."""
    iso = iso or iso_formatter(tz)
    ended = iso(row.workflow_ended) or None
    return {
        "run_id": row.run_id,
        "job_id": row.job_id,
        "project_id": row.project_id,
        "instance_id": row.instance_id,
        "proxy_id": row.proxy_id,
        "name": row.name,
        "wave": row.wave,
        "status": row.status,
        "attempts": row.attempts,
        "current_version": row.current_version,
        "target_version": row.target_version,
        "inventory_version": row.inventory_version,
        "first_sent": iso(row.first_sent) or None,
        "accepted": iso(row.accepted) or None,
        "workflow_ended": ended,
        "duration_s": row.duration_s,
        "reason": row.reason,
        "hint": fill_hint(row.hint, row.run_id),
        "rule": row.rule,
        "workflows": [
            {
                "workflow_id": w.workflow_id,
                "state": w.state,
                "status": w.status,
                # the job's end is its (last) workflow's end: formatted once
                "ended": ended if w.ended is row.workflow_ended else (iso(w.ended) or None),
            }
            for w in row.workflows
        ],
    }


def _workflows_cell(workflows: Sequence[WorkflowBrief]) -> str:
    # id, answer state and last polled status; when each ended is in json (and the job's end in its column)
    parts = []
    for w in workflows:
        bits = [w.workflow_id, w.state] if w.workflow_id else [w.state]
        if w.status:
            bits.append(w.status)
        parts.append(" ".join(bits))
    return "; ".join(parts)


def _report_csv_cells(row: ReportRow, iso: Callable[[datetime | None], str]) -> list[object]:
    # only text can hold a formula: numbers and our own ISO times pass unescaped
    return [
        row.run_id,
        row.job_id,
        csv_text(row.project_id),
        csv_text(row.instance_id),
        csv_text(row.proxy_id),
        csv_text(row.name),
        row.wave,
        csv_text(row.status),
        row.attempts,
        csv_text(row.current_version),
        csv_text(row.target_version),
        csv_text(row.inventory_version),
        iso(row.first_sent),
        iso(row.accepted),
        iso(row.workflow_ended),
        "" if row.duration_s is None else row.duration_s,
        csv_text(row.reason),
        csv_text(fill_hint(row.hint, row.run_id)),
        csv_text(row.rule),
        csv_text(_workflows_cell(row.workflows)) if row.workflows else "",
    ]


class ReportWriter:
    """Writes report rows to ``out`` one at a time as ``csv`` (a header, then one line per job; the
    ``workflows`` cell is ``[ID] STATE [STATUS]`` items joined by ``; ``, a REJECT item has no id)
    or ``json`` (an array of :func:`report_record` objects), buffering at most ``_FLUSH_EVERY`` rows.
    Call :meth:`close` at the end (it writes the json array's end). Raises ValueError for another format or
    an unknown zone."""

    def __init__(self, fmt: str, out: TextIO, *, tz: Zone = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown report format {fmt!r} (one of: {', '.join(FORMATS)})")
        self.fmt = fmt
        self.out = out
        self.iso = iso_formatter(tz)
        self.rows = 0
        # rows are formatted into a buffer and written a chunk at a time: one write per row through the
        # output's Python wrapper cost a fifth of a 100k-row report
        self._buf = io.StringIO()
        self._csv = csv.writer(self._buf, lineterminator="\n") if fmt == "csv" else None
        self._cells: list[list[object]] = []
        self._chunks: list[str] = []
        self._dumps = _json_encoder()
        if self._csv is not None:
            self._csv.writerow(REPORT_CSV_COLUMNS)

    def add_all(self, rows: Iterable[ReportRow]) -> None:
        """:meth:`add` for each of ``rows``."""
        for row in rows:
            self.add(row)

    def add(self, row: ReportRow) -> None:
        """Format one job's row; it is written with the next chunk (every ``_FLUSH_EVERY`` rows)."""
        if self._csv is not None:
            self._cells.append(_report_csv_cells(row, self.iso))
            pending = len(self._cells)
        else:
            self._chunks.append(
                ("[\n" if self.rows == 0 else ",\n") + self._dumps(report_record(row, iso=self.iso))
            )
            pending = len(self._chunks)
        self.rows += 1
        if pending >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the rows formatted so far to ``out`` (errors of ``out`` propagate)."""
        if self._csv is not None:
            self._csv.writerows(self._cells)
            self._cells.clear()
            self.out.write(self._buf.getvalue())
            self._buf.seek(0)
            self._buf.truncate()
        else:
            self.out.write("".join(self._chunks))
            self._chunks.clear()

    def close(self) -> int:
        """Write what is buffered (and the json array's end); returns the number of rows written."""
        if self._csv is None:
            self._chunks.append("[]\n" if self.rows == 0 else "\n]\n")
        self.flush()
        return self.rows


async def write_report_parts(
    parts: AsyncIterable[Iterable[ReportRow]], fmt: str, out: TextIO, *, tz: Zone = None
) -> int:
    """Write a run's report rows to ``out`` as they stream in parts (``store.reports.report_parts``), as
    ``csv`` or ``json`` (see :class:`ReportWriter`). Returns the number of rows. Raises ValueError for
    another format or an unknown zone."""
    writer = ReportWriter(fmt, out, tz=tz)
    async for part in parts:
        writer.add_all(part)
    return writer.close()


def history_record(e: HistoryEntry, tz: Zone = None) -> dict[str, Any]:
    """One history entry as a JSON object (times ISO 8601 in ``tz``, None when unknown)."""
    rec = {k: getattr(e, k) for k in HISTORY_COLUMNS}
    rec["at"] = iso_time(e.at, tz)
    rec["until"] = iso_time(e.until, tz) or None
    return rec


def run_record(s: RunSummary, tz: Zone = None) -> dict[str, Any]:
    """One run of the runs list as a JSON object: its row, ``jobs`` and ``counts`` by status."""
    r = s.run
    return {
        "id": r.id,
        "name": r.name,
        "status": r.status,
        "created_at": iso_time(r.created_at, tz),
        "started_at": iso_time(r.started_at, tz) or None,
        "finished_at": iso_time(r.finished_at, tz) or None,
        "stop_reason": r.stop_reason,
        "jobs": s.jobs,
        "needs_operator": s.needs_operator,
        "counts": dict(s.counts),
    }


def flagged_record(g: FlaggedGroup, tz: Zone = None) -> dict[str, Any]:
    """One flagged group as a JSON object: rule, status, count, hint, and every proxy with its reason."""
    return {
        "rule": g.rule,
        "status": g.status,
        "count": g.count,
        "hint": g.hint,
        "other_hints": g.other_hints,
        "counts_failure": g.counts_failure,
        "proxies": [
            {
                "project_id": p.project_id,
                "instance_id": p.instance_id,
                "proxy_id": p.proxy_id,
                "name": p.name,
                "reason": p.reason,
                "updated_at": iso_time(p.updated_at, tz) or None,
            }
            for p in g.proxies
        ],
    }


def flagged_rows(groups: Iterable[FlaggedGroup], tz: Zone = None) -> list[dict[str, Any]]:
    """Flagged groups flattened for csv: one record per proxy, with its group's rule, status, size and
    hint (the hint repeats per line: a spreadsheet filters by rule)."""
    return [
        {
            "rule": g.rule,
            "status": g.status,
            "group_count": g.count,
            "counts_failure": g.counts_failure,
            "project_id": p.project_id,
            "instance_id": p.instance_id,
            "proxy_id": p.proxy_id,
            "name": p.name,
            "reason": p.reason,
            "since": iso_time(p.updated_at, tz) or None,
            "hint": g.hint,
        }
        for g in groups
        for p in g.proxies
    ]


def write_records(
    records: Iterable[Mapping[str, Any]], fmt: str, out: TextIO, *, columns: Sequence[str] | None = None
) -> int:
    """Write flat records (history entries, runs) as ``json`` (an array) or ``csv`` (``columns``, or the
    first record's keys; nested values as compact JSON text, formula-like text escaped). Returns the
    number of records. Raises ValueError for another format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    items = list(records)
    if fmt == "json":
        out.write(json.dumps(items, indent=1) + "\n")
        return len(items)
    cols = list(columns or (items[0].keys() if items else []))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(cols)
    for rec in items:
        writer.writerow(
            [csv_cell(json.dumps(v) if isinstance(v, dict | list) else v) for v in (rec.get(c) for c in cols)]
        )
    return len(items)
