"""Credential providers against a tiny IAM + service on 127.0.0.1 (real sockets, real aiohttp client).

The server here is deliberately minimal and local to this file: it issues tokens the way IAM does
(201, token in ``X-Subject-Token``, ``token.expires_at`` in the body), serves one protected route that
answers a bad token with 401 ``APIGW.0301``, and one route that verifies AK/SK signatures with our own
``compute_signature`` from what aiohttp actually put on the wire.
"""

from __future__ import annotations

import asyncio
import socket
import traceback
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from orchestrator.cloud.auth import AkSk, AuthError, IamPassword, IamUnavailable, Scope
from orchestrator.cloud.signer import canonical_query, compute_signature, parse_authorization

PROJECT_A = "054e292c9880d4992f02c0196d3ea468"
PROJECT_B = "7c1f2f0e5b9a4d2c8e3f6a1b0c9d8e7f"
PASSWORD = "S3cr3t-Pa55word!"
SK = "SKsecretvalue0123456789"
T0 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class TinyCloud:
    clock: FakeClock
    lifetime_s: float = 3600.0
    delay_s: float = 0.05
    status_override: int | None = None
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    token_queries: list[str] = field(default_factory=list)
    valid: dict[str, str] = field(default_factory=dict)  # token -> project id
    signature_checks: list[bool] = field(default_factory=list)

    async def tokens(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.token_requests.append(body)
        self.token_queries.append(request.query_string)
        await asyncio.sleep(self.delay_s)  # wide enough for concurrent callers to pile up
        if self.status_override is not None:
            return web.json_response(
                {"error_msg": "busy", "error_code": "IAM.0001"}, status=self.status_override
            )
        user = body["auth"]["identity"]["password"]["user"]
        if (user["name"], user["domain"]["name"], user["password"]) != ("alice", "acme", PASSWORD):
            # Real IAM does not echo the password; this one does, to prove we scrub it anyway.
            message = f"The username or password is wrong ({user['password']})."
            return web.json_response(
                {"error": {"code": 401, "message": message, "title": "Unauthorized"}}, status=401
            )
        project = body["auth"]["scope"]["project"]["id"]
        token = f"token-{len(self.token_requests)}-{project}"
        self.valid[token] = project
        expires = datetime.fromtimestamp(self.clock() + self.lifetime_s, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
        return web.json_response(
            {"token": {"expires_at": expires, "methods": ["password"]}},
            status=201,
            headers={"X-Subject-Token": token},
        )

    async def jobs(self, request: web.Request) -> web.Response:
        token = request.headers.get("X-Auth-Token", "")
        if self.valid.get(token) != request.match_info["project"]:
            return web.json_response(
                {"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information"},
                status=401,
            )
        return web.json_response({"job": {"id": request.query.get("id"), "status": "Running"}})

    async def signed(self, request: web.Request) -> web.Response:
        _, signed, signature = parse_authorization(request.headers["Authorization"])
        body = await request.read()
        expected = compute_signature(
            SK,
            request.method,
            request.url.raw_path,
            list(request.query.items()),
            request.headers,
            signed,
            body,
        )
        ok = expected == signature
        self.signature_checks.append(ok)
        return web.json_response(
            {"ok": ok, "path": request.path, "query": list(request.query.items())}, status=200 if ok else 401
        )


@dataclass
class Server:
    cloud: TinyCloud
    base: str
    session: aiohttp.ClientSession


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    cloud = TinyCloud(clock=FakeClock())
    app = web.Application()
    app.router.add_post("/v3/auth/tokens", cloud.tokens)
    app.router.add_get("/v3/{project}/jobs", cloud.jobs)
    app.router.add_route("*", "/signed/{tail:.*}", cloud.signed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as session:
        yield Server(cloud, f"http://{host}:{port}", session)
    await runner.cleanup()


def scope(server: Server, project: str = PROJECT_A) -> Scope:
    return Scope(project_id=project, region=None, endpoint=server.base)


def iam(server: Server, password: str = PASSWORD, **kwargs: Any) -> IamPassword:
    options: dict[str, Any] = {
        "session": server.session,
        "iam_endpoint": server.base,
        "clock": server.cloud.clock,
    }
    options.update(kwargs)
    return IamPassword("alice", "acme", password, **options)


async def get_job(server: Server, creds: IamPassword, where: Scope) -> tuple[int, Mapping[str, str]]:
    url = f"{where.endpoint}/v3/{where.project_id}/jobs?id=wf-1"
    sent = await creds.headers_for(where, "GET", url, {}, b"")
    async with server.session.get(url, headers=sent) as response:
        return response.status, sent


async def test_token_is_fetched_once_with_the_contract_body_and_cached(server: Server) -> None:
    creds = iam(server)
    status, sent = await get_job(server, creds, scope(server))
    assert status == 200
    assert sent["X-Auth-Token"] == f"token-1-{PROJECT_A}"
    assert (await get_job(server, creds, scope(server)))[0] == 200
    assert len(server.cloud.token_requests) == 1
    assert server.cloud.token_requests[0] == {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": "alice", "password": PASSWORD, "domain": {"name": "acme"}}},
            },
            "scope": {"project": {"id": PROJECT_A}},
        }
    }
    assert server.cloud.token_queries == ["nocatalog=true"]


async def test_each_project_gets_its_own_token(server: Server) -> None:
    creds = iam(server, iam_endpoint=lambda s: s.endpoint)  # IAM override equal to the service endpoint
    a = (await get_job(server, creds, scope(server, PROJECT_A)))[1]["X-Auth-Token"]
    b = (await get_job(server, creds, scope(server, PROJECT_B)))[1]["X-Auth-Token"]
    again_a = (await get_job(server, creds, scope(server, PROJECT_A)))[1]["X-Auth-Token"]
    assert a != b and a == again_a
    assert [r["auth"]["scope"]["project"]["id"] for r in server.cloud.token_requests] == [
        PROJECT_A,
        PROJECT_B,
    ]


async def test_renewal_happens_margin_seconds_before_expiry(server: Server) -> None:
    events: list[tuple[str, Mapping[str, object]]] = []
    creds = iam(server, renew_margin_s=300, on_event=lambda e, f: events.append((e, f)))
    clock = server.cloud.clock
    first = (await get_job(server, creds, scope(server)))[1]["X-Auth-Token"]
    clock.now = T0 + 3600 - 301
    assert (await get_job(server, creds, scope(server)))[1]["X-Auth-Token"] == first
    assert len(server.cloud.token_requests) == 1
    clock.now = T0 + 3600 - 299
    status, sent = await get_job(server, creds, scope(server))
    assert status == 200 and sent["X-Auth-Token"] != first
    assert len(server.cloud.token_requests) == 2
    assert [(e, f["reason"]) for e, f in events] == [
        ("auth.token.issued", "initial"),
        ("auth.token.issued", "expiring"),
    ]
    assert all(first not in repr(f) and PASSWORD not in repr(f) for _, f in events)


async def test_fifty_concurrent_callers_cause_exactly_one_token_request(server: Server) -> None:
    creds = iam(server)
    results = await asyncio.gather(*(get_job(server, creds, scope(server)) for _ in range(50)))
    assert len(server.cloud.token_requests) == 1
    assert {sent["X-Auth-Token"] for _, sent in results} == {f"token-1-{PROJECT_A}"}
    assert all(status == 200 for status, _ in results)


async def test_401_renews_once_and_the_resend_succeeds(server: Server) -> None:
    creds = iam(server)
    status, sent = await get_job(server, creds, scope(server))
    assert status == 200
    server.cloud.valid.clear()  # revoked early, as IAM may do
    statuses = await asyncio.gather(*(get_job(server, creds, scope(server)) for _ in range(50)))
    refused = [sent for status, sent in statuses if status == 401]
    assert len(refused) == 50
    verdicts = await asyncio.gather(*(creds.on_unauthorized(scope(server), s) for s in refused))
    assert all(verdicts)
    assert len(server.cloud.token_requests) == 2  # fifty 401s, one renewal
    status, resent = await get_job(server, creds, scope(server))
    assert status == 200 and resent["X-Auth-Token"] == f"token-2-{PROJECT_A}"
    # A late 401 for the old token: already replaced, worth resending, no new exchange.
    assert await creds.on_unauthorized(scope(server), sent) is True
    assert await creds.on_unauthorized(scope(server), {}) is False
    assert len(server.cloud.token_requests) == 2


async def test_bad_password_is_an_auth_error_without_the_password(server: Server) -> None:
    wrong = "Wr0ng-" + PASSWORD
    creds = iam(server, password=wrong)
    with pytest.raises(AuthError) as info:
        await get_job(server, creds, scope(server))
    assert not isinstance(info.value, IamUnavailable)
    text = str(info.value)
    assert "IAM refused user 'alice' in domain 'acme'" in text
    assert "The username or password is wrong" in text
    rendered = "".join(traceback.format_exception(info.value)) + repr(info.value)
    assert wrong not in rendered and PASSWORD not in rendered
    assert info.value.__cause__ is None


async def test_iam_trouble_is_iam_unavailable_and_a_usable_token_is_kept(server: Server) -> None:
    events: list[str] = []
    creds = iam(server, on_event=lambda e, f: events.append(e))
    token = (await get_job(server, creds, scope(server)))[1]["X-Auth-Token"]
    server.cloud.status_override = 503
    server.cloud.clock.now = T0 + 3600 - 200  # due for renewal, still valid for 200 s
    assert (await get_job(server, creds, scope(server)))[1]["X-Auth-Token"] == token
    assert (await get_job(server, creds, scope(server)))[1]["X-Auth-Token"] == token
    assert len(server.cloud.token_requests) == 2  # one failed renewal, then a pause before the next
    assert events == ["auth.token.issued", "auth.token.renew_deferred"]
    server.cloud.clock.now = T0 + 3600 - 30  # nearly expired: no longer worth sending
    with pytest.raises(IamUnavailable, match="HTTP 503"):
        await get_job(server, creds, scope(server))
    fresh = iam(server)
    with pytest.raises(IamUnavailable):
        await get_job(server, fresh, scope(server))


async def test_unreachable_iam_is_iam_unavailable(server: Server) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    creds = iam(server, iam_endpoint=f"http://127.0.0.1:{port}", request_timeout_s=2)
    with pytest.raises(IamUnavailable, match="cannot reach IAM") as info:
        await creds.headers_for(scope(server), "GET", server.base, {}, b"")
    assert PASSWORD not in str(info.value)


async def test_own_session_is_created_and_closed_borrowed_one_is_not(server: Server) -> None:
    own = IamPassword("alice", "acme", PASSWORD, iam_endpoint=server.base, clock=server.cloud.clock)
    await own.headers_for(scope(server), "GET", server.base, {}, b"")
    session = own._owned_session
    assert session is not None and not session.closed
    await own.aclose()
    assert session.closed
    borrowed = iam(server)
    await borrowed.headers_for(scope(server), "GET", server.base, {}, b"")
    await borrowed.aclose()
    assert not server.session.closed


@pytest.mark.parametrize("encoded_url", [True, False])
async def test_aksk_signatures_verify_from_what_aiohttp_puts_on_the_wire(
    server: Server, encoded_url: bool
) -> None:
    creds = AkSk("MYAK", SK, security_token="STS")
    where = scope(server)
    path = "/signed/v3/" + "/".join(["a%20b", "%E4%B8%AD%E6%96%87", "~x", "100%25", "jobs"])
    query = [("id", "a b"), ("id", ""), ("q", "1+1=2"), ("name", "中文"), ("z", "~")]
    body = '{"source_version": "2.23.12.000", "note": "ünïcode"}'.encode()
    base_headers = {"Content-Type": "application/json;charset=UTF-8", "X-Language": "en-us"}
    for method, payload in (("GET", b""), ("POST", body)):
        url = f"{server.base}{path}?{canonical_query(query)}"
        extra = await creds.headers_for(where, method, url, base_headers, payload)
        target: str | URL = URL(url, encoded=True) if encoded_url else url
        async with server.session.request(
            method, target, headers={**base_headers, **extra}, data=payload
        ) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert sorted(map(tuple, answer["query"])) == sorted(query)
        assert answer["path"] == "/signed/v3/a b/中文/~x/100%/jobs"
        signed = parse_authorization(extra["Authorization"])[1]
        assert {"host", "x-sdk-date", "x-project-id", "x-security-token", "content-type"} <= set(signed)
    # Tampering on the way is detected.
    url = f"{server.base}{path}?{canonical_query(query)}"
    extra = await creds.headers_for(where, "POST", url, base_headers, body)
    async with server.session.post(url, headers={**base_headers, **extra}, data=body + b" ") as response:
        assert response.status == 401
    assert server.cloud.signature_checks == [True, True, False]
