"""The aiohttp client against real servers on 127.0.0.1: the simulator, the hostile server in front of
it, small aiohttp apps, and TLS servers with bad certificates made by ``openssl``."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from orchestrator.cloud.answers import BODY_CAPS, KIB, upgrade_outcome
from orchestrator.cloud.api import CloudApi, InstancePage, InstanceRef, ProjectRef, ProxyPage, ProxyRef
from orchestrator.cloud.auth import NoAuth
from orchestrator.cloud.client import CloudClient, make_session
from orchestrator.limiter import Rate, SlidingWindowLimiter
from orchestrator.outcomes import (
    Answered,
    HttpFailure,
    RecentJob,
    TransportFailure,
    TransportKind,
    VersionInfo,
    WorkflowInfo,
)
from orchestrator.simulator import Scenario, SimulatorServer
from tests.hostile import HostileServer, Rule

PROJECT = "054e292c9880d4992f02c0196d3ea468"
INST, INST2 = "517ea793ab91438cbfcd9c4b1c958b1ein07", "627ea793ab91438cbfcd9c4b1c958b1ein07"
P1, P2, P3 = (f"{c * 32}po01" for c in "abc")
OLD, NEW = "2.23.12.000", "2.24.03.000"
FAST = {"pending_s": 0.05, "running_s": 0.2, "job_visible_after_s": 0.0}


def scenario(**extra: Any) -> Scenario:
    data: dict[str, Any] = {
        "seed": 3,
        "project_id": PROJECT,
        "workflow": FAST,
        "fleet": {
            "instances": [
                {"id": INST, "name": "alpha", "proxies": [{"id": P1}, {"id": P2, "nodes": 2}]},
                {"id": INST2, "name": "beta", "proxies": [{"id": P3, "status": "ABNORMAL"}]},
            ]
        },
    }
    data.update(extra)
    return Scenario.from_dict(data)


def ref(endpoint: str, instance: str = INST, proxy: str = P1) -> ProxyRef:
    return ProxyRef(project_id=PROJECT, instance_id=instance, proxy_id=proxy, endpoint=endpoint)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = make_session()
    yield s
    await s.close()


@pytest.fixture
async def client(session: aiohttp.ClientSession) -> CloudClient:
    return CloudClient(session, NoAuth(), timeout=5.0, connect_timeout=2.0)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(scenario()) as s:
        yield s


class App:
    """A one-route aiohttp app on 127.0.0.1 that counts the requests it received."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.handler = handler
        self.received = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> App:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.received += 1
            return await self.handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", counted)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def version_json(request: web.Request) -> web.StreamResponse:
    return web.json_response({"current_version": OLD, "latest_version": NEW, "can_upgrade": True})


# ------------------------------------------------------------------------------- on_sent and may_send


async def test_on_sent_is_called_once_when_the_request_leaves(client: CloudClient) -> None:
    """Issue 10 review: the send hook must call on_sent (the limiter's send time); it never did."""
    calls: list[float] = []
    async with App(version_json) as app:
        res = await client.proxy_version(ref(app.url), on_sent=lambda: calls.append(time.monotonic()))
    assert isinstance(res, VersionInfo) and res.current_version == OLD
    assert len(calls) == 1 and app.received == 1


async def test_on_sent_moves_the_limiters_start_to_the_send_time(client: CloudClient) -> None:
    now = [100.0]
    limiter = SlidingWindowLimiter(Rate(5, 1.0), clock=lambda: now[0])
    start = await limiter.acquire()
    assert start is not None and start.at == 100.0
    now[0] = 100.7  # the request leaves late (a slow connect, a busy loop)
    async with App(version_json) as app:
        await client.proxy_version(ref(app.url), on_sent=start.sent)
    assert start.at == 100.7


async def test_on_sent_is_not_called_when_nothing_left(client: CloudClient) -> None:
    calls: list[int] = []
    async with App(version_json) as app:
        url = app.url
    res = await client.proxy_version(ref(url), on_sent=lambda: calls.append(1))  # the server is gone
    assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.CONNECT, False)
    assert calls == []


