"""Renderers of the job table's reports: terminal tables, csv/json streams and the HTML window report.

The data comes from :mod:`orchestrator.store.reports` (read queries); nothing here touches the database.
Outside text is printed literally (rich ``Text``, HTML escaping, CSV formula escaping); ids are never cut
in the middle; times carry their zone (UTC unless a ``tz`` names another); hints have ``{run}`` filled.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.reporting.html import html_report
    from orchestrator.reporting.report_table import ReportTablePrinter, print_report_table
    from orchestrator.reporting.streams import (
        REPORT_CSV_COLUMNS,
        ReportWriter,
        flagged_record,
        flagged_rows,
        history_record,
        report_record,
        run_record,
        write_records,
        write_report_parts,
    )
    from orchestrator.reporting.tables import counts_table, print_flagged, print_history, runs_table
    from orchestrator.reporting.text import (
        csv_cell,
        duration,
        human_time,
        iso_time,
        shorten,
        zone,
        zone_label,
    )

# Loaded on first use (PEP 562): the end of a run prints only the counts table, and the csv/json and HTML
# renderers import the report queries' module and its row types, which that table does not need.
_WHERE = {
    "html_report": "orchestrator.reporting.html",
    "ReportTablePrinter": "orchestrator.reporting.report_table",
    "print_report_table": "orchestrator.reporting.report_table",
    "REPORT_CSV_COLUMNS": "orchestrator.reporting.streams",
    "ReportWriter": "orchestrator.reporting.streams",
    "flagged_record": "orchestrator.reporting.streams",
    "flagged_rows": "orchestrator.reporting.streams",
    "history_record": "orchestrator.reporting.streams",
    "report_record": "orchestrator.reporting.streams",
    "run_record": "orchestrator.reporting.streams",
    "write_records": "orchestrator.reporting.streams",
    "write_report_parts": "orchestrator.reporting.streams",
    "counts_table": "orchestrator.reporting.tables",
    "print_flagged": "orchestrator.reporting.tables",
    "print_history": "orchestrator.reporting.tables",
    "runs_table": "orchestrator.reporting.tables",
    "csv_cell": "orchestrator.reporting.text",
    "duration": "orchestrator.reporting.text",
    "human_time": "orchestrator.reporting.text",
    "iso_time": "orchestrator.reporting.text",
    "shorten": "orchestrator.reporting.text",
    "zone": "orchestrator.reporting.text",
    "zone_label": "orchestrator.reporting.text",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "REPORT_CSV_COLUMNS",
    "ReportTablePrinter",
    "ReportWriter",
    "counts_table",
    "csv_cell",
    "duration",
    "flagged_record",
    "flagged_rows",
    "history_record",
    "html_report",
    "human_time",
    "iso_time",
    "print_flagged",
    "print_history",
    "print_report_table",
    "report_record",
    "run_record",
    "runs_table",
    "shorten",
    "write_records",
    "write_report_parts",
    "zone",
    "zone_label",
]
