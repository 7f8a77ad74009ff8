"""A small hostile HTTP server on 127.0.0.1: sits in front of an upstream (the simulator) and rewrites its
answers per route and per call, to test what the orchestrator does with answers no honest cloud gives.

In-process (pytest fixtures)::

    from tests.hostile import HostileServer, Rule

    async with HostileServer(upstream=sim.url, rules=[Rule(route="upgrade", action="status_html")]) as h:
        h.url                       # point the client / the CLI's --endpoint here
        h.set_rules([...])          # replace the rules (per-rule call counters restart)
        h.log                       # one dict per call: seq, route, method, path, proxy_id, action,
                                    #   upstream_status, status ("reset"/"hang"/"stream" when not a status)

As a subprocess (for the real CLI)::

    python -m tests.hostile --upstream http://127.0.0.1:PORT [--host 127.0.0.1] [--port 0]
        [--rules '[{"route": "upgrade", "action": "null_workflow_id"}]' | --rules @rules.json]
        [--ready-file FILE] [--tls-cert CERT --tls-key KEY]
    # prints "hostile listening on URL" and writes URL to FILE; SIGTERM/SIGINT stop it.
    # Control: POST /_hostile/rules (a JSON list: replaces the rules), GET /_hostile/log.
    # Paths under /_sim/ are forwarded untouched and not logged.

Rules (``Rule``, also as JSON objects with the same keys). A call is matched against the rules in order;
the first rule whose ``route`` (a route name as in the simulator: upgrade, proxy_version, proxies,
instances, job, immediate_jobs, token, unknown, or ``*``) and ``proxy_id`` (when given) match counts the
call; if that count is in ``calls`` (1-based; None: every call) the rule's action is taken, otherwise the
next rule is tried. No rule: the call is forwarded unchanged.

| action | forwards first (default) | what the client gets |
|---|---|---|
| ``forward`` | yes | the upstream's answer |
| ``status_html`` | yes | ``status`` (502) with an HTML gateway page (so the backend applied an upgrade) |
| ``http_error`` | no | ``status`` with ``{"error_code", "error_msg"}`` (+ ``Retry-After: retry_after``) |
| ``raw`` | no | ``status`` with ``body`` (text) as ``content_type`` |
| ``null_workflow_id`` | yes | the answer with every ACCEPT item's ``workflow_id`` set to null |
| ``lower_state`` | yes | the answer with every item's ``state`` lower-cased |
| ``huge_body`` | yes | 200 with ``size`` bytes (default 100 MB) of filler, Content-Length set |
| ``endless_body`` | yes | 200, chunked, never ends (until the client goes away) |
| ``drip`` | yes | the real answer, one byte every ``interval`` seconds |
| ``reset`` | yes | the connection is aborted, no answer |
| ``hang`` | yes | nothing, until the client goes away |

``forward`` on a rule overrides the default (``forward: false`` makes ``reset`` a reset before the
backend saw anything). Without an upstream, forwarding answers 404 ``APIGW.0101``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

Action = Literal[
    "forward",
    "status_html",
    "http_error",
    "raw",
    "null_workflow_id",
    "lower_state",
    "huge_body",
    "endless_body",
    "drip",
    "reset",
    "hang",
]
NOT_FORWARDED_BY_DEFAULT = frozenset({"http_error", "raw"})
ROUTES: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (method, name, re.compile(pattern))
    for method, name, pattern in (
        ("POST", "token", r"^/v3/auth/tokens$"),
        ("POST", "upgrade", r"^/v3/[^/]+/instances/(?P<i>[^/]+)/proxy/(?P<x>[^/]+)/upgrade-version$"),
        ("GET", "proxy_version", r"^/v3/[^/]+/instances/(?P<i>[^/]+)/proxy/(?P<x>[^/]+)/taurusproxy/"
                                 r"proxy-version$"),
        ("GET", "proxies", r"^/v3/[^/]+/instances/(?P<i>[^/]+)/proxies$"),
        ("GET", "instances", r"^/v3/[^/]+/instances$"),
        ("GET", "job", r"^/v3/[^/]+/jobs$"),
        ("GET", "immediate_jobs", r"^/v3/[^/]+/immediate-jobs$"),
    )
)  # fmt: skip
_HOP_BY_HOP = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "server"}
)
_CHUNK = 64 * 1024
GATEWAY_PAGE = (
    "<html><head><title>{status} {reason}</title></head><body><center><h1>{status} {reason}</h1></center>"
    "<hr><center>hostile-gateway</center></body></html>"
)


class Rule(BaseModel):
    """One rewrite rule (see the module docstring for the actions)."""

    model_config = ConfigDict(extra="forbid")

    route: str = "*"
    action: Action = "forward"
    calls: list[int] | None = None  # 1-based numbers of the matching calls this rule hits; None: all
    proxy_id: str | None = None
    forward: bool | None = None  # None: the action's default
    status: int = Field(default=502, ge=100, le=599)
    error_code: str = "APIGW.0202"
    error_msg: str = "Service unavailable: the backend is busy."
    retry_after: str | None = None
    body: str = ""
    content_type: str = "application/json"
    size: int = Field(default=100 * 1024 * 1024, ge=0)
    interval: float = Field(default=0.5, ge=0)

    @property
    def forwards(self) -> bool:
        return self.forward if self.forward is not None else self.action not in NOT_FORWARDED_BY_DEFAULT


class _Upstream:
    """The forwarded answer."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class HostileServer:
    """The hostile server; ``async with HostileServer(upstream=url, rules=[...]) as h: h.url``."""

    def __init__(
        self,
        upstream: str | None = None,
        rules: Sequence[Rule] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.host, self._requested_port = host, port
        self.ssl_context = ssl_context
        self.log: list[dict[str, Any]] = []
        self._rules: list[Rule] = []
        self._counts: list[int] = []
        self.set_rules(rules)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._seq = 0
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Replace the rules; every rule's call counter starts at 0."""
        self._rules = list(rules)
        self._counts = [0] * len(self._rules)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> HostileServer:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/_hostile/rules", self._set_rules_route)
        app.router.add_get("/_hostile/log", self._log_route)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> HostileServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- control routes -----------------------------------------------------------------------------
    async def _set_rules_route(self, request: web.Request) -> web.StreamResponse:
        try:
            data = json.loads(await request.read())
            if not isinstance(data, list):
                raise ValueError("a JSON list of rules")
            self.set_rules([Rule.model_validate(r) for r in data])
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"rules": len(self._rules)})

    async def _log_route(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.log)

    # -- the hostile part ---------------------------------------------------------------------------
    def _route(self, method: str, path: str) -> tuple[str, str | None]:
        for want, name, pattern in ROUTES:
            m = pattern.match(path)
            if m and method == want:
                return name, m.groupdict().get("x")
        return "unknown", None

    def _pick(self, route: str, proxy_id: str | None) -> Rule | None:
        for i, rule in enumerate(self._rules):
            if rule.route not in ("*", route) or (rule.proxy_id is not None and rule.proxy_id != proxy_id):
                continue
            self._counts[i] += 1
            if rule.calls is None or self._counts[i] in rule.calls:
                return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.startswith("/_sim/"):
            passed = await self._forward(request, body)
            return web.Response(status=passed.status, body=passed.body, headers=passed.headers)
        route, proxy_id = self._route(request.method, request.path)
        rule = self._pick(route, proxy_id)
        action: Action = rule.action if rule is not None else "forward"
        self._seq += 1
        record: dict[str, Any] = {
            "seq": self._seq,
            "route": route,
            "method": request.method,
            "path": request.path,
            "proxy_id": proxy_id,
            "action": action,
            "upstream_status": None,
            "status": None,
        }
        self.log.append(record)
        up: _Upstream | None = None
        if rule is None or rule.forwards:
            up = await self._forward(request, body)
            record["upstream_status"] = up.status
        if rule is None or action == "forward":
            assert up is not None
            record["status"] = up.status
            return web.Response(status=up.status, body=up.body, headers=up.headers)
        return await self._act(request, rule, up, record)

    async def _act(
        self, request: web.Request, rule: Rule, up: _Upstream | None, record: dict[str, Any]
    ) -> web.StreamResponse:
        action = rule.action
        if action == "status_html":
            reason = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}
            page = GATEWAY_PAGE.format(status=rule.status, reason=reason.get(rule.status, "Error"))
            record["status"] = rule.status
            return web.Response(status=rule.status, text=page, content_type="text/html")
        if action == "http_error":
            headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else {}
            record["status"] = rule.status
            payload = {"error_code": rule.error_code, "error_msg": rule.error_msg}
            return web.json_response(payload, status=rule.status, headers=headers)
        if action == "raw":
            record["status"] = rule.status
            return web.Response(status=rule.status, body=rule.body.encode(), content_type=rule.content_type)
        if action in ("null_workflow_id", "lower_state"):
            status, headers, body = (up.status, up.headers, up.body) if up else (200, {}, b"{}")
            record["status"] = status
            return web.Response(status=status, body=_rewrite(body, action), headers=headers)
        if action == "huge_body":
            record["status"] = "stream"
            return await self._stream(request, rule.size)
        if action == "endless_body":
            record["status"] = "stream"
            return await self._stream(request, None)
        if action == "drip":
            record["status"] = "drip"
            return await self._drip(request, up, rule.interval)
        if action == "reset":
            record["status"] = "reset"
            return await self._drop(request)
        record["status"] = "hang"  # hang
        await asyncio.sleep(3600)  # cancelled when the client goes away (handler_cancellation)
        return web.Response(status=504)

    async def _forward(self, request: web.Request, body: bytes) -> _Upstream:
        if self.upstream is None or self._session is None:
            payload = b'{"error_code": "APIGW.0101", "error_msg": "no upstream"}'
            return _Upstream(404, {"Content-Type": "application/json"}, payload)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        url = self.upstream + request.rel_url.raw_path_qs
        # The Host header is kept as the client sent it: an AK/SK signature covers it.
        async with self._session.request(
            request.method, url, data=body or None, headers=headers, allow_redirects=False
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
            return _Upstream(resp.status, out, data)

    async def _stream(self, request: web.Request, size: int | None) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if size is not None:
            resp.content_length = size
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        block = b'{"filler": "' + b"x" * (_CHUNK - 12)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while size is None or sent < size:
                piece = block if size is None else block[: min(_CHUNK, size - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
        return resp

    async def _drip(self, request: web.Request, up: _Upstream | None, interval: float) -> web.StreamResponse:
        status, headers, body = (up.status, up.headers, up.body) if up else (200, {}, b"{}")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for i in range(len(body)):
                await resp.write(body[i : i + 1])
                await asyncio.sleep(interval)
            await resp.write_eof()
        return resp

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        await asyncio.sleep(5)  # connection_lost cancels this handler
        return web.Response(status=500)


def _rewrite(body: bytes, action: str) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    items = data.get("update_result") if isinstance(data, dict) else None
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        if action == "null_workflow_id" and item.get("state") == "ACCEPT":
            item["workflow_id"] = None
        elif action == "lower_state" and isinstance(item.get("state"), str):
            item["state"] = item["state"].lower()
    return json.dumps(data).encode()


# ------------------------------------------------------------------------------------------ subprocess


def _parse_rules(text: str | None) -> list[Rule]:
    if not text:
        return []
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, list):
        raise SystemExit("--rules: a JSON list of rule objects")
    return [Rule.model_validate(r) for r in data]


async def _serve(args: argparse.Namespace) -> None:
    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = HostileServer(
        args.upstream, _parse_rules(args.rules), host=args.host, port=args.port, ssl_context=ctx
    )
    async with server:
        if args.ready_file:
            tmp = Path(f"{args.ready_file}.tmp")
            tmp.write_text(server.url + "\n", encoding="utf-8")
            os.replace(tmp, args.ready_file)
        print(f"hostile listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.hostile``: serve until SIGINT/SIGTERM (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tests.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default=None, help="base URL to forward to (the simulator)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rules", default=None, help="a JSON list of rules, or @FILE")
    parser.add_argument("--ready-file", default=None)
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
