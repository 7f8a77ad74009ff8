"""Parsing operator policies: errors with field paths, and the stored form's round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from orchestrator.outcomes import TransportKind
from orchestrator.policy import (
    DEFAULT_RULES,
    Action,
    Backoff,
    Policy,
    PolicyError,
    Stage,
    parse_policy,
    policy_to_dict,
)

OK_RULE: dict[str, Any] = {"name": "ok", "match": {"http_status": 409}, "action": "retry"}


def rule(**changes: Any) -> dict[str, Any]:
    return {**OK_RULE, **changes}


def match(**keys: Any) -> dict[str, Any]:
    return {"rules": [rule(match=keys)]}


ERRORS: list[tuple[Any, str, str]] = [
    ([1, 2], "", "must be a mapping"),
    ({1: "x"}, "", "keys must be strings"),
    ({"rulez": []}, "rulez", "unknown key"),
    ({"replace_defaults": "yes"}, "replace_defaults", "true or false"),
    ({"rules": {"a": 1}}, "rules", "list"),
    ({"rules": "retry everything"}, "rules", "list"),
    ({"rules": ["x"]}, "rules[0]", "mapping"),
    ({"rules": [{"match": {}, "action": "retry"}]}, "rules[0].name", "required"),
    ({"rules": [{"name": "n", "action": "retry"}]}, "rules[0].match", "required"),
    ({"rules": [{"name": "n", "match": {}}]}, "rules[0].action", "required"),
    ({"rules": [rule(name="")]}, "rules[0].name", "non-empty"),
    ({"rules": [rule(name=5)]}, "rules[0].name", "non-empty"),
    ({"rules": [rule(action="accepted")]}, "rules[0].action", "must be one of"),
    ({"rules": [rule(action="RETRY")]}, "rules[0].action", "must be one of"),
    ({"rules": [rule(when="now")]}, "rules[0].when", "unknown key"),
    ({"rules": [rule(hint=5)]}, "rules[0].hint", "string"),
    ({"rules": [rule(throttle="true")]}, "rules[0].throttle", "true or false"),
    ({"rules": [rule(action="flag", backoff={"initial": 1})]}, "rules[0].backoff", "only applies"),
    ({"rules": [rule(backoff={"initial": -1})]}, "rules[0].backoff.initial", "greater than or equal"),
    ({"rules": [rule(backoff={"jitter": 1})]}, "rules[0].backoff.jitter", "Extra inputs"),
    ({"rules": [rule(backoff={"max_attempts": 0})]}, "rules[0].backoff.max_attempts", "greater than"),
    ({"rules": [rule(backoff={"max_attempts": 2.5})]}, "rules[0].backoff.max_attempts", "integer"),
    ({"rules": [rule(backoff={"max_attempts": True})]}, "rules[0].backoff.max_attempts", "integer"),
    ({"rules": [rule(backoff="fast")]}, "rules[0].backoff", "mapping"),
    ({"rules": [rule(match=[1])]}, "rules[0].match", "mapping"),
    (match(code="DBS.1"), "rules[0].match.code", "unknown key"),
    (match(http_status=True), "rules[0].match.http_status", "HTTP status"),
    (match(http_status=700), "rules[0].match.http_status", "HTTP status"),
    (match(http_status="6xx"), "rules[0].match.http_status", "HTTP status"),
    (match(http_status="50"), "rules[0].match.http_status", "HTTP status"),
    (match(http_status=[]), "rules[0].match.http_status", "empty list"),
    (match(http_status=[409, "abc"]), "rules[0].match.http_status[1]", "HTTP status"),
    (match(error_code=123), "rules[0].match.error_code", "glob"),
    (match(error_code=["DBS.1", ""]), "rules[0].match.error_code[1]", "glob"),
    (match(message="("), "rules[0].match.message", "invalid regular expression"),
    (match(message=""), "rules[0].match.message", "non-empty"),
    (match(message=["a"]), "rules[0].match.message", "regular expression"),
    (match(transport="dns"), "rules[0].match.transport", "connect, timeout, reset, malformed"),
    (match(sent="yes"), "rules[0].match.sent", "true or false"),
    (match(state="ACCEPT"), "rules[0].match.state", "REJECT"),
    (match(workflow_status="Done"), "rules[0].match.workflow_status", "unknown workflow status"),
    (match(stage="postflight"), "rules[0].match.stage", "upgrade, preflight, track"),
    ({"rules": [OK_RULE, OK_RULE]}, "rules[1].name", "duplicate"),
    ({"rules": [rule(name="default:busy")]}, "rules[0].name", "built-in"),
    ({"rules": [rule(name="default:mine")]}, "rules[0].name", "built-in"),
    ({"rules": [], "replace_defaults": True}, "rules", "at least one rule"),
    ({"backoff": {"multiplier": 0.5}}, "backoff.multiplier", "greater than or equal"),
    ({"backoff": "fast"}, "backoff", "mapping"),
    (
        {"rules": [OK_RULE, rule(name="b"), rule(name="c", match={"error_code": None})]},
        "rules[2].match.error_code",
        "glob",
    ),
]


@pytest.mark.parametrize(("raw", "field", "words"), ERRORS, ids=[e[1] or "root" for e in ERRORS])
def test_errors_name_the_field(raw: Any, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(raw)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value) == (f"{field}: {info.value.message}" if field else info.value.message)


def test_no_policy_means_the_defaults() -> None:
    assert parse_policy(None) == Policy.default()
    assert parse_policy({}) == Policy.default()
    assert parse_policy({"rules": None}) == Policy.default()
    assert Policy.default().rules == DEFAULT_RULES
    assert Policy.default().backoff == Backoff()


def test_operator_rules_come_first_then_the_defaults() -> None:
    p = parse_policy({"rules": [OK_RULE, rule(name="two")]})
    assert [r.name for r in p.rules] == ["ok", "two", *(r.name for r in DEFAULT_RULES)]


def test_values_are_normalised() -> None:
    p = parse_policy(
        match(
            state="reject",
            workflow_status=["failed", "CANCELED"],
            http_status=["5XX", 409],
            transport="reset",
        )
    )
    m = p.rules[0].match
    assert m.state == "REJECT"
    assert m.workflow_status == ("Failed", "Canceled")
    assert m.http_status == ("5xx", "409")
    assert m.transport == (TransportKind.RESET,)


def test_default_names_are_allowed_when_replacing_the_defaults() -> None:
    p = parse_policy({"replace_defaults": True, "rules": [rule(name="default:busy")]})
    assert [r.name for r in p.rules] == ["default:busy"]


FULL: dict[str, Any] = {
    "backoff": {"initial": 1, "max": 30, "multiplier": 3, "max_attempts": 5},
    "rules": [
        {
            "name": "everything",
            "match": {
                "http_status": [500, "52x"],
                "error_code": ["DBS.2000*", "APIGW.*"],
                "message": r"busy|quota\s+\d+",
                "transport": ["timeout", "reset"],
                "sent": False,
                "state": "REJECT",
                "workflow_status": "Failed",
                "stage": ["upgrade", "track"],
            },
            "action": "retry",
            "hint": "wait it out",
            "backoff": {"max_attempts": 2},
            "throttle": True,
        },
        {"name": "flagger", "match": {"error_code": "DBS.1"}, "action": "flag"},
        {"name": "all", "match": {}, "action": "reconcile"},
    ],
}


@pytest.mark.parametrize(
    "p",
    [
        Policy.default(),
        parse_policy(FULL),
        parse_policy({**FULL, "replace_defaults": True}),
        parse_policy({"backoff": {"initial": 0}}),
    ],
    ids=["default", "full", "replaced", "zero-backoff"],
)
def test_round_trip(p: Policy) -> None:
    stored = policy_to_dict(p)
    assert parse_policy(stored) == p
    assert parse_policy(json.loads(json.dumps(stored))) == p
    assert parse_policy(yaml.safe_load(yaml.safe_dump(stored))) == p
    assert [r.name for r in parse_policy(stored).rules] == [r.name for r in p.rules]


def test_round_trip_keeps_compiled_behaviour() -> None:
    p = parse_policy(FULL)
    again = parse_policy(policy_to_dict(p))
    rule0 = again.rules[0]
    assert rule0.action is Action.RETRY and rule0.throttle and rule0.hint == "wait it out"
    assert rule0.backoff == Backoff(initial=1, max=30, multiplier=3, max_attempts=2)
    assert rule0.match.stage == (Stage.UPGRADE, Stage.TRACK)
    assert policy_to_dict(again)["rules"][0]["match"] == {  # type: ignore[index]
        **FULL["rules"][0]["match"],
        "workflow_status": "Failed",
    }
