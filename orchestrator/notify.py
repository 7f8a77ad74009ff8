"""The run's webhook: a JSON summary POSTed when a run finishes, pauses at a window's end, or halts.

A notification must never block or fail the run: ``notify`` catches everything (but cancellation), and
its whole duration is bounded by its own budget, ``attempts * timeout + the backoff sleeps`` (5 s, 3
attempts, backoff 1 s: at most 5 + 1 + 5 + 2 + 5 = 18 s). Webhook URLs carry their token in the path
(Slack ``/services/T…/B…/X…``, Feishu/DingTalk ``?access_token=…``), so only ``mask_url``'s form reaches
logs and exception text; the body is never logged.

Retried: connection failures, timeouts, HTTP 5xx, 408 and 429. Not retried: other 4xx (the request is
wrong and stays wrong) and 3xx (redirects are not followed: a POST to a moved hook is a configuration
issue to fix, not to chase). Proxies come from the environment (``HTTPS_PROXY``, ``NO_PROXY``), as
aiohttp's ``trust_env`` reads them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import structlog

_RETRY_STATUSES = frozenset({408, 429})
_MASK = "***"


async def notify(
    url: str,
    payload: Mapping[str, Any],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109  # per attempt: the caller cannot wrap it in asyncio.timeout
    attempts: int = 3,
    backoff: float = 1.0,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> bool:
    """POST ``payload`` as JSON to ``url``; True when an attempt got a 2xx answer.

    ``timeout`` (seconds) bounds each attempt (connect, send and answer); ``attempts`` is the number of
    tries (>= 1); between tries it awaits ``sleep(backoff * 2**(n - 1))`` seconds after the n-th failure.
    Values the JSON encoder does not know (datetimes, enums) are sent as ``str()``. Never raises (except
    ``asyncio.CancelledError``): every failure is logged with the masked URL and gives False.
    """
    tries = max(1, attempts)
    budget = tries * timeout + sum(backoff * 2**n for n in range(tries - 1)) + 1.0
    masked = mask_url(url)
    log = structlog.get_logger("orchestrator.notify")  # per call: follows the logging set up by then
    try:
        async with asyncio.timeout(budget):
            return await _post_with_retries(url, masked, payload, timeout, tries, backoff, sleep, log)
    except Exception as exc:  # a notification must not fail the run, whatever went wrong
        log.warning("notify.failed", url=masked, error=type(exc).__name__)
        return False


async def _post_with_retries(
    url: str,
    masked: str,
    payload: Mapping[str, Any],
    attempt_timeout: float,
    tries: int,
    backoff: float,
    sleep: Callable[[float], Awaitable[object]],
    log: Any,
) -> bool:
    body = json.dumps(payload, default=str).encode()
    check_notify_url(url)
    headers = {"Content-Type": "application/json"}
    client_timeout = aiohttp.ClientTimeout(total=attempt_timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, trust_env=True) as session:
        for attempt in range(1, tries + 1):
            retry = True
            try:
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        log.info("notify.sent", url=masked, attempt=attempt, status=resp.status)
                        return True
                    retry = resp.status >= 500 or resp.status in _RETRY_STATUSES
                    log.warning("notify.refused", url=masked, attempt=attempt, status=resp.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # type name only: aiohttp's messages can quote the URL, token included
                log.warning("notify.unreachable", url=masked, attempt=attempt, error=type(exc).__name__)
            if not retry:
                break
            if attempt < tries:
                await sleep(backoff * 2 ** (attempt - 1))
    log.warning("notify.gave_up", url=masked, attempts=tries)
    return False


def check_notify_url(url: str) -> str:
    """Return ``url`` if it is an absolute http(s) URL with a host; raise ``ValueError`` (quoting only
    the masked URL) otherwise. For ``--notify`` and the inventory's ``notify:``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"notify URL {mask_url(url)} is not a valid URL") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"notify URL {mask_url(url)} is not an http(s) URL with a host")
    return url


def mask_url(url: str) -> str:
    """``url`` fit for logs: scheme, host and port kept; userinfo, every path segment, query values and
    the fragment replaced by ``***``. ``https://u:p@hooks.example.com/services/T1/B2/XYZ?token=abc`` ->
    ``https://***@hooks.example.com/***/***/***/***?token=***``. Never raises."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not host:
        return "<invalid url>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = (f"{_MASK}@" if "@" in parts.netloc else "") + host + (f":{port}" if port is not None else "")
    path = "".join(f"/{_MASK}" for segment in parts.path.split("/") if segment)
    query = "&".join(f"{key}={_MASK}" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return (
        f"{parts.scheme}://{netloc}{path}"
        + (f"?{query}" if parts.query else "")
        + (f"#{_MASK}" if parts.fragment else "")
    )


def summary_payload(
    *,
    event: str,
    run_id: str,
    status: str,
    exit_code: int,
    reason: str,
    counts: Mapping[str, int],
    flagged: Sequence[Mapping[str, Any]] = (),
    head: int = 10,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The notification body: ``event`` (``run.finished``, ``run.paused`` or ``run.halted``), the run id,
    status and exit code, the reason one line, job counts by status, the first ``head`` flagged jobs
    (each a mapping such as ``{"proxy": ..., "instance": ..., "reason": ...}``) and their total, and
    ``at`` (ISO 8601 UTC; now when omitted)."""
    when = (at or datetime.now(UTC)).astimezone(UTC)
    return {
        "event": event,
        "run_id": run_id,
        "status": status,
        "exit_code": exit_code,
        "reason": reason,
        "counts": dict(counts),
        "flagged": [dict(item) for item in flagged[:head]],
        "flagged_total": len(flagged),
        "at": when.isoformat(),
    }