async def test_may_send_false_aborts_before_a_byte_is_written(client: CloudClient) -> None:
    sent: list[int] = []
    asked: list[int] = []

    def refuse() -> bool:
        asked.append(1)
        return False

    async with App(version_json) as app:
        res = await client.upgrade(ref(app.url), OLD, NEW, on_sent=lambda: sent.append(1), may_send=refuse)
        assert isinstance(res, TransportFailure)
        assert (res.kind, res.sent) == (TransportKind.CONNECT, False)
        assert res.detail.startswith("not sent: ")
        assert (asked, sent, app.received) == ([1], [], 0)
        ok = await client.proxy_version(ref(app.url), may_send=lambda: True)
    assert isinstance(ok, VersionInfo) and app.received == 1


async def test_may_send_is_asked_after_the_connection_is_made(client: CloudClient) -> None:
    """The fencing check runs as late as possible: after a slow connect, not before it."""
    order: list[str] = []
    async with App(version_json) as app:

        def check() -> bool:
            order.append("may_send")
            return True

        real_connect = aiohttp.TCPConnector.connect

        async def slow_connect(self: aiohttp.TCPConnector, *a: Any, **kw: Any) -> Any:
            conn = await real_connect(self, *a, **kw)
            order.append("connected")
            return conn

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(aiohttp.TCPConnector, "connect", slow_connect)
            await client.proxy_version(ref(app.url), may_send=check)
    assert order == ["connected", "may_send"]


@pytest.mark.parametrize("resend", ["refused", "fenced"])
async def test_a_get_aiohttp_resends_after_its_kept_alive_connection_closed_is_a_sent_reset(
    client: CloudClient, resend: str
) -> None:
    """aiohttp resends an idempotent request once on a new connection when the kept-alive one closes
    under it. The server here read the second request before it dropped the connection; the resend then
    cannot leave: its connect is refused (the server stopped listening), or ``may_send`` refuses it (the
    claim ran out meanwhile). Either way what the caller gets must say the request left (a review found
    it reported as an unsent CONNECT failure)."""
    body = json.dumps({"current_version": OLD, "latest_version": NEW, "can_upgrade": True}).encode()
    read: list[bytes] = []
    server: asyncio.Server | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            read.append(line)
            if len(read) > 1:
                assert server is not None
                if resend == "refused":
                    server.close()  # no new connection: the resend is refused
                writer.transport.abort()
                return
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    first = await client.proxy_version(ref(url))
    assert isinstance(first, VersionInfo)
    hooks: list[str] = []

    def may_send() -> bool:
        hooks.append("may_send")
        return resend == "refused" or hooks.count("may_send") == 1

    res = await client.proxy_version(ref(url), may_send=may_send, on_sent=lambda: hooks.append("sent"))
    server.close()
    assert len(read) == 2 and read[1].startswith(b"GET ")  # the server read the request
    assert isinstance(res, TransportFailure), res
    assert (res.kind, res.sent) == (TransportKind.RESET, True), res
    assert hooks == {"refused": ["may_send", "sent"], "fenced": ["may_send", "sent", "may_send"]}[resend]


async def test_a_task_started_during_a_request_does_not_take_its_send_hooks(
    client: CloudClient, session: aiohttp.ClientSession
) -> None:
    """A task created while a request is under way copies the context that names the request's hooks; a
    request of its own on the same session must neither ask that request's ``may_send`` (refused by
    now) nor be refused by it."""
    fence = {"open": True, "asked": 0}

    def may_send() -> bool:
        fence["asked"] += 1
        return fence["open"]

    async def later(url: str) -> int:
        await asyncio.sleep(0.05)
        async with session.get(url + "/other") as resp:
            return resp.status

    async with App(version_json) as app:
        spawned: list[asyncio.Task[int]] = []

        def on_sent() -> None:
            spawned.append(asyncio.create_task(later(app.url)))

        res = await client.proxy_version(ref(app.url), may_send=may_send, on_sent=on_sent)
        fence["open"] = False
        assert isinstance(res, VersionInfo)
        assert await spawned[0] == 200
        assert (fence["asked"], app.received) == (1, 2)


async def test_a_session_without_the_send_hook_is_refused() -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(ValueError, match="make_session"):
            CloudClient(plain, NoAuth())


# --------------------------------------------------------------------------------- routes and shapes


