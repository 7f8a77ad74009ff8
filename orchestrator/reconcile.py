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
PAGE = 50  # the API allows 10, 20 or 50
MAX_PAGES = 40  # 2,000 jobs in one call's time window: beyond that, ask a person
_PROXY_ID = re.compile(r"[0-9a-zA-Z]{32}po\d\d")


@dataclass(frozen=True, slots=True)
class Match:
    """The cloud jobs that are our lost upgrade: one per node of the proxy (a multi-node proxy answers one
    workflow per node, each naming the proxy); or candidates we cannot tell apart (``ambiguous``)."""

    jobs: tuple[RecentJob, ...] = ()
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
    if by_id:
        # every job naming our proxy since the call left is a node workflow of that call (one upgrade
        # per instance is under way at a time, and earlier attempts' workflows are already recorded)
        return Match(tuple(by_id))
    by_name = [j for j in candidates if "proxy" in (j.job_name or "").lower()]
    if len(by_name) == 1:
        return Match((by_name[0],))
    if candidates:
        return Match((), tuple(candidates))
    return Match()


async def reconcile(rt: Runtime, job: JobRow) -> None:
    attempt = await rt.store.last_attempt(job.id)
    sent_at = attempt.sent_at if attempt else job.updated_at
    ref = rt.ref(job)
    async with rt.permit() as sent:
        info = await rt.client.proxy_version(ref, on_sent=sent)
    if isinstance(info, HttpFailure | TransportFailure):
        await _read_failed(
            rt,
            job,
            decide(info, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT),
        )
        return
    found = await _find_workflow(rt, job, sent_at)
    if found is None:
        return  # rescheduled
    match = found
    attempt_id = attempt.id if attempt else None
    wf = tuple(
        NewWorkflow(workflow_id=j.job_id, state="ACCEPT", instance_id=j.instance_id, source="reconciled")
        for j in match.jobs
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
    if match.jobs:
        found_ids = ", ".join(j.job_id for j in match.jobs)
        await rt.apply(
            job,
            Decision(Action.ACCEPTED, "", "reconcile:found-workflow"),
            frm=JobStatus.UNKNOWN,
            workflows=wf,
            attempt_id=attempt_id,
            attempt_values={"outcome": "reconciled", "rule": "reconcile:found-workflow"},
            extra={
                "reason": f"answer was lost; found workflow {found_ids} in the cloud's recent jobs",
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
    """Page through the project's jobs created between the call's departure (minus clock skew) and its
    timeout (plus skew). None: the caller was rescheduled (a read failed, or the listing could not be
    read to its end): never conclude "nothing started" from a partial listing."""
    ref = rt.ref(job)
    known = await rt.store.known_workflow_ids(job.run_id)
    start = sent_at - CLOCK_SKEW
    end = sent_at + timedelta(seconds=rt.options.timeout) + CLOCK_SKEW
    seen: list[RecentJob] = []
    page = 0
    while True:
        async with rt.permit() as sent:
            res = await rt.client.immediate_jobs(
                ref, start_time=start, end_time=end, offset=page * PAGE, limit=PAGE, on_sent=sent
            )
        if not isinstance(res, RecentJobs):
            d = decide(
                res, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT
            )
            await _read_failed(rt, job, d)
            return None
        seen.extend(res.jobs)
        page += 1
        if len(res.jobs) < PAGE or len(seen) >= res.total_count:
            break
        if page >= MAX_PAGES:
            await _read_failed(
                rt,
                job,
                Decision(
                    Action.FLAG,
                    f"answer was lost and the project lists over {len(seen)} jobs in the call's time window: "
                    "cannot tell whether the upgrade started",
                    "reconcile:listing-too-long",
                    "check the proxy's version and recent jobs in the console; if nothing started: "
                    "orchestrator retry RUN --flagged",
                ),
            )
            return None
    return match_recent(
        seen, instance_id=job.instance_id, proxy_id=job.proxy_id, sent_at=sent_at, known=known
    )


async def _read_failed(rt: Runtime, job: JobRow, decision: Decision) -> None:
    """A read failed while reconciling: never resend on that basis; look again later, or, when the reads
    keep failing, hand the job to an operator (whether the lost call started an upgrade is unknown)."""
    if decision.action in (Action.RETRY, Action.RECONCILE, Action.STOP_RUN):
        rt.plan(decision)  # run-wide effects (throttle, stop)
        await _reschedule(
            rt,
            job,
            decision.delay if decision.delay is not None else 2.0,
            reason=f"checking a lost answer: {decision.reason}",
            read_failures=job.read_failures + 1,
        )
        return
    if decision.action is Action.FAIL:
        decision = Decision(
            Action.FLAG,
            f"answer was lost and checking what the cloud did keeps failing: {decision.reason}",
            decision.rule,
            "check the proxy's version and recent jobs in the console; if nothing started: "
            "orchestrator retry RUN --flagged",
        )
    await rt.apply(job, decision, frm=JobStatus.UNKNOWN)


async def _reschedule(
    rt: Runtime, job: JobRow, delay: float, reason: str | None = None, read_failures: int | None = None
) -> None:
    fields: dict[str, object] = {"next_attempt_at": rt.after(delay)}
    if read_failures is not None:
        fields["read_failures"] = read_failures
    if reason:
        fields["reason"] = reason
    await rt.store.update_job_fields(job.id, fields, rt.now())
    await rt.store.release(job.id, rt.worker_id)
