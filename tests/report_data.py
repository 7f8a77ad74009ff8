"""A small job table with a known story, written through SQLAlchemy Core inserts, for the audit views, the
report queries and the HTML report. Every expected answer in the tests is derived from this story:

run 1 "nightly-2026-03-01" (finished; window 00:00-06:00 UTC, 2 waves, rate 2/s)
  P1 (wave 1) succeeded: call 00:01:00.250, ACCEPT W1 00:01:01, Completed 00:11:00
  P2 (wave 1) REJECT "[/bold] instance is busy: =1+1" at 00:01:01.100 -> flagged; alice re-queued it at
     08:00 (retry event), resumed 08:00:30; call #2 08:01:00 ACCEPT W3 08:01:02.5, Completed 08:20:00
  P3 (wave 2) three HTTP 500 calls (00:02:00, 00:02:10, 00:02:30) -> failed (rule http-5xx, counted)
  P4 (wave 2) skipped: already at the target
run 2 "[/x] canary 2026-03-02" (stopped by SIGTERM; target 2.23.19.000)
  P1 call timed out (answered 30 s later); reconciliation found W4 (Running) -> accepted
  P2 REJECT "instance is busy" -> flagged (its second flag)
  P3 pending (never called)
run 3 "wave-canary-2026-03-03" (halted by the breaker)
  P4 HTTP 403 -> failed (rule forbidden, counted)

Names carry markup (``[/bold]``, ``[/x]``) and a spreadsheet formula (``=HYPERLINK(...)``): renderers must
print them literally and escape the formula in CSV.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.store.models import Attempt, Event, Job, Run, Workflow
from orchestrator.store.reader import Reader, open_reader

PROJECT = "5f0bd6a3c9a34d1e8b2f6a7c0d1e2f30"
I1 = "0f46fc46396e4fb19a0cb52f578e9511in07"
I2 = "7a1c2b3d4e5f40718293a4b5c6d7e8f9in07"
P1 = "0f46fc46396e4fb19a0cb52f578e9511po01"
P2 = "0f46fc46396e4fb19a0cb52f578e9511po02"
P3 = "7a1c2b3d4e5f40718293a4b5c6d7e8f9po01"
P4 = "7a1c2b3d4e5f40718293a4b5c6d7e8f9po02"
NAMES = {P1: "orders-proxy-1", P2: "[/bold]orders-proxy-2", P3: '=HYPERLINK("http://x")', P4: "billing-2"}
INSTANCE = {P1: I1, P2: I1, P3: I2, P4: I2}
SRC, TGT, TGT2 = "2.23.07.000", "2.23.18.000", "2.23.19.000"
W1 = "a1b2c3d4-0000-4000-8000-000000000001"
W3 = "a1b2c3d4-0000-4000-8000-000000000003"
W4 = "a1b2c3d4-0000-4000-8000-000000000004"
RUN1_NAME, RUN2_NAME, RUN3_NAME = "nightly-2026-03-01", "[/x] canary 2026-03-02", "wave-canary-2026-03-03"
REJECT_MSG = "[/bold] instance is busy: =1+1"
HINT_5XX = "check the instance in the console, then: orchestrator retry {run} --rule http-5xx"
HINT_BUSY = "wait for the instance's task to end, then: orchestrator retry {run} --rule reject-busy"
SKIP_REASON = f"already at {TGT}"
SIGTERM = "SIGTERM from the operator"
BREAKER = "breaker: 2 failures counted (limit 2)"
HINT_403 = "grant the IAM policy DBS FullAccess, then: orchestrator resume {run} --ack"
RUN1_OPTIONS: dict[str, Any] = {
    "rate": "2/s",
    "concurrency": 4,
    "window": {"start": "00:00", "end": "06:00", "tz": "UTC"},
    "waves": [2, 2],
    "breaker": {"failures": 3},
    "policy": {"rules": [{"name": "reject-busy"}]},
}


def t(day: int, hms: str) -> datetime:
    """2026-03-``day`` at ``HH:MM:SS[.fff]`` UTC."""
    return datetime.fromisoformat(f"2026-03-{day:02d}T{hms}+00:00")


def _job(
    jid: int,
    run_id: int,
    proxy: str,
    status: str,
    *,
    wave: int = 1,
    target: str = TGT,
    current: str | None = None,
    attempts: int = 0,
    reason: str | None = None,
    hint: str | None = None,
    rule: str | None = None,
    counts_failure: bool = False,
    at: datetime,
) -> dict[str, Any]:
    return {
        "id": jid,
        "run_id": run_id,
        "project_id": PROJECT,
        "instance_id": INSTANCE[proxy],
        "proxy_id": proxy,
        "name": NAMES[proxy],
        "region": "ap-southeast-1",
        "endpoint": "https://gaussdb.ap-southeast-1.example.test",
        "x_language": "en-us",
        "source_version": SRC,
        "target_version": target,
        "inventory_line": jid,
        "status": status,
        "attempt_count": attempts,
        "reason": reason,
        "hint": hint,
        "rule": rule,
        "current_version": current,
        "latest_version": TGT2,
        "wave": wave,
        "counts_failure": counts_failure,
        "created_at": at,
        "updated_at": at,
    }


def _att(
    aid: int,
    job_id: int,
    number: int,
    sent: datetime,
    answered: datetime | None,
    outcome: str,
    *,
    http: int | None = 200,
    code: str | None = None,
    msg: str | None = None,
    rule: str | None = None,
    transport: str | None = None,
) -> dict[str, Any]:
    return {
        "id": aid,
        "job_id": job_id,
        "number": number,
        "worker": "jump-1:100:abcd",
        "sent_at": sent,
        "answered_at": answered,
        "http_status": http,
        "error_code": code,
        "error_msg": msg,
        "request_id": f"req-{aid}",
        "outcome": outcome,
        "rule": rule,
        "transport": transport,
        "cloud_offset_s": 0.0,
    }


def _wf(
    wid: int,
    job_id: int,
    attempt_id: int | None,
    workflow_id: str | None,
    state: str,
    created: datetime,
    *,
    status: str | None = None,
    ended: datetime | None = None,
    error: str | None = None,
    source: str = "answer",
) -> dict[str, Any]:
    return {
        "id": wid,
        "job_id": job_id,
        "attempt_id": attempt_id,
        "workflow_id": workflow_id,
        "instance_id": None,
        "state": state,
        "error_message": error,
        "source": source,
        "created_at": created,
        "job_status": status,
        "progress": "100" if status == "Completed" else None,
        "fail_reason": None,
        "checked_at": ended or created,
        "ended_at": ended,
    }


def _ev(
    eid: int,
    at: datetime,
    run_id: int,
    job_id: int | None,
    kind: str,
    frm: str | None,
    to: str | None,
    *,
    rule: str | None = None,
    reason: str | None = None,
    user: str = "ops",
    host: str = "jump-1",
    pid: int = 100,
) -> dict[str, Any]:
    return {
        "id": eid,
        "at": at,
        "run_id": run_id,
        "job_id": job_id,
        "kind": kind,
        "from_status": frm,
        "to_status": to,
        "rule": rule,
        "reason": reason,
        "os_user": user,
        "host": host,
        "pid": pid,
        "detail": None,
    }


RUNS = [
    {
        "id": 1,
        "name": RUN1_NAME,
        "inventory_path": "/srv/fleet.yaml",
        "inventory_sha256": "1" * 64,
        "status": "finished",
        "created_at": t(1, "00:00:00"),
        "started_at": t(1, "00:00:05"),
        "finished_at": t(1, "09:00:00"),
        "options": RUN1_OPTIONS,
        "stop_reason": None,
        "wave_open": 2,
        "failures_acked": 0,
    },
    {
        "id": 2,
        "name": RUN2_NAME,
        "inventory_path": "/srv/canary.yaml",
        "inventory_sha256": "2" * 64,
        "status": "stopped",
        "created_at": t(2, "01:00:00"),
        "started_at": t(2, "01:00:02"),
        "finished_at": None,
        "options": {"rate": "10/s", "concurrency": 8},
        "stop_reason": SIGTERM,
        "wave_open": 1,
        "failures_acked": 0,
    },
    {
        "id": 3,
        "name": RUN3_NAME,
        "inventory_path": "/srv/canary.yaml",
        "inventory_sha256": "3" * 64,
        "status": "halted",
        "created_at": t(3, "02:00:00"),
        "started_at": t(3, "02:00:01"),
        "finished_at": None,
        "options": {"rate": "1/s", "concurrency": 2, "breaker": {"failures": 2}},
        "stop_reason": BREAKER,
        "wave_open": 1,
        "failures_acked": 0,
    },
]

JOBS = [
    _job(1, 1, P1, "succeeded", current=TGT, attempts=1, at=t(1, "00:11:05")),
    _job(2, 1, P2, "succeeded", current=TGT, attempts=2, at=t(1, "08:20:10")),
    _job(
        3,
        1,
        P3,
        "failed",
        wave=2,
        current=SRC,
        attempts=3,
        reason="HTTP 500 DBS.200001 after 3 calls",
        hint=HINT_5XX,
        rule="http-5xx",
        counts_failure=True,
        at=t(1, "00:02:31"),
    ),
    _job(4, 1, P4, "skipped", wave=2, current=TGT, reason=SKIP_REASON, at=t(1, "00:00:10")),
    _job(5, 2, P1, "accepted", target=TGT2, current=TGT, attempts=1, at=t(2, "01:06:00")),
    _job(
        6,
        2,
        P2,
        "flagged",
        target=TGT2,
        current=TGT,
        attempts=1,
        reason="REJECT: instance is busy",
        hint=HINT_BUSY,
        rule="reject-busy",
        at=t(2, "01:05:01.200"),
    ),
    _job(7, 2, P3, "pending", target=TGT2, at=t(2, "01:00:02")),
    _job(
        8,
        3,
        P4,
        "failed",
        target=TGT2,
        current=TGT,
        attempts=1,
        reason="HTTP 403 DBS.280001: not authorized",
        hint=HINT_403,
        rule="forbidden",
        counts_failure=True,
        at=t(3, "02:00:10.300"),
    ),
]

E500: dict[str, Any] = {"http": 500, "code": "DBS.200001", "rule": "http-5xx"}
ATTEMPTS = [
    _att(1, 1, 1, t(1, "00:01:00.250"), t(1, "00:01:00.750"), "accepted", rule="accept"),
    _att(2, 2, 1, t(1, "00:01:00.600"), t(1, "00:01:01.100"), "flag", rule="reject-busy"),
    _att(3, 3, 1, t(1, "00:02:00"), t(1, "00:02:00.200"), "retry", **E500),
    _att(4, 3, 2, t(1, "00:02:10"), t(1, "00:02:10.200"), "retry", **E500),
    _att(5, 3, 3, t(1, "00:02:30"), t(1, "00:02:30.200"), "fail", **E500),
    _att(6, 2, 2, t(1, "08:01:00"), t(1, "08:01:02"), "accepted", rule="accept"),
    _att(7, 5, 1, t(2, "01:05:00"), t(2, "01:05:30"), "reconcile", http=None, transport="timeout"),
    _att(8, 6, 1, t(2, "01:05:01"), t(2, "01:05:01.200"), "flag", rule="reject-busy"),
    _att(
        9,
        8,
        1,
        t(3, "02:00:10"),
        t(3, "02:00:10.300"),
        "fail",
        http=403,
        code="DBS.280001",
        msg="not authorized",
        rule="forbidden",
    ),
]

WORKFLOWS = [
    _wf(1, 1, 1, W1, "ACCEPT", t(1, "00:01:01"), status="Completed", ended=t(1, "00:11:00")),
    _wf(2, 2, 2, None, "REJECT", t(1, "00:01:01.100"), error=REJECT_MSG),
    _wf(3, 2, 6, W3, "ACCEPT", t(1, "08:01:02.500"), status="Completed", ended=t(1, "08:20:00")),
    _wf(4, 5, None, W4, "ACCEPT", t(2, "01:06:00"), status="Running", source="reconciled"),
    _wf(5, 6, 8, None, "REJECT", t(2, "01:05:01.200"), error="instance is busy"),
]

EVENTS = [
    _ev(1, t(1, "00:00:05"), 1, None, "run", "created", "running", reason="run started"),
    _ev(2, t(1, "00:00:10"), 1, 4, "move", "pending", "skipped", rule="at-target", reason=SKIP_REASON),
    _ev(3, t(1, "00:01:00.250"), 1, 1, "move", "pending", "in_flight"),
    _ev(4, t(1, "00:01:01"), 1, 1, "move", "in_flight", "accepted", rule="accept"),
    _ev(5, t(1, "00:01:01.100"), 1, 2, "move", "in_flight", "flagged", rule="reject-busy", reason=REJECT_MSG),
    _ev(6, t(1, "00:02:31"), 1, 3, "move", "in_flight", "failed", rule="http-5xx"),
    _ev(7, t(1, "00:11:05"), 1, 1, "move", "accepted", "succeeded"),
    _ev(8, t(1, "06:00:00"), 1, None, "run", "running", "paused", reason="window closed"),
    _ev(9, t(1, "08:00:00"), 1, 2, "retry", "flagged", "pending", rule="reject-busy", user="alice", pid=4242),
    _ev(10, t(1, "08:00:30"), 1, None, "resume", "paused", "running", user="alice", pid=4243),
    _ev(11, t(1, "08:01:02.500"), 1, 2, "move", "in_flight", "accepted", rule="accept"),
    _ev(12, t(1, "08:20:10"), 1, 2, "move", "accepted", "succeeded"),
    _ev(13, t(1, "09:00:00"), 1, None, "run", "running", "finished"),
    _ev(14, t(2, "01:00:02"), 2, None, "run", "created", "running", user="bob", host="jump-2"),
    _ev(15, t(2, "01:05:01.200"), 2, 6, "move", "in_flight", "flagged", rule="reject-busy", user="bob"),
    _ev(
        16,
        t(2, "01:30:00"),
        2,
        None,
        "run",
        "running",
        "stopped",
        reason=SIGTERM,
        user="bob",
        host="jump-2",
    ),
    _ev(17, t(3, "02:00:01"), 3, None, "run", "created", "running", user="carol", host="jump-3"),
    _ev(18, t(3, "02:00:10.300"), 3, 8, "move", "in_flight", "failed", rule="forbidden", user="carol"),
    _ev(
        19,
        t(3, "02:00:11"),
        3,
        None,
        "run",
        "running",
        "halted",
        reason=BREAKER,
        user="carol",
        host="jump-3",
    ),
]


async def populate(conn: AsyncConnection) -> None:
    """Insert the story above into an empty job table at head (ids as given)."""
    tables = ((Run, RUNS), (Job, JOBS), (Attempt, ATTEMPTS), (Workflow, WORKFLOWS), (Event, EVENTS))
    for model, rows in tables:
        await conn.execute(insert(model), rows)


class Readable:
    """A populated job table (``url``, normalized); ``connect()`` opens a read transaction on it, the one
    the read commands use (``store/reader.py``)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self) -> AbstractAsyncContextManager[Reader]:
        """A read transaction on the table, closed on leaving the ``async with``."""
        return open_reader(self.url)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A SQLAlchemy transaction to add to the story (committed on leaving the ``async with``)."""
        from orchestrator.store import db

        engine = db.create_engine(self.url)
        try:
            async with engine.begin() as conn:
                yield conn
        finally:
            await engine.dispose()
