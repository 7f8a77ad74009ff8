"""The reconcile step (steps/reconcile.py) on virtual time against the in-process fake cloud.

What happened to an upgrade call whose answer proved nothing: its workflow found (on the cloud's clock,
measured from ``Date`` headers, whatever our clock's skew), the proxy at target with no workflow listed,
candidates it cannot tell apart (flag), a listing too long to read (flag), reads that fail (look again,
then flag, never resend on that basis), and "nothing started" concluded only once the intent can no
longer leave, its timeout passed and the cloud had its grace, then resent a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cloud.fake import Fault
from orchestrator.policy.decide import NOTHING_STARTED_HINT, NOTHING_STARTED_RULE
from orchestrator.simulator.fleet import JOB_NAME
from orchestrator.states import JobStatus
from orchestrator.steps.reconcile import LOOK_HINT, MAX_PAGES, PAGE
from tests.unit.steps_kit import (
    INST_A,
    INST_B,
    NEW,
    OLD,
    P1,
    P2,
    Bench,
    advance,
    make_options,
    proxy,
    run_bench,
    upgrade_step,
)

S = JobStatus
WAITING = "the answer proved nothing: waiting before concluding"


def listing(*rows: dict[str, Any], total: int | None = None) -> Fault:
    """An ``immediate-jobs`` page with exactly these rows (a ``Fault.raw`` answer; the fleet is not asked)."""
    body = {
        "jobs": list(rows),
        "total_count": len(rows) if total is None else total,
        "action_names": [JOB_NAME],
    }
    return Fault.raw(200, json.dumps(body).encode(), applied=False)


def row(
    job_id: str, created: float, *, instance: str = INST_A, name: str = JOB_NAME, fields: str = "{}"
) -> dict[str, Any]:
    """One ``immediate-jobs`` row created at ``created`` (the cloud's epoch seconds)."""
    return {
        "instance_id": instance,
        "job_id": job_id,
        "job_name": name,
        "status": "Running",
        "created_time": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(created)),
        "extend_fields": fields,
    }


async def lost_call(b: Bench, *, applied: bool = True) -> None:
    """The upgrade step, its answer lost: the job is left ``unknown``."""
    b.inject("upgrade", Fault.lost(applied=applied))
    job = await b.step()
    assert (job.status, job.rule) == (S.UNKNOWN, "default:transport-answer-lost")


# ------------------------------------------------------------------------------- the workflow found
@pytest.mark.parametrize("skew_s", [-900.0, -180.0, -61.0, 0.0, 61.0, 180.0, 900.0])
@pytest.mark.parametrize(
    "preflight", [True, False], ids=["measured-before-the-call", "measured-by-reconcile"]
)
def test_the_lost_calls_workflow_is_found_on_the_clouds_clock_whatever_our_skew(
    tmp_path: Path, skew_s: float, preflight: bool
) -> None:
    """Issue 11 kind 3: our clock (the job table's and the client's) is ``skew_s`` off the cloud's. The
    offset is measured from the answers' ``Date`` headers (before the call by preflight, or by
    reconcile's own version read) and the workflow is looked for on the cloud's clock."""

    async def body(b: Bench) -> None:
        await lost_call(b)
        (attempt,) = await b.attempts()
        if preflight:
            assert attempt.cloud_offset_s == pytest.approx(-skew_s, abs=1.0)
        else:
            assert attempt.cloud_offset_s is None  # nothing answered before the call
        assert b.cloud.clock.offset_s is None or b.cloud.clock.offset_s == pytest.approx(-skew_s, abs=1.0)
        job = await b.step()
        assert b.steps == ["upgrade", "reconcile"]
        assert b.cloud.clock.offset_s == pytest.approx(-skew_s, abs=1.0)
        assert (job.status, job.rule) == (S.ACCEPTED, "reconcile:found-workflow")
        (wid,) = b.issued()
        assert job.reason == f"the answer proved nothing; found workflow {wid} in the cloud's recent jobs"
        assert [(w.workflow_id, w.source, w.state) for w in await b.workflows()] == [
            (wid, "reconciled", "ACCEPT")
        ]
        job = await b.settle()
        assert job.status is S.SUCCEEDED and len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body, skew_s=skew_s, options=make_options(preflight=preflight))


def test_the_workflows_of_every_node_are_found(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b)
        job = await b.step()
        assert job.status is S.ACCEPTED
        assert sorted(await b.workflow_ids()) == sorted(b.issued()) and len(b.issued()) == 3
        job = await b.settle()
        assert job.status is S.SUCCEEDED

    run_bench(tmp_path, body, proxies=[proxy(P1, nodes=3)])


