"""JobStore: the program's only door to the job table.

The engine speaks in domain rows (``JobRow``, ``RunRow``...) and named operations; SQL lives here. Every
job status move is a conditional UPDATE on the statuses the state table allows as sources, checked by row
count, so two workers (or a worker and an operator's ``retry``) can never both win the same move. Writes
go through the group-commit writer; reads use their own short sessions.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, insert, or_, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, aliased

from orchestrator.states import ACTIVE, JobStatus, RunStatus, check_move
from orchestrator.store import db
from orchestrator.store.models import Attempt, Job, Run, SendSlot, Worker, Workflow
from orchestrator.store.writer import GroupCommitWriter, Op


def _update(model: type[Any]) -> Any:
    """A bulk UPDATE that does not try to mirror itself onto loaded objects: the store never reuses
    them, and the "evaluate" strategy compares SQLite's naive datetimes with aware ones in Python."""
    return update(model).execution_options(synchronize_session=False)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands timezone-aware columns back naive; they were written as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True, slots=True)
class NewJob:
    """What the inventory contributes to a job row (the store does not import the inventory module)."""

    project_id: str
    instance_id: str
    proxy_id: str
    endpoint: str
    target_version: str
    source_version: str | None = None
    region: str | None = None
    x_language: str = "en-us"
    name: str | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class RunRow:
    id: int
    name: str
    inventory_path: str
    inventory_sha256: str
    status: RunStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    options: dict[str, Any]
    stop_reason: str | None

    @classmethod
    def of(cls, r: Run) -> RunRow:
        return cls(
            id=r.id,
            name=r.name,
            inventory_path=r.inventory_path,
            inventory_sha256=r.inventory_sha256,
            status=RunStatus(r.status),
            created_at=_aware(r.created_at) or utcnow(),
            started_at=_aware(r.started_at),
            finished_at=_aware(r.finished_at),
            options=dict(r.options or {}),
            stop_reason=r.stop_reason,
        )


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    run_id: int
    project_id: str
    instance_id: str
    proxy_id: str
    name: str | None
    region: str | None
    endpoint: str
    x_language: str
    source_version: str | None
    target_version: str
    status: JobStatus
    attempt_count: int
    read_failures: int
    next_attempt_at: datetime | None
    reason: str | None
    hint: str | None
    rule: str | None
    current_version: str | None
    latest_version: str | None
    risk: dict[str, Any] | None
    claimed_by: str | None
    inventory_line: int | None
    updated_at: datetime

    @classmethod
    def of(cls, j: Job) -> JobRow:
        return cls(
            id=j.id,
            run_id=j.run_id,
            project_id=j.project_id,
            instance_id=j.instance_id,
            proxy_id=j.proxy_id,
            name=j.name,
            region=j.region,
            endpoint=j.endpoint,
            x_language=j.x_language,
            source_version=j.source_version,
            target_version=j.target_version,
            status=JobStatus(j.status),
            attempt_count=j.attempt_count,
            read_failures=j.read_failures or 0,
            next_attempt_at=_aware(j.next_attempt_at),
            reason=j.reason,
            hint=j.hint,
            rule=j.rule,
            current_version=j.current_version,
            latest_version=j.latest_version,
            risk=dict(j.risk) if j.risk else None,
            claimed_by=j.claimed_by,
            inventory_line=j.inventory_line,
            updated_at=_aware(j.updated_at) or utcnow(),
        )


@dataclass(frozen=True, slots=True)
class AttemptRow:
    id: int
    job_id: int
    number: int
    sent_at: datetime
    answered_at: datetime | None
    http_status: int | None
    error_code: str | None
    error_msg: str | None
    request_id: str | None
    outcome: str
    rule: str | None
    transport: str | None

    @classmethod
    def of(cls, a: Attempt) -> AttemptRow:
        return cls(
            id=a.id,
            job_id=a.job_id,
            number=a.number,
            sent_at=_aware(a.sent_at) or utcnow(),
            answered_at=_aware(a.answered_at),
            http_status=a.http_status,
            error_code=a.error_code,
            error_msg=a.error_msg,
            request_id=a.request_id,
            outcome=a.outcome,
            rule=a.rule,
            transport=a.transport,
        )


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    id: int
    job_id: int
    attempt_id: int | None
    workflow_id: str | None
    instance_id: str | None
    state: str
    error_message: str | None
    source: str
    job_status: str | None
    progress: str | None
    fail_reason: str | None
    created_at: datetime
    ended_at: datetime | None

    @classmethod
    def of(cls, w: Workflow) -> WorkflowRow:
        return cls(
            id=w.id,
            job_id=w.job_id,
            attempt_id=w.attempt_id,
            workflow_id=w.workflow_id,
            instance_id=w.instance_id,
            state=w.state,
            error_message=w.error_message,
            source=w.source,
            job_status=w.job_status,
            progress=w.progress,
            fail_reason=w.fail_reason,
            created_at=_aware(w.created_at) or utcnow(),
            ended_at=_aware(w.ended_at),
        )


