"""The upgrade step (steps/upgrade.py) on virtual time against the in-process fake cloud: each decision
branch with the value it must leave (status, rule, calls that reached the cloud, workflow ids recorded).

Issue 10 kinds 2, 3, 4 and 7 and issue 11 kind 1 in miniature: what may have reached the backend is
reconciled, a proven refusal is resent without a look, items that do not prove their state are
reconciled, a retry keeps what preflight read, a partial accept is tracked and never resent, and a process
whose claim lapsed never sends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.cloud.fake import Fault
from orchestrator.errors import EXIT_USAGE
from orchestrator.policy.decide import PARTIAL_ACCEPT_RULE
from orchestrator.states import JobStatus
from tests.unit.steps_kit import (
    NEW,
    OLD,
    P1,
    QUOTA_MSG,
    SUBNET_MSG,
    Bench,
    advance,
    make_options,
    proxy,
    run_bench,
    upgrade_step,
)

S = JobStatus


# ---------------------------------------------------------------------------------------- accept
def test_accept_records_the_workflow_and_the_version_preflight_read(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert job.status is S.ACCEPTED and job.rule == "default:accepted"
        assert job.reason is None and job.current_version == OLD
        assert [r["route"] for r in b.cloud.log] == ["proxy_version", "upgrade"]
        (call,) = b.upgrade_calls()
        assert (call["source_version"], call["target_version"], call["effect"]) == (OLD, NEW, "applied")
        assert await b.workflow_ids() == b.issued() == call["workflows"]
        (attempt,) = await b.attempts()
        assert (attempt.number, attempt.outcome, attempt.http_status) == (1, "accepted", 200)
        assert attempt.request_id == call["request_id"]
        assert attempt.cloud_offset_s is not None and abs(attempt.cloud_offset_s) <= 1.0
        (wf,) = await b.workflows()
        assert (wf.state, wf.source, wf.attempt_id) == ("ACCEPT", "answer", attempt.id)
        assert b.moves() == [("pending", "in_flight", None), ("in_flight", "accepted", "default:accepted")]
        # the first poll waits poll_initial (10 s) on the job table's clock
        assert job.next_attempt_at is not None
        assert (job.next_attempt_at - job.updated_at).total_seconds() == pytest.approx(10.0, abs=0.01)

    run_bench(tmp_path, body)


@pytest.mark.parametrize(
    ("message", "rule", "counts"),
    [
        (SUBNET_MSG, "default:reject-subnet-ip", False),
        (QUOTA_MSG, "default:reject-quota", False),
        ("The proxy is frozen by the administrator", "default:reject", True),
    ],
)
def test_a_rejection_is_flagged_by_its_rule_and_never_resent(
    tmp_path: Path, message: str, rule: str, counts: bool
) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, rule, counts)
        assert job.reason == f"rejected by the cloud: {message}"
        assert job.hint is not None and "retry {run} --flagged" in job.hint
        assert len(b.upgrade_calls()) == 1 and b.issued() == []
        (wf,) = await b.workflows()  # the REJECT item is part of the record
        assert (wf.state, wf.error_message) == ("REJECT", message)
        (attempt,) = await b.attempts()
        assert (attempt.outcome, attempt.rule) == ("flag", rule)
        await advance(3600)
        assert (await b.store.claim(b.run_id, worker_id="w", limit=5, lease_s=30, track=True)).jobs == []

    run_bench(tmp_path, body, proxies=[proxy(P1, reject=message)])


def test_a_partial_accept_is_tracked_then_flagged_and_never_resent(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert (job.status, job.rule) == (S.ACCEPTED, PARTIAL_ACCEPT_RULE)
        assert job.reason is not None and job.reason.startswith("partially accepted: 1 of 2 nodes accepted")
        rows = await b.workflows()
        assert [(w.state, w.workflow_id is not None) for w in rows] == [("ACCEPT", True), ("REJECT", True)]
        (accepted_id,) = b.issued()
        assert rows[0].workflow_id == accepted_id
        job = await b.settle()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, PARTIAL_ACCEPT_RULE, False)
        assert (
            job.reason is not None
            and f"the accepted nodes' workflows completed ({accepted_id})" in job.reason
        )
        # the accepted node's workflow was followed to its end before the flag
        assert (await b.workflows())[0].job_status == "Completed"
        assert [c["workflow_id"] for c in b.calls("job")][-1] == accepted_id
        assert len(b.upgrade_calls()) == 1
        assert set(b.steps) == {"upgrade", "track"}

    run_bench(tmp_path, body, proxies=[proxy(P1, nodes=2, reject=SUBNET_MSG, reject_nodes=[1])])


# ------------------------------------------------------------------------ classification (10.2/10.3)
@dataclass(frozen=True)
class Kind:
    """One kind of answer at the upgrade stage and what it must leave on the attempt and the job."""

    fault: Fault
    rule: str  # the rule that decided the answer (kept on the attempt)
    http: int | None  # the HTTP status the attempt keeps (None: no answer arrived)
    transport: str | None = None  # the transport failure the attempt keeps


LOST = "default:transport-answer-lost"
UNPROVEN_5XX = "default:server-error-unproven"
# The backend applied the upgrade; the answer does not prove it (issue 10 kinds 2 and 3): reconcile.
MAY_HAVE_APPLIED = {
    "gateway 502 html after apply": Kind(Fault.gateway(502), UNPROVEN_5XX, 502),
    "gateway 503 html after apply": Kind(Fault.gateway(503), UNPROVEN_5XX, 503),
    "gateway 504 html after apply": Kind(Fault.gateway(504), UNPROVEN_5XX, 504),
    "answer lost (reset)": Kind(Fault.lost(), LOST, None, "reset"),
    "answer lost (timeout)": Kind(Fault.lost(timeout=True), LOST, None, "timeout"),
    "null workflow id on ACCEPT": Kind(Fault.null_workflow_id(), LOST, 200, "malformed"),
    "lower-case state": Kind(Fault.lower_case_state(), LOST, 200, "malformed"),
    "200, not JSON": Kind(
        Fault.raw(200, b"<html>ok</html>", content_type="text/html"), LOST, 200, "malformed"
    ),
    "200, empty update_result": Kind(Fault.raw(200, b'{"update_result": []}'), LOST, 200, "malformed"),
    "200, another instance's item": Kind(
        Fault.raw(200, b'{"update_result": [{"instance_id": "x", "workflow_id": "w", "state": "ACCEPT"}]}'),
        LOST,
        200,
        "malformed",
    ),
}
# Answers that prove the backend refused: resent after a backoff, never reconciled.
PROVEN_REFUSALS = {
    "409 busy": Kind(Fault.http(409, "DBS.200019"), "default:busy", 409),
    "409 busy (DBS.201014)": Kind(Fault.http(409, "DBS.201014"), "default:busy", 409),
    "429 throttled": Kind(Fault.http(429, "APIGW.0308", retry_after=3), "default:throttled", 429),
    "400 APIGW.0308 throttled": Kind(Fault.http(400, "APIGW.0308"), "default:throttled-apigw", 400),
}


@pytest.mark.parametrize("kind", list(MAY_HAVE_APPLIED.values()), ids=list(MAY_HAVE_APPLIED))
def test_an_answer_that_does_not_prove_a_refusal_is_reconciled_and_the_real_workflow_recorded(
    tmp_path: Path, kind: Kind
) -> None:
    """Issue 10 kinds 2 and 3: the backend applied the upgrade but the answer does not prove it; the job
    goes to reconcile, which records the workflow the cloud really started, and ends by postflight."""

    async def body(b: Bench) -> None:
        b.inject("upgrade", kind.fault)
        job = await b.step()
        assert (job.status, job.rule) == (S.UNKNOWN, kind.rule)
        assert await b.workflow_ids() == []  # nothing the answer said is taken for a workflow
        job = await b.step()
        assert b.steps == ["upgrade", "reconcile"]
        assert (job.status, job.rule) == (S.ACCEPTED, "reconcile:found-workflow")
        (issued,) = b.issued()
        assert await b.workflow_ids() == [issued]
        assert [w.source for w in await b.workflows()] == ["reconciled"]
        # the attempt keeps what the cloud answered; its outcome says what reconcile found
        (attempt,) = await b.attempts()
        assert (attempt.outcome, attempt.rule) == ("reconciled", "reconcile:found-workflow")
        assert (attempt.http_status, attempt.transport) == (kind.http, kind.transport)
        assert attempt.answered_at is not None and attempt.answered_at <= job.updated_at
        job = await b.settle()
        assert (job.status, job.rule, job.current_version) == (S.SUCCEEDED, "postflight:at-target", NEW)
        assert len(b.upgrade_calls()) == 1
        assert b.cloud.pending_faults() == 0

    run_bench(tmp_path, body)


@pytest.mark.parametrize("kind", list(PROVEN_REFUSALS.values()), ids=list(PROVEN_REFUSALS))
def test_a_proven_refusal_is_resent_without_reconciling(tmp_path: Path, kind: Kind) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", kind.fault)
        job = await b.step()
        assert (job.status, job.rule) == (S.RETRY_WAIT, kind.rule)
        (attempt,) = await b.attempts()
        assert (attempt.http_status, attempt.error_code) == (kind.http, kind.fault.error_code)
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        assert b.steps[:2] == ["upgrade", "upgrade"] and "reconcile" not in b.steps
        assert b.calls("immediate_jobs") == []
        assert len(b.upgrade_calls()) == 2
        assert await b.workflow_ids() == b.issued()  # the resend's workflow, from its answer
        assert [w.source for w in await b.workflows()] == ["answer"]

    run_bench(tmp_path, body)


def test_a_throttled_answer_slows_the_whole_run_for_its_retry_after(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.http(429, "APIGW.0308", retry_after=7))
        job = await b.step()
        assert job.status is S.RETRY_WAIT
        assert "run.throttled" in b.events.names()
        assert job.next_attempt_at is not None
        assert (job.next_attempt_at - job.updated_at).total_seconds() >= 7.0

    run_bench(tmp_path, body)


@pytest.mark.parametrize(
    ("fault", "status", "rule"),
    [
        (Fault.http(400, "DBS.05000001"), S.FLAGGED, "default:kernel-too-early"),
        (Fault.http(400, "DBS.200001"), S.FLAGGED, "default:parameter-error"),
        (Fault.http(400, "DBS.270024"), S.FLAGGED, "default:proxy-not-found"),
        (Fault.http(404, "DBS.200002"), S.FLAGGED, "default:instance-not-found"),
        (Fault.http(400, "DBS.05000008"), S.SKIPPED, "default:already-latest"),
        (Fault.http(400, "DBS.99999999"), S.UNKNOWN, "default:unproven-answer"),
    ],
    ids=["kernel-too-early", "parameter-error", "proxy-not-found", "instance-not-found", "already-latest",
         "unknown-4xx-code"],
)  # fmt: skip
def test_documented_refusals_end_the_job_by_their_rule(
    tmp_path: Path, fault: Fault, status: JobStatus, rule: str
) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", fault)
        job = await b.step()
        assert (job.status, job.rule) == (status, rule)
        assert len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_stop_the_run_and_leave_the_job_resendable(tmp_path: Path, status: int) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.http(status, "APIGW.0301"))
        job = await b.step()
        assert job.status is S.RETRY_WAIT
        assert b.rt.stop_requested.is_set() and b.rt.stop_exit_code == EXIT_USAGE
        assert b.rt.stop_reason is not None and f"run: orchestrator resume {b.run_id}" in b.rt.stop_reason
        assert not b.rt.may_start_upgrades()

    run_bench(tmp_path, body)


# ---------------------------------------------------------------------------- a retry keeps (10.4)
@pytest.mark.parametrize(
    "fault",
    [Fault.http(503, "APIGW.0202"), Fault.http(409, "DBS.200019"), Fault.http(429, "APIGW.0308")],
    ids=["503", "409-busy", "429"],
)
def test_a_retry_sends_the_version_preflight_read_when_the_inventory_has_none(
    tmp_path: Path, fault: Fault
) -> None:
    """Issue 10 kind 4: no source_version in the inventory, one transient answer before the accept:
    succeeded, two upgrade calls, both with the version preflight read."""

    async def body(b: Bench) -> None:
        assert (await b.job()).source_version is None
        b.inject("upgrade", fault)
        job = await b.settle()
        assert (job.status, job.current_version) == (S.SUCCEEDED, NEW)
        calls = b.upgrade_calls()
        assert [c["source_version"] for c in calls] == [OLD, OLD]
        assert [c["effect"] for c in calls] == ["none", "applied"]
        assert await b.workflow_ids() == b.issued()

    run_bench(tmp_path, body, source=None)


def test_without_preflight_a_job_with_no_known_version_reads_it_before_sending(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert job.status is S.ACCEPTED
        assert [r["route"] for r in b.cloud.log] == ["proxy_version", "upgrade"]
        assert b.upgrade_calls()[0]["source_version"] == OLD

    run_bench(tmp_path, body, source=None, options=make_options(preflight=False))


def test_without_preflight_a_known_source_version_is_sent_without_a_read(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert job.status is S.ACCEPTED
        assert [r["route"] for r in b.cloud.log] == ["upgrade"]

    run_bench(tmp_path, body, options=make_options(preflight=False))


# ---------------------------------------------------------------------------------------- preflight
FLAG = "preflight:flag"
PREFLIGHT_VERDICTS = {
    "at-target": ({"current_version": NEW}, OLD, S.SKIPPED, "preflight:skip", f"already at target {NEW}"),
    "source-mismatch": (
        {"current_version": "2.23.06.000"},
        OLD,
        S.FLAGGED,
        FLAG,
        f"source mismatch: inventory says {OLD}, proxy runs 2.23.06.000",
    ),
    "newer": (
        {"current_version": "2.25.01.000", "latest_version": "2.25.01.000"},
        None,
        S.FLAGGED,
        FLAG,
        f"proxy runs 2.25.01.000, newer than target {NEW}",
    ),
    "cannot-upgrade": (
        {"can_upgrade": False},
        OLD,
        S.FLAGGED,
        FLAG,
        f"the cloud reports can_upgrade: false for {OLD}",
    ),
    "above-latest": (
        {"latest_version": "2.24.01.000"},
        OLD,
        S.FLAGGED,
        FLAG,
        f"target {NEW} is above the latest available version 2.24.01.000",
    ),
}


@pytest.mark.parametrize(
    ("spec", "source", "status", "rule", "reason"),
    list(PREFLIGHT_VERDICTS.values()),
    ids=list(PREFLIGHT_VERDICTS),
)
def test_preflight_verdicts_finish_the_job_without_an_upgrade_call(
    tmp_path: Path, spec: dict[str, object], source: str | None, status: JobStatus, rule: str, reason: str
) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert (job.status, job.rule, job.reason) == (status, rule, reason)
        assert b.upgrade_calls() == []

    run_bench(tmp_path, body, proxies=[proxy(P1, **spec)], source=source)


def test_a_failing_preflight_read_is_retried_then_fails_by_the_read_rule(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        b.inject("proxy_version", *[Fault.http(500, "DBS.05000000")] * 8)
        job = await b.step()
        assert (job.status, job.rule, job.read_failures) == (S.RETRY_WAIT, "default:server-error", 1)
        job = await b.settle()
        assert (job.status, job.rule, job.counts_failure) == (S.FAILED, "default:server-error", True)
        assert len(b.calls("proxy_version")) == 8
        assert b.upgrade_calls() == []

    run_bench(tmp_path, body)


# ------------------------------------------------- a resend after an unsettled attempt (10.2, part 2)
@pytest.mark.parametrize(
    ("resend_at", "met", "guard"),
    [
        (61.0, "busy", "default:resend-met-busy"),
        (65.0, "already-latest", "default:resend-met-already-latest"),
    ],
)
def test_a_resend_that_meets_busy_or_already_at_target_after_an_unsettled_attempt_reconciles(
    tmp_path: Path, resend_at: float, met: str, guard: str
) -> None:
    """Attempt 1 reached the backend (its answer was lost) but the cloud's job list lags, so reconcile
    found nothing and resent. The resend meets the first call's own doing ("another operation is in
    progress" while its workflow runs, "already at target" after): reconcile again, never skip; the job
    ends by postflight with the workflow that did it."""

    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.lost())
        job = await b.step()
        assert job.status is S.UNKNOWN
        job = await b.step()  # reconcile: not at target yet, nothing listed yet: wait until settled
        assert job.status is S.UNKNOWN and b.calls("upgrade")[-1]["effect"] == "applied"
        job = await b.step()  # settled: "nothing started" (the list still lags): resend
        assert (job.status, job.rule) == (S.RETRY_WAIT, "reconcile:nothing-started")
        # the resend leaves at a chosen moment: while the first workflow runs, or after it ended
        created = b.fleet.workflows[b.issued()[0]].created_at
        await advance(max(0.0, created + resend_at - b.fleet.clock()))
        claimed = await b.claim()
        await upgrade_step(b.rt, claimed)
        job = await b.job()
        assert (job.status, job.rule) == (S.UNKNOWN, guard), met
        assert len(b.upgrade_calls()) == 2 and b.upgrade_calls()[-1]["effect"] == "none"
        assert [a.outcome for a in await b.attempts()] == ["lost", "reconcile"]
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        assert await b.workflow_ids() == b.issued()  # the first call's workflow, found once listed
        assert all(to != "skipped" for _, to, _ in b.moves())
        assert len(b.upgrade_calls()) == 2

    run_bench(
        tmp_path,
        body,
        # the intent settles after 60 s (lease 30 s, timeout 30 s, grace 30 s); the lost call's workflow is
        # listed only after 62 s (the list lags) and ends after 64 s
        scenario_extra={"workflow": {"pending_s": 5, "running_s": 59, "job_visible_after_s": 62}},
    )


# ------------------------------------------------------------------------------------ the fence (11.1)
def test_a_job_whose_claim_lapsed_before_its_intent_is_not_sent(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.claim()
        await advance(b.rt.options.lease + 1)  # no heartbeat: the claim lapsed
        await upgrade_step(b.rt, job)
        assert b.upgrade_calls() == []
        assert "job.intent_lost" in b.events.names()
        after = await b.job()
        assert (after.status, after.attempt_count, after.claimed_by) == (S.PENDING, 0, None)

    run_bench(tmp_path, body)


def test_a_job_whose_claim_lapsed_while_waiting_for_its_permit_is_not_sent(tmp_path: Path) -> None:
    """Intent recorded, then the send permit took longer than the lease (a SIGSTOP, a slow limiter): the
    fence refuses the send; the call is recorded as not sent and the job is resent later, once."""

    async def body(b: Bench) -> None:
        job = await b.step()  # preflight took the minute's one permit; the upgrade waits 60 s for the next
        assert b.upgrade_calls() == []
        assert [r["route"] for r in b.cloud.not_sent] == ["upgrade"]
        assert "upgrade.fenced" in b.events.names()
        (attempt,) = await b.attempts()
        assert (attempt.outcome, attempt.transport) == ("not_sent", "connect")
        assert (job.status, job.rule) == (S.RETRY_WAIT, "default:transport-not-sent")
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        assert len(b.upgrade_calls()) == 1 and await b.workflow_ids() == b.issued()

    run_bench(tmp_path, body, options=make_options(rate="1/min", lease=30.0))


def test_a_stalled_sender_never_sends_after_another_process_took_its_job_over(tmp_path: Path) -> None:
    """Issue 11 kind 1 in miniature: process A records its intent and waits for a permit past its lease;
    process B takes the job over (unknown), reconciles, finds nothing once A's intent deadline passed and
    resends. A's late call is fenced: exactly one upgrade call reaches the cloud, its workflow recorded."""

    async def body(a: Bench) -> None:
        job = await a.claim()
        stalled = asyncio.create_task(upgrade_step(a.rt, job))  # waits 60 s for its permit
        await advance(31.0)
        assert (await a.job()).status is S.IN_FLIGHT and a.upgrade_calls() == []
        b = await a.other_process(make_options())  # its own limiter is not short of permits
        taken = await b.claim()
        assert (taken.status, taken.rule) == (S.UNKNOWN, None)
        assert (
            await b.job()
        ).reason == "the process that sent this upgrade stopped: checking what the cloud did"
        await b.run_step(taken)  # reconcile: nothing yet, and A's intent may still leave: wait
        assert (await b.job()).status is S.UNKNOWN
        await stalled
        assert [r["route"] for r in a.cloud.not_sent] == ["upgrade"] and a.upgrade_calls() == []
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        assert len(a.upgrade_calls()) == 1
        assert await a.workflow_ids() == a.issued()
        attempts = await a.attempts()
        assert [x.outcome for x in attempts] == ["not_sent", "accepted"]
        assert attempts[1].worker == b.rt.worker_id

    run_bench(tmp_path, body, options=make_options(rate="1/min", lease=30.0))


