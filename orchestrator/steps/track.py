"""The track step: follow accepted upgrades to their end, then verify the proxy runs the target version.

ACCEPT only means the cloud queued the work. Each ACCEPTed workflow of the job is polled (``GET /jobs?id=``)
until it ends; a workflow is never polled again once it ended. When all completed, the proxy's version is
read once more (postflight): ``succeeded`` only if it is the target. A failed workflow goes through the
outcome policy like any other outcome. A partial accept (some nodes refused) is flagged once its accepted
workflows ended, never resent while they run. Postflight never says a workflow completed unless one was
tracked to its end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from orchestrator import moves
from orchestrator.outcomes import VersionInfo, WorkflowInfo, outcome_label
from orchestrator.policy import Action, Decision, Stage, decide, decide_workflow
from orchestrator.policy.decide import PARTIAL_ACCEPT_RULE
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.store import JobRow, WorkflowRow
from orchestrator.versions import same_version

FINAL = frozenset({"Completed", "Failed", "Canceled", "Unauthorized"})


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a job's workflows stand: the pure summary the tracker acts on."""

    open: tuple[WorkflowRow, ...]
    failed: tuple[WorkflowRow, ...]
    completed: tuple[WorkflowRow, ...]


def summarize(rows: list[WorkflowRow]) -> Progress:
    """Every accepted workflow with an id counts (a job may hold the workflows of several attempts: a
    reconciled one and a resend's); only their own status says whether they ended."""
    current = [w for w in rows if w.state == "ACCEPT" and w.workflow_id]
    return Progress(
        open=tuple(w for w in current if w.job_status not in FINAL),
        failed=tuple(w for w in current if w.job_status in FINAL and w.job_status != "Completed"),
        completed=tuple(w for w in current if w.job_status == "Completed"),
    )


def current_round(rows: list[WorkflowRow]) -> list[WorkflowRow]:
    """The workflows of the job's latest accepted attempt (reconcile attaches what it finds to the latest
    attempt). A job re-queued after a failed workflow keeps that workflow's row: its end must not decide
    the resend's round, nor its age the resend's poll timeout."""
    ids = [w.attempt_id for w in rows if w.state == "ACCEPT" and w.workflow_id and w.attempt_id is not None]
    if not ids:
        return rows
    latest = max(ids)
    return [w for w in rows if w.attempt_id is None or w.attempt_id == latest]


async def poll_open_workflows(rt: Runtime, job: JobRow, rows: list[WorkflowRow]) -> WorkflowRow | None:
    """Poll every accepted workflow of ``job`` not known to have ended; returns one still running, if any."""
    still: WorkflowRow | None = None
    for w in summarize(rows).open:
        if rt.stop_requested.is_set():
            return w
        info = await _poll(rt, job, w)
        if info is None or not info.is_final:
            still = still or (replace(w, job_status=info.status) if info else w)
    return still


async def _poll(rt: Runtime, job: JobRow, w: WorkflowRow) -> WorkflowInfo | None:
    assert w.workflow_id is not None
    async with rt.permit("job") as on_sent:
        t0 = rt.mono()
        info = await rt.cloud.job(rt.ref(job), w.workflow_id, on_sent=on_sent)
        rt.events.emit("call", route="job", outcome=_label(info), latency_s=rt.mono() - t0)
    if isinstance(info, WorkflowInfo):
        ended: datetime | None = None
        if info.is_final:
            # the cloud's `ended` has whole seconds: never before we recorded the workflow (a report
            # would show it ending before it was sent), never after this answer
            now = rt.now()
            ended = min(max(_cloud_time(rt, info.ended) or now, w.created_at), now)
        await rt.store.record_workflow_status(
            w.id, status=info.status, progress=info.progress, fail_reason=info.fail_reason, ended_at=ended
        )
        rt.events.emit("workflow.status", job=job.id, workflow=w.workflow_id, status=info.status)
        return info
    d = decide(info, attempt=1, policy=rt.policy, rng=rt.rng, stage=Stage.TRACK)
    if d.action is Action.STOP_RUN or d.throttle:
        moves.effects(rt, d)
    await rt.store.record_workflow_status(w.id, status=None, progress=None, fail_reason=None, ended_at=None)
    return None


