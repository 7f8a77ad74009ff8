"""The rules of one inventory entry: a pydantic schema checked in pydantic-core (patterns in its Rust regex
engine, no Python validator per field), the messages that explain a refusal, and ``EntryBuilder``, which
applies the cross-field rules (region or endpoint, target >= source, no duplicate proxy).

IDs end up in URL paths (``/v3/{project_id}/instances/{instance_id}/proxy/{proxy_id}/...``), so they are
checked against strict ASCII patterns; every pattern is anchored (``^...$``: the Rust engine's ``$`` is the
end of the text, never before a trailing newline). A refusal is rare, so its message is written by plain
Python checks of the same pattern strings, which name the problem precisely.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, Literal, NamedTuple, Required

from pydantic import AfterValidator, ConfigDict, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from orchestrator.cloud.endpoints import REGION_HOSTS, endpoint_for_region, validate_endpoint
from orchestrator.inventory.errors import Problems, echo, got, suggest
from orchestrator.inventory.model import LANGUAGES, ProxyEntry
from orchestrator.versions import VERSION_PATTERN, version_key

__all__ = [
    "COMMON_FIELDS",
    "ENTRY_ONLY_FIELDS",
    "REQUIRED_FIELDS",
    "EntryBuilder",
    "Origins",
    "Val",
    "data_of",
]

COMMON_FIELDS = ("project_id", "region", "endpoint", "source_version", "target_version", "x_language")
ENTRY_ONLY_FIELDS = ("instance_id", "proxy_id", "name")
REQUIRED_FIELDS = ("project_id", "instance_id", "proxy_id", "target_version")

_PROJECT_ID = r"[0-9a-zA-Z]{32}"
_SUFFIXED_ID = r"[0-9a-zA-Z]{32}(?:[a-z]{2}[0-9]{2})?"
_REGION = r"[a-z0-9]+(?:-[a-z0-9]+)*"
_NAME_CHARS = "\x00-\x1f\x7f-\x9f\u2028\u2029"  # line breaks and control characters
_NAME = f"[^{_NAME_CHARS}]*"
_NAME_MAX = 128
_REGION_MAX = 63


@lru_cache(maxsize=256)
def _endpoint(url: str) -> str:
    # A fleet names a few endpoints many thousand times: normalise each spelling once.
    return validate_endpoint(url)


def _anchored(pattern: str) -> str:
    return f"^{pattern}$"


class _Entry(TypedDict, total=False):
    """One entry's fields after defaults are applied; absent and empty fields are simply left out."""

    __pydantic_config__ = ConfigDict(strict=True, extra="forbid")  # type: ignore[misc]

    project_id: Required[Annotated[str, StringConstraints(pattern=_anchored(_PROJECT_ID))]]
    instance_id: Required[Annotated[str, StringConstraints(pattern=_anchored(_SUFFIXED_ID))]]
    proxy_id: Required[Annotated[str, StringConstraints(pattern=_anchored(_SUFFIXED_ID))]]
    target_version: Required[Annotated[str, StringConstraints(pattern=_anchored(VERSION_PATTERN))]]
    source_version: Annotated[str, StringConstraints(pattern=_anchored(VERSION_PATTERN))]
    # The region also names the IAM host (iam.{region}.myhuaweicloud.com): keep it a plain DNS label.
    region: Annotated[str, StringConstraints(pattern=_anchored(_REGION), max_length=_REGION_MAX)]
    endpoint: Annotated[str, AfterValidator(_endpoint)]
    x_language: Literal["en-us", "zh-cn"]
    name: Annotated[str, StringConstraints(pattern=_anchored(_NAME), max_length=_NAME_MAX)]


_FINE_MAX = 4096
_REGION_ENDPOINTS = {region: endpoint_for_region(region) for region in REGION_HOSTS}
_ENTRY = TypeAdapter(_Entry)
# pydantic-core's validator itself: TypeAdapter.validate_python adds a Python call per entry
_validate: Callable[[dict[str, str]], _Entry] = _ENTRY.validator.validate_python


# ------------------------------------------------------------------------------- refusal messages


def _id_problem(field: str, value: str) -> str | None:
    if field == "project_id":
        return None if re.fullmatch(_PROJECT_ID, value) else f"must be 32 letters/digits {got(value)}"
    own = "in" if field == "instance_id" else "po"
    if not re.fullmatch(_SUFFIXED_ID, value):
        return f"must be 32 letters/digits plus an optional suffix like {own}01 {got(value)}"
    return None


