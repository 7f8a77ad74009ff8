"""The track step (steps/track.py) on virtual time against the in-process fake cloud.

Accepted workflows are polled until they end (and never after), then the proxy's version is read once
more: succeeded only at the target. A failed workflow goes through the policy (and counts for the
breaker), a workflow that never ends is flagged at the poll timeout, a partial accept is flagged once its
accepted workflows ended, and postflight never says a workflow completed unless one was tracked.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cloud.fake import Fault
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
    at,
    make_options,
    proxy,
    run_bench,
)

S = JobStatus
FAIL_REASON = "Proxy kernel upgrade failed: the proxy node did not come back after restart."


def job_polls(b: Bench, wid: str) -> list[dict[str, Any]]:
    return [r for r in b.calls("job") if r["workflow_id"] == wid]


# ---------------------------------------------------------------------------------------- completed
@pytest.mark.parametrize("skew_s", [0.0, 180.0, -180.0])
def test_polls_until_completed_then_postflight_succeeds(tmp_path: Path, skew_s: float) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert job.status is S.ACCEPTED
        (wid,) = b.issued()
        job = await b.settle()
        assert (job.status, job.rule, job.reason, job.current_version) == (
            S.SUCCEEDED,
            "postflight:at-target",
            None,
            NEW,
        )
        assert b.move_reasons()[-1] == ("succeeded", f"workflow {wid} completed; the proxy runs {NEW}")
        # first poll after poll_initial, then every poll_interval; never polled again once it ended (65 s)
        polls = job_polls(b, wid)
        assert [round(r["received_at"] - polls[0]["received_at"]) for r in polls] == [
            0,
            10,
            20,
            30,
            40,
            50,
            60,
        ]
        assert [r["route"] for r in b.cloud.log][-1] == "proxy_version"
        (wf,) = await b.workflows()
        assert (wf.job_status, wf.progress) == ("Completed", "100%")
        # the cloud's end time on the job table's clock: the measured offset, not an assumed one
        assert wf.ended_at is not None
        assert abs((wf.ended_at - (at(65.0) + timedelta(seconds=skew_s))).total_seconds()) <= 1.5

    run_bench(tmp_path, body, skew_s=skew_s)


def test_the_workflows_of_every_node_must_complete(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        ids = b.issued()
        assert len(ids) == 2 and sorted(await b.workflow_ids()) == sorted(ids)
        assert all(w.job_status == "Completed" for w in await b.workflows())
        assert b.move_reasons()[-1] == (
            "succeeded",
            f"workflow {', '.join(ids)} completed; the proxy runs {NEW}",
        )

    run_bench(tmp_path, body, proxies=[proxy(P1, nodes=2)])


def test_failing_and_not_yet_visible_polls_keep_polling(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        b.inject("job", Fault.http(500, "DBS.05000000"), Fault.lost(), Fault.http(503, "APIGW.0202"))
        job = await b.settle()
        assert job.status is S.SUCCEEDED
        (wid,) = b.issued()
        statuses = [r["http_status"] for r in job_polls(b, wid)]
        # three failed polls, then DBS.200543 (the cloud lists the job only after 45 s), then its status
        assert statuses == [500, "reset", 503, 400, 200, 200, 200]
        (wf,) = await b.workflows()
        assert wf.job_status == "Completed"

    run_bench(
        tmp_path,
        body,
        scenario_extra={"workflow": {"pending_s": 5, "running_s": 60, "job_visible_after_s": 45}},
    )


# ---------------------------------------------------------------------------------- the workflow ended
def raw_job(wid: str, status: str, fail_reason: str | None = None) -> Fault:
    """A ``jobs?id=`` answer saying the workflow ended with ``status`` (the fleet is not asked)."""
    body = {"job": {"id": wid, "name": "Upgrade proxy version", "status": status, "fail_reason": fail_reason}}
    return Fault.raw(200, json.dumps(body).encode(), applied=False)


@pytest.mark.parametrize(
    ("status", "rule"),
    [("Failed", "default:workflow-failed"), ("Canceled", "default:workflow-failed"),
     ("Unauthorized", "default:workflow-unauthorized")],
)  # fmt: skip
def test_a_workflow_that_ended_without_completing_is_flagged_and_counts(
    tmp_path: Path, status: str, rule: str
) -> None:
    async def body(b: Bench) -> None:
        await b.step()
        (wid,) = b.issued()
        b.inject("job", raw_job(wid, status, "the node did not come back"))
        job = await b.step()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, rule, True)
        assert job.reason == f"workflow {wid} {status}: the node did not come back"
        assert job.hint is not None and "retry {run} --flagged" in job.hint
        assert len(b.calls("proxy_version")) == 1  # no postflight: the workflow said it failed
        state = await b.store.run_state(b.run_id)
        assert (state.failures, state.finished) == (1, 1)  # the breaker counts it

    run_bench(tmp_path, body)


def test_a_failed_workflow_from_the_fleet_is_flagged_with_its_fail_reason(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.settle()
        (wid,) = b.issued()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "default:workflow-failed", True)
        assert job.reason == f"workflow {wid} Failed: {FAIL_REASON}"
        assert (job.current_version, len(b.upgrade_calls())) == (OLD, 1)
        (wf,) = await b.workflows()
        assert (wf.job_status, wf.fail_reason) == ("Failed", FAIL_REASON)

    run_bench(tmp_path, body, proxies=[proxy(P1, workflow="fail")])


def test_a_policy_that_retries_failed_workflows_resends_until_its_attempts_run_out(tmp_path: Path) -> None:
    policy = {
        "rules": [
            {
                "name": "retry-failed",
                "match": {"workflow_status": "Failed"},
                "action": "retry",
                "counts": True,
            }
        ],
        "backoff": {"max_attempts": 2, "initial": 1.0},
    }

    async def body(b: Bench) -> None:
        job = await b.settle()
        assert (job.status, job.rule, job.counts_failure) == (S.FAILED, "retry-failed", True)
        _first, second = b.issued()
        assert job.reason == f"gave up after 2 attempts: workflow {second} Failed: {FAIL_REASON}"
        assert len(b.upgrade_calls()) == 2
        assert sorted(await b.workflow_ids()) == sorted(b.issued())
        assert [to for to, _ in b.move_reasons()] == [
            "in_flight", "accepted", "retry_wait", "in_flight", "accepted", "failed"
        ]  # fmt: skip

    run_bench(tmp_path, body, proxies=[proxy(P1, workflow="fail")], options=make_options(policy=policy))


def test_a_requeued_job_is_decided_by_its_new_workflow_not_by_the_one_that_failed_before(
    tmp_path: Path,
) -> None:
    """``retry --flagged`` after a failed workflow: the resend's workflow completes. Its round is judged on
    its own workflow (not the earlier failure) and its poll timeout counts from its own accept."""

    async def body(b: Bench) -> None:
        job = await b.settle()
        assert (job.status, job.rule) == (S.FLAGGED, "default:workflow-failed")
        await advance(7200)  # the operator fixes the cause and re-queues two hours later
        b.fleet.patch({"proxies": {P1: {"workflow": "complete"}}})
        assert (await b.store.requeue(b.run_id, statuses=[S.FLAGGED])).moved == 1
        job = await b.settle()
        first, second = b.issued()
        assert (job.status, job.rule, job.counts_failure) == (S.SUCCEEDED, "postflight:at-target", False)
        assert b.move_reasons()[-1] == ("succeeded", f"workflow {second} completed; the proxy runs {NEW}")
        assert [(w.workflow_id, w.job_status) for w in await b.workflows()] == [
            (first, "Failed"),
            (second, "Completed"),
        ]
        assert len(b.upgrade_calls()) == 2

    run_bench(tmp_path, body, proxies=[proxy(P1, workflow="fail")], options=make_options(poll_timeout=3600.0))


def test_a_workflow_that_never_ends_is_flagged_at_the_poll_timeout(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.settle()
        (wid,) = b.issued()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "track:timeout", True)
        assert job.reason is not None
        assert job.reason.startswith(f"timed out waiting for workflow {wid} (last status Running ")
        assert job.reason.endswith("after 120s")
        assert len(job_polls(b, wid)) == 12 and len(b.upgrade_calls()) == 1

    run_bench(tmp_path, body, proxies=[proxy(P1, workflow="hang")], options=make_options(poll_timeout=115.0))


# ------------------------------------------------------------------------------------------ postflight
def test_a_completed_workflow_that_left_the_version_unchanged_is_a_postflight_mismatch(
    tmp_path: Path,
) -> None:
    async def body(b: Bench) -> None:
        job = await b.settle()
        (wid,) = b.issued()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "postflight:version-mismatch", True)
        assert job.reason == f"workflow {wid} completed but the proxy runs {OLD} (target {NEW})"
        assert job.current_version == OLD

    run_bench(tmp_path, body, proxies=[proxy(P1, workflow="no_version_change")])


def test_a_failing_postflight_read_is_retried_then_flagged(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await b.step()
        b.inject("proxy_version", *[Fault.http(500, "DBS.05000000")] * 8)
        job = await b.settle()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "default:server-error", True)
        assert job.reason is not None
        assert job.reason.startswith(
            "reading the proxy's version after the upgrade keeps failing: gave up after 8"
        )
        assert len(b.calls("proxy_version")) == 1 + 8

    run_bench(tmp_path, body)


def test_a_postflight_read_that_recovers_succeeds(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        await b.step()
        b.inject("proxy_version", Fault.http(503, "APIGW.0202"), Fault.lost())
        job = await b.settle()
        assert (job.status, job.read_failures) == (S.SUCCEEDED, 0)

    run_bench(tmp_path, body)


@pytest.mark.parametrize(
    ("downgrade", "status", "reason"),
    [
        (False, S.SUCCEEDED, f"the proxy runs {NEW}; no workflow of this run was found to track"),
        (True, S.FLAGGED, f"no workflow was tracked to its end and the proxy runs {OLD} (target {NEW})"),
    ],
    ids=["at-target", "changed-back"],
)
def test_a_reconciled_job_without_a_workflow_never_claims_one_completed(
    tmp_path: Path, downgrade: bool, status: JobStatus, reason: str
) -> None:
    """Issue 10 kind 3: reconcile found the proxy at target but no workflow; postflight's words say so."""

    async def body(b: Bench) -> None:
        b.inject("upgrade", Fault.lost())
        await b.step()
        await b.step()  # reconcile: waits for the intent to settle
        job = await b.step()
        assert (job.status, job.rule) == (S.ACCEPTED, "reconcile:at-target")
        assert await b.workflow_ids() == []
        if downgrade:
            b.fleet.patch({"proxies": {P1: {"current_version": OLD}}})
        job = await b.step()
        assert b.steps[-1] == "track" and job.status is status
        assert b.calls("job") == []  # nothing to poll
        assert b.move_reasons()[-1] == (status.value, reason)
        assert "completed" not in reason

    run_bench(
        tmp_path,
        body,
        scenario_extra={"workflow": {"pending_s": 1, "running_s": 5, "job_visible_after_s": 9999}},
    )


