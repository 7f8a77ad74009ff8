"""YAML inventories: the top-level layout (``defaults``, ``proxies``, ``policy``, ``window``, ``notify``),
read as a stream so that memory does not grow with the number of proxies.

Each entry of ``proxies`` is read straight from the parser's events when it is a plain mapping of scalars
(the usual case, and the fast one); an entry with anchors, aliases, merge keys or nested values is built
as a node and read the general way. Only anchored pieces, the duplicate-detection digests and the summary
counts outlive their entry.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.events import (
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.cloud.endpoints import is_loopback_host
from orchestrator.inventory.errors import Problems, echo
from orchestrator.inventory.fields import COMMON_FIELDS, ENTRY_ONLY_FIELDS, EntryBuilder, Val, data_of
from orchestrator.inventory.files import HashingReader
from orchestrator.inventory.model import ENTRY_FIELDS, ProxyEntry
from orchestrator.inventory.strict_yaml import (
    MAP,
    MERGE,
    NULL,
    STR,
    TAG_RULES,
    StreamLoader,
    check_duplicate_keys,
    event_tag,
    fail_syntax,
    key_label,
    kind_of,
    line_of,
    node_text,
    pairs,
    plain_tag,
    string_value,
    to_python,
    unknown_key,
)

__all__ = ["TOP_KEYS", "YamlHeader", "scan_yaml"]

TOP_KEYS = ("defaults", "proxies", "policy", "window", "notify")
_ID_FIELDS = frozenset({"project_id", "instance_id", "proxy_id"})
_ENTRY_SET = frozenset(ENTRY_FIELDS)
_MAP_TAGS = (None, "!", MAP)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_WINDOW_MAX = 200
_NOTIFY_MAX = 2048


@dataclass
class YamlHeader:
    """What a YAML inventory says besides its entries."""

    defaults: dict[str, Val] = field(default_factory=dict)
    defaults_after_proxies: bool = False  # read again with these defaults: the entries came first
    items: int = 0  # entries listed, valid or not
    policy: dict[str, object] | None = None
    policy_line: int | None = None
    policy_lines: dict[str, int] = field(default_factory=dict)
    window: str | None = None
    window_line: int | None = None
    notify: str | None = None
    notify_line: int | None = None


def scan_yaml(
    path: str,
    errs: Problems,
    builder: EntryBuilder,
    *,
    preset_defaults: dict[str, Val] | None = None,
    entries_only: bool = False,
) -> Generator[ProxyEntry, None, tuple[YamlHeader, str]]:
    """Yield the valid entries of the YAML inventory at ``path`` in file order; return (header, hex SHA-256
    of the bytes read).

    Problems go to ``errs`` (bad syntax raises at once, alone); the caller raises the rest when the
    generator is done. ``preset_defaults`` replaces the file's ``defaults`` for the entries (a second read
    when the file lists its defaults after its entries, or a re-read of a validated file);
    ``entries_only`` passes over everything but the entries (a re-read).
    """
    header = YamlHeader()
    try:
        with open(path, "rb") as fh:
            reader = HashingReader(fh)
            loader = StreamLoader(reader)
            yield from _document(loader, errs, builder, header, preset_defaults, entries_only)
            digest = reader.hexdigest()
    except yaml.YAMLError as exc:
        fail_syntax(exc, path, errs)
    except OSError as exc:
        errs.fatal(None, None, f"cannot read the file: {exc.strerror or exc}")
    return header, digest


def _document(
    loader: StreamLoader,
    errs: Problems,
    builder: EntryBuilder,
    header: YamlHeader,
    preset: dict[str, Val] | None,
    entries_only: bool,
) -> Generator[ProxyEntry, None, None]:
    loader.get_event()  # StreamStartEvent
    if loader.check_event(StreamEndEvent):
        errs.fatal(None, None, "file is empty; expected a mapping with a 'proxies' list")
    loader.get_event()  # DocumentStartEvent
    start: Any = loader.peek_event()
    if start.__class__ is not MappingStartEvent:
        root = loader.compose()
        errs.fatal(
            line_of(root), None, f"top level must be a mapping with a 'proxies' list, not {kind_of(root)}"
        )
    loader.get_event()
    seen: dict[str, int] = {}
    while not loader.check_event(MappingEndEvent):
        key_ev: Any = loader.peek_event()
        if key_ev.__class__ is not ScalarEvent:
            key = loader.compose()
            errs.add(line_of(key), None, f"keys must be plain words, not {kind_of(key)}")
            loader.skip()
            continue
        key_node = loader.compose()
        name, line = str(key_node.value), line_of(key_node)
        if key_node.tag == MERGE:
            errs.add(line, None, "merge keys (<<) are not supported at the top level; write the keys out")
            loader.skip()
            continue
        if name in seen:
            msg = f"duplicate key (first on line {seen[name]}); YAML would keep only one"
            errs.add(line, key_label(name), msg)
            loader.skip()
            continue
        seen[name] = line
        if name == "proxies":
            defaults = preset if preset is not None else header.defaults
            yield from _proxies(loader, errs, builder, defaults, header, line)
        elif entries_only:
            loader.skip()
        elif name == "defaults":
            header.defaults = _defaults(loader, errs)
            header.defaults_after_proxies = "proxies" in seen and bool(header.defaults)
        elif name == "policy":
            _policy(loader, errs, header, line)
        elif name == "window":
            header.window, header.window_line = _window(loader.compose(), errs), line
        elif name == "notify":
            header.notify, header.notify_line = _notify(loader.compose(), errs), line
        else:
            unknown_key(name, line, "", TOP_KEYS, errs)
            loader.skip()
    loader.get_event()  # MappingEndEvent
    second = loader.end_document()
    if second is not None:
        errs.only(
            second,
            None,
            "not valid YAML: expected a single document in the stream but found another document",
        )
    if "proxies" not in seen:
        errs.add(line_of(start), "proxies", "required: a list of proxies to upgrade")


def _proxies(
    loader: StreamLoader,
    errs: Problems,
    builder: EntryBuilder,
    defaults: dict[str, Val],
    header: YamlHeader,
    line: int,
) -> Generator[ProxyEntry, None, None]:
    ev: Any = loader.peek_event()
    if ev.__class__ is SequenceStartEvent and ev.anchor is None:
        loader.get_event()
        index = yield from _items(loader, errs, builder, defaults)
    else:  # an anchored or aliased list, or not a list at all
        node = loader.compose()
        if not isinstance(node, SequenceNode):
            errs.add(line_of(node), "proxies", f"must be a non-empty list of proxies, not {kind_of(node)}")
            return
        for index, item in enumerate(node.value):
            entry = _node_entry(loader, errs, builder, defaults, index, item)
            if entry is not None:
                yield entry
        index = len(node.value)
    header.items = index
    if index == 0:
        errs.add(line_of(ev), "proxies", "must be a non-empty list of proxies, not an empty list")


def _items(
    loader: StreamLoader, errs: Problems, builder: EntryBuilder, defaults: dict[str, Val]
) -> Generator[ProxyEntry, None, int]:
    """The entries of a list whose start was just read; returns how many items it had.

    The hot loop of a large inventory. An entry that is a plain mapping of scalars is read straight from
    the parser's events into the values pydantic checks (tags resolved inline, key tags cached, no
    per-field objects); only when it has a problem are its fields' lines worked out. Anything else (an
    anchor, alias, merge key, tag or nested value) is built as a node and read the general way."""
    get, peek, build = loader.get_event, loader.peek_event, builder.build
    base, base_bad = data_of(defaults)
    key_tags, rules = _KEY_TAGS, TAG_RULES
    index = 0
    while True:
        ev: Any = peek()
        if ev.__class__ is SequenceEndEvent:
            get()
            return index
        if ev.__class__ is not MappingStartEvent or ev.anchor is not None or ev.tag not in _MAP_TAGS:
            entry = _node_entry(loader, errs, builder, defaults, index, loader.compose())
        else:
            get()
            collected: list[tuple[Any, Any]] = []
            node: MappingNode | None = None
            data = dict(base)
            names: list[str] = []
            plain = True  # every key known and given once, every value a plain string
            while True:
                key: Any = peek()
                if key.__class__ is MappingEndEvent:
                    get()
                    break
                key_tag = key_tags.get(key.value) if key.tag is None and key.implicit[0] else None
                if (
                    key.__class__ is not ScalarEvent
                    or key.anchor is not None
                    or (key_tag or _key_tag(key)) != STR
                ):
                    node = _as_node(loader, ev, collected, None)
                    break
                get()
                value: Any = peek()
                if value.__class__ is not ScalarEvent or value.anchor is not None:
                    node = _as_node(loader, ev, collected, key)
                    break
                get()
                collected.append((key, value))
                if not plain:
                    continue
                name: str = key.value
                text: str = value.value
                if name not in _ENTRY_SET or name in names:
                    plain = False
                elif value.tag is not None and value.tag != "!":
                    plain = value.tag == STR
                elif value.implicit[0]:
                    for _, regexp in rules.get(text[:1], ()):
                        if regexp.match(text):
                            plain = False
                            break
                names.append(name)
                if text:
                    data[name] = text
                else:
                    data.pop(name, None)
            if node is not None:
                entry = _node_entry(loader, errs, builder, defaults, index, node)
            elif plain:
                origins = partial(_event_fields, collected, index, defaults, errs)
                entry = build(data, line_of(ev), index, origins, bad=base_bad)
            else:
                vals = _event_fields(collected, index, defaults, errs)
                data, bad = data_of(vals)
                entry = build(data, line_of(ev), index, partial(dict, vals), bad=bad)
        if entry is not None:
            yield entry
        index += 1


_KEY_TAGS: dict[str, str] = {}


def _key_tag(ev: Any) -> str:
    """The resolved tag of a key event; the few distinct key spellings of a file are resolved once."""
    if ev.tag is not None:
        return event_tag(ev)
    if not ev.implicit[0]:
        return STR
    text: str = ev.value
    tag = _KEY_TAGS.get(text)
    if tag is None:
        tag = plain_tag(text)
        if len(_KEY_TAGS) < 1024:
            _KEY_TAGS[text] = tag
    return tag


def _event_fields(
    collected: list[tuple[Any, Any]], index: int, defaults: dict[str, Val], errs: Problems
) -> dict[str, Val]:
    """The defaults overlaid with the (key, value) scalar events of entry ``index``; problems (duplicate
    or unknown keys, YAML 1.1 traps) are reported."""
    where = f"proxies[{index}]"
    vals = dict(defaults)
    key_lines: dict[str, int] = {}
    for key, value in collected:
        name: str = key.value
        key_line = int(key.start_mark.line) + 1
        if name in key_lines:
            msg = f"duplicate key (first on line {key_lines[name]}); YAML would keep only one"
            errs.add(key_line, f"{where}.{key_label(name)}", msg)
        else:
            key_lines[name] = key_line
        if name not in _ENTRY_SET:
            meant = unknown_key(name, key_line, where, ENTRY_FIELDS, errs)
            if meant and meant not in key_lines:  # the user meant this field: do not also call it missing
                vals[meant] = Val(None, key_line, f"{where}.{meant}", True)
            continue
        text: str = value.value
        tag: str | None = value.tag
        if tag is None or tag == "!":
            tag = STR
            if value.implicit[0]:
                for rule_tag, regexp in TAG_RULES.get(text[:1], ()):
                    if regexp.match(text):
                        tag = rule_tag
                        break
        value_line = int(value.start_mark.line) + 1
        if tag == STR:
            vals[name] = Val(text or None, value_line, f"{where}.{name}")
            continue
        result, problem = string_value(tag, text, name, id_field=name in _ID_FIELDS)
        if problem is not None:
            errs.add(value_line, f"{where}.{name}", problem)
        vals[name] = Val(result, value_line, f"{where}.{name}", problem is not None)
    return vals


def _node_entry(
    loader: StreamLoader,
    errs: Problems,
    builder: EntryBuilder,
    defaults: dict[str, Val],
    index: int,
    item: Node,
) -> ProxyEntry | None:
    """An entry built as a node (anchors, aliases, merge keys, or not a mapping at all)."""
    where = f"proxies[{index}]"
    if not isinstance(item, MappingNode):
        errs.add(line_of(item), where, f"must be a mapping of proxy fields, not {kind_of(item)}")
        return None
    check_duplicate_keys(item, ((None, "proxies"), index), errs, loader)
    vals = dict(defaults)
    vals.update(_node_fields(item, where, ENTRY_FIELDS, errs, in_defaults=False))
    data, bad = data_of(vals)
    return builder.build(data, line_of(item), index, partial(dict, vals), bad=bad)


def _as_node(loader: StreamLoader, start: Any, collected: list[tuple[Any, Any]], key: Any) -> MappingNode:
    """Finish reading a mapping whose first pairs were taken from events as a node."""
    node = MappingNode(MAP, [], start.start_mark, None, flow_style=start.flow_style)
    for k, v in collected:
        node.value.append((_scalar_node(k), _scalar_node(v)))
    if key is not None:
        node.value.append((_scalar_node(key), loader.compose()))
    while not loader.check_event(MappingEndEvent):
        k_node = loader.compose()
        node.value.append((k_node, loader.compose()))
    end: Any = loader.get_event()
    node.end_mark = end.end_mark
    return node


def _scalar_node(ev: Any) -> ScalarNode:
    return ScalarNode(event_tag(ev), ev.value, ev.start_mark, ev.end_mark, style=ev.style)


def _node_fields(
    node: MappingNode, where: str, allowed: tuple[str, ...], errs: Problems, *, in_defaults: bool
) -> dict[str, Val]:
    """The fields of a mapping built as a node (merge keys applied)."""
    out: dict[str, Val] = {}
    for name, (key, value) in pairs(node, where, errs).items():
        if name not in allowed:
            meant: str | None
            if in_defaults and name in ENTRY_ONLY_FIELDS:
                errs.add(line_of(key), f"{where}.{name}", "is set per proxy, not in defaults")
                meant = name
            else:
                meant = unknown_key(name, line_of(key), where, allowed, errs)
            if meant:  # the user meant this field: do not also call it missing in every entry
                out.setdefault(meant, Val(None, line_of(key), f"{where}.{meant}", True))
            continue
        field_where = f"{where}.{name}"
        text, refused = node_text(value, name, field_where, errs, id_field=name in _ID_FIELDS)
        out[name] = Val(text, line_of(value), field_where, refused)
    return out


def _defaults(loader: StreamLoader, errs: Problems) -> dict[str, Val]:
    node = loader.compose()
    if isinstance(node, MappingNode):
        check_duplicate_keys(node, (None, "defaults"), errs, loader)
        return _node_fields(node, "defaults", COMMON_FIELDS, errs, in_defaults=True)
    if not (isinstance(node, ScalarNode) and node.tag == NULL):
        errs.add(line_of(node), "defaults", f"must be a mapping, not {kind_of(node)}")
    return {}


def _policy(loader: StreamLoader, errs: Problems, header: YamlHeader, key_line: int) -> None:
    """The ``policy:`` mapping as plain values (read strictly; its rules are the policy loader's)."""
    node = loader.compose()
    if isinstance(node, ScalarNode) and node.tag == NULL:
        return
    if not isinstance(node, MappingNode):
        errs.add(line_of(node), "policy", f"must be a mapping, not {kind_of(node)}")
        return
    check_duplicate_keys(node, (None, "policy"), errs, loader)
    lines: dict[str, int] = {}
    value = to_python(node, "", errs, lines, prefix="policy")
    if isinstance(value, dict):
        header.policy, header.policy_line, header.policy_lines = value, key_line, lines


def _window(node: Node, errs: Problems) -> str | None:
    """The maintenance window as written; its syntax belongs to the schedule module."""
    text, refused = node_text(node, "window", "window", errs)
    if refused:
        return None
    if text is None:
        errs.add(line_of(node), "window", "must not be empty; leave the key out for no window")
        return None
    if len(text) > _WINDOW_MAX or _CONTROL.search(text):
        errs.add(
            line_of(node),
            "window",
            f"must be one line of at most {_WINDOW_MAX} characters (got {echo(text)})",
        )
        return None
    return text


def _notify(node: Node, errs: Problems) -> str | None:
    """The notification URL: https (http only to a loopback host); echoed with its path hidden, since a
    webhook URL often carries a token."""
    text, refused = node_text(node, "notify", "notify", errs)
    if refused:
        return None
    if text is None:
        errs.add(line_of(node), "notify", "must not be empty; leave the key out for no notifications")
        return None
    problem = _notify_problem(text)
    if problem is not None:
        errs.add(line_of(node), "notify", problem)
        return None
    return text


def _notify_problem(url: str) -> str | None:
    shown = (
        f"(got {echo(url.split('://', 1)[0] + '://...')})" if "://" in url else "(got a value without ://)"
    )
    if len(url) > _NOTIFY_MAX or not re.fullmatch(r"[\x21-\x7e]+", url):
        return f"must be a plain-ASCII URL without spaces, at most {_NOTIFY_MAX} characters {shown}"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"is not a valid URL {shown}"
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not host:
        return f"must be an https://host/... URL {shown}"
    if scheme == "http" and not is_loopback_host(host):
        return f"plain http:// is only allowed for loopback hosts; use https:// {shown}"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user or password (user:password@)"
    return None
