"""The built-in rules against the classification table of docs/policy.md: one test row per kind of answer,
each checked over several statuses and bodies of that kind, plus the breaker's counts and the docs' YAML."""

from __future__ import annotations

import dataclasses
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
from orchestrator.policy.decide import ACCEPTED_RULE, PARTIAL_ACCEPT_RULE, render_hint
from orchestrator.policy.rules import BUSY_CODES, CATCH_ALL, GUARD_RULES, RUN_PLACEHOLDER

K = TransportKind
U, P, T = Stage.UPGRADE, Stage.PREFLIGHT, Stage.TRACK
READS = (P, T)
ALL = (U, P, T)
DOCS = Path(__file__).parents[2] / "docs" / "policy.md"
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
HTML_503 = "<html><body>503 Service Temporarily Unavailable</body></html>"


def tf(kind: TransportKind, sent: bool, status: int | None = None) -> TransportFailure:
    return TransportFailure(kind=kind, sent=sent, detail="boom", http_status=status)


def http(status: int, code: str | None = None, msg: str | None = None) -> HttpFailure:
    """An error answer as the client reports it: ``code`` only when the body was the JSON error shape
    (an HTML page gives no code, its text at most as the message)."""
    return HttpFailure(http_status=status, error_code=code, error_msg=msg, request_id="req-1")


def answer(*items: tuple[str, str | None, str | None]) -> Answered:
    """(state, workflow_id, error_message) per item."""
    return Answered(
        http_status=200,
        items=tuple(UpdateItem(workflow_id=w, state=s, error_message=m) for s, w, m in items),
    )


def reject(msg: str | None) -> Answered:
    return answer(("REJECT", None, msg))