@dataclass(frozen=True, slots=True)
class WorkerRow:
    id: str
    run_id: int
    role: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    lease_expires_at: datetime
    left_at: datetime | None
    claimed: int

    @classmethod
    def of(cls, w: Worker) -> WorkerRow:
        return cls(
            id=w.id,
            run_id=w.run_id,
            role=w.role,
            host=w.host,
            pid=w.pid,
            started_at=_aware(w.started_at) or utcnow(),
            heartbeat_at=_aware(w.heartbeat_at) or utcnow(),
            lease_expires_at=_aware(w.lease_expires_at) or utcnow(),
            left_at=_aware(w.left_at),
            claimed=w.claimed,
        )


@dataclass(frozen=True, slots=True)
class NewWorkflow:
    workflow_id: str | None
    state: str
    error_message: str | None = None
    instance_id: str | None = None
    source: str = "answer"


class RunLocked(RuntimeError):
    """Another live process holds the run; the message names it (host, pid, since)."""

    def __init__(self, holder: WorkerRow) -> None:
        self.holder = holder
        super().__init__(
            f"run {holder.run_id} is held by pid {holder.pid} on {holder.host} since "
            f"{holder.started_at:%Y-%m-%d %H:%M:%S}Z (last heartbeat {holder.heartbeat_at:%H:%M:%S}Z, "
            f"lease until {holder.lease_expires_at:%H:%M:%S}Z)"
        )


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_dead(holder: WorkerRow, now: datetime) -> bool:
    """A lock is dead when its lease ran out, or at once when its process is gone from this very host."""
    if holder.left_at is not None or holder.lease_expires_at <= now:
        return True
    return holder.host == socket.gethostname() and not _pid_alive(holder.pid)


# One per-run advisory lock on PostgreSQL serialises claims and send permits. One key, not two: a
# group-commit batch may hold a claim and a permit in either order, and two keys would deadlock.
RUN_LOCK = 0x6F72_0000_0000

# Upgrade calls may start only from these statuses (the guard of record_intent).
_SENDABLE = (JobStatus.PENDING.value, JobStatus.RETRY_WAIT.value)


class JobStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._sync_engine: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        if self.dialect == "sqlite":
            self._sync_engine = db.create_sync_sqlite_engine(engine.url)
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self.writer = GroupCommitWriter(self._run_batch)

    async def _run_batch(self, ops: Sequence[Op]) -> list[Any]:
        def run_all(s: Session) -> list[Any]:
            return [op(s) for op in ops]

        if self._sync_engine is not None:
            sync_engine = self._sync_engine

            def in_thread() -> list[Any]:
                with Session(sync_engine, expire_on_commit=False) as s, s.begin():
                    return run_all(s)

            return await asyncio.get_running_loop().run_in_executor(self._thread, in_thread)
        async with self._sessions() as s, s.begin():
            return await s.run_sync(run_all)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    async def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        await self.writer.close()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        if self._sync_engine is not None:
            self._sync_engine.dispose()
        await self.engine.dispose()

    # ---------------------------------------------------------------- runs
    async def create_run(
        self,
        *,
        name: str,
        inventory_path: str,
        inventory_sha256: str,
        options: Mapping[str, Any],
        jobs: Iterable[NewJob],
        now: datetime,
        batch: int = 500,
    ) -> RunRow:
        """The run and all its jobs in one transaction: a bad row leaves nothing half-written."""

        def op(s: Session) -> RunRow:
            run = Run(
                name=name,
                inventory_path=inventory_path,
                inventory_sha256=inventory_sha256,
                status=RunStatus.CREATED.value,
                created_at=now,
                options=dict(options),
            )
            s.add(run)
            s.flush()
            rows: list[dict[str, Any]] = []
            for j in jobs:
                rows.append(_job_values(run.id, j, now))
                if len(rows) >= batch:
                    s.execute(insert(Job), rows)
                    rows = []
            if rows:
                s.execute(insert(Job), rows)
            return RunRow.of(run)

        return await self.writer.submit(op)

    async def add_jobs(self, run_id: int, jobs: Iterable[NewJob], now: datetime) -> int:
        """Jobs added to an existing run (an inventory that grew before a resume); duplicates ignored."""

        def op(s: Session) -> int:
            existing = {
                (p, i, x)
                for p, i, x in (
                    s.execute(
                        select(Job.project_id, Job.instance_id, Job.proxy_id).where(Job.run_id == run_id)
                    )
                ).all()
            }
            rows = [
                _job_values(run_id, j, now)
                for j in jobs
                if (j.project_id, j.instance_id, j.proxy_id) not in existing
            ]
            for i in range(0, len(rows), 500):
                s.execute(insert(Job), rows[i : i + 500])
            return len(rows)

        return await self.writer.submit(op)

    async def set_run_status(
        self, run_id: int, status: RunStatus, now: datetime, reason: str | None = None
    ) -> None:
        def op(s: Session) -> None:
            values: dict[str, Any] = {"status": status.value, "stop_reason": reason}
            if status is RunStatus.RUNNING:
                values["started_at"] = func.coalesce(Run.started_at, now)
                values["finished_at"] = None
            if status is RunStatus.FINISHED:
                values["finished_at"] = now
            s.execute(_update(Run).where(Run.id == run_id).values(**values))

        await self.writer.submit(op)

    async def set_run_options(self, run_id: int, options: Mapping[str, Any]) -> None:
        def op(s: Session) -> None:
            s.execute(_update(Run).where(Run.id == run_id).values(options=dict(options)))

        await self.writer.submit(op)

    async def set_run_inventory(self, run_id: int, path: str, sha256: str) -> None:
        """After a resume applied a changed inventory: later resumes compare against this version."""

        def op(s: Session) -> None:
            s.execute(
                _update(Run).where(Run.id == run_id).values(inventory_path=path, inventory_sha256=sha256)
            )

        await self.writer.submit(op)

    async def get_run(self, run_id: int) -> RunRow | None:
        async with self._sessions() as s:
            run = await s.get(Run, run_id)
            return RunRow.of(run) if run else None

    async def find_run(self, ref: str) -> RunRow | None:
        """A run by id or by name (the newest of that name)."""
        async with self._sessions() as s:
            if ref.isdigit():
                run = await s.get(Run, int(ref))
                if run:
                    return RunRow.of(run)
            found = (
                await s.execute(select(Run).where(Run.name == ref).order_by(Run.id.desc()).limit(1))
            ).scalar_one_or_none()
            return RunRow.of(found) if found else None

    async def latest_run(
        self, *, unfinished: bool = False, inventory_path: str | None = None
    ) -> RunRow | None:
        async with self._sessions() as s:
            q = select(Run).order_by(Run.id.desc()).limit(1)
            if unfinished:
                q = q.where(Run.status != RunStatus.FINISHED.value)
            if inventory_path is not None:
                q = q.where(Run.inventory_path == inventory_path)
            found = (await s.execute(q)).scalar_one_or_none()
            return RunRow.of(found) if found else None

    async def list_runs(self, limit: int = 20) -> list[RunRow]:
        async with self._sessions() as s:
            rows = (await s.execute(select(Run).order_by(Run.id.desc()).limit(limit))).scalars().all()
            return [RunRow.of(r) for r in rows]

    # ------------------------------------------------------------- workers
    async def register(
        self,
        run_id: int,
        *,
        worker_id: str,
        role: str,
        now: datetime,
        lease_s: float,
        exclusive: bool,
    ) -> list[str]:
        """Join a run. ``exclusive`` (the runner of ``run``/``resume``) refuses while another live runner
        holds it (``RunLocked``); a dead holder's registration is closed and its job leases released at
        once, so the jobs it held become claimable (its in-flight ones through reconciliation). Returns
        the ids of the dead workers taken over."""

        def op(s: Session) -> list[str]:
            others = (
                (s.execute(select(Worker).where(Worker.run_id == run_id, Worker.left_at.is_(None))))
                .scalars()
                .all()
            )
            dead: list[str] = []
            for w in others:
                row = WorkerRow.of(w)
                if holder_is_dead(row, now):
                    dead.append(w.id)
                elif exclusive and w.role == "runner":
                    raise RunLocked(row)
            if dead:
                s.execute(_update(Worker).where(Worker.id.in_(dead)).values(left_at=now))
                s.execute(_update(Job).where(Job.claimed_by.in_(dead)).values(lease_expires_at=now))
                s.execute(
                    _update(SendSlot)
                    .where(SendSlot.worker.in_(dead), SendSlot.done_at.is_(None))
                    .values(done_at=now)
                )
            s.add(
                Worker(
                    id=worker_id,
                    run_id=run_id,
                    role=role,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    claimed=0,
                )
            )
            return dead

        return await self.writer.submit(op)

    async def heartbeat(self, worker_id: str, now: datetime, lease_s: float) -> bool:
        """Extend this worker's lease and its jobs' leases. False: the registration was taken over (this
        process was presumed dead): the caller must stop at once."""
        until = now + timedelta(seconds=lease_s)

        def op(s: Session) -> bool:
            res = s.execute(
                _update(Worker)
                .where(Worker.id == worker_id, Worker.left_at.is_(None))
                .values(heartbeat_at=now, lease_expires_at=until)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                return False
            s.execute(
                _update(Job)
                .where(Job.claimed_by == worker_id, Job.lease_expires_at > now)
                .values(lease_expires_at=until)
            )
            return True

        return await self.writer.submit(op)

    async def leave(self, worker_id: str, now: datetime) -> None:
        def op(s: Session) -> None:
            s.execute(_update(Worker).where(Worker.id == worker_id).values(left_at=now))
            s.execute(
                _update(Job).where(Job.claimed_by == worker_id).values(claimed_by=None, lease_expires_at=None)
            )

        await self.writer.submit(op)

    async def live_workers(self, run_id: int, now: datetime) -> list[WorkerRow]:
        async with self._sessions() as s:
            rows = (
                (
                    await s.execute(
                        select(Worker)
                        .where(Worker.run_id == run_id, Worker.left_at.is_(None))
                        .order_by(Worker.started_at)
                    )
                )
                .scalars()
                .all()
            )
            out = []
            for w in rows:
                row = WorkerRow.of(w)
                if not holder_is_dead(row, now):
                    out.append(row)
            return out

    async def claimed_counts(self, run_id: int) -> dict[str, int]:
        async with self._sessions() as s:
            rows = (
                await s.execute(
                    select(Job.claimed_by, func.count())
                    .where(Job.run_id == run_id, Job.claimed_by.is_not(None))
                    .group_by(Job.claimed_by)
                )
            ).all()
            return {str(k): int(v) for k, v in rows}

    # -------------------------------------------------------------- claims
    async def claim(
        self,
        run_id: int,
        *,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_s: float,
        track: bool,
    ) -> list[JobRow]:
        """Claim up to ``limit`` due jobs. At most one upgrade per instance is under way at a time (the
        cloud runs one operation per instance, and finding a lost answer's workflow relies on it).
        In-flight jobs whose lease expired (their worker died) become ``unknown`` first."""
        until = now + timedelta(seconds=lease_s)
        S = JobStatus
        busy_states = [S.IN_FLIGHT.value, S.UNKNOWN.value] + ([S.ACCEPTED.value] if track else [])

        def op(s: Session) -> list[JobRow]:
            if self.is_postgres:
                # Claims of one run are serialised: under READ COMMITTED two concurrent claimers would
                # each miss the other's uncommitted sibling claim and upgrade one instance twice at once.
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": RUN_LOCK + run_id})
            s.execute(
                _update(Job)
                .where(
                    Job.run_id == run_id,
                    Job.status == S.IN_FLIGHT.value,
                    or_(Job.claimed_by.is_(None), Job.lease_expires_at <= now),
                )
                .values(
                    status=S.UNKNOWN.value,
                    claimed_by=None,
                    next_attempt_at=now,
                    reason="the worker holding this upgrade call died: checking what the cloud did",
                    updated_at=now,
                )
            )
            other = aliased(Job)
            sibling_busy = exists().where(
                other.run_id == Job.run_id,
                other.instance_id == Job.instance_id,
                other.project_id == Job.project_id,
                other.id != Job.id,
                or_(
                    other.status.in_(busy_states),
                    and_(
                        other.status.in_(_SENDABLE),
                        other.claimed_by.is_not(None),
                        other.lease_expires_at > now,
                    ),
                ),
            )
            due = or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)
            wanted = [S.PENDING.value, S.RETRY_WAIT.value, S.UNKNOWN.value] + (
                [S.ACCEPTED.value] if track else []
            )
            q = (
                select(Job)
                .where(
                    Job.run_id == run_id,
                    Job.status.in_(wanted),
                    due,
                    or_(Job.claimed_by.is_(None), Job.lease_expires_at <= now),
                    or_(Job.status.not_in(_SENDABLE), ~sibling_busy),
                )
                .order_by(
                    # lost answers and running workflows first: their timing matters (reconcile grace,
                    # poll interval); fresh jobs wait their turn behind them
                    case((Job.status.in_([S.UNKNOWN.value, S.ACCEPTED.value]), 0), else_=1),
                    Job.next_attempt_at.is_not(None),
                    Job.next_attempt_at,
                    Job.id,
                )
                .limit(limit * 4)
            )
            if self.is_postgres:
                q = q.with_for_update(skip_locked=True, of=Job)
            candidates = (s.execute(q)).scalars().all()
            chosen: list[Job] = []
            instances: set[tuple[str, str]] = set()
            for j in candidates:
                if j.status in _SENDABLE:
                    key = (j.project_id, j.instance_id)
                    if key in instances:
                        continue
                    instances.add(key)
                chosen.append(j)
                if len(chosen) >= limit:
                    break
            if not chosen:
                return []
            ids = [j.id for j in chosen]
            res = s.execute(
                _update(Job)
                .where(Job.id.in_(ids), or_(Job.claimed_by.is_(None), Job.lease_expires_at <= now))
                .values(claimed_by=worker_id, lease_expires_at=until)
                .returning(Job.id)
            )
            won = {r[0] for r in res.all()}
            s.execute(_update(Worker).where(Worker.id == worker_id).values(claimed=Worker.claimed + len(won)))
            out = []
            for j in chosen:
                if j.id in won:
                    j.claimed_by = worker_id
                    out.append(JobRow.of(j))
            return out

        return await self.writer.submit(op)

    async def release(self, job_id: int, worker_id: str) -> None:
        def op(s: Session) -> None:
            s.execute(
                _update(Job)
                .where(Job.id == job_id, Job.claimed_by == worker_id)
                .values(claimed_by=None, lease_expires_at=None)
            )

        await self.writer.submit(op)

    # ------------------------------------------------------------- moves
    async def record_intent(self, job: JobRow, *, worker_id: str, now: datetime) -> int | None:
        """Durably record that an upgrade call is about to leave, before it leaves. None: the job was
        moved by someone else meanwhile (the guard lost), so the call must not be sent."""
        number = job.attempt_count + 1

        def op(s: Session) -> int | None:
            res = s.execute(
                _update(Job)
                .where(
                    Job.id == job.id,
                    Job.status.in_(_SENDABLE),
                    Job.claimed_by == worker_id,
                    Job.attempt_count == job.attempt_count,
                )
                .values(
                    status=JobStatus.IN_FLIGHT.value,
                    attempt_count=number,
                    updated_at=now,
                    next_attempt_at=None,
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None
            attempt = Attempt(
                job_id=job.id, number=number, worker=worker_id, sent_at=now, outcome="in_flight"
            )
            s.add(attempt)
            s.flush()
            return attempt.id

        return await self.writer.submit(op)

    async def cancel_intent(self, job_id: int, attempt_id: int, *, worker_id: str, now: datetime) -> bool:
        """A stop arrived between intent and send: the call never left, so the job is simply due again."""

        def op(s: Session) -> bool:
            s.execute(
                _update(Attempt).where(Attempt.id == attempt_id).values(outcome="not_sent", answered_at=now)
            )
            return _move(
                s,
                job_id,
                {JobStatus.IN_FLIGHT},
                JobStatus.RETRY_WAIT,
                now,
                {"next_attempt_at": now, "reason": "stopped before the call was sent"},
                release=worker_id,
            )

        return await self.writer.submit(op)

    async def record_answer(
        self,
        *,
        job_id: int,
        attempt_id: int,
        now: datetime,
        outcome: str,
        http_status: int | None = None,
        error_code: str | None = None,
        error_msg: str | None = None,
        request_id: str | None = None,
        rule: str | None = None,
        transport: str | None = None,
        workflows: Sequence[NewWorkflow] = (),
        move_to: JobStatus,
        job_fields: Mapping[str, Any] | None = None,
        worker_id: str | None = None,
        sent_at: datetime | None = None,
    ) -> bool:
        """The answer to an attempt, every update_result item, and the job's move, in one commit.
        ``sent_at`` corrects the intent's timestamp to when the call really left (after the limiter)."""

        def op(s: Session) -> bool:
            s.execute(
                _update(Attempt)
                .where(Attempt.id == attempt_id)
                .values(
                    answered_at=now,
                    **({"sent_at": sent_at} if sent_at is not None else {}),
                    outcome=outcome,
                    http_status=http_status,
                    error_code=error_code,
                    error_msg=error_msg,
                    request_id=request_id,
                    rule=rule,
                    transport=transport,
                )
            )
            for w in workflows:
                s.add(
                    Workflow(
                        job_id=job_id,
                        attempt_id=attempt_id,
                        workflow_id=w.workflow_id,
                        instance_id=w.instance_id,
                        state=w.state,
                        error_message=w.error_message,
                        source=w.source,
                        created_at=now,
                    )
                )
            return _move(s, job_id, {JobStatus.IN_FLIGHT}, move_to, now, job_fields, release=worker_id)

        return await self.writer.submit(op)

    async def move(
        self,
        job_id: int,
        *,
        frm: Iterable[JobStatus],
        to: JobStatus,
        now: datetime,
        fields: Mapping[str, Any] | None = None,
        release: str | None = None,
        attempt_update: tuple[int, Mapping[str, Any]] | None = None,
        workflows: Sequence[NewWorkflow] = (),
        attempt_for_workflows: int | None = None,
    ) -> bool:
        def op(s: Session) -> bool:
            ok = _move(s, job_id, set(frm), to, now, fields, release=release)
            if ok and attempt_update is not None:
                aid, values = attempt_update
                s.execute(_update(Attempt).where(Attempt.id == aid).values(**values))
            if ok:
                for w in workflows:
                    s.add(
                        Workflow(
                            job_id=job_id,
                            attempt_id=attempt_for_workflows,
                            workflow_id=w.workflow_id,
                            instance_id=w.instance_id,
                            state=w.state,
                            error_message=w.error_message,
                            source=w.source,
                            created_at=now,
                        )
                    )
            return ok

        return await self.writer.submit(op)

    async def update_job_fields(self, job_id: int, fields: Mapping[str, Any], now: datetime) -> None:
        def op(s: Session) -> None:
            s.execute(_update(Job).where(Job.id == job_id).values(updated_at=now, **fields))

        await self.writer.submit(op)

    async def update_workflow(self, row_id: int, fields: Mapping[str, Any]) -> None:
        def op(s: Session) -> None:
            s.execute(_update(Workflow).where(Workflow.id == row_id).values(**fields))

        await self.writer.submit(op)

    async def requeue(
        self,
        run_id: int,
        *,
        statuses: Iterable[JobStatus],
        proxy_ids: Sequence[str] | None,
        now: datetime,
    ) -> int:
        """Operator re-queue: chosen flagged/failed jobs back to pending, history kept."""
        chosen = list(statuses)
        for st in chosen:
            check_move(st, JobStatus.PENDING)
        frm = [st.value for st in chosen]

        def op(s: Session) -> int:
            q = _update(Job).where(Job.run_id == run_id, Job.status.in_(frm))
            if proxy_ids:
                q = q.where(Job.proxy_id.in_(list(proxy_ids)))
            res = s.execute(
                q.values(
                    status=JobStatus.PENDING.value,
                    next_attempt_at=None,
                    claimed_by=None,
                    lease_expires_at=None,
                    reason=None,
                    hint=None,
                    rule=None,
                    updated_at=now,
                )
            )
            n = int(res.rowcount)  # type: ignore[attr-defined]
            if n:
                s.execute(
                    _update(Run)
                    .where(Run.id == run_id, Run.status == RunStatus.FINISHED.value)
                    .values(status=RunStatus.STOPPED.value, finished_at=None, stop_reason="re-queued")
                )
            return n

        return await self.writer.submit(op)

    # ------------------------------------------------------------- reads
    async def get_job(self, job_id: int) -> JobRow | None:
        async with self._sessions() as s:
            j = await s.get(Job, job_id)
            return JobRow.of(j) if j else None

    async def first_job(self, run_id: int, statuses: Iterable[JobStatus]) -> JobRow | None:
        async with self._sessions() as s:
            j = (
                await s.execute(
                    select(Job)
                    .where(Job.run_id == run_id, Job.status.in_([x.value for x in statuses]))
                    .order_by(Job.id)
                    .limit(1)
                )
            ).scalar_one_or_none()
            return JobRow.of(j) if j else None

    async def jobs(self, run_id: int, statuses: Iterable[JobStatus] | None = None) -> list[JobRow]:
        async with self._sessions() as s:
            q = select(Job).where(Job.run_id == run_id).order_by(Job.id)
            if statuses is not None:
                q = q.where(Job.status.in_([x.value for x in statuses]))
            return [JobRow.of(j) for j in (await s.execute(q)).scalars().all()]

    async def iter_job_keys(self, run_id: int) -> dict[tuple[str, str, str], tuple[str, str, int]]:
        """(project, instance, proxy) -> (target_version, status, id): to compare with a changed inventory."""
        async with self._sessions() as s:
            rows = (
                await s.execute(
                    select(
                        Job.project_id, Job.instance_id, Job.proxy_id, Job.target_version, Job.status, Job.id
                    ).where(Job.run_id == run_id)
                )
            ).all()
            return {(p, i, x): (t, st, jid) for p, i, x, t, st, jid in rows}

    async def counts(self, run_id: int) -> dict[JobStatus, int]:
        async with self._sessions() as s:
            rows = (
                await s.execute(
                    select(Job.status, func.count()).where(Job.run_id == run_id).group_by(Job.status)
                )
            ).all()
            out = {st: 0 for st in JobStatus}
            for st, n in rows:
                out[JobStatus(st)] = int(n)
            return out

    async def next_due(self, run_id: int, *, track: bool) -> datetime | None:
        """The earliest moment a job of this run may become claimable (for the engine's idle sleep)."""
        wanted = [JobStatus.RETRY_WAIT.value, JobStatus.UNKNOWN.value] + (
            [JobStatus.ACCEPTED.value] if track else []
        )
        async with self._sessions() as s:
            v = (
                await s.execute(
                    select(func.min(Job.next_attempt_at)).where(Job.run_id == run_id, Job.status.in_(wanted))
                )
            ).scalar_one_or_none()
            return _aware(v)

    async def attempts(self, job_id: int) -> list[AttemptRow]:
        async with self._sessions() as s:
            rows = (
                await s.execute(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number))
            ).scalars()
            return [AttemptRow.of(a) for a in rows]

    async def last_attempt(self, job_id: int) -> AttemptRow | None:
        async with self._sessions() as s:
            a = (
                await s.execute(
                    select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number.desc()).limit(1)
                )
            ).scalar_one_or_none()
            return AttemptRow.of(a) if a else None

    async def workflows_of(self, job_id: int) -> list[WorkflowRow]:
        async with self._sessions() as s:
            rows = (
                await s.execute(select(Workflow).where(Workflow.job_id == job_id).order_by(Workflow.id))
            ).scalars()
            return [WorkflowRow.of(w) for w in rows]

    async def known_workflow_ids(self, run_id: int) -> set[str]:
        async with self._sessions() as s:
            rows = (
                await s.execute(
                    select(Workflow.workflow_id)
                    .join(Job, Job.id == Workflow.job_id)
                    .where(Job.run_id == run_id, Workflow.workflow_id.is_not(None))
                )
            ).scalars()
            return {str(w) for w in rows}

    async def all_workflow_ids(self) -> set[str]:
        async with self._sessions() as s:
            rows = (
                await s.execute(select(Workflow.workflow_id).where(Workflow.workflow_id.is_not(None)))
            ).scalars()
            return {str(w) for w in rows}

    async def active_count(self, run_id: int, *, track: bool) -> int:
        active = [s.value for s in ACTIVE if track or s is not JobStatus.ACCEPTED]
        async with self._sessions() as s:
            return int(
                (
                    await s.execute(select(func.count()).where(Job.run_id == run_id, Job.status.in_(active)))
                ).scalar_one()
            )

    async def try_send_slot(
        self,
        run_id: int,
        *,
        worker_id: str,
        count: int,
        period: float,
        cap: int,
        lease_s: float,
        margin: float = 0.0,
    ) -> tuple[int | None, float]:
        """One attempt at a run-wide send permit: (slot id, 0) or (None, seconds to wait).

        The window log and the in-flight slots live in ``send_log``; a per-run advisory lock on
        PostgreSQL (BEGIN IMMEDIATE on SQLite) serialises the check-and-insert across processes. Time
        comes from the database server so that workers on hosts with drifting clocks share one window.
        The window spans ``period + margin``: a permit is stamped before its commit and its send, and
        the margin absorbs how much later one send leaves than another.
        """

        def op(s: Session) -> tuple[int | None, float]:
            if self.is_postgres:
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": RUN_LOCK + run_id})
                now = _aware((s.execute(text("SELECT clock_timestamp()"))).scalar_one())
            else:
                now = utcnow()
            assert now is not None
            window_start = now - timedelta(seconds=period + margin)
            starts = (
                (
                    s.execute(
                        select(SendSlot.at)
                        .where(SendSlot.run_id == run_id, SendSlot.at > window_start)
                        .order_by(SendSlot.at)
                    )
                )
                .scalars()
                .all()
            )
            if len(starts) >= count:
                oldest = _aware(starts[len(starts) - count])
                assert oldest is not None
                return None, max(0.001, (oldest - window_start).total_seconds())
            in_flight = (
                s.execute(
                    select(func.count()).where(
                        SendSlot.run_id == run_id,
                        SendSlot.done_at.is_(None),
                        SendSlot.lease_expires_at > now,
                    )
                )
            ).scalar_one()
            if in_flight >= cap:
                return None, 0.02
            slot = SendSlot(
                run_id=run_id, at=now, worker=worker_id, lease_expires_at=now + timedelta(seconds=lease_s)
            )
            s.add(slot)
            s.flush()
            return slot.id, 0.0

        return await self.writer.submit(op)

    async def release_send_slot(self, slot_id: int) -> None:
        def op(s: Session) -> None:
            s.execute(_update(SendSlot).where(SendSlot.id == slot_id).values(done_at=utcnow()))

        await self.writer.submit(op)

    async def prune_send_log(self, run_id: int, before: datetime) -> None:
        def op(s: Session) -> None:
            s.execute(
                delete(SendSlot).where(
                    SendSlot.run_id == run_id, SendSlot.at < before, SendSlot.done_at.is_not(None)
                )
            )

        await self.writer.submit(op)

    def session(self) -> AsyncSession:
        """A short read session for reporting queries (never used for writes)."""
        return self._sessions()


