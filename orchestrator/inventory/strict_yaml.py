"""YAML read strictly, with line numbers, one piece at a time.

PyYAML reads YAML 1.1, which silently changes what an operator wrote: of two equal keys it keeps the last,
``no`` becomes False, ``0443`` the number 291, ``2.10`` the float 2.1. This module reads the event stream
(libyaml's parser when available) and builds ``yaml`` nodes only for the part being looked at, so a
100,000-entry list is never held as one node tree; the nodes keep the line of every value and its raw
text, which is what it takes to refuse those traps with a ``file:line: field: message`` error.

Used by the inventory (``yaml_source``) and by ``policy.loader.load_policy_file``.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

import yaml
from yaml.composer import Composer
from yaml.events import (
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.inventory.errors import Problems, close, echo
from orchestrator.inventory.files import HashingReader, check_file

try:  # libyaml's parser is about ten times faster than the pure-Python one
    from yaml import CSafeLoader as _Base
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Base  # type: ignore[assignment]

__all__ = [
    "BOOL",
    "FLOAT",
    "INT",
    "MERGE",
    "NULL",
    "STR",
    "TAG_RULES",
    "Path",
    "StreamLoader",
    "check_duplicate_keys",
    "event_tag",
    "key_label",
    "kind_of",
    "line_of",
    "node_text",
    "pairs",
    "plain_tag",
    "read_document",
    "refusal",
    "spell",
    "string_value",
    "syntax_error",
    "to_python",
    "unknown_key",
]

_TAG = "tag:yaml.org,2002:"
STR, NULL, BOOL, INT, FLOAT, MERGE, MAP = (
    _TAG + t for t in ("str", "null", "bool", "int", "float", "merge", "map")
)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_TRUE = frozenset({"yes", "Yes", "YES", "y", "Y", "true", "True", "TRUE", "on", "On", "ON"})
# YAML 1.2's core schema: what a reader of the YAML spec expects a plain value to be.
_BOOL_12 = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT_12 = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_FLOAT_12 = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?")
_RESOLVERS: dict[Any, list[tuple[str, re.Pattern[str]]]] = yaml.SafeLoader.yaml_implicit_resolvers
_WILDCARD = tuple(_RESOLVERS.get(None, ()))
# PyYAML's implicit resolvers by the scalar's first character (then the wildcard ones), in its order.
TAG_RULES: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    first: (*rules, *_WILDCARD) for first, rules in _RESOLVERS.items() if first is not None
}


def plain_tag(value: str) -> str:
    """The tag PyYAML's SafeLoader gives an untagged plain (unquoted) scalar: the same implicit
    resolvers, without the cost of a call through the resolver for each of a million scalars."""
    for tag, regexp in TAG_RULES.get(value[:1], _WILDCARD):
        if regexp.match(value):
            return tag
    return STR


def event_tag(ev: Any) -> str:
    """The resolved tag of a ScalarEvent (explicit tag, else implicit resolution as in the Composer)."""
    tag: str | None = ev.tag
    if tag is None or tag == "!":
        return plain_tag(ev.value) if ev.implicit[0] else STR
    return tag


class _Anchors(dict[str, Node]):
    """The composer's anchor table, also remembering which node objects are anchored (they stay alive for
    the whole document, so their ``id`` can mark them as already checked)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __setitem__(self, key: str, value: Node) -> None:
        super().__setitem__(key, value)
        self.ids.add(id(value))


