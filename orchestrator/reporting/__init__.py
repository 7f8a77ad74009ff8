"""Renderers of the job table's reports: terminal tables, csv/json streams and the HTML window report.

The data comes from :mod:`orchestrator.store.reports` (read queries); nothing here touches the database.
Outside text is printed literally (rich ``Text``, HTML escaping, CSV formula escaping); ids are never cut
in the middle; times carry their zone (UTC unless a ``tz`` names another); hints have ``{run}`` filled.
"""

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
    write_report,
)
from orchestrator.reporting.tables import counts_table, print_flagged, print_history, runs_table
from orchestrator.reporting.text import csv_cell, duration, human_time, iso_time, shorten, zone, zone_label

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
    "write_report",
    "zone",
    "zone_label",
]