def test_another_proxys_workflow_on_the_same_instance_is_never_taken(tmp_path: Path) -> None:
    """P2's accepted workflow on the same instance, created in the same seconds, is about another proxy
    (its id in the job's fields): reconcile of P1 waits and concludes nothing started."""

    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.lost(applied=False), pid=P1)
        job = await b.step(P1)
        assert job.status is S.UNKNOWN
        b.fleet.upgrade(b.fleet.project_id, INST_A, P2, {"source_version": OLD, "target_version": NEW})
        job = await b.step(P1)
        assert (job.status, job.reason) == (S.UNKNOWN, WAITING)
        job = await b.step(P1)
        assert (job.status, job.rule) == (S.RETRY_WAIT, NOTHING_STARTED_RULE)
        assert await b.workflow_ids(P1) == []

    run_bench(tmp_path, body, proxies=[proxy(P1), proxy(P2)])


def test_a_sender_that_stopped_after_its_call_left_is_reconciled_by_the_process_that_takes_over(
    tmp_path: Path,
) -> None:
    """Process A's call reached the cloud (applied) and A stopped before the answer (killed while
    waiting); once A's lease ran out process B claims the job (unknown), finds the workflow and tracks
    it: never resent."""

    async def body(a: Bench) -> None:
        a.inject("upgrade", Fault.lost(timeout=True))  # the answer would take 30 s: A is gone before
        job = await a.claim()
        sender = asyncio.create_task(upgrade_step(a.rt, job))
        await advance(5.0)
        assert a.fleet.proxies[P1].upgrade_calls == 1 and (await a.job()).status is S.IN_FLIGHT
        sender.cancel()  # A dies: nothing more is written by it
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        b = await a.other_process()
        await advance(a.rt.options.lease)
        taken = await b.claim()
        assert taken.status is S.UNKNOWN and taken.intent_deadline is not None
        await b.run_step(taken)
        job = await b.job()
        assert (job.status, job.rule) == (S.ACCEPTED, "reconcile:found-workflow")
        assert await a.workflow_ids() == a.issued()
        (attempt,) = await a.attempts()
        assert (attempt.outcome, attempt.http_status, attempt.worker) == ("reconciled", None, a.rt.worker_id)
        job = await b.settle()
        assert job.status is S.SUCCEEDED and a.fleet.proxies[P1].upgrade_calls == 1

    run_bench(tmp_path, body)


# ------------------------------------------------------------------------- what the listing shows
def test_a_listing_is_read_page_by_page_until_the_workflow_is_found(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b)
        (wid,) = b.issued()
        now = b.fleet.clock()
        others = [row(f"other-{i}", now, instance=INST_B) for i in range(PAGE)]
        mine = row(wid, now, fields=json.dumps({"proxy_id": P1, "node": 0}))
        b.inject(
            "immediate_jobs", listing(*others, total=PAGE + 11), listing(*others[:10], mine, total=PAGE + 11)
        )
        job = await b.step()
        assert (job.status, job.rule) == (S.ACCEPTED, "reconcile:found-workflow")
        assert await b.workflow_ids() == [wid]
        assert len(b.calls("immediate_jobs")) == 2

    run_bench(tmp_path, body)


MATCHES = {
    # rows on our instance created after the call; ours is told by our proxy id, else by one job name
    "by our proxy id": (lambda t: [row("w-1", t, fields=json.dumps({"proxy_id": P1}))], S.ACCEPTED, ["w-1"]),
    "by one proxy job name": (lambda t: [row("w-1", t)], S.ACCEPTED, ["w-1"]),
    "ours among another proxy's": (
        lambda t: [row("w-2", t, fields=json.dumps({"proxy_id": P2})), row("w-1", t, fields=f"proxy {P1}")],
        S.ACCEPTED,
        ["w-1"],
    ),
    "another proxy's only": (lambda t: [row("w-2", t, fields=json.dumps({"proxy_id": P2}))], S.UNKNOWN, []),
    "another instance's only": (lambda t: [row("w-3", t, instance=INST_B)], S.UNKNOWN, []),
    "created before the call": (lambda t: [row("w-4", t - 600)], S.UNKNOWN, []),
    "two we cannot tell apart": (lambda t: [row("w-5", t), row("w-6", t)], S.FLAGGED, []),
    "a job about no proxy": (lambda t: [row("w-7", t, name="Backup")], S.FLAGGED, []),
}


