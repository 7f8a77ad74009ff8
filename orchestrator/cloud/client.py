"""GaussDB(for MySQL) API calls over aiohttp, answered as the project's own outcome values.

``CloudClient`` implements ``cloud.api.CloudApi``. Error tree at this boundary (nothing of aiohttp
escapes it)::

    upgrade()/proxy_version()/job()/immediate_jobs()/list_instances()/list_proxies()
      -> Answered | VersionInfo | WorkflowInfo | RecentJobs | InstancePage | ProxyPage   the 2xx shape
      -> HttpFailure(status, error_code, error_msg, retry_after)   any non-2xx, error body parsed if possible
      -> TransportFailure(kind, sent)
             CONNECT   refused / DNS / connect timeout, or may_send said no: never left (sent=False)
             TLS       the server's certificate failed verification (or no TLS handshake): sent=False
             TIMEOUT   no complete answer in time after the request was sent (sent=True)
             RESET     connection dropped after sending (sent=True)
             MALFORMED an answer that is not the documented shape, or larger than its route's cap
                       (``answers.BODY_CAPS``), sent=True: it may have acted

Whether a request "was sent" is observed by the session's request class (``_FencedRequest``), whose
``send`` runs once the connection is made and immediately before the request's bytes are written (the
point aiohttp's request-headers-sent trace signal marks; that signal cost about 4% of the CPU per upgrade
call in trace objects and signal sends, measured with py-spy). That hook is where ``may_send`` (the
fencing check) runs, where the request is marked sent, and where ``on_sent`` (the limiter's send time) is
called. Per-request timeouts start when the request starts: the connector has no
pool limit (concurrency is bounded by the engine's workers), so no time is spent waiting for a pooled
connection. Every answer's ``Date`` header is recorded in ``clock`` (``cloud.clock.CloudClock``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import aiohttp
from aiohttp.connector import Connection

from orchestrator.cloud.answers import (
    BODY_CAPS,
    MAX_RETRY_AFTER,
    MAX_TEXT,
    header,
    instances_outcome,
    job_outcome,
    one_line,
    oversized,
    parse_retry_after,
    proxies_outcome,
    recent_jobs_outcome,
    upgrade_outcome,
    version_outcome,
)
from orchestrator.cloud.api import (
    NOT_SENT,
    AnyRef,
    Failure,
    InstancePage,
    InstanceRef,
    MaySend,
    OnSent,
    ProjectRef,
    ProxyPage,
    ProxyRef,
    RecentJobs,
)
from orchestrator.cloud.auth import AuthError, Credentials, IamUnavailable
from orchestrator.cloud.clock import CloudClock
from orchestrator.cloud.signer import canonical_query
from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    TransportFailure,
    TransportKind,
    VersionInfo,
    WorkflowInfo,
)

__all__ = [
    "MAX_RETRY_AFTER",
    "MAX_TEXT",
    "CloudClient",
    "Failure",
    "InstanceRef",
    "OnSent",
    "ProjectRef",
    "ProxyRef",
    "RecentJobs",
    "make_session",
    "one_line",
    "parse_retry_after",
]

# OpenSSL's X509_V_ERR_* codes (openssl/x509_vfy.h) -> which check failed, in words an operator knows.
_VERIFY_CODES: Mapping[int, str] = {
    2: "unknown CA (the issuer certificate is not available)",
    7: "certificate signature is invalid",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain (unknown CA)",
    20: "unknown CA (unable to get the local issuer certificate)",
    21: "unable to verify the first certificate (incomplete chain or unknown CA)",
    23: "certificate has been revoked",
    26: "certificate is not for TLS server use",
    27: "certificate is not trusted",
    62: "hostname mismatch (the certificate is for another host)",
    64: "IP address mismatch (the certificate is for another address)",
}

_OUR_SESSIONS: weakref.WeakSet[aiohttp.ClientSession] = weakref.WeakSet()


class _NotSent(Exception):
    """Raised from the send hook when ``may_send`` refuses: aborts the request before any byte left."""


@dataclass(slots=True)
class _Attempt:
    """One request's send context: the caller's hooks and what the hook saw."""

    now: Callable[[], float]
    on_sent: OnSent
    may_send: MaySend
    # the task making the request: a task created while it is under way (from ``on_sent``, say) copies
    # the context, and a request of its own on this session must not take this request's hooks
    task: asyncio.Task[object] | None
    sent: bool = False
    sent_at: float | None = None


# The attempt of the request the current task is making: ``CloudClient._send`` sets it around its
# request; aiohttp calls ``ClientRequest.send`` from the task that made the request.
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("orchestrator_send_attempt", default=None)


class _FencedRequest(aiohttp.ClientRequest):
    """aiohttp's request, with the send hook: ``send`` is called with the connection made and before
    the status line and headers are serialised or any byte is written (aiohttp ``ClientRequest.send``;
    a redirect or a retried connection calls it again)."""

    async def send(self, conn: Connection) -> aiohttp.ClientResponse:
        attempt = _ATTEMPT.get()
        if attempt is not None and attempt.task is asyncio.current_task():
            if attempt.may_send is not None and not attempt.may_send():
                raise _NotSent
            attempt.sent = True
            attempt.sent_at = attempt.now()
            if attempt.on_sent is not None:
                attempt.on_sent()
        return await super().send(conn)


def make_session(*, ca_bundle: str | None = None, verify: bool = True) -> aiohttp.ClientSession:
    """The process's one ClientSession: TLS verified (optionally against a private CA), proxies from
    HTTPS_PROXY/NO_PROXY (resolved per host by ``proxy_for``: the session's own ``trust_env`` is off),
    and the send hook (``_FencedRequest``) that tells whether a request left. A ``CloudClient`` accepts
    only sessions made here (without the hook every failure would look unsent)."""
    ssl_ctx: ssl.SSLContext | bool = verify
    if verify and ca_bundle:
        ssl_ctx = ssl.create_default_context(cafile=ca_bundle)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=ssl_ctx),
        # Proxies from HTTPS_PROXY/NO_PROXY are resolved once per host (``proxy_for``), not by aiohttp on
        # every request: with trust_env it reads ~/.netrc and the environment per call (a tenth of the
        # orchestrator's CPU per upgrade call, measured with py-spy).
        trust_env=False,
        request_class=_FencedRequest,
    )
    _OUR_SESSIONS.add(session)
    return session


_PROXIES: dict[tuple[str, str], str | None] = {}
_UNSET = object()


def proxy_for(url: str) -> str | None:
    """The proxy (HTTPS_PROXY/HTTP_PROXY, minus NO_PROXY) for ``url``'s scheme and host, resolved once
    per host from the environment, as ``trust_env`` would but without re-reading it on every call."""
    scheme, _, rest = url.partition("://")
    key = (scheme, rest.split("/", 1)[0])
    found = _PROXIES.get(key, _UNSET)
    if found is not _UNSET:
        return found  # type: ignore[return-value]
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    if key not in _PROXIES:
        chosen = getproxies().get(parts.scheme)
        if chosen and parts.hostname and proxy_bypass(parts.hostname):
            chosen = None
        _PROXIES[key] = chosen or None
    return _PROXIES[key]


def _seg(value: str) -> str:
    # IDs are validated by the inventory; quoting again means no value can ever change the path.
    return quote(value, safe="")


@functools.lru_cache(maxsize=64)
def _upgrade_body(source_version: str, target_version: str) -> bytes:
    # a fleet sends the same few version pairs: encoded once each, not once per call
    return json.dumps({"source_version": source_version, "target_version": target_version}).encode()


def _utc(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CloudClient:
    """The ``CloudApi`` over HTTP.

    ``session`` must come from ``make_session`` (raises ``ValueError`` otherwise); ``credentials``
    give each attempt's auth headers; ``timeout`` (s) bounds a whole call including reading the answer,
    ``connect_timeout`` (s) the TCP connect; ``clock`` receives every answer's ``Date`` (a new
    ``CloudClock`` on ``time.time`` by default). A credential that cannot be had comes back as a value
    too: IAM unreachable as ``TransportFailure(CONNECT, sent=False)``, refused or misconfigured as
    ``HttpFailure(401, "IAM.AUTH")``; nothing was sent to the service in either case."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        clock: CloudClock | None = None,
    ) -> None:
        if session not in _OUR_SESSIONS:
            raise ValueError("CloudClient needs a session from cloud.client.make_session (its send hook)")
        self._session = session
        self._creds = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self.clock = clock if clock is not None else CloudClock()

    # -------------------------------------------------------------- calls
    async def upgrade(
        self,
        ref: ProxyRef,
        source_version: str,
        target_version: str,
        *,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> Answered | Failure:
        """``POST /v3/{p}/instances/{i}/proxy/{x}/upgrade-version`` with both versions (contract 1)."""
        path = (
            f"/v3/{_seg(ref.project_id)}/instances/{_seg(ref.instance_id)}"
            f"/proxy/{_seg(ref.proxy_id)}/upgrade-version"
        )
        body = _upgrade_body(source_version, target_version)
        res = await self._call("upgrade", "POST", ref, path, body=body, on_sent=on_sent, may_send=may_send)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        return upgrade_outcome(*res, instance_id=ref.instance_id)

    async def proxy_version(
        self, ref: ProxyRef, *, on_sent: OnSent = None, may_send: MaySend = None
    ) -> VersionInfo | Failure:
        """``GET .../proxy/{x}/taurusproxy/proxy-version`` (contract 2)."""
        path = (
            f"/v3/{_seg(ref.project_id)}/instances/{_seg(ref.instance_id)}"
            f"/proxy/{_seg(ref.proxy_id)}/taurusproxy/proxy-version"
        )
        res = await self._call("proxy_version", "GET", ref, path, on_sent=on_sent, may_send=may_send)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        return version_outcome(*res)

    async def job(
        self, ref: AnyRef, workflow_id: str, *, on_sent: OnSent = None, may_send: MaySend = None
    ) -> WorkflowInfo | Failure:
        """``GET /v3/{p}/jobs?id={workflow_id}`` (contract 5)."""
        path = f"/v3/{_seg(ref.project_id)}/jobs"
        res = await self._call(
            "job", "GET", ref, path, query=[("id", workflow_id)], on_sent=on_sent, may_send=may_send
        )
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        return job_outcome(*res, workflow_id=workflow_id)

    async def immediate_jobs(
        self,
        ref: AnyRef,
        *,
        start_time: datetime,
        end_time: datetime | None = None,
        offset: int = 0,
        limit: int = 50,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> RecentJobs | Failure:
        """``GET /v3/{p}/immediate-jobs?offset&limit&start_time[&end_time]`` (contract 6); the times are
        the cloud's (see ``clock.to_cloud``), sent as ``yyyy-mm-ddThh:mm:ssZ``."""
        path = f"/v3/{_seg(ref.project_id)}/immediate-jobs"
        query = [("offset", str(offset)), ("limit", str(limit)), ("start_time", _utc(start_time))]
        if end_time is not None:
            query.append(("end_time", _utc(end_time)))
        res = await self._call(
            "immediate_jobs", "GET", ref, path, query=query, on_sent=on_sent, may_send=may_send
        )
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        return recent_jobs_outcome(*res)

    async def list_instances(
        self,
        ref: AnyRef,
        *,
        offset: int = 0,
        limit: int = 100,
        name: str | None = None,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> InstancePage | Failure:
        """``GET /v3/{p}/instances?offset&limit[&name]`` (contract 4)."""
        path = f"/v3/{_seg(ref.project_id)}/instances"
        query = [("offset", str(offset)), ("limit", str(limit))]
        if name is not None:
            query.append(("name", name))
        res = await self._call("instances", "GET", ref, path, query=query, on_sent=on_sent, may_send=may_send)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        return instances_outcome(*res)

    async def list_proxies(
        self,
        ref: InstanceRef | ProxyRef,
        *,
        offset: int = 0,
        limit: int = 100,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> ProxyPage | Failure:
        """``GET /v3/{p}/instances/{i}/proxies?offset&limit`` (contract 3; limit 1-100, always sent)."""
        path = f"/v3/{_seg(ref.project_id)}/instances/{_seg(ref.instance_id)}/proxies"
        query = [("offset", str(offset)), ("limit", str(limit))]
        res = await self._call("proxies", "GET", ref, path, query=query, on_sent=on_sent, may_send=may_send)
        if isinstance(res, HttpFailure | TransportFailure):
            return res
        return proxies_outcome(*res)

    # ---------------------------------------------------------- transport
    async def _call(
        self,
        route: str,
        method: str,
        ref: AnyRef,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        on_sent: OnSent = None,
        may_send: MaySend = None,
    ) -> tuple[int, Mapping[str, str], bytes] | Failure:
        """One call, resent once after a 401 that a renewed token may cure. ``body``: the JSON request
        body, encoded. Returns the raw answer (status, headers, body of at most the route's cap) or the
        failure it already amounts to."""
        url = ref.endpoint.rstrip("/") + path + (("?" + canonical_query(query)) if query else "")
        payload = body or b""
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
            res = await self._send(route, method, url, headers, payload, on_sent, may_send)
            if (
                isinstance(res, tuple)
                and res[0] == 401
                and not renewed
                and await self._creds.on_unauthorized(ref.scope, headers)
            ):
                # The gateway refused the credential before the backend saw the call: resending once
                # with a renewed token cannot upgrade anything twice.
                renewed = True
                continue
            return res

    async def _send(
        self,
        route: str,
        method: str,
        url: str,
        headers: dict[str, str],
        payload: bytes,
        on_sent: OnSent,
        may_send: MaySend,
    ) -> tuple[int, Mapping[str, str], bytes] | Failure:
        attempt = _Attempt(
            now=self.clock.now, on_sent=on_sent, may_send=may_send, task=asyncio.current_task()
        )
        cap = BODY_CAPS[route]
        token = _ATTEMPT.set(attempt)
        try:
            async with self._session.request(
                method,
                url,
                data=payload if payload else None,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                proxy=proxy_for(url),
            ) as resp:
                received_at = self.clock.now()
                answer_headers: Mapping[str, str] = resp.headers
                self.clock.record(
                    header(answer_headers, "Date"),
                    sent_at=attempt.sent_at if attempt.sent_at is not None else received_at,
                    received_at=received_at,
                )
                status = resp.status
                declared = resp.content_length
                raw = None if declared is not None and declared > cap else await _read_capped(resp, cap)
                if raw is None:
                    # Never buffer an answer larger than any the API gives: drop the connection.
                    resp.close()
                    return oversized(route, status, header(answer_headers, "X-Request-Id"))
                return status, answer_headers, raw
        except _NotSent:
            return _unsent(attempt, TransportKind.CONNECT, NOT_SENT)
        except aiohttp.ClientConnectorCertificateError as exc:
            return _unsent(attempt, TransportKind.TLS, tls_detail(exc))
        except aiohttp.ClientSSLError as exc:
            # Not a certificate verdict but a handshake that cannot work (plain HTTP on an https URL,
            # no common protocol): a configuration error all the same; nothing was sent.
            return _unsent(
                attempt,
                TransportKind.TLS,
                f"TLS handshake with {exc.host}:{exc.port} failed: {_detail(exc, 'handshake failed')}",
            )
        except TimeoutError as exc:
            kind = TransportKind.TIMEOUT if attempt.sent else TransportKind.CONNECT
            return TransportFailure(kind, sent=attempt.sent, detail=_detail(exc, "timed out"))
        except aiohttp.ClientConnectorError as exc:
            return _unsent(attempt, TransportKind.CONNECT, _detail(exc, "connect failed"))
        except (aiohttp.ClientError, OSError) as exc:
            kind = TransportKind.RESET if attempt.sent else TransportKind.CONNECT
            return TransportFailure(kind, sent=attempt.sent, detail=_detail(exc, "connection failed"))
        finally:
            _ATTEMPT.reset(token)


def _unsent(attempt: _Attempt, kind: TransportKind, detail: str) -> TransportFailure:
    """A failure before this send left (``kind``: CONNECT or TLS, sent=False), unless an earlier send
    of the same request had left: aiohttp resends an idempotent request (a GET, never the upgrade POST)
    once on a new connection when the kept-alive one closed under it, and the server may have read the
    first. Then it is a RESET after sending (sent=True), whatever stopped the resend."""
    if attempt.sent:
        return TransportFailure(
            TransportKind.RESET, sent=True, detail=f"connection lost after sending; {detail}"
        )
    return TransportFailure(kind, sent=False, detail=detail)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The body, or None as soon as it proves longer than ``cap`` bytes (at most cap + 1 are read)."""
    buf = bytearray()
    while True:
        chunk = await resp.content.read(cap + 1 - len(buf))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            return None


def tls_detail(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """Which certificate check failed, for the one line that stops the run: host, the check in words,
    OpenSSL's code and message (codes from OpenSSL's ``x509_vfy.h``)."""
    cert = exc.certificate_error
    code = getattr(cert, "verify_code", None)
    message = getattr(cert, "verify_message", None) or one_line(str(cert), 120)
    what = _VERIFY_CODES.get(code, "certificate verification failed") if isinstance(code, int) else None
    what = what or "certificate verification failed"
    return (
        f"TLS certificate of {exc.host}:{exc.port} failed verification: {what} "
        f"(OpenSSL {code}: {message}); check the endpoint, or the CA bundle if it uses a private CA"
    )


def _detail(exc: BaseException, fallback: str) -> str:
    # Exception text from aiohttp names host and port only; never request headers.
    text = one_line(str(exc), 200)
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__}: {fallback}"
