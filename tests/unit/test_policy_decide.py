"""Decision mechanics: precedence, matching, mixed answers, delays and giving up."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest

from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    TransportFailure,
    TransportKind,
    UpdateItem,
    WorkflowInfo,
)
from orchestrator.policy import Action, Policy, Stage, decide, decide_workflow, parse_policy
from orchestrator.policy.decide import EXHAUSTED_HINT, PARTIAL_HINT, SEVERITY


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
    assert decide(http(503), attempt=1, policy=p).rule == "default:server-error"


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
    assert decide(http(400, "DBS.1", "nothing here"), attempt=1, policy=p).rule == "default:bad-request"
    assert decide(http(400, "DBS.1", None), attempt=1, policy=p).rule == "default:bad-request"


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
    assert decide(http(400, "DBS.1", "x"), attempt=1, policy=p).rule == "default:bad-request"


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
    assert (d.action, d.rule, d.reason) == (
        Action.ACCEPTED,
        "default:accepted",
        "accepted: 3 of 3 nodes accepted",
    )


def test_accept_with_an_error_message_is_a_rejection() -> None:
    d = decide(items(("ACCEPT", "insufficient subnet ip")), attempt=1, policy=Policy.default())
    assert (d.action, d.rule) == (Action.FLAG, "default:reject-subnet-ip")
    assert "(state ACCEPT)" in d.reason


@pytest.mark.parametrize(
    ("low", "high"), list(itertools.combinations(sorted(TOKENS, key=SEVERITY.__getitem__), 2))
)
def test_mixed_rejections_take_the_most_severe(low: Action, high: Action) -> None:
    for order in ((low, high), (high, low)):
        answer = items(*(("REJECT", f"because {TOKENS[a]}") for a in order))
        d = decide(answer, attempt=1, policy=SEVERITY_POLICY, rng=random.Random(0))
        assert (d.action, d.rule) == (high, f"rule-{high.value}")
        assert d.reason.startswith("2 of 2 nodes rejected; rejected by the cloud (instance ")


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


@pytest.mark.parametrize("action", [Action.RETRY, Action.RECONCILE])
def test_partial_accept_never_resends(action: Action) -> None:
    answer = items(("ACCEPT", None), ("REJECT", f"x {TOKENS[action]}"), ("ACCEPT", None))
    d = decide(answer, attempt=1, policy=SEVERITY_POLICY, rng=random.Random(0))
    assert (d.action, d.rule, d.hint, d.delay) == (Action.FLAG, "default:partial-accept", PARTIAL_HINT, None)
    assert d.reason.startswith("partially accepted: 2 of 3 nodes accepted; rejected by the cloud")


def test_partial_accept_with_a_flag_keeps_its_rule_and_warns() -> None:
    answer = items(("ACCEPT", None), ("REJECT", "Upgrade failed due to insufficient subnet ip"))
    d = decide(answer, attempt=1, policy=Policy.default())
    assert (d.action, d.rule) == (Action.FLAG, "default:reject-subnet-ip")
    assert d.reason == (
        "partially accepted: 1 of 2 nodes accepted; rejected by the cloud (instance inst-1): "
        "Upgrade failed due to insufficient subnet ip"
    )
    assert d.hint is not None and d.hint.startswith("Free or add IP addresses") and PARTIAL_HINT in d.hint


def test_partial_accept_where_the_rest_needed_nothing_is_accepted() -> None:
    d = decide(items(("REJECT", "tok-skip"), ("ACCEPT", None)), attempt=1, policy=SEVERITY_POLICY)
    assert (d.action, d.rule) == (Action.ACCEPTED, "default:accepted")
    assert d.reason.startswith("accepted: 1 of 2 nodes accepted, the rest needed nothing")
    d = decide(items(("REJECT", "tok-skip"), ("REJECT", "tok-skip")), attempt=1, policy=SEVERITY_POLICY)
    assert d.action is Action.SKIP


def test_empty_answer_is_treated_as_malformed() -> None:
    empty = Answered(http_status=200, items=())
    d = decide(empty, attempt=1, policy=Policy.default())
    assert (d.action, d.rule) == (Action.RECONCILE, "default:transport-answer-lost")
    assert "update_result has no items" in d.reason
    assert decide(empty, attempt=1, policy=Policy.default(), stage=Stage.PREFLIGHT).action is Action.RETRY
    p = policy({"name": "empty-flag", "match": {"transport": "malformed"}, "action": "flag"})
    assert decide(empty, attempt=1, policy=p).rule == "empty-flag"


# --- delays ------------------------------------------------------------------------------------------------


def test_retry_after_wins_when_longer_than_backoff() -> None:
    d = decide(http(503, retry_after=30.0), attempt=1, policy=Policy.default(), rng=TopRng())
    assert (d.action, d.delay, d.retry_after, d.throttle) == (Action.RETRY, 30.0, 30.0, False)


def test_backoff_wins_when_longer_than_retry_after() -> None:
    d = decide(http(503, retry_after=1.0), attempt=5, policy=Policy.default(), rng=TopRng())
    assert d.delay == 32.0  # 2 * 2**4
    assert d.retry_after == 1.0


@pytest.mark.parametrize("bad", [-5.0, math.nan, math.inf])
def test_nonsense_retry_after_is_ignored(bad: float) -> None:
    d = decide(http(503, retry_after=bad), attempt=1, policy=Policy.default(), rng=TopRng())
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
    assert decide(http(503), attempt=1, policy=p, rng=BottomRng()).delay == 0.0


def test_delays_are_reproducible_with_a_seeded_rng() -> None:
    runs = [
        [
            decide(http(409), attempt=n, policy=Policy.default(), rng=random.Random(99)).delay
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
    assert decide(http(503), attempt=2, policy=p, rng=TopRng()).delay == 4.0  # other rules: global backoff


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
    assert (d.action, d.rule, d.delay, d.hint) == (Action.FAIL, "default:busy", None, EXHAUSTED_HINT)
    assert d.reason == "gave up after 8 attempts: HTTP 409 DBS.200019: another operation is running"


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
    assert decide(http(409), attempt=2, policy=p).action is Action.RETRY
    assert decide(http(409), attempt=3, policy=p).action is Action.FAIL


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
