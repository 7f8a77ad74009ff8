"""Answers to outcomes: pure functions from (HTTP status, headers, body bytes) to the project's values.

The aiohttp client and the in-process fake both call these, so a test on the fake judges the same parsing
the real client does. Nothing here does I/O or raises for what the cloud sent.

Shapes and error bodies are the API contract's (shared ``docs/api-contract.md``, from the GaussDB(for
MySQL) v3 API reference): ``{"error_code", "error_msg"}`` on errors, ``X-Request-Id`` on every answer.

Body caps (``BODY_CAPS``, bytes): the API's answers are small (an upgrade answer is one item per proxy
node, a job is one object, a page of 100 instances or proxies or 50 recent jobs is some tens of KiB), so
an answer larger than its route's cap is not one of them: it is ``MALFORMED`` (``sent=True``: for an
upgrade the cloud may have acted, so it goes to reconcile). The client reads at most ``cap + 1`` bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

from orchestrator.cloud.api import InstancePage, ProxyPage, RecentJobs
from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    InstanceInfo,
    ProxyInfo,
    RecentJob,
    TransportFailure,
    TransportKind,
    UpdateItem,
    VersionInfo,
    WorkflowInfo,
)

KIB: Final = 1024
BODY_CAPS: Final[Mapping[str, int]] = {
    "upgrade": 64 * KIB,
    "proxy_version": 64 * KIB,
    "job": 64 * KIB,
    "immediate_jobs": 1024 * KIB,
    "instances": 1024 * KIB,
    "proxies": 1024 * KIB,
}
"""Largest answer body accepted per route, in bytes (documented in docs/auth.md, "Answer size caps")."""

MAX_TEXT: Final = 300
MAX_RETRY_AFTER: Final = 300.0
UPGRADE_STATES: Final = frozenset({"ACCEPT", "REJECT"})

Failure = HttpFailure | TransportFailure
_UNREADABLE: Final = object()


def one_line(text: str | None, limit: int = MAX_TEXT) -> str | None:
    """Cloud-provided text made safe for a one-line report: no newlines, bounded length."""
    if text is None:
        return None
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After in seconds or as an HTTP-date (RFC 9110 section 10.2.3), capped at
    ``MAX_RETRY_AFTER`` so a hostile value cannot park a run for days; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        secs = (when - (now or datetime.now(UTC))).total_seconds()
    if secs != secs:  # NaN
        return None
    return max(0.0, min(secs, MAX_RETRY_AFTER))


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value by case-insensitive name (works on plain dicts and on multidicts)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def malformed(detail: str, status: int | None, request_id: str | None) -> TransportFailure:
    """An answer that arrived but is not the documented shape: the cloud may have acted (sent=True)."""
    return TransportFailure(
        TransportKind.MALFORMED, sent=True, detail=detail, http_status=status, request_id=request_id
    )


def oversized(route: str, status: int | None, request_id: str | None) -> TransportFailure:
    """The answer for ``route`` is longer than its cap (see ``BODY_CAPS``)."""
    cap = BODY_CAPS[route]
    return malformed(f"{route} answer body is larger than the {cap // KIB} KiB allowed", status, request_id)


def split(
    route: str, status: int, headers: Mapping[str, str], body: bytes
) -> tuple[Any, str | None] | Failure:
    """The JSON of a 2xx answer with its request id, or the failure the answer amounts to.

    Non-2xx -> ``HttpFailure`` (error code/message from the documented body when present, Retry-After
    parsed); a 2xx that is not JSON, or any answer over the route's cap -> ``MALFORMED``."""
    request_id = header(headers, "X-Request-Id")
    if len(body) > BODY_CAPS[route]:
        return oversized(route, status, request_id)
    data: Any
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = _UNREADABLE
    if 200 <= status < 300:
        if data is _UNREADABLE or data is None:
            return malformed(f"HTTP {status} with a body that is not JSON", status, request_id)
        return data, request_id
    code = msg = None
    if isinstance(data, dict):
        code = _opt_str(data.get("error_code"))
        msg = _opt_str(data.get("error_msg"))
    elif body:
        msg = f"unreadable error body: {body[:120].decode('utf-8', 'replace')}"
    return HttpFailure(
        http_status=status,
        error_code=one_line(code, 64),
        error_msg=one_line(msg),
        request_id=request_id,
        retry_after=parse_retry_after(header(headers, "Retry-After")),
    )


