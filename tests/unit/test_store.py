"""The job table's gateway (``orchestrator.store``) on both backends, in-process: claims and the guards on
them, intents and answers, the one guarded move, the event log, re-queue, run state, run creation and
registration, heartbeats, send permits, and the group-commit writer's outage handling.

Every case runs on a real SQLite file and on a real PostgreSQL database (``postgres``), migrated once per
session so no case pays for the migrations (a copy of a template file; the tables emptied). Time: on SQLite
the store runs on an injected clock that stands still until the test moves it (``Env.later``), so leases
behave exactly whatever the machine's load; on PostgreSQL the clock is the server's and ``later`` sleeps. A
lease that must run out is given as the holder's last act (a claim or a heartbeat), or, where the holder's
whole life matters, it is ``Env.lease`` (30 s on SQLite, 1.5 s on PostgreSQL) and the test waits it out
(``Env.expire``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from orchestrator.states import ALLOWED, TERMINAL, IllegalMove, JobStatus, RunStatus, check_move, sources_of
from orchestrator.store import (
    AttemptAnswer,
    DatabaseDown,
    DatabaseUnavailable,
    JobRow,
    JobStore,
    Move,
    NewJob,
    NewWorkflow,
    ProxiesHeld,
    Registration,
    RunLocked,
    RunRow,
    UnfinishedRun,
    UnknownProxies,
    new_worker_id,
    open_store,
)
from orchestrator.store import sql as store_sql
from orchestrator.store.sql import Op, SqliteBackend, Tx
from orchestrator.store.writer import SQLITE_GATHER_S, GroupCommitWriter
from tests.virtual import run_virtual

S = JobStatus
PROJECT = "0" * 32


# ------------------------------------------------------------------------------------ the two backends
def run_apart(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to its end on its own loop in another thread (session fixtures are first asked
    for from inside a case's running loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(make())).result()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite job table migrated to head once per session (copied for each case)."""
    path = tmp_path_factory.mktemp("store-template") / "template.db"

    async def migrate() -> None:
        store = await open_store(f"sqlite:///{path}")
        await store.close()

    run_apart(migrate)
    return path


TABLES = ("events", "send_log", "workers", "workflows", "attempts", "jobs", "runs")


