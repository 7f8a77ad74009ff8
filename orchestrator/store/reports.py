"""Read queries behind ``report``, ``history``, ``runs``, ``flagged`` and the HTML window report.

SQL text on a :class:`~orchestrator.store.reader.Reader` (one read transaction, the drivers the writer uses;
a 100,000-job report streams in bounded memory), never a write. The definitions match the audit views of
migration 0006 (``docs/audit.md``):

- *first sent*: the earliest ``attempts.sent_at`` of a job;
- *accepted*: the earliest ``created_at`` of its ``ACCEPT`` workflows;
- *workflow ended*: the latest ``ended_at`` of its ``ACCEPT`` workflows once every one of them has ended
  (None while one is open);
- *duration*: workflow ended minus first sent, in seconds (retries and operator pauses included).

Every time returned is timezone-aware UTC (SQLite stores UTC as text without an offset; the reader parses
it). Hints are returned with their ``{run}`` placeholder filled with the run's id.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from orchestrator import states
from orchestrator.store.reader import Reader
from orchestrator.store.sql import from_json, in_clause

#: rows fetched per round trip when streaming (bounded memory, few round trips on PostgreSQL)
STREAM_BATCH = 2000

STATUS_ORDER = states.STATUS_ORDER  # re-exported: the renderers import it from here


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


def _report_query(statuses: Sequence[str] | None, *, id_range: bool) -> tuple[str, dict[str, Any]]:
    """The report's one query: jobs outer-joined to their workflows, the first call time as a subquery,
    in job then workflow order; the columns at the positions ``_job_row`` reads. ``id_range``: SQLite
    walks the table in id order over the run's ids (``:lo``/``:hi``); ``run_id + 0`` keeps its planner
    off the run_id indexes, whose order would need a sort of every row of the report first."""
    where = "j.id BETWEEN :lo AND :hi AND j.run_id + 0 = :run" if id_range else "j.run_id = :run"
    params: dict[str, Any] = {}
    if statuses:
        clause, params = in_clause("st", statuses)
        where += f" AND j.status IN {clause}"
    sql = (
        "SELECT j.id, j.project_id, j.instance_id, j.proxy_id, j.name, j.wave, j.status, j.attempt_count, "
        "j.source_version, j.target_version, j.current_version, j.reason, j.hint, j.rule, "
        "(SELECT min(a.sent_at) FROM attempts a WHERE a.job_id = j.id) AS first_sent, "
        "w.workflow_id, w.state, w.job_status, w.created_at, w.ended_at "
        f"FROM jobs j LEFT OUTER JOIN workflows w ON w.job_id = j.id WHERE {where} ORDER BY j.id, w.id"
    )
    return sql, params


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


async def report_parts(
    conn: Reader,
    run_id: int,
    *,
    statuses: Sequence[str] | None = None,
    batch: int = STREAM_BATCH,
) -> AsyncGenerator[list[ReportRow], None]:
    """Every job of run ``run_id`` (only ``statuses`` when given), in inventory order (job id), streamed
    in parts of about ``batch`` database rows: one query (jobs outer-joined to their workflows, first call
    time as a subquery), so memory stays flat whatever the size of the run (about 50 MB peak RSS for a
    100,000-job report, most of it the interpreter and its libraries). A job's rows are never split across
    parts. Parts, not single rows, because a 100,000-job report paid a fifth of its time stepping an
    async generator once per row."""
    sqlite = conn.dialect == "sqlite"
    sql, params = _report_query(statuses, id_range=sqlite)
    params["run"] = run_id
    if sqlite:
        span = await conn.fetchone("SELECT min(id), max(id) FROM jobs WHERE run_id = :run", {"run": run_id})
        if span is None or span[0] is None:
            return
        params["lo"], params["hi"] = int(span[0]), int(span[1])
    ts = conn.time
    pending: list[Any] = []
    current = None
    # closed here, not left to the collector, when our own consumer stops early: the reader's next query
    # must not meet a fetch still under way
    async with contextlib.aclosing(conn.stream(sql, params, batch=batch)) as stream:
        async for part in stream:
            out: list[ReportRow] = []
            for r in part:
                if r[0] != current:
                    if pending:
                        out.append(_job_row(run_id, pending, ts))
                    pending = []
                    current = r[0]
                pending.append(r)
            if out:
                yield out
    if pending:
        yield [_job_row(run_id, pending, ts)]


async def report_rows(
    conn: Reader,
    run_id: int,
    *,
    statuses: Sequence[str] | None = None,
    batch: int = STREAM_BATCH,
) -> AsyncGenerator[ReportRow, None]:
    """The rows of :func:`report_parts` one at a time (the table renderer's and the tests' form)."""
    async with contextlib.aclosing(report_parts(conn, run_id, statuses=statuses, batch=batch)) as parts:
        async for part in parts:
            for row in part:
                yield row


async def status_counts(conn: Reader, run_id: int) -> dict[str, int]:
    """Jobs of a run by status: ``{status: count}`` (statuses without jobs are absent)."""
    rows = await conn.fetch(
        "SELECT status, count(*) FROM jobs WHERE run_id = :run GROUP BY status", {"run": run_id}
    )
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


_RUN_COLS = (
    "id, name, status, created_at, started_at, finished_at, stop_reason, options, inventory_path, "
    "wave_open, failures_acked"
)


def _run_info(r: Sequence[Any], ts: Callable[[Any], datetime | None]) -> RunInfo:
    """A ``runs`` row selected as ``_RUN_COLS``."""
    return RunInfo(
        id=int(r[0]),
        name=r[1],
        status=r[2],
        created_at=ts(r[3]) or datetime.min.replace(tzinfo=UTC),
        started_at=ts(r[4]),
        finished_at=ts(r[5]),
        stop_reason=r[6],
        options=dict(from_json(r[7]) or {}),
        inventory_path=r[8],
        wave_open=int(r[9]),
        failures_acked=int(r[10]),
    )


async def get_run(conn: Reader, run_id: int) -> RunInfo | None:
    """One run by id, or None."""
    row = await conn.fetchone(f"SELECT {_RUN_COLS} FROM runs WHERE id = :id", {"id": run_id})
    return _run_info(row, conn.time) if row is not None else None


async def list_runs(
    conn: Reader,
    *,
    since: datetime | None = None,
    statuses: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[RunSummary]:
    """Runs newest first: created at or after ``since`` (aware; naive is read as UTC), with a status in
    ``statuses`` when given, at most ``limit``; each with its jobs counted by status (one grouped query)."""
    conds: list[str] = []
    params: dict[str, Any] = {}
    if since is not None:
        conds.append("created_at >= :since")
        params["since"] = _utc(since)
    wanted = list(statuses or [])
    if wanted:
        clause, more = in_clause("st", wanted)
        conds.append(f"status IN {clause}")
        params.update(more)
    picked = (" WHERE " + " AND ".join(conds) if conds else "") + " ORDER BY id DESC"
    if limit is not None:
        picked += " LIMIT :limit"
        params["limit"] = int(limit)
    runs = [
        _run_info(r, conn.time) for r in await conn.fetch(f"SELECT {_RUN_COLS} FROM runs{picked}", params)
    ]
    if not runs:
        return []
    counts: dict[int, dict[str, int]] = {r.id: {} for r in runs}
    # the same runs again as a subquery (one read transaction: the same rows), not thousands of ids
    rows = await conn.fetch(
        f"SELECT run_id, status, count(*) FROM jobs WHERE run_id IN (SELECT id FROM runs{picked}) "
        "GROUP BY run_id, status",
        params,
    )
    for run_id, status, n in rows:
        counts[int(run_id)][status] = int(n)
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


_JOB_COLS = (
    "j.run_id, r.name AS run_name, j.id AS job_id, j.project_id, j.instance_id, j.proxy_id, "
    "j.source_version, j.current_version, j.target_version"
)


def _job_filter(
    proxy_id: str | None, instance_id: str | None, project_id: str | None
) -> tuple[str, dict[str, Any]]:
    """The WHERE condition on ``jobs j`` picking the proxy, instance and/or project, with parameters.
    Raises ValueError when none is given."""
    conds: list[str] = []
    params: dict[str, Any] = {}
    for column, value in (("proxy_id", proxy_id), ("instance_id", instance_id), ("project_id", project_id)):
        if value is not None:
            conds.append(f"j.{column} = :{column}")
            params[column] = value
    if not conds:
        raise ValueError("history needs a proxy id or an instance id")
    return " AND ".join(conds), params


async def _named(conn: Reader, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a query as ``{column: value}`` (history reads a few hundred rows; names keep it clear)."""
    names, rows = await conn.query(sql, params)
    return [dict(zip(names, r, strict=True)) for r in rows]


