"""Decision mechanics: precedence, matching, mixed answers, delays and giving up."""

from __future__ import annotations

import itertools
import math
import random
import re
from typing import Any

import pytest

from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    Outcome,
    TransportFailure,
    TransportKind,
    UpdateItem,
    WorkflowInfo,
)
from orchestrator.policy import Action, Policy, Stage, decide, decide_workflow, parse_policy
from orchestrator.policy.decide import (
    EXHAUSTED_HINT,
    NOTHING_STARTED_HINT,
    PARTIAL_HINT_CAUSE,
    PARTIAL_HINT_HEAD,
    SEVERITY,
    decide_nothing_started,
    render_hint,
)
from orchestrator.policy.rules import BUSY_CODES, DEFAULT_RULES


class TopRng(random.Random):
    """Full jitter always draws its upper bound: the delay equals the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class BottomRng(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def http(
    status: int, code: str | None = None, msg: str | None = None, retry_after: float | None = None
) -> HttpFailure:
    return HttpFailure(http_status=status, error_code=code, error_msg=msg, retry_after=retry_after)


def items(*specs: tuple[str, str | None]) -> Answered:
    return Answered(
        http_status=200,
        items=tuple(
            UpdateItem(workflow_id=f"wf-{i}", state=state, error_message=msg, instance_id=f"inst-{i}")
            for i, (state, msg) in enumerate(specs)
        ),
    )


def policy(*rules: dict[str, Any], **top: Any) -> Policy:
    return parse_policy({"rules": list(rules), **top})


# --- precedence -----------------------------------------------------------------------------------


def test_operator_rule_comes_before_the_defaults() -> None:
    p = policy(
        {"name": "busy-means-flag", "match": {"http_status": 409}, "action": "flag", "hint": "call ops"}
    )
    d = decide(http(409, "DBS.200019", "busy"), attempt=1, policy=p)
    assert (d.action, d.rule, d.hint) == (Action.FLAG, "busy-means-flag", "call ops")
    # anything the operator rule does not match still falls to the defaults
    assert decide(http(503), attempt=1, policy=p).rule == "default:server-error-unproven"


def test_first_matching_rule_wins() -> None:
    p = policy(
        {"name": "first", "match": {"error_code": "DBS.2000*"}, "action": "fail"},
        {"name": "second", "match": {"error_code": "DBS.200019"}, "action": "skip"},
    )
    assert decide(http(409, "DBS.200019"), attempt=1, policy=p).rule == "first"
    p2 = policy(
        {"name": "second", "match": {"error_code": "DBS.200019"}, "action": "skip"},
        {"name": "first", "match": {"error_code": "DBS.2000*"}, "action": "fail"},
    )
    assert decide(http(409, "DBS.200019"), attempt=1, policy=p2).rule == "second"


def test_operator_overrides_a_default() -> None:
    p = policy({"name": "retry-failed-workflows", "match": {"workflow_status": "Failed"}, "action": "retry"})
    failed = WorkflowInfo(workflow_id="w", status="Failed", fail_reason="x")
    canceled = WorkflowInfo(workflow_id="w", status="Canceled", fail_reason="x")
    d = decide_workflow(failed, attempt=1, policy=p, rng=random.Random(1))
    assert (d.action, d.rule) == (Action.RETRY, "retry-failed-workflows")
    assert decide_workflow(canceled, attempt=1, policy=p).rule == "default:workflow-failed"


def test_replace_defaults_falls_back_to_the_catch_all() -> None:
    p = policy({"name": "only", "match": {"http_status": 409}, "action": "retry"}, replace_defaults=True)
    assert [r.name for r in p.rules] == ["only"]
    d = decide(http(401, "APIGW.0301"), attempt=1, policy=p)
    assert (d.action, d.rule) == (Action.FAIL, "default:catch-all")


def test_all_match_keys_must_match() -> None:
    p = policy({"name": "both", "match": {"http_status": 400, "error_code": "DBS.1"}, "action": "skip"})
    assert decide(http(400, "DBS.1"), attempt=1, policy=p).rule == "both"
    assert decide(http(409, "DBS.1"), attempt=1, policy=p).rule != "both"
    assert decide(http(400, "DBS.2"), attempt=1, policy=p).rule != "both"


def test_stage_limits_a_rule() -> None:
    p = policy({"name": "upgrade-only", "match": {"http_status": 500, "stage": "upgrade"}, "action": "fail"})
    assert decide(http(500), attempt=1, policy=p, stage=Stage.UPGRADE).rule == "upgrade-only"
    assert decide(http(500), attempt=1, policy=p, stage=Stage.TRACK).rule == "default:server-error"


# --- matching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "code", "hit"),
    [
        ("DBS.2000*", "DBS.200019", True),
        ("DBS.2000*", "DBS.201014", False),
        ("dbs.2000*", "DBS.200019", False),  # case-sensitive
        ("DBS.20001?", "DBS.200019", True),
        ("DBS.20001?", "DBS.2000190", False),
        ("DBS.200019", "DBS.200019", True),
        ("APIGW.*", "APIGW.0308", True),
    ],
)
def test_error_code_globs(glob: str, code: str, hit: bool) -> None:
    p = policy({"name": "g", "match": {"error_code": glob}, "action": "skip"})
    assert (decide(http(400, code), attempt=1, policy=p).rule == "g") is hit


@pytest.mark.parametrize(
    ("pattern", "status", "hit"),
    [
        ("4xx", 418, True),
        ("4xx", 500, False),
        ("40x", 404, True),
        ("40x", 410, False),
        ("5XX", 599, True),
        (502, 502, True),
        (502, 503, False),
        ([500, "52x"], 524, True),
        ([500, "52x"], 500, True),
        ([500, "52x"], 503, False),
    ],
)
def test_http_status_patterns(pattern: object, status: int, hit: bool) -> None:
    p = policy({"name": "s", "match": {"http_status": pattern}, "action": "skip"})
    assert (decide(http(status), attempt=1, policy=p).rule == "s") is hit


def test_message_regex_is_case_insensitive_and_searches_every_kind_of_message() -> None:
    p = policy({"name": "m", "match": {"message": r"proxy\s+node"}, "action": "skip"})
    assert decide(items(("REJECT", "too many PROXY NODES")), attempt=1, policy=p).rule == "m"
    assert decide(http(400, "DBS.1", "Proxy Node limit"), attempt=1, policy=p).rule == "m"
    wf = WorkflowInfo(workflow_id="w", status="Failed", fail_reason="proxy node crashed")
    assert decide_workflow(wf, attempt=1, policy=p).rule == "m"
    assert decide(http(400, "DBS.1", "nothing here"), attempt=1, policy=p).rule == "default:unproven-answer"
    assert decide(http(400, "DBS.1", None), attempt=1, policy=p).rule == "default:unproven-answer"


def test_http_keys_never_match_transport_failures() -> None:
    # An operator rule keyed on status or message must not turn a lost upgrade answer into a blind resend.
    p = policy(
        {"name": "status", "match": {"http_status": 200}, "action": "retry"},
        {"name": "anything", "match": {"message": ".*"}, "action": "retry"},
    )
    lost = TransportFailure(kind=TransportKind.MALFORMED, sent=True, detail="not json", http_status=200)
    d = decide(lost, attempt=1, policy=p)
    assert (d.action, d.rule) == (Action.RECONCILE, "default:transport-answer-lost")
    assert d.reason == "malformed answer (HTTP 200) after the request was sent: not json"


def test_transport_and_sent_keys() -> None:
    p = policy({"name": "t", "match": {"transport": ["timeout", "reset"], "sent": True}, "action": "flag"})
    assert decide(TransportFailure(kind=TransportKind.RESET, sent=True), attempt=1, policy=p).rule == "t"
    assert decide(TransportFailure(kind=TransportKind.RESET, sent=False), attempt=1, policy=p).rule != "t"
    assert decide(TransportFailure(kind=TransportKind.CONNECT, sent=True), attempt=1, policy=p).rule != "t"


def test_state_key_only_matches_items() -> None:
    p = policy({"name": "r", "match": {"state": "REJECT"}, "action": "fail"})
    assert decide(items(("REJECT", "x")), attempt=1, policy=p).rule == "r"
    assert decide(http(400, "DBS.1", "x"), attempt=1, policy=p).rule == "default:unproven-answer"


# --- upgrade answers -----------------------------------------------------------------------------------

TOKENS = {
    Action.SKIP: "tok-skip",
    Action.RETRY: "tok-retry",
    Action.RECONCILE: "tok-reconcile",
    Action.FLAG: "tok-flag",
    Action.FAIL: "tok-fail",
    Action.STOP_RUN: "tok-stop",
}
SEVERITY_POLICY = policy(
    *({"name": f"rule-{a.value}", "match": {"message": tok}, "action": a.value} for a, tok in TOKENS.items())
)


def test_all_accepted() -> None:
    d = decide(items(("ACCEPT", None), ("ACCEPT", None), ("ACCEPT", "")), attempt=1, policy=Policy.default())
    assert (d.action, d.rule, d.reason, d.partial) == (
        Action.ACCEPTED,
        "default:accepted",
        "accepted: 3 of 3 nodes accepted",
        False,
    )


def answer(*specs: tuple[str, str | None, str | None]) -> Answered:
    """(state, workflow_id, error_message) per item, as an unvalidated client might pass them."""
    return Answered(
        http_status=200,
        items=tuple(UpdateItem(workflow_id=w, state=st, error_message=m) for st, w, m in specs),
    )


# Items that do not prove their state (kind 3/7): the whole answer is malformed, whatever else it holds.
MALFORMED: list[tuple[Answered, str]] = [
    (answer(("accept", "wf-1", None)), "item 1 has state 'accept', not ACCEPT or REJECT"),
    (answer(("ACCEPT", "wf-1", None), ("Rejected", None, "x")), "item 2 has state 'Rejected'"),
    (answer(("ACCEPT", None, None)), "item 1 is ACCEPT without a workflow_id"),
    (answer(("REJECT", None, "x"), ("ACCEPT", "", None)), "item 2 is ACCEPT without a workflow_id"),
    (answer(("ACCEPT", "wf-1", "insufficient subnet ip")), "item 1 is ACCEPT with an error_message"),
    (answer(("ACCEPT", "wf-1", None), ("ACCEPT", "wf-1", None)), "item 2 repeats workflow_id wf-1"),
    (Answered(http_status=200, items=()), "update_result has no items"),
]


@pytest.mark.parametrize(("outcome", "why"), MALFORMED)
def test_items_that_do_not_prove_their_state_are_a_malformed_answer(outcome: Answered, why: str) -> None:
    for unsettled in (False, True):
        d = decide(outcome, attempt=1, policy=Policy.default(), earlier_attempt_unsettled=unsettled)
        assert (d.action, d.rule, d.partial) == (Action.RECONCILE, "default:transport-answer-lost", False)
        assert d.reason.startswith("malformed answer (HTTP 200) after the request was sent: ")
        assert why in d.reason
    # an operator rule on malformed answers decides them, like any other malformed answer
    p = policy({"name": "malformed-flag", "match": {"transport": "malformed"}, "action": "flag"})
    assert decide(outcome, attempt=1, policy=p).rule == "malformed-flag"


@pytest.mark.parametrize(
    ("low", "high"), list(itertools.combinations(sorted(TOKENS, key=SEVERITY.__getitem__), 2))
)
def test_mixed_rejections_take_the_most_severe(low: Action, high: Action) -> None:
    for order in ((low, high), (high, low)):
        answer = items(*(("REJECT", f"because {TOKENS[a]}") for a in order))
        d = decide(answer, attempt=1, policy=SEVERITY_POLICY, rng=random.Random(0))
        assert (d.action, d.rule) == (high, f"rule-{high.value}")
        assert d.reason == f"2 of 2 nodes rejected; rejected by the cloud: because {TOKENS[high]}"


def test_reasons_do_not_repeat_the_instance_id() -> None:
    for answer in (
        items(("REJECT", "insufficient subnet ip")),
        items(("REJECT", "quota"), ("REJECT", "frozen")),
        items(("ACCEPT", None), ("REJECT", "insufficient subnet ip")),
    ):
        d = decide(answer, attempt=1, policy=Policy.default())
        assert "inst-" not in d.reason and "instance" not in d.reason, d.reason


def test_severity_order_is_the_documented_one() -> None:
    order = [Action.STOP_RUN, Action.FAIL, Action.FLAG, Action.RECONCILE, Action.RETRY, Action.SKIP]
    assert sorted(SEVERITY, key=SEVERITY.__getitem__, reverse=True) == order


def test_equally_severe_items_the_earliest_explains() -> None:
    d = decide(
        items(("REJECT", "quota exceeded"), ("REJECT", "insufficient subnet ip")),
        attempt=1,
        policy=Policy.default(),
    )
    assert d.rule == "default:reject-quota"
    d = decide(
        items(("REJECT", "insufficient subnet ip"), ("REJECT", "quota exceeded")),
        attempt=1,
        policy=Policy.default(),
    )
    assert d.rule == "default:reject-subnet-ip"


# --- partial accept (kind 7) ---------------------------------------------------------------------------

_DEFAULT = {r.name: r for r in DEFAULT_RULES}


@pytest.mark.parametrize(
    "worst", [Action.RETRY, Action.RECONCILE, Action.FLAG, Action.FAIL, Action.STOP_RUN], ids=str
)
def test_partial_accept_tracks_then_flags_whatever_the_refusal(worst: Action) -> None:
    """Some nodes ACCEPT, others are refused (by a rule of any action but skip): the job is ACCEPTED with
    the flag-after-tracking marker, never resent (no delay), never left for a blind retry."""
    answer = items(
        ("ACCEPT", None), ("REJECT", f"x {TOKENS[worst]}"), ("ACCEPT", None), ("REJECT", "tok-skip")
    )
    d = decide(answer, attempt=1, policy=SEVERITY_POLICY, rng=random.Random(0))
    assert (d.action, d.rule, d.partial, d.delay) == (Action.ACCEPTED, "default:partial-accept", True, None)
    assert d.reason == f"partially accepted: 2 of 4 nodes accepted; rejected by the cloud: x {TOKENS[worst]}"
    assert d.hint == PARTIAL_HINT_HEAD + PARTIAL_HINT_CAUSE  # these operator rules have no hint
    # one consistent next step, for the run at hand
    assert d.hint.count("orchestrator ") == 1 and "retry {run} --flagged" in d.hint
    assert not re.search(r"\bagain\b|resend", d.hint)


@pytest.mark.parametrize(
    ("message", "rule"),
    [
        ("Upgrade failed due to insufficient subnet ip", "default:reject-subnet-ip"),
        ("Quota exceeded", "default:reject-quota"),
        ("The proxy is frozen", "default:reject"),
        (None, "default:reject"),
    ],
)
def test_partial_accept_with_the_default_rules(message: str | None, rule: str) -> None:
    for answer in (
        items(("ACCEPT", None), ("REJECT", message)),
        items(("REJECT", message), ("ACCEPT", None), ("ACCEPT", None)),
    ):
        d = decide(answer, attempt=1, policy=Policy.default())
        assert (d.action, d.rule, d.partial) == (Action.ACCEPTED, "default:partial-accept", True)
        assert d.reason.startswith("partially accepted: ")
        assert d.reason.endswith(f"rejected by the cloud: {message or '-'}")
        # the refusing rule's own next step, after saying what happened; its counts go to the breaker
        assert d.hint == PARTIAL_HINT_HEAD + str(_DEFAULT[rule].hint)
        assert d.counts_failure is _DEFAULT[rule].counts_failure
        assert not re.search(r"\bagain\b|resend", d.hint)


def test_partial_accept_is_not_undone_by_an_unsettled_earlier_attempt() -> None:
    d = decide(
        items(("ACCEPT", None), ("REJECT", "quota")),
        attempt=2,
        policy=Policy.default(),
        earlier_attempt_unsettled=True,
    )
    assert (d.action, d.rule, d.partial) == (Action.ACCEPTED, "default:partial-accept", True)


def test_partial_accept_where_the_rest_needed_nothing_is_accepted() -> None:
    d = decide(items(("REJECT", "tok-skip"), ("ACCEPT", None)), attempt=1, policy=SEVERITY_POLICY)
    assert (d.action, d.rule, d.partial, d.hint) == (Action.ACCEPTED, "default:accepted", False, None)
    assert d.reason.startswith("accepted: 1 of 2 nodes accepted, the rest needed nothing")
    d = decide(items(("REJECT", "tok-skip"), ("REJECT", "tok-skip")), attempt=1, policy=SEVERITY_POLICY)
    assert d.action is Action.SKIP


# --- a resend after an earlier attempt that may have reached the backend --------------------------------

ALREADY = [
    http(400, "DBS.05000008", "already the latest version"),
    http(400, "DBS.05000008"),
    http(409, "DBS.05000008"),
]
BUSY = [
    *(http(409, code, "another operation is running") for code in BUSY_CODES),
    http(400, "DBS.201014", "another operation is running"),
]


@pytest.mark.parametrize(
    ("outcome", "guard", "settled_rule", "settled_action"),
    [
        *((o, "default:resend-met-already-latest", "default:already-latest", Action.SKIP) for o in ALREADY),
        *((o, "default:resend-met-busy", "default:busy", Action.RETRY) for o in BUSY),
    ],
)
def test_resend_meeting_already_latest_or_busy_reconciles(
    outcome: HttpFailure, guard: str, settled_rule: str, settled_action: Action
) -> None:
    """It may be our own earlier attempt's upgrade: look (and record its workflow), never skip or resend."""
    p = Policy.default()
    d = decide(outcome, attempt=2, policy=p, rng=random.Random(3), earlier_attempt_unsettled=True)
    assert (d.action, d.rule, d.delay, d.counts_failure) == (Action.RECONCILE, guard, None, False)
    assert d.reason.startswith("an earlier attempt may have reached the cloud, and this resend met HTTP ")
    assert str(outcome.error_code) in d.reason
    # settled earlier attempts (proven refusals, nothing sent) leave the ordinary rule in charge
    for attempt in (1, 2, 5):
        plain = decide(outcome, attempt=attempt, policy=p, rng=random.Random(3))
        assert (plain.action, plain.rule) == (settled_action, settled_rule)
    # reads never consult it
    read = decide(outcome, attempt=2, policy=p, stage=Stage.PREFLIGHT, earlier_attempt_unsettled=True)
    assert read.rule == settled_rule


