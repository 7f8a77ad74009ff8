"""Operator policy mappings in, ``Policy`` out, and back again.

The caller reads the file (YAML inventory ``policy:`` section or a separate file) and hands over the parsed
mapping, so this module stays free of I/O. Errors name a dotted path inside the mapping
(``rules[2].match.error_code``) that the caller maps to a file line. ``policy_to_dict`` writes every rule
out with ``replace_defaults: true``, so a resumed run keeps exactly the policy it started with even after
the built-in defaults change in a later release.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import TypeVar

from pydantic import ValidationError

from orchestrator.outcomes import TransportKind
from orchestrator.policy.backoff import Backoff
from orchestrator.policy.rules import (
    DEFAULT_RULES,
    RULE_ACTIONS,
    WORKFLOW_STATUSES,
    Action,
    Match,
    Policy,
    Rule,
    Stage,
)

_TOP_KEYS = ("rules", "backoff", "replace_defaults")
_RULE_KEYS = ("name", "match", "action", "hint", "backoff", "throttle")
_MATCH_KEYS = (
    "http_status",
    "error_code",
    "message",
    "transport",
    "sent",
    "state",
    "workflow_status",
    "stage",
)
_STATUS_PATTERN = re.compile(r"[1-5][0-9x]{2}")
_RESERVED_PREFIX = "default:"
_MAX_NAME = 100


class PolicyError(ValueError):
    """An invalid policy; ``field`` is a dotted path inside the policy mapping ("" for the mapping itself)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def parse_policy(raw: Mapping[str, object] | None) -> Policy:
    """Operator rules first, then the defaults (unless ``replace_defaults: true``); None -> defaults."""
    if raw is None:
        return Policy.default()
    mapping = _mapping(raw, "")
    _no_unknown_keys(mapping, _TOP_KEYS, "")
    replace = mapping.get("replace_defaults", False)
    if not isinstance(replace, bool):
        raise PolicyError("replace_defaults", "must be true or false")
    backoff = _backoff(mapping.get("backoff"), Backoff(), "backoff")
    raw_rules = mapping.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, Sequence) or isinstance(raw_rules, str | bytes):
        raise PolicyError("rules", "must be a list of rules")
    rules: list[Rule] = []
    taken = set() if replace else {r.name for r in DEFAULT_RULES}
    for i, item in enumerate(raw_rules):
        path = f"rules[{i}]"
        rule = _rule(item, path, backoff)
        if rule.name.startswith(_RESERVED_PREFIX) and not replace:
            raise PolicyError(
                f"{path}.name",
                f"names starting with {_RESERVED_PREFIX!r} belong to the built-in rules; choose another name "
                "(or set replace_defaults: true to supply the whole rule list)",
            )
        if rule.name in taken:
            raise PolicyError(f"{path}.name", f"duplicate rule name {rule.name!r}")
        taken.add(rule.name)
        rules.append(rule)
    if replace and not rules:
        raise PolicyError("rules", "replace_defaults: true needs at least one rule")
    return Policy(rules=tuple(rules) if replace else (*rules, *DEFAULT_RULES), backoff=backoff)


def policy_to_dict(p: Policy) -> dict[str, object]:
    """JSON/YAML-serialisable form; ``parse_policy(policy_to_dict(p)) == p``."""
    return {
        "replace_defaults": True,
        "backoff": p.backoff.model_dump(),
        "rules": [_rule_to_dict(r) for r in p.rules],
    }


def _rule_to_dict(r: Rule) -> dict[str, object]:
    out: dict[str, object] = {"name": r.name, "match": _match_to_dict(r.match), "action": r.action.value}
    if r.hint is not None:
        out["hint"] = r.hint
    if r.backoff is not None:
        out["backoff"] = r.backoff.model_dump()
    if r.throttle:
        out["throttle"] = True
    return out


def _match_to_dict(m: Match) -> dict[str, object]:
    out: dict[str, object] = {}
    if m.http_status is not None:
        out["http_status"] = _one_or_list([int(p) if p.isdigit() else p for p in m.http_status])
    if m.error_code is not None:
        out["error_code"] = _one_or_list(list(m.error_code))
    if m.message is not None:
        out["message"] = m.message
    if m.transport is not None:
        out["transport"] = _one_or_list([t.value for t in m.transport])
    if m.sent is not None:
        out["sent"] = m.sent
    if m.state is not None:
        out["state"] = m.state
    if m.workflow_status is not None:
        out["workflow_status"] = _one_or_list(list(m.workflow_status))
    if m.stage is not None:
        out["stage"] = _one_or_list([s.value for s in m.stage])
    return out


def _one_or_list(values: list[object]) -> object:
    return values[0] if len(values) == 1 else values


