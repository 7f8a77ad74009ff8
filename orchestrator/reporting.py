"""Status, report and flagged listings: queries on the job table and their renderers.

Reports are what an operator reads the morning after, and what an auditor exports: every non-success
carries its reason, the rule that decided it, and a hint; every job lists its workflow ids.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from orchestrator.states import JobStatus
from orchestrator.store import JobStore, RunRow
from orchestrator.store.models import Job, Workflow

ORDER = [
    JobStatus.SUCCEEDED,
    JobStatus.ACCEPTED,
    JobStatus.SKIPPED,
    JobStatus.FLAGGED,
    JobStatus.FAILED,
    JobStatus.PENDING,
    JobStatus.RETRY_WAIT,
    JobStatus.IN_FLIGHT,
    JobStatus.UNKNOWN,
]


@dataclass(frozen=True, slots=True)
class ReportRow:
    job_id: int
    project_id: str
    instance_id: str
    proxy_id: str
    name: str | None
    status: str
    attempts: int
    source_version: str | None
    target_version: str
    current_version: str | None
    workflow_ids: str
    reason: str | None
    hint: str | None
    rule: str | None
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


async def report_rows(
    store: JobStore, run_id: int, statuses: Sequence[JobStatus] | None = None
) -> list[ReportRow]:
    async with store.session() as s:
        q = select(Job).where(Job.run_id == run_id).order_by(Job.id)
        if statuses:
            q = q.where(Job.status.in_([x.value for x in statuses]))
        jobs = (await s.execute(q)).scalars().all()
        wf = (
            await s.execute(
                select(Workflow.job_id, Workflow.workflow_id, Workflow.state, Workflow.job_status)
                .join(Job, Job.id == Workflow.job_id)
                .where(Job.run_id == run_id)
                .order_by(Workflow.id)
            )
        ).all()
    by_job: dict[int, list[str]] = {}
    for job_id, wid, state, jstatus in wf:
        if wid:
            by_job.setdefault(job_id, []).append(f"{wid}:{jstatus or state}")
    return [
        ReportRow(
            job_id=j.id,
            project_id=j.project_id,
            instance_id=j.instance_id,
            proxy_id=j.proxy_id,
            name=j.name,
            status=j.status,
            attempts=j.attempt_count,
            source_version=j.source_version,
            target_version=j.target_version,
            current_version=j.current_version,
            workflow_ids=" ".join(by_job.get(j.id, [])),
            reason=j.reason,
            hint=j.hint,
            rule=j.rule,
            updated_at=_iso(j.updated_at),
        )
        for j in jobs
    ]


def _iso(v: datetime | None) -> str:
    return v.strftime("%Y-%m-%dT%H:%M:%SZ") if v else ""


def counts_table(run: RunRow, counts: dict[JobStatus, int], title: str | None = None) -> Table:
    total = sum(counts.values())
    t = Table(title=title or f"run {run.id} ({run.name}): {run.status.value}, {total} proxies")
    t.add_column("status")
    t.add_column("proxies", justify="right")
    for st in ORDER:
        if counts.get(st):
            t.add_row(st.value, str(counts[st]))
    return t


def render_report(rows: list[ReportRow], fmt: str, console: Console) -> None:
    if fmt == "json":
        console.print_json(json.dumps([r.as_dict() for r in rows]))
        return
    if fmt == "csv":
        buf = io.StringIO()
        fields = list(ReportRow.__slots__)
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())
        console.file.write(buf.getvalue())
        return
    t = Table(show_lines=False)
    for col in ("proxy", "instance", "status", "att", "versions", "reason / hint"):
        t.add_column(col, overflow="fold")
    for r in rows:
        versions = f"{r.source_version or r.current_version or '?'} -> {r.target_version}"
        why = r.reason or ""
        if r.hint and r.status in ("flagged", "failed"):
            why += f"\n[dim]hint: {r.hint}[/dim]"
        t.add_row(r.name or r.proxy_id, r.instance_id, r.status, str(r.attempts), versions, why)
    console.print(t)


AUDIT_QUERIES = [
    (
        "every upgrade call of a proxy, with its answer",
        "SELECT a.number, a.sent_at, a.http_status, a.error_code, a.outcome, a.rule\n"
        "  FROM attempts a JOIN jobs j ON j.id = a.job_id\n"
        " WHERE j.run_id = {run} AND j.proxy_id = '{proxy}' ORDER BY a.number;",
    ),
    (
        "what needs an operator, and why",
        "SELECT proxy_id, instance_id, reason, hint FROM jobs\n"
        " WHERE run_id = {run} AND status IN ('flagged', 'failed') ORDER BY id;",
    ),
    (
        "every workflow the cloud created in this run",
        "SELECT j.proxy_id, w.workflow_id, w.state, w.job_status, w.error_message\n"
        "  FROM workflows w JOIN jobs j ON j.id = w.job_id WHERE j.run_id = {run};",
    ),
]
