"""Follow accepted upgrades to their end, then verify the proxy really runs the target version.

ACCEPT only means the cloud queued the work. Each ACCEPTed workflow of the job's latest attempt is polled
(``GET /jobs?id=``) until it ends; a workflow is never polled again once it ended. When all completed, the
proxy's version is read once more (postflight): ``succeeded`` only if it is the target. A failed workflow
goes through the outcome policy like any other outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.outcomes import HttpFailure, TransportFailure, WorkflowInfo
from orchestrator.policy import Action, Decision, Stage, decide, decide_workflow
from orchestrator.preflight import same_version
from orchestrator.reconcile import parse_cloud_time
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.store import JobRow, WorkflowRow

FINAL = frozenset({"Completed", "Failed", "Canceled", "Unauthorized"})


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a job's workflows stand: the pure summary the tracker acts on."""

    open: tuple[WorkflowRow, ...]
    failed: tuple[WorkflowRow, ...]
    completed: int


def summarize(rows: list[WorkflowRow], attempt_id: int | None) -> Progress:
    current = [w for w in rows if w.state == "ACCEPT" and w.workflow_id and w.attempt_id == attempt_id]
    if not current:  # a reconciled workflow from an older schema, or none recorded: all ACCEPT rows
        current = [w for w in rows if w.state == "ACCEPT" and w.workflow_id]
    return Progress(
        open=tuple(w for w in current if w.job_status not in FINAL),
        failed=tuple(w for w in current if w.job_status in FINAL and w.job_status != "Completed"),
        completed=sum(1 for w in current if w.job_status == "Completed"),
    )


async def track(rt: Runtime, job: JobRow) -> None:
    attempt = await rt.store.last_attempt(job.id)
    rows = await rt.store.workflows_of(job.id)
    prog = summarize(rows, attempt.id if attempt else None)
    accepted_at = min((w.created_at for w in rows if w.state == "ACCEPT"), default=job.updated_at)
    ref = rt.ref(job)
    for w in prog.open:
        if rt.stop_requested.is_set():
            break
        assert w.workflow_id is not None
        async with rt.permit() as sent:
            info = await rt.client.job(ref, w.workflow_id, on_sent=sent)
        if isinstance(info, WorkflowInfo):
            ended = parse_cloud_time(info.ended) if info.is_final else None
            await rt.store.update_workflow(
                w.id,
                {
                    "job_status": info.status,
                    "progress": info.progress,
                    "fail_reason": info.fail_reason,
                    "checked_at": rt.now(),
                    "ended_at": (ended or rt.now()) if info.is_final else None,
                },
            )
            rt.events.emit(
                "workflow.status",
                job=job.id,
                workflow=w.workflow_id,
                status=info.status,
                progress=info.progress,
            )
        else:
            d = decide(info, attempt=1, policy=rt.policy, rng=rt.rng, stage=Stage.TRACK)
            if d.action is Action.STOP_RUN or d.throttle:
                rt.plan(d)
            await rt.store.update_workflow(w.id, {"checked_at": rt.now()})
    rows = await rt.store.workflows_of(job.id)
    prog = summarize(rows, attempt.id if attempt else None)
    if prog.open:
        waited = (rt.now() - accepted_at).total_seconds()
        if waited > rt.options.poll_timeout:
            w = prog.open[0]
            last = f"last status {w.job_status or 'not yet visible'}" + (
                f" {w.progress}" if w.progress else ""
            )
            await rt.apply(
                job,
                Decision(
                    Action.FLAG,
                    f"timed out waiting for workflow {w.workflow_id} ({last})",
                    "track:timeout",
                    "check the workflow in the console; when it has ended run: orchestrator retry RUN "
                    "--flagged (the preflight will skip the proxy if it already runs the target)",
                ),
                frm=JobStatus.ACCEPTED,
            )
            return
        await _reschedule(rt, job, rt.options.poll_interval)
        return
    if prog.failed:
        w = prog.failed[0]
        info = WorkflowInfo(
            workflow_id=w.workflow_id or "?", status=w.job_status or "Failed", fail_reason=w.fail_reason
        )
        decision = decide_workflow(info, attempt=max(1, job.attempt_count), policy=rt.policy, rng=rt.rng)
        await rt.apply(job, decision, frm=JobStatus.ACCEPTED)
        return
    await _postflight(rt, job, accepted_at)


async def _postflight(rt: Runtime, job: JobRow, accepted_at: object) -> None:
    async with rt.permit() as sent:
        info = await rt.client.proxy_version(rt.ref(job), on_sent=sent)
    if isinstance(info, HttpFailure | TransportFailure):
        d = decide(info, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.TRACK)
        if d.action in (Action.RETRY, Action.STOP_RUN) or d.throttle:
            rt.plan(d)
            await rt.store.update_job_fields(job.id, {"read_failures": job.read_failures + 1}, rt.now())
            await _reschedule(rt, job, d.delay if d.delay is not None else rt.options.poll_interval)
            return
        await rt.apply(
            job,
            Decision(
                Action.FLAG,
                f"the workflows completed but reading the proxy's version keeps failing: {d.reason}",
                d.rule,
                "check the proxy's version in the console",
            ),
            frm=JobStatus.ACCEPTED,
        )
        return
    facts = {"current_version": info.current_version, "latest_version": info.latest_version}
    if same_version(info.current_version, job.target_version):
        await rt.store.move(
            job.id,
            frm=[JobStatus.ACCEPTED],
            to=JobStatus.SUCCEEDED,
            now=rt.now(),
            fields={**facts, "reason": None, "hint": None, "next_attempt_at": None},
            release=rt.worker_id,
        )
        rt.events.emit("job.succeeded", job=job.id, proxy=job.proxy_id, version=info.current_version)
        return
    await rt.apply(
        job,
        Decision(
            Action.FLAG,
            f"workflow completed but the proxy runs {info.current_version} (target {job.target_version})",
            "postflight:version-mismatch",
            "check the proxy in the console; then: orchestrator retry RUN --flagged",
        ),
        frm=JobStatus.ACCEPTED,
        extra=facts,
    )


async def _reschedule(rt: Runtime, job: JobRow, delay: float) -> None:
    await rt.store.update_job_fields(job.id, {"next_attempt_at": rt.after(delay)}, rt.now())
    await rt.store.release(job.id, rt.worker_id)
