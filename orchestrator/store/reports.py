"""Read queries behind ``report``, ``history``, ``runs``, ``flagged`` and the HTML window report.

SQLAlchemy Core on an ``AsyncConnection`` only (no ORM objects: a 100,000-job report must stream in bounded
memory), never a write. The definitions match the audit views of migration 0006 (``docs/audit.md``):

- *first sent*: the earliest ``attempts.sent_at`` of a job;
- *accepted*: the earliest ``created_at`` of its ``ACCEPT`` workflows;
- *workflow ended*: the latest ``ended_at`` of its ``ACCEPT`` workflows once every one of them has ended
  (None while one is open);
- *duration*: workflow ended minus first sent, in seconds (retries and operator pauses included).

Every time returned is timezone-aware UTC (SQLite hands stored UTC back naive; it is marked here). Hints are
returned with their ``{run}`` placeholder filled with the run's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Select, String, func, or_, select, text, type_coerce
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator import states
from orchestrator.store.models import Attempt, Event, Job, Run, Workflow

J = Job.__table__.c
R = Run.__table__.c
A = Attempt.__table__.c
W = Workflow.__table__.c
E = Event.__table__.c

#: rows fetched per round trip when streaming (bounded memory, few thread hops on aiosqlite)
STREAM_BATCH = 2000

STATUS_ORDER = states.STATUS_ORDER  # re-exported: the renderers import it from here


def aware(value: datetime | None) -> datetime | None:
    """A stored time as aware UTC (SQLite returns it naive; it was written as UTC)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def fill_hint(hint: str | None, run_id: int) -> str | None:
    """The hint with each ``{run}`` replaced by the run's id (plain replace: hints may hold other braces)."""
    return hint.replace("{run}", str(run_id)) if hint else hint


# ------------------------------------------------------------------------------------------ report
class WorkflowBrief(NamedTuple):
    """One workflow of a job as the report shows it: ``state`` is the answer's ``ACCEPT``/``REJECT``,
    ``status`` the cloud's ``Pending``/``Running``/``Completed``/``Failed``/``Canceled`` as last polled
    (None before the first poll, and for a REJECT), ``ended`` when it ended (UTC)."""

    workflow_id: str | None
    state: str
    status: str | None
    ended: datetime | None


class ReportRow(NamedTuple):
    """One job of a run. ``inventory_version`` is what the inventory said the proxy ran (not an outcome);
    ``current_version`` is what the proxy ran when last read (preflight, then postflight). Times UTC,
    ``duration_s`` in seconds. (A NamedTuple: 100,000 of them are built per report, and a frozen
    dataclass costs several times more to build.)"""

    run_id: int
    job_id: int
    project_id: str
    instance_id: str
    proxy_id: str
    name: str | None
    wave: int
    status: str
    attempts: int
    inventory_version: str | None
    target_version: str
    current_version: str | None
    first_sent: datetime | None
    accepted: datetime | None
    workflow_ended: datetime | None
    duration_s: float | None
    reason: str | None
    hint: str | None
    rule: str | None
    workflows: tuple[WorkflowBrief, ...]


REPORT_COLUMNS = ReportRow._fields

# positions in the report query's rows (see _report_query); the stream is read by index for speed
_HINT, _RULE, _FIRST = 12, 13, 14
_WID, _STATE, _WSTATUS, _WCREATED, _WENDED = 15, 16, 17, 18, 19


def _sqlite_time(text: str | None) -> datetime | None:
    """A time stored by SQLAlchemy on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC, no offset) as an aware
    datetime: one ``fromisoformat`` instead of SQLAlchemy's parse plus a ``replace(tzinfo=UTC)``, which
    together cost several times more (half a million times per 100,000-job report)."""
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text + "+00:00")
    except ValueError:  # written with an offset by something else
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=UTC)