# ---------------------------------------------------------------------------------------------- routes


def upgrade_outcome(
    status: int, headers: Mapping[str, str], body: bytes, *, instance_id: str
) -> Answered | Failure:
    """The upgrade call's answer. Each ``update_result`` item must prove its state (issue 10 kind 3):
    ``state`` exactly ``ACCEPT`` or ``REJECT``; a non-empty string ``workflow_id`` on ACCEPT;
    ``instance_id``, when present (optional per the contract), equal to the instance asked for;
    ``error_message`` a string or null; no workflow id twice. Anything else is ``MALFORMED`` naming
    the first problem (the cloud may have acted: reconcile)."""
    res = split("upgrade", status, headers, body)
    if isinstance(res, HttpFailure | TransportFailure):
        return res
    data, request_id = res
    items = update_items(data, instance_id)
    if isinstance(items, str):
        return malformed(f"upgrade answer: {items}", status, request_id)
    return Answered(http_status=status, items=items, request_id=request_id)


def update_items(data: Any, instance_id: str) -> tuple[UpdateItem, ...] | str:
    """The validated items of an upgrade answer, or a one-line description of what is wrong."""
    raw = data.get("update_result") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        return "no update_result list with at least one item"
    items: list[UpdateItem] = []
    seen: set[str] = set()
    for i, it in enumerate(raw):
        where = f"update_result[{i}]"
        if not isinstance(it, dict):
            return f"{where} is not an object"
        state = it.get("state")
        if not isinstance(state, str) or state not in UPGRADE_STATES:
            return f"{where}: state {_show(state)} is not ACCEPT or REJECT"
        wid = it.get("workflow_id")
        if wid is not None and not isinstance(wid, str):
            return f"{where}: workflow_id {_show(wid)} is not a string"
        if state == "ACCEPT" and not wid:
            return f"{where}: ACCEPT without a workflow_id"
        if wid:
            if wid in seen:
                return f"{where}: workflow_id {_show(wid)} appears twice"
            seen.add(wid)
        inst = it.get("instance_id")
        if inst is not None and inst != instance_id:
            return f"{where}: instance_id {_show(inst)} is not the instance asked for ({instance_id})"
        message = it.get("error_message")
        if message is not None and not isinstance(message, str):
            return f"{where}: error_message {_show(message)} is not a string"
        items.append(
            UpdateItem(
                workflow_id=wid or None,
                state=state,
                error_message=one_line(message),
                instance_id=inst,
            )
        )
    return tuple(items)


def version_outcome(status: int, headers: Mapping[str, str], body: bytes) -> VersionInfo | Failure:
    """``proxy-version``: ``current_version`` must be a string; the other fields are optional."""
    res = split("proxy_version", status, headers, body)
    if isinstance(res, HttpFailure | TransportFailure):
        return res
    data, request_id = res
    if not isinstance(data, dict) or not isinstance(data.get("current_version"), str):
        return malformed("proxy-version answer lacks current_version", status, request_id)
    risk = data.get("risk")
    can = data.get("can_upgrade")
    latest = data.get("latest_version")
    return VersionInfo(
        current_version=data["current_version"],
        latest_version=latest if isinstance(latest, str) else None,
        can_upgrade=can if isinstance(can, bool) else None,
        risk=risk if isinstance(risk, dict) else {},
    )


