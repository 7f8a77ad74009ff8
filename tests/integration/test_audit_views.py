"""Issue 15.2: every SQL query of docs/audit.md runs unchanged on SQLite and PostgreSQL against a job table
with a known story (tests/report_data.py) and returns exactly the rows the story implies."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from orchestrator.store import db
from tests import report_data as d

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"
MARKED = re.compile(r"<!-- audit-query: ([a-z0-9-]+) -->\n```sql\n(.*?)```", re.S)
VIEWS = {"v_jobs", "v_workflows", "v_attempts", "v_flagged", "v_run_timings", "v_events"}
_TS = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def ts(day: int, hms: str) -> str:
    """The normalised form of a time in the answers: UTC, millisecond precision."""
    return str(norm(d.t(day, hms)))


def norm(v: Any) -> Any:
    """One spelling for both backends: times as UTC 'YYYY-MM-DD HH:MM:SS.fff' (PostgreSQL gives aware
    datetimes, SQLite the stored text), numbers rounded to 1 ms, booleans as 0/1."""
    if isinstance(v, str) and _TS.match(v):
        v = datetime.fromisoformat(v)
    if isinstance(v, datetime):
        v = (v if v.tzinfo else v.replace(tzinfo=UTC)).astimezone(UTC)
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float | Decimal):
        return round(float(v), 3)
    return v


EXPECTED: dict[str, list[tuple[Any, ...]]] = {
    "changed-in-window": [(1, d.P1, d.SRC, d.TGT, ts(1, "00:01:01"), ts(1, "00:11:00"))],
    "rejects": [
        (1, d.P2, 1, ts(1, "00:01:01.100"), d.REJECT_MSG),
        (2, d.P2, 1, ts(2, "01:05:01.200"), "instance is busy"),
    ],
    "workflows-of-proxy": [
        (1, d.RUN1_NAME, d.W1, "answer", "Completed", ts(1, "00:01:01"), ts(1, "00:11:00")),
        (2, d.RUN2_NAME, d.W4, "reconciled", "Running", ts(2, "01:06:00"), None),
    ],
    "upgrade-durations": [
        (d.P2, 2, ts(1, "00:01:00.600"), ts(1, "08:01:02.500"), ts(1, "08:20:00"), 29939.4),
        (d.P1, 1, ts(1, "00:01:00.250"), ts(1, "00:01:01"), ts(1, "00:11:00"), 599.75),
    ],
    "workflow-durations": [
        (1, d.P2, d.W3, ts(1, "08:01:02.500"), ts(1, "08:20:00"), 1137.5),
        (1, d.P1, d.W1, ts(1, "00:01:01"), ts(1, "00:11:00"), 599.0),
    ],
    "stopped-runs": [
        (2, d.RUN2_NAME, "stopped", d.SIGTERM, ts(2, "01:00:02"), ts(2, "01:05:01")),
        (3, d.RUN3_NAME, "halted", d.BREAKER, ts(3, "02:00:01"), ts(3, "02:00:10")),
    ],
    "operator-actions": [
        (ts(1, "00:00:05"), 1, "run", None, "created", "running", "ops", "jump-1", "run started"),
        (ts(1, "06:00:00"), 1, "run", None, "running", "paused", "ops", "jump-1", "window closed"),
        (ts(1, "08:00:00"), 1, "retry", d.P2, "flagged", "pending", "alice", "jump-1", None),
        (ts(1, "08:00:30"), 1, "resume", None, "paused", "running", "alice", "jump-1", None),
        (ts(1, "09:00:00"), 1, "run", None, "running", "finished", "ops", "jump-1", None),
        (ts(2, "01:00:02"), 2, "run", None, "created", "running", "bob", "jump-2", None),
        (ts(2, "01:30:00"), 2, "run", None, "running", "stopped", "bob", "jump-2", d.SIGTERM),
        (ts(3, "02:00:01"), 3, "run", None, "created", "running", "carol", "jump-3", None),
        (
            ts(3, "02:00:11"),
            3,
            "run",
            None,
            "running",
            "halted",
            "carol",
            "jump-3",
            d.BREAKER,
        ),
    ],
    "requeued": [(ts(1, "08:00:00"), "alice", "jump-1", 4242, 1, d.P2, "flagged", "pending", "reject-busy")],
    "flagged-twice": [(d.P2, 2, ts(1, "00:01:01.100"), ts(2, "01:05:01.200"))],
    "calls-per-run": [
        (1, d.RUN1_NAME, 6, ts(1, "00:01:00.250"), ts(1, "08:01:00"), 28799.75),
        (2, d.RUN2_NAME, 2, ts(2, "01:05:00"), ts(2, "01:05:01"), 1.0),
        (3, d.RUN3_NAME, 1, ts(3, "02:00:10"), ts(3, "02:00:10"), 0.0),
    ],
    "calls-of-proxy": [
        (1, 1, ts(1, "00:02:00"), 0.2, 500, "DBS.200001", None, "retry", "http-5xx"),
        (1, 2, ts(1, "00:02:10"), 0.2, 500, "DBS.200001", None, "retry", "http-5xx"),
        (1, 3, ts(1, "00:02:30"), 0.2, 500, "DBS.200001", None, "fail", "http-5xx"),
    ],
    "slow-calls": [
        (2, d.P1, 1, ts(2, "01:05:00"), 30.0, "timeout", "reconcile"),
        (1, d.P2, 2, ts(1, "08:01:00"), 2.0, None, "accepted"),
    ],
    "reconciled": [(2, d.P1, d.W4, ts(2, "01:06:00"), "Running")],
    "needs-operator": [
        (1, "http-5xx", "failed", 1, d.HINT_5XX.replace("{run}", "1")),
        (2, "reject-busy", "flagged", 1, d.HINT_BUSY.replace("{run}", "2")),
        (3, "forbidden", "failed", 1, d.HINT_403.replace("{run}", "3")),
    ],
    "breaker-failures": [
        (1, d.P3, "failed", "http-5xx", "HTTP 500 DBS.200001 after 3 calls"),
        (3, d.P4, "failed", "forbidden", "HTTP 403 DBS.280001: not authorized"),
    ],
    "run-outcomes": [
        (1, d.RUN1_NAME, "finished", 32395.0, 4, 2, 1, 0, 0, 0, 1),
        (2, d.RUN2_NAME, "stopped", None, 3, 0, 0, 1, 1, 1, 0),
        (3, d.RUN3_NAME, "halted", None, 1, 0, 0, 0, 0, 0, 1),
    ],
    "proxy-events": [
        (ts(1, "00:01:01.100"), 1, "move", "in_flight", "flagged", "reject-busy", "ops"),
        (ts(1, "08:00:00"), 1, "retry", "flagged", "pending", "reject-busy", "alice"),
        (ts(1, "08:01:02.500"), 1, "move", "in_flight", "accepted", "accept", "ops"),
        (ts(1, "08:20:10"), 1, "move", "accepted", "succeeded", None, "ops"),
        (ts(2, "01:05:01.200"), 2, "move", "in_flight", "flagged", "reject-busy", "bob"),
    ],
}


def doc_queries() -> dict[str, str]:
    body = DOC.read_text(encoding="utf-8")
    found = MARKED.findall(body)
    names = [n for n, _ in found]
    assert len(names) == len(set(names)), f"duplicate query names in {DOC.name}"
    assert body.count("```sql") == len(found), "every ```sql block of audit.md needs an audit-query marker"
    return dict(found)


def test_every_query_of_the_doc_has_an_answer_here() -> None:
    queries = doc_queries()
    assert len(queries) >= 10
    assert set(queries) == set(EXPECTED), set(queries) ^ set(EXPECTED)


async def _answers(url: str, queries: dict[str, str]) -> tuple[set[str], dict[str, list[tuple[Any, ...]]]]:
    engine = db.create_engine(db.normalize_url(url))
    try:
        await db.upgrade(engine)
        async with engine.begin() as conn:
            await d.populate(conn)
        answers: dict[str, list[tuple[Any, ...]]] = {}
        async with engine.connect() as conn:
            views = set(await conn.run_sync(lambda c: inspect(c).get_view_names()))
            for name, sql in queries.items():
                rows = (await conn.execute(text(sql))).all()
                answers[name] = [tuple(norm(v) for v in row) for row in rows]
        return views, answers
    finally:
        await engine.dispose()


def test_every_audit_query_answers_as_the_story_says(db_url: str) -> None:
    queries = doc_queries()
    views, answers = asyncio.run(_answers(db_url, queries))
    assert views >= VIEWS
    wrong = {name: (answers[name], EXPECTED[name]) for name in queries if answers[name] != EXPECTED[name]}
    assert not wrong, "\n".join(f"{n}:\n  got  {g}\n  want {w}" for n, (g, w) in wrong.items())


@pytest.mark.empty_db  # migrates an empty database itself
def test_downgrade_drops_the_views_and_upgrade_brings_them_back(db_url: str) -> None:
    async def go() -> tuple[set[str], set[str]]:
        engine = db.create_engine(db.normalize_url(url))
        try:
            await db.upgrade(engine)
            await db.downgrade(engine, "0005")
            async with engine.connect() as conn:
                down = set(await conn.run_sync(lambda c: inspect(c).get_view_names()))
            await db.upgrade(engine)
            async with engine.connect() as conn:
                up = set(await conn.run_sync(lambda c: inspect(c).get_view_names()))
            return down, up
        finally:
            await engine.dispose()

    url = db_url
    down, up = asyncio.run(go())
    assert not down & VIEWS
    assert up >= VIEWS


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_each_view_is_documented(name: str) -> None:
    assert f"`{name}`" in DOC.read_text(encoding="utf-8")


async def _program_vs_views(url: str) -> dict[str, Any]:
    from orchestrator.store import reports

    engine = db.create_engine(db.normalize_url(url))
    try:
        await db.upgrade(engine)
        async with engine.begin() as conn:
            await d.populate(conn)
        seen: dict[str, Any] = {}
        async with engine.connect() as conn:
            view = (
                await conn.execute(
                    text(
                        "SELECT run_id, proxy_id, first_sent_at, accepted_at, workflow_ended_at, "
                        "duration_s, hint FROM v_jobs ORDER BY job_id"
                    )
                )
            ).all()
            seen["view"] = [tuple(norm(v) for v in r) for r in view]
        async with d.Readable(db.normalize_url(url)).connect() as conn:
            rows = []
            for run_id in (1, 2, 3):
                async for r in reports.report_rows(conn, run_id, batch=2):
                    rows.append(
                        tuple(
                            norm(v)
                            for v in (
                                r.run_id,
                                r.proxy_id,
                                r.first_sent,
                                r.accepted,
                                r.workflow_ended,
                                r.duration_s,
                                r.hint,
                            )
                        )
                    )
            seen["program"] = rows
            seen["history"] = [
                (e.kind, e.run_id, e.ref, e.state) for e in await reports.history(conn, proxy_id=d.P2)
            ]
            seen["runs"] = [
                (s.run.id, dict(s.counts)) for s in await reports.list_runs(conn, statuses=["halted"])
            ]
            seen["flagged"] = [(g.rule, g.count, g.hint) for g in await reports.flagged_by_rule(conn, 2)]
            gen = reports.report_rows(conn, 1, batch=1)
            await anext(gen)
            await gen.aclose()  # a reader that stops early leaves the connection usable
            seen["after_early_stop"] = await reports.status_counts(conn, 3)
            w = await reports.window_report(conn, 1)
            seen["window"] = (
                w.calls,
                w.latency.count,
                round(w.latency.p50 or 0, 3),
                [x.workflow_id for x in w.workflows],
            )
        return seen
    finally:
        await engine.dispose()


def test_the_programs_reports_agree_with_the_views(db_url: str) -> None:
    """report/history/runs/flagged (orchestrator/store/reports.py) on both backends: the same first call,
    acceptance, workflow end, duration and filled hint as v_jobs, and the story's history."""
    seen = asyncio.run(_program_vs_views(db_url))
    assert seen["program"] == seen["view"]
    assert seen["history"][:4] == [
        ("event", 1, "run", "running"),
        ("call", 1, "#1", "flag"),
        ("workflow", 1, "", "REJECT"),
        ("event", 1, "move", "flagged"),
    ]
    assert ("event", 1, "move", "succeeded") in seen["history"] and seen["history"][-2] == (
        "event",
        2,
        "move",
        "flagged",
    )
    assert seen["runs"] == [(3, {"failed": 1})]
    assert seen["flagged"] == [("reject-busy", 1, d.HINT_BUSY.replace("{run}", "2"))]
    assert seen["window"] == (6, 6, 0.2, [d.W1, d.W3])
    assert seen["after_early_stop"] == {"failed": 1}