def _swapped(field: str, value: str) -> str | None:
    """An instance id that ends like a proxy id (``po01``), or the reverse: a probable column swap."""
    own, other, other_kind = (
        ("in", "po", "a proxy") if field == "instance_id" else ("po", "in", "an instance")
    )
    if len(value) == 36 and value[32:34] == other:
        return (
            f"ends in {value[32:]!r}, which marks {other_kind} id: are instance_id and proxy_id swapped?"
            f" (expected a suffix like {own}01, got {echo(value)})"
        )
    return None


def _version_problem(value: str) -> str | None:
    if re.fullmatch(VERSION_PATTERN, value):
        return None
    return f"must be 2 to 5 dot-separated numbers like 2.23.12.000 {got(value)}"


def _region_problem(value: str) -> str | None:
    if len(value) <= _REGION_MAX and re.fullmatch(_REGION, value):
        return None
    return f"must look like cn-north-4: lowercase letters, digits, hyphens {got(value)}"


def _language_problem(value: str) -> str | None:
    return None if value in LANGUAGES else f"must be one of {', '.join(LANGUAGES)} (got {echo(value)})"


def _name_problem(value: str) -> str | None:
    if len(value) > _NAME_MAX:
        return f"must be at most {_NAME_MAX} characters (got {len(value)})"
    if not re.fullmatch(_NAME, value):
        return f"must not contain line breaks or control characters (got {echo(value)})"
    return None


_EXPLAIN: dict[str, Callable[[str], str | None]] = {
    "project_id": lambda v: _id_problem("project_id", v),
    "instance_id": lambda v: _id_problem("instance_id", v),
    "proxy_id": lambda v: _id_problem("proxy_id", v),
    "source_version": _version_problem,
    "target_version": _version_problem,
    "region": _region_problem,
    "x_language": _language_problem,
    "name": _name_problem,
}


# ---------------------------------------------------------------------------------------- builder


class Val(NamedTuple):
    """A raw field value with where it came from: its 1-based line and its field path (``defaults.region``,
    ``proxies[3].proxy_id`` or a CSV column name)."""

    value: str | None
    line: int
    where: str
    bad: bool = False  # already reported (a YAML trap): stay quiet about it being missing


Origins = Callable[[], dict[str, Val]]


def _digest(key: str) -> bytes:
    # 128 bits: equal digests of different keys are not going to happen (about 1e-29 at 100,000 keys),
    # and 16 bytes per key keep a 100k-entry fleet's key set to a few MB.
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def data_of(vals: dict[str, Val]) -> tuple[dict[str, str], bool]:
    """(the non-empty values, whether any field was refused) of raw field values."""
    data: dict[str, str] = {}
    bad = False
    for k, v in vals.items():
        if v.value is not None:
            data[k] = v.value
        elif v.bad:
            bad = True
    return data, bad


