"""Inventory files (YAML or CSV) -> validated proxy entries, with one-line ``file:line: field: message``
errors.

The whole file is validated before anything is returned, so a bad inventory can never leave half a fleet
queued. YAML is read through ``yaml.compose`` rather than ``safe_load`` because the node tree keeps line
numbers and the raw scalar text, which is what it takes to refuse PyYAML's YAML 1.1 traps (duplicate keys
silently dropped, ``no`` read as ``False``, ``2.10`` read as the float ``2.1``). IDs end up in URL paths,
so they are checked against strict ASCII patterns with ``re.fullmatch`` (``$`` would let a trailing
newline through). The format reference is ``docs/inventory.md``.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import ipaddress
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Literal, NamedTuple, NoReturn, cast

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from orchestrator.cloud.endpoints import REGION_HOSTS, endpoint_for_region
from orchestrator.errors import InputErrors

__all__ = [
    "ENTRY_FIELDS",
    "LANGUAGES",
    "Inventory",
    "InventoryError",
    "InventoryErrors",
    "ProxyEntry",
    "load_inventory",
    "normalize_endpoint",
    "summarize",
    "version_key",
]

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ECHO_MAX = 60

_COMMON_FIELDS = ("project_id", "region", "endpoint", "source_version", "target_version", "x_language")
_ENTRY_ONLY_FIELDS = ("instance_id", "proxy_id", "name")
ENTRY_FIELDS = ("project_id", "instance_id", "proxy_id", "region", "endpoint", "source_version",
                "target_version", "x_language", "name")  # fmt: skip
_REQUIRED_FIELDS = ("project_id", "instance_id", "proxy_id", "target_version")
_ID_FIELDS = frozenset({"project_id", "instance_id", "proxy_id"})
_VERSION_FIELDS = frozenset({"source_version", "target_version"})
_TOP_KEYS = ("defaults", "proxies", "policy")
LANGUAGES = ("en-us", "zh-cn")

_PROJECT_ID = re.compile(r"[0-9a-zA-Z]{32}")
_SUFFIXED_ID = re.compile(r"[0-9a-zA-Z]{32}(?:[a-z]{2}[0-9]{2})?")
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){1,4}")
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_HOSTNAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_URL_CHARS = re.compile(r"[A-Za-z0-9.:/\[\]-]+")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT, _MERGE = (
    _TAG + t for t in ("str", "null", "bool", "int", "float", "merge")
)


# --------------------------------------------------------------------------------------------- errors


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _echo(value: object) -> str:
    """``repr`` escapes newlines and invisible characters; the cut keeps a hostile value from flooding."""
    text = repr(value)
    return text if len(text) <= _ECHO_MAX else text[: _ECHO_MAX - 3] + "..."


class InventoryError(InputErrors):
    """One problem in an inventory; ``str()`` is a single ``path:line: field: message`` line."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        super().__init__(path, line, field, message)
        self.path = path
        self.line = line
        self.field = field
        self.message = message

    @property
    def errors(self) -> list[InventoryError]:
        """Every problem found; lets a caller print one line each without caring which class it caught."""
        return [self]

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return _one_line(": ".join(p for p in (where, self.field, self.message) if p))


class InventoryErrors(InventoryError):
    """All problems found in one file (at least one), in line order; what ``load_inventory`` raises."""

    def __init__(self, errors: list[InventoryError]) -> None:
        if not errors:
            raise ValueError("InventoryErrors needs at least one error")
        first = errors[0]
        Exception.__init__(self, list(errors))
        self.path, self.line, self.field, self.message = first.path, first.line, first.field, first.message
        self._errors = list(errors)

    @property
    def errors(self) -> list[InventoryError]:
        return list(self._errors)

    def __str__(self) -> str:
        more = len(self._errors) - 1
        first = str(self._errors[0])
        return f"{first} (and {more} more)" if more else first