async def test_every_route_against_the_simulator(client: CloudClient, sim: SimulatorServer) -> None:
    api: CloudApi = client
    project = ProjectRef(project_id=PROJECT, endpoint=sim.url)
    page = await api.list_instances(project, offset=0, limit=1)
    assert isinstance(page, InstancePage) and page.total_count == 2
    assert [(i.instance_id, i.name, i.status) for i in page.instances] == [(INST, "alpha", "ACTIVE")]
    page2 = await api.list_instances(project, offset=1, limit=1)
    assert isinstance(page2, InstancePage) and [i.instance_id for i in page2.instances] == [INST2]
    named = await api.list_instances(project, name="bet")
    assert isinstance(named, InstancePage) and [i.name for i in named.instances] == ["beta"]
    proxies = await api.list_proxies(InstanceRef(PROJECT, INST2, sim.url))
    assert isinstance(proxies, ProxyPage)
    assert [(p.proxy_id, p.status, p.node_num) for p in proxies.proxies] == [(P3, "ABNORMAL", 1)]
    second = await api.list_proxies(InstanceRef(PROJECT, INST, sim.url), offset=1, limit=1)
    assert isinstance(second, ProxyPage) and [p.proxy_id for p in second.proxies] == [P2]
    bad = await api.list_proxies(InstanceRef(PROJECT, INST, sim.url), limit=101)
    assert isinstance(bad, HttpFailure) and (bad.http_status, bad.error_code) == (400, "DBS.200001")

    before = datetime.now(UTC) - timedelta(seconds=2)
    answer = await api.upgrade(ref(sim.url, proxy=P2), OLD, NEW)
    assert isinstance(answer, Answered) and [i.state for i in answer.items] == ["ACCEPT", "ACCEPT"]
    assert answer.request_id
    wid = answer.items[0].workflow_id
    assert wid is not None
    job = await api.job(project, wid)
    assert isinstance(job, WorkflowInfo) and job.workflow_id == wid and job.status in ("Pending", "Running")
    recent = await api.immediate_jobs(project, start_time=before, limit=10)
    assert not isinstance(recent, HttpFailure | TransportFailure)
    assert {j.job_id for j in recent.jobs} == {i.workflow_id for i in answer.items}
    assert all(isinstance(j, RecentJob) and j.instance_id == INST for j in recent.jobs)
    busy = await api.upgrade(ref(sim.url, proxy=P1), OLD, NEW)
    assert isinstance(busy, HttpFailure) and (busy.http_status, busy.error_code) == (409, "DBS.200019")


async def test_every_answer_feeds_the_cloud_clock(session: aiohttp.ClientSession) -> None:
    """Issue 11 kind 3: the offset is measured from Date (here a cloud 3 minutes behind us)."""
    async with SimulatorServer(scenario(clock_offset_s=-180.0)) as skewed:
        client = CloudClient(session, NoAuth())
        assert client.clock.offset_s is None
        for _ in range(3):
            await client.proxy_version(ref(skewed.url))
        await client.upgrade(ref(skewed.url, proxy="nope"), OLD, NEW)  # an error answer counts too
        assert client.clock.samples == 4
        offset, unc = client.clock.offset_s, client.clock.uncertainty_s
        assert offset is not None and unc is not None
        assert abs(offset - -180.0) <= unc + 0.05 and unc < 1.0 and client.clock.large
        # immediate-jobs filters on the cloud's clock: a window in our clock finds nothing ...
        project = ProjectRef(project_id=PROJECT, endpoint=skewed.url)
        up = await client.upgrade(ref(skewed.url), OLD, NEW)
        assert isinstance(up, Answered)
        local_start = datetime.now(UTC) - timedelta(seconds=5)
        mine = await client.immediate_jobs(project, start_time=local_start, limit=10)
        assert not isinstance(mine, HttpFailure | TransportFailure) and mine.jobs == ()
        # ... the same window converted to the cloud's clock finds the workflow
        cloud = await client.immediate_jobs(project, start_time=client.clock.to_cloud(local_start), limit=10)
        assert not isinstance(cloud, HttpFailure | TransportFailure)
        assert [j.job_id for j in cloud.jobs] == [up.items[0].workflow_id]


# ------------------------------------------------------------------------- update_result validation

GOOD_ITEM = {"instance_id": INST, "workflow_id": "w-1", "state": "ACCEPT", "error_message": None}