class EntryBuilder:
    """Turns raw field values into ``ProxyEntry`` objects, reporting every problem into ``errs``.

    ``endpoint_override`` (already validated) serves every entry; ``missing_hint`` ends a "required"
    message (where the value could have come from); ``dups`` turns on duplicate detection, which keeps a
    16-byte digest and the first line per entry (about 130 bytes per entry, 13 MB for 100,000).
    """

    def __init__(
        self, errs: Problems, endpoint_override: str | None, *, missing_hint: str, dups: bool
    ) -> None:
        self.errs = errs
        self.override = endpoint_override
        self.missing_hint = missing_hint
        # digest -> first line << 32 | (index + 1): one int per entry rather than a tuple
        self._seen: dict[bytes, int] | None = {} if dups else None
        self._fine: dict[tuple[str | None, str | None, str | None, str], str | None] = {}

    def build(
        self, data: dict[str, str], line: int, index: int | None, origins: Origins, *, bad: bool = False
    ) -> ProxyEntry | None:
        """The entry at ``line`` (YAML: ``proxies[index]``; CSV: index None), or None after reporting why
        it is not valid.

        ``data`` holds the entry's non-empty field values with defaults applied; ``origins()`` gives each
        field's ``Val`` (its line and path) and is only called when there is a problem to report. ``bad``:
        a field was already refused (reported) while reading, so the entry is not valid whatever else.
        """
        try:
            f = _validate(data)
        except ValidationError as exc:
            self._report(exc, origins(), line, index)
            return None
        if bad:
            return None
        ok = True
        instance_id, proxy_id = f["instance_id"], f["proxy_id"]
        if (len(instance_id) == 36 and instance_id[32:34] == "po") or (
            len(proxy_id) == 36 and proxy_id[32:34] == "in"
        ):
            vals = origins()
            for field in ("instance_id", "proxy_id"):
                swap = _swapped(field, f[field])
                if swap is not None:
                    self.errs.add(vals[field].line, vals[field].where, swap)
            ok = False
        region, endpoint = f.get("region"), f.get("endpoint")
        source, target = f.get("source_version"), f["target_version"]
        combo = (region, endpoint, source, target)
        resolved = self._fine.get(combo, "")  # "" is never an endpoint: not seen yet
        if resolved == "":
            fine, resolved = self._where(region, endpoint, source, target, line, index, origins)
            if not fine:
                ok = False
            elif len(self._fine) < _FINE_MAX:
                self._fine[combo] = resolved
        if self._seen is not None:
            key = _digest(f"{f['project_id']}\x00{instance_id}\x00{proxy_id}".lower())
            here = line << 32 | (0 if index is None else index + 1)
            first = self._seen.setdefault(key, here)
            if first != here:
                first_line, first_index = first >> 32, (first & 0xFFFFFFFF) - 1
                at = (
                    f"line {first_line}"
                    if first_index < 0
                    else f"proxies[{first_index}] on line {first_line}"
                )
                msg = f"duplicate proxy: same project_id, instance_id and proxy_id as {at}"
                self.errs.add(line, _path(index, None), msg)
                ok = False
        if not ok:
            return None
        return ProxyEntry(
            f["project_id"],
            instance_id,
            proxy_id,
            region,
            resolved,
            source,
            target,
            f.get("x_language", "en-us"),
            f.get("name"),
            line,
        )

    def _where(
        self,
        region: str | None,
        endpoint: str | None,
        source: str | None,
        target: str,
        line: int,
        index: int | None,
        origins: Origins,
    ) -> tuple[bool, str | None]:
        """(fine, the endpoint the entry resolves to) for one combination of region, endpoint and
        versions; the problems of an entry that is not fine are reported. A fleet repeats a few
        combinations many thousand times, so ``build`` remembers the fine ones."""
        fine = True
        if region is not None and endpoint is None and not self.override and region not in REGION_HOSTS:
            reg = origins()["region"]
            hint = suggest(region, list(REGION_HOSTS))
            self.errs.add(
                reg.line, reg.where, f"unknown region {echo(region)} (give an endpoint for it){hint}"
            )
            fine = False
        elif region is None and endpoint is None and not self.override:
            self.errs.add(
                line, _path(index, "region"), f"one of region or endpoint is required{self.missing_hint}"
            )
            fine = False
        if source is not None and version_key(target) < version_key(source):
            vals = origins()
            tgt, src = vals["target_version"], vals["source_version"]
            self.errs.add(
                tgt.line,
                tgt.where,
                f"target {target!r} is lower than source_version {source!r} ({src.where}, line {src.line})",
            )
            fine = False
        if self.override:
            return fine, self.override
        if endpoint is not None:
            return fine, endpoint
        return fine, (_REGION_ENDPOINTS.get(region) if region is not None else None)

    def _report(self, exc: ValidationError, vals: dict[str, Val], line: int, index: int | None) -> None:
        failed: set[str] = set()
        for e in exc.errors(include_url=False):
            name = str(e["loc"][0]) if e["loc"] else ""
            failed.add(name)
            src = vals.get(name)
            if src is not None and src.bad:
                continue
            if e["type"] == "missing":
                self.errs.add(line, _path(index, name), f"required{self.missing_hint}")
                continue
            if e["type"] == "value_error":
                message = str(e["ctx"]["error"])
            else:
                explain = _EXPLAIN.get(name)
                value = src.value if src is not None else None
                message = (explain(value) if explain and value is not None else None) or e["msg"]
            if src is not None:
                self.errs.add(src.line, src.where, message)
            else:
                self.errs.add(line, _path(index, name), message)
        for field in ("instance_id", "proxy_id"):  # a swap is worth saying even beside another problem
            src = vals.get(field)
            if field not in failed and src is not None and src.value is not None and not src.bad:
                swap = _swapped(field, src.value)
                if swap is not None:
                    self.errs.add(src.line, src.where, swap)


def _path(index: int | None, name: str | None) -> str | None:
    """The field path of an entry-level problem: ``proxies[3].region``/``proxies[3]`` in YAML, the column
    name (or nothing) in CSV."""
    if index is None:
        return name
    return f"proxies[{index}].{name}" if name else f"proxies[{index}]"
