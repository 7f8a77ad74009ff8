"""The job table's schema. Operators query these tables directly: keep ``docs/schema.md`` in step.

Times are stored as timezone-aware UTC (``DateTime(timezone=True)``); on SQLite they come back naive and
are read as UTC. Status columns hold the string values of ``orchestrator.states`` enums.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.states import JobStatus, RunStatus

# Stable constraint names so Alembic migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
TS = DateTime(timezone=True)


class Base(DeclarativeBase):
    """The declarative base: one ``MetaData`` with stable constraint names (``NAMING``)."""

    metadata = MetaData(naming_convention=NAMING)


def _one_of(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# The database itself refuses a status the code does not know (migration 0002).
JOB_STATUS_CHECK = _one_of("status", [s.value for s in JobStatus])
RUN_STATUS_CHECK = _one_of("status", [s.value for s in RunStatus])


class Run(Base):
    """One run: an inventory file applied with its options (docs/schema.md)."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(RUN_STATUS_CHECK, name="status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    inventory_path: Mapped[str] = mapped_column(Text)
    inventory_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), index=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    started_at: Mapped[datetime | None] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    # RunOptions as JSON (rate, concurrency, endpoint override, policy, ...): a resume keeps them.
    options: Mapped[dict[str, object]] = mapped_column(JSON)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    # waves (migration 0004): upgrades of jobs with wave <= wave_open may start
    wave_open: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # failure breaker: failures acknowledged by an operator (`resume --ack`) no longer count
    failures_acked: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Job(Base):
    """One proxy of one run: its target, its status (docs/states.md), its claim and what the cloud said
    (docs/schema.md)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("run_id", "project_id", "instance_id", "proxy_id"),
        Index("ix_jobs_run_status_due", "run_id", "status", "next_attempt_at"),
        Index("ix_jobs_run_instance", "run_id", "instance_id"),
        # which live run holds a proxy (migration 0003): the overlap check joins on the proxy's key
        Index("ix_jobs_proxy", "project_id", "instance_id", "proxy_id"),
        # claiming pending jobs wave by wave in inventory order without a scan (migration 0004)
        Index("ix_jobs_run_status_wave", "run_id", "status", "wave", "id"),
        CheckConstraint(JOB_STATUS_CHECK, name="status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str] = mapped_column(String(64))
    proxy_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128))
    region: Mapped[str | None] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(Text)
    x_language: Mapped[str] = mapped_column(String(8))
    source_version: Mapped[str | None] = mapped_column(String(32))
    target_version: Mapped[str] = mapped_column(String(32))
    inventory_line: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    # consecutive failed reads (preflight, reconcile, postflight): bounds retries of reads like
    # attempt_count bounds upgrade calls
    read_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS)
    reason: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str | None] = mapped_column(String(200))
    # preflight facts (proxy-version), kept for the report
    current_version: Mapped[str | None] = mapped_column(String(32))
    latest_version: Mapped[str | None] = mapped_column(String(32))
    risk: Mapped[dict[str, object] | None] = mapped_column(JSON)
    # the worker that holds the job and until when (multi-worker leases)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(TS)
    # fencing (migration 0003): after this moment the process that recorded the latest intent will never
    # send it; a takeover concludes "nothing started" only after it (plus the call timeout and the grace)
    intent_deadline: Mapped[datetime | None] = mapped_column(TS)
    # waves and the failure breaker (migration 0004)
    wave: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    counts_failure: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)


class Attempt(Base):
    """One upgrade call: written (outcome ``in_flight``) before the POST leaves, completed on its answer."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    sent_at: Mapped[datetime] = mapped_column(TS)
    answered_at: Mapped[datetime | None] = mapped_column(TS)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_msg: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(128))
    # in_flight | accepted | retry | flag | fail | skip | reconcile | stop_run, then after reconcile
    # reconciled (its workflow found) | lost (the answer never came and no workflow was found), or
    # not_sent (the fence stopped it): docs/states.md
    outcome: Mapped[str] = mapped_column(String(20))
    rule: Mapped[str | None] = mapped_column(String(200))
    transport: Mapped[str | None] = mapped_column(String(20))
    # the sender's measured offset to the cloud's clock (cloud = sent_at + offset), for reconcile (0003)
    cloud_offset_s: Mapped[float | None] = mapped_column(Float)


class Workflow(Base):
    """One ``update_result`` item (or a workflow found by reconciliation), followed to its end."""

    __tablename__ = "workflows"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("attempts.id", ondelete="CASCADE"))
    workflow_id: Mapped[str | None] = mapped_column(String(128), index=True)
    instance_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20))  # ACCEPT | REJECT (the answer's verdict)
    error_message: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))  # answer | reconciled
    created_at: Mapped[datetime] = mapped_column(TS)
    # tracking (GET /jobs?id=): Pending, Running, Completed, Failed, Canceled
    job_status: Mapped[str | None] = mapped_column(String(20))
    progress: Mapped[str | None] = mapped_column(String(16))
    fail_reason: Mapped[str | None] = mapped_column(Text)
    checked_at: Mapped[datetime | None] = mapped_column(TS)
    ended_at: Mapped[datetime | None] = mapped_column(TS)


class Worker(Base):
    """A live process working on a run: the runner's lock (one per run) and the joined workers."""

    __tablename__ = "workers"
    __table_args__ = (Index("ix_workers_run_role", "run_id", "role"),)

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:random
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(10))  # runner | worker
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(TS)
    heartbeat_at: Mapped[datetime] = mapped_column(TS)
    lease_expires_at: Mapped[datetime] = mapped_column(TS)
    left_at: Mapped[datetime | None] = mapped_column(TS)
    claimed: Mapped[int] = mapped_column(Integer, default=0)


class SendSlot(Base):
    """Run-wide send permits on PostgreSQL: the rate window log and the concurrency slots."""

    __tablename__ = "send_log"
    __table_args__ = (
        Index("ix_send_log_run_at", "run_id", "at"),
        # the permits not marked done (migration 0007): the held ones (at most the run's concurrency) and
        # the few whose holder died holding them, counted by every check
        Index(
            "ix_send_log_held",
            "run_id",
            "lease_expires_at",
            sqlite_where=text("done_at IS NULL"),
            postgresql_where=text("done_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(TS)
    worker: Mapped[str] = mapped_column(String(200))
    done_at: Mapped[datetime | None] = mapped_column(TS)
    lease_expires_at: Mapped[datetime | None] = mapped_column(TS)


class Event(Base):
    """The append-only log (migration 0005): every job status move and every operator action, with who
    (OS user, host, pid) and when. ``jobs.reason`` is overwritten by later moves; this table is not."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_run_at", "run_id", "at"),
        Index("ix_events_job", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(TS)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # move | retry | resume | ack | run (a run status change) | hold (a refused overlap) ...
    kind: Mapped[str] = mapped_column(String(20))
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str | None] = mapped_column(String(20))
    rule: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    os_user: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(200))
    pid: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, object] | None] = mapped_column(JSON)
