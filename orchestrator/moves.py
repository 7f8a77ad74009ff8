"""The one place a policy ``Decision`` becomes a job move.

``plan_move`` is pure: which status and which job fields a decision asks for. ``apply`` adds the run-wide
effects (a throttle slows the limiter, a refused credential stops the run, a counted failure re-checks the
breaker) and hands the move to the store, with the attempt's answer and workflows when there are any, in
one commit. ``apply_answer`` is the upgrade call's: the answer, its workflows and the move queued for one
commit that the worker does not wait for (``Runtime.defer``). The upgrade step, reconcile and track move
jobs on a decision only through these two; the moves no policy decides are the store's (postflight's
success in ``steps/track.py``, the operator's ``retry``, an inventory change on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from orchestrator.errors import EXIT_USAGE
from orchestrator.policy import Action, Decision
from orchestrator.policy.decide import render_hint
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.store import AttemptAnswer, JobRow, Move, NewWorkflow

ACTION_STATUS: dict[Action, JobStatus] = {
    Action.ACCEPTED: JobStatus.ACCEPTED,
    Action.RETRY: JobStatus.RETRY_WAIT,
    Action.FLAG: JobStatus.FLAGGED,
    Action.FAIL: JobStatus.FAILED,
    Action.SKIP: JobStatus.SKIPPED,
    Action.RECONCILE: JobStatus.UNKNOWN,
    # the job itself did nothing wrong: it stays resendable for the resume after the credential is fixed
    Action.STOP_RUN: JobStatus.RETRY_WAIT,
}


def plan_move(
    decision: Decision,
    *,
    frm: JobStatus,
    now: datetime,
    poll_initial: float,
    facts: Mapping[str, Any] | None = None,
) -> Move:
    """The move ``decision`` asks for from status ``frm`` at ``now`` (the job table's clock). Pure.

    Retry: due after the decision's delay. Reconcile and stop_run: due at once. Accepted: first poll after
    ``poll_initial``; a partial accept keeps its reason, hint and rule until the tracking flags it.
    Flag/fail: the reason, hint and rule, and whether the breaker counts it."""
    to = ACTION_STATUS[decision.action]
    fields: dict[str, Any] = {
        "reason": decision.reason,
        "hint": decision.hint,
        "rule": decision.rule,
        "next_attempt_at": None,
        "counts_failure": decision.counts_failure and to in (JobStatus.FLAGGED, JobStatus.FAILED),
    }
    if decision.action is Action.RETRY:
        fields["next_attempt_at"] = now + timedelta(seconds=max(0.0, decision.delay or 0.0))
    elif decision.action in (Action.RECONCILE, Action.STOP_RUN):
        fields["next_attempt_at"] = now
    elif decision.action is Action.ACCEPTED:
        fields["next_attempt_at"] = now + timedelta(seconds=max(0.0, poll_initial))
        if decision.partial:
            fields["counts_failure"] = decision.counts_failure
        else:
            fields.update(reason=None, hint=None)
    if facts:
        fields.update(facts)
    return Move(frm=frm, to=to, fields=fields)


async def apply(
    rt: Runtime,
    job: JobRow,
    decision: Decision,
    *,
    frm: JobStatus,
    facts: Mapping[str, Any] | None = None,
    attempt_id: int | None = None,
    answer: AttemptAnswer | None = None,
    workflows: tuple[NewWorkflow, ...] = (),
) -> bool:
    """Move ``job`` as ``decision`` says (guarded on ``frm`` and this process's claim), with its run-wide
    effects; with ``attempt_id`` and ``answer``, the attempt's answer and ``workflows`` in the same commit
    (recorded only if the move wins; the upgrade step's answers go through ``apply_answer``). Returns
    whether the move won."""
    effects(rt, decision)
    move = plan_move(decision, frm=frm, now=rt.now(), poll_initial=rt.options.poll_initial, facts=facts)
    move = Move(
        frm=move.frm,
        to=move.to,
        fields=move.fields,
        workflows=workflows,
        attempt_id=attempt_id,
        attempt_answer=answer,
    )
    ok = await rt.store.move(job, move, worker_id=rt.worker_id)
    if (
        ok
        and move.fields.get("counts_failure")
        and move.to in (JobStatus.FLAGGED, JobStatus.FAILED)
        and rt.controls is not None
    ):
        rt.controls.note_failure()
    _moved(rt, job, decision, move, ok)
    return ok


async def apply_answer(
    rt: Runtime,
    job: JobRow,
    decision: Decision,
    *,
    attempt_id: int,
    answer: AttemptAnswer,
    workflows: tuple[NewWorkflow, ...],
) -> asyncio.Future[bool]:
    """The upgrade call's answer, its workflows and the move ``decision`` asks for from in_flight, queued
    for one commit now and handed to ``Runtime.defer``; returns the commit's future (True: the move
    won). The attempt and its workflows are recorded even if the move loses. The decision's run-wide
    effects are the caller's (taken before its call slot freed: ``effects(..., note_failure=True)``);
    the move's event is emitted once it committed. Only the job's identity is read from ``job`` (id,
    run, proxy): its status is the one the step claimed, older than the in_flight its intent recorded.
    Raises ``IllegalMove`` (a bug) and ``DatabaseUnavailable`` (an outage already over budget) before
    anything is queued."""
    move = plan_move(decision, frm=JobStatus.IN_FLIGHT, now=rt.now(), poll_initial=rt.options.poll_initial)
    fut = rt.store.record_answer(
        job, attempt_id, answer, workflows=workflows, move=move, worker_id=rt.worker_id
    )

    def committed(f: asyncio.Future[bool]) -> None:
        if not f.cancelled() and f.exception() is None:
            _moved(rt, job, decision, move, f.result())

    return await rt.defer(fut, committed)


def _moved(rt: Runtime, job: JobRow, decision: Decision, move: Move, ok: bool) -> None:
    rt.lease.dropped(job.id)
    rt.events.emit(
        f"job.{move.to.value}" if ok else "job.move_lost",
        job=job.id,
        proxy=job.proxy_id,
        reason=decision.reason,
        rule=decision.rule,
        hint=render_hint(decision.hint, rt.run_id)
        if move.to in (JobStatus.FLAGGED, JobStatus.FAILED)
        else None,
    )


async def succeed(rt: Runtime, job: JobRow, reason: str, facts: Mapping[str, Any]) -> bool:
    """Postflight verified the target version: accepted -> succeeded. The job's columns keep the facts;
    the event log keeps ``reason`` (which workflow was tracked, or that none was)."""
    move = Move(
        frm=JobStatus.ACCEPTED,
        to=JobStatus.SUCCEEDED,
        fields={
            **facts,
            "reason": None,
            "hint": None,
            "rule": "postflight:at-target",
            "next_attempt_at": None,
        },
        event_reason=reason,
    )
    ok = await rt.store.move(job, move, worker_id=rt.worker_id)
    rt.lease.dropped(job.id)
    rt.events.emit("job.succeeded" if ok else "job.move_lost", job=job.id, proxy=job.proxy_id, reason=reason)
    return ok


def effects(rt: Runtime, decision: Decision, *, note_failure: bool = False) -> None:
    """The run-wide effects of a decision: slow down on throttling, stop the run on a refused credential,
    and (``note_failure``) count a failure for the breaker at once, before its move has committed."""
    if decision.throttle:
        rt.limiter.throttled(decision.retry_after)
        rt.events.emit("run.throttled", retry_after=decision.retry_after)
        if rt.metrics is not None:
            with contextlib.suppress(Exception):
                rt.metrics.throttled()
    if decision.action is Action.STOP_RUN:
        hint = render_hint(decision.hint, rt.run_id)
        rt.request_stop(f"{decision.reason}. {hint or ''}".strip(), exit_code=EXIT_USAGE)
    if (
        note_failure
        and decision.counts_failure
        and decision.action in (Action.FLAG, Action.FAIL)
        and rt.controls is not None
    ):
        rt.controls.note_failure()


async def reschedule(
    rt: Runtime,
    job: JobRow,
    delay: float,
    *,
    reason: str | None = None,
    read_failures: int | None = None,
) -> None:
    """Look at the job again after ``delay`` seconds (no status move), releasing the claim."""
    await rt.store.reschedule(
        job, worker_id=rt.worker_id, due=rt.after(delay), reason=reason, read_failures=read_failures
    )
    rt.lease.dropped(job.id)


async def release(rt: Runtime, job: JobRow) -> None:
    """Give the job's claim back without moving it (status and due time unchanged) and take it off the
    fence, so this process no longer sends it."""
    await rt.store.release(job.id, rt.worker_id)
    rt.lease.dropped(job.id)