async def run_track(rt: Runtime, job: JobRow) -> None:
    """Poll the job's open workflows; when all ended, decide (failed, partial) or run the postflight;
    otherwise look again after ``poll_interval`` seconds, flagging a job whose workflows outlive
    ``poll_timeout``. Cloud failures are outcomes for the policy; store errors propagate."""
    rows = current_round(await rt.store.workflows_of(job.id))
    accepted_at = min((w.created_at for w in rows if w.state == "ACCEPT"), default=job.updated_at)
    await poll_open_workflows(rt, job, rows)
    rows = current_round(await rt.store.workflows_of(job.id))
    prog = summarize(rows)
    if prog.open:
        waited = (rt.now() - accepted_at).total_seconds()
        if waited > rt.options.poll_timeout:
            w = prog.open[0]
            last = f"last status {w.job_status or 'not yet visible'}" + (
                f" {w.progress}" if w.progress else ""
            )
            await moves.apply(
                rt,
                job,
                Decision(
                    Action.FLAG,
                    f"timed out waiting for workflow {w.workflow_id} ({last}) after {waited:.0f}s",
                    "track:timeout",
                    "check the workflow in the console; when it has ended run: orchestrator retry {run} "
                    "--flagged (the preflight skips the proxy if it already runs the target)",
                    counts_failure=True,
                ),
                frm=JobStatus.ACCEPTED,
            )
            return
        await moves.reschedule(rt, job, rt.options.poll_interval)
        return
    if prog.failed:
        w = prog.failed[0]
        info = WorkflowInfo(
            workflow_id=w.workflow_id or "?", status=w.job_status or "Failed", fail_reason=w.fail_reason
        )
        decision = decide_workflow(info, attempt=max(1, job.attempt_count), policy=rt.policy, rng=rt.rng)
        await moves.apply(rt, job, decision, frm=JobStatus.ACCEPTED)
        return
    if job.rule == PARTIAL_ACCEPT_RULE:
        ids = ", ".join(w.workflow_id or "?" for w in prog.completed)
        await moves.apply(
            rt,
            job,
            Decision(
                Action.FLAG,
                f"{job.reason or 'partially accepted'}; the accepted nodes' workflows completed ({ids})",
                PARTIAL_ACCEPT_RULE,
                job.hint,
                counts_failure=job.counts_failure,
            ),
            frm=JobStatus.ACCEPTED,
        )
        return
    await _postflight(rt, job, prog)


async def _postflight(rt: Runtime, job: JobRow, prog: Progress) -> None:
    async with rt.permit("proxy_version") as on_sent:
        t0 = rt.mono()
        info = await rt.cloud.proxy_version(rt.ref(job), on_sent=on_sent)
        rt.events.emit("call", route="proxy_version", outcome=_label(info), latency_s=rt.mono() - t0)
    if not isinstance(info, VersionInfo):
        d = decide(info, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.TRACK)
        if d.action in (Action.RETRY, Action.STOP_RUN) or d.throttle:
            moves.effects(rt, d)
            delay = d.delay if d.delay is not None else rt.options.poll_interval
            await moves.reschedule(rt, job, delay, read_failures=job.read_failures + 1)
            return
        await moves.apply(
            rt,
            job,
            Decision(
                Action.FLAG,
                f"reading the proxy's version after the upgrade keeps failing: {d.reason}",
                d.rule,
                "check the proxy's version in the console",
                counts_failure=True,
            ),
            frm=JobStatus.ACCEPTED,
        )
        return
    facts = {
        "current_version": info.current_version,
        "latest_version": info.latest_version,
        "read_failures": 0,
    }
    tracked = ", ".join(w.workflow_id or "?" for w in prog.completed)
    if same_version(info.current_version, job.target_version):
        reason = (
            f"workflow {tracked} completed; the proxy runs {info.current_version}"
            if tracked
            else f"the proxy runs {info.current_version}; no workflow of this run was found to track"
        )
        await moves.succeed(rt, job, reason, facts)
        return
    what = (
        f"workflow {tracked} completed but the proxy runs {info.current_version}"
        if tracked
        else f"no workflow was tracked to its end and the proxy runs {info.current_version}"
    )
    await moves.apply(
        rt,
        job,
        Decision(
            Action.FLAG,
            f"{what} (target {job.target_version})",
            "postflight:version-mismatch",
            "check the proxy in the console; then: orchestrator retry {run} --flagged",
            counts_failure=True,
        ),
        frm=JobStatus.ACCEPTED,
        facts=facts,
    )


def _cloud_time(rt: Runtime, text: str | None) -> datetime | None:
    """A cloud timestamp on the job table's clock (the cloud's offset measured, not assumed)."""
    from orchestrator.steps.reconcile import parse_cloud_time

    t = parse_cloud_time(text)
    if t is None:
        return None
    from datetime import timedelta

    off = rt.cloud_offset_s()
    return t - timedelta(seconds=off or 0.0)


def _label(outcome: object) -> str:
    return outcome_label(outcome)
