"""The calls ``commands.py`` and ``demo.py`` made on the old ``orchestrator/reporting.py``, answered by the
new queries and renderers, so the current CLI keeps working until it calls the streamed API directly
(``store.reports.report_rows`` + ``write_report`` / ``print_report_table``). Delete this module then."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO, cast

from rich.console import Console

from orchestrator.reporting.report_table import ReportTablePrinter
from orchestrator.reporting.streams import ReportWriter
from orchestrator.store import reports
from orchestrator.store.reports import ReportRow

# (title, SQL with {run} and {proxy}) shown by the demo: queries on the audit views of docs/audit.md
AUDIT_QUERIES = [
    (
        "every upgrade call of a proxy, with its answer",
        "SELECT number, sent_at, latency_s, http_status, error_code, outcome, rule\n"
        "  FROM v_attempts\n"
        " WHERE run_id = {run} AND proxy_id = '{proxy}' ORDER BY number;",
    ),
    (
        "what needs an operator, and why",
        "SELECT proxy_id, instance_id, status, reason, hint\n"
        "  FROM v_flagged WHERE run_id = {run} ORDER BY job_id;",
    ),
    (
        "every workflow the cloud created in this run",
        "SELECT proxy_id, workflow_id, state, final_status, error_message\n"
        "  FROM v_workflows WHERE run_id = {run} ORDER BY row_id;",
    ),
]


async def report_rows(store: Any, run_id: int, statuses: Sequence[str] | None = None) -> list[ReportRow]:
    """Every report row of a run as a list (``store``: anything with an ``engine``: the JobStore)."""
    async with store.engine.connect() as conn:
        return [r async for r in reports.report_rows(conn, run_id, statuses=[str(s) for s in statuses or []])]


def render_report(rows: Sequence[ReportRow], fmt: str, console: Console, *, tz: str | None = None) -> None:
    """Print report rows on ``console`` as ``table``, ``csv`` or ``json``."""
    if fmt == "table":
        printer = ReportTablePrinter(console, tz=tz)
        for row in rows:
            printer.add(row)
        printer.close()
        return
    writer = ReportWriter(fmt, cast(TextIO, console.file), tz=tz)
    for row in rows:
        writer.add(row)
    writer.close()
