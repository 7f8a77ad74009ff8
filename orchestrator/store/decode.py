"""Driver tuples -> rows. The column lists here are the only place that knows a row's column order."""

from __future__ import annotations

from typing import Any

from orchestrator.states import JobStatus, RunStatus
from orchestrator.store.rows import AttemptRow, JobRow, RunRow, WorkerRow, WorkflowRow
from orchestrator.store.sql import aware, from_json, utcnow

JOB_COLS = (
    "id, run_id, project_id, instance_id, proxy_id, name, region, endpoint, x_language, source_version,"
    " target_version, status, attempt_count, read_failures, next_attempt_at, reason, hint, rule,"
    " current_version, latest_version, claimed_by, lease_expires_at, intent_deadline, wave, counts_failure,"
    " inventory_line, updated_at"
)
RUN_COLS = (
    "id, name, inventory_path, inventory_sha256, status, created_at, started_at, finished_at, options,"
    " stop_reason, wave_open, failures_acked"
)
ATTEMPT_COLS = (
    "id, job_id, number, worker, sent_at, answered_at, http_status, error_code, error_msg, request_id,"
    " outcome, rule, transport, cloud_offset_s"
)
WORKFLOW_COLS = (
    "id, job_id, attempt_id, workflow_id, instance_id, state, error_message, source, job_status, progress,"
    " fail_reason, created_at, checked_at, ended_at"
)
WORKER_COLS = "id, run_id, role, host, pid, started_at, heartbeat_at, lease_expires_at, left_at, claimed"


def job_row(r: tuple[Any, ...]) -> JobRow:
    """A ``JobRow`` from a driver tuple selected in ``JOB_COLS`` order (timestamps made aware UTC, statuses
    made enums). Raises ``ValueError`` for a status the enums do not know."""
    return JobRow(
        id=r[0],
        run_id=r[1],
        project_id=r[2],
        instance_id=r[3],
        proxy_id=r[4],
        name=r[5],
        region=r[6],
        endpoint=r[7],
        x_language=r[8],
        source_version=r[9],
        target_version=r[10],
        status=JobStatus(r[11]),
        attempt_count=r[12] or 0,
        read_failures=r[13] or 0,
        next_attempt_at=aware(r[14]),
        reason=r[15],
        hint=r[16],
        rule=r[17],
        current_version=r[18],
        latest_version=r[19],
        claimed_by=r[20],
        lease_expires_at=aware(r[21]),
        intent_deadline=aware(r[22]),
        wave=r[23] or 1,
        counts_failure=bool(r[24]),
        inventory_line=r[25],
        updated_at=aware(r[26]) or utcnow(),
    )


def run_row(r: tuple[Any, ...]) -> RunRow:
    """A ``RunRow`` from a driver tuple selected in ``RUN_COLS`` order (timestamps made aware UTC, statuses
    made enums). Raises ``ValueError`` for a status the enums do not know."""
    return RunRow(
        id=r[0],
        name=r[1],
        inventory_path=r[2],
        inventory_sha256=r[3],
        status=RunStatus(r[4]),
        created_at=aware(r[5]) or utcnow(),
        started_at=aware(r[6]),
        finished_at=aware(r[7]),
        options=dict(from_json(r[8]) or {}),
        stop_reason=r[9],
        wave_open=r[10] or 1,
        failures_acked=r[11] or 0,
    )


def attempt_row(r: tuple[Any, ...]) -> AttemptRow:
    """A ``AttemptRow`` from a driver tuple selected in ``ATTEMPT_COLS`` order (timestamps made aware UTC)."""
    return AttemptRow(
        id=r[0],
        job_id=r[1],
        number=r[2],
        worker=r[3],
        sent_at=aware(r[4]) or utcnow(),
        answered_at=aware(r[5]),
        http_status=r[6],
        error_code=r[7],
        error_msg=r[8],
        request_id=r[9],
        outcome=r[10],
        rule=r[11],
        transport=r[12],
        cloud_offset_s=r[13],
    )


def workflow_row(r: tuple[Any, ...]) -> WorkflowRow:
    """A ``WorkflowRow`` from a driver tuple selected in ``WORKFLOW_COLS`` order (timestamps made
    aware UTC)."""
    return WorkflowRow(
        id=r[0],
        job_id=r[1],
        attempt_id=r[2],
        workflow_id=r[3],
        instance_id=r[4],
        state=r[5],
        error_message=r[6],
        source=r[7],
        job_status=r[8],
        progress=r[9],
        fail_reason=r[10],
        created_at=aware(r[11]) or utcnow(),
        checked_at=aware(r[12]),
        ended_at=aware(r[13]),
    )


def worker_row(r: tuple[Any, ...]) -> WorkerRow:
    """A ``WorkerRow`` from a driver tuple selected in ``WORKER_COLS`` order (timestamps made aware UTC)."""
    return WorkerRow(
        id=r[0],
        run_id=r[1],
        role=r[2],
        host=r[3],
        pid=r[4],
        started_at=aware(r[5]) or utcnow(),
        heartbeat_at=aware(r[6]) or utcnow(),
        lease_expires_at=aware(r[7]) or utcnow(),
        left_at=aware(r[8]),
        claimed=r[9] or 0,
    )