# ------------------------------------------------------------------------ an earlier workflow still runs
def test_a_requeued_job_waits_for_its_earlier_workflow_instead_of_resending(tmp_path: Path) -> None:
    """Issue 10 kind 7: a job re-queued (``retry --flagged``) while a workflow of an earlier attempt may
    still run is not resent: the step polls that workflow and waits until it ended."""

    async def body(b: Bench) -> None:
        job = await b.settle()  # the workflow hangs and is not listed for 100 s: the tracking times out
        assert (job.status, job.rule) == (S.FLAGGED, "track:timeout")
        assert job.reason is not None and "(last status not yet visible)" in job.reason
        (wid,) = b.issued()
        done = await b.store.requeue(b.run_id, statuses=[S.FLAGGED])
        assert done.moved == 1 and done.running == []  # its last status was never seen: re-queued
        job = await b.step()
        assert (job.status, job.reason) == (
            S.PENDING,
            f"waiting for workflow {wid} (not yet visible) before sending again",
        )
        await advance(100)
        job = await b.step()
        assert (job.status, job.reason) == (
            S.PENDING,
            f"waiting for workflow {wid} (Running) before sending again",
        )
        assert len(b.upgrade_calls()) == 1
        b.fleet.patch({"workflows": {wid: {"outcome": "complete"}}})
        job = await b.settle()
        # its own workflow did it; the preflight finds the target and nothing is sent again
        assert (job.status, job.reason) == (S.SKIPPED, f"already at target {NEW}")
        assert len(b.upgrade_calls()) == 1
        assert [(w.workflow_id, w.job_status) for w in await b.workflows()] == [(wid, "Completed")]

    run_bench(
        tmp_path,
        body,
        proxies=[proxy(P1, workflow="hang")],
        options=make_options(poll_timeout=60.0),
        scenario_extra={"workflow": {"pending_s": 5, "running_s": 60, "job_visible_after_s": 100}},
    )