# One row per row of the classification table: (kind, stages, rule, action, outcomes of that kind).
KINDS: list[tuple[str, tuple[Stage, ...], str, Action, list[Outcome]]] = [
    ("tls verification failed", ALL, "default:tls", Action.STOP_RUN, [tf(K.TLS, False), tf(K.TLS, True)]),
    (
        "transport failure before sending",
        (U,),
        "default:transport-not-sent",
        Action.RETRY,
        [tf(K.CONNECT, False), tf(K.TIMEOUT, False), tf(K.RESET, False), tf(K.MALFORMED, False)],
    ),
    (
        "transport failure after sending, malformed answer",
        (U,),
        "default:transport-answer-lost",
        Action.RECONCILE,
        [
            tf(K.TIMEOUT, True),
            tf(K.RESET, True),
            tf(K.CONNECT, True),
            tf(K.MALFORMED, True, 200),
            tf(K.MALFORMED, True, 502),
            Answered(http_status=200, items=()),
            answer(("accept", "wf-1", None)),
            answer(("PENDING", "wf-1", None)),
            answer(("ACCEPT", None, None)),
            answer(("ACCEPT", "", None)),
            answer(("ACCEPT", "wf-1", "insufficient subnet ip")),
            answer(("ACCEPT", "wf-1", None), ("ACCEPT", "wf-1", None)),
            answer(("ACCEPT", "wf-1", None), ("reject", None, "x")),
        ],
    ),
    (
        "429 or APIGW.0308 at the gateway",
        ALL,
        "default:throttled",
        Action.RETRY,
        [
            http(429),
            http(429, "APIGW.0308", "The throttling threshold has been reached"),
            http(429, None, HTML_503),
            http(429, "DBS.999999", "slow down"),
        ],
    ),
    (
        "APIGW.0308 with another 4xx",
        ALL,
        "default:throttled-apigw",
        Action.RETRY,
        [http(400, "APIGW.0308", "policy user over ratelimit, limit:10"), http(403, "APIGW.0308", None)],
    ),
    (
        "401",
        ALL,
        "default:unauthenticated",
        Action.STOP_RUN,
        [
            http(401, "APIGW.0301", "Incorrect IAM authentication information"),
            http(401),
            http(401, None, "<html>Unauthorized</html>"),
        ],
    ),
    (
        "403",
        ALL,
        "default:forbidden",
        Action.STOP_RUN,
        [http(403, "DBS.200003", "no permission"), http(403), http(403, "APIGW.0302", "denied")],
    ),
    (
        "busy code in a 4xx",
        ALL,
        "default:busy",
        Action.RETRY,
        [
            *[http(409, code, "another operation is running") for code in BUSY_CODES],
            http(400, "DBS.201014", "another operation is running"),
            http(409, "DBS.200019", None),
        ],
    ),
    (
        "already at target",
        (U,),
        "default:already-latest",
        Action.SKIP,
        [http(400, "DBS.05000008", "already the latest version"), http(400, "DBS.05000008")],
    ),
    (
        "kernel too early",
        ALL,
        "default:kernel-too-early",
        Action.FLAG,
        [http(400, "DBS.05000001", "kernel version too early"), http(400, "DBS.05000001")],
    ),
    (
        "parameter error",
        ALL,
        "default:parameter-error",
        Action.FLAG,
        [http(400, "DBS.200001", "parameter error"), http(400, "DBS.200001")],
    ),
    (
        "proxy not found",
        ALL,
        "default:proxy-not-found",
        Action.FLAG,
        [http(400, "DBS.270024", "proxy does not exist"), http(404, "DBS.270024")],
    ),
    (
        "instance not found",
        ALL,
        "default:instance-not-found",
        Action.FLAG,
        [http(404, "DBS.200002", "instance does not exist"), http(400, "DBS.200002")],
    ),
    (
        "5xx at the upgrade, whatever its body",
        (U,),
        "default:server-error-unproven",
        Action.RECONCILE,
        [
            http(500, "DBS.05000000", "server error"),
            http(500),
            http(502, None, HTML_502),
            http(503, None, HTML_503),
            http(503, "APIGW.0202", "backend unavailable"),
            http(504, None, "gateway timeout"),
            http(500, "DBS.200019", "another operation is running"),  # a busy code, but a 5xx
            http(503, "DBS.05000008", "already latest"),
            http(502, "APIGW.0308", "throttled"),
            http(599),
        ],
    ),
    (
        "any other answer to the upgrade",
        (U,),
        "default:unproven-answer",
        Action.RECONCILE,
        [
            http(400),
            http(400, None, "<html><body>Bad Request</body></html>"),
            http(400, "DBS.123456", "something odd"),
            http(400, "DBS.200543", "The job does not exist."),  # a tracking code, not the upgrade's
            http(404),
            http(404, "DBS.999999", "not found"),
            http(404, None, "<html>Not Found</html>"),
            http(409),
            http(409, "DBS.999999", None),
            http(405),
            http(418, "X.1", "teapot"),
            http(400, "APIGW.0201", "request malformed"),
            http(302, None, "moved"),
            http(100),
            http(200, None, "not an error, yet reported as one"),
            http(999),
        ],
    ),
    (
        "transport failure on a read",
        READS,
        "default:read-transport",
        Action.RETRY,
        [
            tf(K.CONNECT, False),
            tf(K.TIMEOUT, True),
            tf(K.RESET, True),
            tf(K.MALFORMED, True, 200),
            tf(K.TIMEOUT, False),
        ],
    ),
    (
        "5xx on a read",
        READS,
        "default:server-error",
        Action.RETRY,
        [
            http(500, "DBS.05000000", "server error"),
            http(502, None, HTML_502),
            http(503, "APIGW.0202"),
            http(504),
            http(500, "DBS.200019"),
        ],
    ),
    (
        "new job not yet queryable",
        (T,),
        "default:job-not-visible",
        Action.RETRY,
        [http(400, "DBS.200543", "The job does not exist."), http(404, "DBS.200543")],
    ),
    (
        "another 4xx on a read",
        READS,
        "default:read-refused",
        Action.FLAG,
        [http(400), http(404), http(404, "DBS.999999"), http(409), http(400, None, "<html>x</html>")],
    ),
    ("other statuses on a read", READS, "default:catch-all", Action.FAIL, [http(302), http(100), http(999)]),
    (
        "REJECT: insufficient subnet IP",
        (U,),
        "default:reject-subnet-ip",
        Action.FLAG,
        [
            reject("Upgrade failed due to insufficient subnet ip"),
            reject("INSUFFICIENT available SUBNET IPs"),
            reject("Subnet IP addresses are not enough"),
            reject("Subnet available IP addresses insufficient"),
        ],
    ),
    (
        "REJECT: quota",
        (U,),
        "default:reject-quota",
        Action.FLAG,
        [reject("Quota exceeded for proxy nodes"), reject("QUOTA")],
    ),
    (
        "REJECT: anything else",
        (U,),
        "default:reject",
        Action.FLAG,
        [reject("The proxy is frozen"), reject(None)],
    ),
]

