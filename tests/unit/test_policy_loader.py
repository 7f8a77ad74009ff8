"""Parsing operator policies: errors with field paths, and the stored form's round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import InputErrors
from orchestrator.inventory import InventoryErrors, load_inventory
from orchestrator.outcomes import TransportKind
from orchestrator.policy import (
    DEFAULT_RULES,
    Action,
    Backoff,
    Policy,
    PolicyError,
    PolicyFileErrors,
    Stage,
    inventory_policy,
    load_policy_file,
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
    ({"rules": [rule(counts="yes")]}, "rules[0].counts", "true or false"),
    ({"rules": [rule(counts=None)]}, "rules[0].counts", "true or false"),
    ({"rules": [rule(name="   ")]}, "rules[0].name", "non-empty"),
    ({"rules": [rule(name="x" * 101)]}, "rules[0].name", "at most 100"),
    ({"rules": [rule(actoin="retry", action=None)]}, "rules[0].actoin", "unknown key"),
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
            "counts": True,
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
    assert rule0.counts_failure and not again.rules[1].counts_failure
    assert policy_to_dict(again)["rules"][0]["counts"] is True  # type: ignore[index]
    assert "counts" not in policy_to_dict(again)["rules"][1]  # type: ignore[index,operator]
    assert rule0.backoff == Backoff(initial=1, max=30, multiplier=3, max_attempts=2)
    assert rule0.match.stage == (Stage.UPGRADE, Stage.TRACK)
    assert policy_to_dict(again)["rules"][0]["match"] == {  # type: ignore[index]
        **FULL["rules"][0]["match"],
        "workflow_status": "Failed",
    }


def test_counts_maps_to_counts_failure() -> None:
    p = parse_policy({"rules": [rule(counts=True), rule(name="b", counts=False), rule(name="c")]})
    assert [r.counts_failure for r in p.rules[:3]] == [True, False, False]


# ------------------------------------------------------------------------------------------- files

FILE_POLICY = """\
backoff:
  initial: 0.5
rules:
  - name: busy
    match: {error_code: [DBS.200019, "DBS.2000*"], http_status: 409}
    action: retry
    counts: false
  - name: quota
    match:
      message: quota
    action: flag
    counts: true
"""


def _policy_file(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_policy_file_reads_like_the_mapping(tmp_path: Path) -> None:
    expected = parse_policy(yaml.safe_load(FILE_POLICY))
    assert load_policy_file(_policy_file(tmp_path, FILE_POLICY)) == expected
    wrapped = "policy:\n" + "".join(f"  {line}\n" for line in FILE_POLICY.splitlines())
    assert load_policy_file(_policy_file(tmp_path, wrapped, "w.yaml")) == expected
    assert load_policy_file(_policy_file(tmp_path, "policy:\n", "n.yaml")) == Policy.default()
    assert load_policy_file(_policy_file(tmp_path, "{}\n", "e.yaml")) == Policy.default()
    stored = yaml.safe_dump(policy_to_dict(expected))
    assert load_policy_file(_policy_file(tmp_path, stored, "s.yaml")) == expected


POLICY_FILE_ERRORS = [
    ("rules:\n  - name: a\n    match: {http_status: 700}\n    action: retry\n", 3,
     "rules[0].match.http_status", "HTTP status"),
    ("policy:\n  rules:\n    - name: a\n      match:\n        transport: [reset, dns]\n      action: retry\n",
     5, "policy.rules[0].match.transport[1]", "unknown transport kind 'dns'"),
    ("rules:\n  - name: a\n    action: retry\n", 2, "rules[0].match", "is required"),
    ("rules:\n  - name: a\n    match: {}\n    action: retry\n  - name: a\n    match: {}\n    action: flag\n",
     5, "rules[1].name", "duplicate rule name"),
    ("replace_defaults: yes\n", 1, "replace_defaults", "YAML 1.1 as boolean True"),
    ("rules: []\nrules: []\n", 2, "rules", "duplicate key (first on line 1)"),
    ("policy:\n  backoff: {initial: 1, initial: 2}\n", 2, "policy.backoff.initial", "duplicate key"),
    ("backoff:\n  initial: 0443\n", 2, "backoff.initial", "odd form"),
    ("backoff:\n  multiplier: 0.5\n", 2, "backoff.multiplier", "greater than or equal"),
    ("rulez: []\n", 1, "rulez", "unknown key"),
    ("- a\n- b\n", 1, None, "must be a mapping"),
    ("rules: [\n", 2, None, "not valid YAML"),
    ("a: 1\n---\nb: 2\n", 2, None, "expected a single document"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "field", "words"), POLICY_FILE_ERRORS)
def test_policy_file_errors_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str | None, words: str
) -> None:
    path = _policy_file(tmp_path, text)
    with pytest.raises(PolicyFileErrors) as info:
        load_policy_file(path)
    err = info.value
    assert isinstance(err, InputErrors)
    (one,) = err.errors
    assert (one.path, one.line, one.field) == (str(path), line, field), str(one)
    assert words in one.message, one.message
    prefix = f"{path}:{line}: {field}: " if field else f"{path}:{line}: "
    assert str(one).startswith(prefix) and "\n" not in str(one)


def test_policy_file_that_is_empty_unreadable_or_not_utf8(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "---\n"):
        with pytest.raises(PolicyFileErrors) as info:
            load_policy_file(_policy_file(tmp_path, text))
        assert (info.value.line, info.value.message.split(";")[0]) == (None, "file is empty")
    with pytest.raises(PolicyFileErrors, match="cannot read the file"):
        load_policy_file(tmp_path / "absent.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"rules: []\nbackoff: {}\n# caf\xe9\n")
    with pytest.raises(PolicyFileErrors) as info:
        load_policy_file(bad)
    assert info.value.line == 3 and "not UTF-8 text (byte 0xe9 at column 6)" in info.value.message


def test_an_inventory_policy_block_gets_file_line_errors(tmp_path: Path) -> None:
    head = (
        "proxies:\n  - {project_id: 054e292c9880d4992f02c0196d3ea468, "
        "instance_id: 517ea793ab91438cbfcd9c4b1c958b1ein07, proxy_id: 0f46fc46396e4fb19a0cb52f578e9511po01, "
        "region: cn-north-4, target_version: '2.24.03.000'}\n"
    )
    inv_path = tmp_path / "inv.yaml"
    inv_path.write_text(
        head + "policy:\n  rules:\n    - name: a\n      match: {stage: postflight}\n      action: retry\n"
    )
    with pytest.raises(InventoryErrors) as info:
        inventory_policy(load_inventory(inv_path))
    (err,) = info.value.errors
    assert (err.path, err.line, err.field) == (str(inv_path), 6, "policy.rules[0].match.stage")
    assert "unknown stage 'postflight'" in err.message
    inv_path.write_text(head + "policy:\n  replace_defaults: true\n")
    with pytest.raises(InventoryErrors) as info:
        inventory_policy(load_inventory(inv_path))
    assert (info.value.line, info.value.field) == (4, "policy.rules")  # no rules line: the policy's own
    inv_path.write_text(head + "policy:\n  rules: [{name: a, match: {}, action: retry, counts: true}]\n")
    assert inventory_policy(load_inventory(inv_path)).rules[0].counts_failure
    inv_path.write_text(head)
    assert inventory_policy(load_inventory(inv_path)) == Policy.default()
