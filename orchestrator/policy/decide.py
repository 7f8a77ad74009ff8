"""The pure decision: given what a call came back with, what the job does next.

No I/O and no clock: the caller turns ``Decision.delay`` into a due time with its own clock, and passes the
random source so delays are reproducible in tests. Every decision names the rule that produced it, so an
operator can see in the report why a job was retried, flagged or failed, and change that rule. The
classification these functions implement, and every rule name, is in docs/policy.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    Outcome,
    TransportFailure,
    TransportKind,
    UpdateItem,
    WorkflowInfo,
)
from orchestrator.policy.backoff import backoff_delay, clean_retry_after, retry_delay
from orchestrator.policy.rules import (
    GUARD_ALREADY_LATEST,
    GUARD_BUSY,
    GUARD_SKIP,
    RUN_PLACEHOLDER,
    Action,
    Policy,
    Rule,
    Stage,
    Subject,
)

ACCEPTED_RULE = "default:accepted"  # implicit: every item ACCEPT (not a rule, cannot be overridden)
PARTIAL_ACCEPT_RULE = "default:partial-accept"  # implicit: some items ACCEPT, the others refused
NOTHING_STARTED_RULE = "reconcile:nothing-started"  # decide_nothing_started: resend or give up
MAX_REASON = 400

# When items disagree the job takes the most severe verdict.
SEVERITY: dict[Action, int] = {
    Action.SKIP: 0,
    Action.RETRY: 1,
    Action.RECONCILE: 2,
    Action.FLAG: 3,
    Action.FAIL: 4,
    Action.STOP_RUN: 5,
}

# Shown once the accepted workflows of a partially accepted job have ended (the engine tracks them first).
PARTIAL_HINT_HEAD = "Some nodes were refused while the others were upgraded. "
PARTIAL_HINT_CAUSE = (
    "Read the reason, fix what the cloud refused (or wait until the instance's other operation ends), "
    "then run: orchestrator retry {run} --flagged"
)
EXHAUSTED_HINT = (
    "The failure looked transient but did not clear: check the cloud's health and the instance in the "
    "console, then run: orchestrator retry {run} --failed"
)
NOTHING_STARTED_HINT = (
    "No answer proved a refusal, yet the cloud shows no upgrade started: check the proxy's version and "
    "the instance's recent tasks in the console, then run: orchestrator retry {run} --failed"
)

_rng = random.Random()


@dataclass(frozen=True, slots=True)
class Decision:
    """What a job does next, and why.

    ``partial`` is only ever True with ``Action.ACCEPTED``: some nodes were accepted and others refused.
    The engine tracks the accepted workflows to their end like any other, and then flags the job with this
    ``reason`` and ``hint`` (and ``counts_failure``), unless a workflow failed (its own flag then wins).
    ``counts_failure`` is True when the job this decision ends (flag/fail, or the flag after a partial
    accept) counts for the failure breaker; it is always False for retry, reconcile, skip and stop_run.
    Hints may contain ``{run}`` (``RUN_PLACEHOLDER``): fill it with ``render_hint``.
    """

    action: Action
    reason: str  # one line, at most MAX_REASON characters: "HTTP 409 DBS.200019: another operation ..."
    rule: str  # name of the matched rule ("default:busy" or the operator's rule name)
    hint: str | None = None  # the operator's next step (for FLAG/FAIL/STOP_RUN, and partial ACCEPTED)
    delay: float | None = None  # seconds until the next attempt (RETRY only), Retry-After already folded in
    throttle: bool = False  # the answer says the gateway is throttling: slow the whole run down
    retry_after: float | None = None  # the server's Retry-After in seconds, for the run-wide limiter
    counts_failure: bool = False  # the job this ends counts for the failure breaker (the rule's ``counts``)
    partial: bool = False  # ACCEPTED with some nodes refused: track, then flag with reason and hint


def decide(
    outcome: Outcome,
    *,
    attempt: int,
    policy: Policy,
    rng: random.Random | None = None,
    stage: Stage = Stage.UPGRADE,
    earlier_attempt_unsettled: bool = False,
) -> Decision:
    """Decide on one call's outcome.

    ``attempt`` is the 1-based number of the attempt that produced it (for reads: the number of reads in a
    row that failed, this one included). ``earlier_attempt_unsettled`` (upgrade stage only, ignored
    elsewhere) says that an earlier upgrade attempt of the same job may have reached the backend and no
    workflow of it is known: its outcome was not a proven refusal and not a failure before sending, even if
    reconcile since found nothing (the cloud's job list can lag). Then an answer meaning "already at
    target" (400 DBS.05000008), "another operation is in progress" (the busy codes) or anything else the
    policy would skip may be that attempt's doing: the guards ``default:resend-met-*`` reconcile instead.

    Raises ValueError when ``attempt`` < 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    r = rng if rng is not None else _rng
    unsettled = earlier_attempt_unsettled and stage is Stage.UPGRADE
    if isinstance(outcome, Answered):
        decision = _decide_answered(outcome, attempt=attempt, policy=policy, rng=r, stage=stage)
    elif isinstance(outcome, HttpFailure):
        subject = Subject(
            stage=stage,
            http_status=outcome.http_status,
            error_code=outcome.error_code,
            message=outcome.error_msg,
        )
        retry_after = clean_retry_after(outcome.retry_after)
        reason = _http_reason(outcome)
        guard = _guard(subject) if unsettled else None
        if guard is not None:
            return _guarded(guard, reason, retry_after)
        rule = policy.first_match(subject)
        decision = _finish(rule, reason, attempt, policy, r, rule.throttle, retry_after)
    else:
        subject = Subject(stage=stage, transport=outcome.kind, sent=outcome.sent)
        rule = policy.first_match(subject)
        decision = _finish(rule, _transport_reason(outcome), attempt, policy, r, rule.throttle, None)
    if unsettled and decision.action is Action.SKIP:
        return _guarded(GUARD_SKIP, decision.reason, decision.retry_after)
    return decision


def decide_workflow(
    info: WorkflowInfo, *, attempt: int, policy: Policy, rng: random.Random | None = None
) -> Decision:
    """Decide on a workflow that ended without completing (Failed, Canceled, Unauthorized, or unknown).

    Completed is the caller's business (postflight), and a workflow still Pending/Running has not ended:
    passing either raises ValueError, as does ``attempt`` < 1.
    """
    if info.status in ("Completed", "Pending", "Running"):
        raise ValueError(f"workflow status {info.status!r} is not a failure to decide on")
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    subject = Subject(stage=Stage.TRACK, workflow_status=info.status, message=info.fail_reason)
    reason = f"workflow {info.workflow_id} {info.status}"
    if info.fail_reason:
        reason += f": {info.fail_reason}"
    rule = policy.first_match(subject)
    return _finish(rule, reason, attempt, policy, rng if rng is not None else _rng, rule.throttle, None)


def decide_nothing_started(
    *, attempt: int, policy: Policy, rule: str | None = None, rng: random.Random | None = None
) -> Decision:
    """Reconcile found that upgrade attempt number ``attempt`` started nothing: resend, or give up.

    Every reconcile that finds nothing ends in a resend, so without a bound a cloud that answers every
    upgrade with a 5xx would be resent to forever. ``rule`` names the rule that sent the attempt to
    reconcile (the attempt row's rule; None when a worker died before the answer): its backoff (else the
    policy's) spaces the resends and bounds them, and its ``counts_failure`` (else True: an unknown outcome)
    says whether giving up counts for the breaker. Returns RETRY with a delay while
    ``attempt < max_attempts``, else FAIL with rule ``reconcile:nothing-started``.
    Raises ValueError when ``attempt`` < 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    found = policy.rule_named(rule) if rule is not None else None
    backoff = found.backoff if found is not None and found.backoff is not None else policy.backoff
    if attempt >= backoff.max_attempts:
        return Decision(
            Action.FAIL,
            f"gave up after {attempt} attempts: none proved a refusal and the cloud shows no upgrade started",
            NOTHING_STARTED_RULE,
            hint=NOTHING_STARTED_HINT,
            counts_failure=found.counts_failure if found is not None else True,
        )
    return Decision(
        Action.RETRY,
        "the previous call's answer proved nothing and the cloud shows no upgrade started: resending",
        NOTHING_STARTED_RULE,
        delay=backoff_delay(attempt, backoff, rng if rng is not None else _rng),
    )


def render_hint(hint: str | None, run_id: str | int) -> str | None:
    """The hint as shown to a person: ``{run}`` replaced by the run id (plain replace, not str.format, so
    an operator's hint with other braces is shown as written)."""
    return None if hint is None else hint.replace(RUN_PLACEHOLDER, str(run_id))


def _guard(subject: Subject) -> Rule | None:
    for guard in (GUARD_ALREADY_LATEST, GUARD_BUSY):
        if guard.match.matches(subject):
            return guard
    return None


def _guarded(guard: Rule, reason: str, retry_after: float | None) -> Decision:
    return Decision(
        guard.action,
        _line(f"an earlier attempt may have reached the cloud, and this resend met {reason}"),
        guard.name,
        retry_after=retry_after,
    )


def _decide_answered(
    outcome: Answered, *, attempt: int, policy: Policy, rng: random.Random, stage: Stage
) -> Decision:
    problem = _malformed(outcome.items)
    if problem is not None:
        # An answer that does not prove its items' states tells nothing, yet the cloud may have queued a
        # workflow: decide it as a malformed answer (reconcile on the upgrade, retry on reads).
        lost = TransportFailure(
            kind=TransportKind.MALFORMED,
            sent=True,
            detail=problem,
            http_status=outcome.http_status,
            request_id=outcome.request_id,
        )
        subject = Subject(stage=stage, transport=lost.kind, sent=True)
        rule = policy.first_match(subject)
        return _finish(rule, _transport_reason(lost), attempt, policy, rng, rule.throttle, None)
    total = len(outcome.items)
    accepted = sum(1 for item in outcome.items if item.state == "ACCEPT")
    if accepted == total:
        nodes = "node" if total == 1 else "nodes"
        return Decision(Action.ACCEPTED, f"accepted: {total} of {total} {nodes} accepted", ACCEPTED_RULE)

    verdicts = [_item_verdict(item, stage, policy) for item in outcome.items if item.state != "ACCEPT"]
    # max() keeps the first of equally severe verdicts: the earliest item explains the decision.
    worst_rule, worst_reason = max(verdicts, key=lambda v: SEVERITY[v[0].action])
    throttle = any(rule.throttle for rule, _ in verdicts)
    if accepted == 0:
        reason = worst_reason if total == 1 else f"{total} of {total} nodes rejected; {worst_reason}"
        return _finish(worst_rule, reason, attempt, policy, rng, throttle, None)

    if worst_rule.action is Action.SKIP:
        # The rest needed nothing: the accepted workflows are the whole job and must be tracked.
        return Decision(
            Action.ACCEPTED,
            _line(f"accepted: {accepted} of {total} nodes accepted, the rest needed nothing; {worst_reason}"),
            ACCEPTED_RULE,
            throttle=throttle,
        )
    # Whatever the refused items' rules say (even retry or reconcile), the accepted workflows run now: a
    # resend would upgrade those nodes again. The engine follows them to their end, then flags.
    cause = worst_rule.hint if worst_rule.action in (Action.FLAG, Action.FAIL) and worst_rule.hint else None
    return Decision(
        Action.ACCEPTED,
        _line(f"partially accepted: {accepted} of {total} nodes accepted; {worst_reason}"),
        PARTIAL_ACCEPT_RULE,
        hint=PARTIAL_HINT_HEAD + (cause or PARTIAL_HINT_CAUSE),
        throttle=throttle,
        counts_failure=worst_rule.counts_failure,
        partial=True,
    )


def _malformed(items: tuple[UpdateItem, ...]) -> str | None:
    """Why the items do not prove their states, or None. The cloud client validates answers first; this
    keeps decide safe if an unvalidated one gets through (API contract, section 1: state is ACCEPT or
    REJECT, an ACCEPT carries a workflow_id and no error_message)."""
    if not items:
        return "update_result has no items"
    seen: set[str] = set()
    for n, item in enumerate(items, start=1):
        if item.state not in ("ACCEPT", "REJECT"):
            return f"item {n} has state {item.state!r}, not ACCEPT or REJECT"
        if item.state == "ACCEPT" and not item.workflow_id:
            return f"item {n} is ACCEPT without a workflow_id"
        if item.state == "ACCEPT" and item.error_message:
            return f"item {n} is ACCEPT with an error_message"
        if item.workflow_id:
            if item.workflow_id in seen:
                return f"item {n} repeats workflow_id {item.workflow_id}"
            seen.add(item.workflow_id)
    return None


def _item_verdict(item: UpdateItem, stage: Stage, policy: Policy) -> tuple[Rule, str]:
    # No instance id in the reason: the report shows the job's instance and proxy next to it.
    subject = Subject(stage=stage, state="REJECT", message=item.error_message)
    return policy.first_match(subject), f"rejected by the cloud: {item.error_message or '-'}"


def _finish(
    rule: Rule,
    reason: str,
    attempt: int,
    policy: Policy,
    rng: random.Random,
    throttle: bool,
    retry_after: float | None,
) -> Decision:
    reason = _line(reason)
    if rule.action is not Action.RETRY:
        return Decision(
            rule.action,
            reason,
            rule.name,
            hint=rule.hint,
            throttle=throttle,
            retry_after=retry_after,
            counts_failure=rule.counts_failure and rule.action in (Action.FLAG, Action.FAIL),
        )
    backoff = rule.backoff if rule.backoff is not None else policy.backoff
    if attempt >= backoff.max_attempts:
        return Decision(
            Action.FAIL,
            _line(f"gave up after {attempt} attempts: {reason}"),
            rule.name,
            hint=rule.hint or EXHAUSTED_HINT,
            throttle=throttle,
            retry_after=retry_after,
            counts_failure=rule.counts_failure,
        )
    delay = retry_delay(attempt, backoff, rng, retry_after=retry_after, throttle=throttle)
    return Decision(
        Action.RETRY,
        reason,
        rule.name,
        hint=rule.hint,
        delay=delay,
        throttle=throttle,
        retry_after=retry_after,
    )


def _http_reason(o: HttpFailure) -> str:
    head = f"HTTP {o.http_status}" + (f" {o.error_code}" if o.error_code else "")
    return f"{head}: {o.error_msg}" if o.error_msg else head


_TRANSPORT_WORDS = {
    TransportKind.CONNECT: "could not connect",
    TransportKind.TIMEOUT: "timed out",
    TransportKind.RESET: "connection dropped",
    TransportKind.MALFORMED: "malformed answer",
    TransportKind.TLS: "TLS certificate verification failed",
}


def _transport_reason(o: TransportFailure) -> str:
    status = f" (HTTP {o.http_status})" if o.http_status is not None else ""
    sent = "after the request was sent" if o.sent else "before the request was sent"
    text = f"{_TRANSPORT_WORDS[o.kind]}{status} {sent}"
    return f"{text}: {o.detail}" if o.detail else text


def _line(text: str) -> str:
    """One line of bounded length: cloud messages may carry newlines or whole HTML error pages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_REASON else flat[: MAX_REASON - 1] + "…"