def test_the_guards_win_over_operator_rules() -> None:
    p = policy(
        {"name": "busy-flag", "match": {"error_code": "DBS.200019"}, "action": "flag"},
        {"name": "latest-fail", "match": {"error_code": "DBS.05000008"}, "action": "fail"},
    )
    busy = decide(http(409, "DBS.200019"), attempt=2, policy=p, earlier_attempt_unsettled=True)
    latest = decide(http(400, "DBS.05000008"), attempt=2, policy=p, earlier_attempt_unsettled=True)
    assert (busy.rule, latest.rule) == ("default:resend-met-busy", "default:resend-met-already-latest")
    assert decide(http(409, "DBS.200019"), attempt=2, policy=p).rule == "busy-flag"


def test_any_other_skip_after_an_unsettled_attempt_reconciles() -> None:
    p = policy(
        {"name": "frozen-skip", "match": {"error_code": "DBS.7"}, "action": "skip"},
        {"name": "done-skip", "match": {"state": "REJECT", "message": "nothing to do"}, "action": "skip"},
    )
    for outcome in (
        http(400, "DBS.7", "frozen"),
        items(("REJECT", "nothing to do"), ("REJECT", "nothing to do")),
    ):
        d = decide(outcome, attempt=3, policy=p, earlier_attempt_unsettled=True)
        assert (d.action, d.rule) == (Action.RECONCILE, "default:resend-met-skip")
        assert decide(outcome, attempt=3, policy=p).action is Action.SKIP


