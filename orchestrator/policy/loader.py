"""Operator policies in, ``Policy`` out, and back again.

The accepted language (docs/policy.md) is declared as pydantic models below; what pydantic cannot say (a
reserved rule name, a duplicate name, ``backoff`` only on retry rules) is checked after. Every problem
becomes ``PolicyError(field, message)`` where ``field`` is the dotted path inside the policy mapping
(``rules[2].match.error_code``), which the file readers here turn into ``file:line: field: message``:
``load_policy_file`` for ``--policy FILE`` and ``inventory_policy`` for an inventory's ``policy:`` block.
Both read YAML with the inventory's strict reader (duplicate keys and YAML 1.1 coercions refused).

``policy_to_dict`` writes every rule out with ``replace_defaults: true``, so a resumed run keeps exactly
the policy it started with even after the built-in defaults change in a later release.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from yaml.nodes import MappingNode, ScalarNode

from orchestrator.inventory import FileError, FileErrors, Inventory, InventoryError, InventoryErrors
from orchestrator.inventory.errors import Problems
from orchestrator.inventory.strict_yaml import NULL, pairs, read_document, to_python
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

__all__ = [
    "PolicyError",
    "PolicyFileError",
    "PolicyFileErrors",
    "inventory_policy",
    "load_policy_file",
    "parse_policy",
    "policy_to_dict",
]

_RESERVED_PREFIX = "default:"
_MAX_NAME = 100
_ACTIONS = ", ".join(a.value for a in RULE_ACTIONS)


class PolicyError(ValueError):
    """An invalid policy; ``field`` is a dotted path inside the policy mapping ("" for the mapping itself)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class PolicyFileError(FileError):
    """One problem in a ``--policy`` file: ``str()`` is ``file:line: field: message``."""


class PolicyFileErrors(FileErrors, PolicyFileError):
    """What ``load_policy_file`` raises (an ``InputErrors``: the command line prints it, exit 2)."""


# --------------------------------------------------------------------------------- the language


def _listed(value: object) -> object:
    """Keys that take one value or a list: a single value is checked as a list of one."""
    return value if isinstance(value, list | tuple) else [value]


def _status_text(value: object) -> object:
    # 409 and "409" alike; a bool is an int to Python but never a status, so it stays and fails.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.lower() if isinstance(value, str) else value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _workflow_spelling(value: object) -> object:
    if isinstance(value, str):
        for known in WORKFLOW_STATUSES:
            if value.lower() == known.lower():
                return known
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


def _one_of(choices: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"not one of {choices}")
        return value

    return AfterValidator(check)


