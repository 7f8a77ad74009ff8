"""The reconcile step: what happened to upgrade calls whose answers proved nothing (lost, timed out, reset,
a gateway 5xx or a malformed body, a process that stopped between intent and answer)?

Resending blindly could upgrade a proxy twice. So, before anything is resent: read the proxy's version
(already at target: the upgrade happened), then look for the workflow among the project's recent jobs
(``immediate-jobs``: the only way to learn a lost workflow_id), matched on the CLOUD's clock: every
attempt stores the measured offset of its sender's clock to the cloud's (``Date`` headers), instead of
assuming the clocks agree. "Nothing started" is concluded, and the call resent, only after every earlier
attempt can no longer leave (its sender's send deadline passed: the fence), its own timeout passed, and
the cloud had ``reconcile_grace`` seconds to show a new job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from orchestrator import moves
from orchestrator.cloud.api import RecentJobs
from orchestrator.outcomes import RecentJob, VersionInfo, outcome_label
from orchestrator.policy import Action, Decision, Stage, decide
from orchestrator.policy.decide import decide_nothing_started
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.store import AttemptAnswer, AttemptRow, JobRow, NewWorkflow
from orchestrator.versions import same_version

UNMEASURED_SKEW = timedelta(minutes=2)  # the cloud's clock never measured (no answer carried a Date)
CREATED_RESOLUTION = timedelta(seconds=1)  # created_time has whole seconds
PAGE = 50  # the API allows 10, 20 or 50
MAX_PAGES = 40  # 2,000 jobs in the attempts' time window: beyond that, ask a person
_PROXY_ID = re.compile(r"[0-9a-zA-Z]{32}po\d\d")
LOOK_HINT = (
    "check the proxy's version and the instance's recent tasks in the console; if nothing started: "
    "orchestrator retry {run} --flagged"
)


@dataclass(frozen=True, slots=True)
class Match:
    """The cloud jobs that are our lost upgrade: one per node of the proxy (a multi-node proxy answers one
    workflow per node, each naming the proxy); or candidates we cannot tell apart (``ambiguous``)."""

    jobs: tuple[RecentJob, ...] = ()
    ambiguous: tuple[RecentJob, ...] = ()


def parse_cloud_time(text: str | None) -> datetime | None:
    """A cloud timestamp (``2026-12-05T01:02:03Z``, with an offset, or with fractions) as aware UTC."""
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
    since: datetime,
    known: set[str],
) -> Match:
    """Pick the cloud jobs that are our lost upgrade (``since`` on the cloud's clock). Strongest evidence
    first: our proxy id in the job's fields; then one job name about a proxy. Other new jobs on the
    instance make the answer ambiguous: the caller flags rather than guess (a wrong guess either loses a
    workflow or upgrades twice). Pure."""
    candidates = []
    for j in jobs:
        if j.instance_id != instance_id or j.job_id in known:
            continue
        created = parse_cloud_time(j.created_time)
        if created is None or created < since:
            continue
        fields = j.extend_fields or ""
        if any(pid != proxy_id for pid in _PROXY_ID.findall(fields)) and proxy_id not in fields:
            continue  # explicitly about another proxy
        candidates.append(j)
    by_id = [j for j in candidates if proxy_id in (j.extend_fields or "")]
    if by_id:
        return Match(tuple(by_id))
    by_name = [j for j in candidates if "proxy" in (j.job_name or "").lower()]
    if len(by_name) == 1:
        return Match((by_name[0],))
    if candidates:
        return Match((), tuple(candidates))
    return Match()


@dataclass(frozen=True, slots=True)
class Window:
    """Where and until when to look: the cloud-clock span the attempts' jobs may have been created in, and
    the job-table-clock moment after which "nothing started" may be concluded."""

    start: datetime  # cloud clock
    end: datetime  # cloud clock
    settle_at: datetime  # job table clock


def search_window(
    attempts: list[AttemptRow],
    *,
    current_offset_s: float | None,
    uncertainty_s: float | None,
    timeout_s: float,
    grace_s: float,
    intent_deadline: datetime | None,
) -> Window:
    """Pure: the span to search and the settle time, from the attempts that may have reached the backend."""
    sent = [a for a in attempts if a.outcome not in ("not_sent",)] or attempts
    first = min(a.sent_at for a in sent)
    last = max(a.sent_at for a in sent)

    def cloud(a_sent: datetime, off: float | None) -> datetime:
        return a_sent + timedelta(seconds=off if off is not None else (current_offset_s or 0.0))

    offsets = [a.cloud_offset_s for a in sent]
    measured = current_offset_s is not None or any(o is not None for o in offsets)
    slack = (
        timedelta(seconds=(uncertainty_s or 1.0) + 2.0) + CREATED_RESOLUTION if measured else UNMEASURED_SKEW
    )
    start = min(cloud(a.sent_at, a.cloud_offset_s) for a in sent) - slack
    end = max(cloud(a.sent_at, a.cloud_offset_s) for a in sent) + timedelta(seconds=timeout_s) + slack
    # When can no attempt have any more effect? An attempt answered by a server (a gateway 5xx page, a
    # malformed 200) ended when its answer came; one whose answer never came (timeout, reset, a sender that
    # stopped) may act until its own timeout, and, when its sender stopped before recording anything, until
    # that sender's send deadline (the fence: it will never send after it).
    ends = [
        a.answered_at
        if a.http_status is not None and a.answered_at is not None
        else a.sent_at + timedelta(seconds=timeout_s)
        for a in sent
    ]
    settle = max(ends)
    if sent[-1].answered_at is None and intent_deadline is not None:
        settle = max(settle, intent_deadline)
    del first, last
    return Window(start=start, end=end, settle_at=settle + timedelta(seconds=grace_s))


async def run_reconcile(rt: Runtime, job: JobRow) -> None:
    """Settle one ``unknown`` job: accepted (tracking follows), flagged, or resent after it settled
    (see the module docstring); rescheduled while a read fails or the settle time has not passed. Cloud
    failures are outcomes for the policy; store errors propagate (``DatabaseUnavailable`` once the outage
    budget is spent)."""
    attempts, workflows = await rt.store.attempts_and_workflows(job.id)
    last = attempts[-1] if attempts else None
    async with rt.permit("proxy_version") as on_sent:
        t0 = rt.mono()
        info = await rt.cloud.proxy_version(rt.ref(job), on_sent=on_sent)
        rt.events.emit("call", route="proxy_version", outcome=outcome_label(info), latency_s=rt.mono() - t0)
    if not isinstance(info, VersionInfo):
        d = decide(info, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT)
        await _read_failed(rt, job, d)
        return
    if not attempts:
        # nothing was ever recorded as sent for this job (should not happen): treat as never sent
        await moves.apply(
            rt,
            job,
            Decision(
                Action.RETRY, "no upgrade attempt is recorded: sending", "reconcile:no-attempt", delay=0.0
            ),
            frm=JobStatus.UNKNOWN,
        )
        return
    clock = rt.cloud.clock
    offset = None if clock.offset_s is None else clock.offset_s - rt.store.db_offset_s
    win = search_window(
        attempts,
        current_offset_s=offset,
        uncertainty_s=clock.uncertainty_s,
        timeout_s=rt.options.timeout,
        grace_s=rt.options.reconcile_grace,
        intent_deadline=job.intent_deadline,
    )
    found = await _find_workflow(rt, job, win, {w.workflow_id for w in workflows if w.workflow_id})
    if found is None:
        return  # rescheduled or flagged
    wf = tuple(
        NewWorkflow(workflow_id=j.job_id, state="ACCEPT", instance_id=j.instance_id, source="reconciled")
        for j in found.jobs
    )
    facts = {
        "current_version": info.current_version,
        "latest_version": info.latest_version,
        "read_failures": 0,
    }
    attempt_id = last.id if last else None
    if found.jobs:
        ids = ", ".join(j.job_id for j in found.jobs)
        await _accept(
            rt,
            job,
            f"the answer proved nothing; found workflow {ids} in the cloud's recent jobs",
            "reconcile:found-workflow",
            wf,
            attempt_id,
            facts,
        )
        return
    if same_version(info.current_version, job.target_version):
        if rt.now() < win.settle_at:
            # the upgrade happened; its workflow may not be listed yet: wait for the listing to catch up
            # rather than lose the workflow id from the audit trail
            wait = (win.settle_at - rt.now()).total_seconds() + 0.05
            await moves.reschedule(
                rt,
                job,
                min(wait, rt.options.reconcile_grace or wait),
                reason="the proxy runs the target: looking for the workflow that did it",
            )
            return
        await _accept(
            rt,
            job,
            "the answer proved nothing and the proxy already runs the target; no workflow of it was found",
            "reconcile:at-target",
            (),
            attempt_id,
            facts,
        )
        return
    if found.ambiguous:
        ids = ", ".join(j.job_id for j in found.ambiguous[:3])
        await moves.apply(
            rt,
            job,
            Decision(
                Action.FLAG,
                f"the answer proved nothing and the instance has new jobs that may be this upgrade ({ids})",
                "reconcile:ambiguous",
                "check those jobs in the console; if none is this proxy's upgrade: orchestrator retry {run} "
                "--flagged",
                counts_failure=True,
            ),
            frm=JobStatus.UNKNOWN,
            attempt_id=attempt_id,
            answer=AttemptAnswer(outcome="lost", rule="reconcile:ambiguous"),
        )
        return
    if rt.now() < win.settle_at:
        # a call may still leave (its sender's fence) or be processed, or its job not be visible yet
        wait = (win.settle_at - rt.now()).total_seconds() + 0.05
        await moves.reschedule(rt, job, wait, reason="the answer proved nothing: waiting before concluding")
        return
    decision = decide_nothing_started(
        attempt=max(1, job.attempt_count), policy=rt.policy, rule=last.rule if last else None, rng=rt.rng
    )
    await moves.apply(
        rt,
        job,
        decision,
        frm=JobStatus.UNKNOWN,
        attempt_id=attempt_id,
        answer=AttemptAnswer(outcome="lost", rule=decision.rule),
        facts=facts,
    )


async def _accept(
    rt: Runtime,
    job: JobRow,
    reason: str,
    rule: str,
    wf: tuple[NewWorkflow, ...],
    attempt_id: int | None,
    facts: Mapping[str, object],
) -> None:
    await moves.apply(
        rt,
        job,
        Decision(Action.ACCEPTED, reason, rule),
        frm=JobStatus.UNKNOWN,
        workflows=wf,
        attempt_id=attempt_id,
        answer=AttemptAnswer(outcome="reconciled", rule=rule),
        facts={**facts, "reason": reason, "next_attempt_at": rt.now()},
    )


async def _find_workflow(rt: Runtime, job: JobRow, win: Window, own: set[str]) -> Match | None:
    """Page through the project's jobs created in the window. None: the caller was rescheduled or flagged
    (a read failed, or the listing could not be read to its end): never conclude "nothing started" from a
    partial listing."""
    seen: list[RecentJob] = []
    page = 0
    ref = rt.ref(job)
    while True:
        async with rt.permit("immediate_jobs") as on_sent:
            t0 = rt.mono()
            res = await rt.cloud.immediate_jobs(
                ref, start_time=win.start, end_time=win.end, offset=page * PAGE, limit=PAGE, on_sent=on_sent
            )
            rt.events.emit(
                "call", route="immediate_jobs", outcome=outcome_label(res), latency_s=rt.mono() - t0
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
                    f"the answer proved nothing and the project lists over {len(seen)} jobs in the call's "
                    "time window: cannot tell whether the upgrade started",
                    "reconcile:listing-too-long",
                    LOOK_HINT,
                    counts_failure=True,
                ),
            )
            return None
    # a workflow this job already holds (an earlier attempt's) is not a new finding; one another job owns
    # is never taken for this one
    candidates = {j.job_id for j in seen} - own
    taken = await rt.store.known_workflow_ids(candidates)
    return match_recent(
        seen, instance_id=job.instance_id, proxy_id=job.proxy_id, since=win.start, known=taken | own
    )


async def _read_failed(rt: Runtime, job: JobRow, decision: Decision) -> None:
    """A read failed while reconciling: never resend on that basis; look again later, or, when the reads
    keep failing, hand the job to an operator (whether the call started an upgrade is unknown)."""
    if decision.action in (Action.RETRY, Action.RECONCILE, Action.STOP_RUN):
        moves.effects(rt, decision)
        await moves.reschedule(
            rt,
            job,
            decision.delay if decision.delay is not None else 2.0,
            reason=f"checking an answer that proved nothing: {decision.reason}",
            read_failures=job.read_failures + 1,
        )
        return
    if decision.action is Action.FAIL or decision.action is Action.SKIP:
        decision = Decision(
            Action.FLAG,
            f"the answer proved nothing and checking what the cloud did keeps failing: {decision.reason}",
            decision.rule,
            LOOK_HINT,
            counts_failure=True,
        )
    await moves.apply(rt, job, decision, frm=JobStatus.UNKNOWN)
