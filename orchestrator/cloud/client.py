"""GaussDB(for MySQL) API calls, answered as the project's own outcome values.

Error tree at this boundary (nothing of aiohttp escapes it)::

    upgrade()/proxy_version()/job()/immediate_jobs()
      -> Answered | VersionInfo | WorkflowInfo | RecentJobs     the documented 2xx shape
      -> HttpFailure(status, error_code, error_msg, retry_after) any non-2xx, error body parsed if possible
      -> TransportFailure(kind, sent)
             CONNECT   refused / DNS / TLS / connect timeout: the request never left (sent=False)
             TIMEOUT   no complete answer in time after the request was sent (sent=True)
             RESET     connection dropped after sending (sent=True)
             MALFORMED a 2xx whose body is not the documented shape (sent=True: it may have acted)

Whether a request "was sent" is observed with aiohttp's request-headers-sent trace signal rather than
guessed from the exception type: an upgrade whose headers never left cannot have started anything.
Per-request timeouts start when the request starts: the connector has no pool limit (concurrency is
bounded by the engine's workers), so no time is spent waiting for a pooled connection.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import aiohttp

from orchestrator.cloud.auth import AuthError, Credentials, IamUnavailable, Scope
from orchestrator.cloud.signer import canonical_query
from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    RecentJob,
    TransportFailure,
    TransportKind,
    UpdateItem,
    VersionInfo,
    WorkflowInfo,
)

MAX_RETRY_AFTER = 300.0
MAX_TEXT = 300


@dataclass(frozen=True, slots=True)
class ProxyRef:
    project_id: str
    instance_id: str
    proxy_id: str
    endpoint: str
    region: str | None = None
    x_language: str = "en-us"

    @property
    def scope(self) -> Scope:
        return Scope(project_id=self.project_id, region=self.region, endpoint=self.endpoint)


@dataclass(frozen=True, slots=True)
class RecentJobs:
    jobs: tuple[RecentJob, ...]
    total_count: int


Failure = HttpFailure | TransportFailure
OnSent = Callable[[], None] | None  # called when a request's headers left (the limiter's send time)


def one_line(text: str | None, limit: int = MAX_TEXT) -> str | None:
    """Cloud-provided text made safe for a one-line report: no newlines, bounded length."""
    if text is None:
        return None
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After in seconds or as an HTTP-date, capped so a hostile value cannot park a run for days."""
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


def _seg(value: str) -> str:
    # IDs are validated by the inventory; quoting again means no value can ever change the path.
    return quote(value, safe="")


async def _on_headers_sent(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: object) -> None:
    if ctx.trace_request_ctx is not None:
        ctx.trace_request_ctx.sent = True


def make_session(*, ca_bundle: str | None = None, verify: bool = True) -> aiohttp.ClientSession:
    """The process's one ClientSession: TLS verified (optionally against a private CA), proxies from
    HTTPS_PROXY/NO_PROXY (trust_env), and the trace hook that tells whether a request left."""
    ssl_ctx: ssl.SSLContext | bool = verify
    if verify and ca_bundle:
        ssl_ctx = ssl.create_default_context(cafile=ca_bundle)
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=ssl_ctx),
        trust_env=True,
        trace_configs=[trace],
    )


class CloudClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._session = session
        self._creds = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)

    # -------------------------------------------------------------- calls
    async def upgrade(
        self, ref: ProxyRef, source_version: str, target_version: str, *, on_sent: OnSent = None
    ) -> Answered | Failure:
        path = (
            f"/v3/{_seg(ref.project_id)}/instances/{_seg(ref.instance_id)}"
            f"/proxy/{_seg(ref.proxy_id)}/upgrade-version"
        )
        body = {"source_version": source_version, "target_version": target_version}
        res = await self._call("POST", ref, path, body=body, on_sent=on_sent)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        status, data, request_id = res
        items = _update_items(data)
        if items is None:
            return TransportFailure(
                TransportKind.MALFORMED,
                sent=True,
                detail="upgrade answer has no valid update_result list",
                http_status=status,
                request_id=request_id,
            )
        return Answered(http_status=status, items=items, request_id=request_id)

    async def proxy_version(self, ref: ProxyRef, *, on_sent: OnSent = None) -> VersionInfo | Failure:
        path = (
            f"/v3/{_seg(ref.project_id)}/instances/{_seg(ref.instance_id)}"
            f"/proxy/{_seg(ref.proxy_id)}/taurusproxy/proxy-version"
        )
        res = await self._call("GET", ref, path, on_sent=on_sent)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        status, data, request_id = res
        if not isinstance(data, dict) or not isinstance(data.get("current_version"), str):
            return _malformed("proxy-version answer lacks current_version", status, request_id)
        risk = data.get("risk")
        can = data.get("can_upgrade")
        latest = data.get("latest_version")
        return VersionInfo(
            current_version=data["current_version"],
            latest_version=latest if isinstance(latest, str) else None,
            can_upgrade=can if isinstance(can, bool) else None,
            risk=risk if isinstance(risk, dict) else {},
        )

    async def job(self, ref: ProxyRef, workflow_id: str, *, on_sent: OnSent = None) -> WorkflowInfo | Failure:
        path = f"/v3/{_seg(ref.project_id)}/jobs"
        res = await self._call("GET", ref, path, query=[("id", workflow_id)], on_sent=on_sent)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        status, data, request_id = res
        job = data.get("job") if isinstance(data, dict) else None
        if not isinstance(job, dict) or not isinstance(job.get("status"), str):
            return _malformed("jobs answer lacks job.status", status, request_id)
        return WorkflowInfo(
            workflow_id=str(job.get("id") or workflow_id),
            status=job["status"],
            progress=_opt_str(job.get("process")),
            fail_reason=one_line(_opt_str(job.get("fail_reason"))),
            created=_opt_str(job.get("created")),
            ended=_opt_str(job.get("ended")),
        )

    async def immediate_jobs(
        self,
        ref: ProxyRef,
        *,
        start_time: datetime,
        end_time: datetime | None = None,
        offset: int = 0,
        limit: int = 50,
        on_sent: OnSent = None,
    ) -> RecentJobs | Failure:
        path = f"/v3/{_seg(ref.project_id)}/immediate-jobs"
        query = [
            ("offset", str(offset)),
            ("limit", str(limit)),
            ("start_time", start_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")),
        ]
        if end_time is not None:
            query.append(("end_time", end_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")))
        res = await self._call("GET", ref, path, query=query, on_sent=on_sent)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        status, data, request_id = res
        raw = data.get("jobs") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            return _malformed("immediate-jobs answer lacks a jobs list", status, request_id)
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
        return RecentJobs(jobs=jobs, total_count=total if isinstance(total, int) else len(jobs))

    # ---------------------------------------------------------- transport
    async def _call(
        self,
        method: str,
        ref: ProxyRef,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        on_sent: OnSent = None,
    ) -> tuple[int, Any, str | None] | Failure:
        url = ref.endpoint.rstrip("/") + path + (("?" + canonical_query(query)) if query else "")
        payload = json.dumps(body).encode() if body is not None else b""
        renewed = False
        while True:
            headers = {"Content-Type": "application/json;charset=UTF-8", "X-Language": ref.x_language}
            try:
                headers.update(await self._creds.headers_for(ref.scope, method, url, headers, payload))
            except IamUnavailable as exc:
                # no token could be fetched: nothing was sent to the service, safe to retry later
                return TransportFailure(TransportKind.CONNECT, sent=False, detail=f"IAM unavailable: {exc}")
            except AuthError as exc:
                return HttpFailure(http_status=401, error_code="IAM.AUTH", error_msg=one_line(str(exc)))
            res = await self._send(method, url, headers, payload, on_sent)
            if (
                isinstance(res, HttpFailure)
                and res.http_status == 401
                and not renewed
                and await self._creds.on_unauthorized(ref.scope, headers)
            ):
                # The gateway refused the credential before the backend saw the call: resending once
                # with a renewed token cannot upgrade anything twice.
                renewed = True
                continue
            return res

    async def _send(
        self, method: str, url: str, headers: dict[str, str], payload: bytes, on_sent: OnSent
    ) -> tuple[int, Any, str | None] | Failure:
        ctx = SimpleNamespace(sent=False, on_sent=on_sent)
        try:
            async with self._session.request(
                method,
                url,
                data=payload if payload else None,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                trace_request_ctx=ctx,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                request_id = resp.headers.get("X-Request-Id")
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError as exc:
            kind = TransportKind.TIMEOUT if ctx.sent else TransportKind.CONNECT
            return TransportFailure(kind, sent=ctx.sent, detail=_detail(exc, "timed out"))
        except aiohttp.ClientConnectorError as exc:
            return TransportFailure(TransportKind.CONNECT, sent=False, detail=_detail(exc, "connect failed"))
        except (aiohttp.ClientError, OSError) as exc:
            kind = TransportKind.RESET if ctx.sent else TransportKind.CONNECT
            return TransportFailure(kind, sent=ctx.sent, detail=_detail(exc, "connection failed"))

        data: Any
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            data = _UNREADABLE
        if 200 <= status < 300:
            if data is _UNREADABLE or data is None:
                return _malformed(f"HTTP {status} with a body that is not JSON", status, request_id)
            return status, data, request_id
        code = msg = None
        if isinstance(data, dict):
            code = _opt_str(data.get("error_code"))
            msg = _opt_str(data.get("error_msg"))
        elif raw:
            msg = f"unreadable error body: {raw[:120].decode('utf-8', 'replace')}"
        return HttpFailure(
            http_status=status,
            error_code=one_line(code, 64),
            error_msg=one_line(msg),
            request_id=request_id,
            retry_after=parse_retry_after(retry_after),
        )


_UNREADABLE = object()


def _opt_str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _malformed(detail: str, status: int, request_id: str | None) -> TransportFailure:
    return TransportFailure(
        TransportKind.MALFORMED, sent=True, detail=detail, http_status=status, request_id=request_id
    )


def _detail(exc: BaseException, fallback: str) -> str:
    # Exception text from aiohttp names host and port only; never request headers.
    text = one_line(str(exc), 200)
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__}: {fallback}"


def _update_items(data: Any) -> tuple[UpdateItem, ...] | None:
    if not isinstance(data, dict):
        return None
    raw = data.get("update_result")
    if not isinstance(raw, list) or not raw:
        return None
    items = []
    for it in raw:
        if not isinstance(it, dict) or not isinstance(it.get("state"), str):
            return None
        items.append(
            UpdateItem(
                workflow_id=_opt_str(it.get("workflow_id")),
                state=it["state"],
                error_message=one_line(_opt_str(it.get("error_message"))),
                instance_id=_opt_str(it.get("instance_id")),
            )
        )
    return tuple(items)