def _move(
    s: Session,
    job_id: int,
    frm: set[JobStatus],
    to: JobStatus,
    now: datetime,
    fields: Mapping[str, Any] | None,
    *,
    release: str | None,
) -> bool:
    for f in frm:
        check_move(f, to)
    values: dict[str, Any] = {"status": to.value, "updated_at": now}
    if fields:
        values.update(fields)
    if release is not None:
        values.setdefault("claimed_by", None)
        values.setdefault("lease_expires_at", None)
    q = _update(Job).where(Job.id == job_id, Job.status.in_([f.value for f in frm]))
    if release is not None:
        q = q.where(or_(Job.claimed_by == release, Job.claimed_by.is_(None)))
    res = s.execute(q.values(**values))
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def _job_values(run_id: int, j: NewJob, now: datetime) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "project_id": j.project_id,
        "instance_id": j.instance_id,
        "proxy_id": j.proxy_id,
        "name": j.name,
        "region": j.region,
        "endpoint": j.endpoint,
        "x_language": j.x_language,
        "source_version": j.source_version,
        "target_version": j.target_version,
        "inventory_line": j.line,
        "status": JobStatus.PENDING.value,
        "attempt_count": 0,
        "read_failures": 0,
        "created_at": now,
        "updated_at": now,
    }


async def open_store(url: str | None = None, *, migrate: bool = True) -> JobStore:
    """Open the job table at ``url`` (or ORCHESTRATOR_DB, or ./orchestrator.db), upgraded to head."""
    full = db.normalize_url(url)
    engine = db.create_engine(full)
    if migrate:
        await db.ensure_current(engine)
    store = JobStore(engine)
    await store.start()
    return store


def describe_url(url: str | None) -> str:
    full = db.normalize_url(url)
    parsed = make_url(full)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:{parsed.database}"
    return db.safe_url(full)