def _report_query(
    run_id: int, statuses: Sequence[str] | None, *, sqlite: bool, id_range: tuple[int, int] | None
) -> Select[Any]:
    def ts(col: Any) -> Any:
        return _time_col(col, sqlite)

    first_sent = select(func.min(A.sent_at)).where(A.job_id == J.id).scalar_subquery()
    q = select(
        J.id,
        J.project_id,
        J.instance_id,
        J.proxy_id,
        J.name,
        J.wave,
        J.status,
        J.attempt_count,
        J.source_version,
        J.target_version,
        J.current_version,
        J.reason,
        J.hint,
        J.rule,
        ts(first_sent).label("first_sent"),
        W.workflow_id,
        W.state,
        W.job_status,
        ts(W.created_at),
        ts(W.ended_at),
    ).select_from(Job.__table__.outerjoin(Workflow.__table__, W.job_id == J.id))
    if id_range is not None:
        # SQLite: walk the table in id order over the run's id range ("+ 0" keeps the planner off the
        # run_id indexes, whose order would need a sort of every row of the report first)
        q = q.where(J.id.between(*id_range), J.run_id + 0 == run_id)
    else:
        q = q.where(J.run_id == run_id)
    if statuses:
        q = q.where(J.status.in_(list(statuses)))
    return q.order_by(J.id, W.id)


def _job_row(run_id: int, rows: list[Any], ts: Callable[[Any], datetime | None]) -> ReportRow:
    head = rows[0]
    workflows: list[WorkflowBrief] = []
    accepted: datetime | None = None
    ended: datetime | None = None
    open_accepts = 0
    if head[_STATE] is not None:  # else the outer join's empty side: a job without workflows
        for r in rows:
            state = r[_STATE]
            w_ended = ts(r[_WENDED])
            workflows.append(WorkflowBrief(r[_WID], state, r[_WSTATUS], w_ended))
            if state == "ACCEPT":
                created = ts(r[_WCREATED])
                if created is not None and (accepted is None or created < accepted):
                    accepted = created
                if w_ended is None:
                    open_accepts += 1
                elif ended is None or w_ended > ended:
                    ended = w_ended
        if open_accepts:
            ended = None
    first_sent = ts(head[_FIRST])
    hint = head[_HINT]
    return ReportRow(
        run_id,
        head[0],
        head[1],
        head[2],
        head[3],
        head[4],
        head[5],
        head[6],
        head[7],
        head[8],
        head[9],
        head[10],
        first_sent,
        accepted,
        ended,
        None if ended is None or first_sent is None else round((ended - first_sent).total_seconds(), 3),
        head[11],
        hint.replace("{run}", str(run_id)) if hint else hint,
        head[_RULE],
        tuple(workflows),
    )


async def report_rows(
    conn: AsyncConnection,
    run_id: int,
    *,
    statuses: Sequence[str] | None = None,
    batch: int = STREAM_BATCH,
) -> AsyncIterator[ReportRow]:
    """Every job of run ``run_id`` (only ``statuses`` when given), in inventory order (job id), streamed:
    one query (jobs outer-joined to their workflows, first call time as a subquery), read ``batch`` rows
    at a time through a server-side cursor, so memory stays flat whatever the size of the run (about
    60 MB peak RSS for a 100,000-job report, most of it the interpreter and its libraries)."""
    sqlite = conn.dialect.name == "sqlite"
    id_range = None
    if sqlite:
        lo, hi = (await conn.execute(select(func.min(J.id), func.max(J.id)).where(J.run_id == run_id))).one()
        if lo is None:
            return
        id_range = (int(lo), int(hi))
    else:
        await _no_jit(conn)
    ts = _time_reader(sqlite)
    query = _report_query(run_id, statuses, sqlite=sqlite, id_range=id_range)
    result = await conn.stream(query.execution_options(yield_per=batch))
    pending: list[Any] = []
    current = None
    # double buffering: the next batch is fetched (by the driver's thread on SQLite, the socket on
    # PostgreSQL) while this one is turned into rows and written
    ahead: asyncio.Future[Sequence[Any]] = asyncio.ensure_future(result.fetchmany(batch))
    try:
        while True:
            part = await ahead
            if not part:
                break
            ahead = asyncio.ensure_future(result.fetchmany(batch))
            await asyncio.sleep(0)  # let the fetch start before the CPU work below
            for r in part:
                if r[0] != current:
                    if pending:
                        yield _job_row(run_id, pending, ts)
                    pending = []
                    current = r[0]
                pending.append(r)
        if pending:
            yield _job_row(run_id, pending, ts)
    finally:
        # a consumer that stops early: let the fetch under way finish (cancelling it mid-call would
        # leave the connection's transaction invalid), then close the cursor
        with contextlib.suppress(Exception):
            await ahead
        await result.close()


