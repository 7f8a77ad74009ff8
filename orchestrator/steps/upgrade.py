"""The upgrade step: a pending (or retry_wait) job is checked, its intent recorded, its call sent under the
rate limit and the fence, and the answer decided and recorded.

    wait for earlier workflows -> preflight (version read) -> intent (committed) -> permit -> fence ->
    upgrade call -> decide -> record answer + move (one commit)

The version sent as ``source_version`` is the inventory's, or else the one the latest version read
recorded on the job (a retry never forgets what preflight learned); with neither, it is read again.
"""

from __future__ import annotations

import asyncio

from orchestrator import moves, preflight
from orchestrator.outcomes import Answered, HttpFailure, TransportFailure, VersionInfo, outcome_label
from orchestrator.policy import Action, Decision, Stage, decide
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.steps.track import poll_open_workflows
from orchestrator.store import AttemptAnswer, AttemptRow, JobRow, NewWorkflow, WorkflowRow

# An earlier attempt whose answer proved nothing and left no workflow: a later "already at target" or
# "busy" may be its doing (policy: earlier_attempt_unsettled).
UNSETTLED_OUTCOMES = frozenset({"reconcile", "lost", "in_flight", "reconciled"})


def unsettled(attempts: list[AttemptRow], workflows: list[WorkflowRow]) -> bool:
    """Whether an earlier upgrade attempt may have reached the backend without a known workflow."""
    with_workflow = {w.attempt_id for w in workflows if w.workflow_id}
    return any(a.outcome in UNSETTLED_OUTCOMES and a.id not in with_workflow for a in attempts)


async def run_upgrade(rt: Runtime, job: JobRow) -> asyncio.Future[bool] | None:
    """Take one sendable job as far as its upgrade call's answer (see the module docstring). Returns the
    future of the commit of the answer and the move (``Runtime.defer``), or None when no call was made."""
    if not rt.may_start_upgrades():
        await moves.release(rt, job)
        return None
    attempts: list[AttemptRow] = []
    workflows: list[WorkflowRow] = []
    if job.attempt_count > 0:
        attempts, workflows = await rt.store.attempts_and_workflows(job.id)
        # never resend while a workflow an earlier attempt started may still run (retry --flagged, a
        # partial accept under --no-wait): look at it first
        running = await poll_open_workflows(rt, job, workflows)
        if running is not None and not rt.stop_requested.is_set():
            # waited for since the job was last moved (a re-queue restarts the wait), as tracking would
            age = (rt.now() - max(running.created_at, job.updated_at)).total_seconds()
            if age > rt.options.poll_timeout:
                # as long as tracking would have waited for it: hand the proxy back, still not resent
                await moves.apply(
                    rt,
                    job,
                    Decision(
                        Action.FLAG,
                        f"workflow {running.workflow_id} of an earlier attempt is still "
                        f"{running.job_status or 'not visible'} after {age:.0f}s: nothing was sent again",
                        "upgrade:workflow-running",
                        "check the workflow in the console; when it has ended run: orchestrator retry {run} "
                        "--flagged",
                        counts_failure=True,
                    ),
                    frm=job.status,
                )
                return None
        if running is not None:
            await moves.reschedule(
                rt,
                job,
                rt.options.poll_interval,
                reason=f"waiting for workflow {running.workflow_id} "
                f"({running.job_status or 'not yet visible'}) "
                "before sending again",
            )
            return None
    is_unsettled = unsettled(attempts, workflows)
    source = job.source_version or job.current_version
    # a retry after a failed preflight read has never been judged (no version read is recorded): judge it
    judged = job.status is not JobStatus.PENDING and job.current_version is not None
    if (rt.options.preflight and not judged) or source is None:
        checked = await _preflight(rt, job, is_unsettled)
        if checked is None:
            return None
        source = checked
    if not rt.may_start_upgrades():
        await moves.release(rt, job)
        return None
    # Intent first, then the permit, then the call at once: a commit's latency between permit and send
    # would let the cloud see calls bunched closer than the limiter spaced them.
    # the fence of the claim this intent is recorded under: a later claim of the job by this process (after
    # this one lapsed and was taken over) must not let this call leave
    fence = rt.send_fence(job)
    intent = await rt.store.record_intent(job, worker_id=rt.worker_id, cloud_offset_s=rt.cloud_offset_s())
    if intent is None:
        rt.events.emit("job.intent_lost", job=job.id, proxy=job.proxy_id)
        await moves.release(rt, job)
        return None
    sent_at = None
    async with rt.permit("upgrade") as on_sent:
        sent_at = rt.now()
        t0 = rt.mono()
        outcome = await rt.cloud.upgrade(
            rt.ref(job), source, job.target_version, on_sent=on_sent, may_send=fence
        )
        _observe(rt, "upgrade", outcome, rt.mono() - t0)
        decision = decide(
            outcome,
            attempt=intent.number,
            policy=rt.policy,
            rng=rt.rng,
            stage=Stage.UPGRADE,
            earlier_attempt_unsettled=is_unsettled,
        )
        # the run-wide effects (throttle, a refused credential's stop, the breaker's count) take hold
        # before this call slot frees: no other call leaves on a stale view while the record commits
        moves.effects(rt, decision, note_failure=True)
    answer, items = _answer(outcome, decision, sent_at)
    # the record of what the cloud answered is queued for its commit now: Ctrl-C cannot skip it, and the
    # worker takes its next job meanwhile
    return await moves.apply_answer(
        rt, job, decision, attempt_id=intent.attempt_id, answer=answer, workflows=items
    )