async def history(
    conn: Reader,
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
    cond, params = _job_filter(proxy_id, instance_id, project_id)
    if since is not None:
        params["since"] = _utc(since)
    ts = conn.time
    keyed: list[tuple[tuple[datetime, int, int], HistoryEntry]] = []

    def add(r: Mapping[str, Any], row_id: int, kind: str, **values: Any) -> None:
        entry = _entry(r, ts, kind=kind, **values)
        keyed.append(((entry.at, _KIND_RANK[kind], row_id), entry))

    def per_job(columns: str, join: str, at: str) -> str:
        # the picked jobs with their run's name and one row per attempt or workflow, since ``since``
        return (
            f"SELECT {_JOB_COLS}, {columns} FROM jobs j JOIN runs r ON r.id = j.run_id {join} WHERE {cond}"
            + (f" AND {at} >= :since" if since is not None else "")
        )

    calls = await _named(
        conn,
        per_job(
            "a.id, a.number, a.sent_at, a.answered_at, a.http_status, a.error_code, a.error_msg, "
            "a.transport, a.outcome, a.rule, a.worker",
            "JOIN attempts a ON a.job_id = j.id",
            "a.sent_at",
        ),
        params,
    )
    for r in calls:
        if r["transport"]:
            detail = r["transport"]
        elif r["http_status"] is not None:
            detail = " ".join(x for x in (f"HTTP {r['http_status']}", r["error_code"]) if x)
        else:
            detail = None
        add(
            r,
            r["id"],
            "call",
            at=r["sent_at"],
            ref=f"#{r['number']}",
            state=r["outcome"],
            detail=detail,
            reason=r["error_msg"],
            rule=r["rule"],
            who=r["worker"],
            until=r["answered_at"],
        )

    workflows = await _named(
        conn,
        per_job(
            "w.id, w.workflow_id, w.state, w.job_status, w.source, w.created_at, w.ended_at, "
            "w.error_message, w.fail_reason",
            "JOIN workflows w ON w.job_id = j.id",
            "w.created_at",
        ),
        params,
    )
    for r in workflows:
        detail = r["job_status"] or ""
        if r["source"] and r["source"] != "answer":
            detail = f"{detail} ({r['source']})".strip()
        add(
            r,
            r["id"],
            "workflow",
            at=r["created_at"],
            ref=r["workflow_id"] or "",
            state=r["state"],
            detail=detail or None,
            reason=r["error_message"] or r["fail_reason"],
            rule=None,
            who=None,
            until=r["ended_at"],
        )

    events = await _named(
        conn,
        "SELECT e.id, e.at, e.run_id, r.name AS run_name, e.job_id, e.kind, e.from_status, e.to_status, "
        "e.rule, e.reason, e.os_user, e.host, e.pid, j.project_id, j.instance_id, j.proxy_id, "
        "j.source_version, j.current_version, j.target_version "
        "FROM events e JOIN runs r ON r.id = e.run_id LEFT OUTER JOIN jobs j ON j.id = e.job_id "
        f"WHERE (e.job_id IN (SELECT j.id FROM jobs j WHERE {cond}) "
        f"OR (e.job_id IS NULL AND e.run_id IN (SELECT j.run_id FROM jobs j WHERE {cond})))"
        + (" AND e.at >= :since" if since is not None else ""),
        params,
    )
    for r in events:
        who = "@".join(x for x in (r["os_user"], r["host"]) if x) or None
        if who and r["pid"] is not None:
            who = f"{who} (pid {r['pid']})"
        moved = (
            f"{r['from_status'] or '?'} -> {r['to_status'] or '?'}"
            if r["from_status"] or r["to_status"]
            else None
        )
        add(
            r,
            r["id"],
            "event",
            at=r["at"],
            ref=r["kind"],
            state=r["to_status"],
            detail=moved,
            reason=r["reason"],
            rule=r["rule"],
            who=who,
            until=None,
        )
    keyed.sort(key=lambda k: k[0])
    return [e for _, e in keyed]


def _entry(
    r: Mapping[str, Any],
    ts: Callable[[Any], datetime | None],
    *,
    kind: str,
    at: Any,
    until: Any,
    **values: Any,
) -> HistoryEntry:
    has_job = r["job_id"] is not None and r["proxy_id"] is not None
    return HistoryEntry(
        at=ts(at) or datetime.min.replace(tzinfo=UTC),
        kind=kind,
        run_id=r["run_id"],
        run_name=r["run_name"],
        job_id=r["job_id"],
        project_id=r["project_id"],
        instance_id=r["instance_id"],
        proxy_id=r["proxy_id"],
        version_before=r["source_version"] if has_job else None,
        version_after=r["current_version"] if has_job else None,
        target_version=r["target_version"] if has_job else None,
        until=ts(until),
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


async def flagged_by_rule(conn: Reader, run_id: int, *, rule: str | None = None) -> list[FlaggedGroup]:
    """The jobs of run ``run_id`` in ``flagged`` or ``failed``, grouped by (rule, status), largest group
    first; only rule ``rule`` when given. Each group names every proxy with its own reason."""
    sql = (
        "SELECT id, project_id, instance_id, proxy_id, name, status, reason, hint, rule, counts_failure, "
        "updated_at FROM jobs WHERE run_id = :run AND status IN ('flagged', 'failed')"
    )
    params: dict[str, Any] = {"run": run_id}
    if rule is not None:
        sql += " AND rule = :rule"
        params["rule"] = rule
    groups: dict[tuple[str | None, str], list[Sequence[Any]]] = {}
    for r in await conn.fetch(sql + " ORDER BY id", params):
        groups.setdefault((r[8], r[5]), []).append(r)
    out = []
    for (g_rule, status), rows in groups.items():
        hints = Counter(fill_hint(r[7], run_id) for r in rows if r[7])
        common = hints.most_common(1)
        out.append(
            FlaggedGroup(
                rule=g_rule,
                status=status,
                count=len(rows),
                hint=common[0][0] if common else None,
                other_hints=max(len(hints) - 1, 0),
                counts_failure=any(bool(r[9]) for r in rows),
                proxies=tuple(
                    FlaggedProxy(int(r[0]), r[1], r[2], r[3], r[4], r[6], conn.time(r[10])) for r in rows
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


async def window_report(conn: Reader, run_id: int, *, batch: int = STREAM_BATCH) -> WindowReport:
    """Gather the HTML window report of run ``run_id``. Calls are read as a stream of (sent, answered)
    pairs and folded into per-second counts and a latency list (8 bytes a call). Raises LookupError when
    the run does not exist."""
    run = await get_run(conn, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    counts = await status_counts(conn, run_id)
    params = {"run": run_id}
    ts = conn.time
    per_second: Counter[int] = Counter()
    latencies: list[float] = []
    calls = 0
    async for part in conn.stream(
        "SELECT a.sent_at, a.answered_at, a.outcome FROM attempts a JOIN jobs j ON j.id = a.job_id "
        "WHERE j.run_id = :run",
        params,
        batch=batch,
    ):
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
    for wave, status, n in await conn.fetch(
        "SELECT wave, status, count(*) FROM jobs WHERE run_id = :run GROUP BY wave, status", params
    ):
        waves.setdefault(int(wave), {})[status] = int(n)

    workflows: list[WorkflowLine] = []
    async for part in conn.stream(
        "SELECT j.proxy_id, j.instance_id, w.workflow_id, w.state, w.job_status, w.source, w.created_at, "
        "w.ended_at FROM workflows w JOIN jobs j ON j.id = w.job_id "
        "WHERE j.run_id = :run AND w.workflow_id IS NOT NULL ORDER BY w.id",
        params,
        batch=batch,
    ):
        workflows.extend(WorkflowLine(r[0], r[1], r[2], r[3], r[4], r[5], ts(r[6]), ts(r[7])) for r in part)
    events = [
        EventLine(ts(r[0]) or run.created_at, r[1], r[2], r[3], r[4], r[5], r[6], r[7])
        for r in await conn.fetch(
            "SELECT e.at, e.kind, j.proxy_id, e.from_status, e.to_status, e.reason, e.os_user, e.host "
            "FROM events e LEFT OUTER JOIN jobs j ON j.id = e.job_id "
            "WHERE e.run_id = :run AND e.kind != 'move' ORDER BY e.at, e.id",
            params,
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


async def run_sql(conn: Reader, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only audit query (a SELECT on the views, e.g. from docs/audit.md): (columns, rows).
    Raises ValueError for anything but a SELECT (or WITH) query."""
    if not sql.lstrip().lower().startswith(("select", "with")):
        raise ValueError("only SELECT queries are run here")
    return await conn.query(sql)