class StreamLoader(_Base, Composer):
    """A libyaml event stream plus PyYAML's own composer, to build a node for one piece of the document at
    a time (``compose``) or pass over a piece without building it (``skip``). Anchors work across the
    whole document, as in ``yaml.compose``. Raises ``yaml.YAMLError`` subclasses on bad syntax."""

    anchors: _Anchors

    def __init__(self, stream: HashingReader | str) -> None:
        _Base.__init__(self, stream)
        self.anchors = _Anchors()
        self.checked: set[int] = set()  # anchored nodes already walked for duplicate keys

    def compose(self) -> Node:
        """The next node (its events consumed)."""
        node = self.compose_node(None, None)  # type: ignore[arg-type]
        assert node is not None  # compose_node always returns a node; the stub says Optional
        return node

    def skip(self) -> None:
        """Consume the next node's events without building it; an anchored piece is still composed, so a
        later alias to it works."""
        depth = 0
        while True:
            ev: Any = self.peek_event()
            if ev.__class__ in (MappingStartEvent, SequenceStartEvent, ScalarEvent) and ev.anchor is not None:
                self.compose()
            else:
                self.get_event()
                if ev.__class__ in (MappingStartEvent, SequenceStartEvent):
                    depth += 1
                elif ev.__class__ in (MappingEndEvent, SequenceEndEvent):
                    depth -= 1
            if depth == 0:
                return

    def end_document(self) -> int | None:
        """Consume the end of the document; the 1-based line of a second document if one follows."""
        self.get_event()  # DocumentEndEvent
        if self.check_event(DocumentStartEvent):
            ev: Any = self.get_event()
            return int(ev.start_mark.line) + 1
        self.get_event()  # StreamEndEvent
        return None


# ------------------------------------------------------------------------------------------ nodes


def line_of(node: Node | Any) -> int:
    """1-based line where a node (or an event) starts."""
    return int(node.start_mark.line) + 1