async def _no_jit(conn: AsyncConnection) -> None:
    """PostgreSQL: no JIT compilation for the rest of this transaction. The report's correlated subquery
    makes the planner's cost estimate large enough to trigger JIT, which then spent 430 ms of a 760 ms
    100,000-job report compiling a plan that runs once (measured with EXPLAIN ANALYZE, PostgreSQL 15)."""
    await conn.execute(text("SET LOCAL jit = off"))


def _time_col(col: Any, sqlite: bool) -> Any:
    """A time column as selected for a long read: raw text on SQLite (parsed by :func:`_sqlite_time`)."""
    return type_coerce(col, String) if sqlite else col


def _time_reader(sqlite: bool) -> Callable[[Any], datetime | None]:
    """The parser of what :func:`_time_col` selects: aware UTC datetimes on both backends."""
    return _sqlite_time if sqlite else aware


async def status_counts(conn: AsyncConnection, run_id: int) -> dict[str, int]:
    """Jobs of a run by status: ``{status: count}`` (statuses without jobs are absent)."""
    rows = await conn.execute(select(J.status, func.count()).where(J.run_id == run_id).group_by(J.status))
    return {str(s): int(n) for s, n in rows}


# ------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's row: times UTC, ``options`` the stored ``RunOptions`` JSON (plus whatever later options a
    release adds: window, waves, breaker)."""

    id: int
    name: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    stop_reason: str | None
    options: Mapping[str, Any]
    inventory_path: str
    wave_open: int
    failures_acked: int


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run and its jobs by status (``counts``: ``{status: n}``, absent statuses are 0)."""

    run: RunInfo
    counts: Mapping[str, int]

    @property
    def jobs(self) -> int:
        """All the run's jobs."""
        return sum(self.counts.values())

    @property
    def needs_operator(self) -> int:
        """Jobs flagged or failed: what an operator must look at."""
        return self.counts.get("flagged", 0) + self.counts.get("failed", 0)


def _run_info(r: Any) -> RunInfo:
    return RunInfo(
        id=r.id,
        name=r.name,
        status=r.status,
        created_at=aware(r.created_at) or datetime.min.replace(tzinfo=UTC),
        started_at=aware(r.started_at),
        finished_at=aware(r.finished_at),
        stop_reason=r.stop_reason,
        options=dict(r.options or {}),
        inventory_path=r.inventory_path,
        wave_open=r.wave_open,
        failures_acked=r.failures_acked,
    )


async def get_run(conn: AsyncConnection, run_id: int) -> RunInfo | None:
    """One run by id, or None."""
    row = (await conn.execute(select(Run.__table__).where(R.id == run_id))).first()
    return _run_info(row) if row is not None else None