@pytest.mark.parametrize(
    ("outcome", "rule"),
    [
        (http(400, "DBS.05000001"), "default:kernel-too-early"),
        (http(404, "DBS.200002"), "default:instance-not-found"),
        (http(429), "default:throttled"),
        (http(401, "APIGW.0301"), "default:unauthenticated"),
        (http(502), "default:server-error-unproven"),
        (http(500, "DBS.200019"), "default:server-error-unproven"),  # a busy code in a 5xx proves nothing
        (TransportFailure(kind=TransportKind.CONNECT, sent=False), "default:transport-not-sent"),
        (items(("ACCEPT", None)), "default:accepted"),
        (items(("REJECT", "quota")), "default:reject-quota"),
    ],
)
def test_other_answers_ignore_an_unsettled_earlier_attempt(outcome: Outcome, rule: str) -> None:
    a = decide(
        outcome, attempt=2, policy=Policy.default(), rng=random.Random(1), earlier_attempt_unsettled=True
    )
    b = decide(outcome, attempt=2, policy=Policy.default(), rng=random.Random(1))
    assert a == b and a.rule == rule


def test_a_guard_keeps_the_retry_after_for_the_limiter() -> None:
    d = decide(
        http(409, "DBS.200019", retry_after=12.0),
        attempt=2,
        policy=Policy.default(),
        earlier_attempt_unsettled=True,
    )
    assert (d.action, d.retry_after) == (Action.RECONCILE, 12.0)