WORKFLOW_KINDS: list[tuple[str, list[str], Action]] = [
    ("default:workflow-failed", ["Failed", "Canceled", "failed", "CANCELED"], Action.FLAG),
    ("default:workflow-unauthorized", ["Unauthorized", "unauthorized"], Action.FLAG),
    ("default:catch-all", ["Exploded", "Timeout"], Action.FAIL),
]

_BY_NAME = {r.name: r for r in DEFAULT_RULES}
_CASES = [
    pytest.param(kind, stage, rule, action, outcome, id=f"{rule}-{stage.value}-{i}")
    for kind, stages, rule, action, outcomes in KINDS
    for stage in stages
    for i, outcome in enumerate(outcomes)
]


@pytest.mark.parametrize(("kind", "stage", "rule", "action", "outcome"), _CASES)
def test_classification(kind: str, stage: Stage, rule: str, action: Action, outcome: Outcome) -> None:
    d = decide(outcome, attempt=1, policy=Policy.default(), rng=random.Random(7), stage=stage)
    assert (d.action, d.rule) == (action, rule), kind
    assert d.hint == _BY_NAME[rule].hint
    assert d.throttle is _BY_NAME[rule].throttle
    assert (d.delay is not None) is (action is Action.RETRY)
    assert d.partial is False
    if isinstance(outcome, HttpFailure):
        assert d.reason.startswith(f"HTTP {outcome.http_status}")
        if outcome.error_code:
            assert outcome.error_code in d.reason
    if action in (Action.FLAG, Action.FAIL, Action.STOP_RUN):
        assert d.hint


@pytest.mark.parametrize(("rule", "statuses", "action"), WORKFLOW_KINDS)
def test_workflow_classification(rule: str, statuses: list[str], action: Action) -> None:
    for status in statuses:
        info = WorkflowInfo(workflow_id="wf-9", status=status, fail_reason="node 2 did not restart")
        d = decide_workflow(info, attempt=1, policy=Policy.default())
        assert (d.action, d.rule) == (action, rule), status
        assert d.reason == f"workflow wf-9 {status}: node 2 did not restart"


def test_every_default_rule_is_in_the_table() -> None:
    covered = {k[2] for k in KINDS} | {k[0] for k in WORKFLOW_KINDS}
    assert covered == set(_BY_NAME)


def test_only_proven_refusals_are_resent_without_reconciling_at_the_upgrade() -> None:
    """The kind-2 promise, stated over the rules: at the upgrade stage, every rule whose action resends
    without a look (retry) or ends the job (skip, flag) is keyed on a proof of refusal: nothing sent, a
    documented error code in a 4xx, 401/403, or 429."""
    resending = [
        r
        for r in DEFAULT_RULES
        if r.action in (Action.RETRY, Action.SKIP, Action.FLAG, Action.FAIL)
        and (r.match.stage is None or U in r.match.stage)
        and r is not CATCH_ALL
    ]
    for r in resending:
        m = r.match
        proof = (
            m.sent is False
            or m.state == "REJECT"
            or m.workflow_status is not None
            or m.http_status == ("429",)
            or (m.http_status == ("4xx",) and m.error_code is not None)
        )
        assert proof, r.name


BREAKER: dict[str, bool] = {
    # counts: signs the build or the cloud is bad, or an outcome nobody could establish
    "default:workflow-failed": True,
    "default:workflow-unauthorized": True,
    "default:catch-all": True,
    "default:reject": True,
    "default:transport-answer-lost": True,
    "default:server-error-unproven": True,
    "default:unproven-answer": True,
    "default:read-transport": True,
    "default:transport-not-sent": True,
    "default:throttled": True,
    "default:throttled-apigw": True,
    "default:server-error": True,
    "default:job-not-visible": True,
    # does not count: a precondition of one proxy, or nothing that ends a job
    "default:reject-subnet-ip": False,
    "default:reject-quota": False,
    "default:parameter-error": False,
    "default:already-latest": False,
    "default:proxy-not-found": False,
    "default:instance-not-found": False,
    "default:kernel-too-early": False,
    "default:busy": False,
    "default:read-refused": False,
    "default:tls": False,
    "default:unauthenticated": False,
    "default:forbidden": False,
}


