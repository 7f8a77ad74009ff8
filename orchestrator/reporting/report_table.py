"""The report of a run as a terminal table, printed as it streams (a 3,000-job report in a fraction of a
second; see ``plain.py`` for why this is not a rich table).

Columns: proxy id and name; status and calls made; the version the proxy runs (and the target when it
differs: the inventory's version is not an outcome and is not shown); first call, acceptance and workflow
end in the display zone (named in the header); how long it took; the workflow ids; reason, hint and rule
of a problem. The column widths depend on the console width only, so every chunk lines up. Ids are never
wrapped: on a narrow console they are shortened at the end with an ellipsis (csv and json carry them whole).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import TextIO, cast

from rich.console import Console

from orchestrator.reporting.plain import Clipped, Column, PlainTable
from orchestrator.reporting.text import Zone, duration, human_time, zone, zone_label
from orchestrator.store.reports import ReportRow, fill_hint

ID_WIDTH = 36  # Huawei Cloud ids: 32 hex digits and a 4-character kind suffix, or a 36-character UUID
_PROBLEMS = ("flagged", "failed")


@dataclass(frozen=True, slots=True)
class ReportLayout:
    """Column widths of the report table for a console ``width``: full dates on wide consoles (``MM-DD``
    otherwise; the zone is in the header), workflow ids in a column of their own from 180 characters
    (under the reason otherwise), the duration in a column of its own from 92 (under the times otherwise:
    an 80-column console), and the id columns narrowed (never below 12) when the console is too narrow
    for them."""

    full_dates: bool
    workflow_column: bool
    id_width: int
    reason_width: int
    took_column: bool = True

    FIXED = 10 + 13  # status, runs / target
    TOOK = 8

    @classmethod
    def for_width(cls, width: int) -> ReportLayout:
        """The layout for a console ``width`` characters wide (the thresholds of the class docstring)."""
        full = width >= 190
        wf_col = width >= 180
        took = width >= 92
        times = 24 if full else 19
        fixed = cls.FIXED + (cls.TOOK if took else 0)
        n_cols = (7 if wf_col else 6) - (0 if took else 1)
        ids = 2 if wf_col else 1
        gaps = (n_cols - 1) * len(PlainTable.GAP)
        spare = width - gaps - fixed - times - 20  # 20: the narrowest reason column
        id_width = max(12, min(ID_WIDTH, spare // ids))
        reason = max(16, width - gaps - fixed - times - ids * id_width)
        return cls(
            full_dates=full, workflow_column=wf_col, id_width=id_width, reason_width=reason, took_column=took
        )

    def columns(self, tz: Zone) -> list[Column]:
        """The table's columns, the times' header naming the display zone ``tz``."""
        label = zone_label(tz)
        cols = [
            Column("proxy / name", self.id_width),
            Column("status", 10),
            Column("runs / target", 13),
            Column(f"times ({label})", 24 if self.full_dates else 19),
        ]
        if self.took_column:
            cols.append(Column("took", self.TOOK, right=True))
        if self.workflow_column:
            cols.append(Column("workflows", self.id_width))
        cols.append(
            Column(
                "reason / hint" + ("" if self.workflow_column else " / workflows"),
                self.reason_width,
                clip=False,
            )
        )
        return cols


def _workflow_lines(row: ReportRow, prefix: str) -> list[str]:
    lines: list[str] = []
    for w in row.workflows:
        if not w.workflow_id:  # an item without a workflow id
            lines.append(Clipped(prefix + w.state))
            continue
        lines.append(Clipped(prefix + w.workflow_id))
        if w.state != "ACCEPT":  # a REJECT item has an id but no workflow to poll
            lines.append(f"  {w.state}")
        elif w.status != "Completed":  # the usual end is left out: the unusual ones stand out
            lines.append(f"  {w.status or 'not polled yet'}")
    return lines


def report_cells(row: ReportRow, layout: ReportLayout, tz: Zone) -> list[list[str]]:
    """The cells (lists of lines) of one job in the report table."""
    cut = 0 if layout.full_dates else 5
    times = [
        f"{label} {human_time(value, tz)[cut:]}"
        for label, value in (("sent", row.first_sent), ("acc.", row.accepted), ("end ", row.workflow_ended))
        if value is not None
    ]
    current = row.current_version or "?"
    versions = (
        [current] if row.current_version == row.target_version else [current, f"→ {row.target_version}"]
    )
    why = [row.reason] if row.reason else []
    if row.status in _PROBLEMS:
        if row.hint:
            why.append("hint: " + (fill_hint(row.hint, row.run_id) or ""))
        if row.rule:
            why.append(f"rule: {row.rule}")
    cells = [
        [row.proxy_id, *([row.name] if row.name else [])],
        [row.status, f"{row.attempts} call{'' if row.attempts == 1 else 's'}"],
        versions,
        times,
    ]
    if layout.took_column:
        cells.append([duration(row.duration_s)])
    elif row.duration_s is not None:
        times.append(f"took {duration(row.duration_s)}")
    if layout.workflow_column:
        cells += [_workflow_lines(row, ""), why]
    else:
        cells.append(why + _workflow_lines(row, ""))
    return cells


class ReportTablePrinter:
    """Prints report rows on ``console`` (its file, as plain text) under one header. Call :meth:`close`
    at the end; it returns the number of rows."""

    def __init__(self, console: Console, *, tz: Zone = None) -> None:
        self.zone = zone(tz)
        self.layout = ReportLayout.for_width(console.width)
        self.table = PlainTable(self.layout.columns(self.zone), cast(TextIO, console.file))
        self.table.header()
        self.rows = 0

    def add(self, row: ReportRow) -> None:
        """Print one job's row now."""
        self.table.row(report_cells(row, self.layout, self.zone))
        self.rows += 1

    def close(self) -> int:
        """Flush the output; returns the number of rows printed."""
        self.table.out.flush()
        return self.rows


async def print_report_table(rows: AsyncIterable[ReportRow], console: Console, *, tz: Zone = None) -> int:
    """Print a run's report as it streams (see :class:`ReportTablePrinter`). Returns the number of rows."""
    printer = ReportTablePrinter(console, tz=tz)
    async for row in rows:
        printer.add(row)
    return printer.close()