@pytest.mark.parametrize(
    ("items", "problem"),
    [
        ([{**GOOD_ITEM, "workflow_id": None}], "ACCEPT without a workflow_id"),
        ([{**GOOD_ITEM, "workflow_id": ""}], "ACCEPT without a workflow_id"),
        ([{k: v for k, v in GOOD_ITEM.items() if k != "workflow_id"}], "ACCEPT without a workflow_id"),
        ([{**GOOD_ITEM, "state": "accept"}], 'state "accept" is not ACCEPT or REJECT'),
        ([{**GOOD_ITEM, "state": "ACCEPTED"}], "is not ACCEPT or REJECT"),
        ([{**GOOD_ITEM, "state": " ACCEPT"}], "is not ACCEPT or REJECT"),
        ([{**GOOD_ITEM, "state": None}], "state null is not ACCEPT or REJECT"),
        ([{**GOOD_ITEM, "state": 1}], "is not ACCEPT or REJECT"),
        ([{**GOOD_ITEM, "instance_id": INST2}], f"is not the instance asked for ({INST})"),
        ([{**GOOD_ITEM, "instance_id": 7}], "is not the instance asked for"),
        ([GOOD_ITEM, {**GOOD_ITEM, "state": "REJECT", "error_message": "x"}], '"w-1" appears twice'),
        ([GOOD_ITEM, GOOD_ITEM], "appears twice"),
        ([{**GOOD_ITEM, "workflow_id": 42}], "workflow_id 42 is not a string"),
        ([{**GOOD_ITEM, "error_message": {"a": 1}}], "error_message"),
        (["ACCEPT"], "update_result[0] is not an object"),
        ([], "no update_result list"),
        ({"state": "ACCEPT"}, "no update_result list"),
    ],
)
def test_items_that_do_not_prove_their_state_are_malformed(items: Any, problem: str) -> None:
    """Issue 10 kind 3, the whole kind: anything but a proven ACCEPT/REJECT goes to reconcile."""
    body = json.dumps({"update_result": items}).encode()
    res = upgrade_outcome(200, {"X-Request-Id": "r1"}, body, instance_id=INST)
    assert isinstance(res, TransportFailure)
    assert (res.kind, res.sent, res.http_status, res.request_id) == (TransportKind.MALFORMED, True, 200, "r1")
    assert problem in res.detail


@pytest.mark.parametrize(
    "items",
    [
        [GOOD_ITEM],
        [{k: v for k, v in GOOD_ITEM.items() if k != "instance_id"}],  # optional per the contract
        [{**GOOD_ITEM, "instance_id": None}],
        [GOOD_ITEM, {**GOOD_ITEM, "workflow_id": "w-2", "state": "REJECT", "error_message": "no subnet ip"}],
        [{"workflow_id": None, "state": "REJECT", "error_message": "no subnet ip"}],
        [{"workflow_id": "w-3", "state": "REJECT", "error_message": None}],
    ],
)
def test_items_that_prove_their_state_are_answers(items: list[dict[str, Any]]) -> None:
    res = upgrade_outcome(200, {}, json.dumps({"update_result": items}).encode(), instance_id=INST)
    assert isinstance(res, Answered) and [i.state for i in res.items] == [i["state"] for i in items]


@pytest.mark.parametrize(
    ("action", "problem"), [("null_workflow_id", "ACCEPT without"), ("lower_state", "accept")]
)
async def test_rewritten_answers_through_a_hostile_gateway_are_malformed(
    client: CloudClient, sim: SimulatorServer, action: str, problem: str
) -> None:
    async with HostileServer(
        sim.url, [Rule.model_validate({"route": "upgrade", "action": action})]
    ) as hostile:
        res = await client.upgrade(ref(hostile.url), OLD, NEW)
    assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.MALFORMED, True)
    assert problem in res.detail
    assert [r["effect"] for r in sim.log if r["route"] == "upgrade"] == ["applied"]


# -------------------------------------------------------------------------- hostile transport answers


async def test_gateway_502_html_after_the_backend_applied_is_an_http_failure(
    client: CloudClient, sim: SimulatorServer
) -> None:
    async with HostileServer(sim.url, [Rule(route="upgrade", action="status_html", status=502)]) as hostile:
        res = await client.upgrade(ref(hostile.url), OLD, NEW)
    assert isinstance(res, HttpFailure) and (res.http_status, res.error_code) == (502, None)
    assert res.error_msg is not None and res.error_msg.startswith("unreadable error body: <html>")
    assert [r["effect"] for r in sim.log if r["route"] == "upgrade"] == ["applied"]