class _Errors:
    """Collects problems (deduplicated, so a bad default reported through every entry shows once)."""

    def __init__(self, path: str, *, fail_fast: bool = False) -> None:
        self.path = path
        self.fail_fast = fail_fast
        self.items: list[InventoryError] = []
        self._seen: set[tuple[int | None, str | None, str]] = set()

    def add(self, line: int | None, field: str | None, message: str) -> None:
        key = (line, field, message)
        if key in self._seen:
            return
        self._seen.add(key)
        self.items.append(InventoryError(self.path, line, field, message))
        if self.fail_fast:
            self.raise_if_any()

    def fatal(self, line: int | None, field: str | None, message: str) -> NoReturn:
        self.add(line, field, message)
        self.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover

    def raise_if_any(self) -> None:
        if self.items:
            raise InventoryErrors(sorted(self.items, key=lambda e: e.line or 0))


# --------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class ProxyEntry:
    """One proxy to upgrade, with defaults applied and the endpoint already resolved."""

    project_id: str
    instance_id: str
    proxy_id: str
    region: str | None
    endpoint: str | None
    source_version: str | None
    target_version: str
    x_language: str
    name: str | None
    line: int


def version_key(v: str) -> tuple[int, ...]:
    """Numeric sort key for a dotted version; trailing zero parts are dropped so ``2.24 == 2.24.0.000``.

    Part-by-part integer comparison is what makes ``2.24.03.000 > 2.23.12.000`` and ``2.10 > 2.9``.
    """
    if not _VERSION.fullmatch(v):
        raise ValueError(f"not a dotted version like 2.23.12.000: {_echo(v)}")
    parts = [int(p) for p in v.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def normalize_endpoint(url: str) -> str:
    """``scheme://host[:port]`` with nothing that could redirect the request (path, userinfo, query).

    Plain http is refused except on loopback so a token or signature never crosses a network in clear.
    """
    if not _URL_CHARS.fullmatch(url):
        raise ValueError(
            f"must be an https://host[:port] URL in plain ASCII, no path, query or user (got {_echo(url)})"
        )
    parts = url.split("://", 1)
    scheme = parts[0].lower() if len(parts) == 2 else ""
    if scheme not in ("https", "http"):
        raise ValueError(f"must start with https:// (got {_echo(url)})")
    rest = parts[1].rstrip("/")
    if not rest or "/" in rest:
        raise ValueError(f"must be https://host[:port] with no path (got {_echo(url)})")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]")
        if not sep or (port_text and not port_text.startswith(":")):
            raise ValueError(f"has a malformed [IPv6] host (got {_echo(url)})")
        port_text = port_text[1:]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"has a malformed [IPv6] host (got {_echo(url)})") from None
        shown = f"[{host}]"
    else:
        host, _, port_text = rest.partition(":")
        if ":" in port_text and ":" not in host:
            raise ValueError(f"has more than one ':' (got {_echo(url)})")
        host = host.lower()
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise ValueError(f"has an invalid host name (got {_echo(url)})")
        shown = host
    port: int | None = None
    if port_text or rest.endswith(":"):
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"has an invalid port (got {_echo(url)})")
        port = int(port_text)
    if scheme == "http" and not _is_loopback(host):
        raise ValueError(f"plain http:// is only allowed for loopback hosts; use https:// (got {_echo(url)})")
    if port is not None and port != {"https": 443, "http": 80}[scheme]:
        shown = f"{shown}:{port}"
    return f"{scheme}://{shown}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _close(word: str, choices: tuple[str, ...] | list[str]) -> str | None:
    close = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = _close(word, choices)
    return f"; did you mean {close!r}?" if close else ""


def _got(value: str) -> str:
    """``(got '...')``, naming the first non-ASCII character: a Cyrillic 'а' looks like 'a' when echoed."""
    odd = next((c for c in value if not c.isascii()), None)
    note = f", with non-ASCII U+{ord(odd):04X}" if odd else ""
    return f"(got {_echo(value)}{note})"