def test_counts_failure_defaults() -> None:
    assert {r.name: r.counts_failure for r in DEFAULT_RULES} == BREAKER
    assert all(g.counts_failure for g in GUARD_RULES)


@pytest.mark.parametrize(("kind", "stage", "rule", "action", "outcome"), _CASES)
def test_decision_counts_only_when_it_ends_the_job(
    kind: str, stage: Stage, rule: str, action: Action, outcome: Outcome
) -> None:
    policy = Policy.default()
    first = decide(outcome, attempt=1, policy=policy, rng=random.Random(1), stage=stage)
    ends = action in (Action.FLAG, Action.FAIL)
    assert first.counts_failure is (ends and BREAKER[rule]), kind
    if action is Action.RETRY:  # given up after max_attempts: the rule's counts decides
        last = decide(outcome, attempt=policy.backoff.max_attempts, policy=policy, stage=stage)
        assert (last.action, last.rule, last.counts_failure) == (Action.FAIL, rule, BREAKER[rule])


def test_hints_name_the_run_with_the_placeholder() -> None:
    hints = [r.hint for r in (*DEFAULT_RULES, *GUARD_RULES) if r.hint]
    assert all("RUN " not in h and " RUN" not in h for h in hints)
    commands = [c for h in hints for c in re.findall(r"orchestrator \S+ \S+", h)]
    assert commands and all(RUN_PLACEHOLDER in c for c in commands), commands
    d = decide(reject("quota exceeded"), attempt=1, policy=Policy.default())
    assert render_hint(d.hint, 42) == (
        "A quota is exhausted: raise it (or free what counts against it) in the console, "
        "then run: orchestrator retry 42 --flagged"
    )


def test_tls_stops_the_run_with_a_configuration_hint() -> None:
    d = decide(tf(K.TLS, False), attempt=1, policy=Policy.default())
    assert (d.action, d.rule, d.delay, d.counts_failure) == (Action.STOP_RUN, "default:tls", None, False)
    assert d.reason == "TLS certificate verification failed before the request was sent: boom"
    assert d.hint is not None and "--ca-bundle" in d.hint and "not a transient" in d.hint


def test_specific_hints() -> None:
    subnet = decide(reject("insufficient subnet ip"), attempt=1, policy=Policy.default())
    assert subnet.reason == "rejected by the cloud: insufficient subnet ip"
    assert subnet.hint is not None and subnet.hint.startswith("Free or add IP addresses")
    forbidden = decide(http(403), attempt=1, policy=Policy.default())
    assert forbidden.hint is not None and "gaussdbformysql:proxy:upgrade" in forbidden.hint
    flags = [r.hint for r in DEFAULT_RULES if r.action is Action.FLAG]
    assert len(set(flags)) == len(flags)  # a specific hint each


def test_catch_all_reason_carries_raw_code_and_message() -> None:
    d = decide(http(418, "X.1", "I'm a teapot"), attempt=1, policy=Policy.default(), stage=P)
    assert d.reason == "HTTP 418 X.1: I'm a teapot"


def _docs_section(title: str) -> str:
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_docs_classification_table_names_every_rule() -> None:
    named = set(re.findall(r"`(default:[a-z-]+)`", _docs_section("Classification")))
    assert named == set(_BY_NAME) | {g.name for g in GUARD_RULES} | {ACCEPTED_RULE, PARTIAL_ACCEPT_RULE}


def test_docs_yaml_is_the_default_policy() -> None:
    blocks = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
        if b.startswith("replace_defaults: true")
    ]
    assert len(blocks) == 1
    raw = yaml.safe_load(blocks[0])
    # ``counts`` is compared on its own, so this test holds whether or not the loader reads that key yet.
    counts = {r["name"]: r.pop("counts") for r in raw["rules"]}
    assert counts == {r.name: r.counts_failure for r in DEFAULT_RULES}
    without_counts = tuple(dataclasses.replace(r, counts_failure=False) for r in DEFAULT_RULES)
    assert parse_policy(raw) == Policy(rules=without_counts)