_Status = Annotated[str, BeforeValidator(_status_text), StringConstraints(pattern=r"^[1-5][0-9x]{2}$")]
_Glob = Annotated[str, StringConstraints(min_length=1)]
_Transport = Annotated[TransportKind, Strict(False)]
_StageName = Annotated[Stage, Strict(False)]
_WorkflowStatus = Annotated[str, BeforeValidator(_workflow_spelling), _one_of(WORKFLOW_STATUSES)]
# A key that takes one value or a non-empty list. The wrap runs before the None check, so ``key: null``
# is refused like any other bad value; an absent key keeps its default (defaults are not validated).
_Statuses = Annotated[Annotated[list[_Status], Field(min_length=1)] | None, BeforeValidator(_listed)]
_Globs = Annotated[Annotated[list[_Glob], Field(min_length=1)] | None, BeforeValidator(_listed)]
_Transports = Annotated[Annotated[list[_Transport], Field(min_length=1)] | None, BeforeValidator(_listed)]
_Stages = Annotated[Annotated[list[_StageName], Field(min_length=1)] | None, BeforeValidator(_listed)]
_WorkflowStatuses = Annotated[
    Annotated[list[_WorkflowStatus], Field(min_length=1)] | None, BeforeValidator(_listed)
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _mapping_with_string_keys(cls, data: object) -> object:
        if not isinstance(data, Mapping):
            raise PydanticCustomError("mapping", "must be a mapping")
        for key in data:
            if not isinstance(key, str):
                raise PydanticCustomError("keys", "keys must be strings, got {key}", {"key": repr(key)})
        return dict(data)


class _MatchIn(_Model):
    """``match:`` of a rule; every key given must match (AND). A list key takes one value or a list."""

    http_status: _Statuses = None
    error_code: _Globs = None
    message: Annotated[str, StringConstraints(min_length=1), AfterValidator(_regex)] | None = None
    transport: _Transports = None
    sent: bool | None = None
    state: Annotated[Literal["REJECT"], BeforeValidator(_upper)] | None = None
    workflow_status: _WorkflowStatuses = None
    stage: _Stages = None


class _RuleIn(_Model):
    name: Annotated[str, StringConstraints(min_length=1, max_length=_MAX_NAME), AfterValidator(_not_blank)]
    match: _MatchIn | None
    action: Annotated[str, _one_of(tuple(a.value for a in RULE_ACTIONS))]
    hint: str | None = None
    backoff: dict[str, Any] | None = None  # merged over the policy's backoff, then checked
    throttle: bool = False
    counts: bool = False


class _PolicyIn(_Model):
    rules: list[_RuleIn] | None = None
    backoff: dict[str, Any] | None = None
    replace_defaults: bool = False


_KEYS = {
    None: tuple(_PolicyIn.model_fields),
    "rules": tuple(_RuleIn.model_fields),
    "match": tuple(_MatchIn.model_fields),
}
_LIST_KEYS = frozenset({"http_status", "error_code", "transport", "workflow_status", "stage"})
_BOOL = "must be true or false"
_MESSAGES = {
    "rules": "must be a list of rules",
    "backoff": "must be a mapping",
    "replace_defaults": _BOOL,
    "throttle": _BOOL,
    "counts": _BOOL,
    "sent": _BOOL,
    "name": f"must be a non-empty string of at most {_MAX_NAME} characters",
    "action": f"must be one of {_ACTIONS}",
    "hint": "must be a string",
    "match": "must be a mapping",
    "http_status": 'must be an HTTP status (100-599) or a pattern like "5xx" or "40x"',
    "error_code": 'must be a non-empty error code or glob, e.g. "DBS.200019" or "DBS.2000*"',
    "message": "must be a non-empty regular expression",
    "state": "must be REJECT (ACCEPT items never reach the rules)",
}
_UNKNOWN = {
    "transport": ("transport kind", tuple(k.value for k in TransportKind)),
    "stage": ("stage", tuple(s.value for s in Stage)),
    "workflow_status": ("workflow status", WORKFLOW_STATUSES),
}


def _spell(raw: object, loc: tuple[int | str, ...]) -> tuple[str, str | None, str | None, bool]:
    """(dotted path as the operator wrote it, the key named last, its parent key, whether the path ends
    at a key rather than inside it). A single value that the loader checked as a list of one has no
    index in the path."""
    path = ""
    node = raw
    last: str | None = None
    parent: str | None = None
    at_key = False
    for step in loc:
        if isinstance(step, int):
            if isinstance(node, list | tuple) and 0 <= step < len(node):
                path += f"[{step}]"
                node = node[step]
            at_key = False
            continue
        path = f"{path}.{step}" if path else step
        parent, last, at_key = last, step, True
        node = node.get(step) if isinstance(node, Mapping) else None
    return path, last, parent, at_key


def _error(raw: object, e: ErrorDetails) -> PolicyError:
    """The PolicyError (field path and message in our words) for one pydantic error."""
    path, last, parent, at_key = _spell(raw, tuple(e["loc"]))
    kind = e["type"]
    if kind == "extra_forbidden":
        owner = parent if parent in _KEYS else None
        return PolicyError(path, f"unknown key; expected one of {', '.join(_KEYS[owner])}")
    if kind == "missing":
        return PolicyError(path, "is required")
    if kind in ("mapping", "keys"):
        return PolicyError(path, e["msg"])
    if kind == "too_short" and at_key and last in _LIST_KEYS:
        return PolicyError(path, "must not be an empty list")
    if kind == "value_error" and last == "message":
        return PolicyError(path, str(e["ctx"]["error"]))
    if last in _UNKNOWN:
        what, choices = _UNKNOWN[last]
        return PolicyError(path, f"unknown {what} {e['input']!r}; expected one of {', '.join(choices)}")
    return PolicyError(path, _MESSAGES.get(last or "", e["msg"]))


def _first_error(raw: object, exc: ValidationError) -> PolicyError:
    """The error to report: the first, unless an unknown key sits beside it (a misspelt key explains a
    "required" better than the other way round)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    for e in errors:
        if e["type"] == "extra_forbidden" and tuple(e["loc"][:-1]) == tuple(first["loc"][:-1]):
            first = e
            break
    return _error(raw, first)


# ------------------------------------------------------------------------------------- parsing


def parse_policy(raw: Mapping[str, object] | None) -> Policy:
    """The ``Policy`` of a policy mapping (plain values as YAML or JSON give them): the operator's rules
    first, then the built-in defaults (unless ``replace_defaults: true``); None -> the defaults.

    Raises ``PolicyError`` for the first problem found (its ``field`` is a dotted path inside ``raw``).
    """
    if raw is None:
        return Policy.default()
    try:
        spec = _PolicyIn.model_validate(raw)
    except ValidationError as exc:
        raise _first_error(raw, exc) from None
    backoff = _backoff(spec.backoff, Backoff(), "backoff")
    replace = spec.replace_defaults
    rules: list[Rule] = []
    taken = set() if replace else {r.name for r in DEFAULT_RULES}
    for i, item in enumerate(spec.rules or ()):
        path = f"rules[{i}]"
        if item.name.startswith(_RESERVED_PREFIX) and not replace:
            raise PolicyError(
                f"{path}.name",
                f"names starting with {_RESERVED_PREFIX!r} belong to the built-in rules; choose another name "
                "(or set replace_defaults: true to supply the whole rule list)",
            )
        if item.name in taken:
            raise PolicyError(f"{path}.name", f"duplicate rule name {item.name!r}")
        taken.add(item.name)
        rules.append(_rule(item, path, backoff))
    if replace and not rules:
        raise PolicyError("rules", "replace_defaults: true needs at least one rule")
    return Policy(rules=tuple(rules) if replace else (*rules, *DEFAULT_RULES), backoff=backoff)


def _rule(item: _RuleIn, path: str, policy_backoff: Backoff) -> Rule:
    action = Action(item.action)
    backoff: Backoff | None = None
    if item.backoff is not None:
        if action is not Action.RETRY:
            raise PolicyError(f"{path}.backoff", "only applies to rules whose action is retry")
        backoff = _backoff(item.backoff, policy_backoff, f"{path}.backoff")
    m = item.match or _MatchIn()
    match = Match(
        http_status=_tuple(m.http_status),
        error_code=_tuple(m.error_code),
        message=m.message,
        transport=_tuple(m.transport),
        sent=m.sent,
        state=m.state,
        workflow_status=_tuple(m.workflow_status),
        stage=_tuple(m.stage),
    )
    return Rule(
        name=item.name,
        match=match,
        action=action,
        hint=item.hint,
        backoff=backoff,
        throttle=item.throttle,
        counts_failure=item.counts,
    )


def _tuple(values: Sequence[Any] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(values)


def _backoff(raw: Mapping[str, Any] | None, base: Backoff, path: str) -> Backoff:
    """Keys given override ``base`` (the defaults, or the policy's backoff for a rule's override)."""
    if raw is None:
        return base
    try:
        return Backoff.model_validate({**base.model_dump(), **raw})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PolicyError(f"{path}.{where}" if where else path, first["msg"]) from None


# ----------------------------------------------------------------------------------- the other way


def policy_to_dict(p: Policy) -> dict[str, object]:
    """JSON/YAML-serialisable form, every rule written out with ``replace_defaults: true``;
    ``parse_policy(policy_to_dict(p)) == p``."""
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
    if r.counts_failure:
        out["counts"] = True
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


# ------------------------------------------------------------------------------------------ files


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """The ``Policy`` of a ``--policy FILE``: a YAML mapping with ``rules``/``backoff``/
    ``replace_defaults``, optionally wrapped in a single ``policy:`` key (``policy: null`` -> defaults).

    Read strictly (not UTF-8, bad syntax, duplicate keys, YAML 1.1 values such as ``yes`` or ``0443``
    are refused). Raises ``PolicyFileErrors`` whose every item is one line ``file:line: field: message``
    (the field is the path in the file, e.g. ``policy.rules[0].match.http_status``).
    """
    path_str = os.fspath(path)
    errs = Problems(path_str, error=PolicyFileError, group=PolicyFileErrors)
    _, root = read_document(path_str, errs)
    errs.raise_if_any()
    if root is None or (isinstance(root, ScalarNode) and root.tag == NULL):
        errs.fatal(None, None, "file is empty; expected a mapping with rules, backoff or replace_defaults")
    node, prefix = root, ""
    if isinstance(root, MappingNode):
        top = pairs(root, "", errs)
        if list(top) == ["policy"]:
            node, prefix = top["policy"][1], "policy"
    lines: dict[str, int] = {}
    raw = to_python(node, "", errs, lines, prefix=prefix)
    errs.raise_if_any()
    if raw is None and prefix:
        return Policy.default()
    try:
        return parse_policy(raw)  # type: ignore[arg-type]
    except PolicyError as exc:
        field = ".".join(p for p in (prefix, exc.field) if p) or None
        errs.fatal(_line_for(exc.field, lines), field, exc.message)


def inventory_policy(inv: Inventory) -> Policy:
    """The ``Policy`` of an inventory's ``policy:`` block (the defaults when it has none).

    Raises ``InventoryErrors`` with one ``file:line: policy.<path>: message`` line for an invalid block.
    """
    try:
        return parse_policy(inv.policy)
    except PolicyError as exc:
        line = _line_for(exc.field, inv.policy_lines) or inv.policy_line
        field = f"policy.{exc.field}" if exc.field else "policy"
        raise InventoryErrors([InventoryError(inv.path, line, field, exc.message)]) from None


_LAST_STEP = re.compile(r"(?:\.[^.\[]*|\[[0-9]+\])$")


def _line_for(field: str, lines: Mapping[str, int]) -> int | None:
    """The line of ``field`` (a PolicyError path), or of the nearest enclosing value that has one."""
    while True:
        if field in lines:
            return lines[field]
        if not field:
            return None
        shorter = _LAST_STEP.sub("", field)
        field = "" if shorter == field else shorter
