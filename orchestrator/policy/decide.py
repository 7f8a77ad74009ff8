"""The pure decision: given what a call came back with, what the job does next.

No I/O and no clock: the caller turns ``Decision.delay`` into a due time with its own clock, and passes the
random source so delays are reproducible in tests. Every decision names the rule that produced it, so an
operator can see in the report why a job was retried, flagged or failed, and change that rule.
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
from orchestrator.policy.backoff import clean_retry_after, retry_delay
from orchestrator.policy.rules import Action, Policy, Rule, Stage, Subject

ACCEPTED_RULE = "default:accepted"  # implicit: every item ACCEPT (not a rule, cannot be overridden)
PARTIAL_ACCEPT_RULE = "default:partial-accept"
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

PARTIAL_HINT = (
    "Some nodes were accepted and are being upgraded: resending would upgrade them again. Wait until their "
    "workflows finish and check the proxy version, then run: orchestrator retry RUN --flagged"
)
EXHAUSTED_HINT = (
    "The failure looked transient but did not clear: check the cloud's health and the instance in the "
    "console, then run: orchestrator retry RUN --failed"
)

_rng = random.Random()


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str  # one human line: "HTTP 409 DBS.200019: another operation is running"
    rule: str  # name of the matched rule ("default:busy-409" or the operator's rule name)
    hint: str | None = None  # what the operator should do (for FLAG/FAIL/STOP_RUN)
    delay: float | None = None  # seconds until the next attempt (RETRY only), Retry-After already folded in
    throttle: bool = False  # the answer says the gateway is throttling: slow the whole run down
    retry_after: float | None = None  # the server's Retry-After, for the run-wide limiter
    counts_failure: bool = False  # a FLAG/FAIL the failure breaker counts (the rule's ``counts``)


def decide(
    outcome: Outcome,
    *,
    attempt: int,
    policy: Policy,
    rng: random.Random | None = None,
    stage: Stage = Stage.UPGRADE,
) -> Decision:
    """Decide on one call's outcome; ``attempt`` is the 1-based number of the attempt that produced it."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    r = rng if rng is not None else _rng
    if isinstance(outcome, Answered):
        return _decide_answered(outcome, attempt=attempt, policy=policy, rng=r, stage=stage)
    if isinstance(outcome, HttpFailure):
        subject = Subject(
            stage=stage,
            http_status=outcome.http_status,
            error_code=outcome.error_code,
            message=outcome.error_msg,
        )
        retry_after = clean_retry_after(outcome.retry_after)
        rule = policy.first_match(subject)
        return _finish(rule, _http_reason(outcome), attempt, policy, r, rule.throttle, retry_after)
    subject = Subject(stage=stage, transport=outcome.kind, sent=outcome.sent)
    rule = policy.first_match(subject)
    return _finish(rule, _transport_reason(outcome), attempt, policy, r, rule.throttle, None)


def decide_workflow(
    info: WorkflowInfo, *, attempt: int, policy: Policy, rng: random.Random | None = None
) -> Decision:
    """Decide on a workflow that ended without completing (Failed, Canceled, Unauthorized, or unknown).

    Completed is the caller's business (postflight), and a workflow still Pending/Running has not ended:
    passing either is a bug.
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


def _decide_answered(
    outcome: Answered, *, attempt: int, policy: Policy, rng: random.Random, stage: Stage
) -> Decision:
    if not outcome.items:
        # A 2xx without a single item tells us nothing, yet the cloud may have queued a workflow:
        # treat it as a malformed answer (reconcile on the upgrade, retry on reads).
        lost = TransportFailure(
            kind=TransportKind.MALFORMED,
            sent=True,
            detail="update_result has no items",
            http_status=outcome.http_status,
            request_id=outcome.request_id,
        )
        return decide(lost, attempt=attempt, policy=policy, rng=rng, stage=stage)
    total = len(outcome.items)
    accepted = sum(1 for item in outcome.items if item.accepted)
    if accepted == total:
        nodes = "node" if total == 1 else "nodes"
        return Decision(Action.ACCEPTED, f"accepted: {total} of {total} {nodes} accepted", ACCEPTED_RULE)

    verdicts = [_item_verdict(item, stage, policy) for item in outcome.items if not item.accepted]
    # max() keeps the first of equally severe verdicts: the earliest item explains the decision.
    worst_rule, worst_reason = max(verdicts, key=lambda v: SEVERITY[v[0].action])
    throttle = any(rule.throttle for rule, _ in verdicts)
    if accepted == 0:
        reason = worst_reason if total == 1 else f"{total} of {total} nodes rejected; {worst_reason}"
        return _finish(worst_rule, reason, attempt, policy, rng, throttle, None)

    partial = f"partially accepted: {accepted} of {total} nodes accepted; {worst_reason}"
    if worst_rule.action is Action.SKIP:
        # The rest needed nothing: the accepted workflows are the whole job and must be tracked.
        return Decision(
            Action.ACCEPTED,
            _line(f"accepted: {accepted} of {total} nodes accepted, the rest needed nothing; {worst_reason}"),
            ACCEPTED_RULE,
            throttle=throttle,
        )
    if worst_rule.action in (Action.RETRY, Action.RECONCILE):
        # Resending (or reconciling, which may end in a resend) would upgrade the accepted nodes again.
        return Decision(
            Action.FLAG, _line(partial), PARTIAL_ACCEPT_RULE, hint=PARTIAL_HINT, throttle=throttle
        )
    hint = PARTIAL_HINT if worst_rule.hint is None else f"{worst_rule.hint}. {PARTIAL_HINT}"
    return Decision(worst_rule.action, _line(partial), worst_rule.name, hint=hint, throttle=throttle)


def _item_verdict(item: UpdateItem, stage: Stage, policy: Policy) -> tuple[Rule, str]:
    subject = Subject(stage=stage, state="REJECT", message=item.error_message)
    where = f" (instance {item.instance_id})" if item.instance_id else ""
    state = "" if item.state == "REJECT" else f" (state {item.state})"
    return policy.first_match(subject), f"rejected by the cloud{where}{state}: {item.error_message or '-'}"


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
            rule.action, reason, rule.name, hint=rule.hint, throttle=throttle, retry_after=retry_after
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