def _rule(raw: object, path: str, policy_backoff: Backoff) -> Rule:
    mapping = _mapping(raw, path)
    _no_unknown_keys(mapping, _RULE_KEYS, path)
    for key in ("name", "match", "action"):
        if key not in mapping:
            raise PolicyError(f"{path}.{key}", "is required")
    name = mapping["name"]
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise PolicyError(f"{path}.name", f"must be a non-empty string of at most {_MAX_NAME} characters")
    action_raw = mapping["action"]
    allowed = ", ".join(a.value for a in RULE_ACTIONS)
    if not isinstance(action_raw, str) or action_raw not in {a.value for a in RULE_ACTIONS}:
        raise PolicyError(f"{path}.action", f"must be one of {allowed}")
    action = Action(action_raw)
    hint = mapping.get("hint")
    if hint is not None and not isinstance(hint, str):
        raise PolicyError(f"{path}.hint", "must be a string")
    throttle = mapping.get("throttle", False)
    if not isinstance(throttle, bool):
        raise PolicyError(f"{path}.throttle", "must be true or false")
    backoff: Backoff | None = None
    if mapping.get("backoff") is not None:
        if action is not Action.RETRY:
            raise PolicyError(f"{path}.backoff", "only applies to rules whose action is retry")
        backoff = _backoff(mapping["backoff"], policy_backoff, f"{path}.backoff")
    return Rule(
        name=name,
        match=_match(mapping["match"], f"{path}.match"),
        action=action,
        hint=hint,
        backoff=backoff,
        throttle=throttle,
    )


def _match(raw: object, path: str) -> Match:
    m = {} if raw is None else _mapping(raw, path)
    _no_unknown_keys(m, _MATCH_KEYS, path)
    message = m.get("message")
    if message is not None:
        if not isinstance(message, str) or not message:
            raise PolicyError(f"{path}.message", "must be a non-empty regular expression")
        try:
            re.compile(message, re.IGNORECASE)
        except re.error as exc:
            raise PolicyError(f"{path}.message", f"invalid regular expression: {exc}") from None
    sent = m.get("sent")
    if sent is not None and not isinstance(sent, bool):
        raise PolicyError(f"{path}.sent", "must be true or false")
    state = m.get("state")
    if state is not None and (not isinstance(state, str) or state.upper() != "REJECT"):
        raise PolicyError(f"{path}.state", "must be REJECT (ACCEPT items never reach the rules)")
    return Match(
        http_status=_list(m, "http_status", path, _status_pattern),
        error_code=_list(m, "error_code", path, _glob),
        message=message,
        transport=_list(m, "transport", path, _enum_value(TransportKind, "transport kind")),
        sent=sent,
        state=None if state is None else "REJECT",
        workflow_status=_list(m, "workflow_status", path, _workflow_status),
        stage=_list(m, "stage", path, _enum_value(Stage, "stage")),
    )


T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


def _list(
    m: Mapping[str, object], key: str, path: str, convert: Callable[[object, str], T]
) -> tuple[T, ...] | None:
    """A key that takes one value or a non-empty list of values; None when the key is absent."""
    if key not in m:
        return None
    raw = m[key]
    if isinstance(raw, list | tuple):
        if not raw:
            raise PolicyError(f"{path}.{key}", "must not be an empty list")
        return tuple(convert(v, f"{path}.{key}[{i}]") for i, v in enumerate(raw))
    return (convert(raw, f"{path}.{key}"),)


def _status_pattern(value: object, path: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return str(value)
    if isinstance(value, str) and _STATUS_PATTERN.fullmatch(value.lower()):
        return value.lower()
    raise PolicyError(path, 'must be an HTTP status (100-599) or a pattern like "5xx" or "40x"')


def _glob(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(path, 'must be a non-empty error code or glob, e.g. "DBS.200019" or "DBS.2000*"')
    return value


def _enum_value(kind: type[E], what: str) -> Callable[[object, str], E]:
    def convert(value: object, path: str) -> E:
        if isinstance(value, str) and value in {k.value for k in kind}:
            return kind(value)
        raise PolicyError(
            path, f"unknown {what} {value!r}; expected one of {', '.join(k.value for k in kind)}"
        )

    return convert


def _workflow_status(value: object, path: str) -> str:
    if isinstance(value, str):
        for known in WORKFLOW_STATUSES:
            if value.lower() == known.lower():
                return known
    raise PolicyError(
        path, f"unknown workflow status {value!r}; expected one of {', '.join(WORKFLOW_STATUSES)}"
    )


def _backoff(raw: object, base: Backoff, path: str) -> Backoff:
    """Keys given override ``base`` (the defaults, or the policy's backoff for a rule's override)."""
    if raw is None:
        return base
    mapping = _mapping(raw, path)
    try:
        return Backoff.model_validate({**base.model_dump(), **mapping})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PolicyError(f"{path}.{where}" if where else path, first["msg"]) from None


def _mapping(raw: object, path: str) -> Mapping[str, object]:
    if not isinstance(raw, Mapping):
        raise PolicyError(path, "must be a mapping")
    for key in raw:
        if not isinstance(key, str):
            raise PolicyError(path, f"keys must be strings, got {key!r}")
    return raw


def _no_unknown_keys(mapping: Mapping[str, object], allowed: Sequence[str], path: str) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise PolicyError(where, f"unknown key; expected one of {', '.join(allowed)}")