@pytest.fixture(scope="session")
def pg_database(pg_server: str | None) -> Iterator[str | None]:
    """The URL of a PostgreSQL database migrated to head once per session (each case empties its tables),
    or None without a server."""
    if pg_server is None:
        yield None
        return
    import asyncpg  # type: ignore[import-untyped]

    url = f"{pg_server}/t1_store_{uuid.uuid4().hex[:10]}"

    async def make() -> None:
        conn = await asyncpg.connect(pg_server + "/postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{url.rsplit("/", 1)[1]}"')
        finally:
            await conn.close()
        store = await open_store(url)
        await store.close()

    run_apart(make)
    yield url


class Clock:
    """The SQLite store's clock: stands still at the case's start until ``Env.later`` moves it."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.at


@dataclass
class Env:
    backend: str
    url: str
    clock: Clock
    stores: list[JobStore] = field(default_factory=list)

    async def open(self, **kw: Any) -> JobStore:
        """Another process's view of the same job table (its own connection and writer)."""
        clock = self.clock.now if self.backend == "sqlite" else None
        store = await open_store(self.url, clock=clock, **kw)
        self.stores.append(store)
        return store

    @property
    def lease(self) -> float:
        """A lease a holder keeps for all its acts, short enough to wait out (see the module docstring)."""
        return 30.0 if self.backend == "sqlite" else 1.5

    async def later(self, seconds: float) -> None:
        """Let ``seconds`` pass on the job table's clock."""
        if self.backend == "sqlite":
            self.clock.at += timedelta(seconds=seconds)
        else:
            await asyncio.sleep(seconds)

    async def expire(self) -> None:
        """Let every ``lease`` given so far run out."""
        await self.later(self.lease + 0.3)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    if request.param == "sqlite":
        path = tmp_path / "jobs.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        pg_database: str | None = request.getfixturevalue("pg_database")  # started only when needed
        if pg_database is None:
            pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
        import asyncpg

        conn = await asyncpg.connect(pg_database)
        try:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()
        url = pg_database
    e = Env(request.param, url, Clock())
    yield e
    for store in e.stores:
        await store.close()


# ------------------------------------------------------------------------------------------- helpers
def fleet(n: int, per_instance: int = 1, *, prefix: str = "") -> list[NewJob]:
    """``n`` proxies, ``per_instance`` to an instance, in inventory order (instance by instance)."""
    return [
        NewJob(
            project_id=PROJECT,
            instance_id=f"{prefix}{i // per_instance:031x}in07",
            proxy_id=f"{i:032x}po01",
            endpoint="http://127.0.0.1:9",
            target_version="2.24.03.000",
            source_version="2.23.12.000",
            line=i + 1,
        )
        for i in range(n)
    ]


async def new_run(
    store: JobStore,
    jobs: Sequence[NewJob] | int = 10,
    *,
    inventory: str = "fleet.yaml",
    runner: str | None = None,
    lease_s: float = 30,
    waves: list[int] | None = None,
) -> tuple[RunRow, Registration]:
    items = fleet(jobs) if isinstance(jobs, int) else list(jobs)
    planner = None
    if waves is not None:

        def planner(keys: list[tuple[int, str, str]]) -> tuple[list[int], list[int]]:
            return [k[0] for k in keys], list(waves)

    return await store.create_run(
        name="t",
        inventory_path=inventory,
        inventory_sha256="0" * 64,
        options={},
        jobs=lambda: iter(items),
        runner_id=runner or new_worker_id(),
        lease_s=lease_s,
        waves=planner,
    )


async def claim(store: JobStore, run: int, worker: str, limit: int = 100, **kw: Any) -> list[JobRow]:
    args: dict[str, Any] = {"lease_s": 30.0, "track": True} | kw
    return (await store.claim(run, worker_id=worker, limit=limit, **args)).jobs


async def job(store: JobStore, job_id: int) -> JobRow:
    found = await store.get_job(job_id)
    assert found is not None
    return found


async def rows(store: JobStore, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """A read as an auditor would make it (the store's read connection, outside the writer)."""
    async with store.read() as conn:
        return await conn.fetch(sql, params)


async def events(store: JobStore, run: int) -> list[tuple[Any, ...]]:
    """(kind, job_id, from_status, to_status, rule, reason) of every event of ``run``, in order."""
    return await rows(
        store,
        "SELECT kind, job_id, from_status, to_status, rule, reason FROM events WHERE run_id = :r ORDER BY id",
        r=run,
    )


async def table_counts(store: JobStore) -> dict[str, int]:
    out = {}
    for table in ("runs", "jobs", "workers", "events", "attempts", "workflows"):
        ((n,),) = await rows(store, f"SELECT count(*) FROM {table}")
        out[table] = int(n)
    return out


async def execute(store: JobStore, sql: str, **params: Any) -> None:
    """Set up a row the API has no reason to write (a crashed process's registration)."""

    async def op(tx: Tx) -> None:
        await tx.execute(sql, {k: tx.ts(v) if isinstance(v, datetime) else v for k, v in params.items()})

    await store.writer.submit(op)


def flag(frm: JobStatus = S.PENDING, to: JobStatus = S.FLAGGED, **fields: Any) -> Move:
    return Move(frm=frm, to=to, fields={"reason": f"-> {to.value}", "rule": "test:rule", **fields})


ACCEPTED = AttemptAnswer(outcome="accepted", http_status=200, request_id="req-1")


# --------------------------------------------------------------------------------------- state table
def test_state_table_is_consistent() -> None:
    for st in TERMINAL:
        assert ALLOWED[st] <= {JobStatus.PENDING}
    assert JobStatus.SUCCEEDED not in sources_of(JobStatus.PENDING)
    with pytest.raises(IllegalMove):
        check_move(JobStatus.SUCCEEDED, JobStatus.PENDING)
    with pytest.raises(IllegalMove):
        check_move(JobStatus.ACCEPTED, JobStatus.IN_FLIGHT)  # never resend a running upgrade


# -------------------------------------------------------------------------------------------- claims
async def test_two_claimers_never_claim_the_same_job(env: Env) -> None:
    """Two processes (each its own connection and writer) claim at once until nothing is left."""
    a_store, b_store = await env.open(), await env.open()
    run, _ = await new_run(a_store, 60)
    a, b = new_worker_id(), new_worker_id()
    for store, w in ((a_store, a), (b_store, b)):
        await store.register(run.id, worker_id=w, role="worker", lease_s=30, exclusive=False)
    got: dict[str, list[int]] = {a: [], b: []}
    for _ in range(10):
        ra, rb = await asyncio.gather(claim(a_store, run.id, a, 7), claim(b_store, run.id, b, 7))
        got[a] += [j.id for j in ra]
        got[b] += [j.id for j in rb]
        if not ra and not rb:
            break
    assert not set(got[a]) & set(got[b])
    assert len(got[a]) + len(got[b]) == 60 == len(set(got[a]) | set(got[b]))
    assert got[a] and got[b]
    # each claim leased its jobs to its claimer, in the table as in the answer
    for w, ids in got.items():
        for j in ids[:3]:
            row = await job(a_store, j)
            assert row.claimed_by == w and row.lease_expires_at is not None


async def test_one_upgrade_per_instance_at_a_time(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, fleet(6, per_instance=3))  # 2 instances x 3 proxies
    w = reg.worker_id
    first = await claim(store, run.id, w, 10)
    assert len(first) == 2 and len({j.instance_id for j in first}) == 2
    # while those are claimed (and then in flight), their siblings stay unclaimed
    assert await claim(store, run.id, w, 10) == []
    intent = await store.record_intent(first[0], worker_id=w, cloud_offset_s=None)
    assert intent is not None
    assert await claim(store, run.id, w, 10) == []
    assert await store.record_answer(
        replace(first[0], status=S.IN_FLIGHT),
        intent.attempt_id,
        AttemptAnswer(outcome="flag", rule="test:rule"),
        workflows=[],
        move=flag(S.IN_FLIGHT),
        worker_id=w,
    )
    nxt = await claim(store, run.id, w, 10)
    assert [j.instance_id for j in nxt] == [first[0].instance_id]


async def test_per_instance_guard_allows_n_at_once(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, fleet(9, per_instance=3))  # instances a, b, c with 3 proxies each
    got = await claim(store, run.id, reg.worker_id, 100, per_instance=2)
    by_instance: dict[str, int] = {}
    for j in got:
        by_instance[j.instance_id] = by_instance.get(j.instance_id, 0) + 1
    assert sorted(by_instance.values()) == [2, 2, 2]
    assert await claim(store, run.id, reg.worker_id, 100, per_instance=2) == []
    # a larger guard lets the third of each instance go too
    assert len(await claim(store, run.id, reg.worker_id, 100, per_instance=3)) == 3


async def test_the_guard_holds_across_an_instances_retries_and_its_pending_jobs(env: Env) -> None:
    """A claim asks for due retries, then pending jobs, each with its instance's busy count: siblings
    found by both queries still share one bound."""
    store = await env.open()
    run, reg = await new_run(store, fleet(3, per_instance=3))  # one instance, three proxies
    w = reg.worker_id
    (first,) = await claim(store, run.id, w, 1)
    due = (
        env.clock.now() - timedelta(seconds=1)
        if env.backend == "sqlite"
        else datetime.now(UTC) - timedelta(hours=1)
    )
    retry = Move(
        frm=S.PENDING,
        to=S.RETRY_WAIT,
        fields={"reason": "later", "rule": "test:rule", "next_attempt_at": due},
    )
    assert await store.move(first, retry, worker_id=w)
    one = await claim(store, run.id, w, 10)
    assert len(one) == 1 and one[0].id == first.id and one[0].status is S.RETRY_WAIT
    await store.release(first.id, w)
    two = await claim(store, run.id, w, 10, per_instance=2)
    assert len(two) == 2 and first.id in {j.id for j in two}


async def test_a_busy_instance_does_not_starve_the_instances_after_it(env: Env) -> None:
    """The engine claims as many jobs as it has free workers, often one: the instances listed after a
    busy one's siblings must still be found (not only the first few candidates in inventory order)."""
    store = await env.open()
    run, reg = await new_run(store, fleet(12, per_instance=4))  # a1..a4 b1..b4 c1..c4
    w = reg.worker_id
    got = [await claim(store, run.id, w, 1) for _ in range(3)]
    assert [len(g) for g in got] == [1, 1, 1]
    assert len({g[0].instance_id for g in got}) == 3
    assert await claim(store, run.id, w, 1) == []


async def test_busy_means_in_flight_unknown_and_accepted_while_tracking(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, fleet(6, per_instance=2))  # 3 instances x 2 proxies
    w = reg.worker_id
    a, b, c = await claim(store, run.id, w, 3)
    ia = await store.record_intent(a, worker_id=w, cloud_offset_s=None)
    ib = await store.record_intent(b, worker_id=w, cloud_offset_s=None)
    assert ia is not None and ib is not None
    # a: accepted (tracked), b: unknown (lost answer), c: released while still pending
    assert await store.record_answer(
        replace(a, status=S.IN_FLIGHT),
        ia.attempt_id,
        ACCEPTED,
        workflows=[NewWorkflow("wf-a", "ACCEPT")],
        move=Move(frm=S.IN_FLIGHT, to=S.ACCEPTED),
        worker_id=w,
    )
    assert await store.move(replace(b, status=S.IN_FLIGHT), Move(frm=S.IN_FLIGHT, to=S.UNKNOWN), worker_id=w)
    await store.release(c.id, w)
    # new upgrades only: a's and b's siblings wait, c's instance is free again (c or its sibling)
    upgrades = await claim(store, run.id, w, 10, allow_new=True, track=True)
    upgrades = [j for j in upgrades if j.status in (S.PENDING, S.RETRY_WAIT)]
    assert {j.instance_id for j in upgrades} == {c.instance_id}
    for j in upgrades:
        await store.release(j.id, w)
    # without tracking (--no-wait) an accepted upgrade no longer holds its instance
    untracked = await claim(store, run.id, w, 10, track=False)
    assert {j.instance_id for j in untracked if j.status is S.PENDING} == {a.instance_id, c.instance_id}
    assert b.instance_id not in {j.instance_id for j in untracked if j.status is S.PENDING}


async def test_follow_ups_come_first_and_need_no_permission(env: Env) -> None:
    """Lost answers and tracked workflows are claimed before new upgrades, and also when new upgrades
    are withheld (window closed, breaker tripped)."""
    store = await env.open()
    run, reg = await new_run(store, 4)
    w = reg.worker_id
    a, b = await claim(store, run.id, w, 2)
    ia = await store.record_intent(a, worker_id=w, cloud_offset_s=None)
    assert ia is not None
    assert await store.move(replace(a, status=S.IN_FLIGHT), Move(frm=S.IN_FLIGHT, to=S.UNKNOWN), worker_id=w)
    await store.release(b.id, w)
    withheld = await claim(store, run.id, w, 10, allow_new=False)
    assert [j.id for j in withheld] == [a.id] and withheld[0].status is S.UNKNOWN
    await store.release(a.id, w)
    first = await claim(store, run.id, w, 1)
    assert [j.id for j in first] == [a.id]


async def test_only_jobs_of_open_waves_are_claimed(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 6, waves=[1, 2, 3])
    assert [j.wave for j in await store.jobs(run.id)] == [1, 2, 2, 3, 3, 3]
    w = reg.worker_id
    one = await claim(store, run.id, w, 100, open_wave=run.wave_open)
    assert run.wave_open == 1 and [j.wave for j in one] == [1]
    assert await store.open_wave(run.id, frm=1, to=2, reason="the previous wave finished")
    # a second process that saw wave 1 open does not open it again
    assert not await store.open_wave(run.id, frm=1, to=2, reason="again")
    now_open = (await store.get_run(run.id)).wave_open  # type: ignore[union-attr]
    assert now_open == 2
    two = await claim(store, run.id, w, 100, open_wave=now_open)
    assert [j.wave for j in two] == [2, 2]
    assert await claim(store, run.id, w, 100, open_wave=now_open) == []
    wave_events = [e for e in await events(store, run.id) if e[0] == "wave"]
    assert len(wave_events) == 1 and wave_events[0][5] == "the previous wave finished"


# ------------------------------------------------------------------------------------------- intents
async def test_intent_guards(env: Env) -> None:
    """No intent (so no call) for a job whose claim lapsed, whose attempt count or status moved, or that
    another process holds."""
    store = await env.open()
    run, reg = await new_run(store, 4)
    w = reg.worker_id
    (lapsed,) = await claim(store, run.id, w, 1, lease_s=0.2)  # its claim's last act: a short lease
    counted, moved, theirs = await claim(store, run.id, w, 3)
    await env.later(0.4)
    assert await store.record_intent(lapsed, worker_id=w, cloud_offset_s=None) is None
    assert (await job(store, lapsed.id)).status is S.PENDING

    # the attempt count moved (another intent was recorded from this row): the stale row gets none
    first = await store.record_intent(counted, worker_id=w, cloud_offset_s=0.25)
    assert first is not None and first.number == 1
    assert await store.record_intent(counted, worker_id=w, cloud_offset_s=None) is None
    attempts = await store.attempts(counted.id)
    assert [(a.number, a.outcome, a.cloud_offset_s) for a in attempts] == [(1, "in_flight", 0.25)]

    # the status moved (an operator or another step flagged it)
    assert await store.move(moved, flag(), worker_id=w)
    assert await store.record_intent(moved, worker_id=w, cloud_offset_s=None) is None

    # another process's claim is not this one's
    assert await store.record_intent(theirs, worker_id=new_worker_id(), cloud_offset_s=None) is None
    untouched = await job(store, theirs.id)
    assert (untouched.status, untouched.attempt_count, untouched.claimed_by) == (S.PENDING, 0, w)
    assert await store.attempts(lapsed.id) == [] and await store.attempts(theirs.id) == []


async def test_the_intents_deadline_is_the_claims_lease(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 1)
    (j,) = await claim(store, run.id, reg.worker_id, 1, lease_s=45)
    assert j.lease_expires_at is not None
    intent = await store.record_intent(j, worker_id=reg.worker_id, cloud_offset_s=None)
    assert intent is not None and intent.number == 1
    assert intent.deadline == j.lease_expires_at
    row = await job(store, j.id)
    assert row.status is S.IN_FLIGHT and row.intent_deadline == j.lease_expires_at and row.attempt_count == 1
    (attempt,) = await store.attempts(j.id)
    assert attempt.id == intent.attempt_id and attempt.worker == reg.worker_id
    # the lease was taken on the job table's clock, 45 s after the claim
    assert timedelta(seconds=35) < j.lease_expires_at - attempt.sent_at <= timedelta(seconds=45)


async def test_in_flight_job_of_a_gone_holder_becomes_unknown_with_its_last_lease(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 2)
    gone = new_worker_id()
    await store.register(run.id, worker_id=gone, role="worker", lease_s=env.lease, exclusive=False)
    j, idle = await claim(store, run.id, gone, 2, lease_s=env.lease)
    intent = await store.record_intent(j, worker_id=gone, cloud_offset_s=None)
    assert intent is not None and intent.deadline is not None and intent.deadline == j.lease_expires_at
    # its last act: a heartbeat renewing both claims; then it stops
    alive, renewed, _ = await store.heartbeat(gone, env.lease)
    assert alive and renewed == {j.id, idle.id}
    last_lease = (await job(store, j.id)).lease_expires_at
    assert last_lease is not None and last_lease >= intent.deadline
    await env.expire()
    taken = await claim(store, run.id, reg.worker_id, 10)
    by_id = {t.id: t for t in taken}
    assert by_id[j.id].status is S.UNKNOWN
    assert by_id[idle.id].status is S.PENDING  # never sent: simply claimed again
    row = await job(store, j.id)
    # it could have sent until its last lease ran out: reconcile concludes nothing before that
    assert row.status is S.UNKNOWN and row.intent_deadline == last_lease
    assert row.claimed_by == reg.worker_id
    assert (S.IN_FLIGHT.value, S.UNKNOWN.value, "claim:holder-gone") in {
        (e[2], e[3], e[4]) for e in await events(store, run.id) if e[1] == j.id
    }


async def test_a_holder_that_left_cannot_send_after_it_left(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 1)
    leaver = new_worker_id()
    await store.register(run.id, worker_id=leaver, role="worker", lease_s=30, exclusive=False)
    (j,) = await claim(store, run.id, leaver, 1)
    assert await store.record_intent(j, worker_id=leaver, cloud_offset_s=None) is not None
    await store.leave(leaver)
    row = await job(store, j.id)
    assert row.claimed_by is None and row.intent_deadline is not None
    assert j.lease_expires_at is not None and row.intent_deadline < j.lease_expires_at
    (taken,) = await claim(store, run.id, reg.worker_id, 1)
    assert taken.status is S.UNKNOWN
    assert taken.intent_deadline is not None and taken.intent_deadline <= taken.updated_at


# --------------------------------------------------------------------------------------------- moves
async def test_guarded_moves_and_illegal_moves(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 2)
    w, other = reg.worker_id, new_worker_id()
    j, k = await claim(store, run.id, w, 2)
    with pytest.raises(IllegalMove):
        await store.move(j, Move(frm=S.PENDING, to=S.SUCCEEDED), worker_id=w)
    with pytest.raises(IllegalMove):
        await store.record_answer(
            j, 1, ACCEPTED, workflows=[], move=Move(frm=S.PENDING, to=S.ACCEPTED), worker_id=w
        )
    with pytest.raises(ValueError, match=r"may not set jobs\.claimed_by"):
        await store.move(j, flag(claimed_by="me"), worker_id=w)
    # another process's claim: the move loses, nothing changes
    assert not await store.move(j, flag(), worker_id=other)
    # the status the mover saw is not the status any more: loses
    assert not await store.move(j, flag(frm=S.RETRY_WAIT), worker_id=w)
    assert (await job(store, j.id)).status is S.PENDING
    assert await store.move(j, flag(hint="look", counts_failure=True), worker_id=w)
    row = await job(store, j.id)
    assert row.status is S.FLAGGED and row.rule == "test:rule" and row.hint == "look" and row.counts_failure
    assert row.claimed_by is None and row.lease_expires_at is None  # released with the move
    # the same move twice: the second loses (the first won)
    assert not await store.move(j, flag(), worker_id=w)
    # a move that keeps the claim
    assert await store.move(k, replace(flag(to=S.RETRY_WAIT), release=False), worker_id=w)
    assert (await job(store, k.id)).claimed_by == w
    # an unclaimed job may be moved by anyone (an operator's command)
    assert await store.move(await job(store, j.id), Move(frm=S.FLAGGED, to=S.PENDING), worker_id=None)


async def test_record_answer_records_answer_workflows_and_move_in_one_commit(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 1)
    w = reg.worker_id
    (j,) = await claim(store, run.id, w, 1)
    intent = await store.record_intent(j, worker_id=w, cloud_offset_s=None)
    assert intent is not None
    # the same (stale) job row cannot produce a second intent: no second call can leave
    assert await store.record_intent(j, worker_id=w, cloud_offset_s=None) is None
    sent = datetime.now(UTC)
    answered = replace(ACCEPTED, sent_at=sent, rule="default:accept")
    ok = await store.record_answer(
        replace(j, status=S.IN_FLIGHT),
        intent.attempt_id,
        answered,
        workflows=[NewWorkflow("w1", "ACCEPT"), NewWorkflow("w2", "REJECT", "insufficient subnet ip")],
        move=Move(frm=S.IN_FLIGHT, to=S.ACCEPTED, fields={"rule": "default:accept"}),
        worker_id=w,
    )
    assert ok
    wfs = await store.workflows_of(j.id)
    assert [(x.workflow_id, x.state, x.attempt_id) for x in wfs] == [
        ("w1", "ACCEPT", intent.attempt_id),
        ("w2", "REJECT", intent.attempt_id),
    ]
    (attempt,) = await store.attempts(j.id)
    assert (attempt.outcome, attempt.http_status, attempt.request_id, attempt.rule) == (
        "accepted",
        200,
        "req-1",
        "default:accept",
    )
    assert attempt.answered_at is not None and attempt.sent_at == sent
    # a second answer to the same attempt loses the guard (job no longer in flight)
    again = await store.record_answer(
        replace(j, status=S.IN_FLIGHT),
        intent.attempt_id,
        AttemptAnswer(outcome="fail"),
        workflows=[],
        move=Move(frm=S.IN_FLIGHT, to=S.FAILED),
        worker_id=w,
    )
    assert not again
    assert (await job(store, j.id)).status is S.ACCEPTED


async def test_record_answer_keeps_the_answer_and_workflows_when_the_move_loses(env: Env) -> None:
    """The sender's claim ran out and another process took the job over (unknown) while the answer was on
    its way: the move loses, but the cloud's answer and workflow ids are facts and are kept."""
    store = await env.open()
    run, reg = await new_run(store, 1)
    slow = new_worker_id()
    await store.register(run.id, worker_id=slow, role="worker", lease_s=30, exclusive=False)
    (j,) = await claim(store, run.id, slow, 1, lease_s=30)
    intent = await store.record_intent(j, worker_id=slow, cloud_offset_s=None)
    assert intent is not None
    await store.heartbeat(slow, 0.2)  # its last renewal; then it stalls
    await env.later(0.4)
    (taken,) = await claim(store, run.id, reg.worker_id, 1)
    assert taken.status is S.UNKNOWN
    won = await store.record_answer(
        replace(j, status=S.IN_FLIGHT),
        intent.attempt_id,
        ACCEPTED,
        workflows=[NewWorkflow("late-wf", "ACCEPT")],
        move=Move(frm=S.IN_FLIGHT, to=S.ACCEPTED),
        worker_id=slow,
    )
    assert not won
    row = await job(store, j.id)
    assert row.status is S.UNKNOWN and row.claimed_by == reg.worker_id
    assert [x.workflow_id for x in await store.workflows_of(j.id)] == ["late-wf"]
    (attempt,) = await store.attempts(j.id)
    assert attempt.outcome == "accepted" and attempt.answered_at is not None
    # the move did not happen, so it left no move event
    moves_of_j = [(e[2], e[3]) for e in await events(store, run.id) if e[1] == j.id]
    assert (S.IN_FLIGHT.value, S.ACCEPTED.value) not in moves_of_j


async def test_every_change_appends_an_event(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 3)
    w = reg.worker_id
    a, b, c = await claim(store, run.id, w, 3)
    await store.set_run_status(run.id, RunStatus.RUNNING)
    ia = await store.record_intent(a, worker_id=w, cloud_offset_s=None)
    assert ia is not None
    assert await store.move(
        replace(a, status=S.IN_FLIGHT),
        Move(frm=S.IN_FLIGHT, to=S.RETRY_WAIT, fields={"reason": "HTTP 503", "rule": "default:5xx"}),
        worker_id=w,
    )
    assert await store.move(
        b,
        Move(frm=S.PENDING, to=S.SKIPPED, fields={"rule": "preflight:at-target"}, event_reason="at target"),
        worker_id=w,
    )
    assert await store.move(c, flag(), worker_id=w)
    requeued = await store.requeue(run.id, statuses=[S.FLAGGED])
    assert requeued.moved == 1
    await store.set_run_status(run.id, RunStatus.STOPPED, "signal")
    await store.heartbeat(w, 0.2)
    await env.later(0.4)
    taker = await store.register(run.id, role="runner", lease_s=30, exclusive=True)
    assert [t.id for t in taker.taken_over] == [w]
    got = await events(store, run.id)
    assert got == [
        ("run", None, None, "created", None, "created with 3 proxies"),
        ("run", None, "created", "running", None, None),
        ("move", a.id, "pending", "in_flight", None, "upgrade call 1"),
        ("move", a.id, "in_flight", "retry_wait", "default:5xx", "HTTP 503"),
        ("move", b.id, "pending", "skipped", "preflight:at-target", "at target"),
        ("move", c.id, "pending", "flagged", "test:rule", "-> flagged"),
        ("retry", c.id, "flagged", "pending", None, "re-queued by an operator"),
        ("run", None, "running", "stopped", None, "signal"),
        ("takeover", None, None, None, None, got[-1][5]),
    ]
    assert got[-1][5].startswith(f"took over from pid {os.getpid()} on {socket.gethostname()}")
    # who: the operator's OS user, host and pid on every event
    who = await rows(store, "SELECT DISTINCT os_user, host, pid FROM events WHERE run_id = :r", r=run.id)
    assert len(who) == 1 and who[0][1] == socket.gethostname() and who[0][2] == os.getpid() and who[0][0]


# -------------------------------------------------------------------------------------------- requeue
async def test_requeue_moves_only_chosen_problem_jobs(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 3)
    w = reg.worker_id
    jobs = await claim(store, run.id, w, 3)
    for j, to in zip(jobs, (S.FLAGGED, S.FAILED, S.SKIPPED), strict=True):
        assert await store.move(j, flag(to=to, counts_failure=True), worker_id=w)
    with pytest.raises(IllegalMove):
        await store.requeue(run.id, statuses=[S.SKIPPED])
    got = await store.requeue(run.id, statuses=[S.FLAGGED])
    assert got.moved == 1 and got.running == []
    counts = await store.counts(run.id)
    assert counts[S.PENDING] == 1 and counts[S.FAILED] == 1 and counts[S.SKIPPED] == 1
    back = await job(store, jobs[0].id)
    assert (back.reason, back.hint, back.rule, back.counts_failure, back.claimed_by) == (
        None,
        None,
        None,
        False,
        None,
    )
    # by rule and by proxy
    assert (await store.requeue(run.id, statuses=[S.FAILED], rules=["other:rule"])).moved == 0
    assert (await store.requeue(run.id, statuses=[S.FAILED], proxy_ids=[jobs[1].proxy_id])).moved == 1


async def test_requeue_checks_every_proxy_before_changing_anything(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 2)
    w = reg.worker_id
    a, b = await claim(store, run.id, w, 2)
    for j in (a, b):
        assert await store.move(j, flag(), worker_id=w)
    before = await table_counts(store)
    with pytest.raises(UnknownProxies, match="no-such-proxy"):
        await store.requeue(run.id, statuses=[S.FLAGGED], proxy_ids=[a.proxy_id, "no-such-proxy"])
    assert await table_counts(store) == before
    assert (await store.counts(run.id))[S.FLAGGED] == 2


async def test_requeue_reports_a_job_whose_workflow_was_last_seen_running(env: Env) -> None:
    """Re-queued and reported (which workflow, its last status, when seen): the upgrade step polls that
    workflow first and sends nothing while it runs (tests/unit/test_step_upgrade.py)."""
    store = await env.open()
    run, reg = await new_run(store, 2)
    w = reg.worker_id
    running, ended = await claim(store, run.id, w, 2)
    for j, wf in ((running, "wf-run"), (ended, "wf-end")):
        intent = await store.record_intent(j, worker_id=w, cloud_offset_s=None)
        assert intent is not None
        assert await store.record_answer(
            replace(j, status=S.IN_FLIGHT),
            intent.attempt_id,
            ACCEPTED,
            workflows=[NewWorkflow(wf, "ACCEPT")],
            move=Move(frm=S.IN_FLIGHT, to=S.ACCEPTED),
            worker_id=w,
        )
    (wf_run,) = await store.workflows_of(running.id)
    (wf_end,) = await store.workflows_of(ended.id)
    await store.record_workflow_status(
        wf_run.id, status="Running", progress="40%", fail_reason=None, ended_at=None
    )
    await store.record_workflow_status(
        wf_end.id, status="Failed", progress=None, fail_reason="boom", ended_at=datetime.now(UTC)
    )
    for j in (running, ended):
        row = await job(store, j.id)
        assert await store.move(row, flag(frm=S.ACCEPTED, reason="timed out"), worker_id=None)
    got = await store.requeue(run.id, statuses=[S.FLAGGED])
    assert got.moved == 2
    ((proxy, wf_id, status, seen),) = got.running
    assert (proxy, wf_id, status) == (running.proxy_id, "wf-run", "Running") and seen is not None
    assert (await job(store, running.id)).status is S.PENDING
    assert (await job(store, ended.id)).status is S.PENDING


async def test_requeue_reopens_a_finished_run(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 1)
    (j,) = await claim(store, run.id, reg.worker_id, 1)
    assert await store.move(j, flag(), worker_id=reg.worker_id)
    await store.set_run_status(run.id, RunStatus.FINISHED)
    assert (await store.requeue(run.id, statuses=[S.FLAGGED])).moved == 1
    again = await store.get_run(run.id)
    assert again is not None and again.status is RunStatus.STOPPED and again.finished_at is None
    assert again.stop_reason == "re-queued"


# ------------------------------------------------------------------------------------------ run state
async def test_run_state_counts(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 9, waves=[3, 4, 2])
    w = reg.worker_id
    wave1 = await claim(store, run.id, w, 100, open_wave=1)
    assert len(wave1) == 3
    a, b, c = wave1
    assert await store.move(a, flag(counts_failure=True), worker_id=w)  # finished, counted
    assert await store.move(b, flag(to=S.SKIPPED), worker_id=w)  # finished, not counted
    ic = await store.record_intent(c, worker_id=w, cloud_offset_s=None)
    assert ic is not None
    assert await store.record_answer(
        replace(c, status=S.IN_FLIGHT),
        ic.attempt_id,
        ACCEPTED,
        workflows=[NewWorkflow("wf", "ACCEPT")],
        move=Move(frm=S.IN_FLIGHT, to=S.ACCEPTED),
        worker_id=w,
    )
    st = await store.run_state(run.id)
    assert (st.total, st.finished, st.failures, st.not_started, st.in_flight) == (9, 2, 1, 6, 1)
    assert (st.open_unfinished, st.waves, st.next_wave_size) == (1, 3, 4)
    assert st.run.id == run.id and st.last_wave_finished_at is None
    # --no-wait: an accepted job is done for the waves and nothing is in flight
    nowait = await store.run_state(run.id, track=False)
    assert (nowait.finished, nowait.in_flight, nowait.open_unfinished) == (2, 0, 0)
    await store.mark_wave_done(run.id, 1)
    await store.mark_wave_done(run.id, 1)  # once, whichever process noticed first
    done = await store.run_state(run.id)
    assert done.last_wave_finished_at is not None
    assert [e[0] for e in await events(store, run.id)].count("wave-done") == 1
    assert await store.ack_failures(run.id, "seen by ops") == 1
    acked = await store.run_state(run.id)
    assert acked.run.failures_acked == 1 and acked.failures == 1
    with pytest.raises(LookupError):
        await store.run_state(run.id + 1000)


# --------------------------------------------------------------------------- creating and joining runs
async def test_create_run_writes_run_jobs_waves_and_runner_together(env: Env) -> None:
    store = await env.open()
    runner = new_worker_id()
    run, reg = await new_run(store, 5, runner=runner, waves=[2, 3])
    assert run.status is RunStatus.CREATED and run.wave_open == 1 and run.failures_acked == 0
    assert reg.worker_id == runner and reg.taken_over == () and reg.lease_until > reg.db_now
    jobs = await store.jobs(run.id)
    assert [(j.status, j.wave, j.inventory_line) for j in jobs] == [
        (S.PENDING, 1, 1),
        (S.PENDING, 1, 2),
        (S.PENDING, 2, 3),
        (S.PENDING, 2, 4),
        (S.PENDING, 2, 5),
    ]
    (live,) = await store.live_workers(run.id)
    assert live.id == runner and live.role == "runner" and live.pid == os.getpid()


async def test_create_run_refuses_an_unfinished_run_and_writes_nothing(env: Env) -> None:
    store = await env.open()
    first, reg = await new_run(store, 3, inventory="fleet.yaml")
    await store.leave(reg.worker_id)  # not live: only the unfinished run stands in the way
    before = await table_counts(store)
    with pytest.raises(UnfinishedRun) as exc:
        await new_run(store, fleet(3, prefix="b"), inventory="fleet.yaml")
    assert exc.value.run.id == first.id
    assert await table_counts(store) == before
    # finished: a new run of the same inventory may start
    await store.set_run_status(first.id, RunStatus.FINISHED)
    second, _ = await new_run(store, fleet(3, prefix="b"), inventory="fleet.yaml")
    assert second.id != first.id


async def test_create_run_refuses_proxies_a_live_run_holds_and_writes_nothing(env: Env) -> None:
    store = await env.open()
    holder, reg = await new_run(store, fleet(4), inventory="a.yaml")
    before = await table_counts(store)
    overlapping = fleet(6)[2:]  # two proxies of the live run, four new ones
    with pytest.raises(ProxiesHeld) as exc:
        await new_run(store, overlapping, inventory="b.yaml")
    assert exc.value.run_id == holder.id and exc.value.count == 2
    assert exc.value.holder.id == reg.worker_id
    assert await table_counts(store) == before
    # the holder's jobs on those proxies finished: nothing is held any more
    jobs = await claim(store, holder.id, reg.worker_id, 10)
    for j in jobs:
        if j.proxy_id in {n.proxy_id for n in overlapping}:
            assert await store.move(j, flag(to=S.SKIPPED), worker_id=reg.worker_id)
    other, _ = await new_run(store, overlapping, inventory="b.yaml")
    assert other.id != holder.id


async def test_create_run_with_a_bad_row_writes_nothing(env: Env) -> None:
    store = await env.open()
    items = fleet(5)
    before = await table_counts(store)
    with pytest.raises(Exception, match=r"(?i)unique"):
        await new_run(store, [*items, items[2]])  # the same proxy twice
    assert await table_counts(store) == before


async def test_registration_refuses_a_live_runner_and_takes_over_a_dead_one(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 2)
    holder = reg.worker_id
    with pytest.raises(RunLocked) as exc:
        await store.register(run.id, role="runner", lease_s=30, exclusive=True)
    assert "held by pid" in str(exc.value) and exc.value.holder.id == holder
    # a joined worker is not refused
    helper = await store.register(run.id, role="worker", lease_s=30, exclusive=False)
    (held,) = await claim(store, run.id, holder, 1)
    # the holder's last heartbeat gives it 0.2 s more; then it stalls
    await store.heartbeat(holder, 0.2)
    await env.later(0.4)
    taken = await store.register(run.id, role="runner", lease_s=30, exclusive=True)
    assert [w.id for w in taken.taken_over] == [holder]
    # the dead holder's claims are free at once, and it learns it was replaced at its next heartbeat
    assert (await job(store, held.id)).lease_expires_at <= taken.db_now  # type: ignore[operator]
    alive, renewed, _ = await store.heartbeat(holder, 30)
    assert not alive and renewed == set()
    live = {w.id for w in await store.live_workers(run.id)}
    assert live == {helper.worker_id, taken.worker_id}


async def test_dead_pid_on_this_host_is_taken_over_at_once(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 1)
    await store.leave(reg.worker_id)
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await p.wait()  # a pid that existed on this host and is gone now
    now = datetime.now(UTC)
    await execute(
        store,
        "INSERT INTO workers (id, run_id, role, host, pid, started_at, heartbeat_at, lease_expires_at,"
        " claimed) VALUES ('ghost', :run, 'runner', :host, :pid, :now, :now, :until, 0)",
        run=run.id,
        host=socket.gethostname(),
        pid=p.pid,
        now=now,
        until=now + timedelta(hours=1),
    )
    taken = await store.register(run.id, role="runner", lease_s=30, exclusive=True)
    assert [w.id for w in taken.taken_over] == ["ghost"]


async def test_heartbeat_renews_only_unexpired_claims(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 2)
    w = reg.worker_id
    (short,) = await claim(store, run.id, w, 1, lease_s=0.2)
    (long,) = await claim(store, run.id, w, 1, lease_s=30)
    await env.later(0.4)
    alive, renewed, db_now = await store.heartbeat(w, 60)
    assert alive and renewed == {long.id}
    lapsed = await job(store, short.id)
    assert lapsed.lease_expires_at is not None and lapsed.lease_expires_at <= db_now
    kept = await job(store, long.id)
    assert kept.lease_expires_at == db_now + timedelta(seconds=60)
    # the lapsed claim is anyone's now
    other = new_worker_id()
    await store.register(run.id, worker_id=other, role="worker", lease_s=30, exclusive=False)
    assert [j.id for j in await claim(store, run.id, other, 10)] == [short.id]


# ------------------------------------------------------------------------------------ group commit
async def test_group_commit_batches_concurrent_writes(env: Env) -> None:
    store = await env.open()
    run, reg = await new_run(store, 200)
    w = reg.worker_id
    jobs = await claim(store, run.id, w, 200)
    before = store.writer.stats.batches
    intents = await asyncio.gather(*(store.record_intent(j, worker_id=w, cloud_offset_s=None) for j in jobs))
    ids = [i.attempt_id for i in intents if i is not None]
    assert len(set(ids)) == 200
    # 200 durable intents in far fewer transactions than writes
    assert store.writer.stats.batches - before < 50


async def test_intents_and_answers_of_one_batch_share_round_trips(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent intents and answers come out as if each had its own transaction (the guards hold per
    job), and on PostgreSQL the statements of a batch's intents (and of its answers) go in one pipeline
    each (``sql.pipelined``)."""
    pipelines: list[int] = []
    real = store_sql._PgTx.fetchone_each

    async def spy(self: Any, sql: str, many: Sequence[Any]) -> list[tuple[Any, ...]]:
        pipelines.append(len(many))
        return await real(self, sql, many)

    monkeypatch.setattr(store_sql._PgTx, "fetchone_each", spy)
    store = await env.open()
    run, reg = await new_run(store, 40)
    w = reg.worker_id
    jobs = await claim(store, run.id, w, 40)
    moved = jobs[::8]  # their guard must lose: flagged after the claim, before the intent
    for j in moved:
        assert await store.move(j, flag(), worker_id=w)
    intents = await asyncio.gather(*(store.record_intent(j, worker_id=w, cloud_offset_s=1.5) for j in jobs))
    lost = {j.id for j, i in zip(jobs, intents, strict=True) if i is None}
    assert lost == {j.id for j in moved}
    sent = [(j, i) for j, i in zip(jobs, intents, strict=True) if i is not None]
    assert len({i.attempt_id for _, i in sent}) == 35 and all(i.number == 1 for _, i in sent)
    won = await asyncio.gather(
        *(
            store.record_answer(
                replace(j, status=S.IN_FLIGHT),
                i.attempt_id,
                ACCEPTED,
                workflows=[NewWorkflow(f"wf-{j.id}", "ACCEPT", instance_id=j.instance_id)],
                move=Move(frm=S.IN_FLIGHT, to=S.ACCEPTED),
                worker_id=w,
            )
            for j, i in sent
        )
    )
    assert all(won)
    by_status = await rows(store, "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
    assert [(str(st), int(n)) for st, n in by_status] == [("accepted", 35), ("flagged", 5)]
    recorded = await rows(
        store,
        "SELECT a.job_id, a.outcome, w.workflow_id FROM attempts a JOIN workflows w ON w.attempt_id = a.id",
    )
    assert sorted((int(j), str(o), str(wf)) for j, o, wf in recorded) == sorted(
        (j.id, "accepted", f"wf-{j.id}") for j, _ in sent
    )
    moves = [e for e in await events(store, run.id) if e[3] in ("in_flight", "accepted")]
    assert len(moves) == 70  # each intent's and each answer's move, once
    if env.backend == "postgresql":
        # 35 intents and 35 answers in a few pipelines, not one round trip each
        assert sum(pipelines) == 75 and len(pipelines) < 20 and max(pipelines) > 1, pipelines


async def test_a_pipelined_statement_without_its_row_is_replayed_op_by_op(env: Env) -> None:
    """A pipelined op whose statement returns no row breaks the pipeline's contract: its batch is replayed
    op by op, where each op sees its own answer, so the results are still right."""
    store = await env.open()
    run, _ = await new_run(store, 1)

    def read(run_id: int) -> Op[int | None]:
        async def op(tx: Tx) -> int | None:
            row = await tx.fetchone("SELECT id FROM runs WHERE id = :id", {"id": run_id})
            return None if row is None else int(row[0])

        return store_sql.pipelined(op)

    ops = [read(i) for i in (run.id, run.id + 1000, run.id)]
    if env.backend == "postgresql":
        # one transaction of the three: the pipeline has two rows for three runs, the batch fails...
        with pytest.raises(RuntimeError, match="returned 2 rows for 3 runs"):
            await store._backend.run_batch(ops)
    # ...and the writer, which replays a failed batch op by op, still gives each op its answer
    # (one connection, so that the three go in one batch, as they do under load)
    writer = GroupCommitWriter(FlakyBackend(store._backend))  # type: ignore[arg-type]
    writer.start()
    try:
        got = await asyncio.gather(*(writer.submit(op) for op in ops))
    finally:
        await writer.close()
    assert got == [run.id, None, run.id]
    assert writer.stats.retried_alone == (3 if env.backend == "postgresql" else 0)


async def test_a_pipeline_whose_rows_do_not_line_up_with_its_runs_fails(env: Env) -> None:
    """The driver returns a pipeline's rows as one list: a run with no row next to one with two must not
    pass each op the other's row. Each row must lead with its run's ``:id``."""
    if env.backend != "postgresql":
        pytest.skip("pipelines are PostgreSQL's (SQLite runs every statement in-process)")
    store = await env.open()
    sql = "SELECT CAST(:id AS bigint) FROM generate_series(1, CAST(:n AS int))"

    async def check(tx: Tx) -> list[tuple[Any, ...]]:
        return await tx.fetchone_each(sql, [{"id": 1, "n": 0}, {"id": 2, "n": 2}])  # type: ignore[attr-defined]

    with pytest.raises(RuntimeError, match="does not lead with its run's :id"):
        await store._backend.run_batch([check])

    async def aligned(tx: Tx) -> list[tuple[Any, ...]]:
        return await tx.fetchone_each(sql, [{"id": 1, "n": 1}, {"id": 2, "n": 1}])  # type: ignore[attr-defined]

    assert await store._backend.run_batch([aligned]) == [[(1,), (2,)]]


async def test_claims_and_permits_ask_for_the_run_lock_lane(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends hand claims and permits to the writer as run-lock ops: batched apart where batches
    commit in parallel, urgent where they do not (a claim is what idle workers wait for)."""
    store = await env.open()
    run, reg = await new_run(store, 2)
    asked: list[dict[str, Any]] = []
    real = store.writer.submit_soon

    def spy(op: Any, **kw: Any) -> Any:
        asked.append(kw)
        return real(op, **kw)

    monkeypatch.setattr(store.writer, "submit_soon", spy)
    await claim(store, run.id, reg.worker_id, 1)
    await store.try_send_slot(run.id, worker_id=reg.worker_id, count=10, period=1.0, cap=10, lease_s=30)
    assert [kw.get("run_lock") for kw in asked] == [True, True], asked


async def test_a_permit_is_stamped_when_the_run_lock_is_granted(env: Env) -> None:
    """A permit granted after a wait on the run's lock carries the time it was granted, not the time its
    batch began (else it could sit before permits granted during the wait)."""
    if env.backend != "postgresql":
        pytest.skip("the run's lock is PostgreSQL's advisory lock (SQLite has one writer)")
    import asyncpg

    from orchestrator.store.jobs import RUN_LOCK

    store = await env.open()
    run, reg = await new_run(store, 1)
    holder = await asyncpg.connect(env.url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", RUN_LOCK + run.id)
        waiting = asyncio.ensure_future(
            store.try_send_slot(run.id, worker_id=reg.worker_id, count=10, period=1.0, cap=10, lease_s=30)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        released_at = await holder.fetchval("SELECT clock_timestamp()")
        await tx.commit()
        slot, wait = await waiting
    finally:
        await holder.close()
    assert slot is not None and wait == 0
    ((at,),) = await rows(store, "SELECT at FROM send_log WHERE id = :id", id=slot)
    assert at >= released_at


class _FakeTx:
    """What ``_interleave`` drives pipelined ops against: records every statement it is asked."""

    dialect = "postgresql"

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.events: list[dict[str, Any]] = []
        self.calls: list[tuple[str, Any]] = []

    async def execute(self, sql: str, params: Any = None) -> int:
        self.calls.append(("execute", sql))
        return 1

    async def fetchone_each(self, sql: str, many: Sequence[Any]) -> list[tuple[Any, ...]]:
        self.calls.append(("pipeline", (sql, len(many))))
        return [(p["v"] * 10,) for p in many]

    def ts(self, value: Any) -> Any:
        return value

    def json(self, value: Any) -> Any:
        return value


async def test_interleave_groups_one_round_of_equal_statements_into_one_pipeline() -> None:
    """Each round: anything but fetchone one by one in op order, then the fetchone statements of one text
    in one pipeline; every op gets its own answer back and its own result out."""

    def op(v: int, extra: bool) -> Op[list[int]]:
        async def run(tx: Tx) -> list[int]:
            first = await tx.fetchone("SELECT :v", {"v": v})
            assert first is not None
            if extra:
                await tx.execute("UPDATE x SET y = 1", {"v": v})
            second = await tx.fetchone("SELECT :v + 1", {"v": v + 1})
            assert second is not None
            return [int(first[0]), int(second[0])]

        return run

    tx = _FakeTx()
    out = await store_sql._interleave(tx, [op(1, False), op(2, True), op(3, False)])  # type: ignore[arg-type]
    assert out == [[10, 20], [20, 30], [30, 40]]
    assert tx.calls == [
        ("pipeline", ("SELECT :v", 3)),
        # round 2: op 2's UPDATE alone, then ops 1 and 3 in one pipeline; op 2's SELECT comes next round
        ("execute", "UPDATE x SET y = 1"),
        ("pipeline", ("SELECT :v + 1", 2)),
        ("pipeline", ("SELECT :v + 1", 1)),
    ]


async def test_interleave_refuses_an_op_that_awaits_anything_but_its_transaction() -> None:
    async def sleeper(tx: Tx) -> None:
        await asyncio.sleep(0)

    closed: list[bool] = []

    async def polite(tx: Tx) -> None:
        try:
            await tx.fetchone("SELECT 1")
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="awaited something other than its transaction"):
        await store_sql._interleave(_FakeTx(), [polite, sleeper])  # type: ignore[arg-type]
    assert closed == [True]  # the other op was closed, not left suspended


class _ParallelBackend:
    """A backend with ``parallel`` connections that records each batch (its ops' names) and how many
    batches of run-lock ops ran at once."""

    dialect = "postgresql"

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel
        self.batches: list[list[str]] = []
        self.locking_now = 0
        self.locking_most = 0

    async def run_batch(self, ops: Sequence[Op[Any]]) -> list[Any]:
        names = [getattr(op, "__name__", "?") for op in ops]
        self.batches.append(names)
        locking = names[0].startswith("lock")
        if self.parallel > 1:  # one connection has no run-lock lane of its own
            assert all(n.startswith("lock") == locking for n in names), names  # never mixed
        if locking:
            self.locking_now += 1
            self.locking_most = max(self.locking_most, self.locking_now)
        await asyncio.sleep(0.01)
        if locking:
            self.locking_now -= 1
        return [await op(None) for op in ops]  # type: ignore[arg-type]

    async def close(self) -> None:
        return None


def _named(name: str) -> Op[str]:
    async def op(tx: Tx) -> str:
        return name

    op.__name__ = name
    return op


async def test_parallel_writer_batches_run_lock_ops_apart_one_batch_at_a_time() -> None:
    """With batches committing in parallel (PostgreSQL), claims and permits (``run_lock``) never share a
    batch with other ops and never commit two batches at once; the other ops are shared out over the free
    connections, never in a batch of intents. One connection (SQLite) keeps one lane for all urgent ops,
    and the other ops queued ride in their batch."""
    backend = _ParallelBackend(parallel=4)
    writer = GroupCommitWriter(backend)  # type: ignore[arg-type]
    writer.start()
    try:
        jobs = [writer.submit(_named(f"lock{i}"), run_lock=True) for i in range(12)]
        jobs += [writer.submit(_named(f"intent{i}"), urgent=True) for i in range(24)]
        jobs += [writer.submit(_named(f"answer{i}")) for i in range(8)]
        got = await asyncio.gather(*jobs)
    finally:
        await writer.close()
    assert got == [f"lock{i}" for i in range(12)] + [f"intent{i}" for i in range(24)] + [
        f"answer{i}" for i in range(8)
    ]
    assert backend.locking_most == 1
    locks = [b for b in backend.batches if b[0].startswith("lock")]
    assert len(locks) <= 2, locks  # queued together, committed together (the first may start alone)
    intents = [b for b in backend.batches if b[0].startswith("intent")]
    assert len(intents) >= 3 and max(len(b) for b in intents) <= 8, intents  # 24 over 3 free connections
    assert all(n.startswith("intent") for b in intents for n in b), intents  # answers go apart

    single = _ParallelBackend(parallel=1)
    single.dialect = "sqlite"
    writer = GroupCommitWriter(single)  # type: ignore[arg-type]
    writer.start()
    try:
        await asyncio.gather(
            *(writer.submit(_named(f"answer{i}")) for i in range(2)),
            *(writer.submit(_named(f"lock{i}"), run_lock=True) for i in range(3)),
            *(writer.submit(_named(f"lockish{i}"), urgent=True) for i in range(3)),
        )
    finally:
        await writer.close()
    urgent_first = ["lock0", "lock1", "lock2", "lockish0", "lockish1", "lockish2", "answer0", "answer1"]
    assert single.batches == [urgent_first]

    # at most `riders` ride along; on PostgreSQL none (the run lock is held for the whole commit)
    for dialect, riders, want in (
        ("sqlite", 2, [["intent0", "answer0", "answer1"], ["answer2", "answer3", "answer4"]]),
        ("postgresql", 2, [["intent0"], ["answer0", "answer1", "answer2", "answer3", "answer4"]]),
    ):
        one = _ParallelBackend(parallel=1)
        one.dialect = dialect
        writer = GroupCommitWriter(one, riders=riders)  # type: ignore[arg-type]
        writer.start()
        try:
            await asyncio.gather(
                *(writer.submit(_named(f"answer{i}")) for i in range(5)),
                writer.submit(_named("intent0"), urgent=True),
            )
        finally:
            await writer.close()
        assert one.batches == want, (dialect, one.batches)


class _TimedBackend:
    """One connection of ``dialect`` that commits at once and records (virtual) loop time and op names
    of each batch."""

    parallel = 1

    def __init__(self, dialect: str = "sqlite", *, inline: bool = False) -> None:
        self.dialect = dialect
        self.inline = inline
        self.batches: list[tuple[float, list[str]]] = []

    async def run_batch(self, ops: Sequence[Op[Any]]) -> list[Any]:
        self.batches.append((asyncio.get_running_loop().time(), [getattr(op, "__name__", "?") for op in ops]))
        return [await op(None) for op in ops]  # type: ignore[arg-type]

    async def close(self) -> None:
        return None


def test_gathering_a_small_urgent_batch_waits_for_the_intents_a_burst_of_answers_is_about_to_queue() -> None:
    """SQLite's writer thread: fewer than ``gather_below`` urgent ops wait ``gather_s`` for company (an
    intent queued 1 ms later shares the commit, and so do the answers queued meanwhile); as many as
    ``gather_below`` go at once, and so does a batch with as many answers queued as can ride; without
    gathering each intent is a commit of its own. A wait asked for on PostgreSQL is kept (nothing rides
    there, so the answer commits apart)."""

    async def scenario(gather_s: float | None, first: int, backend: _TimedBackend) -> None:
        writer = GroupCommitWriter(backend, gather_s=gather_s, gather_below=4)  # type: ignore[arg-type]
        writer.start()
        try:
            early = [writer.submit_soon(_named(f"intent{i}"), urgent=True) for i in range(first)]
            await asyncio.sleep(0.001)
            late = [writer.submit_soon(_named("late"), urgent=True), writer.submit_soon(_named("answer"))]
            await asyncio.gather(*early, *late)
        finally:
            await writer.close()

    gathered = _TimedBackend()
    run_virtual(lambda: scenario(0.002, 1, gathered))
    assert gathered.batches == [(0.002, ["intent0", "late", "answer"])]

    full = _TimedBackend()  # four queued: nothing to wait for
    run_virtual(lambda: scenario(0.002, 4, full))
    assert full.batches[0] == (0.0, ["intent0", "intent1", "intent2", "intent3"]), full.batches
    assert [names for _, names in full.batches[1:]] == [["late", "answer"]], full.batches

    asked = _TimedBackend("postgresql")  # off by default there, but a wait asked for is kept (no riders)
    run_virtual(lambda: scenario(0.002, 1, asked))
    assert asked.batches == [(0.002, ["intent0", "late"]), (0.002, ["answer"])]

    alone = _TimedBackend()
    run_virtual(lambda: scenario(0.0, 1, alone))
    assert alone.batches == [(0.0, ["intent0"]), (0.001, ["late", "answer"])]

    async def crowded(backend: _TimedBackend) -> None:
        # as many answers queued as can ride: the batch is full already, nothing to wait for
        writer = GroupCommitWriter(backend, gather_s=0.002, riders=3)  # type: ignore[arg-type]
        writer.start()
        try:
            answers = [writer.submit_soon(_named(f"answer{i}")) for i in range(3)]
            await asyncio.gather(writer.submit_soon(_named("intent0"), urgent=True), *answers)
        finally:
            await writer.close()

    full_of_riders = _TimedBackend()
    run_virtual(lambda: crowded(full_of_riders))
    assert full_of_riders.batches == [(0.0, ["intent0", "answer0", "answer1", "answer2"])]


def test_only_sqlite_on_its_writer_thread_gathers_by_default(tmp_path: Path) -> None:
    """The default ``gather_s``: 2 ms for SQLite's writer thread; none for PostgreSQL or an inline SQLite
    backend (a virtual-time loop, whose clock the wait would move)."""
    assert GroupCommitWriter(_TimedBackend("sqlite")).gather_s == SQLITE_GATHER_S == 0.002  # type: ignore[arg-type]
    assert GroupCommitWriter(_TimedBackend("sqlite", inline=True)).gather_s == 0.0  # type: ignore[arg-type]
    assert GroupCommitWriter(_TimedBackend("postgresql")).gather_s == 0.0  # type: ignore[arg-type]
    # the real backend says which it is (it connects only on its first batch)
    threaded = SqliteBackend(str(tmp_path / "t.db"))
    inline = SqliteBackend(str(tmp_path / "i.db"), inline=True)
    assert GroupCommitWriter(threaded).gather_s == SQLITE_GATHER_S
    assert GroupCommitWriter(inline).gather_s == 0.0


async def test_send_permits_keep_the_window_with_its_margin_and_the_cap(env: Env) -> None:
    """The run-wide gate's check-and-insert: ``count`` starts per ``period + margin``, at most ``cap``
    held, and a permit whose holder died (lease run out) no longer counts against the cap."""
    store = await env.open()
    run, reg = await new_run(store, 1)
    w = reg.worker_id
    # a margin far larger than the few ms between these calls, so the two cases cannot overlap
    window: dict[str, Any] = {"count": 3, "period": 1.0, "cap": 10, "lease_s": 30, "margin": 0.5}
    granted = [await store.try_send_slot(run.id, worker_id=w, **window) for _ in range(3)]
    assert all(slot is not None and wait == 0 for slot, wait in granted), granted
    slot, wait = await store.try_send_slot(run.id, worker_id=w, **window)
    assert slot is None
    # the oldest start leaves the window 1.5 s after it was granted, a few ms ago
    assert 1.0 < wait <= 1.5, wait
    without_margin = await store.try_send_slot(run.id, worker_id=w, **(window | {"margin": 0.0}))
    assert without_margin[0] is None and without_margin[1] <= 1.0, without_margin

    capped: dict[str, Any] = {"count": 100, "period": 1.0, "cap": 5, "lease_s": 30}
    held = [(await store.try_send_slot(run.id, worker_id=w, **capped))[0] for _ in range(2)]
    assert None not in held  # 3 + 2 = 5 held: the cap
    assert await store.try_send_slot(run.id, worker_id=w, **capped) == (None, 0.02)
    assert held[0] is not None
    await store.release_send_slot(held[0])
    assert (await store.try_send_slot(run.id, worker_id=w, **capped))[0] is not None

    # a holder that died: its lease ran out, so its permit is not "held" any more
    dead: dict[str, Any] = {"count": 100, "period": 1.0, "cap": 6, "lease_s": 0.0}
    assert (await store.try_send_slot(run.id, worker_id=w, **dead))[0] is not None
    assert (await store.try_send_slot(run.id, worker_id=w, **(dead | {"lease_s": 30})))[0] is not None


async def test_an_ask_marks_its_ended_permits_done_but_does_not_regrant_them(env: Env) -> None:
    """Permits whose calls ended ride on the next ask and are marked done in its transaction, whatever
    their lease (a call may outlive it). That ask's own cap check still counts them as held, so the places
    they free go to whichever process asks next (taking turns), not straight back to the asker. Only
    this run's permits are marked, once."""
    store = await env.open()
    run, reg = await new_run(store, 1)
    other, other_reg = await new_run(store, fleet(1, prefix="b"), inventory="other.yaml")
    w = reg.worker_id
    capped: dict[str, Any] = {"count": 100, "period": 1.0, "cap": 2, "lease_s": 30}
    first, wait = await store.try_send_slots(run.id, worker_id=w, want=2, **capped)
    assert len(first) == 2 and wait == 0
    (foreign,), _ = await store.try_send_slots(other.id, worker_id=other_reg.worker_id, **capped)
    # the ask that carries first[0] is still refused: its check counts first[0] as held
    refused = await store.try_send_slots(run.id, worker_id=w, release=[first[0], foreign, 10**9], **capped)
    assert refused == ([], 0.02)
    done = dict(await rows(store, "SELECT id, done_at FROM send_log WHERE run_id = :r", r=run.id))
    assert done[first[0]] is not None and done[first[1]] is None
    ((foreign_done,),) = await rows(store, "SELECT done_at FROM send_log WHERE id = :i", i=foreign)
    assert foreign_done is None  # another run's permit is never marked done by this run's ask
    # the next ask, by any process of the run, gets the place
    granted, _ = await store.try_send_slots(run.id, worker_id="another-worker", want=2, **capped)
    assert len(granted) == 1
    # released again (the ask and the flusher both carried it): the first end is kept
    await env.later(1)
    await store.release_send_slots([first[0]])
    again = dict(await rows(store, "SELECT id, done_at FROM send_log WHERE run_id = :r", r=run.id))
    assert again[first[0]] == done[first[0]]
    # a permit whose lease ran out before its call ended is marked done too (not left in the held index)
    (short,), _ = await store.try_send_slots(
        other.id, worker_id=other_reg.worker_id, **(capped | {"lease_s": 0})
    )
    await store.try_send_slots(other.id, worker_id=other_reg.worker_id, release=[short], **capped)
    ((short_done,),) = await rows(store, "SELECT done_at FROM send_log WHERE id = :i", i=short)
    assert short_done is not None
    # an ask refused by the window (not the cap) still marks its releases done
    full: dict[str, Any] = {"count": 1, "period": 60.0, "cap": 10, "lease_s": 30}
    refused_by_window = await store.try_send_slots(run.id, worker_id=w, release=[first[1]], **full)
    assert refused_by_window[0] == [] and refused_by_window[1] > 1
    ((second_done,),) = await rows(store, "SELECT done_at FROM send_log WHERE id = :i", i=first[1])
    assert second_done is not None


async def test_a_sender_cancelled_while_its_ask_commits_leaves_no_permit_held(env: Env) -> None:
    """A sender cancelled (a stop, Ctrl-C) after its ask was queued: the ask still commits and grants a
    permit. The gate releases what that ask granted, so it does not count against the run's cap until its
    lease runs out; ``close()`` waits for such an ask. Without the hand-back the permit stays held."""
    from orchestrator.gate import SharedGate
    from orchestrator.limiter import Rate

    store = await env.open()
    run, reg = await new_run(store, 1)
    gate = SharedGate(store, run.id, reg.worker_id, Rate(100, 1.0), 2, lease_s=300)

    async def send() -> None:
        async with gate.slot():
            raise AssertionError("the sender was cancelled before its permit came")

    sender = asyncio.create_task(send())
    await asyncio.sleep(0)  # the sender is waiting for its ask, which commits whatever becomes of it
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
    await gate.close()
    for _ in range(200):  # the ask commits in the writer whether or not anyone waits for it
        granted = await rows(store, "SELECT id, done_at FROM send_log WHERE run_id = :r", r=run.id)
        if granted:
            break
        await asyncio.sleep(0.01)
    assert len(granted) == 1, granted
    assert granted[0][1] is not None, "a permit granted to a cancelled sender is still held"


async def test_the_held_permit_count_reads_only_held_permits(env: Env) -> None:
    """Every permit check counts the run's held permits under the run's lock; the log also keeps every
    start of the last minutes (thousands at a high rate). The count is planned on the partial index of held
    permits (migration 0007), not on a walk over the run's log, so its cost stays flat as the log grows."""
    from orchestrator.store.permits import HELD_COUNT

    store = await env.open()
    run, reg = await new_run(store, 1)
    now = datetime.now(UTC)

    async def fill(tx: Tx) -> None:
        rows = [
            {"run": run.id, "at": tx.ts(now), "w": reg.worker_id, "until": tx.ts(now), "done": tx.ts(now)}
            for _ in range(5000)
        ]
        rows += [dict(r, done=None) for r in rows[:10]]
        await tx.executemany(
            "INSERT INTO send_log (run_id, at, worker, lease_expires_at, done_at)"
            " VALUES (:run, :at, :w, :until, :done)",
            rows,
        )
        await tx.execute("ANALYZE send_log")

    await store.writer.submit(fill)
    params = {"run": run.id, "now": now - timedelta(seconds=1)}
    async with store.read() as conn:
        plan = await conn.fetch(
            ("EXPLAIN QUERY PLAN " if env.backend == "sqlite" else "EXPLAIN ") + HELD_COUNT,
            params,
        )
        ((held,),) = await conn.fetch(HELD_COUNT, params)
    assert held == 10
    text = " ".join(str(col) for row in plan for col in row)
    assert "ix_send_log_held" in text, text


async def test_writer_replays_a_failing_batch_op_by_op(env: Env) -> None:
    """One bad op (a bug, a constraint) fails alone: its batch neighbours commit."""
    store = await env.open()
    run, _ = await new_run(store, 1)

    def named(name: str) -> Op[str]:
        async def op(tx: Tx) -> str:
            await tx.execute(
                "UPDATE runs SET stop_reason = COALESCE(stop_reason, '') || CAST(:n AS TEXT) WHERE id = :id",
                {"n": name, "id": run.id},
            )
            return name

        return op

    async def bad(tx: Tx) -> str:
        await tx.execute("UPDATE runs SET stop_reason = 'bad' WHERE id = :id", {"id": run.id})
        raise ValueError("a bug in one op")

    # one connection, so that the three share a batch (on PostgreSQL the store's own writer would share
    # them out over its free connections, a batch each)
    writer = GroupCommitWriter(FlakyBackend(store._backend))  # type: ignore[arg-type]
    writer.start()
    try:
        results = await asyncio.gather(
            writer.submit(named("a")), writer.submit(bad), writer.submit(named("b")), return_exceptions=True
        )
    finally:
        await writer.close()
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], ValueError)
    assert writer.stats.retried_alone == 3
    got = await store.get_run(run.id)
    assert got is not None and got.stop_reason == "ab"  # the bad op's write was rolled back


class FlakyBackend:
    """A real backend behind a switch: ``DatabaseDown`` while ``down`` (as a lost connection would)."""

    def __init__(self, real: Any, down: int = 0) -> None:
        self.real = real
        self.down = down
        self.dialect = real.dialect
        self.inline = getattr(real, "inline", False)  # the writer's gathering follows the real backend
        self.calls = 0

    async def run_batch(self, ops: Sequence[Op[Any]]) -> list[Any]:
        self.calls += 1
        if self.down > 0:
            self.down -= 1
            raise DatabaseDown("PostgreSQL: ConnectionRefusedError: connection refused")
        result: list[Any] = await self.real.run_batch(ops)
        return result

    async def close(self) -> None:
        await self.real.close()


async def _select_one(tx: Tx) -> int:
    row = await tx.fetchone("SELECT 1")
    assert row is not None
    return int(row[0])


async def test_writer_waits_out_a_short_outage(tmp_path: Path, sqlite_template: Path) -> None:
    path = tmp_path / "jobs.db"
    shutil.copyfile(sqlite_template, path)
    backend = FlakyBackend(SqliteBackend(str(path)), down=3)
    seen: list[tuple[str, str]] = []
    writer = GroupCommitWriter(backend, outage_timeout=30.0, on_outage=lambda e, c: seen.append((e, c)))  # type: ignore[arg-type]
    writer.start()
    try:
        assert await writer.submit(_select_one) == 1
        assert backend.calls == 4 and writer.stats.outages == 1
        assert [e for e, _ in seen] == ["db.down", "db.recovered"]
        assert "connection refused" in seen[0][1]
        assert await writer.submit(_select_one) == 1  # and it goes on
    finally:
        await writer.close()
        await backend.close()


async def test_writer_gives_up_after_the_outage_budget(tmp_path: Path, sqlite_template: Path) -> None:
    path = tmp_path / "jobs.db"
    shutil.copyfile(sqlite_template, path)
    backend = FlakyBackend(SqliteBackend(str(path)), down=10**6)
    writer = GroupCommitWriter(backend, outage_timeout=0.3)  # type: ignore[arg-type]
    writer.start()
    try:
        results = await asyncio.gather(
            writer.submit(_select_one), writer.submit(_select_one), return_exceptions=True
        )
        for r in results:
            assert isinstance(r, DatabaseUnavailable), r
            assert "unreachable" in str(r) and "connection refused" in str(r)
        # later operations fail at once, naming the cause, without waiting another budget
        calls = backend.calls
        with pytest.raises(DatabaseUnavailable):
            await writer.submit(_select_one)
        assert backend.calls == calls
    finally:
        await writer.close()
        await backend.close()


@pytest.fixture
def quick_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite gives up on a lock after 50 ms instead of 5 s (the same classification, sooner)."""
    monkeypatch.setattr(store_sql, "SQLITE_BUSY_MS", 50)


async def test_a_locked_sqlite_file_is_an_outage_that_is_waited_out(
    tmp_path: Path, sqlite_template: Path, quick_busy: None
) -> None:
    path = tmp_path / "jobs.db"
    shutil.copyfile(sqlite_template, path)
    store = await open_store(f"sqlite:///{path}", outage_timeout=30.0)
    seen: list[str] = []
    store.set_outage_hook(lambda event, cause: seen.append(f"{event}: {cause}"))
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        pending = asyncio.ensure_future(new_run(store, 2))
        for _ in range(500):  # the hook is called from the writer's retry loop: look until it was
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen[0].startswith("db.down: SQLite:") and "locked" in seen[0]
        assert not pending.done()
        locker.execute("ROLLBACK")
        run, _ = await asyncio.wait_for(pending, 10)
        assert len(await store.jobs(run.id)) == 2
        assert seen[-1].startswith("db.recovered")
    finally:
        locker.close()
        await store.close()


async def test_a_sqlite_file_locked_past_the_budget_stops_the_writer(
    tmp_path: Path, sqlite_template: Path, quick_busy: None
) -> None:
    path = tmp_path / "jobs.db"
    shutil.copyfile(sqlite_template, path)
    store = await open_store(f"sqlite:///{path}", outage_timeout=0.4)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(DatabaseUnavailable, match="locked"):
            await new_run(store, 2)
        locker.execute("ROLLBACK")
        with pytest.raises(DatabaseUnavailable):
            await store.latest_run()
    finally:
        locker.close()
        await store.close()
    ((n,),) = sqlite3.connect(path).execute("SELECT count(*) FROM runs").fetchall()
    assert n == 0


def test_sqlite_params_converts_only_what_sqlite3_cannot_bind() -> None:
    """Datetimes become the store's UTC text and booleans 0/1; everything else is bound as it is. A
    mapping with nothing to convert is passed through as it is (no copy per statement)."""
    from orchestrator.store.sql import sqlite_params

    at = datetime(2026, 12, 1, 8, 30, 0, 5, tzinfo=timezone(timedelta(hours=8)))
    plain = {"id": 7, "me": "w-1", "off": 0.25, "none": None, "status": JobStatus.PENDING}
    assert sqlite_params(plain) is plain
    mixed = {**plain, "at": at, "flag": True, "off_flag": False}
    out = sqlite_params(mixed)
    assert out == {**plain, "at": "2026-12-01 00:30:00.000005", "flag": 1, "off_flag": 0}
    assert type(out["flag"]) is int
    assert mixed["at"] is at  # the caller's mapping is not changed
    assert sqlite_params(None) == {} and sqlite_params({}) == {}