async def list_runs(
    conn: AsyncConnection,
    *,
    since: datetime | None = None,
    statuses: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[RunSummary]:
    """Runs newest first: created at or after ``since`` (aware; naive is read as UTC), with a status in
    ``statuses`` when given, at most ``limit``; each with its jobs counted by status (one grouped query)."""
    q = select(Run.__table__).order_by(R.id.desc())
    if since is not None:
        q = q.where(R.created_at >= _utc(since))
    wanted = list(statuses or [])
    if wanted:
        q = q.where(R.status.in_(wanted))
    if limit is not None:
        q = q.limit(limit)
    runs = [_run_info(r) for r in await conn.execute(q)]
    if not runs:
        return []
    counts: dict[int, dict[str, int]] = {r.id: {} for r in runs}
    rows = await conn.execute(
        select(J.run_id, J.status, func.count())
        .where(J.run_id.in_(list(counts)))
        .group_by(J.run_id, J.status)
    )
    for run_id, status, n in rows:
        counts[run_id][status] = int(n)
    return [RunSummary(r, counts[r.id]) for r in runs]


def _utc(v: datetime) -> datetime:
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


# ---------------------------------------------------------------------------------------- history
@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a proxy's or an instance's history across runs.

    ``kind`` is ``call`` (an upgrade call: ``ref`` ``#N``, ``state`` its outcome, ``detail`` the HTTP status
    and error code or the transport failure, ``who`` the sending worker, ``until`` when it was answered),
    ``workflow`` (``ref`` the workflow id, ``state`` ACCEPT/REJECT, ``detail`` the cloud's final status and
    where the id came from, ``until`` when it ended) or ``event`` (``ref`` the event kind, ``state`` the
    status moved to, ``detail`` ``from -> to``, ``who`` ``user@host (pid N)``). ``version_before`` is the
    inventory's version of the proxy, ``version_after`` what the proxy ran when that run last read it.
    Run-level events (stop, pause, resume, halt) of the runs involved have no proxy. Times UTC."""

    at: datetime
    kind: str
    run_id: int
    run_name: str
    job_id: int | None
    project_id: str | None
    instance_id: str | None
    proxy_id: str | None
    version_before: str | None
    version_after: str | None
    target_version: str | None
    ref: str
    state: str | None
    detail: str | None
    reason: str | None
    rule: str | None
    who: str | None
    until: datetime | None


HISTORY_COLUMNS = tuple(HistoryEntry.__dataclass_fields__)
_KIND_RANK = {"call": 0, "workflow": 1, "event": 2}


def _job_cols() -> list[Any]:
    return [
        J.run_id,
        R.name.label("run_name"),
        J.id.label("job_id"),
        J.project_id,
        J.instance_id,
        J.proxy_id,
        J.source_version,
        J.current_version,
        J.target_version,
    ]


def _job_filter(proxy_id: str | None, instance_id: str | None, project_id: str | None) -> list[Any]:
    conds = []
    if proxy_id is not None:
        conds.append(J.proxy_id == proxy_id)
    if instance_id is not None:
        conds.append(J.instance_id == instance_id)
    if project_id is not None:
        conds.append(J.project_id == project_id)
    if not conds:
        raise ValueError("history needs a proxy id or an instance id")
    return conds


async def history(
    conn: AsyncConnection,
    *,
    proxy_id: str | None = None,
    instance_id: str | None = None,
    project_id: str | None = None,
    since: datetime | None = None,
) -> list[HistoryEntry]:
    """Every upgrade call, workflow and event of one proxy (``proxy_id``) or of every proxy of one instance
    (``instance_id``), across all runs, oldest first; ``project_id`` narrows either; ``since`` (aware, naive
    read as UTC) drops what happened before it. Run-level events of the runs involved are included, so a
    resume or a stop shows among the calls. Raises ValueError without a proxy or an instance."""
    conds = _job_filter(proxy_id, instance_id, project_id)
    since_utc = _utc(since) if since is not None else None
    jobs_runs = Job.__table__.join(Run.__table__, R.id == J.run_id)
    keyed: list[tuple[tuple[datetime, int, int], HistoryEntry]] = []

    def add(r: Any, row_id: int, kind: str, **values: Any) -> None:
        entry = _entry(r, kind=kind, **values)
        keyed.append(((entry.at, _KIND_RANK[kind], row_id), entry))

    q_calls = (
        select(*_job_cols(), A.id, A.number, A.sent_at, A.answered_at, A.http_status, A.error_code)
        .add_columns(A.error_msg, A.transport, A.outcome, A.rule, A.worker)
        .select_from(jobs_runs.join(Attempt.__table__, A.job_id == J.id))
        .where(*conds)
    )
    if since_utc is not None:
        q_calls = q_calls.where(A.sent_at >= since_utc)
    for r in await conn.execute(q_calls):
        if r.transport:
            detail = r.transport
        elif r.http_status is not None:
            detail = " ".join(x for x in (f"HTTP {r.http_status}", r.error_code) if x)
        else:
            detail = None
        add(
            r,
            r.id,
            "call",
            at=r.sent_at,
            ref=f"#{r.number}",
            state=r.outcome,
            detail=detail,
            reason=r.error_msg,
            rule=r.rule,
            who=r.worker,
            until=r.answered_at,
        )

    q_wf = (
        select(*_job_cols(), W.id, W.workflow_id, W.state, W.job_status, W.source, W.created_at)
        .add_columns(W.ended_at, W.error_message, W.fail_reason)
        .select_from(jobs_runs.join(Workflow.__table__, W.job_id == J.id))
        .where(*conds)
    )
    if since_utc is not None:
        q_wf = q_wf.where(W.created_at >= since_utc)
    for r in await conn.execute(q_wf):
        detail = r.job_status or ""
        if r.source and r.source != "answer":
            detail = f"{detail} ({r.source})".strip()
        add(
            r,
            r.id,
            "workflow",
            at=r.created_at,
            ref=r.workflow_id or "",
            state=r.state,
            detail=detail or None,
            reason=r.error_message or r.fail_reason,
            rule=None,
            who=None,
            until=r.ended_at,
        )

    job_ids = select(J.id).where(*conds)
    run_ids = select(J.run_id).where(*conds)
    q_ev = (
        select(
            E.id,
            E.at,
            E.run_id,
            R.name.label("run_name"),
            E.job_id,
            E.kind,
            E.from_status,
            E.to_status,
            E.rule,
            E.reason,
            E.os_user,
            E.host,
            E.pid,
            J.project_id,
            J.instance_id,
            J.proxy_id,
            J.source_version,
            J.current_version,
            J.target_version,
        )
        .select_from(
            Event.__table__.join(Run.__table__, R.id == E.run_id).outerjoin(Job.__table__, J.id == E.job_id)
        )
        .where(or_(E.job_id.in_(job_ids), (E.job_id.is_(None) & E.run_id.in_(run_ids))))
    )
    if since_utc is not None:
        q_ev = q_ev.where(E.at >= since_utc)
    for r in await conn.execute(q_ev):
        who = "@".join(x for x in (r.os_user, r.host) if x) or None
        if who and r.pid is not None:
            who = f"{who} (pid {r.pid})"
        moved = f"{r.from_status or '?'} -> {r.to_status or '?'}" if r.from_status or r.to_status else None
        add(
            r,
            r.id,
            "event",
            at=r.at,
            ref=r.kind,
            state=r.to_status,
            detail=moved,
            reason=r.reason,
            rule=r.rule,
            who=who,
            until=None,
        )
    keyed.sort(key=lambda k: k[0])
    return [e for _, e in keyed]


def _entry(r: Any, *, kind: str, at: datetime | None, until: datetime | None, **values: Any) -> HistoryEntry:
    has_job = r.job_id is not None and r.proxy_id is not None
    return HistoryEntry(
        at=aware(at) or datetime.min.replace(tzinfo=UTC),
        kind=kind,
        run_id=r.run_id,
        run_name=r.run_name,
        job_id=r.job_id,
        project_id=r.project_id,
        instance_id=r.instance_id,
        proxy_id=r.proxy_id,
        version_before=r.source_version if has_job else None,
        version_after=r.current_version if has_job else None,
        target_version=r.target_version if has_job else None,
        until=aware(until),
        **values,
    )


# ---------------------------------------------------------------------------------------- flagged
@dataclass(frozen=True, slots=True)
class FlaggedProxy:
    """A job that needs an operator: its proxy and its own reason (reasons differ within a rule)."""

    job_id: int
    project_id: str
    instance_id: str
    proxy_id: str
    name: str | None
    reason: str | None
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class FlaggedGroup:
    """The flagged or failed jobs of one rule: ``hint`` is the most common hint of the group (filled with
    the run id), ``other_hints`` how many different hints the group's jobs have besides it."""

    rule: str | None
    status: str
    count: int
    hint: str | None
    other_hints: int
    counts_failure: bool
    proxies: tuple[FlaggedProxy, ...]


async def flagged_by_rule(
    conn: AsyncConnection, run_id: int, *, rule: str | None = None
) -> list[FlaggedGroup]:
    """The jobs of run ``run_id`` in ``flagged`` or ``failed``, grouped by (rule, status), largest group
    first; only rule ``rule`` when given. Each group names every proxy with its own reason."""
    q = (
        select(
            J.id,
            J.project_id,
            J.instance_id,
            J.proxy_id,
            J.name,
            J.status,
            J.reason,
            J.hint,
            J.rule,
            J.counts_failure,
            J.updated_at,
        )
        .where(J.run_id == run_id, J.status.in_(["flagged", "failed"]))
        .order_by(J.id)
    )
    if rule is not None:
        q = q.where(J.rule == rule)
    groups: dict[tuple[str | None, str], list[Any]] = {}
    for r in await conn.execute(q):
        groups.setdefault((r.rule, r.status), []).append(r)
    out = []
    for (g_rule, status), rows in groups.items():
        hints = Counter(fill_hint(r.hint, run_id) for r in rows if r.hint)
        common = hints.most_common(1)
        out.append(
            FlaggedGroup(
                rule=g_rule,
                status=status,
                count=len(rows),
                hint=common[0][0] if common else None,
                other_hints=max(len(hints) - 1, 0),
                counts_failure=any(bool(r.counts_failure) for r in rows),
                proxies=tuple(
                    FlaggedProxy(
                        r.id, r.project_id, r.instance_id, r.proxy_id, r.name, r.reason, aware(r.updated_at)
                    )
                    for r in rows
                ),
            )
        )
    out.sort(key=lambda g: (-g.count, g.status, g.rule or ""))
    return out


# ---------------------------------------------------------------------------------- window report
@dataclass(frozen=True, slots=True)
class Latency:
    """Answer latency of a run's upgrade calls (``answered_at - sent_at``, seconds) over the ``count``
    answered calls: nearest-rank percentiles, None when no call was answered."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None


@dataclass(frozen=True, slots=True)
class WaveProgress:
    """Jobs of one wave by status (``{status: n}``)."""

    wave: int
    counts: Mapping[str, int]

    @property
    def total(self) -> int:
        """All jobs of the wave."""
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """Jobs of the wave in a terminal status (succeeded, skipped, flagged, failed)."""
        return sum(n for s, n in self.counts.items() if s in ("succeeded", "skipped", "flagged", "failed"))


class WorkflowLine(NamedTuple):
    """One workflow id issued in the run, with its proxy (times UTC)."""

    proxy_id: str
    instance_id: str
    workflow_id: str
    state: str
    status: str | None
    source: str
    created: datetime | None
    ended: datetime | None


@dataclass(frozen=True, slots=True)
class EventLine:
    """An operator or run-level event (every kind but a plain job move), with who caused it (UTC)."""

    at: datetime
    kind: str
    proxy_id: str | None
    from_status: str | None
    to_status: str | None
    reason: str | None
    os_user: str | None
    host: str | None


@dataclass(frozen=True, slots=True)
class WindowReport:
    """What the HTML window report shows for one run.

    ``calls_per_second``: ``(epoch second, upgrade calls sent in it)`` for each second with a call, in
    order (by ``attempts.sent_at``). ``rate_limit_per_s``: the run's ``rate`` option as calls per second
    (None if absent or unreadable). ``counts``: jobs by status. ``waves``: per-wave progress, by wave.
    ``flagged``: as :func:`flagged_by_rule`. ``workflows``: every workflow id of the run (REJECT items,
    which have none, are left out), in the order they were recorded. ``events``: operator and run events."""

    run: RunInfo
    counts: Mapping[str, int]
    calls: int
    calls_per_second: Sequence[tuple[int, int]]
    rate_limit_per_s: float | None
    concurrency: int | None
    latency: Latency
    waves: Sequence[WaveProgress]
    flagged: Sequence[FlaggedGroup]
    workflows: Sequence[WorkflowLine]
    events: Sequence[EventLine]
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ascending values; None when empty."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q / 100 * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rate_per_second(options: Mapping[str, Any]) -> float | None:
    """The run's ``rate`` option (``10/s``, ``300/min``, ...) as calls per second, None if unreadable."""
    text = options.get("rate")
    if not isinstance(text, str):
        return None
    from orchestrator.limiter import parse_rate  # the one parser of rate strings

    try:
        rate = parse_rate(text)
    except ValueError:
        return None
    return rate.count / rate.period


async def window_report(conn: AsyncConnection, run_id: int, *, batch: int = STREAM_BATCH) -> WindowReport:
    """Gather the HTML window report of run ``run_id``. Calls are read as a stream of (sent, answered)
    pairs and folded into per-second counts and a latency list (8 bytes a call). Raises LookupError when
    the run does not exist."""
    run = await get_run(conn, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    counts = await status_counts(conn, run_id)

    sqlite = conn.dialect.name == "sqlite"
    if not sqlite:
        await _no_jit(conn)
    ts = _time_reader(sqlite)
    per_second: Counter[int] = Counter()
    latencies: list[float] = []
    calls = 0
    stream = await conn.stream(
        select(_time_col(A.sent_at, sqlite), _time_col(A.answered_at, sqlite), A.outcome)
        .select_from(Attempt.__table__.join(Job.__table__, J.id == A.job_id))
        .where(J.run_id == run_id)
        .execution_options(yield_per=batch)
    )
    async for part in stream.partitions(batch):
        for sent, answered, outcome in part:
            sent_utc = ts(sent)
            if sent_utc is None:
                continue
            calls += 1
            per_second[math.floor(sent_utc.timestamp())] += 1
            answered_utc = ts(answered)
            if answered_utc is not None and outcome != "in_flight":
                latencies.append(max((answered_utc - sent_utc).total_seconds(), 0.0))
    latencies.sort()
    latency = Latency(
        count=len(latencies),
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        max=latencies[-1] if latencies else None,
        mean=sum(latencies) / len(latencies) if latencies else None,
    )

    waves: dict[int, dict[str, int]] = {}
    for wave, status, n in await conn.execute(
        select(J.wave, J.status, func.count()).where(J.run_id == run_id).group_by(J.wave, J.status)
    ):
        waves.setdefault(int(wave), {})[status] = int(n)

    workflows: list[WorkflowLine] = []
    wf_stream = await conn.stream(
        select(J.proxy_id, J.instance_id, W.workflow_id, W.state, W.job_status, W.source)
        .add_columns(_time_col(W.created_at, sqlite), _time_col(W.ended_at, sqlite))
        .select_from(Workflow.__table__.join(Job.__table__, J.id == W.job_id))
        .where(J.run_id == run_id, W.workflow_id.is_not(None))
        .order_by(W.id)
        .execution_options(yield_per=batch)
    )
    async for part in wf_stream.partitions(batch):
        workflows.extend(WorkflowLine(r[0], r[1], r[2], r[3], r[4], r[5], ts(r[6]), ts(r[7])) for r in part)
    events = [
        EventLine(
            aware(r.at) or run.created_at,
            r.kind,
            r.proxy_id,
            r.from_status,
            r.to_status,
            r.reason,
            r.os_user,
            r.host,
        )
        for r in await conn.execute(
            select(E.at, E.kind, J.proxy_id, E.from_status, E.to_status, E.reason, E.os_user, E.host)
            .select_from(Event.__table__.outerjoin(Job.__table__, J.id == E.job_id))
            .where(E.run_id == run_id, E.kind != "move")
            .order_by(E.at, E.id)
        )
    ]
    concurrency = run.options.get("concurrency")
    return WindowReport(
        run=run,
        counts=counts,
        calls=calls,
        calls_per_second=sorted(per_second.items()),
        rate_limit_per_s=rate_per_second(run.options),
        concurrency=concurrency if isinstance(concurrency, int) else None,
        latency=latency,
        waves=[WaveProgress(w, c) for w, c in sorted(waves.items())],
        flagged=await flagged_by_rule(conn, run_id),
        workflows=workflows,
        events=events,
    )


async def run_sql(conn: AsyncConnection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only audit query (a SELECT on the views, e.g. from docs/audit.md): (columns, rows)."""
    from sqlalchemy import text

    if not sql.lstrip().lower().startswith(("select", "with")):
        raise ValueError("only SELECT queries are run here")
    res = await conn.execute(text(sql))
    return list(res.keys()), [tuple(r) for r in res.all()]