# -------------------------------------------------------------------------------------- partial accept
@pytest.mark.parametrize(
    ("message", "counts"),
    [(SUBNET_MSG, False), (QUOTA_MSG, False), ("The node is frozen", True)],
    ids=["subnet", "quota", "other"],
)
def test_a_partial_accept_is_flagged_once_its_accepted_workflows_ended(
    tmp_path: Path, message: str, counts: bool
) -> None:
    async def body(b: Bench) -> None:
        job = await b.step()
        assert (job.status, job.rule) == (S.ACCEPTED, PARTIAL_ACCEPT_RULE)
        (wid,) = b.issued()  # node 0 and 2 rejected, node 1 accepted
        job = await b.step()  # first poll: still running, not flagged yet
        assert (job.status, job.rule) == (S.ACCEPTED, PARTIAL_ACCEPT_RULE)
        job = await b.settle()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, PARTIAL_ACCEPT_RULE, counts)
        assert job.reason == (
            f"partially accepted: 1 of 3 nodes accepted; rejected by the cloud: {message}; "
            f"the accepted nodes' workflows completed ({wid})"
        )
        assert job.hint is not None and job.hint.startswith(
            "Some nodes were refused while the others were upgraded"
        )
        assert [w.job_status for w in await b.workflows() if w.state == "ACCEPT"] == ["Completed"]
        last_poll = job_polls(b, wid)[-1]
        assert last_poll["received_at"] >= b.fleet.workflows[wid].natural_end
        assert len(b.upgrade_calls()) == 1
        assert (await b.store.run_state(b.run_id)).failures == int(counts)

    run_bench(tmp_path, body, proxies=[proxy(P1, nodes=3, reject=message, reject_nodes=[0, 2])])


def test_a_partial_accept_whose_accepted_workflow_failed_is_flagged_by_the_failure(tmp_path: Path) -> None:
    async def body(b: Bench) -> None:
        job = await b.settle()
        (wid,) = b.issued()
        assert (job.status, job.rule, job.counts_failure) == (S.FLAGGED, "default:workflow-failed", True)
        assert job.reason == f"workflow {wid} Failed: {FAIL_REASON}"
        assert len(b.upgrade_calls()) == 1

    run_bench(
        tmp_path, body, proxies=[proxy(P1, nodes=2, reject=SUBNET_MSG, reject_nodes=[1], workflow="fail")]
    )


def test_refused_credentials_while_polling_stop_the_run_and_keep_tracking_for_the_resume(
    tmp_path: Path,
) -> None:
    async def body(b: Bench) -> None:
        await b.step()
        b.inject("job", Fault.http(401, "APIGW.0301"))
        job = await b.step()
        assert job.status is S.ACCEPTED and job.next_attempt_at is not None
        assert b.rt.stop_requested.is_set() and b.rt.stop_exit_code == 2
        (wf,) = await b.workflows()
        assert (wf.job_status, wf.checked_at is not None) == (None, True)

    run_bench(tmp_path, body)