# --- reconcile found nothing: resend or give up ---------------------------------------------------------


def test_nothing_started_resends_with_backoff_until_max_attempts() -> None:
    p = Policy.default()
    for attempt in range(1, p.backoff.max_attempts):
        d = decide_nothing_started(
            attempt=attempt, policy=p, rule="default:server-error-unproven", rng=TopRng()
        )
        assert (d.action, d.rule, d.delay) == (
            Action.RETRY,
            "reconcile:nothing-started",
            min(120.0, 2.0 * 2 ** (attempt - 1)),
        )
        assert d.counts_failure is False
    d = decide_nothing_started(attempt=8, policy=p, rule="default:server-error-unproven")
    assert (d.action, d.rule, d.delay, d.hint) == (
        Action.FAIL,
        "reconcile:nothing-started",
        None,
        NOTHING_STARTED_HINT,
    )
    assert (
        d.reason == "gave up after 8 attempts: none proved a refusal and the cloud shows no upgrade started"
    )
    assert d.counts_failure is True


def test_nothing_started_takes_the_rules_backoff_and_counts() -> None:
    p = policy(
        {"name": "lost-patiently", "match": {"transport": "timeout", "sent": True}, "action": "reconcile"},
        {
            "name": "five-hundreds",
            "match": {"http_status": "5xx"},
            "action": "retry",
            "backoff": {"max_attempts": 2, "initial": 7},
        },
    )
    assert decide_nothing_started(attempt=1, policy=p, rule="five-hundreds", rng=TopRng()).delay == 7.0
    assert decide_nothing_started(attempt=2, policy=p, rule="five-hundreds").action is Action.FAIL
    assert decide_nothing_started(attempt=2, policy=p, rule="lost-patiently").action is Action.RETRY
    # a rule that does not count for the breaker does not count when its resends run out
    assert decide_nothing_started(attempt=8, policy=p, rule="lost-patiently").counts_failure is False
    # the guards' names resolve; an unknown name or none (a worker died before the answer) counts
    assert decide_nothing_started(attempt=8, policy=p, rule="default:resend-met-busy").counts_failure is True
    assert decide_nothing_started(attempt=8, policy=p, rule="gone").counts_failure is True
    assert decide_nothing_started(attempt=8, policy=p).counts_failure is True
    with pytest.raises(ValueError):
        decide_nothing_started(attempt=0, policy=p)


