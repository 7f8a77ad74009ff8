"""What happened to an upgrade call whose answer was lost (timeout after sending, reset, garbled body,
or a worker that died between intent and answer)?

Resending blindly could upgrade a proxy twice. So, before anything is resent: read the proxy's version
(already at target: the upgrade happened), then look for the workflow among the project's recent jobs
(``immediate-jobs``: the only way to learn a lost workflow_id). Only when neither shows anything, and the
cloud has had ``reconcile_grace`` seconds to make a new job visible, is the call resent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from orchestrator.cloud.client import RecentJobs
from orchestrator.outcomes import HttpFailure, RecentJob, TransportFailure
from orchestrator.policy import Action, Decision, Stage, decide
from orchestrator.preflight import same_version
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.store import JobRow, NewWorkflow

CLOCK_SKEW = timedelta(minutes=2)  # the cloud's clock vs ours, and its whole-second timestamps
MAX_PAGES = 10
_PROXY_ID = re.compile(r"[0-9a-zA-Z]{32}po\d\d")


@dataclass(frozen=True, slots=True)
class Match:
    job: RecentJob | None
    ambiguous: tuple[RecentJob, ...] = ()


def parse_cloud_time(text: str | None) -> datetime | None:
    if not text:
        return None
    t = text.strip().replace("Z", "+00:00")
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%d %H:%M:%S%z"):
        try:
            return datetime.strptime(t, fmt).astimezone(UTC)
        except ValueError:
            continue
    try:
        parsed = datetime.fromisoformat(t)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def match_recent(
    jobs: Iterable[RecentJob],
    *,
    instance_id: str,
    proxy_id: str,
    sent_at: datetime,
    known: set[str],
) -> Match:
    """Pick the cloud job that is our lost upgrade. Strongest evidence first: our proxy id in the job's
    fields; then a job name about a proxy. Other new jobs on the instance make the answer ambiguous:
    the caller flags rather than guess (a wrong guess either loses a workflow or upgrades twice)."""
    candidates = []
    for j in jobs:
        if j.instance_id != instance_id or j.job_id in known:
            continue
        created = parse_cloud_time(j.created_time)
        if created is None or created < sent_at - CLOCK_SKEW:
            continue
        fields = j.extend_fields or ""
        if any(pid != proxy_id for pid in _PROXY_ID.findall(fields)) and proxy_id not in fields:
            continue  # explicitly about another proxy
        candidates.append(j)
    by_id = [j for j in candidates if proxy_id in (j.extend_fields or "")]
    if len(by_id) == 1:
        return Match(by_id[0])
    by_name = [j for j in candidates if "proxy" in (j.job_name or "").lower()]
    if len(by_id) == 0 and len(by_name) == 1:
        return Match(by_name[0])
    if candidates:
        return Match(None, tuple(candidates))
    return Match(None)


async def reconcile(rt: Runtime, job: JobRow) -> None:
    attempt = await rt.store.last_attempt(job.id)
    sent_at = attempt.sent_at if attempt else job.updated_at
    ref = rt.ref(job)
    async with rt.permit() as sent:
        info = await rt.client.proxy_version(ref, on_sent=sent)
    if isinstance(info, HttpFailure | TransportFailure):
        await _read_failed(
            rt, job, decide(info, attempt=1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT)
        )
        return
    found = await _find_workflow(rt, job, sent_at)
    if found is None:
        return  # rescheduled
    match = found
    attempt_id = attempt.id if attempt else None
    wf: tuple[NewWorkflow, ...] = ()
    if match.job is not None:
        wf = (
            NewWorkflow(
                workflow_id=match.job.job_id,
                state="ACCEPT",
                instance_id=match.job.instance_id,
                source="reconciled",
            ),
        )
    at_target = same_version(info.current_version, job.target_version)
    if at_target:
        await rt.apply(
            job,
            Decision(Action.ACCEPTED, "", "reconcile:at-target"),
            frm=JobStatus.UNKNOWN,
            workflows=wf,
            attempt_id=attempt_id,
            attempt_values={"outcome": "reconciled", "rule": "reconcile:at-target"},
            extra={
                "current_version": info.current_version,
                "reason": "answer was lost; the proxy already runs the target version",
                "next_attempt_at": rt.now(),
            },
        )
        return
    if match.job is not None:
        await rt.apply(
            job,
            Decision(Action.ACCEPTED, "", "reconcile:found-workflow"),
            frm=JobStatus.UNKNOWN,
            workflows=wf,
            attempt_id=attempt_id,
            attempt_values={"outcome": "reconciled", "rule": "reconcile:found-workflow"},
            extra={
                "reason": f"answer was lost; found workflow {match.job.job_id} in the cloud's recent jobs",
                "next_attempt_at": rt.now(),
            },
        )
        return
    if match.ambiguous:
        ids = ", ".join(j.job_id for j in match.ambiguous[:3])
        await rt.apply(
            job,
            Decision(
                Action.FLAG,
                f"answer was lost and the instance has new jobs that may be this upgrade ({ids})",
                "reconcile:ambiguous",
                "check those jobs in the console; if none is this proxy's upgrade run: "
                "orchestrator retry RUN --flagged",
            ),
            frm=JobStatus.UNKNOWN,
            attempt_id=attempt_id,
            attempt_values={"outcome": "lost", "rule": "reconcile:ambiguous"},
        )
        return
    waited = (rt.now() - sent_at).total_seconds()
    if waited < rt.options.reconcile_grace:
        # a new job takes a few seconds to show up: look again before concluding nothing started
        await _reschedule(rt, job, rt.options.reconcile_grace - waited + 0.05)
        return
    await rt.apply(
        job,
        Decision(
            Action.RETRY,
            "previous call's answer was lost; the cloud shows no upgrade started: resending",
            "reconcile:nothing-started",
            delay=0.0,
        ),
        frm=JobStatus.UNKNOWN,
        attempt_id=attempt_id,
        attempt_values={"outcome": "lost", "rule": "reconcile:nothing-started"},
    )


async def _find_workflow(rt: Runtime, job: JobRow, sent_at: datetime) -> Match | None:
    ref = rt.ref(job)
    known = await rt.store.known_workflow_ids(job.run_id)
    seen: list[RecentJob] = []
    for page in range(MAX_PAGES):
        async with rt.permit() as sent:
            res = await rt.client.immediate_jobs(
                ref, start_time=sent_at - CLOCK_SKEW, offset=page * 50, limit=50, on_sent=sent
            )
        if not isinstance(res, RecentJobs):
            d = decide(res, attempt=1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT)
            await _read_failed(rt, job, d)
            return None
        seen.extend(res.jobs)
        if len(res.jobs) < 50 or len(seen) >= res.total_count:
            break
    return match_recent(
        seen, instance_id=job.instance_id, proxy_id=job.proxy_id, sent_at=sent_at, known=known
    )


async def _read_failed(rt: Runtime, job: JobRow, decision: Decision) -> None:
    """A read failed while reconciling: never resend on that basis; look again later (or stop/flag)."""
    if decision.action in (Action.RETRY, Action.RECONCILE, Action.STOP_RUN):
        rt.plan(decision)  # run-wide effects (throttle, stop)
        await _reschedule(
            rt,
            job,
            decision.delay if decision.delay is not None else 2.0,
            reason=f"checking a lost answer: {decision.reason}",
        )
        return
    await rt.apply(job, decision, frm=JobStatus.UNKNOWN)


async def _reschedule(rt: Runtime, job: JobRow, delay: float, reason: str | None = None) -> None:
    fields: dict[str, object] = {"next_attempt_at": rt.after(delay)}
    if reason:
        fields["reason"] = reason
    await rt.store.update_job_fields(job.id, fields, rt.now())
    await rt.store.release(job.id, rt.worker_id)
