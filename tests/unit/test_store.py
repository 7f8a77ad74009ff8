"""The persistence gateway on a real SQLite file: guarded moves, claims, leases, the runner lock."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from orchestrator.states import ALLOWED, TERMINAL, IllegalMove, JobStatus, check_move, sources_of
from orchestrator.store import JobStore, NewJob, NewWorkflow, RunLocked, open_store
from orchestrator.store.store import new_worker_id, utcnow


def fleet(n: int, per_instance: int = 1) -> list[NewJob]:
    return [
        NewJob(
            project_id="0" * 32,
            instance_id=f"{i // per_instance:032x}in07",
            proxy_id=f"{i:032x}po01",
            endpoint="http://127.0.0.1:9",
            target_version="2.24.03.000",
            source_version="2.23.12.000",
        )
        for i in range(n)
    ]


async def make(tmp_path: Path, n: int = 10, per_instance: int = 1) -> tuple[JobStore, int]:
    store = await open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    run = await store.create_run(
        name="t",
        inventory_path="-",
        inventory_sha256="0" * 64,
        options={},
        jobs=fleet(n, per_instance),
        now=utcnow(),
    )
    return store, run.id


def test_state_table_is_consistent() -> None:
    for st in TERMINAL:
        assert ALLOWED[st] <= {JobStatus.PENDING}
    assert JobStatus.SUCCEEDED not in sources_of(JobStatus.PENDING)
    with pytest.raises(IllegalMove):
        check_move(JobStatus.SUCCEEDED, JobStatus.PENDING)
    with pytest.raises(IllegalMove):
        check_move(JobStatus.ACCEPTED, JobStatus.IN_FLIGHT)  # never resend a running upgrade


async def test_two_workers_never_claim_the_same_job(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 50)
    now = utcnow()
    a, b = new_worker_id(), new_worker_id()
    for w in (a, b):
        await store.register(run, worker_id=w, role="worker", now=now, lease_s=30, exclusive=False)
    got_a, got_b = await asyncio.gather(
        store.claim(run, worker_id=a, limit=30, now=now, lease_s=30, track=True),
        store.claim(run, worker_id=b, limit=30, now=now, lease_s=30, track=True),
    )
    ids_a, ids_b = {j.id for j in got_a}, {j.id for j in got_b}
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == 50
    await store.close()


async def test_one_upgrade_per_instance_at_a_time(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 6, per_instance=3)  # 2 instances x 3 proxies
    now = utcnow()
    w = new_worker_id()
    await store.register(run, worker_id=w, role="runner", now=now, lease_s=30, exclusive=True)
    first = await store.claim(run, worker_id=w, limit=10, now=now, lease_s=30, track=True)
    assert len(first) == 2 and len({j.instance_id for j in first}) == 2
    # while those are claimed (and then in flight), their siblings stay unclaimed
    assert await store.claim(run, worker_id=w, limit=10, now=now, lease_s=30, track=True) == []
    aid = await store.record_intent(first[0], worker_id=w, now=now)
    assert aid is not None
    await store.record_answer(
        job_id=first[0].id, attempt_id=aid, now=now, outcome="flag", move_to=JobStatus.FLAGGED, worker_id=w
    )
    nxt = await store.claim(run, worker_id=w, limit=10, now=now, lease_s=30, track=True)
    assert [j.instance_id for j in nxt] == [first[0].instance_id]
    await store.close()


async def test_intent_guard_and_answer_are_atomic(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 1)
    now = utcnow()
    w = new_worker_id()
    await store.register(run, worker_id=w, role="runner", now=now, lease_s=30, exclusive=True)
    (job,) = await store.claim(run, worker_id=w, limit=1, now=now, lease_s=30, track=True)
    aid = await store.record_intent(job, worker_id=w, now=now)
    assert aid is not None
    # the same (stale) job row cannot produce a second intent: no second call can leave
    assert await store.record_intent(job, worker_id=w, now=now) is None
    ok = await store.record_answer(
        job_id=job.id,
        attempt_id=aid,
        now=now,
        outcome="accepted",
        http_status=200,
        workflows=[NewWorkflow("w1", "ACCEPT"), NewWorkflow("w2", "REJECT", "insufficient subnet ip")],
        move_to=JobStatus.ACCEPTED,
        worker_id=w,
    )
    assert ok
    assert [w.state for w in await store.workflows_of(job.id)] == ["ACCEPT", "REJECT"]
    # a second answer to the same attempt loses the guard (job no longer in flight)
    again = await store.record_answer(
        job_id=job.id, attempt_id=aid, now=now, outcome="fail", move_to=JobStatus.FAILED, worker_id=w
    )
    assert not again
    assert (await store.get_job(job.id)).status is JobStatus.ACCEPTED  # type: ignore[union-attr]
    await store.close()


async def test_expired_in_flight_lease_becomes_unknown(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 1)
    now = utcnow()
    dead, alive = new_worker_id(), new_worker_id()
    await store.register(run, worker_id=dead, role="worker", now=now, lease_s=1, exclusive=False)
    (job,) = await store.claim(run, worker_id=dead, limit=1, now=now, lease_s=1, track=True)
    assert await store.record_intent(job, worker_id=dead, now=now)
    later = now + timedelta(seconds=5)
    await store.register(run, worker_id=alive, role="worker", now=later, lease_s=30, exclusive=False)
    (taken,) = await store.claim(run, worker_id=alive, limit=1, now=later, lease_s=30, track=True)
    assert taken.id == job.id and taken.status is JobStatus.UNKNOWN
    await store.close()


async def test_runner_lock_refuses_live_holder_takes_over_dead_one(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 2)
    now = utcnow()
    holder = new_worker_id()
    await store.register(run, worker_id=holder, role="runner", now=now, lease_s=30, exclusive=True)
    with pytest.raises(RunLocked) as exc:
        await store.register(
            run, worker_id=new_worker_id(), role="runner", now=now, lease_s=30, exclusive=True
        )
    assert "held by pid" in str(exc.value)
    # a joined worker is not refused
    await store.register(run, worker_id=new_worker_id(), role="worker", now=now, lease_s=30, exclusive=False)
    # once the lease ran out the lock is taken over and the holder learns it at its next heartbeat
    later = now + timedelta(seconds=31)
    taken = await store.register(
        run, worker_id=new_worker_id(), role="runner", now=later, lease_s=30, exclusive=True
    )
    assert holder in taken
    assert not await store.heartbeat(holder, later, 30)
    await store.close()


async def test_dead_pid_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 1)
    now = utcnow()
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await p.wait()  # a pid that existed on this host and is gone now
    import socket

    from orchestrator.store.models import Worker

    async def op_insert() -> None:
        def op(s):  # type: ignore[no-untyped-def]
            s.add(
                Worker(
                    id="ghost",
                    run_id=run,
                    role="runner",
                    host=socket.gethostname(),
                    pid=p.pid,
                    started_at=now,
                    heartbeat_at=now,
                    lease_expires_at=now + timedelta(hours=1),
                    claimed=0,
                )
            )

        await store.writer.submit(op)

    await op_insert()
    taken = await store.register(
        run, worker_id=new_worker_id(), role="runner", now=now, lease_s=30, exclusive=True
    )
    assert taken == ["ghost"]
    await store.close()


async def test_requeue_moves_only_chosen_problem_jobs(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 3)
    now = utcnow()
    w = new_worker_id()
    await store.register(run, worker_id=w, role="runner", now=now, lease_s=30, exclusive=True)
    jobs = await store.claim(run, worker_id=w, limit=3, now=now, lease_s=30, track=True)
    for job, to in zip(jobs, (JobStatus.FLAGGED, JobStatus.FAILED, JobStatus.SKIPPED), strict=True):
        assert await store.move(job.id, frm=[JobStatus.PENDING], to=to, now=now, release=w)
    n = await store.requeue(run, statuses=[JobStatus.FLAGGED], proxy_ids=None, now=now)
    assert n == 1
    counts = await store.counts(run)
    assert counts[JobStatus.PENDING] == 1 and counts[JobStatus.FAILED] == 1 and counts[JobStatus.SKIPPED] == 1
    await store.close()


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    store, run = await make(tmp_path, 200)
    now = utcnow()
    w = new_worker_id()
    await store.register(run, worker_id=w, role="runner", now=now, lease_s=30, exclusive=True)
    jobs = await store.claim(run, worker_id=w, limit=200, now=now, lease_s=30, track=True)
    before = store.writer.stats.batches
    ids = await asyncio.gather(*(store.record_intent(j, worker_id=w, now=now) for j in jobs))
    assert all(ids) and len(set(ids)) == 200
    # 200 durable intents in far fewer transactions than writes
    assert store.writer.stats.batches - before < 50
    await store.close()


async def test_send_permits_keep_the_window_with_its_margin_and_the_cap(tmp_path: Path) -> None:
    """The run-wide gate's check-and-insert: ``count`` starts per ``period + margin``, at most ``cap``
    held, and a permit whose holder died (lease run out) no longer counts against the cap."""
    store, run = await make(tmp_path, 1)
    w = new_worker_id()
    try:
        # a margin far larger than the few ms between these calls, so the two cases cannot overlap
        window = {"count": 3, "period": 1.0, "cap": 10, "lease_s": 30, "margin": 0.5}
        granted = [await store.try_send_slot(run, worker_id=w, **window) for _ in range(3)]
        assert all(slot is not None and wait == 0 for slot, wait in granted), granted
        slot, wait = await store.try_send_slot(run, worker_id=w, **window)
        assert slot is None
        # the oldest start leaves the window 1.5 s after it was granted, a few ms ago
        assert 1.0 < wait <= 1.5, wait
        without_margin = await store.try_send_slot(run, worker_id=w, **(window | {"margin": 0.0}))
        assert without_margin[0] is None and without_margin[1] <= 1.0, without_margin

        capped = {"count": 100, "period": 1.0, "cap": 5, "lease_s": 30}
        held = [(await store.try_send_slot(run, worker_id=w, **capped))[0] for _ in range(2)]
        assert None not in held  # 3 + 2 = 5 held: the cap
        assert await store.try_send_slot(run, worker_id=w, **capped) == (None, 0.02)
        assert held[0] is not None
        await store.release_send_slot(held[0])
        assert (await store.try_send_slot(run, worker_id=w, **capped))[0] is not None

        # a holder that died: its lease ran out, so its permit is not "held" any more
        dead = {"count": 100, "period": 1.0, "cap": 6, "lease_s": 0.0}
        assert (await store.try_send_slot(run, worker_id=w, **dead))[0] is not None
        assert (await store.try_send_slot(run, worker_id=w, **(dead | {"lease_s": 30})))[0] is not None
    finally:
        await store.close()