def kind_of(node: Node) -> str:
    """``a mapping``, ``a list``, ``an empty value`` or ``the scalar '...'``: for "must be X, not Y"."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "an empty value"
    return f"the scalar {echo(node.value)}"


def key_label(name: str) -> str:
    """A key as it can appear in the field part of an error: echoed when it is odd, so the line stays one."""
    return name if _PLAIN_KEY.fullmatch(name) else echo(name)


# A path is a cheap linked tuple (parent, key-or-index), spelled out only when there is an error.
Path = tuple["Path", str | int] | None


def spell(path: Path) -> str:
    """``proxies[3].proxy_id`` for the linked path (((None, "proxies"), 3), "proxy_id")."""
    parts: list[str] = []
    while path is not None:
        path, step = path
        parts.append(f"[{step}]" if isinstance(step, int) else f".{key_label(step)}")
    return "".join(reversed(parts)).lstrip(".")


def check_duplicate_keys(root: Node, path: Path, errs: Problems, loader: StreamLoader | None = None) -> None:
    """Report every key that appears twice in one mapping under ``root`` (PyYAML would keep the last one
    without a word). With the ``loader`` that composed ``root``, an anchored piece is walked only once
    however many aliases bring it back."""
    checked = loader.checked if loader is not None else None
    anchored = loader.anchors.ids if loader is not None else set()
    constructor = yaml.constructor.SafeConstructor()
    visited: set[int] = set()
    stack: list[tuple[Node, Path]] = [(root, path)]
    while stack:
        node, where = stack.pop()
        if id(node) in visited or (checked is not None and id(node) in checked):
            continue
        visited.add(id(node))
        if checked is not None and id(node) in anchored:
            checked.add(id(node))
        if isinstance(node, MappingNode):
            seen: dict[object, Node] = {}
            for key, value in node.value:
                if not isinstance(key, ScalarNode):
                    stack.extend([(key, where), (value, where)])
                    continue
                stack.append((value, (where, str(key.value))))
                if key.tag == MERGE:
                    continue
                ident: object = key.value
                if key.tag != STR:
                    try:
                        ident = (key.tag, constructor.construct_object(key))
                    except (yaml.YAMLError, TypeError, ValueError):
                        ident = (key.tag, key.value)
                if ident in seen:
                    msg = f"duplicate key (first on line {line_of(seen[ident])}); YAML would keep only one"
                    errs.add(line_of(key), spell((where, str(key.value))), msg)
                else:
                    seen[ident] = key
        elif isinstance(node, SequenceNode):
            stack.extend((item, (where, i)) for i, item in enumerate(node.value))


_Pairs = dict[str, tuple[ScalarNode, Node]]


def pairs(node: MappingNode, where: str, errs: Problems, active: frozenset[int] = frozenset()) -> _Pairs:
    """Key -> (key node, value node), with ``<<`` merge keys applied the way PyYAML applies them (keys
    written in the mapping win; among merged mappings the first listed wins)."""
    if id(node) in active:
        errs.add(line_of(node), where or None, "recursive merge (<<) of an anchor into itself")
        return {}
    active = active | {id(node)}
    merged: _Pairs = {}
    explicit: _Pairs = {}
    for key, value in node.value:
        if isinstance(key, ScalarNode) and key.tag == MERGE:
            sources: list[Node] = [value]
            if isinstance(value, SequenceNode):
                sources = list(reversed(value.value))
            for src in sources:
                if not isinstance(src, MappingNode):
                    msg = f"a merge (<<) needs a mapping or a list of mappings, not {kind_of(src)}"
                    errs.add(line_of(src), where or None, msg)
                    continue
                merged.update(pairs(src, where, errs, active))
            continue
        if not isinstance(key, ScalarNode):
            errs.add(line_of(key), where or None, f"keys must be plain words, not {kind_of(key)}")
            continue
        explicit[key.value] = (key, value)
    merged.update(explicit)
    return merged


def unknown_key(name: str, line: int, where: str, allowed: tuple[str, ...], errs: Problems) -> str | None:
    """Report an unknown key (with a "did you mean"); returns the field it was probably meant to be."""
    label = key_label(name)
    meant = close(name, allowed)
    hint = f"; did you mean {meant!r}?" if meant else ""
    errs.add(line, f"{where}.{label}" if where else label, f"unknown key{hint}")
    return meant


# ---------------------------------------------------------------------------------------- scalars


def string_value(tag: str, text: str, name: str, *, id_field: bool = False) -> tuple[str | None, str | None]:
    """(text or None for null/empty, None) for a scalar meant as a string, or (None, why not) for what YAML
    1.1 would turn into something else. ``id_field``: an integer-looking ID is taken as written (an
    all-digit ID is still an ID; its pattern decides)."""
    if tag == STR:
        return (text or None), None
    if tag == NULL:
        return None, None
    if tag == INT and id_field:
        return text, None
    return None, refusal(tag, text, name)


def refusal(tag: str, text: str, name: str) -> str:
    """Why a scalar with ``tag`` is not taken as the string ``text`` (the field is ``name``)."""
    if tag == BOOL:
        return f"unquoted {text!r} is read by YAML 1.1 as boolean {text in _TRUE}; quote it: {name}: '{text}'"
    if tag in (INT, FLOAT) and name.endswith("_version"):
        return (
            f"unquoted {text!r} is read by YAML as a number (2.10 would be 2.1); quote it: {name}: '{text}'"
        )
    if tag in (INT, FLOAT):
        return f"unquoted {echo(text)} is read by YAML as a number; quote it"
    return f"must be a plain string, not a value tagged {tag!r}; quote it"


def node_text(
    node: Node, name: str, where: str, errs: Problems, *, id_field: bool = False
) -> tuple[str | None, bool]:
    """(text or None, refused) of a node meant to hold one string; a refusal (a list, a mapping, a YAML 1.1
    trap) is reported into ``errs``."""
    if not isinstance(node, ScalarNode):
        errs.add(line_of(node), where, f"must be a single value, not {kind_of(node)}")
        return None, True
    value, problem = string_value(str(node.tag), str(node.value), name, id_field=id_field)
    if problem is not None:
        errs.add(line_of(node), where, problem)
        return None, True
    return value, False


class _Refused:
    """Marks a value ``to_python`` refused (and reported)."""


REFUSED = _Refused()


def to_python(node: Node, path: str, errs: Problems, lines: dict[str, int], prefix: str = "") -> object:
    """Plain Python values (dict, list, str, int, float, bool, None) of a node, read the way a YAML 1.2
    reader expects: ``true``/``false`` only as booleans (``yes``/``no``/``on``/``off`` are refused),
    decimal integers without a leading zero, plain decimal floats; hex, octal, sexagesimal, ``.inf``,
    timestamps, ``!!binary`` and custom tags are refused with "quote it". ``lines`` receives the line of
    every value by its path inside the node (``rules[0].match.error_code``); errors are reported with
    ``prefix`` + path as the field. An aliased piece is converted once and shared, as PyYAML does."""
    memo: dict[int, object] = {}
    return _convert(node, path, errs, lines, prefix, memo, frozenset())


def _convert(
    node: Node,
    path: str,
    errs: Problems,
    lines: dict[str, int],
    prefix: str,
    memo: dict[int, object],
    active: frozenset[int],
) -> object:
    lines.setdefault(path, line_of(node))
    where = f"{prefix}.{path}" if prefix and path else (prefix or path or None)
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        errs.add(line_of(node), where, "an alias refers to the piece that contains it (a recursive value)")
        return REFUSED
    active = active | {id(node)}
    if isinstance(node, MappingNode):
        out: dict[str, object] = {}
        for name, (key, value) in pairs(node, where or "", errs).items():
            if key.tag != STR:
                errs.add(line_of(key), where, f"keys must be plain words, not {kind_of(key)}")
                continue
            child = f"{path}.{key_label(name)}" if path else key_label(name)
            lines.setdefault(child, line_of(key))
            out[name] = _convert(value, child, errs, lines, prefix, memo, active)
        result: object = out
    elif isinstance(node, SequenceNode):
        result = [
            _convert(item, f"{path}[{i}]", errs, lines, prefix, memo, active)
            for i, item in enumerate(node.value)
        ]
    else:
        result = _scalar_value(node, where, errs)
    memo[id(node)] = result
    return result


def _scalar_value(node: Node, where: str | None, errs: Problems) -> object:
    tag, text = str(node.tag), str(node.value)
    if tag == STR:
        return text
    if tag == NULL:
        return None
    if tag == BOOL and text in _BOOL_12:
        return _BOOL_12[text]
    if tag == INT and _INT_12.fullmatch(text):
        return int(text)
    if tag == FLOAT and _FLOAT_12.fullmatch(text):
        return float(text)
    if tag == BOOL:
        msg = (
            f"unquoted {text!r} is read by YAML 1.1 as boolean {text in _TRUE}; write true/false or quote it"
        )
    elif tag in (INT, FLOAT):
        msg = f"unquoted {echo(text)} is a YAML 1.1 number in an odd form; write a plain decimal or quote it"
    else:
        msg = f"must be a plain value, not one tagged {tag!r}; quote it"
    errs.add(line_of(node), where, msg)
    return REFUSED


# ------------------------------------------------------------------------------------------ files


def syntax_error(exc: yaml.YAMLError, path: str) -> tuple[int | None, str]:
    """(1-based line or None, message) for a YAML error raised while reading the file at ``path``."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
        return (int(mark.line) + 1 if mark else None), f"not valid YAML: {problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        with open(path, "rb") as fh:
            head = fh.read(max(exc.position, 0))
        return head.count(b"\n") + 1, f"not valid YAML: {exc.reason} (character {exc.character!r})"
    return None, f"not valid YAML: {exc}"


def fail_syntax(exc: yaml.YAMLError, path: str, errs: Problems) -> NoReturn:
    """Raise the YAML error alone: after bad syntax, what was read so far may mean something else."""
    line, message = syntax_error(exc, path)
    errs.only(line, None, message)


def read_document(path: str, errs: Problems) -> tuple[str, Node | None]:
    """(hex SHA-256, root node or None for an empty file) of a small YAML file, strictly: not UTF-8, bad
    syntax or a second document are fatal; duplicate keys anywhere are reported into ``errs``."""
    digest = check_file(path, errs)
    try:
        with open(path, "rb") as fh:
            loader = StreamLoader(HashingReader(fh))
            loader.get_event()  # StreamStartEvent
            if loader.check_event(StreamEndEvent):
                return digest, None
            loader.get_event()  # DocumentStartEvent
            root = loader.compose()
            second = loader.end_document()
    except yaml.YAMLError as exc:
        fail_syntax(exc, path, errs)
    except OSError as exc:
        errs.fatal(None, None, f"cannot read the file: {exc.strerror or exc}")
    if second is not None:
        errs.only(
            second,
            None,
            "not valid YAML: expected a single document in the stream but found another document",
        )
    check_duplicate_keys(root, None, errs)
    return digest, root