async def test_reset_after_forwarding_is_a_sent_reset(client: CloudClient, sim: SimulatorServer) -> None:
    async with HostileServer(sim.url, [Rule(route="upgrade", action="reset")]) as hostile:
        res = await client.upgrade(ref(hostile.url), OLD, NEW)
    assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.RESET, True)
    assert [r["effect"] for r in sim.log if r["route"] == "upgrade"] == ["applied"]


async def test_a_dripped_answer_times_out_as_sent(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    client = CloudClient(session, NoAuth(), timeout=0.6)
    async with HostileServer(sim.url, [Rule(route="upgrade", action="drip", interval=0.2)]) as hostile:
        started = time.monotonic()
        res = await client.upgrade(ref(hostile.url), OLD, NEW)
    assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.TIMEOUT, True)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(
    ("route", "call"),
    [
        ("upgrade", lambda c, url: c.upgrade(ref(url), OLD, NEW)),
        ("proxy_version", lambda c, url: c.proxy_version(ref(url))),
        ("instances", lambda c, url: c.list_instances(ProjectRef(PROJECT, url))),
    ],
)
async def test_a_100_mb_answer_is_malformed_without_being_read(
    client: CloudClient, sim: SimulatorServer, route: str, call: Callable[[CloudClient, str], Awaitable[Any]]
) -> None:
    """Issue 11 kind 7: an oversized answer is malformed (for an upgrade: reconcile), never buffered."""
    async with HostileServer(sim.url, [Rule(route=route, action="huge_body")]) as hostile:
        started = time.monotonic()
        res = await call(client, hostile.url)
    assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.MALFORMED, True)
    assert f"larger than the {BODY_CAPS[route] // KIB} KiB allowed" in res.detail
    assert time.monotonic() - started < 3.0