@pytest.mark.parametrize(("rows", "status", "recorded"), list(MATCHES.values()), ids=list(MATCHES))
def test_what_the_listing_shows_decides_found_wait_or_flag(
    tmp_path: Path, rows: Any, status: JobStatus, recorded: list[str]
) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b, applied=False)
        b.inject("immediate_jobs", listing(*rows(b.fleet.clock())))
        job = await b.step()
        assert job.status is status
        assert await b.workflow_ids() == recorded
        if status is S.ACCEPTED:
            assert job.rule == "reconcile:found-workflow"
        elif status is S.UNKNOWN:
            assert job.reason == WAITING
        else:
            assert (job.rule, job.counts_failure) == ("reconcile:ambiguous", True)
            assert job.reason is not None and "new jobs that may be this upgrade (w-" in job.reason
            assert job.hint is not None and "--flagged" in job.hint
        assert len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body)


def test_a_workflow_another_job_already_owns_is_never_taken(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.lost(applied=False), pid=P1)
        assert (await b.step(P1)).status is S.UNKNOWN
        job2 = await b.step(P2)  # P2's call accepted: its workflow is recorded on P2's job
        assert job2.status is S.ACCEPTED
        (wid2,) = await b.workflow_ids(P2)
        b.inject("immediate_jobs", listing(row(wid2, b.fleet.clock())))  # a bare row: no proxy id, one name
        job = await b.step(P1)
        assert (job.status, job.reason) == (S.UNKNOWN, WAITING)
        assert await b.workflow_ids(P1) == []

    run_bench(tmp_path, body, fleet={INST_A: [proxy(P1)], INST_B: [proxy(P2)]})


def test_a_listing_too_long_to_read_is_flagged_not_resent(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b, applied=False)
        t = b.fleet.clock()
        page = [row(f"o-{i}", t, instance=INST_B) for i in range(PAGE)]
        b.inject("immediate_jobs", *[listing(*page, total=10 * PAGE * MAX_PAGES)] * MAX_PAGES)
        job = await b.step()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "reconcile:listing-too-long", True)
        assert job.reason is not None and f"over {PAGE * MAX_PAGES} jobs" in job.reason
        assert job.hint == LOOK_HINT
        assert len(b.calls("immediate_jobs")) == MAX_PAGES
        assert len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body)


# ------------------------------------------------------------------------------- at target, no workflow
def test_at_target_with_no_workflow_listed_is_accepted_and_ends_by_postflight(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b)
        job = await b.step()  # the workflow runs; the cloud's list lags: wait
        assert (job.status, job.reason) == (S.UNKNOWN, WAITING)
        job = await b.step()  # settled: the proxy runs the target, still nothing listed
        assert (job.status, job.rule) == (S.ACCEPTED, "reconcile:at-target")
        assert job.reason == (
            "the answer proved nothing and the proxy already runs the target; no workflow of it was found"
        )
        assert await b.workflow_ids() == []
        job = await b.settle()
        assert (job.status, job.rule) == (S.SUCCEEDED, "postflight:at-target")
        assert len(b.upgrade_calls()) == 1
        (attempt,) = await b.attempts()
        assert attempt.outcome == "reconciled"

    run_bench(
        tmp_path,
        body,
        scenario_extra={"workflow": {"pending_s": 1, "running_s": 5, "job_visible_after_s": 9999}},
    )


# ------------------------------------------------------------------------------------- read failures
@pytest.mark.parametrize("route", ["proxy_version", "immediate_jobs"])
def test_failing_reads_reschedule_then_flag_and_never_resend(tmp_path: Path, route: str) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b, applied=False)
        b.inject(route, *[Fault.http(500, "DBS.05000000")] * 8)
        for n in range(1, 8):
            job = await b.step()
            assert (job.status, job.read_failures) == (S.UNKNOWN, n)
            assert (
                job.reason
                == "checking an answer that proved nothing: HTTP 500 DBS.05000000: injected HTTP 500"
            )
        job = await b.step()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "default:server-error", True)
        keeps_failing = "the answer proved nothing and checking what the cloud did keeps failing"
        assert job.reason is not None and job.reason.startswith(f"{keeps_failing}: gave up after 8 attempts")
        assert job.hint == LOOK_HINT
        assert len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body)


def test_a_read_that_recovers_goes_on_to_the_search(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b)
        b.inject("proxy_version", Fault.lost(), Fault.http(503, "APIGW.0202"))
        assert (await b.step()).read_failures == 1
        assert (await b.step()).read_failures == 2
        job = await b.step()
        assert (job.status, job.rule, job.read_failures) == (S.ACCEPTED, "reconcile:found-workflow", 0)

    run_bench(tmp_path, body)