async def _preflight(rt: Runtime, job: JobRow, is_unsettled: bool) -> str | None:
    """Read the proxy's version. Returns the source version to send, or None when the job was finished
    (skipped/flagged), handed to reconcile, or rescheduled here."""
    async with rt.permit("proxy_version") as on_sent:
        t0 = rt.mono()
        info = await rt.cloud.proxy_version(rt.ref(job), on_sent=on_sent)
        _observe(rt, "proxy_version", info, rt.mono() - t0)
    if not isinstance(info, VersionInfo):
        d = decide(info, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT)
        if d.action in (Action.RETRY, Action.RECONCILE) and job.status is JobStatus.RETRY_WAIT:
            moves.effects(rt, d)
            await moves.reschedule(
                rt, job, d.delay or 2.0, reason=d.reason, read_failures=job.read_failures + 1
            )
            return None
        if d.action is Action.RECONCILE:
            d = Decision(Action.RETRY, d.reason, d.rule, delay=2.0)
        await moves.apply(rt, job, d, frm=job.status, facts={"read_failures": job.read_failures + 1})
        return None
    result = preflight.judge(info, source_version=job.source_version, target_version=job.target_version)
    rt.events.emit("preflight.done", job=job.id, proxy=job.proxy_id, verdict=result.verdict.value)
    facts = {
        "current_version": info.current_version,
        "latest_version": info.latest_version,
        "read_failures": 0,
    }
    if result.verdict is preflight.Verdict.UPGRADE:
        await rt.store.set_preflight_facts(
            job,
            worker_id=rt.worker_id,
            current_version=info.current_version,
            latest_version=info.latest_version,
            risk=dict(info.risk) or None,
        )
        return result.source_version
    if result.verdict is preflight.Verdict.SKIP and is_unsettled:
        # at the target after an attempt that may have reached the backend: that attempt may have done it;
        # find its workflow and finish by postflight, never "skipped"
        decision = Decision(
            Action.RECONCILE,
            "already at target after an earlier attempt whose answer proved nothing: finding its workflow",
            "preflight:at-target-after-resend",
        )
        await moves.apply(rt, job, decision, frm=job.status, facts=facts)
        return None
    action = Action.SKIP if result.verdict is preflight.Verdict.SKIP else Action.FLAG
    decision = Decision(action, result.reason, f"preflight:{result.verdict.value}", result.hint)
    await moves.apply(rt, job, decision, frm=job.status, facts=facts)
    return None


def _answer(
    outcome: Answered | HttpFailure | TransportFailure, decision: Decision, sent_at: object
) -> tuple[AttemptAnswer, tuple[NewWorkflow, ...]]:
    from datetime import datetime

    sent = sent_at if isinstance(sent_at, datetime) else None
    if isinstance(outcome, Answered):
        items = tuple(
            NewWorkflow(
                workflow_id=i.workflow_id,
                state=i.state,
                error_message=i.error_message,
                instance_id=i.instance_id,
            )
            for i in outcome.items
        )
        return (
            AttemptAnswer(
                outcome=decision.action.value,
                rule=decision.rule,
                http_status=outcome.http_status,
                request_id=outcome.request_id,
                sent_at=sent,
            ),
            items,
        )
    if isinstance(outcome, HttpFailure):
        return (
            AttemptAnswer(
                outcome=decision.action.value,
                rule=decision.rule,
                http_status=outcome.http_status,
                error_code=outcome.error_code,
                error_msg=outcome.error_msg,
                request_id=outcome.request_id,
                sent_at=sent,
            ),
            (),
        )
    return (
        AttemptAnswer(
            outcome="not_sent" if not outcome.sent else decision.action.value,
            rule=decision.rule,
            transport=outcome.kind.value,
            error_msg=outcome.detail,
            http_status=outcome.http_status,
            request_id=outcome.request_id,
            sent_at=sent if outcome.sent else None,
        ),
        (),
    )


def _observe(rt: Runtime, route: str, outcome: object, latency_s: float) -> None:
    rt.events.emit("call", route=route, outcome=outcome_label(outcome), latency_s=latency_s)