async def test_an_800_mb_stream_at_concurrency_2_keeps_memory_flat(
    client: CloudClient, sim: SimulatorServer
) -> None:
    rules = [
        Rule(route="proxy_version", action="huge_body", size=800 * 1024 * 1024),
        Rule(route="instances", action="endless_body"),
    ]
    async with HostileServer(sim.url, rules) as hostile:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            results = await asyncio.gather(
                client.proxy_version(ref(hostile.url)),
                client.proxy_version(ref(hostile.url)),
                client.list_instances(ProjectRef(PROJECT, hostile.url)),
                client.list_instances(ProjectRef(PROJECT, hostile.url)),
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert all(isinstance(r, TransportFailure) and r.kind is TransportKind.MALFORMED for r in results)
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize(("extra", "ok"), [(0, True), (1, False)])
async def test_the_cap_is_exact(client: CloudClient, extra: int, ok: bool) -> None:
    cap = BODY_CAPS["proxy_version"]
    head = b'{"current_version": "2.23.12.000", "pad": "'
    body = head + b"x" * (cap - len(head) - 2 + extra) + b'"}'

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    async with App(answer) as app:
        res = await client.proxy_version(ref(app.url))
    assert isinstance(res, VersionInfo) is ok
    if not ok:
        assert isinstance(res, TransportFailure) and res.kind is TransportKind.MALFORMED


async def test_a_chunked_answer_over_the_cap_without_content_length(client: CloudClient) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"update_result": [' + b" " * (BODY_CAPS["upgrade"] + 10))
        await resp.write(b"]}")
        return resp

    async with App(answer) as app:
        res = await client.upgrade(ref(app.url), OLD, NEW)
    assert isinstance(res, TransportFailure) and res.kind is TransportKind.MALFORMED
    assert "64 KiB" in res.detail


# ---------------------------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA and server certificates: good, expired, for another host, self-signed."""
    if shutil.which("openssl") is None:  # pragma: no cover - Debian images have it
        pytest.fail("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=Test CA",
        "-days",
        "2",
        cwd=d,
    )
    for name, san, days in (
        ("good", "IP:127.0.0.1,DNS:localhost", "2"),
        ("expired", "IP:127.0.0.1,DNS:localhost", "-1"),
        ("otherhost", "DNS:gaussdb.example.com", "2"),
    ):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=server", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", days, "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip
    _openssl(
        "req", "-x509", *ec, "-keyout", "self.key", "-out", "self.pem", "-subj", "/CN=127.0.0.1",
        "-days", "2", "-addext", "subjectAltName=IP:127.0.0.1", cwd=d,
    )  # fmt: skip
    return d


def _server_ctx(certs: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
    return ctx


@pytest.mark.parametrize(
    ("cert", "trust_ca", "host", "check"),
    [
        ("self", False, "127.0.0.1", "self-signed certificate"),
        ("good", False, "127.0.0.1", "unknown CA"),
        ("expired", True, "127.0.0.1", "certificate has expired"),
        ("otherhost", True, "localhost", "hostname mismatch"),
        ("otherhost", True, "127.0.0.1", "IP address mismatch"),
    ],
)
async def test_certificate_failures_are_tls_failures_naming_the_check(
    certs: Path, cert: str, trust_ca: bool, host: str, check: str
) -> None:
    """Issue 11 kind 9: a configuration error, never sent, and the message says which check failed."""
    async with HostileServer(None, ssl_context=_server_ctx(certs, cert)) as server:
        session = make_session(ca_bundle=str(certs / "ca.pem") if trust_ca else None)
        try:
            sent: list[int] = []
            url = f"https://{host}:{server.port}"
            res = await CloudClient(session, NoAuth(), timeout=5).upgrade(
                ref(url), OLD, NEW, on_sent=lambda: sent.append(1)
            )
        finally:
            await session.close()
    assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.TLS, False)
    assert check in res.detail and f":{server.port}" in res.detail
    assert sent == [] and server.log == []


async def test_a_trusted_certificate_works_and_plain_http_on_https_is_a_tls_failure(certs: Path) -> None:
    session = make_session(ca_bundle=str(certs / "ca.pem"))
    try:
        client = CloudClient(session, NoAuth(), timeout=5)
        async with HostileServer(None, ssl_context=_server_ctx(certs, "good")) as server:
            ok = await client.proxy_version(ref(server.url))
        assert isinstance(ok, HttpFailure) and ok.error_code == "APIGW.0101"  # it answered: TLS worked
        async with App(version_json) as plain:
            res = await client.proxy_version(ref(plain.url.replace("http://", "https://")))
        assert isinstance(res, TransportFailure) and (res.kind, res.sent) == (TransportKind.TLS, False)
        assert "TLS handshake" in res.detail and plain.received == 0
    finally:
        await session.close()


# ---------------------------------------------------------------------------- the hostile subprocess


def test_the_hostile_server_runs_as_a_subprocess_and_takes_rules(tmp_path: Path) -> None:
    import sys
    import urllib.request

    ready = tmp_path / "ready"
    rules = json.dumps([{"route": "instances", "action": "http_error", "status": 503, "retry_after": "4"}])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hostile", "--rules", rules, "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.05)
        url = ready.read_text().strip()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/v3/{PROJECT}/instances", timeout=10)
        assert err.value.code == 503 and err.value.headers["Retry-After"] == "4"
        req = urllib.request.Request(f"{url}/_hostile/rules", data=b"[]", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read()) == {"rules": 0}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/v3/{PROJECT}/instances", timeout=10)
        assert err.value.code == 404  # no upstream: forwarding answers APIGW.0101
        with urllib.request.urlopen(f"{url}/_hostile/log", timeout=10) as r:
            assert [e["action"] for e in json.loads(r.read())] == ["http_error", "forward"]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_hostile_server_forwards_signed_calls_intact(session: aiohttp.ClientSession) -> None:
    """AK/SK signatures cover Host: the hostile server forwards it as sent, so a signed call verifies."""
    from orchestrator.cloud.auth import AkSk

    auth = {"mode": "aksk", "keys": [{"ak": "AKTEST", "sk": "sk-secret"}]}
    async with SimulatorServer(scenario(auth=auth)) as signed_sim, HostileServer(signed_sim.url) as hostile:
        good = CloudClient(session, AkSk("AKTEST", "sk-secret"))
        assert isinstance(await good.proxy_version(ref(hostile.url)), VersionInfo)
        bad = await CloudClient(session, AkSk("AKTEST", "wrong")).proxy_version(ref(hostile.url))
        assert isinstance(bad, HttpFailure) and (bad.http_status, bad.error_code) == (401, "APIGW.0301")
    assert [r["action"] for r in hostile.log] == ["forward", "forward"]