# --- hints ---------------------------------------------------------------------------------------------


def test_render_hint_fills_the_run_id_and_nothing_else() -> None:
    assert render_hint(None, 3) is None
    assert (
        render_hint("then run: orchestrator retry {run} --flagged", 3)
        == "then run: orchestrator retry 3 --flagged"
    )
    assert render_hint("see {docs} and {run}/{run}", "r-9") == "see {docs} and r-9/r-9"


# --- delays ------------------------------------------------------------------------------------------------


def test_retry_after_wins_when_longer_than_backoff() -> None:
    d = decide(
        http(503, retry_after=30.0), attempt=1, policy=Policy.default(), rng=TopRng(), stage=Stage.TRACK
    )
    assert (d.action, d.delay, d.retry_after, d.throttle) == (Action.RETRY, 30.0, 30.0, False)


def test_backoff_wins_when_longer_than_retry_after() -> None:
    d = decide(
        http(503, retry_after=1.0), attempt=5, policy=Policy.default(), rng=TopRng(), stage=Stage.TRACK
    )
    assert d.delay == 32.0  # 2 * 2**4
    assert d.retry_after == 1.0


@pytest.mark.parametrize("bad", [-5.0, math.nan, math.inf])
def test_nonsense_retry_after_is_ignored(bad: float) -> None:
    d = decide(
        http(503, retry_after=bad), attempt=1, policy=Policy.default(), rng=TopRng(), stage=Stage.TRACK
    )
    assert (d.delay, d.retry_after) == (2.0, None)


