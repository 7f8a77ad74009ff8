"""audit views: v_jobs, v_workflows, v_attempts, v_flagged, v_run_timings, v_events

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00

Read-only views so an auditor's question is a SELECT on one view (docs/audit.md). The SQL is the same on
both backends except for one expression, a difference of two timestamps in seconds: SQLite stores times as
ISO text ('YYYY-MM-DD HH:MM:SS.ffffff', UTC) and has no interval type, so it goes through julianday();
PostgreSQL subtracts ``timestamptz`` values and takes the epoch of the interval. Durations are rounded to
the millisecond on both.

Hints may carry a ``{run}`` placeholder (e.g. ``orchestrator retry {run} --rule busy``): the views fill it
with the run's id, as every report renderer does.

The views are not in ``orchestrator.store.models`` (they are not tables, and Alembic's autogenerate does not
reflect views, so ``compare_metadata`` ignores them). A later migration that rebuilds one of the tables they
read on SQLite (``batch_alter_table`` copies the table and renames the copy) must drop these views first and
create them again after, from its own copy of the SQL: SQLite refuses to rename a table while a view names a
table that does not exist, and a shipped migration is never edited.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("v_events", "v_run_timings", "v_flagged", "v_attempts", "v_workflows", "v_jobs")


def _seconds(dialect: str, end: str, start: str) -> str:
    """SQL for ``end - start`` in seconds (double precision, rounded to 1 ms; NULL when either is NULL)."""
    if dialect == "sqlite":
        return f"ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)"
    return f"CAST(ROUND(CAST(EXTRACT(EPOCH FROM ({end}) - ({start})) AS numeric), 3) AS double precision)"


def _hint(col: str, run_col: str) -> str:
    """The hint with its ``{run}`` placeholder filled with the run's id."""
    return f"REPLACE({col}, '{{run}}', CAST({run_col} AS TEXT))"


def _view_sql(dialect: str) -> dict[str, str]:
    sec = _seconds
    d = dialect
    statuses = ("pending", "in_flight", "unknown", "retry_wait", "accepted", "succeeded", "skipped")
    status_counts = ",\n       ".join(
        f"SUM(CASE WHEN status = '{s}' THEN 1 ELSE 0 END) AS {s}" for s in (*statuses, "flagged", "failed")
    )
    return {
        # one row per job: its latest state, with the times of its first call, its acceptance and the end of
        # its accepted workflow(s)
        "v_jobs": f"""
SELECT x.*, {sec(d, "x.workflow_ended_at", "x.first_sent_at")} AS duration_s
  FROM (
SELECT j.run_id, r.name AS run_name, j.id AS job_id, j.project_id, j.instance_id, j.proxy_id, j.name,
       j.region, j.wave, j.status, j.source_version, j.target_version, j.current_version, j.latest_version,
       j.attempt_count AS attempts, j.reason, {_hint("j.hint", "j.run_id")} AS hint, j.rule,
       j.counts_failure,
       (SELECT MIN(a.sent_at) FROM attempts a WHERE a.job_id = j.id) AS first_sent_at,
       (SELECT MAX(a.sent_at) FROM attempts a WHERE a.job_id = j.id) AS last_sent_at,
       (SELECT MIN(w.created_at) FROM workflows w
         WHERE w.job_id = j.id AND w.state = 'ACCEPT') AS accepted_at,
       (SELECT CASE WHEN COUNT(*) = COUNT(w.ended_at) THEN MAX(w.ended_at) END FROM workflows w
         WHERE w.job_id = j.id AND w.state = 'ACCEPT') AS workflow_ended_at,
       j.created_at, j.updated_at
  FROM jobs j JOIN runs r ON r.id = j.run_id
) x""",
        # one row per workflow (an update_result item or a reconciled one), with its job, proxy and run
        "v_workflows": f"""
SELECT w.workflow_id, j.run_id, r.name AS run_name, w.job_id, j.project_id, j.instance_id, j.proxy_id,
       j.name AS proxy_name, a.number AS attempt_number, w.source, w.state, w.error_message,
       w.job_status AS final_status, w.progress, w.fail_reason, w.created_at, w.checked_at, w.ended_at,
       {sec(d, "w.ended_at", "w.created_at")} AS duration_s, w.id AS row_id
  FROM workflows w
  JOIN jobs j ON j.id = w.job_id
  JOIN runs r ON r.id = j.run_id
  LEFT JOIN attempts a ON a.id = w.attempt_id""",
        # one row per upgrade call
        "v_attempts": f"""
SELECT a.id AS attempt_id, j.run_id, r.name AS run_name, a.job_id, j.project_id, j.instance_id,
       j.proxy_id, j.name AS proxy_name, a.number, a.worker, a.sent_at, a.answered_at,
       {sec(d, "a.answered_at", "a.sent_at")} AS latency_s, a.http_status, a.error_code, a.error_msg,
       a.request_id, a.transport, a.outcome, a.rule
  FROM attempts a
  JOIN jobs j ON j.id = a.job_id
  JOIN runs r ON r.id = j.run_id""",
        # the jobs that need an operator now
        "v_flagged": f"""
SELECT j.run_id, r.name AS run_name, j.id AS job_id, j.project_id, j.instance_id, j.proxy_id, j.name,
       j.status, j.reason, {_hint("j.hint", "j.run_id")} AS hint, j.rule, j.counts_failure,
       j.attempt_count AS attempts, j.current_version, j.target_version, j.updated_at
  FROM jobs j JOIN runs r ON r.id = j.run_id
 WHERE j.status IN ('flagged', 'failed')""",
        # one row per run: its times, its jobs by status and its upgrade calls
        "v_run_timings": f"""
SELECT r.id AS run_id, r.name, r.status, r.stop_reason, r.created_at, r.started_at, r.finished_at,
       {sec(d, "r.finished_at", "r.started_at")} AS duration_s,
       COALESCE(jc.jobs, 0) AS jobs,
       {", ".join(f"COALESCE(jc.{s}, 0) AS {s}" for s in (*statuses, "flagged", "failed"))},
       COALESCE(ac.calls, 0) AS calls, ac.first_call_at, ac.last_call_at,
       {sec(d, "ac.last_call_at", "ac.first_call_at")} AS calls_span_s,
       r.wave_open, r.failures_acked
  FROM runs r
  LEFT JOIN (
SELECT run_id, COUNT(*) AS jobs,
       {status_counts}
  FROM jobs GROUP BY run_id
  ) jc ON jc.run_id = r.id
  LEFT JOIN (
SELECT j.run_id, COUNT(*) AS calls, MIN(a.sent_at) AS first_call_at, MAX(a.sent_at) AS last_call_at
  FROM attempts a JOIN jobs j ON j.id = a.job_id GROUP BY j.run_id
  ) ac ON ac.run_id = r.id""",
        # the append-only event log with run name and proxy
        "v_events": """
SELECT e.id AS event_id, e.at, e.run_id, r.name AS run_name, e.job_id, j.project_id, j.instance_id,
       j.proxy_id, j.name AS proxy_name, e.kind, e.from_status, e.to_status, e.rule, e.reason,
       e.os_user, e.host, e.pid, e.detail
  FROM events e
  JOIN runs r ON r.id = e.run_id
  LEFT JOIN jobs j ON j.id = e.job_id""",
    }


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    sql = _view_sql(dialect)
    for name in reversed(VIEWS):  # v_jobs first: the order does not matter, but keep it stable
        op.execute(f"CREATE VIEW {name} AS{sql[name]}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
