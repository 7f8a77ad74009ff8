"""notify(): a real aiohttp server on 127.0.0.1 that fails, hangs or is not there; mask_url for logs."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from orchestrator.notify import check_notify_url, mask_url, notify, summary_payload

TOKEN = "T0KEN-5ecret"
PAYLOAD = {"event": "run.finished", "run_id": "r-1", "counts": {"succeeded": 3}}


@dataclass
class Hook:
    """What the webhook server answers, in order (the last repeats), and what it received."""

    answers: list[int | str] = field(default_factory=lambda: [200])
    bodies: list[Any] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    received: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(json.loads(await request.read()))
        self.content_types.append(request.content_type)
        self.received.set()
        answer = self.answers[min(len(self.bodies) - 1, len(self.answers) - 1)]
        if answer == "hang":
            await self.release.wait()
            return web.Response(status=200)
        if answer == 307:
            raise web.HTTPTemporaryRedirect("/elsewhere")
        assert isinstance(answer, int)
        return web.Response(status=answer)


@pytest.fixture
async def hook() -> AsyncIterator[tuple[Hook, str]]:
    state = Hook()
    app = web.Application()
    app.router.add_post("/services/T1/B2/{token}", state.handle)
    app.router.add_post("/elsewhere", state.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield state, str(server.make_url(f"/services/T1/B2/{TOKEN}?access_token={TOKEN}"))
    finally:
        state.release.set()
        await server.close()


def recorder() -> tuple[list[float], Callable[[float], Awaitable[None]]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return slept, sleep


async def test_fails_twice_then_succeeds(hook: tuple[Hook, str]) -> None:
    state, url = hook
    state.answers = [500, 502, 200]
    slept, sleep = recorder()
    assert await notify(url, PAYLOAD, sleep=sleep) is True
    assert state.bodies == [PAYLOAD] * 3
    assert state.content_types == ["application/json"] * 3
    assert slept == [1.0, 2.0]


async def test_gives_up_after_its_attempts(hook: tuple[Hook, str]) -> None:
    state, url = hook
    state.answers = [503]
    slept, sleep = recorder()
    assert await notify(url, PAYLOAD, attempts=3, backoff=0.5, sleep=sleep) is False
    assert len(state.bodies) == 3
    assert slept == [0.5, 1.0]


@pytest.mark.parametrize(("status", "tries"), [(404, 1), (400, 1), (307, 1), (429, 3), (408, 3)])
async def test_which_answers_are_retried(hook: tuple[Hook, str], status: int, tries: int) -> None:
    state, url = hook
    state.answers = [status]
    _, sleep = recorder()
    assert await notify(url, PAYLOAD, sleep=sleep) is False
    assert len(state.bodies) == tries  # a 307 is not followed to /elsewhere


async def test_a_hanging_hook_is_cut_at_the_timeout(hook: tuple[Hook, str]) -> None:
    state, url = hook
    state.answers = ["hang"]
    started = time.monotonic()
    assert await notify(url, PAYLOAD, timeout=0.3, attempts=2, backoff=0.05) is False
    elapsed = time.monotonic() - started
    assert len(state.bodies) == 2
    assert 0.6 <= elapsed < 2.0, elapsed


async def test_refused_connections() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    slept, sleep = recorder()
    started = time.monotonic()
    assert await notify(f"http://127.0.0.1:{port}/hook/{TOKEN}", PAYLOAD, sleep=sleep) is False
    assert slept == [1.0, 2.0]
    assert time.monotonic() - started < 2.0


async def test_never_blocks_longer_than_its_budget() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def stuck_sleep(seconds: float) -> None:
        await asyncio.sleep(3600)

    started = time.monotonic()
    # budget: 2 attempts x 0.1 s + 0.1 s of backoff + 1 s of slack
    assert (
        await notify(
            f"http://127.0.0.1:{port}/", PAYLOAD, timeout=0.1, attempts=2, backoff=0.1, sleep=stuck_sleep
        )
        is False
    )
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "url", ["not a url", "ftp://example.com/hook", "http://[::1/hook", "http://host:port/x", ""]
)
async def test_bad_urls_give_false_not_an_exception(url: str) -> None:
    _, sleep = recorder()
    assert await notify(url, PAYLOAD, sleep=sleep) is False


async def test_unencodable_payload_gives_false(hook: tuple[Hook, str]) -> None:
    state, url = hook
    circular: dict[str, Any] = {}
    circular["self"] = circular
    assert await notify(url, circular) is False
    assert state.bodies == []


async def test_datetimes_are_sent_as_text(hook: tuple[Hook, str]) -> None:
    state, url = hook
    assert await notify(url, {"at": datetime(2026, 12, 5, 1, tzinfo=UTC)}) is True
    assert state.bodies == [{"at": "2026-12-05 01:00:00+00:00"}]


async def test_cancellation_propagates(hook: tuple[Hook, str]) -> None:
    state, url = hook
    state.answers = ["hang"]
    task = asyncio.create_task(notify(url, PAYLOAD, timeout=30))
    await asyncio.wait_for(state.received.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_logs_carry_the_masked_url_only(hook: tuple[Hook, str]) -> None:
    state, url = hook
    state.answers = [500, 200]
    _, sleep = recorder()
    with structlog.testing.capture_logs() as logs:
        assert await notify(url, PAYLOAD, sleep=sleep) is True
        assert await notify(f"http://user:{TOKEN}@[::1/x", PAYLOAD, sleep=sleep) is False
    assert [entry["event"] for entry in logs] == ["notify.refused", "notify.sent", "notify.failed"]
    assert TOKEN not in repr(logs)
    assert logs[0]["url"].endswith("/***/***/***/***?access_token=***")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "https://hooks.example.com/services/T000/B000/XXXXXXXX",
            "https://hooks.example.com/***/***/***/***",
        ),
        (
            "https://user:pass@hooks.example.com:8443/robot/send?access_token=abc&sign=def#frag",
            "https://***@hooks.example.com:8443/***/***?access_token=***&sign=***#***",
        ),
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
        ("http://[::1]:9000/hook?x=", "http://[::1]:9000/***?x=***"),
        ("https://example.com", "https://example.com"),
        ("not a url", "<invalid url>"),
        ("http://[::1/x", "<invalid url>"),
        ("http://host:port/secret", "<invalid url>"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_check_notify_url_quotes_only_the_masked_form() -> None:
    good = "https://hooks.example.com/services/T/B/X"
    assert check_notify_url(good) == good
    for bad in (f"ftp://example.com/{TOKEN}", f"https:///{TOKEN}", f"http://h:{TOKEN}/"):
        with pytest.raises(ValueError) as caught:
            check_notify_url(bad)
        assert TOKEN not in str(caught.value)


def test_summary_payload_shape() -> None:
    flagged = [{"proxy": f"px-{i}", "instance": "i-1", "reason": "workflow failed"} for i in range(12)]
    body = summary_payload(
        event="run.halted",
        run_id="r-9",
        status="halted",
        exit_code=4,
        reason="halted: 3 failures exceed the limit of 2",
        counts={"failed": 3, "succeeded": 7},
        flagged=flagged,
        head=10,
        at=datetime(2026, 12, 5, 1, tzinfo=UTC),
    )
    assert body == {
        "event": "run.halted",
        "run_id": "r-9",
        "status": "halted",
        "exit_code": 4,
        "reason": "halted: 3 failures exceed the limit of 2",
        "counts": {"failed": 3, "succeeded": 7},
        "flagged": flagged[:10],
        "flagged_total": 12,
        "at": "2026-12-05T01:00:00+00:00",
    }
    assert json.loads(json.dumps(body)) == body