def job_outcome(
    status: int, headers: Mapping[str, str], body: bytes, *, workflow_id: str
) -> WorkflowInfo | Failure:
    """``GET /jobs?id=``: ``job.status`` must be a string."""
    res = split("job", status, headers, body)
    if isinstance(res, HttpFailure | TransportFailure):
        return res
    data, request_id = res
    job = data.get("job") if isinstance(data, dict) else None
    if not isinstance(job, dict) or not isinstance(job.get("status"), str):
        return malformed("jobs answer lacks job.status", status, request_id)
    return WorkflowInfo(
        workflow_id=str(job.get("id") or workflow_id),
        status=job["status"],
        progress=_opt_str(job.get("process")),
        fail_reason=one_line(_opt_str(job.get("fail_reason"))),
        created=_opt_str(job.get("created")),
        ended=_opt_str(job.get("ended")),
    )


def recent_jobs_outcome(status: int, headers: Mapping[str, str], body: bytes) -> RecentJobs | Failure:
    """``immediate-jobs``: a ``jobs`` list; rows without a ``job_id`` are dropped (they name nothing)."""
    res = split("immediate_jobs", status, headers, body)
    if isinstance(res, HttpFailure | TransportFailure):
        return res
    data, request_id = res
    raw = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        return malformed("immediate-jobs answer lacks a jobs list", status, request_id)
    jobs = tuple(
        RecentJob(
            job_id=str(j.get("job_id") or ""),
            instance_id=_opt_str(j.get("instance_id")),
            job_name=_opt_str(j.get("job_name")),
            status=_opt_str(j.get("status")),
            created_time=_opt_str(j.get("created_time")),
            extend_fields=_opt_str(j.get("extend_fields")),
        )
        for j in raw
        if isinstance(j, dict) and j.get("job_id")
    )
    total = data.get("total_count")
    return RecentJobs(jobs=jobs, total_count=total if _is_count(total) else len(jobs))


def instances_outcome(status: int, headers: Mapping[str, str], body: bytes) -> InstancePage | Failure:
    """``GET /instances``: every row needs a string ``id``, and ``total_count`` a count, or the page is
    ``MALFORMED`` (discovery must not silently drop an instance)."""
    res = split("instances", status, headers, body)
    if isinstance(res, HttpFailure | TransportFailure):
        return res
    data, request_id = res
    raw = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        return malformed("instances answer lacks an instances list", status, request_id)
    total = data.get("total_count")
    if not _is_count(total):
        return malformed(f"instances answer: total_count {_show(total)} is not a count", status, request_id)
    rows: list[InstanceInfo] = []
    for i, row in enumerate(raw):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            return malformed(f"instances answer: instances[{i}] has no id", status, request_id)
        rows.append(
            InstanceInfo(
                instance_id=row["id"], name=_opt_str(row.get("name")), status=_opt_str(row.get("status"))
            )
        )
    return InstancePage(instances=tuple(rows), total_count=total)


def proxies_outcome(status: int, headers: Mapping[str, str], body: bytes) -> ProxyPage | Failure:
    """``GET /instances/{id}/proxies``: every row needs ``proxy.pool_id`` (the proxy id)."""
    res = split("proxies", status, headers, body)
    if isinstance(res, HttpFailure | TransportFailure):
        return res
    data, request_id = res
    raw = data.get("proxy_list") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        return malformed("proxies answer lacks a proxy_list", status, request_id)
    rows: list[ProxyInfo] = []
    for i, row in enumerate(raw):
        proxy = row.get("proxy") if isinstance(row, dict) else None
        pool_id = proxy.get("pool_id") if isinstance(proxy, dict) else None
        if not isinstance(proxy, dict) or not isinstance(pool_id, str) or not pool_id:
            return malformed(f"proxies answer: proxy_list[{i}] has no proxy.pool_id", status, request_id)
        nodes = proxy.get("node_num")
        rows.append(
            ProxyInfo(
                proxy_id=pool_id,
                name=_opt_str(proxy.get("name")),
                status=_opt_str(proxy.get("status")),
                node_num=nodes if _is_count(nodes) else None,
            )
        )
    return ProxyPage(proxies=tuple(rows))


# --------------------------------------------------------------------------------------------- helpers


def _opt_str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _show(value: object) -> str:
    """A foreign value quoted for a one-line message, bounded."""
    return one_line(json.dumps(value, ensure_ascii=True, default=str), 60) or "null"