def _check_id(value: str, field: str) -> str:
    if field == "project_id":
        if not _PROJECT_ID.fullmatch(value):
            raise ValueError(f"must be 32 letters/digits {_got(value)}")
        return value
    own, other, other_kind = (
        ("in", "po", "a proxy") if field == "instance_id" else ("po", "in", "an instance")
    )
    if not _SUFFIXED_ID.fullmatch(value):
        raise ValueError(f"must be 32 letters/digits plus an optional suffix like {own}01 {_got(value)}")
    if len(value) == 36 and value[32:34] == other:
        raise ValueError(
            f"ends in {value[32:]!r}, which marks {other_kind} id: are instance_id and proxy_id swapped?"
            f" (expected a suffix like {own}01, got {_echo(value)})"
        )
    return value


class _Fields(BaseModel):
    """Field-by-field rules of one entry after defaults are applied (cross-field rules live in _Context)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    project_id: str
    instance_id: str
    proxy_id: str
    target_version: str
    source_version: str | None = None
    region: str | None = None
    endpoint: str | None = None
    x_language: str = "en-us"
    name: str | None = None

    @field_validator("project_id", "instance_id", "proxy_id")
    @classmethod
    def _ids(cls, value: str, info: ValidationInfo) -> str:
        return _check_id(value, info.field_name or "")

    @field_validator("source_version", "target_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION.fullmatch(value):
            raise ValueError(f"must be 2 to 5 dot-separated numbers like 2.23.12.000 {_got(value)}")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        # The region also names the IAM host (iam.{region}.myhuaweicloud.com): keep it a plain DNS label.
        if len(value) > 63 or not _REGION.fullmatch(value):
            raise ValueError(f"must look like cn-north-4: lowercase letters, digits, hyphens {_got(value)}")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return normalize_endpoint(value)

    @field_validator("x_language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value not in LANGUAGES:
            raise ValueError(f"must be one of {', '.join(LANGUAGES)} (got {_echo(value)})")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > 128:
            raise ValueError(f"must be at most 128 characters (got {len(value)})")
        if _CONTROL.search(value):
            raise ValueError(f"must not contain line breaks or control characters (got {_echo(value)})")
        return value


class _Val(NamedTuple):
    """A raw field value with where it came from (an entry, the defaults block or a CSV cell)."""

    value: str | None
    line: int
    where: str
    bad: bool = False  # already reported (a YAML trap): stay quiet about it being missing


class _Context:
    """Turns raw field values into ProxyEntry objects, reporting into one error collector."""

    def __init__(
        self, errs: _Errors, endpoint_override: str | None, *, missing_hint: str, dups: bool
    ) -> None:
        self.errs = errs
        self.override = endpoint_override
        self.missing_hint = missing_hint
        self.seen: dict[tuple[str, str, str], tuple[int, str | None]] | None = {} if dups else None

    def build(self, vals: dict[str, _Val], line: int, where: str | None) -> ProxyEntry | None:
        def path(name: str) -> str:
            return f"{where}.{name}" if where else name

        data = {k: v.value for k, v in vals.items() if v.value is not None}
        bad = any(v.bad for v in vals.values())
        try:
            f = _Fields.model_validate(data)
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                name = str(e["loc"][0]) if e["loc"] else ""
                src = vals.get(name)
                if src is not None and src.bad:
                    continue
                if e["type"] == "missing":
                    self.errs.add(line, path(name), f"required{self.missing_hint}")
                elif e["type"] == "value_error" and src is not None:
                    self.errs.add(src.line, src.where, str(e["ctx"]["error"]))
                else:
                    self.errs.add(src.line if src else line, src.where if src else path(name), e["msg"])
            return None
        if bad:
            return None
        ok = True
        if f.region is not None and f.region not in REGION_HOSTS and f.endpoint is None and not self.override:
            reg = vals["region"]
            hint = _suggest(f.region, list(REGION_HOSTS))
            self.errs.add(
                reg.line, reg.where, f"unknown region {_echo(f.region)} (give an endpoint for it){hint}"
            )
            ok = False
        elif f.region is None and f.endpoint is None and not self.override:
            self.errs.add(line, path("region"), f"one of region or endpoint is required{self.missing_hint}")
            ok = False
        if f.source_version is not None and version_key(f.target_version) < version_key(f.source_version):
            tgt, src_val = vals["target_version"], vals["source_version"]
            self.errs.add(
                tgt.line,
                tgt.where,
                f"target {f.target_version!r} is lower than source_version {f.source_version!r}"
                f" ({src_val.where}, line {src_val.line})",
            )
            ok = False
        if self.seen is not None:
            key = (f.project_id.lower(), f.instance_id.lower(), f.proxy_id.lower())
            first = self.seen.setdefault(key, (line, where))
            if first[0] != line or first[1] != where:
                at = f"{first[1]} on line {first[0]}" if first[1] else f"line {first[0]}"
                self.errs.add(
                    line, where, f"duplicate proxy: same project_id, instance_id and proxy_id as {at}"
                )
                ok = False
        if not ok:
            return None
        if self.override:
            endpoint: str | None = self.override
        elif f.endpoint is not None:
            endpoint = f.endpoint
        else:
            endpoint = endpoint_for_region(f.region) if f.region is not None else None
        return ProxyEntry(
            project_id=f.project_id,
            instance_id=f.instance_id,
            proxy_id=f.proxy_id,
            region=f.region,
            endpoint=endpoint,
            source_version=f.source_version,
            target_version=f.target_version,
            x_language=f.x_language,
            name=f.name,
            line=line,
        )


@dataclass(frozen=True)
class Inventory:
    """A validated inventory. ``entries()`` can be iterated any number of times."""

    path: str
    sha256: str
    format: Literal["yaml", "csv"]
    count: int
    policy: dict[str, object] | None = field(hash=False)  # a dict: keep the frozen dataclass hashable
    policy_line: int | None
    _entries: tuple[ProxyEntry, ...] | None = field(default=None, repr=False, compare=False)
    _endpoint_override: str | None = field(default=None, repr=False, compare=False)

    def entries(self) -> Iterator[ProxyEntry]:
        """YAML entries come from memory; CSV rows are streamed from the file again, hash-checked.

        A CSV changed since ``load_inventory`` raises InventoryErrors before the first entry when the
        change is already visible, or at the end of iteration if it happens mid-read.
        """
        if self._entries is not None:
            return iter(self._entries)
        return _stream_csv(self)


# ----------------------------------------------------------------------------------------- file level


def load_inventory(path: str | os.PathLike[str], *, endpoint_override: str | None = None) -> Inventory:
    """Read and validate the whole inventory; raises InventoryErrors listing every problem found."""
    path_str = os.fspath(path)
    errs = _Errors(path_str)
    override = None
    if endpoint_override is not None:
        try:
            override = normalize_endpoint(endpoint_override)
        except ValueError as exc:
            errs.fatal(None, "--endpoint", str(exc))
    suffix = os.path.splitext(path_str)[1].lower()
    if suffix not in (".yaml", ".yml", ".csv"):
        errs.fatal(
            None, None, f"unknown inventory format {suffix or '(no extension)'!r}; use .yaml, .yml or .csv"
        )
    try:
        if suffix == ".csv":
            with open(path_str, "rb") as fh:
                return _load_csv(path_str, fh, errs, override)
        with open(path_str, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        errs.fatal(None, None, f"cannot read the file: {exc.strerror or exc}")
    return _load_yaml(path_str, data, errs, override)


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text (byte {byte:#04x} at column {column}); save the file as UTF-8"


def _decode_line(raw: bytes, line: int, errs: _Errors) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        errs.fatal(line, None, _not_utf8(raw[exc.start], exc.start + 1))


def _decode(data: bytes, errs: _Errors) -> str:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        errs.fatal(line, None, _not_utf8(data[exc.start], column))


# ----------------------------------------------------------------------------------------------- YAML


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "an empty value"
    return f"the scalar {_echo(node.value)}"


def _check_duplicate_keys(root: yaml.Node, errs: _Errors) -> None:
    """PyYAML keeps the last of two equal keys without a word; walk every mapping once and refuse them."""
    constructor = yaml.constructor.SafeConstructor()
    visited: set[int] = set()
    # A path is a cheap linked tuple (parent, key-or-index), spelled out only when there is an error.
    stack: list[tuple[yaml.Node, _Path]] = [(root, None)]
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, yaml.Node] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    stack.extend([(key, path), (value, path)])
                    continue
                stack.append((value, (path, str(key.value))))
                if key.tag == _MERGE:
                    continue
                ident: object = key.value
                if key.tag != _STR:
                    try:
                        ident = (key.tag, constructor.construct_object(key))
                    except (yaml.YAMLError, TypeError, ValueError):
                        ident = (key.tag, key.value)
                if ident in seen:
                    msg = f"duplicate key (first on line {_line(seen[ident])}); YAML would keep only one"
                    errs.add(_line(key), _spell((path, str(key.value))), msg)
                else:
                    seen[ident] = key
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (path, i)) for i, item in enumerate(node.value))


_Path = tuple["_Path", str | int] | None


def _spell(path: _Path) -> str:
    parts: list[str] = []
    while path is not None:
        path, step = path
        parts.append(f"[{step}]" if isinstance(step, int) else f".{_key_label(step)}")
    return "".join(reversed(parts)).lstrip(".")


_Pairs = dict[str, tuple[yaml.ScalarNode, yaml.Node]]


def _pairs(node: yaml.MappingNode, where: str, errs: _Errors, active: frozenset[int] = frozenset()) -> _Pairs:
    """Key -> (key node, value node), with ``<<`` merge keys applied the way PyYAML applies them."""
    if id(node) in active:
        errs.add(_line(node), where or None, "recursive merge (<<) of an anchor into itself")
        return {}
    active = active | {id(node)}
    merged: _Pairs = {}
    explicit: _Pairs = {}
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag == _MERGE:
            sources = [value] if isinstance(value, yaml.MappingNode) else None
            if isinstance(value, yaml.SequenceNode):
                sources = list(reversed(value.value))  # the first mapping listed wins, as in PyYAML
            for src in sources or [value]:
                if not isinstance(src, yaml.MappingNode):
                    msg = f"a merge (<<) needs a mapping or a list of mappings, not {_kind(src)}"
                    errs.add(_line(src), where or None, msg)
                    continue
                merged.update(_pairs(src, where, errs, active))
            continue
        if not isinstance(key, yaml.ScalarNode):
            errs.add(_line(key), where or None, f"keys must be plain words, not {_kind(key)}")
            continue
        explicit[key.value] = (key, value)
    merged.update(explicit)
    return merged


def _key_label(name: str) -> str:
    """A key as it can appear in the field part of an error: echoed when it is odd, so the line stays one."""
    return name if _PLAIN_KEY.fullmatch(name) else _echo(name)


def _unknown_key(
    name: str, key: yaml.Node, where: str, allowed: tuple[str, ...], errs: _Errors
) -> str | None:
    """Reports the key; returns the field it was probably meant to be, if any."""
    label = _key_label(name)
    close = _close(name, allowed)
    hint = f"; did you mean {close!r}?" if close else ""
    errs.add(_line(key), f"{where}.{label}" if where else label, f"unknown key{hint}")
    return close


def _scalar(node: yaml.Node, name: str, where: str, bad: list[bool], errs: _Errors) -> str | None:
    """The field's text, or None for null/empty; refuses what YAML 1.1 would turn into a non-string.

    A refusal is reported here and flagged in ``bad`` so the entry does not also call the field missing.
    """
    if not isinstance(node, yaml.ScalarNode):
        errs.add(_line(node), where, f"must be a single value, not {_kind(node)}")
        bad.append(True)
        return None
    text = str(node.value)
    if node.tag == _STR:
        return text or None
    if node.tag == _NULL:
        return None
    if node.tag == _INT and name in _ID_FIELDS:
        return text  # an all-digit ID is still the text as written; the pattern decides
    if node.tag == _BOOL:
        msg = f"unquoted {text!r} is read by YAML 1.1 as boolean {text in _TRUE}; quote it: {name}: '{text}'"
        errs.add(_line(node), where, msg)
    elif node.tag in (_INT, _FLOAT) and name in _VERSION_FIELDS:
        msg = f"unquoted {text!r} is read by YAML as a number (2.10 would be 2.1); quote it: {name}: '{text}'"
        errs.add(_line(node), where, msg)
    elif node.tag in (_INT, _FLOAT):
        errs.add(_line(node), where, f"unquoted {_echo(text)} is read by YAML as a number; quote it")
    else:
        errs.add(_line(node), where, f"must be a plain string, not a value tagged {node.tag!r}; quote it")
    bad.append(True)
    return None


_TRUE = frozenset({"yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"})


def _fields(
    node: yaml.MappingNode, where: str, allowed: tuple[str, ...], errs: _Errors, *, in_defaults: bool
) -> dict[str, _Val]:
    out: dict[str, _Val] = {}
    for name, (key, value) in _pairs(node, where, errs).items():
        if name not in allowed:
            meant: str | None
            if in_defaults and name in _ENTRY_ONLY_FIELDS:
                errs.add(_line(key), f"{where}.{name}", "is set per proxy, not in defaults")
                meant = name
            else:
                meant = _unknown_key(name, key, where, allowed, errs)
            if meant:  # the user meant this field: do not also call it missing in every entry
                out.setdefault(meant, _Val(None, _line(key), f"{where}.{meant}", True))
            continue
        bad: list[bool] = []
        text = _scalar(value, name, f"{where}.{name}", bad, errs)
        out[name] = _Val(text, _line(value), f"{where}.{name}", bool(bad))
    return out


def _load_yaml(path: str, data: bytes, errs: _Errors, override: str | None) -> Inventory:
    digest = hashlib.sha256(data).hexdigest()
    text = _decode(data, errs)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
        errs.fatal(int(mark.line) + 1 if mark else None, None, f"not valid YAML: {problem}")
    except yaml.reader.ReaderError as exc:
        msg = f"not valid YAML: {exc.reason} (character {exc.character!r})"
        errs.fatal(text.count("\n", 0, exc.position) + 1, None, msg)
    except yaml.YAMLError as exc:
        errs.fatal(None, None, f"not valid YAML: {exc}")
    if root is None:
        errs.fatal(None, None, "file is empty; expected a mapping with a 'proxies' list")
    if not isinstance(root, yaml.MappingNode):
        errs.fatal(_line(root), None, f"top level must be a mapping with a 'proxies' list, not {_kind(root)}")
    _check_duplicate_keys(root, errs)
    top = _pairs(root, "", errs)
    for name, (key, _) in top.items():
        if name not in _TOP_KEYS:
            _unknown_key(name, key, "", _TOP_KEYS, errs)

    defaults: dict[str, _Val] = {}
    if "defaults" in top:
        dnode = top["defaults"][1]
        if isinstance(dnode, yaml.MappingNode):
            defaults = _fields(dnode, "defaults", _COMMON_FIELDS, errs, in_defaults=True)
        elif not (isinstance(dnode, yaml.ScalarNode) and dnode.tag == _NULL):
            errs.add(_line(dnode), "defaults", f"must be a mapping, not {_kind(dnode)}")

    policy, policy_line = _policy(top, errs)

    if "proxies" not in top:
        errs.fatal(_line(root), "proxies", "required: a list of proxies to upgrade")
    pnode = top["proxies"][1]
    if not isinstance(pnode, yaml.SequenceNode) or not pnode.value:
        what = "an empty list" if isinstance(pnode, yaml.SequenceNode) else _kind(pnode)
        errs.fatal(_line(pnode), "proxies", f"must be a non-empty list of proxies, not {what}")
    ctx = _Context(errs, override, missing_hint=" (set it in the entry or in defaults)", dups=True)
    entries: list[ProxyEntry] = []
    for i, item in enumerate(pnode.value):
        where = f"proxies[{i}]"
        if not isinstance(item, yaml.MappingNode):
            errs.add(_line(item), where, f"must be a mapping of proxy fields, not {_kind(item)}")
            continue
        vals = dict(defaults)
        vals.update(_fields(item, where, ENTRY_FIELDS, errs, in_defaults=False))
        entry = ctx.build(vals, _line(item), where)
        if entry is not None:
            entries.append(entry)
    errs.raise_if_any()
    return Inventory(path, digest, "yaml", len(entries), policy, policy_line, tuple(entries), override)


def _policy(top: _Pairs, errs: _Errors) -> tuple[dict[str, object] | None, int | None]:
    """Kept raw (plus its line) for the policy module, which owns its rules."""
    if "policy" not in top:
        return None, None
    node = top["policy"][1]
    if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
        return None, None
    if not isinstance(node, yaml.MappingNode):
        errs.add(_line(node), "policy", f"must be a mapping, not {_kind(node)}")
        return None, None
    try:
        value = yaml.constructor.SafeConstructor().construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        errs.add(int(mark.line) + 1 if mark else _line(node), "policy", f"not valid: {exc.problem}")
        return None, None
    # Keys stay as YAML built them (the policy module reports a non-string key); a mapping node is a dict.
    return cast(dict[str, object], value), _line(top["policy"][0])


# ------------------------------------------------------------------------------------------------ CSV


class _CsvState:
    def __init__(self) -> None:
        self.at_boundary = True
        self.record_start = 0


def _csv_lines(fh: IO[bytes], hasher: hashlib._Hash, state: _CsvState, errs: _Errors) -> Iterator[str]:
    """Physical lines decoded one by one (so a bad byte has an exact line); comments only between records."""
    for lineno, raw in enumerate(fh, 1):
        hasher.update(raw)
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        text = _decode_line(raw, lineno, errs)
        if state.at_boundary:
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            state.record_start = lineno
            state.at_boundary = False
        yield text


def _csv_records(fh: IO[bytes], hasher: hashlib._Hash, errs: _Errors) -> Iterator[tuple[int, list[str]]]:
    state = _CsvState()
    reader = csv.reader(_csv_lines(fh, hasher, state, errs), strict=True)
    try:
        for row in reader:
            state.at_boundary = True
            yield state.record_start, [cell.strip(" \t") for cell in row]
    except csv.Error as exc:
        errs.fatal(state.record_start or None, None, f"not valid CSV: {exc}")


def _csv_header(line: int, names: list[str], errs: _Errors, override: str | None) -> list[str]:
    meant: set[str] = set()
    for i, name in enumerate(names):
        if name not in ENTRY_FIELDS:
            label = _key_label(name) if name else f"column {i + 1}"
            close = _close(name, ENTRY_FIELDS)
            meant.add(close or "")
            errs.add(line, label, "unknown column" + (f"; did you mean {close!r}?" if close else ""))
        elif names.index(name) != i:
            errs.add(line, name, f"column appears twice (columns {names.index(name) + 1} and {i + 1})")
    for name in _REQUIRED_FIELDS:
        if name not in names and name not in meant:
            errs.add(line, name, "required column missing")
    if "region" not in names and "endpoint" not in names and override is None:
        errs.add(line, "region", "needs a region or endpoint column (or --endpoint)")
    errs.raise_if_any()
    return names


def _csv_entries(
    fh: IO[bytes], hasher: hashlib._Hash, errs: _Errors, override: str | None, *, dups: bool
) -> Iterator[ProxyEntry]:
    ctx = _Context(errs, override, missing_hint=" (empty cell)", dups=dups)
    header: list[str] | None = None
    for line, row in _csv_records(fh, hasher, errs):
        if header is None:
            header = _csv_header(line, row, errs, override)
            continue
        if len(row) != len(header):
            errs.add(line, None, f"has {len(row)} cells but the header has {len(header)} columns")
            continue
        vals = {name: _Val(cell or None, line, name) for name, cell in zip(header, row, strict=True)}
        entry = ctx.build(vals, line, None)
        if entry is not None:
            yield entry
    if header is None:
        errs.fatal(None, None, "file is empty; expected a header row naming the columns")


def _load_csv(path: str, fh: IO[bytes], errs: _Errors, override: str | None) -> Inventory:
    hasher = hashlib.sha256()
    count = sum(1 for _ in _csv_entries(fh, hasher, errs, override, dups=True))
    errs.raise_if_any()
    if count == 0:
        errs.fatal(None, None, "no proxies: the file has a header but no data rows")
    return Inventory(path, hasher.hexdigest(), "csv", count, None, None, None, override)


def _stream_csv(inv: Inventory) -> Iterator[ProxyEntry]:
    errs = _Errors(inv.path, fail_fast=True)
    changed = "the file changed since it was validated; run the validation again"
    try:
        with open(inv.path, "rb") as fh:
            before = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 16), b""):
                before.update(chunk)
            if before.hexdigest() != inv.sha256:
                errs.fatal(None, None, changed)
            fh.seek(0)
            hasher = hashlib.sha256()
            yield from _csv_entries(fh, hasher, errs, inv._endpoint_override, dups=False)
    except OSError as exc:
        errs.fatal(None, None, f"cannot read the file: {exc.strerror or exc}")
    if hasher.hexdigest() != inv.sha256:
        errs.fatal(None, None, changed)


# -------------------------------------------------------------------------------------------- summary


def summarize(inv: Inventory) -> str:
    """What ``orchestrator validate`` prints, so a human can check the scope before a run."""
    projects: Counter[str] = Counter()
    targets: Counter[tuple[str, str]] = Counter()
    versions: Counter[tuple[str, str]] = Counter()
    instances: set[tuple[str, str]] = set()
    for e in inv.entries():
        projects[e.project_id] += 1
        instances.add((e.project_id, e.instance_id))
        targets[(e.region or "-", e.endpoint or "-")] += 1
        versions[(e.source_version or "(current)", e.target_version)] += 1
    lines = [
        f"inventory: {inv.path}",
        f"format:    {inv.format}  sha256 {inv.sha256[:16]}",
        f"proxies:   {inv.count} on {len(instances)} instance(s) in {len(projects)} project(s)",
        "projects:",
        *(f"  {p}  {n}" for p, n in sorted(projects.items())),
        "regions/endpoints:",
        *(f"  {r:<16} {ep}  {n}" for (r, ep), n in sorted(targets.items())),
        "versions (source -> target):",
        *(f"  {s} -> {t}  {n}" for (s, t), n in sorted(versions.items(), key=_version_pair_order)),
        f"policy:    {'line ' + str(inv.policy_line) if inv.policy is not None else 'none (defaults apply)'}",
    ]
    return "\n".join(lines)


def _version_pair_order(item: tuple[tuple[str, str], int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    (source, target), _ = item
    return (version_key(source) if source != "(current)" else (), version_key(target))