def test_throttled_retry_after() -> None:
    d = decide(http(429, "APIGW.0308", retry_after=10.0), attempt=1, policy=Policy.default(), rng=BottomRng())
    assert (d.action, d.throttle, d.delay, d.retry_after) == (Action.RETRY, True, 10.0, 10.0)


def test_throttled_without_retry_after_waits_two_to_five_seconds() -> None:
    p = Policy.default()
    assert decide(http(429), attempt=1, policy=p, rng=BottomRng()).delay == 2.0
    assert decide(http(429), attempt=1, policy=p, rng=TopRng()).delay == 5.0
    assert decide(http(429), attempt=6, policy=p, rng=TopRng()).delay == 64.0
    for seed in range(50):
        delay = decide(http(429), attempt=1, policy=p, rng=random.Random(seed)).delay
        assert delay is not None and 2.0 <= delay <= 5.0
    # an ordinary retry has no floor
    assert decide(http(503), attempt=1, policy=p, rng=BottomRng(), stage=Stage.PREFLIGHT).delay == 0.0


def test_delays_are_reproducible_with_a_seeded_rng() -> None:
    runs = [
        [
            decide(http(409, "DBS.200019"), attempt=n, policy=Policy.default(), rng=random.Random(99)).delay
            for n in range(1, 8)
        ]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


def test_per_rule_backoff() -> None:
    p = policy(
        {
            "name": "slow",
            "match": {"http_status": 409},
            "action": "retry",
            "backoff": {"initial": 10, "multiplier": 3, "max": 100},
        }
    )
    delays = [decide(http(409), attempt=n, policy=p, rng=TopRng()).delay for n in range(1, 6)]
    assert delays == [10.0, 30.0, 90.0, 100.0, 100.0]
    # other rules: the global backoff
    assert decide(http(503), attempt=2, policy=p, rng=TopRng(), stage=Stage.TRACK).delay == 4.0


def test_per_rule_backoff_inherits_the_policy_backoff() -> None:
    p = policy(
        {"name": "slow", "match": {"http_status": 409}, "action": "retry", "backoff": {"initial": 10}},
        backoff={"multiplier": 3, "max_attempts": 4},
    )
    rule = p.rules[0]
    assert rule.backoff is not None
    assert (rule.backoff.initial, rule.backoff.multiplier, rule.backoff.max_attempts) == (10.0, 3.0, 4)
    assert decide(http(409), attempt=3, policy=p, rng=TopRng()).delay == 90.0


# --- giving up ---------------------------------------------------------------------------------------------


def test_attempt_exhaustion_with_the_global_limit() -> None:
    p = Policy.default()
    failure = http(409, "DBS.200019", "another operation is running")
    for n in range(1, 8):
        assert decide(failure, attempt=n, policy=p, rng=random.Random(n)).action is Action.RETRY
    d = decide(failure, attempt=8, policy=p)
    busy_hint = next(r.hint for r in DEFAULT_RULES if r.name == "default:busy")
    assert (d.action, d.rule, d.delay, d.hint) == (Action.FAIL, "default:busy", None, busy_hint)
    assert d.reason == "gave up after 8 attempts: HTTP 409 DBS.200019: another operation is running"
    assert d.counts_failure is False  # an instance busy with another operation: one proxy's precondition


def test_exhaustion_without_a_rule_hint_gives_the_generic_one() -> None:
    p = policy(
        {"name": "teapot", "match": {"http_status": 418}, "action": "retry", "backoff": {"max_attempts": 2}}
    )
    d = decide(http(418), attempt=2, policy=p)
    assert (d.action, d.rule, d.hint, d.counts_failure) == (Action.FAIL, "teapot", EXHAUSTED_HINT, False)


def test_attempt_exhaustion_with_a_per_rule_limit() -> None:
    p = policy(
        {
            "name": "twice",
            "match": {"http_status": 503},
            "action": "retry",
            "hint": "h",
            "backoff": {"max_attempts": 2},
        },
        backoff={"max_attempts": 3},
    )
    assert decide(http(503), attempt=1, policy=p).action is Action.RETRY
    d = decide(http(503), attempt=2, policy=p)
    assert (d.action, d.rule, d.hint) == (Action.FAIL, "twice", "h")
    assert decide(http(409, "DBS.200019"), attempt=2, policy=p).action is Action.RETRY
    assert decide(http(409, "DBS.200019"), attempt=3, policy=p).action is Action.FAIL


def test_exhausted_throttle_still_tells_the_limiter() -> None:
    d = decide(http(429, retry_after=7.0), attempt=8, policy=Policy.default())
    assert (d.action, d.throttle, d.retry_after) == (Action.FAIL, True, 7.0)


def test_exhaustion_only_applies_to_retry() -> None:
    assert decide(http(400, "DBS.200001"), attempt=50, policy=Policy.default()).action is Action.FLAG
    lost = TransportFailure(kind=TransportKind.TIMEOUT, sent=True)
    assert decide(lost, attempt=50, policy=Policy.default()).action is Action.RECONCILE


# --- odds and ends -----------------------------------------------------------------------------------------


def test_reason_is_one_bounded_line() -> None:
    d = decide(http(502, None, "<html>\n<body>\n" + "x" * 10_000), attempt=1, policy=Policy.default())
    assert (
        "\n" not in d.reason and len(d.reason) <= 400 and d.reason.startswith("HTTP 502: <html> <body> xxx")
    )


def test_transport_reasons() -> None:
    d = decide(
        TransportFailure(kind=TransportKind.CONNECT, sent=False, detail="refused"),
        attempt=1,
        policy=Policy.default(),
    )
    assert d.reason == "could not connect before the request was sent: refused"
    d = decide(TransportFailure(kind=TransportKind.TIMEOUT, sent=True), attempt=1, policy=Policy.default())
    assert d.reason == "timed out after the request was sent"


def test_stop_run_has_no_delay() -> None:
    d = decide(
        http(401, "APIGW.0301", "Incorrect IAM authentication information"),
        attempt=1,
        policy=Policy.default(),
    )
    assert (d.action, d.delay) == (Action.STOP_RUN, None)


@pytest.mark.parametrize("status", ["Completed", "Pending", "Running"])
def test_decide_workflow_refuses_non_failures(status: str) -> None:
    with pytest.raises(ValueError, match=status):
        decide_workflow(WorkflowInfo(workflow_id="w", status=status), attempt=1, policy=Policy.default())


def test_workflow_without_fail_reason() -> None:
    d = decide_workflow(WorkflowInfo(workflow_id="w7", status="Canceled"), attempt=1, policy=Policy.default())
    assert (d.action, d.reason) == (Action.FLAG, "workflow w7 Canceled")


def test_attempt_must_be_positive() -> None:
    with pytest.raises(ValueError):
        decide(http(503), attempt=0, policy=Policy.default())