# ------------------------------------------------------------------------------------ nothing started
@pytest.mark.parametrize(
    ("lease", "timeout", "grace", "settle_after"),
    [
        (30.0, 30.0, 30.0, 60.0),  # intent deadline = call + timeout
        # a long lease does not delay it: the sender recorded how its call ended (a reset), so no copy of
        # it can leave later; the send deadline matters only for a sender that stopped before recording
        (120.0, 30.0, 30.0, 60.0),
        (30.0, 100.0, 30.0, 130.0),  # the call's own timeout
        (30.0, 30.0, 0.0, 30.0),  # no grace
    ],
)
def test_nothing_started_is_concluded_only_after_the_intent_deadline_the_timeout_and_the_grace(
    tmp_path: Path, lease: float, timeout: float, grace: float, settle_after: float
) -> None:
    async def body(b: Bench) -> None:
        t0 = b.rt.now()
        await lost_call(b, applied=False)
        job = await b.step()
        assert (job.status, job.reason) == (S.UNKNOWN, WAITING)
        assert job.next_attempt_at is not None
        assert (job.next_attempt_at - t0).total_seconds() == pytest.approx(settle_after + 0.05, abs=0.1)
        await advance((job.next_attempt_at - b.rt.now()).total_seconds() - 0.5)
        early = await b.store.claim(b.run_id, worker_id=b.rt.worker_id, limit=5, lease_s=lease, track=True)
        assert early.jobs == []  # not due before it settled
        job = await b.step()
        assert (job.status, job.rule) == (S.RETRY_WAIT, NOTHING_STARTED_RULE)
        (attempt,) = await b.attempts()
        assert (attempt.outcome, attempt.transport) == ("lost", "reset")
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        assert len(b.upgrade_calls()) == 2 and len(b.issued()) == 1

    run_bench(
        tmp_path,
        body,
        options=make_options(
            lease=lease, timeout=timeout, reconcile_grace=grace, heartbeat=min(5.0, lease / 2)
        ),
    )


POLICY_5XX_NOT_COUNTED = {
    "rules": [
        {
            "name": "gateway-5xx",
            "match": {"http_status": "5xx", "stage": "upgrade"},
            "action": "reconcile",
            "counts": False,
        }
    ],
    "backoff": {"max_attempts": 3},
}


@pytest.mark.parametrize(
    ("fault", "policy", "calls", "counts"),
    [
        (Fault.lost(applied=False), None, 8, True),
        (Fault.http(500, "DBS.05000000"), None, 8, True),
        (Fault.http(502, "APIGW.0201"), {"backoff": {"max_attempts": 4, "initial": 1.0}}, 4, True),
        (Fault.http(503, "APIGW.0202"), POLICY_5XX_NOT_COUNTED, 3, False),
    ],
    ids=["lost-default", "500-default", "502-policy-backoff", "503-rule-not-counted"],
)
def test_resends_after_nothing_started_are_bounded_by_the_rules_backoff(
    tmp_path: Path, fault: Fault, policy: dict[str, Any] | None, calls: int, counts: bool
) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", *[fault] * calls)
        job = await b.settle(max_steps=400)
        assert (job.status, job.rule, job.counts_failure) == (S.FAILED, NOTHING_STARTED_RULE, counts)
        assert job.reason == (
            f"gave up after {calls} attempts: none proved a refusal and the cloud shows no upgrade started"
        )
        assert job.hint == NOTHING_STARTED_HINT
        assert len(b.upgrade_calls()) == calls and b.issued() == []
        assert [a.outcome for a in await b.attempts()] == ["lost"] * calls
        assert b.cloud.pending_faults() == 0

    run_bench(tmp_path, body, options=make_options(policy=policy))


@pytest.mark.parametrize("route", ["proxy_version", "immediate_jobs"])
def test_refused_credentials_while_reconciling_stop_the_run_and_keep_the_job_unknown(
    tmp_path: Path, route: str
) -> None:
    async def body(b: Bench) -> None:
        await lost_call(b)
        b.inject(route, Fault.http(401, "APIGW.0301"))
        job = await b.step()
        assert (job.status, job.read_failures) == (S.UNKNOWN, 1)
        assert b.rt.stop_requested.is_set() and b.rt.stop_exit_code == 2
        assert await b.workflow_ids() == [] and len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body)