# ----------------------------------------------------------------------------------- bounded, stopped
@pytest.mark.parametrize(
    ("fault", "rule", "counts"),
    [
        (Fault.http(409, "DBS.200019"), "default:busy", False),
        (Fault.http(429, "APIGW.0308"), "default:throttled", True),
    ],
    ids=["busy", "throttled"],
)
def test_proven_refusals_are_resent_a_bounded_number_of_times(
    tmp_path: Path, fault: Fault, rule: str, counts: bool
) -> None:
    async def body(b: Bench) -> None:
        b.inject("upgrade", *[fault] * 8)
        job = await b.settle()
        assert (job.status, job.rule, job.counts_failure) == (S.FAILED, rule, counts)
        assert job.reason is not None and job.reason.startswith("gave up after 8 attempts: HTTP ")
        assert len(b.upgrade_calls()) == 8 and b.issued() == []
        assert "reconcile" not in b.steps

    run_bench(tmp_path, body)


def test_a_stop_before_the_send_leaves_the_job_unsent_and_released(tmp_path: Path) -> None:
    """A stop (signal, window end, breaker) that arrives during the preflight read: no intent, no call;
    what preflight learned is kept for the resume."""

    async def body(b: Bench) -> None:
        b.inject("proxy_version", Fault.delay(5.0))
        job = await b.claim()
        step = asyncio.create_task(upgrade_step(b.rt, job))
        await advance(1.0)
        b.rt.request_stop("stopped by a signal")
        await step
        after = await b.job()
        assert (after.status, after.attempt_count, after.claimed_by) == (S.PENDING, 0, None)
        assert after.current_version == OLD
        assert b.upgrade_calls() == [] and b.cloud.not_sent == []
        job = await b.claim()  # a stopped process claims nothing new; a resumed one would send it
        await upgrade_step(b.rt, job)
        assert b.upgrade_calls() == [] and (await b.job()).status is S.PENDING

    run_bench(tmp_path, body)


def test_a_requeued_job_found_at_target_after_unsettled_attempts_is_reconciled_not_skipped(
    tmp_path: Path,
) -> None:
    """``retry --failed`` after reconcile gave up ("nothing started"): the proxy now runs the target
    (the cloud did it after all, unseen). Preflight must not end the job ``skipped``: reconcile, then
    postflight."""
    policy = {"backoff": {"max_attempts": 2, "initial": 1.0}}

    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.lost(applied=False), Fault.lost(applied=False))
        job = await b.settle()
        assert (job.status, job.rule) == (S.FAILED, "reconcile:nothing-started")
        b.fleet.patch({"proxies": {P1: {"current_version": NEW}}})
        assert (await b.store.requeue(b.run_id, statuses=[S.FAILED])).moved == 1
        job = await b.step()
        assert (job.status, job.rule) == (S.UNKNOWN, "preflight:at-target-after-resend")
        job = await b.settle()
        assert (job.status, job.rule) == (S.SUCCEEDED, "postflight:at-target")
        assert all(to != "skipped" for _, to, _ in b.moves())
        assert len(b.upgrade_calls()) == 2

    run_bench(tmp_path, body, options=make_options(policy=policy))
