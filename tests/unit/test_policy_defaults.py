"""Every built-in rule, as a table: one outcome that must hit it, and what the job must do."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    Outcome,
    TransportFailure,
    TransportKind,
    UpdateItem,
    WorkflowInfo,
)
from orchestrator.policy import (
    DEFAULT_RULES,
    Action,
    Policy,
    Stage,
    decide,
    decide_workflow,
    parse_policy,
)

K = TransportKind
U, P, T = Stage.UPGRADE, Stage.PREFLIGHT, Stage.TRACK
BUSY = ("DBS.200019", "DBS.201014", "DBS.201015", "DBS.200047", "DBS.05000084", "DBS.212033")
SUBNET_HINT = (
    "Free or add IP addresses in the proxy's subnet (or move the proxy to a larger subnet), "
    "then run: orchestrator retry RUN --flagged"
)
AUTH_HINT = "check credentials: the token or AK/SK was refused; nothing more will be sent"


def tf(kind: TransportKind, sent: bool, status: int | None = None) -> TransportFailure:
    return TransportFailure(kind=kind, sent=sent, detail="boom", http_status=status)


def http(status: int, code: str | None = None, msg: str | None = None) -> HttpFailure:
    return HttpFailure(http_status=status, error_code=code, error_msg=msg, request_id="req-1")


def reject(msg: str | None) -> Answered:
    return Answered(
        http_status=200, items=(UpdateItem(workflow_id="wf-1", state="REJECT", error_message=msg),)
    )


CASES: list[tuple[str, Outcome, Stage, Action]] = [
    ("default:read-transport", tf(K.TIMEOUT, True), P, Action.RETRY),
    ("default:read-transport", tf(K.RESET, True), T, Action.RETRY),
    ("default:read-transport", tf(K.MALFORMED, True, 200), T, Action.RETRY),
    ("default:read-transport", tf(K.CONNECT, False), P, Action.RETRY),
    ("default:transport-not-sent", tf(K.CONNECT, False), U, Action.RETRY),
    ("default:transport-not-sent", tf(K.TIMEOUT, False), U, Action.RETRY),
    ("default:transport-answer-lost", tf(K.TIMEOUT, True), U, Action.RECONCILE),
    ("default:transport-answer-lost", tf(K.RESET, True), U, Action.RECONCILE),
    ("default:transport-answer-lost", tf(K.MALFORMED, True, 200), U, Action.RECONCILE),
    ("default:transport-answer-lost", tf(K.CONNECT, True), U, Action.RECONCILE),
    ("default:throttled", http(429), U, Action.RETRY),
    (
        "default:throttled",
        http(429, "APIGW.0308", "The throttling threshold has been reached"),
        T,
        Action.RETRY,
    ),
    (
        "default:throttled-apigw",
        http(400, "APIGW.0308", "policy user over ratelimit, limit:10"),
        U,
        Action.RETRY,
    ),
    (
        "default:unauthenticated",
        http(401, "APIGW.0301", "Incorrect IAM authentication information"),
        U,
        Action.STOP_RUN,
    ),
    ("default:unauthenticated", http(401, "APIGW.0301", "token expired"), T, Action.STOP_RUN),
    ("default:forbidden", http(403, "DBS.200003", "no permission"), U, Action.STOP_RUN),
    ("default:job-not-visible", http(400, "DBS.200543", "The job does not exist."), T, Action.RETRY),
    ("default:bad-request", http(400, "DBS.200543", "The job does not exist."), U, Action.FLAG),
    *[("default:busy", http(409, code, "another operation is running"), U, Action.RETRY) for code in BUSY],
    ("default:busy", http(400, "DBS.201014", "another operation is running"), U, Action.RETRY),
    ("default:busy-409", http(409, "DBS.999999", None), U, Action.RETRY),
    ("default:already-latest", http(400, "DBS.05000008", "already the latest version"), U, Action.SKIP),
    ("default:kernel-too-early", http(400, "DBS.05000001", "kernel version too early"), U, Action.FLAG),
    ("default:parameter-error", http(400, "DBS.200001", "parameter error"), U, Action.FLAG),
    ("default:proxy-not-found", http(400, "DBS.270024", "proxy does not exist"), U, Action.FLAG),
    ("default:instance-not-found", http(404, "DBS.200002", "instance does not exist"), U, Action.FLAG),
    ("default:bad-request", http(400, None, None), U, Action.FLAG),
    ("default:bad-request", http(400, "DBS.123456", "something odd"), P, Action.FLAG),
    ("default:gateway-timeout", http(504, None, "gateway timeout"), U, Action.RECONCILE),
    ("default:server-error", http(504, None, "gateway timeout"), P, Action.RETRY),
    ("default:server-error", http(500, "DBS.05000000", "server error"), U, Action.RETRY),
    ("default:server-error", http(502), U, Action.RETRY),
    ("default:server-error", http(503), T, Action.RETRY),
    ("default:reject-subnet-ip", reject("Upgrade failed due to insufficient subnet ip"), U, Action.FLAG),
    ("default:reject-subnet-ip", reject("INSUFFICIENT available SUBNET IPs"), U, Action.FLAG),
    ("default:reject-subnet-ip", reject("Subnet IP addresses are not enough"), U, Action.FLAG),
    ("default:reject-subnet-ip", reject("Subnet available IP addresses insufficient"), U, Action.FLAG),
    ("default:reject-quota", reject("Quota exceeded for proxy nodes"), U, Action.FLAG),
    ("default:reject", reject("The proxy is frozen"), U, Action.FLAG),
    ("default:reject", reject(None), U, Action.FLAG),
    ("default:catch-all", http(404, "DBS.999999", "not found"), U, Action.FAIL),
    ("default:catch-all", http(405), U, Action.FAIL),
    ("default:catch-all", http(418, "X.1", "teapot"), T, Action.FAIL),
]

WORKFLOW_CASES: list[tuple[str, str, Action]] = [
    ("default:workflow-failed", "Failed", Action.FLAG),
    ("default:workflow-failed", "Canceled", Action.FLAG),
    ("default:workflow-unauthorized", "Unauthorized", Action.FLAG),
    ("default:catch-all", "Exploded", Action.FAIL),
]

_BY_NAME = {r.name: r for r in DEFAULT_RULES}


@pytest.mark.parametrize(
    ("rule", "outcome", "stage", "action"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_default_rule(rule: str, outcome: Outcome, stage: Stage, action: Action) -> None:
    d = decide(outcome, attempt=1, policy=Policy.default(), rng=random.Random(7), stage=stage)
    assert (d.action, d.rule) == (action, rule)
    assert d.hint == _BY_NAME[rule].hint
    assert d.throttle is _BY_NAME[rule].throttle
    assert (d.delay is not None) is (action is Action.RETRY)
    if isinstance(outcome, HttpFailure):
        assert d.reason.startswith(f"HTTP {outcome.http_status}")
        if outcome.error_code:
            assert outcome.error_code in d.reason
    if action in (Action.FLAG, Action.FAIL, Action.STOP_RUN):
        assert d.hint


@pytest.mark.parametrize(("rule", "status", "action"), WORKFLOW_CASES)
def test_default_workflow_rule(rule: str, status: str, action: Action) -> None:
    info = WorkflowInfo(workflow_id="wf-9", status=status, fail_reason="node 2 did not restart")
    d = decide_workflow(info, attempt=1, policy=Policy.default())
    assert (d.action, d.rule) == (action, rule)
    assert d.reason == f"workflow wf-9 {status}: node 2 did not restart"


def test_every_default_rule_is_in_the_table() -> None:
    covered = {c[0] for c in CASES} | {c[0] for c in WORKFLOW_CASES}
    assert covered == set(_BY_NAME)


def test_specific_hints() -> None:
    subnet = decide(reject("insufficient subnet ip"), attempt=1, policy=Policy.default())
    assert subnet.hint == SUBNET_HINT
    assert subnet.reason == "rejected by the cloud: insufficient subnet ip"
    auth = decide(http(401, "APIGW.0301", "bad token"), attempt=1, policy=Policy.default())
    assert auth.hint == AUTH_HINT
    forbidden = decide(http(403), attempt=1, policy=Policy.default())
    assert forbidden.hint is not None and "gaussdbformysql:proxy:upgrade" in forbidden.hint
    hints = {
        _BY_NAME[n].hint
        for n in (
            "default:kernel-too-early",
            "default:parameter-error",
            "default:proxy-not-found",
            "default:instance-not-found",
        )
    }
    assert len(hints) == 4  # a specific hint each


def test_catch_all_reason_carries_raw_code_and_message() -> None:
    d = decide(http(418, "X.1", "I'm a teapot"), attempt=1, policy=Policy.default())
    assert d.reason == "HTTP 418 X.1: I'm a teapot"


def test_docs_yaml_is_the_default_policy() -> None:
    text = (Path(__file__).parents[2] / "docs" / "policy.md").read_text(encoding="utf-8")
    blocks = [
        b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("replace_defaults: true")
    ]
    assert len(blocks) == 1
    assert parse_policy(yaml.safe_load(blocks[0])) == Policy.default()
